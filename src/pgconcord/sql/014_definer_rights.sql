-- pgconcord catalog, version 14: capture runs with pgconcord's rights, not the writer's.
--
-- An application role that may write a replicated table keeps writing it without any grant on
-- this schema: the functions its writes and its schema changes call are SECURITY DEFINER,
-- owned by the role that owns this schema, with a pinned search_path (a writer's own
-- search_path must not choose the functions or operators they run). Nobody else may run the
-- functions that write what peers act on (the change log, schema changes).
--
-- Schema changes no longer touch a shared row (schema_state): that row serialized every DDL
-- transaction against the agent and deadlocked with it. A table's registry row says whether
-- its own capture function is current; the node's own agent regenerates those that are not.

REVOKE ALL ON SCHEMA pgconcord FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA pgconcord FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA pgconcord FROM PUBLIC;

-- True while the table's own generated function captures it; false from a schema change of
-- the table (the generic capture then runs) until the node's agent regenerates it.
ALTER TABLE pgconcord.replicated_table ADD COLUMN own_capture boolean NOT NULL DEFAULT false;

-- The clock's offset from the wall clock (tests skew a node with it): a column only
-- pgconcord's role writes, not a setting, which any session could set and so win every
-- conflict, or push the clock to the end of bigint.
ALTER TABLE pgconcord.local_node ADD COLUMN clock_offset_us bigint NOT NULL DEFAULT 0;
-- PL/pgSQL, whose plans are kept for the session: an SQL function with a subquery is parsed
-- and planned again on every call, which cost a quarter of pgbench's throughput.
CREATE OR REPLACE FUNCTION pgconcord.clock_now() RETURNS bigint
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $body$
BEGIN
    RETURN (extract(epoch FROM clock_timestamp()) * 1000000)::bigint
        + coalesce((SELECT n.clock_offset_us FROM pgconcord.local_node n), 0);
END
$body$;

-- Trigger functions all tables use.
ALTER FUNCTION pgconcord.notify_change() SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION pgconcord.refuse_truncate() SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
-- Column defaults of application tables call it, as the writer.
ALTER FUNCTION pgconcord.unique_id() SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

-- The role a schema change was made as: current_user outside any SECURITY DEFINER function,
-- which inside one only the role setting still tells (SET ROLE; 'none' when not used).
CREATE FUNCTION pgconcord.calling_role() RETURNS text
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $body$
    SELECT CASE WHEN current_setting('role') = 'none' THEN session_user::text
                ELSE current_setting('role') END
$body$;

DROP FUNCTION pgconcord.log_schema_change(text);

-- A schema change is logged as a change of operation 'S' (table_id 0) holding its statement,
-- the search_path it ran under and the role that ran it; peers run it at its place among the
-- data changes, as that role (schema.py). pgconcord's own statements set pgconcord.installing
-- and are not logged; statements pgconcord applies run with session_replication_role =
-- replica, where event triggers do not fire.
CREATE FUNCTION pgconcord.log_schema_change(
    command_tag text, statement text, caller_search_path text, caller_role text
) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $body$
DECLARE
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
                               'search_path', caller_search_path, 'role', caller_role));
    PERFORM pg_notify('pgconcord_change', '');
END
$body$;

-- The sequences behind a new table's serial and identity columns hand out only values of
-- this node's key slot from the start (what catalog.set_key_slot does at setup; 100 is
-- catalog.KEY_CAPACITY), so rows written before any agent looks do not collide.
CREATE FUNCTION pgconcord.slot_new_sequences(relation oid) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $body$
DECLARE
    slot integer := (SELECT key_slot FROM pgconcord.local_node);
    capacity constant integer := 100;
    owned record;
    highest bigint;
BEGIN
    IF slot IS NULL THEN
        RETURN;
    END IF;
    FOR owned IN
        SELECT s.oid::regclass AS sequence_name, a.attname
          FROM pg_class s
          JOIN pg_sequence q ON q.seqrelid = s.oid
          JOIN pg_depend d ON d.classid = 'pg_class'::regclass AND d.objid = s.oid
                          AND d.refclassid = 'pg_class'::regclass AND d.deptype IN ('a', 'i')
          JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
         WHERE s.relkind = 'S' AND d.refobjid = relation AND q.seqincrement <> capacity
    LOOP
        EXECUTE format('ALTER SEQUENCE %s INCREMENT BY %s', owned.sequence_name, capacity);
        EXECUTE format('SELECT greatest((SELECT last_value FROM %s), (SELECT max(%I) FROM %s))',
                       owned.sequence_name, owned.attname, relation::regclass)
           INTO highest;
        PERFORM setval(owned.sequence_name, (coalesce(highest, 0) / capacity + 1) * capacity + slot,
                       false);
    END LOOP;
