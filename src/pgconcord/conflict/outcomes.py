"""What the apply did with each change of an audited table, recorded in pgconcord.audit from
the decisions (pgconcord_decision, pgconcord_winner) in the statement that records the piece's
conflicts: no round trip more, and the conflict records' ids at hand. Tables that are not
audited keep the plain statement (statements.table_statements)."""

from __future__ import annotations

from psycopg import sql

# Per staged change, its outcome here, by its row's decision (the row's last change in the
# piece; earlier changes of the row from the same origin share it):
#   'lost': older than the version here, or an update none of whose columns was newer;
#   'merged': an update of the generation here that kept columns written here since its
#             writer last saw the row (a column merge with a concurrent local write);
#   'applied': otherwise (written whole, or every column it changed taken).
_SEEN = "coalesce(pgconcord.version_text(d.previous_clock, d.previous_origin), '') COLLATE \"C\""
_LOCAL_SINCE = (
    """EXISTS (SELECT 1 FROM jsonb_each_text(d.local_versions) e
                WHERE e.value COLLATE "C" > """
    + _SEEN
    + """ {extra})"""
)
OUTCOME = (
    """CASE WHEN w.row_key IS NULL THEN 'lost'
            WHEN d.mode = 'merge' AND d.local_clock IS NOT NULL AND cardinality(d.taken) = 0
                 AND """
    + _LOCAL_SINCE.format(extra="")
    + """ THEN 'lost'
            WHEN d.mode = 'merge' AND d.local_clock IS NOT NULL
                 AND """
    + _LOCAL_SINCE.format(extra="AND NOT e.key = ANY (d.taken)")
    + """ THEN 'merged'
            ELSE 'applied' END"""
)

# {record}: the piece's conflict records (decision._RECORD_CONFLICTS); the statement returns a
# row per record, as many as that statement's count.
_RECORD_WITH_OUTCOMES = (
    """
WITH recorded AS (
{record}
    RETURNING id, row_key),
audited AS (
    INSERT INTO pgconcord.audit (table_id, row_key, event, operation, clock, origin, columns,
                                 conflict_id)
    SELECT %(table_id)s, s.row_key, """
    + OUTCOME
    + """,
           s.operation, s.clock, %(origin)s, CASE WHEN d.mode = 'merge' THEN d.taken END,
           CASE WHEN s.clock = d.clock THEN c.id END
      FROM pgconcord_stage s
      JOIN pgconcord_decision d ON d.row_key = s.row_key
      LEFT JOIN pgconcord_winner w ON w.row_key = d.row_key
      LEFT JOIN recorded c ON c.row_key = d.row_key
     WHERE s.schema_name = %(schema)s AND s.table_name = %(table)s AND ({selection})
           {parked_filter})
SELECT 1 FROM recorded
"""
)


def record_with_outcomes(
    record: sql.Composable, selection: sql.Composable, parked_filter: sql.Composable
) -> sql.Composed:
    """The conflict records' statement of an audited table, which also records the outcome of
    each change the selection picks (and the parked filter leaves)."""
    return sql.SQL(_RECORD_WITH_OUTCOMES).format(
        record=record, selection=selection, parked_filter=parked_filter
    )
