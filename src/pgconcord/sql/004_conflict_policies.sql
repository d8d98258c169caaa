-- pgconcord catalog, version 4: per-table conflict policies as an order of versions.

-- A version is (order_key, clock, origin), compared in that order. order_key is empty under
-- last-writer-wins; other policies put what they rank by in front of the clock, built so that
-- a write made after seeing another still ranks above it. Every node then keeps the greatest
-- version, and the same one, without asking the others.
ALTER TABLE pgconcord.replicated_table
    ADD COLUMN policy text NOT NULL DEFAULT 'last-writer-wins',
    ADD COLUMN priority text[] NOT NULL DEFAULT '{}';
ALTER TABLE pgconcord.row_version ADD COLUMN order_key bigint[] NOT NULL DEFAULT '{}';
ALTER TABLE pgconcord.change_log ADD COLUMN order_key bigint[] NOT NULL DEFAULT '{}';
ALTER TABLE pgconcord.parked_change ADD COLUMN order_key bigint[] NOT NULL DEFAULT '{}';

-- The order key of a new write, from the version it replaces.
--   node-priority: one entry per listed node, highest first, holding the clock of the latest
--     write by that node this write has seen; a concurrent write of a higher node ranks above.
--   keep-existing: {generation, -clock of the insert the row descends from}; of two
--     concurrent inserts the earlier wins, updates inherit it, a re-insert after a delete
--     starts a new generation.
CREATE FUNCTION pgconcord.next_order_key(
    policy text, node_level integer, levels integer, previous_key bigint[],
    previous_deleted boolean, operation "char", clock bigint
) RETURNS bigint[]
LANGUAGE plpgsql IMMUTABLE AS $body$
DECLARE
    result bigint[];
BEGIN
    IF policy = 'node-priority' THEN
        result := coalesce(previous_key, '{}');
        IF cardinality(result) < levels THEN
            result := result || array_fill(0::bigint, ARRAY[levels - cardinality(result)]);
        END IF;
        IF node_level > 0 THEN
            result[node_level] := clock;
        END IF;
        RETURN result;
    ELSIF policy = 'keep-existing' THEN
        IF previous_key IS NULL OR cardinality(previous_key) < 2 THEN
            RETURN CASE WHEN operation = 'I' THEN ARRAY[0, -clock] ELSE ARRAY[0::bigint, 0] END;
        ELSIF operation = 'I' AND previous_deleted THEN
            RETURN ARRAY[previous_key[1] + 1, -clock];
        END IF;
        RETURN previous_key;
    END IF;
    RETURN '{}';
END
$body$;