END
$body$;

-- Register the table if it is new (its key: the primary key, or none: insert-only) and put
-- the generic capture on it. Runs inside the schema change's own transaction, which already
-- holds the table's lock: nothing here waits for anyone.
CREATE OR REPLACE FUNCTION pgconcord.capture_generically(relation oid) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $body$
DECLARE
    previous text := current_setting('pgconcord.installing', true);
    keys text[];
BEGIN
    PERFORM set_config('pgconcord.installing', 'on', true);
    SELECT coalesce(array_agg(a.attname::text ORDER BY array_position(i.indkey::int2[], a.attnum)),
                    '{}')
      INTO keys
      FROM pg_index i
      JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey::int2[])
     WHERE i.indrelid = relation AND i.indisprimary;
    INSERT INTO pgconcord.replicated_table
        (schema_name, table_name, key_columns, relation, own_capture)
    SELECT n.nspname, c.relname, keys, c.oid, false
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE c.oid = relation
        ON CONFLICT (schema_name, table_name) DO UPDATE
       SET relation = excluded.relation, own_capture = false,
           -- A key declared in the config stays; a primary key added since takes over.
           key_columns = CASE WHEN excluded.key_columns = '{}'
                              THEN pgconcord.replicated_table.key_columns
                              ELSE excluded.key_columns END
    RETURNING key_columns INTO keys;
    EXECUTE format('DROP TRIGGER IF EXISTS pgconcord_capture ON %s', relation::regclass);
    EXECUTE format('CREATE TRIGGER pgconcord_capture AFTER INSERT OR UPDATE OR DELETE ON %s'
                   ' FOR EACH ROW EXECUTE FUNCTION pgconcord.%I()', relation::regclass,
                   CASE WHEN keys = '{}' THEN 'capture_generic_insert_only'
                        ELSE 'capture_generic' END);
    EXECUTE format('DROP TRIGGER IF EXISTS pgconcord_notify ON %s', relation::regclass);
    EXECUTE format('CREATE TRIGGER pgconcord_notify AFTER INSERT OR UPDATE OR DELETE ON %s'
                   ' FOR EACH STATEMENT EXECUTE FUNCTION pgconcord.notify_change()',
                   relation::regclass);
    EXECUTE format('DROP TRIGGER IF EXISTS pgconcord_truncate ON %s', relation::regclass);
    EXECUTE format('CREATE TRIGGER pgconcord_truncate BEFORE TRUNCATE ON %s'
                   ' FOR EACH STATEMENT EXECUTE FUNCTION pgconcord.refuse_truncate()',
                   relation::regclass);
    PERFORM pgconcord.slot_new_sequences(relation);
    PERFORM set_config('pgconcord.installing', coalesce(previous, ''), true);
END
$body$;

ALTER FUNCTION pgconcord.in_scope(text, text) SET search_path = pg_catalog, pg_temp;

-- pgconcord's own statements (setup, join, regeneration) mark their transaction; only the role
-- that owns this schema may, or any session could switch schema-change capture off.
CREATE FUNCTION pgconcord.installing() RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $body$
    SELECT coalesce(current_setting('pgconcord.installing', true), '') = 'on'
       AND (SELECT pg_has_role(pgconcord.calling_role(), n.nspowner, 'USAGE')
              FROM pg_namespace n WHERE n.nspname = 'pgconcord')
$body$;

-- The event triggers' work, given the caller's search_path (which only the caller's context
-- tells). SECURITY DEFINER and callable by anyone: it logs only the statement running now,
-- as the role running it, and only inside an event trigger (pg_event_trigger_ddl_commands
-- refuses to run anywhere else), so a direct call can forge nothing.
CREATE FUNCTION pgconcord.capture_schema_change_of(caller_search_path text)
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $body$
DECLARE
    command record;
    registered record;
