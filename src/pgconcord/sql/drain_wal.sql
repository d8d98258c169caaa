-- Capture from the WAL: what a node in WAL mode (019_wal_capture.sql) has in its slot is read
-- with the built-in pgoutput plugin and appended to captured_change, where the trigger of a
-- table in trigger mode would have put it. Made anew by every catalog migration.
--
-- Called by stamp_captured() under the stamp lock, before it stamps: so whoever stamps sees
-- every local transaction that committed before it began, however it was captured. The slot
-- is read with peek, in the caller's transaction: if that rolls back, what was drained rolls
-- back with it and is read again. The slot moves on only to what is committed (captured_lsn),
-- or past what held nothing to capture. Transactions applied by pgconcord carry a replication
-- origin (apply.stage.open_target) and are skipped: nothing echoes.
--
-- Values arrive as their output text under the settings this function pins and are read back
-- under the same, into a row of the table as it is now (columns by name): the logged row, the
-- key, the changed columns and the counters' old values are then computed exactly as the
-- generic capture trigger computes them.

-- The unsigned big-endian integer of `width` bytes at `at` (0-based) of a message.
CREATE OR REPLACE FUNCTION pgconcord.wire_integer(message bytea, at integer, width integer)
RETURNS bigint LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $body$
    SELECT ('x' || lpad(encode(substring(message FROM at + 1 FOR width), 'hex'), 16, '0'))
           ::bit(64)::bigint
$body$;

-- A zero-terminated string at `at`: its text, and where what follows it starts.
CREATE OR REPLACE FUNCTION pgconcord.wire_string(message bytea, at integer,
                                                OUT value text, OUT next_position integer)
LANGUAGE plpgsql IMMUTABLE STRICT AS $body$
DECLARE
    length integer := position('\x00'::bytea IN substring(message FROM at + 1)) - 1;
BEGIN
    value := convert_from(substring(message FROM at + 1 FOR length), getdatabaseencoding());
    next_position := at + length + 1;
END
$body$;

-- A TupleData at `at`: each column's kind (n null, u unchanged toasted value, t text)
-- and text, and where what follows starts.
CREATE OR REPLACE FUNCTION pgconcord.wire_tuple(message bytea, at integer,
                                               OUT kinds text, OUT texts text[],
                                               OUT next_position integer)
LANGUAGE plpgsql IMMUTABLE STRICT AS $body$
DECLARE
    columns integer := pgconcord.wire_integer(message, at, 2);
    kind text;
    length integer;
BEGIN
    kinds := '';
    texts := '{}';
    next_position := at + 2;
    FOR column_number IN 1 .. columns LOOP
        kind := chr(get_byte(message, next_position));
        kinds := kinds || kind;
        next_position := next_position + 1;
        IF kind = 't' THEN
            length := pgconcord.wire_integer(message, next_position, 4);
            texts := texts || convert_from(substring(message FROM next_position + 5 FOR length),
                                           getdatabaseencoding());
            next_position := next_position + 4 + length;
        ELSE
            texts := texts || NULL::text;
        END IF;
    END LOOP;
END
$body$;

-- The text of a row of `relation` (as the table is now) from decoded columns: names, their
-- kinds and texts; a column it lacks is NULL, an unchanged toasted value is taken from the
-- old row (REPLICA IDENTITY FULL logs it whole).
CREATE OR REPLACE FUNCTION pgconcord.wire_row(relation oid, names text[], kinds text,
                                             texts text[], old_texts text[])
