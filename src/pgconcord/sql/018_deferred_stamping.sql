-- pgconcord catalog, version 18: capture appends; versions are stamped later, off the writer's
-- transaction.
--
-- A capture trigger used to read and upsert the row's version (row_version) and write the
-- change log while the writer held the row's lock: about half of what every write cost. Now it
-- appends one row to captured_change, with nothing read, and pgconcord.stamp_captured()
-- (stamp_captured.sql) turns what is there into change-log rows with their versions, in
-- capture order, when a peer polls this node and before anything is applied here. A change
-- keeps the id it was captured with (the change log's sequence) and, in transaction_id, the
-- transaction that made it: windows are still cut by the change log's own txid (the stamping
-- transaction's, which is what commits it to the log), while a source transaction is still
-- applied whole and in the order its ids say.

CREATE TABLE pgconcord.captured_change (
    id bigint NOT NULL DEFAULT nextval('pgconcord.change_log_id_seq'),
    txid xid8 NOT NULL DEFAULT pg_current_xact_id(),
    table_id integer NOT NULL,
    operation "char" NOT NULL,          -- I, U, D, or S (a schema change, table_id 0)
    row_key jsonb,                      -- NULL: a table without a key (new_row stands in)
    new_row jsonb,
    old_values jsonb,                   -- counters before an update of the same key
    changed_columns text[],             -- an update of the same key: the columns it changed
    wall_clock bigint NOT NULL DEFAULT (extract(epoch FROM clock_timestamp()) * 1000000)::bigint
);
REVOKE ALL ON pgconcord.captured_change FROM PUBLIC;
-- Every stamp deletes what it stamped: vacuum it whenever autovacuum looks (the node's agent
-- also vacuums it when it has many dead rows, agent.housekeeping.vacuum_captured).
ALTER TABLE pgconcord.captured_change
    SET (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 5000);

ALTER TABLE pgconcord.change_log ADD COLUMN transaction_id xid8;

-- pgconcord.log_schema_change() now logs into captured_change (log_schema_change.sql).

-- Every table's own capture function is made again from the new template: setup does, and
-- until it runs the node's agent does (catalog.regenerate_capture), as after a schema change.
UPDATE pgconcord.replicated_table SET own_capture = false;
