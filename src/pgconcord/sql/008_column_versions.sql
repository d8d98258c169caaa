-- pgconcord catalog, version 8: column-level merge.

-- A row's life is a generation: the insert that created it (its version is row_version's
-- clock, origin and order_key, as before) and the updates that followed. Updates of one
-- generation merge column by column: each column keeps the value of the greatest version that
-- wrote it (column_versions maps a column to that version, as version_text(); a column not in
-- the map still has the generation's value). A delete ends the generation: updates of it that
-- arrive later lose, and only a later insert starts a new one. Every node then holds, for
-- each row, the same generation and the same value in every column, whatever the order of
-- arrival: the merge is commutative, associative and idempotent.
--
-- last_clock/last_origin: the latest write of any kind (NULL: the generation itself), from
-- which the hybrid clock of the next local write counts up.
ALTER TABLE pgconcord.row_version
    ADD COLUMN column_versions jsonb,
    ADD COLUMN last_clock bigint,
    ADD COLUMN last_origin text;

-- An update carries its generation and the row's full column map after it, so that any node
-- can merge it, also one that has not seen the changes before it.
ALTER TABLE pgconcord.change_log
    ADD COLUMN generation_clock bigint,
    ADD COLUMN generation_origin text,
    ADD COLUMN column_versions jsonb;
ALTER TABLE pgconcord.parked_change
    ADD COLUMN generation_clock bigint,
    ADD COLUMN generation_origin text,
    ADD COLUMN column_versions jsonb;

-- A version as text that sorts (COLLATE "C") like (clock, origin): the clock in 16 hex
-- digits (clocks are positive), then the node name, whose bytes break a tie.
CREATE FUNCTION pgconcord.version_text(clock bigint, origin text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $body$
    SELECT lpad(to_hex(clock), 16, '0') || origin
$body$;

-- The column map of two versions of one generation merged: each column's greater version.
-- A column missing from a map has the generation's version, which is below every entry.
CREATE FUNCTION pgconcord.merge_versions(local_versions jsonb, incoming_versions jsonb)
RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $body$
    SELECT CASE
        WHEN local_versions IS NULL THEN incoming_versions
        WHEN incoming_versions IS NULL THEN local_versions
        ELSE (SELECT jsonb_object_agg(key, value)
                FROM (SELECT key, max(value COLLATE "C") AS value
                        FROM (SELECT key, value FROM jsonb_each_text(local_versions)
                              UNION ALL
                              SELECT key, value FROM jsonb_each_text(incoming_versions)) AS both_maps
                       GROUP BY key) AS merged)
    END
$body$;
