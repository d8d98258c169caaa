-- Row trigger function generated for one audited table (history.trail.install_audit formats the
-- placeholders with quoted identifiers and literals). A trigger of its own, after the capture
-- (pgconcord_history fires after pgconcord_capture: triggers fire in name order), so that a
-- table not audited pays nothing, and the write's clock is the one the capture just gave the
-- row (its row version). Applied changes do not pass here (replica mode); the apply records
-- what it did with them itself.
--
-- SECURITY DEFINER like the capture: the writer needs no right on pgconcord's schema and
-- cannot write the trail but through its own writes. current_user is then the definer; the
-- writer's role, when it differs from its login (SET ROLE), is the `role` setting.
-- The key is read from the row's jsonb, not from NEW's fields: a renamed key column gives an
-- empty key until setup runs again, never a failed write.
CREATE OR REPLACE FUNCTION pgconcord.{function_name}() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp {settings}
AS $body$
DECLARE
    old_values jsonb;
    new_values jsonb;
    old_key jsonb;
    new_key jsonb;
    acting text := nullif(current_setting('role'), 'none');
BEGIN
    IF TG_OP <> 'INSERT' THEN
        old_values := to_jsonb(OLD);
        old_key := {old_key};
    END IF;
    IF TG_OP <> 'DELETE' THEN
        new_values := to_jsonb(NEW);
        new_key := {new_key};
    END IF;
    -- An update that moved the row to another key ends the old key's row and starts the new.
    IF TG_OP = 'UPDATE' AND old_key IS DISTINCT FROM new_key THEN
        INSERT INTO pgconcord.audit
            (table_id, row_key, event, operation, clock, origin, db_user, acting_role,
             application_name, client_addr, xid, old_row, new_row)
        SELECT {table_id}, old_key, 'write', 'D', coalesce(v.last_clock, v.clock), {node_name},
               session_user, acting, current_setting('application_name'), inet_client_addr(),
               pg_current_xact_id(), old_values, NULL
          FROM (SELECT NULL) AS one
          LEFT JOIN pgconcord.row_version v ON v.table_id = {table_id} AND v.row_key = old_key;
        old_values := NULL;
    END IF;
    INSERT INTO pgconcord.audit
        (table_id, row_key, event, operation, clock, origin, db_user, acting_role,
         application_name, client_addr, xid, old_row, new_row)
    SELECT {table_id}, coalesce(new_key, old_key), 'write',
           CASE WHEN TG_OP = 'UPDATE' AND old_values IS NULL THEN 'I' ELSE left(TG_OP, 1) END,
           coalesce(v.last_clock, v.clock), {node_name}, session_user, acting,
           current_setting('application_name'), inet_client_addr(), pg_current_xact_id(),
           old_values, new_values
      FROM (SELECT NULL) AS one
      LEFT JOIN pgconcord.row_version v
        ON v.table_id = {table_id} AND v.row_key = coalesce(new_key, old_key);
    RETURN NULL;
END
$body$;