BEGIN
    FOR command IN SELECT * FROM pg_event_trigger_ddl_commands() LOOP
        CONTINUE WHEN pgconcord.installing();
        -- to_jsonb() and ::text call a type's cast to json or text by itself, with the rights
        -- of whoever runs them: capture (pgconcord's role) would run the cast's function.
        IF command.command_tag = 'CREATE CAST' AND EXISTS (
               SELECT 1 FROM pg_cast c JOIN pg_proc p ON p.oid = c.castfunc
                 JOIN pg_roles r ON r.oid = p.proowner
                WHERE c.oid = command.objid AND NOT r.rolsuper) THEN
            RAISE EXCEPTION 'pgconcord: CREATE CAST WITH FUNCTION is refused here: pgconcord''s'
                            ' capture would run the function with its own rights (%)',
                            command.object_identity
                USING ERRCODE = 'insufficient_privilege',
                      HINT = 'Use WITH INOUT, or have a superuser create the cast.';
        END IF;
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
        PERFORM pgconcord.log_schema_change(command.command_tag, current_query(),
                                            caller_search_path, pgconcord.calling_role());
        -- (A renamed column is reported as a 'table column', with the table's oid.)
        IF command.object_type IN ('table', 'table column')
           AND command.command_tag IN ('CREATE TABLE', 'ALTER TABLE')
           AND EXISTS (SELECT 1 FROM pg_class c
                        WHERE c.oid = command.objid AND c.relkind IN ('r', 'p')
                          AND NOT c.relispartition) THEN
            IF EXISTS (SELECT 1 FROM pg_class c WHERE c.oid = command.objid
                          AND pg_has_role(current_user, c.relowner, 'USAGE')) THEN
                PERFORM pgconcord.capture_generically(command.objid);
            ELSE
                -- Never make the schema change fail: say what is missing instead.
                RAISE WARNING 'pgconcord: table % is not captured: it belongs to %, whose rights'
                              ' pgconcord''s role % does not have', command.object_identity,
                              (SELECT c.relowner::regrole FROM pg_class c
                                WHERE c.oid = command.objid), current_user
                    USING HINT = 'GRANT that role to pgconcord''s role and run pgconcord setup,'
                                 ' or make tables as the application''s role.';
            END IF;
        END IF;
    END LOOP;
END
$body$;

CREATE FUNCTION pgconcord.capture_schema_drop_of(command_tag text, caller_search_path text)
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $body$
DECLARE
    dropped record;
BEGIN
    -- (pg_event_trigger_dropped_objects refuses to run outside an sql_drop event trigger.)
    FOR dropped IN SELECT * FROM pg_event_trigger_dropped_objects() LOOP
        CONTINUE WHEN pgconcord.installing();
        CONTINUE WHEN dropped.schema_name IS NULL OR NOT dropped.original;
        CONTINUE WHEN dropped.object_type NOT IN ('table', 'table column', 'index', 'sequence',
                                                  'view', 'type');
        CONTINUE WHEN NOT pgconcord.in_scope(dropped.schema_name,
                                              coalesce(dropped.address_names[2], ''));
        PERFORM pgconcord.log_schema_change(command_tag, current_query(), caller_search_path,
                                            pgconcord.calling_role());
    END LOOP;
END
$body$;

-- The event trigger functions, when a superuser installs pgconcord. No SET clause (it would
-- hide the caller's search_path) and nothing named without its schema: the caller's
-- search_path, pg_temp included, must not choose a type or function here. Where pgconcord's
-- role is not a superuser, the event triggers call superuser-owned copies of these instead
-- (sql/event_triggers.sql, printed by pgconcord grant), which the agent's role cannot change.
CREATE OR REPLACE FUNCTION pgconcord.capture_schema_change() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER AS $body$
BEGIN
    PERFORM pgconcord.capture_schema_change_of(pg_catalog.current_setting('search_path'));
END
$body$;

CREATE OR REPLACE FUNCTION pgconcord.capture_schema_drop() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER AS $body$
BEGIN
    PERFORM pgconcord.capture_schema_drop_of(tg_tag, pg_catalog.current_setting('search_path'));
END
$body$;

DROP TABLE pgconcord.schema_state;

-- Only pgconcord's own role runs its functions; PUBLIC keeps unique_id() (column defaults).
-- Trigger and event trigger functions need no EXECUTE right of the writer.
REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA pgconcord FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgconcord.unique_id() TO PUBLIC;
-- What the superuser-owned event trigger functions call as the caller (see above).
GRANT EXECUTE ON FUNCTION pgconcord.capture_schema_change_of(text) TO PUBLIC;
GRANT EXECUTE ON FUNCTION pgconcord.capture_schema_drop_of(text, text) TO PUBLIC;
-- Lookup only (to name pgconcord.unique_id() in a column default); the tables and the other
-- functions stay closed.
GRANT USAGE ON SCHEMA pgconcord TO PUBLIC;
ALTER DEFAULT PRIVILEGES IN SCHEMA pgconcord REVOKE EXECUTE ON FUNCTIONS FROM PUBLIC;
