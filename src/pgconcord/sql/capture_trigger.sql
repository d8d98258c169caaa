-- Row trigger function generated for one replicated table (catalog.install_capture formats the
-- placeholders with quoted identifiers and literals). Generated per table so that key columns
-- are read directly from NEW/OLD and the node name is a constant: this runs on every user write.
-- {settings} pins the session settings the logged text depends on, for tables that need it
-- (catalog._fixed_settings): to_jsonb() prints floats per extra_float_digits, ranges per
-- DateStyle and TimeZone, and a time-zoned key differently in every time zone.
CREATE OR REPLACE FUNCTION pgconcord.{function_name}() RETURNS trigger
LANGUAGE plpgsql {settings}
AS $body$
DECLARE
    new_key jsonb;
    old_key jsonb;
    version record;
    now_clock bigint := pgconcord.clock_now();
BEGIN
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
            SET previous_clock = v.clock, previous_origin = v.origin,
                clock = greatest(now_clock, v.clock + 1),
                origin = excluded.origin, deleted = true,
                order_key = {order_key_next_delete}
        RETURNING v.clock, v.previous_clock, v.previous_origin, v.order_key INTO version;
        INSERT INTO pgconcord.change_log
            (table_id, operation, row_key, clock, previous_clock, previous_origin, new_row,
             order_key)
        VALUES ({table_id}, 'D', old_key, version.clock, version.previous_clock,
                version.previous_origin, NULL, version.order_key);
    END IF;
    IF TG_OP <> 'DELETE' THEN
        -- The clock is one past the row's last version, whoever wrote it: a node whose wall
        -- clock lags still wins over a change it has already seen (hybrid logical clock).
        INSERT INTO pgconcord.row_version AS v
            (table_id, row_key, clock, origin, deleted, order_key)
        VALUES ({table_id}, new_key, now_clock, {node_name}, false,
                {order_key_first_write})
        ON CONFLICT (table_id, row_key) DO UPDATE
            SET previous_clock = v.clock, previous_origin = v.origin,
                clock = greatest(now_clock, v.clock + 1),
                origin = excluded.origin, deleted = false,
                order_key = {order_key_next_write}
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
