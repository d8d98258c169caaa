-- Row trigger function generated for one replicated table (catalog.install_capture formats the
-- placeholders with quoted identifiers and literals). Generated per table so that key columns
-- are read directly from NEW/OLD and the node name is a constant: this runs on every user write.
-- It runs with pgconcord's rights (SECURITY DEFINER; see 014_definer_rights.sql), so that any
-- role allowed to write the table can, without rights on pgconcord's schema, and with a pinned
-- search_path, so that the writer's path cannot choose what it calls.
-- {settings} pins the session settings the logged text depends on, for tables that need it
-- (catalog._fixed_settings): to_jsonb() prints floats per extra_float_digits, ranges per
-- DateStyle and TimeZone, and a time-zoned key differently in every time zone.
--
-- Versions (see 008_column_versions.sql): an insert starts a generation; an update of the same
-- key stays in it and stamps the columns it changed; a delete ends it. A write's clock is one
-- past the row's latest version, whoever wrote it: a node whose wall clock lags still wins
-- over a change it has already seen (hybrid logical clock). {merges} is false for policies
-- that rank whole rows (node-priority): there every write starts a generation.
--
-- The same template makes pgconcord.capture_generic() (catalog.install_generic_capture), which
-- reads everything about the table when it runs: a schema change switches the table to it at
-- once (013_generic_capture.sql), until an agent generates the table's own function again.
CREATE OR REPLACE FUNCTION pgconcord.{function_name}() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp {settings}
AS $body$
DECLARE
    new_key jsonb;
    old_key jsonb;
    version record;
    changed text[];
    logged jsonb;
    old_logged jsonb;
    now_clock bigint := pgconcord.clock_now();
    {declarations}
BEGIN
    {prologue}
    IF TG_OP <> 'INSERT' THEN
        old_key := {old_key};
    END IF;
    IF TG_OP <> 'DELETE' THEN
        new_key := {new_key};
    END IF;
    -- A delete, or an update that moved the row to another key, removes the old key.
    IF TG_OP = 'DELETE' OR (TG_OP = 'UPDATE' AND old_key <> new_key) THEN
        INSERT INTO pgconcord.row_version AS v
            (table_id, row_key, clock, origin, deleted, order_key)
        VALUES ({table_id}, old_key, now_clock, {node_name}, true,
                {order_key_first_delete})
        ON CONFLICT (table_id, row_key) DO UPDATE
            SET previous_clock = coalesce(v.last_clock, v.clock),
                previous_origin = coalesce(v.last_origin, v.origin),
                clock = greatest(now_clock, coalesce(v.last_clock, v.clock) + 1),
                origin = excluded.origin, deleted = true,
                order_key = {order_key_next_delete},
                column_versions = NULL, last_clock = NULL, last_origin = NULL
        RETURNING v.clock, v.previous_clock, v.previous_origin, v.order_key INTO version;
        INSERT INTO pgconcord.change_log
            (table_id, operation, row_key, clock, previous_clock, previous_origin, new_row,
             order_key)
        VALUES ({table_id}, 'D', old_key, version.clock, version.previous_clock,
                version.previous_origin, NULL, version.order_key);
    END IF;
    IF TG_OP = 'UPDATE' AND old_key = new_key AND {merges} THEN
        logged := {new_row};
        changed := {changed_columns};
        -- A row without a version yet was there before replication began: its generation is
        -- the same zero version on every node.
        INSERT INTO pgconcord.row_version AS v
            (table_id, row_key, clock, origin, deleted, order_key, column_versions,
             last_clock, last_origin)
        VALUES ({table_id}, new_key, 0, '', false, {order_key_first_write},
                jsonb_object(changed, array_fill(pgconcord.version_text(now_clock, {node_name}),
                                                 ARRAY[cardinality(changed)])),
                now_clock, {node_name})
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
                    coalesce(v.column_versions, '{{}}') || jsonb_object(changed, array_fill(
                        pgconcord.version_text(
                            greatest(now_clock, coalesce(v.last_clock, v.clock) + 1),
                            excluded.last_origin),
                        ARRAY[cardinality(changed)])) END,
                order_key = {order_key_next_write}
        RETURNING v.clock, v.origin, v.last_clock, v.previous_clock, v.previous_origin,
                  v.order_key, v.column_versions
             INTO version;
        INSERT INTO pgconcord.change_log
            (table_id, operation, row_key, clock, previous_clock, previous_origin, new_row,
             old_values, order_key, generation_clock, generation_origin, column_versions)
        VALUES ({table_id}, 'U', new_key, version.last_clock, version.previous_clock,
                version.previous_origin, logged, {old_values}, version.order_key,
                version.clock, version.origin, version.column_versions);
    ELSIF TG_OP <> 'DELETE' THEN
        INSERT INTO pgconcord.row_version AS v
            (table_id, row_key, clock, origin, deleted, order_key)
        VALUES ({table_id}, new_key, now_clock, {node_name}, false,
                {order_key_first_write})
        ON CONFLICT (table_id, row_key) DO UPDATE
            SET previous_clock = coalesce(v.last_clock, v.clock),
                previous_origin = coalesce(v.last_origin, v.origin),
                clock = greatest(now_clock, coalesce(v.last_clock, v.clock) + 1),
                origin = excluded.origin, deleted = false,
                order_key = {order_key_next_write},
                column_versions = NULL, last_clock = NULL, last_origin = NULL
        RETURNING v.clock, v.previous_clock, v.previous_origin, v.order_key INTO version;
        INSERT INTO pgconcord.change_log
            (table_id, operation, row_key, clock, previous_clock, previous_origin, new_row,
             old_values, order_key)
        VALUES ({table_id}, left(TG_OP, 1), new_key,
                version.clock, version.previous_clock, version.previous_origin, {new_row},
                CASE WHEN TG_OP = 'UPDATE' AND old_key = new_key THEN {old_values} END,
                version.order_key);
    END IF;
    RETURN NULL;
END
$body$;
