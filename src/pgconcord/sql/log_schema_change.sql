-- Logs a schema change as a change of operation 'S' (table_id 0) holding its statement, the
-- search_path it ran under and the role that ran it (see 014_definer_rights.sql); peers run it
-- at its place among the data changes, as that role (schema.py). Made anew by every catalog
-- migration (catalog.migrate).
--
-- A schema change goes through captured_change too, so that it keeps its place among the data
-- changes of its own transaction and of those before it.
CREATE OR REPLACE FUNCTION pgconcord.log_schema_change(
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
    -- A node in WAL mode captures what committed before this first (drain_wal.sql), so that
    -- the schema change follows it as it follows a trigger's capture: drained here, or, while
    -- the node's agent streams, written by the stream (drain_wal waits a second at most: the
    -- stream may itself wait for this table's lock). Only if no stamper is at work: one that
    -- applies to this table waits for its lock, held here. Never make the
    -- schema change fail for it: what is left is drained later, each row with the columns
    -- it was written with, and applies after the schema change as well.
    IF EXISTS (SELECT 1 FROM pgconcord.capture_state WHERE slot_name IS NOT NULL) THEN
        BEGIN
            IF pg_try_advisory_xact_lock(1885823843, 1937006960) THEN  -- the stamp lock
                PERFORM pgconcord.drain_wal();
            END IF;
        EXCEPTION WHEN OTHERS THEN
            RAISE WARNING 'pgconcord: the WAL was not drained before this schema change: %',
                          SQLERRM;
        END;
    END IF;
    INSERT INTO pgconcord.captured_change (table_id, operation, row_key, new_row)
    VALUES (0, 'S', '{}',
            jsonb_build_object('statement', statement, 'command_tag', command_tag,
                               'search_path', caller_search_path, 'role', caller_role));
    PERFORM pg_notify('pgconcord_change', '');
END
$body$;
