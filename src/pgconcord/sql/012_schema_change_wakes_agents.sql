-- pgconcord catalog, version 12: a schema change wakes the agents at once, like a data change
-- (otherwise the peers ran it, and adopted a new table, only at their next timed pull).
CREATE OR REPLACE FUNCTION pgconcord.log_schema_change(command_tag text) RETURNS void
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
    PERFORM pg_notify('pgconcord_change', '');
END
$body$;
