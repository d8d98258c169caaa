-- pgconcord catalog, version 11: schema changes travel with the data.

-- Which schemas and tables are replicated here (written by setup from the config), so that
-- the event triggers below know what a schema change concerns.
CREATE TABLE pgconcord.replication_scope (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    schemas text[] NOT NULL,
    excluded text[] NOT NULL DEFAULT '{}'
);

-- Counts schema changes of replicated objects here; part of catalog.fingerprint(), so that an
-- agent notices it and regenerates capture (a new table is adopted, a changed one re-read).
-- refreshed_generation: the generation capture was last regenerated for.
CREATE TABLE pgconcord.schema_state (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    generation bigint NOT NULL DEFAULT 0,
    refreshed_generation bigint NOT NULL DEFAULT 0
);
INSERT INTO pgconcord.schema_state DEFAULT VALUES;

-- A schema change is logged as a change of operation 'S' (table_id 0) holding its statement
-- and search_path; peers run it at its place among the data changes (apply.py). pgconcord's
-- own statements set pgconcord.installing and are not logged; statements pgconcord applies run
-- with session_replication_role = replica, where event triggers do not fire.
CREATE FUNCTION pgconcord.log_schema_change(command_tag text) RETURNS void
LANGUAGE plpgsql AS $body$
DECLARE
    statement text := current_query();
    plain text;
    marker text;
BEGIN
    -- One statement can raise several events (ALTER TABLE ... DROP COLUMN raises two).
    marker := md5(statement) || ':' || statement_timestamp()::text;
    IF current_setting('pgconcord.logged_statement', true) = marker THEN
        RETURN;
    END IF;
    -- What a peer would run must be this statement alone: not a DO block or function that
    -- also changes data, not several statements sent as one string.
    plain := regexp_replace(statement, '\$([A-Za-z_0-9]*)\$.*?\$\1\$', ' ', 'g');
    plain := regexp_replace(plain, '''([^'']|'''')*''', ' ', 'g');
    plain := regexp_replace(plain, '"([^"]|"")*"', ' ', 'g');
    plain := regexp_replace(plain, '--[^\n]*', ' ', 'g');
    plain := regexp_replace(plain, '/\*.*?\*/', ' ', 'g');
    plain := btrim(plain, E' \t\r\n;');
    IF position(';' IN plain) > 0
       OR upper(substring(plain FROM '^\s*([A-Za-z]+)')) <> split_part(command_tag, ' ', 1) THEN
        RAISE EXCEPTION 'pgconcord: a schema change of replicated objects must be sent as one'
                        ' plain statement to be replicated (this % came in: %)',
                        command_tag, left(statement, 200)
            USING ERRCODE = 'feature_not_supported',
                  HINT = 'Run it on its own (not in a DO block, function or multi-statement'
                         ' string), or set session_replication_role = replica and make the'
                         ' same change on every node yourself.';
    END IF;
    PERFORM set_config('pgconcord.logged_statement', marker, true);
    INSERT INTO pgconcord.change_log (table_id, operation, row_key, clock, new_row)
    VALUES (0, 'S', '{}', pgconcord.clock_now(),
            jsonb_build_object('statement', statement, 'command_tag', command_tag,
                               'search_path', current_setting('search_path')));
    UPDATE pgconcord.schema_state SET generation = generation + 1;
END
$body$;

-- Is this object replicated here (in a replicated schema, not excluded, not pgconcord's)?
CREATE FUNCTION pgconcord.in_scope(schema_name text, object_name text) RETURNS boolean
LANGUAGE sql STABLE AS $body$
    SELECT coalesce((SELECT schema_name = ANY (s.schemas)
                            AND schema_name <> 'pgconcord'
                            AND NOT (schema_name || '.' || object_name) = ANY (s.excluded)
                       FROM pgconcord.replication_scope s), false)
$body$;

CREATE FUNCTION pgconcord.capture_schema_change() RETURNS event_trigger
LANGUAGE plpgsql AS $body$
DECLARE
    command record;
    registered record;
BEGIN
    IF current_setting('pgconcord.installing', true) = 'on' THEN
        RETURN;
    END IF;
    FOR command IN SELECT * FROM pg_event_trigger_ddl_commands() LOOP
        CONTINUE WHEN command.schema_name IS NULL OR command.in_extension;
        CONTINUE WHEN NOT pgconcord.in_scope(command.schema_name,
                                              split_part(command.object_identity, '.', 2));
        IF command.command_tag IN ('CREATE TABLE AS', 'SELECT INTO') THEN
            RAISE EXCEPTION 'pgconcord: % is not replicated (the rows it writes would be'
                            ' computed again on every node); create the table, then INSERT',
                            command.command_tag
                USING ERRCODE = 'feature_not_supported';
        END IF;
        IF command.command_tag = 'ALTER TABLE' AND command.object_type = 'table' THEN
            -- A rename of a replicated table would change the name its queued changes are
            -- read under before peers have renamed it.
            SELECT t.schema_name, t.table_name INTO registered
              FROM pgconcord.replicated_table t
             WHERE t.relation = command.objid
               AND NOT EXISTS (SELECT 1 FROM pg_class c
                                 JOIN pg_namespace n ON n.oid = c.relnamespace
                                WHERE c.oid = command.objid AND n.nspname = t.schema_name
                                  AND c.relname = t.table_name);
            IF FOUND THEN
                RAISE EXCEPTION 'pgconcord: renaming or moving the replicated table %.% is not'
                                ' replicated; create a new table and copy the rows instead',
                                registered.schema_name, registered.table_name
                    USING ERRCODE = 'feature_not_supported';
            END IF;
        END IF;
        PERFORM pgconcord.log_schema_change(command.command_tag);
    END LOOP;
END
$body$;

CREATE FUNCTION pgconcord.capture_schema_drop() RETURNS event_trigger
LANGUAGE plpgsql AS $body$
DECLARE
    dropped record;
BEGIN
    IF current_setting('pgconcord.installing', true) = 'on' THEN
        RETURN;
    END IF;
    FOR dropped IN SELECT * FROM pg_event_trigger_dropped_objects() LOOP
        CONTINUE WHEN dropped.schema_name IS NULL OR NOT dropped.original;
        CONTINUE WHEN dropped.object_type NOT IN ('table', 'table column', 'index', 'sequence',
                                                  'view', 'type');
        CONTINUE WHEN NOT pgconcord.in_scope(dropped.schema_name,
                                              coalesce(dropped.address_names[2], ''));
        PERFORM pgconcord.log_schema_change(tg_tag);
    END LOOP;
END
$body$;

-- The table a registry row describes, so a rename can be recognised (see above).
ALTER TABLE pgconcord.replicated_table ADD COLUMN relation oid;
