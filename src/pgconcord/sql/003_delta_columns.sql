-- pgconcord catalog, version 3: counter columns merged by adding each node's difference.

-- Columns listed as delta_columns in the cluster file: concurrent changes add up instead of
-- overwriting each other. Capture logs their values before an update in old_values.
ALTER TABLE pgconcord.replicated_table ADD COLUMN delta_columns text[] NOT NULL DEFAULT '{}';
ALTER TABLE pgconcord.change_log ADD COLUMN old_values jsonb;
ALTER TABLE pgconcord.parked_change ADD COLUMN old_values jsonb;
