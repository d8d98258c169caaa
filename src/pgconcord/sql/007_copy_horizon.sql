-- pgconcord catalog, version 7: what a copied table already holds of each origin's changes.

-- A table copied from another node (pgconcord join) holds that node's data as of one snapshot:
-- every origin's changes up to the position the donor had applied then. A later pull from an
-- origin skips the changes a table's horizon covers, with the meaning of a position row
-- (visible in applied_snapshot, or in window_snapshot up to the transaction order window_done),
-- so tables copied at different snapshots (a resumed join) each get every change exactly once.
CREATE TABLE pgconcord.copy_horizon (
    origin text NOT NULL,
    schema_name text NOT NULL,
    table_name text NOT NULL,
    applied_snapshot pg_snapshot NOT NULL,
    window_snapshot pg_snapshot,
    window_done bigint,
    PRIMARY KEY (origin, schema_name, table_name)
);
