"""The decision of the set-wise apply: each staged row judged against its version here (mode,
the columns taken, the merged column map), the winners chosen, and the conflicts recorded.
rules.py states the same rules in Python; tests/test_conflict_rules.py checks that the SQL
fragments below (DECIDE_MODE, DECISION_COLUMNS, RESOLUTION, RECORDED, RECORDED_WITHOUT_THE_ROW)
agree with it."""

from __future__ import annotations


def merged_maps(local: str, incoming: str) -> str:
    """pgconcord.merge_versions(local, incoming) (020_merge_versions_by_local_entries.sql)
    written out for the apply's statements: a call of the function is planned every time
    (its subquery keeps it from being inlined), which costs twice what it computes. A local
    map the incoming one holds (an origin's next write of a row it wrote last, the usual
    case) is settled without the subquery."""
    return f"""CASE WHEN {local} IS NULL THEN {incoming}
            WHEN {incoming} IS NULL THEN {local}
            WHEN {local} <@ {incoming} THEN {incoming}
            ELSE {incoming} || coalesce(
                (SELECT jsonb_object_agg(e.key, e.value)
                   FROM jsonb_each_text({local}) AS e
                  WHERE e.value COLLATE "C" > coalesce({incoming} ->> e.key, '') COLLATE "C"),
                jsonb_build_object()) END"""


_CONFLICT_TYPE_SQL = """
CASE
    WHEN d.operation = 'I' AND NOT d.local_deleted THEN 'insert_exists'
    WHEN d.operation = 'I' THEN 'insert_deleted'
    WHEN d.operation = 'U' AND NOT d.local_deleted THEN 'update_origin_differs'
    WHEN d.operation = 'U' THEN 'update_deleted'
    WHEN d.operation = 'D' AND NOT d.local_deleted THEN 'delete_origin_differs'
    ELSE 'delete_missing'
END"""

# The mode of the last change of a row (i) against the row's version here (l, absent: NULL),
# and the version of the row the change's writer had last seen (seen); rules.decide_mode.
DECIDE_MODE = """SELECT CASE
        WHEN i.operation = 'D' THEN
            CASE WHEN l.row_key IS NULL
                      OR (l.order_key, l.clock, l.origin COLLATE "C")
                         < (i.order_key, i.clock, %(origin)s COLLATE "C")
                 THEN 'delete' ELSE 'lose' END
        -- A row that was there before replication began, never written here since.
        WHEN l.row_key IS NULL AND i.operation = 'U'
             AND (i.generation_clock, i.generation_origin) = (0, '')
            THEN 'merge'
        WHEN l.row_key IS NULL
             OR (l.order_key, l.clock, l.origin COLLATE "C")
                < (i.order_key, i.generation_clock, i.generation_origin COLLATE "C")
            THEN 'full'
        WHEN NOT l.deleted AND (l.order_key, l.clock, l.origin)
                               = (i.order_key, i.generation_clock, i.generation_origin)
            THEN 'merge'
        ELSE 'lose'
    END AS mode,
    coalesce(pgconcord.version_text(i.previous_clock, i.previous_origin), '') AS seen"""

# What the decision row holds besides the change and the local version: the mode, then for a
# merge the columns taken, the merged column map and the latest write (rules.decide).
DECISION_COLUMNS = (
    """m.mode,
       CASE WHEN m.mode = 'merge' THEN
           ARRAY(SELECT e.key FROM jsonb_each_text(i.column_versions) e
                  WHERE e.value COLLATE "C"
                        > coalesce(l.column_versions ->> e.key, '') COLLATE "C") END,
       CASE WHEN m.mode = 'merge' THEN """
    + merged_maps("l.column_versions", "i.column_versions")
    + """ END,
       CASE WHEN m.mode = 'merge' AND (l.last_clock, l.last_origin COLLATE "C")
                                      > (i.clock, %(origin)s COLLATE "C")
            THEN l.last_clock ELSE i.clock END,
       CASE WHEN m.mode = 'merge' AND (l.last_clock, l.last_origin COLLATE "C")
                                      > (i.clock, %(origin)s COLLATE "C")
            THEN l.last_origin ELSE %(origin)s END,
       -- Columns both sides changed since the incoming writer's last sight of the row.
       CASE WHEN m.mode = 'merge' THEN
           ARRAY(SELECT e.key FROM jsonb_each_text(i.column_versions) e
                  WHERE e.value COLLATE "C" > m.seen COLLATE "C"
                    AND l.column_versions ->> e.key COLLATE "C" > m.seen COLLATE "C"
                    AND l.column_versions ->> e.key <> e.value) END"""
)

