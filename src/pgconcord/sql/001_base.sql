-- pgconcord catalog, version 1: the objects pgconcord keeps in every node's database.
-- Applied once per database by catalog.migrate(); later changes go in new numbered files.

CREATE SCHEMA IF NOT EXISTS pgconcord;

-- The catalog version installed here; catalog.migrate() applies the numbered files above it.
CREATE TABLE pgconcord.catalog_version (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    version integer NOT NULL
);

-- Which cluster node this database is; guards against two config entries naming one database.
CREATE TABLE pgconcord.local_node (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    name text NOT NULL,
    cluster_name text NOT NULL,
    installed_at timestamptz NOT NULL DEFAULT now()
);

-- Tables whose changes are captured here; the id is local to this database.
CREATE TABLE pgconcord.replicated_table (
    id serial PRIMARY KEY,
    schema_name text NOT NULL,
    table_name text NOT NULL,
    key_columns text[] NOT NULL,
    UNIQUE (schema_name, table_name)
);

-- Every committed local change, in capture order. Only changes made by the application are
-- logged: pgconcord applies with session_replication_role = replica, so no echo is captured.
-- Readers select by transaction id against snapshots (see reader.py), hence the txid index.
CREATE TABLE pgconcord.change_log (
    id bigserial NOT NULL,
    txid xid8 NOT NULL DEFAULT pg_current_xact_id(),
    table_id integer NOT NULL,
    operation "char" NOT NULL,          -- I, U or D
    row_key jsonb NOT NULL,             -- primary key columns as an object
    clock bigint NOT NULL,              -- hybrid logical clock, microseconds
    previous_clock bigint,              -- the version this change replaced, for conflict detection
    previous_origin text,
    new_row jsonb                       -- NULL for deletes
);
CREATE INDEX change_log_txid ON pgconcord.change_log (txid);

-- The version (clock, origin) of the last write each row received here, whether written locally
-- or applied from a peer; deleted rows stay as tombstones so a late change is judged fairly.
CREATE TABLE pgconcord.row_version (
    table_id integer NOT NULL,
    row_key jsonb NOT NULL,
    clock bigint NOT NULL,
    origin text NOT NULL,
    deleted boolean NOT NULL,
    previous_clock bigint,
    previous_origin text,
    PRIMARY KEY (table_id, row_key)
);

-- How far this node has applied each origin's change log. A window is the set of transactions
-- visible in window_snapshot but not in applied_snapshot; window_done is the ordering id of the
-- last source transaction of that window already applied (windows are applied in pieces).
CREATE TABLE pgconcord.position (
    origin text PRIMARY KEY,
    applied_snapshot pg_snapshot NOT NULL,
    window_snapshot pg_snapshot,
    window_done bigint,
    applied_changes bigint NOT NULL DEFAULT 0,
    last_applied_clock bigint,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Conflicts seen while applying, with both versions of the row.
CREATE TABLE pgconcord.conflict (
    id bigserial PRIMARY KEY,
    detected_at timestamptz NOT NULL DEFAULT now(),
    schema_name text NOT NULL,
    table_name text NOT NULL,
    row_key jsonb NOT NULL,
    conflict_type text NOT NULL,
    resolution text NOT NULL,           -- which version was kept: 'incoming' or 'local'
    local_clock bigint,
    local_origin text,
    local_row jsonb,
    incoming_clock bigint NOT NULL,
    incoming_origin text NOT NULL,
    incoming_operation "char" NOT NULL,
    incoming_row jsonb
);

-- Wakes agents listening on this database; one notification per statement, merged per
-- transaction by PostgreSQL.
CREATE FUNCTION pgconcord.notify_change() RETURNS trigger
LANGUAGE plpgsql AS $body$
BEGIN
    PERFORM pg_notify('pgconcord_change', '');
    RETURN NULL;
END
$body$;

-- TRUNCATE is not captured row by row; refusing it keeps nodes from silently diverging.
CREATE FUNCTION pgconcord.refuse_truncate() RETURNS trigger
LANGUAGE plpgsql AS $body$
BEGIN
    RAISE EXCEPTION 'pgconcord: TRUNCATE of replicated table %.% is not replicated; use DELETE',
        TG_TABLE_SCHEMA, TG_TABLE_NAME
        USING ERRCODE = 'feature_not_supported';
END
$body$;

-- The local clock reading in microseconds; tests skew a node with
-- ALTER DATABASE ... SET pgconcord.clock_offset_us = '-30000000'.
CREATE FUNCTION pgconcord.clock_now() RETURNS bigint
LANGUAGE sql VOLATILE AS $body$
    SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::bigint
        + coalesce(nullif(current_setting('pgconcord.clock_offset_us', true), '')::bigint, 0)
$body$;
