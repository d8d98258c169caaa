-- Statement trigger function generated for one audited table (history.trail.install_audit
-- formats the placeholders with quoted identifiers and literals). A trigger of its own, so
-- that a table not audited pays nothing; per statement, with the rows it changed (transition
-- tables), so that a statement of many rows records them in one set-wise insert rather than a
-- function call each. A write's clock is not known yet (it is stamped later, off the writer's
-- transaction): the stamper fills it in (stamp_captured.sql). Applied changes do not pass here
-- (replica mode); the apply records what it did with them itself.
--
-- SECURITY DEFINER like the capture: the writer needs no right on pgconcord's schema and
-- cannot write the trail but through its own writes. current_user is then the definer; the
-- writer's role, when it differs from its login (SET ROLE), is the `role` setting.
-- The key is read from the row's jsonb, not from its fields: a renamed key column gives an
-- empty key until setup runs again, never a failed write. An update that moved a row to
-- another key is recorded as the old key's delete and the new key's insert.
CREATE OR REPLACE FUNCTION pgconcord.{function_name}() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp {settings}
AS $body$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO pgconcord.audit
            (table_id, row_key, event, operation, clock, origin, db_user, acting_role,
             application_name, client_addr, xid, old_row, new_row)
        SELECT {table_id}, n.row_key, 'write', 'I', NULL::bigint,
               {node_name}, session_user, nullif(current_setting('role'), 'none'),
               current_setting('application_name'), inet_client_addr(), pg_current_xact_id(),
               NULL, n.row_values
          FROM (SELECT {new_key} AS row_key, r.row_values
                  FROM (SELECT to_jsonb(t) AS row_values FROM new_rows t) AS r) AS n;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO pgconcord.audit
            (table_id, row_key, event, operation, clock, origin, db_user, acting_role,
             application_name, client_addr, xid, old_row, new_row)
        SELECT {table_id}, o.row_key, 'write', 'D', NULL::bigint,
               {node_name}, session_user, nullif(current_setting('role'), 'none'),
               current_setting('application_name'), inet_client_addr(), pg_current_xact_id(),
               o.row_values, NULL
          FROM (SELECT {old_key} AS row_key, r.row_values
                  FROM (SELECT to_jsonb(t) AS row_values FROM old_rows t) AS r) AS o;
    ELSE
        INSERT INTO pgconcord.audit
            (table_id, row_key, event, operation, clock, origin, db_user, acting_role,
             application_name, client_addr, xid, old_row, new_row)
        SELECT {table_id}, c.row_key, 'write',
               CASE WHEN c.old_values IS NULL THEN 'I' WHEN c.new_values IS NULL THEN 'D'
                    ELSE 'U' END,
               NULL::bigint, {node_name}, session_user,
               nullif(current_setting('role'), 'none'), current_setting('application_name'),
               inet_client_addr(), pg_current_xact_id(), c.old_values, c.new_values
          FROM (SELECT row_key, o.row_values AS old_values, n.row_values AS new_values
                  FROM (SELECT {old_key} AS row_key, r.row_values
                          FROM (SELECT to_jsonb(t) AS row_values FROM old_rows t) AS r) AS o
                  FULL JOIN (SELECT {new_key} AS row_key, r.row_values
                               FROM (SELECT to_jsonb(t) AS row_values FROM new_rows t) AS r) AS n
                 USING (row_key)) AS c;
    END IF;
    RETURN NULL;
END
$body$;