# One decision per row: its last change in the piece (an update carries the whole row and its
# column map, so the last change says everything), judged against the row's version here. The
# version rows are locked first, in key order: a local write committing meanwhile is waited for
# and then compared, never overwritten blindly. A row only updated in the piece, in a table
# with counter columns, carries the sum of its counters' differences (delta).
#   mode 'delete': a delete newer than the row's generation (or tombstone) here;
#   'full': an insert or update of a newer generation than the one here: the whole row;
#   'merge': an update of the generation here: the columns whose version is newer;
#   'lose': older than what is here.
_DECIDE = (
    """
WITH locked AS MATERIALIZED (
    SELECT v.row_key, v.clock, v.origin, v.deleted, v.order_key, v.column_versions,
           coalesce(v.last_clock, v.clock) AS last_clock,
           coalesce(v.last_origin, v.origin) AS last_origin
      FROM pgconcord.row_version v
     WHERE v.table_id = %(table_id)s
       AND v.row_key IN (SELECT s.row_key FROM pgconcord_stage s
                          WHERE s.schema_name = %(schema)s AND s.table_name = %(table)s
                            AND ({selection}))
     ORDER BY v.row_key
       FOR UPDATE)
INSERT INTO pgconcord_decision
SELECT i.row_key, i.operation, i.clock, i.new_row, i.previous_clock, i.previous_origin,
       i.order_key, i.delta, i.generation_clock, i.generation_origin, i.column_versions,
       l.clock, l.origin, l.deleted, l.order_key, l.column_versions, l.last_clock, l.last_origin,
       """
    + DECISION_COLUMNS
    + """
  FROM (SELECT DISTINCT ON (s.row_key) s.row_key, s.operation, s.clock, s.new_row, s.order_key,
               first_value(s.previous_clock) OVER earliest AS previous_clock,
               first_value(s.previous_origin) OVER earliest AS previous_origin,
               {delta} AS delta,
               coalesce(s.generation_clock, s.clock) AS generation_clock,
               coalesce(s.generation_origin, %(origin)s) AS generation_origin,
               s.column_versions
          FROM pgconcord_stage s
         WHERE s.schema_name = %(schema)s AND s.table_name = %(table)s AND ({selection})
               {parked_filter}
        WINDOW earliest AS (PARTITION BY s.row_key ORDER BY s.id),
               every_change AS (PARTITION BY s.row_key)
         ORDER BY s.row_key, s.id DESC) AS i
  LEFT JOIN locked l ON l.row_key = i.row_key
 CROSS JOIN LATERAL (
    """
    + DECIDE_MODE
    + """) AS m
"""
)

# Source transactions that wait behind a parked change were parked whole just before
# (parked.hold_followers): none of their changes is applied now.
_NOT_HELD = """
   AND NOT EXISTS (SELECT 1 FROM pgconcord_held h
                    WHERE h.transaction_order = s.transaction_order)"""

