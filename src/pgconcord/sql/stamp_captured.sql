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
-- Stampers take one transaction lock, so that each row's changes are stamped one at a time in
-- capture order (the order of their ids). Two writes of one row are captured in the order
-- they committed (the second waited for the first's row lock), so a stamper never sees the
-- second without the first; and every change of a transaction becomes visible at once, so a
-- transaction is stamped whole. Every transaction that writes row_version here takes that
-- lock too, first (the apply: apply.draining.STAMP_LOCAL_CHANGES), so a row's version is read
-- without locking it: nobody changes it until the stamp commits.
--
-- Rows are taken row by row, each row's changes in capture order from its version, which is
-- read once and written once (a row changed a thousand times since the last stamp is not
-- updated a thousand times in one transaction), and the change log and the versions are
-- written in batches (tests/test_stamping.py checks the versions against stamping each change
-- on its own, as the capture trigger once did).
-- A version of this session's first commits had a second argument.
DROP FUNCTION IF EXISTS pgconcord.stamp_captured(boolean, boolean);

CREATE OR REPLACE FUNCTION pgconcord.stamp_captured(wait boolean DEFAULT true) RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $body$
DECLARE
    local_name text;
    clock_offset bigint;
    stamping xid8;
    captured record;
    keyed boolean;
    now_clock bigint;
    next_clock bigint;
    order_clock bigint;
    stamped bigint := 0;
    -- What is written in batches: change-log rows, and the versions of rows done.
    entry pgconcord.change_log;
    entries pgconcord.change_log[] := '{}';
    versions pgconcord.row_version[] := '{}';
    -- The version of the row whose changes are being stamped (pgconcord.row_version), kept
    -- in a row of that type so that a row done is appended as it is.
    version pgconcord.row_version;
    row_exists boolean := false;
BEGIN
    -- A node in WAL mode: what its slot holds is captured first (drain_wal.sql), by the
    -- same stamper, under the same lock; or, while the node's agent streams it, what the
    -- stream has captured up to the WAL flushed now (drain_wal waits for it, with `wait`).
    IF EXISTS (SELECT 1 FROM pgconcord.capture_state s
                 LEFT JOIN pg_replication_slots r ON r.slot_name = s.slot_name
                WHERE s.slot_name IS NOT NULL
                  AND (r.slot_name IS NULL OR r.confirmed_flush_lsn < pg_current_wal_flush_lsn()
                       OR r.confirmed_flush_lsn < s.captured_lsn)) THEN
        IF wait THEN
            PERFORM pg_advisory_xact_lock(1885823843, 1937006960);
        ELSIF NOT pg_try_advisory_xact_lock(1885823843, 1937006960) THEN
            RETURN -1;
        END IF;
        PERFORM pgconcord.drain_wal(wait);
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pgconcord.captured_change) THEN
        RETURN 0;
    END IF;
    IF wait THEN
        PERFORM pg_advisory_xact_lock(1885823843, 1937006960);  -- 'pgcc', 'stmp'
    ELSIF NOT pg_try_advisory_xact_lock(1885823843, 1937006960) THEN
        RETURN -1;
    END IF;
    -- A look (the watch, a poll: wait is false) on a node without a slot commits its stamp
    -- without waiting for the disk: no target applies a window before the origin's WAL is
    -- flushed past it (transport.postgres.make_window_durable), and a stamp a crash loses
    -- leaves its changes captured, stamped again later. A stamp that drained a slot must be
    -- durable before the slot moves past it (drain_wal.sql), and others (an apply, a join,
    -- sync) are left as their callers commit them.
    IF NOT wait
       AND NOT EXISTS (SELECT 1 FROM pgconcord.capture_state s WHERE s.slot_name IS NOT NULL) THEN
        PERFORM set_config('synchronous_commit', 'off', true);
    END IF;
    SELECT n.name, n.clock_offset_us INTO local_name, clock_offset FROM pgconcord.local_node n;
    -- Only now: a poll that finds nothing to stamp takes no transaction id (agents watch the
    -- snapshot for ended transactions, agent.runner._watch_loop).
    stamping := pg_current_xact_id();
    FOR captured IN
        WITH taken AS (DELETE FROM pgconcord.captured_change RETURNING *)
        SELECT c.*, t.policy, coalesce(t.audited, false) AS audited,
               coalesce(array_position(t.priority, local_name), 0) AS level,
               coalesce(cardinality(t.priority), 0) AS levels,
               -- The row's version before these changes.
               v.table_id IS NOT NULL AS found, v.clock AS found_clock,
               v.origin AS found_origin, v.deleted AS found_deleted,
               v.order_key AS found_order_key, v.column_versions AS found_versions,
               v.last_clock AS found_last_clock, v.last_origin AS found_last_origin
          FROM taken c
          LEFT JOIN pgconcord.replicated_table t ON t.id = c.table_id
          -- One look-up by key per change (LIMIT keeps it a nested loop): the planner's
          -- estimate of row_version is rarely fresh, and a hash join read all of it for the
          -- few dozen changes of a stamp under load.
          LEFT JOIN LATERAL (SELECT * FROM pgconcord.row_version r
                              WHERE r.table_id = c.table_id AND r.row_key = c.row_key
                              LIMIT 1) v ON true
         ORDER BY c.table_id, c.row_key, c.id
    LOOP
        IF cardinality(entries) >= 10000 THEN
            INSERT INTO pgconcord.change_log SELECT * FROM unnest(entries);
            entries := '{}';
            PERFORM pgconcord.store_versions(versions);
            versions := '{}';
        END IF;
        stamped := stamped + 1;
        now_clock := captured.wall_clock + clock_offset;
        keyed := captured.row_key IS NOT NULL AND captured.operation <> 'S';
        entry := NULL;
        entry.id := captured.id;
        entry.txid := stamping;
        entry.transaction_id := captured.txid;
        entry.table_id := captured.table_id;
        entry.operation := captured.operation;
        entry.row_key := coalesce(captured.row_key, captured.new_row);
        entry.new_row := captured.new_row;
        entry.order_key := '{}';
        IF NOT keyed THEN
            -- A schema change, or an insert into a table without a key (the row is its key).
            entry.clock := now_clock;
            entries := array_append(entries, entry);
            CONTINUE;
        END IF;
        IF captured.table_id IS DISTINCT FROM version.table_id
           OR captured.row_key IS DISTINCT FROM version.row_key THEN
            IF version.row_key IS NOT NULL THEN
                versions := array_append(versions, version);
            END IF;
            version.table_id := captured.table_id;
            version.row_key := captured.row_key;
            row_exists := captured.found;
            version.clock := captured.found_clock;
            version.origin := captured.found_origin;
            version.deleted := captured.found_deleted;
            version.order_key := captured.found_order_key;
            version.column_versions := captured.found_versions;
            version.last_clock := captured.found_last_clock;
            version.last_origin := captured.found_last_origin;
        END IF;
        -- What the capture trigger's row-version upsert did (008_column_versions.sql): the
        -- previous version is the row's latest write; the new clock is one past it.
        IF row_exists THEN
            version.previous_clock := coalesce(version.last_clock, version.clock);
            version.previous_origin := coalesce(version.last_origin, version.origin);
            next_clock := greatest(now_clock, version.previous_clock + 1);
            order_clock := greatest(now_clock, version.clock + 1);
        ELSE
            version.previous_clock := NULL;
            version.previous_origin := NULL;
            next_clock := now_clock;
            order_clock := now_clock;
        END IF;
        IF captured.policy IN ('node-priority', 'keep-existing') THEN
            version.order_key := pgconcord.next_order_key(
                captured.policy, captured.level, captured.levels,
                CASE WHEN row_exists THEN version.order_key END,
                CASE WHEN row_exists THEN version.deleted END, captured.operation, order_clock);
        ELSE
            version.order_key := '{}';  -- what next_order_key gives every other policy
        END IF;
        IF captured.operation = 'U' AND captured.changed_columns IS NOT NULL
              AND captured.policy IS DISTINCT FROM 'node-priority' THEN
            -- An update of the same key, under a policy that merges columns. A row without a
            -- version yet was there before replication began: its generation is the same zero
            -- version on every node. A tombstone under a live row (written outside pgconcord)
            -- starts afresh.
            IF NOT row_exists THEN
                version.clock := 0;
                version.origin := '';
                version.column_versions := jsonb_object(
                    captured.changed_columns,
                    array_fill(pgconcord.version_text(now_clock, local_name),
                               ARRAY[cardinality(captured.changed_columns)]));
            ELSIF version.deleted THEN
                version.clock := next_clock;
                version.origin := '';
                version.column_versions := NULL;
            ELSE
                version.column_versions := coalesce(version.column_versions, '{}') || jsonb_object(
                    captured.changed_columns,
                    array_fill(pgconcord.version_text(next_clock, local_name),
                               ARRAY[cardinality(captured.changed_columns)]));
            END IF;
            version.deleted := false;
            version.last_clock := next_clock;
            version.last_origin := local_name;
            entry.clock := version.last_clock;
            entry.old_values := captured.old_values;
            entry.generation_clock := version.clock;
            entry.generation_origin := version.origin;
            entry.column_versions := version.column_versions;
        ELSE
            -- A delete ends the row's generation; an insert, an update under node-priority
            -- (every write starts a generation), or the new key of an update that moved the
            -- row starts one.
            version.clock := next_clock;
            version.origin := local_name;
            version.deleted := captured.operation = 'D';
            version.column_versions := NULL;
            version.last_clock := NULL;
            version.last_origin := NULL;
            entry.clock := version.clock;
            IF version.deleted THEN
                entry.new_row := NULL;
            ELSE
                entry.old_values := captured.old_values;
            END IF;
        END IF;
        row_exists := true;
        entry.previous_clock := version.previous_clock;
        entry.previous_origin := version.previous_origin;
        entry.order_key := version.order_key;
        entries := array_append(entries, entry);
        IF captured.audited THEN
            -- The row history's record of this write (audit_trigger.sql) gets its clock: the
            -- first of this transaction's records of the row still without one.
            UPDATE pgconcord.audit a SET clock = entry.clock
             WHERE a.ctid = (SELECT o.ctid FROM pgconcord.audit o
                              WHERE o.table_id = captured.table_id
                                AND o.row_key = captured.row_key AND o.xid = captured.txid
                                AND o.event = 'write' AND o.clock IS NULL
                              ORDER BY o.recorded_at LIMIT 1);
        END IF;
    END LOOP;
    IF version.row_key IS NOT NULL THEN
        versions := array_append(versions, version);
    END IF;
    INSERT INTO pgconcord.change_log SELECT * FROM unnest(entries);
    PERFORM pgconcord.store_versions(versions);
    RETURN stamped;
END
$body$;

-- The rows' versions as stamping left them (stamp_captured), each row once. PL/pgSQL, which
-- keeps its plan for the session, and without a search_path of its own (it has its caller's),
-- which would save and restore the settings at every call: an SQL function with one was
-- planned at every stamp, a tenth of a small stamp's time. So was the function per row that
-- once made the versions (version_row).
DROP FUNCTION IF EXISTS pgconcord.version_row(integer, jsonb, bigint, text, boolean, bigint[],
    jsonb, bigint, text, bigint, text);
CREATE OR REPLACE FUNCTION pgconcord.store_versions(versions pgconcord.row_version[])
RETURNS void
LANGUAGE plpgsql AS $body$
BEGIN
    INSERT INTO pgconcord.row_version AS v SELECT * FROM unnest(versions)
        ON CONFLICT (table_id, row_key) DO UPDATE
       SET clock = excluded.clock, origin = excluded.origin, deleted = excluded.deleted,
           order_key = excluded.order_key, column_versions = excluded.column_versions,
           last_clock = excluded.last_clock, last_origin = excluded.last_origin,
           previous_clock = excluded.previous_clock, previous_origin = excluded.previous_origin;
END
$body$;
