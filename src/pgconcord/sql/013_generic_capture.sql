-- pgconcord catalog, version 13: a table is captured right from its schema change.

-- A table's own capture function (catalog.install_capture) names its columns. The moment a
-- schema change alters the table, or creates one in a replicated schema, the event trigger
-- switches it to pgconcord.capture_generic(), which looks the table up as it runs (made from
-- the same template by catalog.install_generic_capture): no write is missed and none fails on
-- a dropped column. An agent generates the table's own function again shortly after
-- (catalog.refresh_capture, when schema_state.generation has moved).

-- The row as capture logs it: to_jsonb(), with the columns jsonb would alter carried as their
-- text (the generic form of catalog._new_row).
CREATE FUNCTION pgconcord.logged_row(relation oid, record_value anyelement) RETURNS jsonb
LANGUAGE plpgsql STABLE AS $body$
DECLARE
    logged jsonb := to_jsonb(record_value);
    column_name text;
    column_text text;
BEGIN
    FOR column_name IN
        SELECT a.attname::text
          FROM pg_attribute a
          JOIN pg_type t ON t.oid = a.atttypid
          JOIN pg_type b ON b.oid = CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END
         WHERE a.attrelid = relation AND a.attnum > 0 AND NOT a.attisdropped
           AND a.attgenerated = ''
           AND (b.typcategory = 'A' OR b.oid = ANY ('{json,jsonb,float4,float8}'::regtype[]))
    LOOP
        EXECUTE format('SELECT ($1).%I::text', column_name) INTO column_text USING record_value;
        logged := logged || jsonb_build_object(column_name, column_text);
    END LOOP;
    RETURN logged;
END
$body$;

-- Register the table if it is new (its key: the primary key, or none: insert-only) and put
-- the generic capture on it.
CREATE FUNCTION pgconcord.capture_generically(relation oid) RETURNS void
LANGUAGE plpgsql AS $body$
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
    INSERT INTO pgconcord.replicated_table (schema_name, table_name, key_columns, relation)
    SELECT n.nspname, c.relname, keys, c.oid
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE c.oid = relation
        ON CONFLICT (schema_name, table_name) DO UPDATE
       SET relation = excluded.relation,
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
    PERFORM set_config('pgconcord.installing', coalesce(previous, ''), true);
END
$body$;

CREATE OR REPLACE FUNCTION pgconcord.capture_schema_change() RETURNS event_trigger
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
        -- (A renamed column is reported as a 'table column', with the table's oid.)
        IF command.object_type IN ('table', 'table column')
           AND command.command_tag IN ('CREATE TABLE', 'ALTER TABLE')
           AND EXISTS (SELECT 1 FROM pg_class c
                        WHERE c.oid = command.objid AND c.relkind IN ('r', 'p')
                          AND NOT c.relispartition) THEN
            PERFORM pgconcord.capture_generically(command.objid);
        END IF;
    END LOOP;
END
$body$;
