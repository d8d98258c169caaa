-- pgconcord catalog, version 16: no NOTIFY on every captured statement.
--
-- A statement-level trigger on every replicated table sent pg_notify('pgconcord_change') to
-- wake the agents. Every write statement paid for the trigger call, and every writing
-- transaction for the notification at commit, where PostgreSQL serializes notifying commits
-- on one lock (measured: about a tenth of pgbench's throughput). Agents now watch each
-- origin's snapshot instead, and pull when a transaction ended (agent.runner._watch_loop): one
-- small query per interval, whatever the write rate. Schema changes and membership news,
-- which are rare, still notify.

DO $body$
DECLARE
    notified record;
BEGIN
    FOR notified IN
        SELECT t.tgrelid::regclass AS relation
          FROM pg_trigger t
         WHERE t.tgname = 'pgconcord_notify' AND NOT t.tgisinternal
    LOOP
        BEGIN
            EXECUTE format('DROP TRIGGER pgconcord_notify ON %s', notified.relation);
        EXCEPTION WHEN insufficient_privilege THEN
            -- A table of a role the agent cannot act for (setup warns about those): its
            -- notification stays, harmless, until its owner drops it or setup runs as them.
            RAISE WARNING 'pgconcord: cannot drop trigger pgconcord_notify on %: %',
                notified.relation, SQLERRM;
        END;
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
    EXECUTE format('DROP TRIGGER IF EXISTS pgconcord_truncate ON %s', relation::regclass);
    EXECUTE format('CREATE TRIGGER pgconcord_truncate BEFORE TRUNCATE ON %s'
                   ' FOR EACH STATEMENT EXECUTE FUNCTION pgconcord.refuse_truncate()',
                   relation::regclass);
    PERFORM pgconcord.slot_new_sequences(relation);
    PERFORM set_config('pgconcord.installing', coalesce(previous, ''), true);
END
$body$;

