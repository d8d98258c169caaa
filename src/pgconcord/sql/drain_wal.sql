-- Capture from the WAL: what a node in WAL mode (019_wal_capture.sql) has in its slot is read
-- with the built-in pgoutput plugin and appended to captured_change, where the trigger of a
-- table in trigger mode would have put it. Made anew by every catalog migration.
--
-- Two readers, one at a time (the slot is used by one session at a time):
-- - The node's agent streams the slot (capture.stream) through the replication protocol and
--   writes what it decodes with the statements decoded_statement makes, a batch of whole
--   transactions per commit. The server decodes each change once.
-- - Without a streaming agent, whoever stamps drains the slot first (drain_wal, called by
--   stamp_captured() under the stamp lock): so every local transaction that committed before
--   the stamp began is seen, however it was captured. The slot is read with peek, in the
--   caller's transaction: if that rolls back, what was drained rolls back with it and is read
--   again. The slot moves on only to what is committed (captured_lsn), or past what held
--   nothing to capture. While an agent streams, drain_wal waits (a second at most) until the
--   stream has passed the WAL flushed when it began.
-- Both take the drain lock and skip transactions that end before captured_lsn, so neither
-- captures what the other has. Transactions applied by pgconcord carry a replication origin
-- (apply.stage.open_target) and are skipped: nothing echoes. From PostgreSQL 16 on, pgoutput
-- leaves them out itself (its origin option): the server sends, and the reader parses, none
-- of what pgconcord applied.
--
-- Values arrive as their output text under the settings this function pins and are read back
-- under the same, into a row of the table as it is now (columns by name): the logged row, the
-- key, the changed columns and the counters' old values are then computed set-wise, a batch
-- at a time, as the generic capture trigger computes them one row at a time.

-- Earlier forms of this file parsed and wrote one row at a time.
DROP FUNCTION IF EXISTS pgconcord.flushed_boundary(pg_lsn);
DROP FUNCTION IF EXISTS pgconcord.wire_string(bytea, integer);
DROP FUNCTION IF EXISTS pgconcord.wire_tuple(bytea, integer);
DROP FUNCTION IF EXISTS pgconcord.wire_row(oid, text[], text, text[], text[]);
DROP FUNCTION IF EXISTS pgconcord.capture_decoded(pgconcord.replicated_table, "char",
                                                  anyelement, anyelement, bigint, bigint);
DROP FUNCTION IF EXISTS pgconcord.write_decoded(bigint[], bigint[], oid[], "char"[], text[],
                                                text[], xid8[], bigint[]);
DROP FUNCTION IF EXISTS pgconcord.drain_wal();

-- The unsigned big-endian integer of `width` bytes at `at` (0-based) of a message.
CREATE OR REPLACE FUNCTION pgconcord.wire_integer(message bytea, at integer, width integer)
RETURNS bigint LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $body$
    SELECT ('x' || lpad(encode(substring(message FROM at + 1 FOR width), 'hex'), 16, '0'))
           ::bit(64)::bigint
$body$;

-- Where to drain to: the WAL flushed now, at the end of a record if it can be. Decoding up to
-- a flushed position that falls inside a record waits, in pg_logical_slot_peek_binary_changes,
-- until the rest of that record is flushed: for as long as the transaction writing it runs,
-- when nothing else commits. A commit flushes to the end of a record; the WAL writer flushes
-- whole pages, so a position at a page boundary (or just past its header) may be inside one.
-- Then the insert position (the end of a record, or just past a page header, which is
-- dropped) once it is flushed, or the next flushed position that is not at a page boundary;
-- after 20 ms, the page boundary all the same (never less than what is flushed: whoever
-- stamps must see every commit it can).
CREATE OR REPLACE FUNCTION pgconcord.flushed_boundary() RETURNS pg_lsn
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $body$
DECLARE
    block_size integer := current_setting('wal_block_size')::integer;
    flushed pg_lsn := pg_current_wal_flush_lsn();
    inserted pg_lsn := pg_current_wal_insert_lsn();
    page_offset integer := ((inserted - '0/0'::pg_lsn) % block_size)::integer;
    deadline timestamptz := clock_timestamp() + interval '20 milliseconds';
BEGIN
    IF page_offset IN (24, 40) THEN  -- a short or long page header
        inserted := inserted - page_offset;
    END IF;
    LOOP
        IF flushed >= inserted THEN
            RETURN inserted;
        ELSIF ((flushed - '0/0'::pg_lsn) % block_size)::integer NOT IN (0, 24, 40)
              OR clock_timestamp() > deadline THEN
            RETURN flushed;
        END IF;
        PERFORM pg_sleep(0.001);
        flushed := pg_current_wal_flush_lsn();
    END LOOP;