# The rows locked above are decided; a row inserted here after that statement began is
# checked again by the upsert's condition (and a merge decided without it is retried).
_CHOOSE_WINNERS = (
    """
WITH won AS (
    INSERT INTO pgconcord.row_version AS v
        (table_id, row_key, clock, origin, deleted, order_key, column_versions, last_clock,
         last_origin)
    SELECT %(table_id)s, d.row_key,
           CASE WHEN d.mode = 'delete' THEN d.clock ELSE d.generation_clock END,
           CASE WHEN d.mode = 'delete' THEN %(origin)s ELSE d.generation_origin END,
           d.mode = 'delete', d.order_key,
           CASE d.mode WHEN 'merge' THEN d.merged_versions WHEN 'full' THEN d.column_versions END,
           CASE WHEN d.mode <> 'delete' THEN d.last_clock END,
           CASE WHEN d.mode <> 'delete' THEN d.last_origin END
      FROM pgconcord_decision d WHERE d.mode <> 'lose' ORDER BY d.row_key
    ON CONFLICT (table_id, row_key) DO UPDATE
       SET clock = excluded.clock, origin = excluded.origin, deleted = excluded.deleted,
           order_key = excluded.order_key,
           -- The same generation (a local write may have stamped columns meanwhile): merge.
           column_versions = CASE WHEN (v.order_key, v.clock, v.origin, v.deleted)
                                       IS DISTINCT FROM (excluded.order_key, excluded.clock,
                                                         excluded.origin, excluded.deleted)
                                  THEN excluded.column_versions
                                  ELSE """
    + merged_maps("v.column_versions", "excluded.column_versions")
    + """ END,
           last_clock = excluded.last_clock, last_origin = excluded.last_origin,
           previous_clock = NULL, previous_origin = NULL
     WHERE (v.order_key, v.clock, v.origin COLLATE "C")
           < (excluded.order_key, excluded.clock, excluded.origin COLLATE "C")
        OR (NOT v.deleted AND NOT excluded.deleted
            AND (v.order_key, v.clock, v.origin) = (excluded.order_key, excluded.clock,
                                                    excluded.origin))
    RETURNING v.row_key, v.xmax <> 0 AS updated),
winners AS (INSERT INTO pgconcord_winner SELECT row_key FROM won)
-- A merge decided against a row version that did not exist yet, which a local write created
-- before the upsert: the columns it took were chosen blind. The caller retries the piece.
SELECT count(*) FROM won JOIN pgconcord_decision d ON d.row_key = won.row_key
 WHERE won.updated AND d.mode = 'merge' AND d.local_clock IS NULL
"""
)

# How a recorded conflict was resolved (rules.resolution): w is the row's winner, if it won.
RESOLUTION = """CASE WHEN w.row_key IS NULL THEN 'local'
            WHEN d.mode <> 'merge' OR d.overlap <@ d.taken THEN 'incoming'
            WHEN d.overlap && d.taken THEN 'merged'
            ELSE 'local' END"""

# Whether a decided row is recorded as a conflict (rules.is_recorded); l.local_row is the row
# here, {delta_names} the table's counter columns.
RECORDED = """d.local_clock IS NOT NULL
   AND CASE WHEN d.mode = 'merge' THEN cardinality(d.overlap) > 0
       ELSE
           -- Counters changed on both sides add up: no conflict unless another column differs.
           (d.delta IS NULL
            OR (d.new_row - {delta_names}) IS DISTINCT FROM (l.local_row - {delta_names}))
           AND (d.local_last_clock, d.local_last_origin)
               IS DISTINCT FROM (d.previous_clock, d.previous_origin)
           AND (d.previous_clock IS NULL
                OR (d.local_last_clock, d.local_last_origin COLLATE "C")
                   > (d.previous_clock, d.previous_origin COLLATE "C"))
       END"""

# RECORDED without what it asks of the row here: true wherever RECORDED is, and read from the
# decision alone, so that the look-up of the local row (l) is made only for the few rows it
# leaves, not for every row of the piece (tests/test_conflict_rules.py checks that it holds).
RECORDED_WITHOUT_THE_ROW = """d.local_clock IS NOT NULL
   AND CASE WHEN d.mode = 'merge' THEN cardinality(d.overlap) > 0
       ELSE
           (d.local_last_clock, d.local_last_origin)
               IS DISTINCT FROM (d.previous_clock, d.previous_origin)
           AND (d.previous_clock IS NULL
                OR (d.local_last_clock, d.local_last_origin COLLATE "C")
                   > (d.previous_clock, d.previous_origin COLLATE "C"))
       END"""

_RECORD_CONFLICTS = (
    """
INSERT INTO pgconcord.conflict
    (schema_name, table_name, row_key, conflict_type, resolution, local_clock, local_origin,
     local_row, incoming_clock, incoming_origin, incoming_operation, incoming_row)
SELECT %(schema)s, %(table)s, d.row_key, """
    + _CONFLICT_TYPE_SQL
    + """,
       """
    + RESOLUTION
    + """,
       d.local_last_clock, d.local_last_origin, l.local_row, d.clock, %(origin)s, d.operation,
       d.new_row
  FROM pgconcord_decision d
  LEFT JOIN pgconcord_winner w ON w.row_key = d.row_key
  LEFT JOIN LATERAL (SELECT to_jsonb(t.*) AS local_row
                       FROM {table} t, jsonb_populate_record(NULL::{table}, d.row_key) k
                      WHERE {key_match}) AS l ON true
 WHERE ("""
    + RECORDED_WITHOUT_THE_ROW
    + """)
   AND """
    + RECORDED
    + """
"""
)