RETURNS text LANGUAGE sql STABLE AS $body$
    SELECT '(' || string_agg(
               CASE WHEN value IS NULL THEN ''
                    ELSE '"' || replace(replace(value, '\', '\\'), '"', '\"') || '"' END,
               ',' ORDER BY a.attnum) || ')'
      FROM pg_attribute a
      LEFT JOIN LATERAL (SELECT array_position(names, a.attname::text) AS at) found ON true
      CROSS JOIN LATERAL (
          SELECT CASE WHEN found.at IS NULL OR a.attgenerated <> '' THEN NULL
                      WHEN substr(kinds, found.at, 1) = 'u' THEN old_texts[found.at]
                      ELSE texts[found.at] END AS value) v
     WHERE a.attrelid = relation AND a.attnum > 0 AND NOT a.attisdropped
$body$;

-- The captured changes of one decoded change, as the generic capture trigger makes them
-- (capture_trigger.sql): an update that moves the key is a delete and a write.
CREATE OR REPLACE FUNCTION pgconcord.capture_decoded(
    registered pgconcord.replicated_table, decoded_operation "char", new_record anyelement,
    old_record anyelement, change_id bigint, second_id bigint)
RETURNS TABLE (id bigint, operation "char", row_key jsonb, new_row jsonb, old_values jsonb,
               changed_columns text[])
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $body$
DECLARE
    keys text[] := registered.key_columns;
    new_key jsonb;
    old_key jsonb;
    logged jsonb;
    old_logged jsonb;
    unmerged text[];
BEGIN
    IF keys = '{}' THEN
        IF decoded_operation = 'I' THEN
            RETURN QUERY SELECT change_id, 'I'::"char", NULL::jsonb,
                                pgconcord.logged_row(registered.relation, new_record),
                                NULL::jsonb, NULL::text[];
        END IF;
        RETURN;
    END IF;
    IF NOT (new_record IS NULL) THEN
        new_key := (SELECT jsonb_object_agg(k, to_jsonb(new_record) -> k) FROM unnest(keys) k);
        logged := pgconcord.logged_row(registered.relation, new_record);
    END IF;
    IF NOT (old_record IS NULL) THEN
        old_key := (SELECT jsonb_object_agg(k, to_jsonb(old_record) -> k) FROM unnest(keys) k);
    END IF;
    IF decoded_operation = 'I' THEN
        RETURN QUERY SELECT change_id, 'I'::"char", new_key, logged, NULL::jsonb,
                            NULL::text[];
    ELSIF decoded_operation = 'D' THEN
        RETURN QUERY SELECT change_id, 'D'::"char", old_key, NULL::jsonb, NULL::jsonb,
                            NULL::text[];
    ELSIF old_key = new_key THEN
        old_logged := pgconcord.logged_row(registered.relation, old_record);
        unmerged := keys || registered.delta_columns
            || coalesce((SELECT array_agg(a.attname::text) FROM pg_attribute a
                          WHERE a.attrelid = registered.relation AND a.attgenerated <> ''), '{}');
        RETURN QUERY SELECT change_id, 'U'::"char", new_key, logged,
            (SELECT jsonb_object_agg(c, to_jsonb(old_record) -> c)
               FROM unnest(registered.delta_columns) c),
            CASE WHEN registered.policy = 'node-priority' THEN '{}'::text[] ELSE
                 ARRAY(SELECT n.key FROM jsonb_each(logged) AS n
                        WHERE n.value IS DISTINCT FROM old_logged -> n.key
                          AND n.key <> ALL (unmerged)) END;
    ELSE
        RETURN QUERY VALUES (change_id, 'D'::"char", old_key, NULL::jsonb, NULL::jsonb,
                             NULL::text[]),
                            (second_id, 'U'::"char", new_key, logged, NULL::jsonb, NULL::text[]);
    END IF;
END
$body$;

-- Drain the slot up to the WAL flushed now; the number of changes captured.
CREATE OR REPLACE FUNCTION pgconcord.drain_wal() RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET TimeZone = 'UTC' SET DateStyle = 'ISO, YMD' SET IntervalStyle = 'postgres'
SET extra_float_digits = 3
AS $body$
DECLARE
    state pgconcord.capture_state;
    confirmed pg_lsn;
    target pg_lsn;
    decoded record;
    message bytea;
    kind text;
    at integer;
    relation oid;
    relation_names jsonb := '{}';   -- relation oid -> its decoded column names
    names text[];
    column_count integer;
    changed_here boolean := false;
    new_tuple record;
    old_tuple record;
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
    new_rows text[] := '{}';
    old_rows text[] := '{}';
    transactions xid8[] := '{}';
    clocks bigint[] := '{}';
BEGIN
    SELECT * INTO state FROM pgconcord.capture_state;
    IF state.slot_name IS NULL THEN
        RETURN 0;
    END IF;
    SELECT s.confirmed_flush_lsn INTO confirmed
      FROM pg_replication_slots s WHERE s.slot_name = state.slot_name;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'pgconcord: the replication slot % that captures this node''s changes'
                        ' is gone (removed, or invalidated by max_slot_wal_keep_size)',
                        state.slot_name
            USING HINT = 'Run pgconcord setup to make it again; changes made since it went'
                         ' are not captured: verify and repair this node afterwards.';
    END IF;
    IF state.captured_lsn > confirmed THEN
        PERFORM pg_replication_slot_advance(state.slot_name, state.captured_lsn);
        confirmed := state.captured_lsn;
    END IF;
    target := pg_current_wal_flush_lsn();
    IF target <= confirmed THEN
        RETURN 0;
    END IF;
    next_full := pg_snapshot_xmax(pg_current_snapshot())::text::bigint;
    FOR decoded IN
        SELECT c.data FROM pg_logical_slot_peek_binary_changes(
            state.slot_name, target, NULL, 'proto_version', '1',
            'publication_names', quote_ident(state.publication_name)) c
    LOOP
        message := decoded.data;
        kind := chr(get_byte(message, 0));
        IF kind = 'B' THEN
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
            at := 5;
            at := (pgconcord.wire_string(message, at)).next_position;  -- schema
            at := (pgconcord.wire_string(message, at)).next_position;  -- table
            at := at + 1;                                             -- identity
            names := '{}';
            column_count := pgconcord.wire_integer(message, at, 2);
            at := at + 2;
            FOR column_number IN 1 .. column_count LOOP
                -- A column: flags, its name, type oid, type modifier.
                SELECT * INTO new_tuple FROM pgconcord.wire_string(message, at + 1);
                names := names || new_tuple.value;
                at := new_tuple.next_position + 8;
            END LOOP;
            relation_names := relation_names || jsonb_build_object(relation::text, names);
        ELSIF kind IN ('I', 'U', 'D') AND NOT skipping THEN
            relation := pgconcord.wire_integer(message, 1, 4)::oid;
            SELECT array_agg(value) INTO names
              FROM jsonb_array_elements_text(relation_names -> relation::text) value;
            at := 5;
            old_texts := NULL;
            old_tuple := NULL;
            IF chr(get_byte(message, at)) IN ('K', 'O') THEN
                SELECT * INTO old_tuple FROM pgconcord.wire_tuple(message, at + 1);
                old_texts := old_tuple.texts;
                at := old_tuple.next_position;
            END IF;
            changed_here := true;
            ids := ids || nextval('pgconcord.change_log_id_seq');
            second_ids := second_ids
                || CASE WHEN kind = 'U' THEN nextval('pgconcord.change_log_id_seq') END;
            relations := relations || relation;
            operations := operations || kind::"char";
            transactions := transactions || transaction;
            clocks := clocks || wall_clock;
            IF kind = 'D' THEN
                new_rows := new_rows || NULL::text;
            ELSE
                SELECT * INTO new_tuple FROM pgconcord.wire_tuple(message, at + 1);
                new_rows := new_rows || pgconcord.wire_row(relation, names, new_tuple.kinds,
                                                           new_tuple.texts, old_texts);
            END IF;
            IF old_texts IS NULL THEN
                old_rows := old_rows || NULL::text;
            ELSE
                old_rows := old_rows
                    || pgconcord.wire_row(relation, names, old_tuple.kinds, old_texts, NULL);
            END IF;
        ELSIF kind = 'C' AND NOT skipping AND changed_here THEN
            last_end := '0/0'::pg_lsn + pgconcord.wire_integer(message, 10, 8);
        END IF;
        IF kind = 'C' AND cardinality(ids) >= 10000 THEN
            captured_here := captured_here + pgconcord.write_decoded(
                ids, second_ids, relations, operations, new_rows, old_rows, transactions, clocks);
            ids := '{}'; second_ids := '{}'; relations := '{}'; operations := '{}';
            new_rows := '{}'; old_rows := '{}'; transactions := '{}'; clocks := '{}';
        END IF;
    END LOOP;
    IF cardinality(ids) > 0 THEN
        captured_here := captured_here + pgconcord.write_decoded(
            ids, second_ids, relations, operations, new_rows, old_rows, transactions, clocks);
    END IF;
    IF last_end IS NOT NULL THEN
        UPDATE pgconcord.capture_state
           SET captured_lsn = last_end, captured_at = clock_timestamp();
        -- Until this commits, the slot must not move past what was drained here.
        PERFORM set_config('pgconcord.drained_uncommitted', 'on', true);
    ELSIF coalesce(current_setting('pgconcord.drained_uncommitted', true), '') <> 'on' THEN
        -- Nothing here to capture up to target (pgconcord's own transactions, other tables).
        PERFORM pg_replication_slot_advance(state.slot_name, target);
    END IF;
    RETURN captured_here;
END
$body$;

-- Append decoded changes to captured_change, one statement per table, in their ids' order.
CREATE OR REPLACE FUNCTION pgconcord.write_decoded(
    ids bigint[], second_ids bigint[], relations oid[], operations "char"[], new_rows text[],
    old_rows text[], transactions xid8[], clocks bigint[])
RETURNS bigint LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $body$
DECLARE
    relation oid;
    written bigint;
    total bigint := 0;
BEGIN
    FOR relation IN SELECT DISTINCT r FROM unnest(relations) r LOOP
        EXECUTE format(
            'INSERT INTO pgconcord.captured_change (id, txid, table_id, operation, row_key,'
            '  new_row, old_values, changed_columns, wall_clock)'
            ' SELECT c.id, d.transaction, t.id, c.operation, c.row_key, c.new_row,'
            '        c.old_values, c.changed_columns, d.clock'
            '   FROM unnest($1, $2, $3, $4, $5, $6, $7, $8)'
            '        AS d(id, second_id, relation, operation, new_row, old_row, transaction, clock)'
            '   JOIN pgconcord.replicated_table t ON t.relation = d.relation'
            '  CROSS JOIN LATERAL pgconcord.capture_decoded(t, d.operation, d.new_row::%1$s,'
            '                                              d.old_row::%1$s, d.id, d.second_id) c'
            '  WHERE d.relation = $9', relation::regclass)
        USING ids, second_ids, relations, operations, new_rows, old_rows, transactions, clocks,
              relation;
        GET DIAGNOSTICS written = ROW_COUNT;
        total := total + written;
    END LOOP;
    RETURN total;
END
$body$;