END
$body$;

-- Drain the slot up to the WAL flushed now; the number of changes captured. While an agent
-- streams the slot: with `wait`, wait until the stream has passed the WAL flushed now (one
-- second at most), unless this transaction holds the drain lock (which the stream would wait
-- for); then -1, as when the stream took the slot before it could be read.
--
-- The loop runs once per decoded message and is written for PL/pgSQL's fast path: plain
-- expressions, no queries and no calls of other PL/pgSQL functions per row or column.
CREATE OR REPLACE FUNCTION pgconcord.drain_wal(wait boolean DEFAULT true) RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET TimeZone = 'UTC' SET DateStyle = 'ISO, YMD' SET IntervalStyle = 'postgres'
SET extra_float_digits = 3
AS $body$
DECLARE
    state pgconcord.capture_state;
    encoding name := getdatabaseencoding();
    confirmed pg_lsn;
    streamed boolean;     -- an agent streams the slot (capture.stream)
    reached boolean;
    deadline timestamptz;
    target pg_lsn;
    decoded record;
    message bytea;
    message_length integer;
    kind text;
    part text;
    column_kind text;
    at integer;
    length integer;
    relation oid;
    relation_names jsonb := '{}';   -- relation oid -> its decoded column names
    names text[];
    column_count integer;
    changed_here boolean := false;
    kinds text;
    texts text[];
    new_kinds text;
    new_texts text[];
    old_texts text[];
    next_full bigint;
    transaction xid8;
    wall_clock bigint;
    skipping boolean := true;
    last_end pg_lsn;
    captured_here bigint := 0;
    -- Decoded changes not yet written, written in batches.
    ids bigint[] := '{}';
    second_ids bigint[] := '{}';
    relations oid[] := '{}';
    operations "char"[] := '{}';
    new_rows jsonb[] := '{}';   -- each a row's column texts, in its relation's decoded order
    old_rows jsonb[] := '{}';
    transactions xid8[] := '{}';
    clocks bigint[] := '{}';
