-- pgconcord catalog, version 19: capture by logical decoding (capture = "wal").
--
-- A node in WAL mode has no row trigger on its replicated tables: they are in the publication
-- capture_state names, with REPLICA IDENTITY FULL (an update's old row is what its changed
-- columns and counters' deltas are worked out from), and its slot keeps their changes in the
-- WAL until pgconcord.drain_wal() (drain_wal.sql) has appended them to captured_change. From
-- there on both modes are one: the stamper turns captured changes into the change log.
-- Whoever stamps drains first, under the stamp lock, so everything downstream (polls, the
-- apply's "stamp first", sync, part) works unchanged.
--
-- Moving a table between the modes is one transaction that adds it to the publication and
-- drops its trigger (or the reverse): the trigger's lock waits out the table's writers, and
-- a change is published iff its transaction committed after the table joined, so none is
-- captured twice or not at all (catalog.capture).

CREATE TABLE pgconcord.capture_state (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    slot_name text,                 -- NULL: the node captures with triggers only
    publication_name text,
    -- The end of the last transaction drained into captured_change, committed with the rows:
    -- the slot is moved there before it is read again, so nothing is drained twice.
    captured_lsn pg_lsn NOT NULL DEFAULT '0/0',
    captured_at timestamptz
);
INSERT INTO pgconcord.capture_state DEFAULT VALUES;
REVOKE ALL ON pgconcord.capture_state FROM PUBLIC;

-- A schema change on a table captured from the WAL does not put the generic trigger on it
-- (that would capture its writes twice); a new table still gets it until the agent moves it.
CREATE OR REPLACE FUNCTION pgconcord.capture_generically(relation oid) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $body$
DECLARE
    previous text := current_setting('pgconcord.installing', true);
    keys text[];
    published boolean;
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
    SELECT EXISTS (SELECT 1 FROM pgconcord.capture_state s
                     JOIN pg_publication p ON p.pubname = s.publication_name
                     JOIN pg_publication_rel r ON r.prpubid = p.oid AND r.prrelid = relation)
      INTO published;
    IF NOT published THEN
        EXECUTE format('DROP TRIGGER IF EXISTS pgconcord_capture ON %s', relation::regclass);
        EXECUTE format('CREATE TRIGGER pgconcord_capture AFTER INSERT OR UPDATE OR DELETE ON %s'
                       ' FOR EACH ROW EXECUTE FUNCTION pgconcord.%I()', relation::regclass,
                       CASE WHEN keys = '{}' THEN 'capture_generic_insert_only'
                            ELSE 'capture_generic' END);
    END IF;
    EXECUTE format('DROP TRIGGER IF EXISTS pgconcord_notify ON %s', relation::regclass);
    EXECUTE format('DROP TRIGGER IF EXISTS pgconcord_truncate ON %s', relation::regclass);
    EXECUTE format('CREATE TRIGGER pgconcord_truncate BEFORE TRUNCATE ON %s'
                   ' FOR EACH STATEMENT EXECUTE FUNCTION pgconcord.refuse_truncate()',
                   relation::regclass);
    PERFORM pgconcord.slot_new_sequences(relation);
    PERFORM set_config('pgconcord.installing', coalesce(previous, ''), true);
END
$body$;

-- A keyless table captured from the WAL: its inserts only, as with triggers
-- (capture_insert_only.sql); one call per statement, not per row.
CREATE FUNCTION pgconcord.refuse_keyless_change() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $body$
BEGIN
    RAISE EXCEPTION 'pgconcord: table %.% has no primary key, so only its inserts are'
                    ' replicated; % is refused', TG_TABLE_SCHEMA, TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'feature_not_supported',
              HINT = 'Add a primary key, or declare a key under [replication.keys] in the'
                     ' pgconcord config, then run pgconcord setup.';
END
$body$;
