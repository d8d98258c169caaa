-- pgconcord catalog, version 17: row history (the audit trail) of the tables under [audit].
--
-- One table holds every node's own story of an audited row: each local write (who, when, the
-- old and the new row, its clock; written by the table's audit triggers, history.trail) and
-- what the apply did with each change from a peer (applied, merged, lost, parked; written
-- set-wise with the apply's decisions, conflict.outcomes). `pgconcord history` reads every
-- node's rows of one key and tells them as one story, matched by (origin, clock).
--
-- No id: a sequence would cost every audited write a call. Rows are read by key (audit_row)
-- and purged by age (audit_age: a BRIN index, nearly free to keep up, as rows come in time
-- order).
ALTER TABLE pgconcord.replicated_table ADD COLUMN audited boolean NOT NULL DEFAULT false;

CREATE TABLE pgconcord.audit (
    recorded_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    table_id integer NOT NULL,
    row_key jsonb NOT NULL,
    -- 'write': a local write; else what replication did here with a change from origin.
    event text NOT NULL CHECK (event IN ('write', 'applied', 'merged', 'lost', 'parked')),
    operation "char" NOT NULL,
    clock bigint,
    origin text NOT NULL,
    -- Who made a local write: the login role, the role it acted as when it differs (SET
    -- ROLE), the application's name and address.
    db_user text,
    acting_role text,
    application_name text,
    client_addr inet,
    xid xid8,
    old_row jsonb,
    new_row jsonb,
    columns text[],        -- a merge: the columns taken from the change
    conflict_id bigint,    -- the conflict recorded with it (pgconcord.conflict)
    parked_id bigint,      -- where it waits (pgconcord.parked_change)
    detail text
);
CREATE INDEX audit_row ON pgconcord.audit (table_id, row_key);
CREATE INDEX audit_age ON pgconcord.audit USING brin (recorded_at);
REVOKE ALL ON pgconcord.audit FROM PUBLIC;

-- Parking has several ways in (the fallback, a resolver, a transaction waiting behind a parked
-- change, a schema change waiting): one statement trigger sees them all. It fires in the
-- apply's replica mode (ENABLE ALWAYS), once per parking statement, which is rare.
CREATE FUNCTION pgconcord.audit_parked() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $body$
BEGIN
    INSERT INTO pgconcord.audit
        (table_id, row_key, event, operation, clock, origin, new_row, parked_id, detail)
    SELECT t.id, p.row_key, 'parked', p.operation, p.clock, p.origin, p.new_row, p.id, p.reason
      FROM parked p
      JOIN pgconcord.replicated_table t
        ON t.schema_name = p.schema_name AND t.table_name = p.table_name
     WHERE t.audited AND p.row_key IS NOT NULL;
    RETURN NULL;
END
$body$;

CREATE TRIGGER audit_parked AFTER INSERT ON pgconcord.parked_change
    REFERENCING NEW TABLE AS parked FOR EACH STATEMENT
    EXECUTE FUNCTION pgconcord.audit_parked();
ALTER TABLE pgconcord.parked_change ENABLE ALWAYS TRIGGER audit_parked;