BEGIN
    SELECT * INTO state FROM pgconcord.capture_state;
    IF state.slot_name IS NULL THEN
        RETURN 0;
    END IF;
    SELECT s.confirmed_flush_lsn, s.active AND s.active_pid <> pg_backend_pid()
      INTO confirmed, streamed
      FROM pg_replication_slots s WHERE s.slot_name = state.slot_name;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'pgconcord: the replication slot % that captures this node''s changes'
                        ' is gone (removed, or invalidated by max_slot_wal_keep_size)',
                        state.slot_name
            USING HINT = 'Run pgconcord setup to make it again; changes made since it went'
                         ' are not captured: verify and repair this node afterwards.';
    END IF;
    IF streamed THEN
        IF wait AND coalesce(current_setting('pgconcord.drain_locked', true), '') <> 'on' THEN
            target := pgconcord.flushed_boundary();
            deadline := clock_timestamp() + interval '1 second';
            -- Each query sees what the stream committed since (READ COMMITTED).
            WHILE streamed AND clock_timestamp() < deadline LOOP
                SELECT greatest(s.confirmed_flush_lsn, c.captured_lsn) >= target, s.active
                  INTO reached, streamed
                  FROM pgconcord.capture_state c
                  LEFT JOIN pg_replication_slots s ON s.slot_name = c.slot_name;
                EXIT WHEN reached;
                PERFORM pg_sleep(0.001);
            END LOOP;
        END IF;
        RETURN -1;
    END IF;
    PERFORM pg_advisory_xact_lock(1885823843, 1685217641);  -- the drain lock: 'pgcc', 'drai'
    PERFORM set_config('pgconcord.drain_locked', 'on', true);
    SELECT c.captured_lsn INTO state.captured_lsn FROM pgconcord.capture_state c;
    -- The slot moves, for good, only past what is committed: not past what this transaction
    -- drained (captured_lsn as this transaction sees it) until it commits.
    IF state.captured_lsn > confirmed
       AND coalesce(current_setting('pgconcord.drained_uncommitted', true), '') <> 'on' THEN
        BEGIN
            PERFORM pg_replication_slot_advance(state.slot_name, state.captured_lsn);
        EXCEPTION WHEN object_in_use THEN
            RETURN -1;  -- an agent has begun streaming the slot since it was looked at
        END;
        confirmed := state.captured_lsn;
    END IF;
    target := pgconcord.flushed_boundary();
    IF target <= confirmed
       OR target <= coalesce(nullif(current_setting('pgconcord.drained_to', true), ''),
                             '0/0')::pg_lsn THEN
        RETURN 0;  -- (drained_to: what this transaction drained already)
    END IF;
    next_full := pg_snapshot_xmax(pg_current_snapshot())::text::bigint;
    -- An agent may have begun streaming the slot since it was looked at.
    BEGIN
        FOR decoded IN
            SELECT c.data FROM pg_logical_slot_peek_binary_changes(
                state.slot_name, target, NULL, VARIADIC ARRAY[
                    'proto_version', '1', 'publication_names',
                    quote_ident(state.publication_name)]
                    -- PostgreSQL 16 on: pgconcord's own transactions are not even sent.
                    || CASE WHEN current_setting('server_version_num')::integer >= 160000
                            THEN ARRAY['origin', 'none'] ELSE '{}' END) c
        LOOP
            message := decoded.data;
            kind := chr(get_byte(message, 0));
            IF kind IN ('I', 'U', 'D') AND NOT skipping THEN
                relation := ((get_byte(message, 1)::bigint << 24)
                             | (get_byte(message, 2) << 16) | (get_byte(message, 3) << 8)
                             | get_byte(message, 4))::oid;
                message_length := octet_length(message);
                at := 5;
                new_texts := NULL;
                old_texts := NULL;
                -- An old row (K key, O whole: REPLICA IDENTITY FULL), a new row (N), or both.
                WHILE at < message_length LOOP
                    part := chr(get_byte(message, at));
                    column_count := (get_byte(message, at + 1) << 8) | get_byte(message, at + 2);
                    at := at + 3;
                    kinds := '';
                    texts := '{}';
                    FOR column_number IN 1 .. column_count LOOP
                        column_kind := chr(get_byte(message, at));
                        kinds := kinds || column_kind;
                        IF column_kind = 't' THEN
                            length := (get_byte(message, at + 1) << 24)
                                      | (get_byte(message, at + 2) << 16)
                                      | (get_byte(message, at + 3) << 8)
                                      | get_byte(message, at + 4);
                            texts := texts || convert_from(substring(message FROM at + 6
                                                                     FOR length), encoding);
                            at := at + 5 + length;
                        ELSE
                            texts := texts || NULL::text;  -- n null, u unchanged toasted value
                            at := at + 1;
                        END IF;
                    END LOOP;
                    IF part = 'N' THEN
                        new_kinds := kinds;
                        new_texts := texts;
                    ELSE
                        old_texts := texts;
                    END IF;
                END LOOP;
                IF new_texts IS NOT NULL AND position('u' IN new_kinds) > 0 THEN
                    -- Unchanged and toasted: REPLICA IDENTITY FULL logged it in the old row.
                    FOR column_number IN 1 .. cardinality(new_texts) LOOP
                        IF substr(new_kinds, column_number, 1) = 'u' THEN
                            new_texts[column_number] := old_texts[column_number];
                        END IF;
                    END LOOP;
                END IF;
                changed_here := true;
                ids := ids || nextval('pgconcord.change_log_id_seq');
                second_ids := second_ids
                    || CASE WHEN kind = 'U' THEN nextval('pgconcord.change_log_id_seq') END;
                relations := relations || relation;
                operations := operations || kind::"char";
                transactions := transactions || transaction;
                clocks := clocks || wall_clock;
                new_rows := new_rows || to_jsonb(new_texts);
                old_rows := old_rows || to_jsonb(old_texts);
            ELSIF kind = 'B' THEN
                -- Drained already (its end is not past captured_lsn), or not: see the commit.
                changed_here := false;
                skipping := ('0/0'::pg_lsn + pgconcord.wire_integer(message, 1, 8))
                            < state.captured_lsn;
                wall_clock := pgconcord.wire_integer(message, 9, 8) + 946684800000000;
                -- The 32-bit xid of the Begin message, with the epoch it belongs to.
                transaction := (((next_full >> 32)
                                 - CASE WHEN pgconcord.wire_integer(message, 17, 4)
                                             > (next_full & 4294967295) THEN 1 ELSE 0 END) << 32
                                | pgconcord.wire_integer(message, 17, 4))::text::xid8;
            ELSIF kind = 'O' THEN
                skipping := true;  -- applied here by pgconcord, from a peer
            ELSIF kind = 'R' THEN
                relation := pgconcord.wire_integer(message, 1, 4)::oid;
                -- Its namespace and name, zero-terminated, then the replica identity.
                at := 5;
                at := at + position('\x00'::bytea IN substring(message FROM at + 1));
                at := at + position('\x00'::bytea IN substring(message FROM at + 1)) + 1;
                names := '{}';
                column_count := pgconcord.wire_integer(message, at, 2);
                at := at + 2;
                FOR column_number IN 1 .. column_count LOOP
                    -- A column: flags, its name, type oid, type modifier.
                    length := position('\x00'::bytea IN substring(message FROM at + 2)) - 1;
                    names := names || convert_from(substring(message FROM at + 2 FOR length),
                                                   encoding);
                    at := at + 1 + length + 1 + 8;
                END LOOP;
                IF relation_names -> relation::text IS DISTINCT FROM to_jsonb(names)
                   AND relation = ANY (relations) THEN
                    -- Its columns changed: what is pending was decoded with the former ones.
                    captured_here := captured_here + pgconcord.write_decoded(
                        relation_names, ids, second_ids, relations, operations, new_rows,
                        old_rows, transactions, clocks);
                    ids := '{}'; second_ids := '{}'; relations := '{}'; operations := '{}';
                    new_rows := '{}'; old_rows := '{}'; transactions := '{}'; clocks := '{}';
                END IF;
                relation_names := relation_names || jsonb_build_object(relation::text, names);
            ELSIF kind = 'C' AND NOT skipping AND changed_here THEN
                last_end := '0/0'::pg_lsn + pgconcord.wire_integer(message, 10, 8);
            END IF;
            IF kind = 'C' AND cardinality(ids) >= 10000 THEN
                captured_here := captured_here + pgconcord.write_decoded(
                    relation_names, ids, second_ids, relations, operations, new_rows, old_rows,
                    transactions, clocks);
                ids := '{}'; second_ids := '{}'; relations := '{}'; operations := '{}';
                new_rows := '{}'; old_rows := '{}'; transactions := '{}'; clocks := '{}';
            END IF;
        END LOOP;
        IF cardinality(ids) > 0 THEN
            captured_here := captured_here + pgconcord.write_decoded(
                relation_names, ids, second_ids, relations, operations, new_rows, old_rows,
                transactions, clocks);
        END IF;
    EXCEPTION WHEN object_in_use THEN
        RETURN -1;  -- streamed since it was looked at: what this call wrote is undone
    END;
    IF last_end IS NOT NULL THEN
        UPDATE pgconcord.capture_state
           SET captured_lsn = last_end, captured_at = clock_timestamp();
        -- Until this commits, the slot must not move past what was drained here.
        PERFORM set_config('pgconcord.drained_uncommitted', 'on', true);
    ELSIF coalesce(current_setting('pgconcord.drained_uncommitted', true), '') <> 'on' THEN
        -- Nothing here to capture up to target (pgconcord's own transactions, other tables).
        BEGIN
            PERFORM pg_replication_slot_advance(state.slot_name, target);
        EXCEPTION WHEN object_in_use THEN
            NULL;  -- streamed now: the stream moves it
        END;
    END IF;
    PERFORM set_config('pgconcord.drained_to', target::text, true);
    RETURN captured_here;
END
$body$;

-- Append decoded changes to captured_change, one set-wise statement per table (made by
-- decoded_statement from the table as it is now); an update that moves the key is a delete
-- and a write.
CREATE OR REPLACE FUNCTION pgconcord.write_decoded(
    relation_names jsonb, ids bigint[], second_ids bigint[], relations oid[],
    operations "char"[], new_rows jsonb[], old_rows jsonb[], transactions xid8[],
    clocks bigint[])
RETURNS bigint LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $body$
DECLARE
    registered pgconcord.replicated_table;
    statement text[];
    written bigint;
    total bigint := 0;
BEGIN
    FOR registered IN
        SELECT t.* FROM pgconcord.replicated_table t
         WHERE t.relation IN (SELECT DISTINCT r FROM unnest(relations) r)
    LOOP
        statement := pgconcord.decoded_statement(registered, relation_names);
        EXECUTE statement[1]
                || pgconcord.decoded_rows('{$1,$2,$3,$4,$5,$6,$7,$8,$9}')
                || statement[2]
        USING ids, second_ids, relations, operations, new_rows, old_rows, transactions, clocks,
              registered.relation;
        GET DIAGNOSTICS written = ROW_COUNT;
        total := total + written;
    END LOOP;
    RETURN total;
END
$body$;

-- Where decoded_statement's statement reads its rows: from nine parameters, written as
-- `parameters` gives them ($1 ... $9 here; the stream, capture.stream, uses its driver's
-- own): the changes' arrays as write_decoded takes them, and the table's oid.
CREATE OR REPLACE FUNCTION pgconcord.decoded_rows(parameters text[]) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $body$
    SELECT format(' unnest(%s::bigint[], %s::bigint[], %s::oid[], %s::"char"[], %s::jsonb[],'
                  ' %s::jsonb[], %s::xid8[], %s::bigint[])'
                  ' AS d(id, second_id, relation, operation, new_row, old_row, transaction,'
                  ' clock) WHERE d.relation = %s::oid', VARIADIC parameters)
$body$;

-- The same rows from one parameter, written as `parameter`: a JSON array of one table's
-- changes, each [id, second id, operation, new row, old row, transaction, clock] (the stream,
-- capture.stream: one text is much cheaper for it to send than nine arrays).
CREATE OR REPLACE FUNCTION pgconcord.decoded_json_rows(parameter text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $body$
    SELECT format(' (SELECT (e ->> 0)::bigint AS id, (e ->> 1)::bigint AS second_id,'
                  ' (e ->> 2)::"char" AS operation, nullif(e -> 3, ''null'') AS new_row,'
                  ' nullif(e -> 4, ''null'') AS old_row, (e ->> 5)::xid8 AS transaction,'
                  ' (e ->> 6)::bigint AS clock FROM jsonb_array_elements(%s::jsonb) AS e) d',
                  parameter)
$body$;

-- The statement that appends one table's decoded changes, made from the table as it is now,
-- as its text before and after where it reads its rows (decoded_rows): it makes the key, the
-- logged row (logged_row's columns carried as their text), the changed columns and the
-- counters' old values as the generic capture trigger does (capture_trigger.sql).
-- `relation_names`: relation oid -> the column names its rows were decoded with.
CREATE OR REPLACE FUNCTION pgconcord.decoded_statement(
    registered pgconcord.replicated_table, relation_names jsonb)
RETURNS text[] LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $body$
DECLARE
    logged_text text[];
    merged text[];
    key_of text;          -- expressions over a row, named by the placeholder %1$s
    logged_of text;
    missing text[];       -- columns of the table the decoded rows do not have
    new_row_of text;      -- a row of the table from its decoded column texts
    old_row_of text;
BEGIN
    SELECT coalesce(array_agg(a.attname::text ORDER BY a.attnum), '{}') INTO logged_text
      FROM pg_attribute a
      JOIN pg_type t ON t.oid = a.atttypid
      JOIN pg_type b ON b.oid = CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END
     WHERE a.attrelid = registered.relation AND a.attnum > 0 AND NOT a.attisdropped
       AND a.attgenerated = ''
       AND (b.typcategory = 'A' OR b.oid = ANY ('{json,jsonb,float4,float8}'::regtype[]));
    -- Columns by name; one the WAL lacks is NULL (a generated column, before PostgreSQL 18
    -- and its publish_generated_columns), and left out of the logged row unless generated:
    -- a change made before a column was added does not carry it, as with a trigger.
    SELECT coalesce(array_agg(f.name) FILTER (WHERE f.at IS NULL AND NOT f.generated),
                    '{}'),
           format('ROW(%s)::%s', string_agg(
               CASE WHEN f.at IS NULL THEN 'NULL::' || f.type
                    ELSE format('(d.new_row ->> %s)::%s', f.at - 1, f.type) END,
               ', ' ORDER BY f.attnum), registered.relation::regclass),
           format('ROW(%s)::%s', string_agg(
               CASE WHEN f.at IS NULL THEN 'NULL::' || f.type
                    ELSE format('(d.old_row ->> %s)::%s', f.at - 1, f.type) END,
               ', ' ORDER BY f.attnum), registered.relation::regclass)
      INTO missing, new_row_of, old_row_of
      FROM (SELECT a.attnum, a.attname::text AS name, a.attgenerated <> '' AS generated,
                   format_type(a.atttypid, a.atttypmod) AS type,
                   array_position(ARRAY(SELECT jsonb_array_elements_text(
                                            relation_names -> registered.relation::text)),
                                  a.attname::text) AS at
              FROM pg_attribute a
             WHERE a.attrelid = registered.relation AND a.attnum > 0
               AND NOT a.attisdropped) f;
    -- The columns an update's changes are listed from (in the table's order, as the
    -- trigger lists them): not the key, counters or generated columns.
    merged := ARRAY(SELECT a.attname::text FROM pg_attribute a
                     WHERE a.attrelid = registered.relation AND a.attnum > 0
                       AND NOT a.attisdropped AND a.attgenerated = ''
                       AND a.attname::text <> ALL (registered.key_columns
                                                   || registered.delta_columns)
                     ORDER BY a.attnum);
    key_of := CASE WHEN registered.key_columns = '{}' THEN 'NULL::jsonb' ELSE
        (SELECT 'jsonb_build_object(' || string_agg(format('%L, (%s).%I', k, '%1$s', k), ', ')
                || ')' FROM unnest(registered.key_columns) k) END;
    -- jsonb_build_object takes at most 100 arguments: 50 columns a call.
    logged_of := CASE WHEN missing = '{}' THEN 'to_jsonb(%1$s)'
                      ELSE format('(to_jsonb(%s) - %L::text[])', '%1$s', missing) END
        || coalesce((
        SELECT string_agg(' || jsonb_build_object(' || pairs || ')', '')
          FROM (SELECT string_agg(format('%L, (%s).%I::text', c, '%1$s', c), ', ') AS pairs
                  FROM unnest(logged_text) WITH ORDINALITY AS l(c, n)
                 WHERE c <> ALL (missing)
                 GROUP BY (n - 1) / 50) chunks), '');
    -- OFFSET 0: each row, key and logged row is made once, not again where it is used.
    RETURN ARRAY[
        format(
            'INSERT INTO pgconcord.captured_change (id, txid, table_id, operation, row_key,'
            '  new_row, old_values, changed_columns, wall_clock)'
            ' SELECT c.id, d.transaction, %1$s, c.operation, c.row_key, c.new_row,'
            '        c.old_values, c.changed_columns, d.clock'
            '   FROM (SELECT d.*, CASE WHEN d.new_row IS NOT NULL THEN %2$s END AS n,'
            '                     CASE WHEN d.old_row IS NOT NULL THEN %3$s END AS o'
            '           FROM',
            registered.id, new_row_of, old_row_of),
        format(
            '          OFFSET 0) d'
            '  CROSS JOIN LATERAL (SELECT %1$s AS new_key, %2$s AS old_key,'
            '                             %3$s AS logged,'
            '                             CASE WHEN d.operation = ''U'' THEN %4$s END'
            '                                 AS old_logged OFFSET 0) k'
            '  CROSS JOIN LATERAL (SELECT d.operation = ''U'''
            '                             AND k.new_key IS DISTINCT FROM k.old_key AS moved) m'
            '  CROSS JOIN LATERAL (VALUES'
            '      (d.id, CASE WHEN m.moved THEN ''D''::"char" ELSE d.operation END,'
            '       CASE WHEN d.operation = ''D'' OR m.moved THEN k.old_key'
            '            ELSE k.new_key END,'
            '       CASE WHEN d.operation = ''D'' OR m.moved THEN NULL ELSE k.logged END,'
            '       CASE WHEN d.operation = ''U'' AND NOT m.moved THEN %5$s END,'
            '       CASE WHEN d.operation = ''U'' AND NOT m.moved THEN %6$s END, true),'
            '      (d.second_id, ''U''::"char", k.new_key, k.logged, NULL::jsonb,'
            '       NULL::text[], m.moved))'
            '    AS c(id, operation, row_key, new_row, old_values, changed_columns, wanted)'
            '  WHERE c.wanted AND (%7$L OR d.operation = ''I'')'
            '  ORDER BY c.id',
            replace(key_of, '%1$s', 'd.n'), replace(key_of, '%1$s', 'd.o'),
            replace(logged_of, '%1$s', 'd.n'), replace(logged_of, '%1$s', 'd.o'),
            coalesce((SELECT 'jsonb_build_object(' || string_agg(
                                 format('%L, to_jsonb((d.o).%I)', c, c), ', ') || ')'
                        FROM unnest(registered.delta_columns) c), 'NULL::jsonb'),
            CASE WHEN registered.policy = 'node-priority' THEN '''{}''::text[]' ELSE
                 format('ARRAY(SELECT c FROM unnest(%L::text[]) WITH ORDINALITY AS u(c, n)'
                        ' WHERE k.logged -> c IS DISTINCT FROM k.old_logged -> c ORDER BY n)',
                        merged) END,
            registered.key_columns <> '{}')];
END
$body$;
