-- Turns captured changes (captured_change, see 018_deferred_stamping.sql) into change-log rows
-- with their versions; made anew by every catalog migration (catalog.migrate). Returns how many
-- it stamped, or -1 when it would have to wait for another stamper and `wait` is false.
--
-- The versions are exactly what the capture trigger used to give each write as it happened
-- (see 008_column_versions.sql): an insert starts a generation; an update of the same key
-- stays in it and stamps the columns it changed; a delete ends it. A write's clock is one past
-- the row's latest version, whoever wrote it, so a node whose wall clock lags still wins over
-- a change it has already seen (hybrid logical clock). That holds because nothing is applied
-- to a row here before its earlier local changes are stamped: the apply stamps first, in its
-- own transaction, and then checks that no local write raced with it (apply.setwise).
--
-- Stampers take one transaction lock, so that changes are stamped one at a time in capture
-- order (the order of their ids). Two writes of one row are captured in the order they
-- committed (the second waited for the first's row lock), so a stamper never sees the second
-- without the first; and every change of a transaction becomes visible at once, so a
-- transaction is stamped whole.
CREATE OR REPLACE FUNCTION pgconcord.stamp_captured(
    wait boolean DEFAULT true, setwise boolean DEFAULT true
) RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $body$
DECLARE
    local_name text;
    clock_offset bigint;
    grouped record;
    captured pgconcord.captured_change;
    keyed boolean;
    now_clock bigint;
    next_clock bigint;
    order_clock bigint;
    logged_clock bigint;
    stamped bigint := 0;
    -- The version of the row whose changes are being stamped (pgconcord.row_version).
    row_exists boolean;
    row_clock bigint;
    row_origin text;
    row_deleted boolean;
    row_order_key bigint[];
    row_versions jsonb;
    row_last_clock bigint;
    row_last_origin text;
    row_previous_clock bigint;
    row_previous_origin text;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pgconcord.captured_change) THEN
        RETURN 0;
    END IF;
    IF wait THEN
        PERFORM pg_advisory_xact_lock(1885823843, 1937006960);  -- 'pgcc', 'stmp'
    ELSIF NOT pg_try_advisory_xact_lock(1885823843, 1937006960) THEN
        RETURN -1;
    END IF;
    IF setwise THEN
        -- Most changes are the only one of their row in what is there (a bulk load, a busy
        -- table of many rows), under a policy whose order key is empty: those are stamped
        -- in one statement, exactly as the loop below would stamp them one by one. The loop
        -- takes the rest, in capture order (tests/test_stamping.py checks both agree).
        WITH simple AS (
            SELECT c.id FROM pgconcord.captured_change c
             WHERE c.operation = 'S' OR c.row_key IS NULL
            UNION ALL
            SELECT min(c.id)
              FROM pgconcord.captured_change c
              JOIN pgconcord.replicated_table t ON t.id = c.table_id
             WHERE c.operation <> 'S' AND c.row_key IS NOT NULL
               AND t.policy NOT IN ('node-priority', 'keep-existing')
             GROUP BY c.table_id, c.row_key HAVING count(*) = 1),
        taken AS (
            DELETE FROM pgconcord.captured_change c USING simple WHERE c.id = simple.id
            RETURNING c.*),
        batch AS MATERIALIZED (
            SELECT c.*, c.wall_clock + n.clock_offset_us AS now_clock, n.name AS local_name,
                   CASE WHEN c.operation = 'S' OR c.row_key IS NULL THEN 'plain'
                        WHEN c.operation = 'D' THEN 'delete'
                        WHEN c.operation = 'U' AND c.changed_columns IS NOT NULL THEN 'merge'
                        ELSE 'write' END AS kind
              FROM taken c CROSS JOIN pgconcord.local_node n),
        deleted AS (
            INSERT INTO pgconcord.row_version AS v
                (table_id, row_key, clock, origin, deleted, order_key)
            SELECT b.table_id, b.row_key, b.now_clock, b.local_name, true, '{}'
              FROM batch b WHERE b.kind = 'delete'
            ON CONFLICT (table_id, row_key) DO UPDATE
                SET previous_clock = coalesce(v.last_clock, v.clock),
                    previous_origin = coalesce(v.last_origin, v.origin),
                    clock = greatest(excluded.clock, coalesce(v.last_clock, v.clock) + 1),
                    origin = excluded.origin, deleted = true, order_key = '{}',
                    column_versions = NULL, last_clock = NULL, last_origin = NULL
            RETURNING v.table_id, v.row_key, v.clock, v.previous_clock, v.previous_origin),
        merged AS (
            INSERT INTO pgconcord.row_version AS v
                (table_id, row_key, clock, origin, deleted, order_key, column_versions,
                 last_clock, last_origin)
            SELECT b.table_id, b.row_key, 0, '', false, '{}',
                   jsonb_object(b.changed_columns,
                                array_fill(pgconcord.version_text(b.now_clock, b.local_name),
                                           ARRAY[cardinality(b.changed_columns)])),
                   b.now_clock, b.local_name
              FROM batch b WHERE b.kind = 'merge'
            ON CONFLICT (table_id, row_key) DO UPDATE
                SET previous_clock = coalesce(v.last_clock, v.clock),
                    previous_origin = coalesce(v.last_origin, v.origin),
                    last_clock = greatest(excluded.last_clock, coalesce(v.last_clock, v.clock) + 1),
                    last_origin = excluded.last_origin,
                    clock = CASE WHEN v.deleted
                                 THEN greatest(excluded.last_clock,
                                               coalesce(v.last_clock, v.clock) + 1)
                                 ELSE v.clock END,
                    origin = CASE WHEN v.deleted THEN excluded.origin ELSE v.origin END,
                    deleted = false,
                    -- The changed columns are the keys of the map the insert would have made.
                    column_versions = CASE WHEN v.deleted THEN NULL ELSE
                        coalesce(v.column_versions, '{}') || jsonb_object(
                            ARRAY(SELECT jsonb_object_keys(excluded.column_versions)),
                            array_fill(pgconcord.version_text(
                                           greatest(excluded.last_clock,
                                                    coalesce(v.last_clock, v.clock) + 1),
                                           excluded.last_origin),
                                       ARRAY[(SELECT count(*)::integer
                                                FROM jsonb_object_keys(excluded.column_versions))]))
                        END,
                    order_key = '{}'
            RETURNING v.table_id, v.row_key, v.clock, v.origin, v.last_clock, v.previous_clock,
                      v.previous_origin, v.column_versions),
        written AS (
            INSERT INTO pgconcord.row_version AS v
                (table_id, row_key, clock, origin, deleted, order_key)
            SELECT b.table_id, b.row_key, b.now_clock, b.local_name, false, '{}'
              FROM batch b WHERE b.kind = 'write'
            ON CONFLICT (table_id, row_key) DO UPDATE
                SET previous_clock = coalesce(v.last_clock, v.clock),
                    previous_origin = coalesce(v.last_origin, v.origin),
                    clock = greatest(excluded.clock, coalesce(v.last_clock, v.clock) + 1),
                    origin = excluded.origin, deleted = false, order_key = '{}',
                    column_versions = NULL, last_clock = NULL, last_origin = NULL
            RETURNING v.table_id, v.row_key, v.clock, v.previous_clock, v.previous_origin),
        logged AS (
            INSERT INTO pgconcord.change_log
                (id, transaction_id, table_id, operation, row_key, clock, previous_clock,
                 previous_origin, new_row, old_values, order_key, generation_clock,
                 generation_origin, column_versions)
            SELECT b.id, b.txid, b.table_id, b.operation, coalesce(b.row_key, b.new_row),
                   coalesce(d.clock, m.last_clock, w.clock, b.now_clock),
                   coalesce(d.previous_clock, m.previous_clock, w.previous_clock),
                   coalesce(d.previous_origin, m.previous_origin, w.previous_origin),
                   b.new_row, CASE WHEN b.kind IN ('merge', 'write') THEN b.old_values END,
                   '{}', m.clock, m.origin, m.column_versions
              FROM batch b
              LEFT JOIN deleted d ON b.kind = 'delete'
                   AND d.table_id = b.table_id AND d.row_key = b.row_key
              LEFT JOIN merged m ON b.kind = 'merge'
                   AND m.table_id = b.table_id AND m.row_key = b.row_key
              LEFT JOIN written w ON b.kind = 'write'
                   AND w.table_id = b.table_id AND w.row_key = b.row_key
            RETURNING table_id, row_key, clock, transaction_id, operation),
        audited AS (
            -- The row history's records of these writes (audit_trigger.sql) get their clocks.
            UPDATE pgconcord.audit a SET clock = l.clock
              FROM logged l JOIN pgconcord.replicated_table t ON t.id = l.table_id
             WHERE t.audited AND l.operation <> 'S' AND a.table_id = l.table_id
               AND a.row_key = l.row_key AND a.xid = l.transaction_id AND a.event = 'write'
               AND a.clock IS NULL
            RETURNING 1)
        SELECT count(*) INTO stamped FROM logged;
    END IF;
    SELECT n.name, n.clock_offset_us INTO local_name, clock_offset FROM pgconcord.local_node n;
    -- The rest, row by row: each row's changes in capture order, from its version here,
    -- which is read once and written once (a row changed a thousand times since the last
    -- stamp is not updated a thousand times in one transaction).
    FOR grouped IN
        WITH taken AS (DELETE FROM pgconcord.captured_change RETURNING *)
        SELECT c.table_id, c.row_key, array_agg(c.* ORDER BY c.id) AS changes,
               t.policy, coalesce(t.audited, false) AS audited,
               coalesce(array_position(t.priority, local_name), 0) AS level,
               coalesce(cardinality(t.priority), 0) AS levels
          FROM taken c LEFT JOIN pgconcord.replicated_table t ON t.id = c.table_id
         GROUP BY c.table_id, c.row_key, t.policy, t.audited, t.priority
    LOOP
        keyed := grouped.row_key IS NOT NULL AND grouped.table_id <> 0;
        IF keyed THEN
            SELECT v.clock, v.origin, v.deleted, v.order_key, v.column_versions, v.last_clock,
                   v.last_origin, v.previous_clock, v.previous_origin
              INTO row_clock, row_origin, row_deleted, row_order_key, row_versions,
                   row_last_clock, row_last_origin, row_previous_clock, row_previous_origin
              FROM pgconcord.row_version v
             WHERE v.table_id = grouped.table_id AND v.row_key = grouped.row_key
               FOR UPDATE;
            row_exists := FOUND;
        END IF;
        FOREACH captured IN ARRAY grouped.changes LOOP
            stamped := stamped + 1;
            now_clock := captured.wall_clock + clock_offset;
            IF NOT keyed THEN
                -- A schema change, or an insert into a table without a key (the row is its
                -- key).
                INSERT INTO pgconcord.change_log
                    (id, transaction_id, table_id, operation, row_key, clock, new_row)
                VALUES (captured.id, captured.txid, captured.table_id, captured.operation,
                        coalesce(captured.row_key, captured.new_row), now_clock,
                        captured.new_row);
                CONTINUE;
            END IF;
            -- What the capture trigger's row-version upsert did (008_column_versions.sql):
            -- the previous version is the row's latest write; the new clock is one past it.
            IF row_exists THEN
                row_previous_clock := coalesce(row_last_clock, row_clock);
                row_previous_origin := coalesce(row_last_origin, row_origin);
                next_clock := greatest(now_clock, row_previous_clock + 1);
                order_clock := greatest(now_clock, row_clock + 1);
            ELSE
                row_previous_clock := NULL;
                row_previous_origin := NULL;
                next_clock := now_clock;
                order_clock := now_clock;
            END IF;
            IF captured.operation = 'D' THEN
                row_order_key := pgconcord.next_order_key(
                    grouped.policy, grouped.level, grouped.levels,
                    CASE WHEN row_exists THEN row_order_key END,
                    CASE WHEN row_exists THEN row_deleted END, 'D', order_clock);
                row_clock := next_clock;
                row_origin := local_name;
                row_deleted := true;
                row_versions := NULL;
                row_last_clock := NULL;
                row_last_origin := NULL;
                logged_clock := row_clock;
                INSERT INTO pgconcord.change_log
                    (id, transaction_id, table_id, operation, row_key, clock, previous_clock,
                     previous_origin, new_row, order_key)
                VALUES (captured.id, captured.txid, captured.table_id, 'D', captured.row_key,
                        row_clock, row_previous_clock, row_previous_origin, NULL,
                        row_order_key);
            ELSIF captured.operation = 'U' AND captured.changed_columns IS NOT NULL
                  AND grouped.policy IS DISTINCT FROM 'node-priority' THEN
                -- An update of the same key, under a policy that merges columns. A row without
                -- a version yet was there before replication began: its generation is the
                -- same zero version on every node. A tombstone under a live row (written
                -- outside pgconcord) starts afresh.
                row_order_key := pgconcord.next_order_key(
                    grouped.policy, grouped.level, grouped.levels,
                    CASE WHEN row_exists THEN row_order_key END,
                    CASE WHEN row_exists THEN row_deleted END, 'U', order_clock);
                IF NOT row_exists THEN
                    row_clock := 0;
                    row_origin := '';
                    row_versions := jsonb_object(
                        captured.changed_columns,
                        array_fill(pgconcord.version_text(now_clock, local_name),
                                   ARRAY[cardinality(captured.changed_columns)]));
                ELSIF row_deleted THEN
                    row_clock := next_clock;
                    row_origin := '';
                    row_versions := NULL;
                ELSE
                    row_versions := coalesce(row_versions, '{}') || jsonb_object(
                        captured.changed_columns,
                        array_fill(pgconcord.version_text(next_clock, local_name),
                                   ARRAY[cardinality(captured.changed_columns)]));
                END IF;
                row_deleted := false;
                row_last_clock := next_clock;
                row_last_origin := local_name;
                logged_clock := row_last_clock;
                INSERT INTO pgconcord.change_log
                    (id, transaction_id, table_id, operation, row_key, clock, previous_clock,
                     previous_origin, new_row, old_values, order_key, generation_clock,
                     generation_origin, column_versions)
                VALUES (captured.id, captured.txid, captured.table_id, 'U', captured.row_key,
                        row_last_clock, row_previous_clock, row_previous_origin,
                        captured.new_row, captured.old_values, row_order_key, row_clock,
                        row_origin, row_versions);
            ELSE
                -- An insert, an update under node-priority (every write starts a generation),
                -- or the new key of an update that moved the row.
                row_order_key := pgconcord.next_order_key(
                    grouped.policy, grouped.level, grouped.levels,
                    CASE WHEN row_exists THEN row_order_key END,
                    CASE WHEN row_exists THEN row_deleted END, captured.operation,
                    order_clock);
                row_clock := next_clock;
                row_origin := local_name;
                row_deleted := false;
                row_versions := NULL;
                row_last_clock := NULL;
                row_last_origin := NULL;
                logged_clock := row_clock;
                INSERT INTO pgconcord.change_log
                    (id, transaction_id, table_id, operation, row_key, clock, previous_clock,
                     previous_origin, new_row, old_values, order_key)
                VALUES (captured.id, captured.txid, captured.table_id, captured.operation,
                        captured.row_key, row_clock, row_previous_clock, row_previous_origin,
                        captured.new_row, captured.old_values, row_order_key);
            END IF;
            row_exists := true;
            IF grouped.audited THEN
                -- The row history's record of this write (audit_trigger.sql) gets its clock:
                -- the first of this transaction's records of the row still without one.
                UPDATE pgconcord.audit a SET clock = logged_clock
                 WHERE a.ctid = (SELECT o.ctid FROM pgconcord.audit o
                                  WHERE o.table_id = captured.table_id
                                    AND o.row_key = captured.row_key AND o.xid = captured.txid
                                    AND o.event = 'write' AND o.clock IS NULL
                                  ORDER BY o.recorded_at LIMIT 1);
            END IF;
        END LOOP;
        IF keyed THEN
            INSERT INTO pgconcord.row_version AS v
                (table_id, row_key, clock, origin, deleted, order_key, column_versions,
                 last_clock, last_origin, previous_clock, previous_origin)
            VALUES (grouped.table_id, grouped.row_key, row_clock, row_origin, row_deleted,
                    row_order_key, row_versions, row_last_clock, row_last_origin,
                    row_previous_clock, row_previous_origin)
            ON CONFLICT (table_id, row_key) DO UPDATE
                SET clock = excluded.clock, origin = excluded.origin,
                    deleted = excluded.deleted, order_key = excluded.order_key,
                    column_versions = excluded.column_versions,
                    last_clock = excluded.last_clock, last_origin = excluded.last_origin,
                    previous_clock = excluded.previous_clock,
                    previous_origin = excluded.previous_origin;
        END IF;
    END LOOP;
    RETURN stamped;
END
$body$;
