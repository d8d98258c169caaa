-- pgconcord catalog, version 20: the merge of two column maps (008_column_versions.sql) walks
-- only the local map.
--
-- Applying a column update of a row that came from the same origin before merges the maps of
-- every such row, once in deciding and once in the row-version upsert (conflict.decision): the
-- union of both maps grouped by column cost about 8 us a call, a sixth of what the target
-- spends per row of pgbench. The incoming map, overlaid with the local entries that are
-- greater, is the same map (each column's greater version; tests/test_conflict_rules.py checks
-- it against conflict.rules.merge_versions) at under half the cost.

CREATE OR REPLACE FUNCTION pgconcord.merge_versions(local_versions jsonb, incoming_versions jsonb)
RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $body$
    SELECT CASE
        WHEN local_versions IS NULL THEN incoming_versions
        WHEN incoming_versions IS NULL THEN local_versions
        ELSE incoming_versions || coalesce(
            (SELECT jsonb_object_agg(e.key, e.value)
               FROM jsonb_each_text(local_versions) AS e
              WHERE e.value COLLATE "C"
                    > coalesce(incoming_versions ->> e.key, '') COLLATE "C"),
            '{}')
    END
$body$;
