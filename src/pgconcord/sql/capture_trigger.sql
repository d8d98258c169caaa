-- Row trigger function generated for one replicated table (catalog.install_capture formats the
-- placeholders with quoted identifiers and literals). Generated per table so that key columns
-- are read directly from NEW/OLD: this runs on every user write, and does no more than append
-- the change to captured_change. Its version is stamped later, off the writer's transaction
-- (stamp_captured.sql). An update that moves a row to another key is captured as a delete of
-- the old key and a write of the new one.
-- It runs with pgconcord's rights (SECURITY DEFINER; see 014_definer_rights.sql), so that any
-- role allowed to write the table can, without rights on pgconcord's schema, and with a pinned
-- search_path, so that the writer's path cannot choose what it calls.
-- {settings} pins the session settings the logged text depends on, for tables that need it
-- (catalog._fixed_settings): to_jsonb() prints floats per extra_float_digits, ranges per
-- DateStyle and TimeZone, and a time-zoned key differently in every time zone.
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
    logged jsonb;
    old_logged jsonb;
    {declarations}
BEGIN
    {prologue}
    IF TG_OP = 'INSERT' THEN
        INSERT INTO pgconcord.captured_change (table_id, operation, row_key, new_row)
        VALUES ({table_id}, 'I', {new_key}, {new_row});
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO pgconcord.captured_change (table_id, operation, row_key)
        VALUES ({table_id}, 'D', {old_key});
    ELSE
        old_key := {old_key};
        new_key := {new_key};
        logged := {new_row};
        IF old_key = new_key THEN
            INSERT INTO pgconcord.captured_change
                (table_id, operation, row_key, new_row, old_values, changed_columns)
            VALUES ({table_id}, 'U', new_key, logged, {old_values}, {changed_columns});
        ELSE
            INSERT INTO pgconcord.captured_change (table_id, operation, row_key, new_row)
            VALUES ({table_id}, 'D', old_key, NULL), ({table_id}, 'U', new_key, logged);
        END IF;
    END IF;
    RETURN NULL;
END
$body$;
