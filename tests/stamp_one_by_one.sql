-- The stamper as it was first written (tests/test_stamping.py): every change on its own, one
-- row-version upsert each, in capture order; exactly what the capture trigger once did inside
-- the writer's transaction. The oracle pgconcord.stamp_captured() is checked against.
CREATE FUNCTION pg_temp.stamp_one_by_one() RETURNS bigint
LANGUAGE plpgsql AS $body$
DECLARE
    local_name text;
    clock_offset bigint;
    captured record;
    version record;
    now_clock bigint;
    logged_clock bigint;
    stamped bigint := 0;
BEGIN
    SELECT n.name, n.clock_offset_us INTO local_name, clock_offset FROM pgconcord.local_node n;
    FOR captured IN
        WITH taken AS (DELETE FROM pgconcord.captured_change RETURNING *)
        SELECT c.*, t.policy, coalesce(t.audited, false) AS audited, coalesce(array_position(t.priority, local_name), 0) AS level,
               coalesce(cardinality(t.priority), 0) AS levels
          FROM taken c LEFT JOIN pgconcord.replicated_table t ON t.id = c.table_id
         ORDER BY c.id
    LOOP
        stamped := stamped + 1;
        now_clock := captured.wall_clock + coalesce(clock_offset, 0);
        IF captured.operation = 'S' OR captured.row_key IS NULL THEN
            -- A schema change, or an insert into a table without a key (the row is its key).
            INSERT INTO pgconcord.change_log
                (id, transaction_id, table_id, operation, row_key, clock, new_row)
            VALUES (captured.id, captured.txid, captured.table_id, captured.operation,
                    coalesce(captured.row_key, captured.new_row), now_clock, captured.new_row);
        ELSIF captured.operation = 'D' THEN
            INSERT INTO pgconcord.row_version AS v
                (table_id, row_key, clock, origin, deleted, order_key)
            VALUES (captured.table_id, captured.row_key, now_clock, local_name, true,
                    pgconcord.next_order_key(captured.policy, captured.level, captured.levels,
                                             NULL, NULL, 'D', now_clock))
            ON CONFLICT (table_id, row_key) DO UPDATE
                SET previous_clock = coalesce(v.last_clock, v.clock),
                    previous_origin = coalesce(v.last_origin, v.origin),
                    clock = greatest(now_clock, coalesce(v.last_clock, v.clock) + 1),
                    origin = excluded.origin, deleted = true,
                    order_key = pgconcord.next_order_key(
                        captured.policy, captured.level, captured.levels, v.order_key,
                        v.deleted, 'D', greatest(now_clock, v.clock + 1)),
                    column_versions = NULL, last_clock = NULL, last_origin = NULL
            RETURNING v.clock, v.previous_clock, v.previous_origin, v.order_key INTO version;
            INSERT INTO pgconcord.change_log
                (id, transaction_id, table_id, operation, row_key, clock, previous_clock,
                 previous_origin, new_row, order_key)
            VALUES (captured.id, captured.txid, captured.table_id, 'D', captured.row_key,
                    version.clock, version.previous_clock, version.previous_origin, NULL,
                    version.order_key);
            logged_clock := version.clock;
        ELSIF captured.operation = 'U' AND captured.changed_columns IS NOT NULL
              AND captured.policy IS DISTINCT FROM 'node-priority' THEN
            -- An update of the same key, under a policy that merges columns. A row without a
            -- version yet was there before replication began: its generation is the same zero
            -- version on every node.
            INSERT INTO pgconcord.row_version AS v
                (table_id, row_key, clock, origin, deleted, order_key, column_versions,
                 last_clock, last_origin)
            VALUES (captured.table_id, captured.row_key, 0, '', false,
                    pgconcord.next_order_key(captured.policy, captured.level, captured.levels,
                                             NULL, NULL, 'U', now_clock),
                    jsonb_object(captured.changed_columns,
                                 array_fill(pgconcord.version_text(now_clock, local_name),
                                            ARRAY[cardinality(captured.changed_columns)])),
                    now_clock, local_name)
            ON CONFLICT (table_id, row_key) DO UPDATE
                SET previous_clock = coalesce(v.last_clock, v.clock),
                    previous_origin = coalesce(v.last_origin, v.origin),
                    last_clock = greatest(now_clock, coalesce(v.last_clock, v.clock) + 1),
                    last_origin = excluded.last_origin,
                    -- A tombstone under a live row (written outside pgconcord): start afresh.
                    clock = CASE WHEN v.deleted
                                 THEN greatest(now_clock, coalesce(v.last_clock, v.clock) + 1)
                                 ELSE v.clock END,
                    origin = CASE WHEN v.deleted THEN excluded.origin ELSE v.origin END,
                    deleted = false,
                    column_versions = CASE WHEN v.deleted THEN NULL ELSE
                        coalesce(v.column_versions, '{}') || jsonb_object(
                            captured.changed_columns,
                            array_fill(pgconcord.version_text(
                                           greatest(now_clock,
                                                    coalesce(v.last_clock, v.clock) + 1),
                                           excluded.last_origin),
                                       ARRAY[cardinality(captured.changed_columns)])) END,
                    order_key = pgconcord.next_order_key(
                        captured.policy, captured.level, captured.levels, v.order_key,
                        v.deleted, 'U', greatest(now_clock, v.clock + 1))
            RETURNING v.clock, v.origin, v.last_clock, v.previous_clock, v.previous_origin,
                      v.order_key, v.column_versions
                 INTO version;
            INSERT INTO pgconcord.change_log
                (id, transaction_id, table_id, operation, row_key, clock, previous_clock,
                 previous_origin, new_row, old_values, order_key, generation_clock,
                 generation_origin, column_versions)
            VALUES (captured.id, captured.txid, captured.table_id, 'U', captured.row_key,
                    version.last_clock, version.previous_clock, version.previous_origin,
                    captured.new_row, captured.old_values, version.order_key, version.clock,
                    version.origin, version.column_versions);
            logged_clock := version.last_clock;
        ELSE
            -- An insert, an update under node-priority (every write starts a generation), or
            -- the new key of an update that moved the row.
            INSERT INTO pgconcord.row_version AS v
                (table_id, row_key, clock, origin, deleted, order_key)
            VALUES (captured.table_id, captured.row_key, now_clock, local_name, false,
                    pgconcord.next_order_key(captured.policy, captured.level, captured.levels,
                                             NULL, NULL, captured.operation, now_clock))
            ON CONFLICT (table_id, row_key) DO UPDATE
                SET previous_clock = coalesce(v.last_clock, v.clock),
                    previous_origin = coalesce(v.last_origin, v.origin),
                    clock = greatest(now_clock, coalesce(v.last_clock, v.clock) + 1),
                    origin = excluded.origin, deleted = false,
                    order_key = pgconcord.next_order_key(
                        captured.policy, captured.level, captured.levels, v.order_key,
                        v.deleted, captured.operation, greatest(now_clock, v.clock + 1)),
                    column_versions = NULL, last_clock = NULL, last_origin = NULL
            RETURNING v.clock, v.previous_clock, v.previous_origin, v.order_key INTO version;
            INSERT INTO pgconcord.change_log
                (id, transaction_id, table_id, operation, row_key, clock, previous_clock,
                 previous_origin, new_row, old_values, order_key)
            VALUES (captured.id, captured.txid, captured.table_id, captured.operation,
                    captured.row_key, version.clock, version.previous_clock,
                    version.previous_origin, captured.new_row, captured.old_values,
                    version.order_key);
            logged_clock := version.clock;
        END IF;
        IF captured.audited AND captured.row_key IS NOT NULL AND captured.operation <> 'S' THEN
            -- The row history's record of this write (audit_trigger.sql) gets its clock: the
            -- first of this transaction's records of the row still without one.
            UPDATE pgconcord.audit a SET clock = logged_clock
             WHERE a.ctid = (SELECT o.ctid FROM pgconcord.audit o
                              WHERE o.table_id = captured.table_id
                                AND o.row_key = captured.row_key AND o.xid = captured.txid
                                AND o.event = 'write' AND o.clock IS NULL
                              ORDER BY o.recorded_at LIMIT 1);
        END IF;
    END LOOP;
    RETURN stamped;
END
$body$;
