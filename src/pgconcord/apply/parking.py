"""Parking, as the apply does it: the staged changes that cannot be applied are moved to
pgconcord.parked_change with their reason instead of stalling the stream (parked.py lists,
retries and discards them).

A source transaction is parked whole, never in part: one that touches a row with a parked
change from the same origin waits behind it with all its changes (hold_followers), and the
rows it holds make later transactions wait in turn."""

from __future__ import annotations

import psycopg
from psycopg import sql

Connection = psycopg.Connection[tuple[object, ...]]

_STAGED_CHANGE = """
SELECT {origin}, coalesce(s.schema_name, ''), coalesce(s.table_name, ''), s.row_key,
       s.operation, s.clock, s.previous_clock, s.previous_origin, s.new_row, s.old_values,
       s.order_key, s.transaction_order, s.generation_clock, s.generation_origin,
       s.column_versions, {reason}
  FROM pgconcord_stage s
"""

_PARK = (
    """
INSERT INTO pgconcord.parked_change (origin, schema_name, table_name, row_key, operation, clock,
                                     previous_clock, previous_origin, new_row, old_values,
                                     order_key, transaction_order, generation_clock,
                                     generation_origin, column_versions, reason)
"""
    + _STAGED_CHANGE
    + " WHERE {selection} ORDER BY s.transaction_order, s.id"
)

# Source transactions of the selection that follow a parked change: one that touches a row
# with a change parked before this step, or held by this step for an earlier transaction. They
# are parked whole (all of their changes, whatever rows they touch) and recorded in
# pgconcord_held, so that the set-wise apply leaves them out (conflict._NOT_HELD). One
# statement takes one link of a chain; hold_followers repeats it until nothing more follows.
_HOLD_FOLLOWERS = (
    """
WITH followers AS MATERIALIZED (
    SELECT DISTINCT ON (s.transaction_order) s.transaction_order,
           s.schema_name || '.' || s.table_name || ' ' || s.row_key::text AS blocked_row
      FROM pgconcord_stage s
     WHERE ({selection}) AND s.schema_name IS NOT NULL
       AND NOT EXISTS (SELECT 1 FROM pgconcord_held h
                        WHERE h.transaction_order = s.transaction_order)
       AND EXISTS (SELECT 1 FROM pgconcord.parked_change p
                    WHERE p.state = 'parked' AND p.origin = %(origin)s
                      AND p.schema_name = s.schema_name AND p.table_name = s.table_name
                      AND p.row_key = s.row_key
                      AND (p.transaction_order < s.transaction_order
                           OR p.transaction_order IS NULL
                           OR NOT EXISTS (SELECT 1 FROM pgconcord_held h
                                           WHERE h.transaction_order = p.transaction_order)))
     ORDER BY s.transaction_order, s.id),
held AS (INSERT INTO pgconcord_held SELECT transaction_order FROM followers)
INSERT INTO pgconcord.parked_change (origin, schema_name, table_name, row_key, operation, clock,
                                     previous_clock, previous_origin, new_row, old_values,
                                     order_key, transaction_order, generation_clock,
                                     generation_origin, column_versions, reason)
"""
    + _STAGED_CHANGE
    + """
  JOIN followers f ON f.transaction_order = s.transaction_order
 ORDER BY s.transaction_order, s.id
"""
)


def park(target: Connection, origin: str, selection: sql.Composable, reason: str) -> None:
    """Park the staged changes the selection picks, in the caller's transaction."""
    target.execute(
        sql.SQL(_PARK).format(
            origin=sql.Literal(origin), reason=sql.Literal(reason), selection=selection
        )
    )


def hold_followers(target: Connection, origin: str, selection: sql.Composable) -> int:
    """Park whole every source transaction of the selection that must wait behind a parked
    change of the same origin, transitively: a transaction that touches a row with a parked
    change waits, with every row it touches, and so do later transactions that touch one of
    those rows. (A transaction ordered before a held one goes on: it came first at the origin.)
    The held transactions are listed in pgconcord_held for the rest of the caller's transaction;
    the number of changes parked. Runs inside the caller's transaction."""
    target.execute("DELETE FROM pgconcord_held")
    statement = sql.SQL(_HOLD_FOLLOWERS).format(
        origin=sql.SQL("%(origin)s"),
        reason=sql.SQL("'waits for an earlier parked change of ' || f.blocked_row"),
        selection=selection,
    )
    total = 0
    while True:
        parked = target.execute(statement, {"origin": origin}).rowcount
        if parked <= 0:
            return total
        total += parked


def schema_change_waiting(target: Connection, origin: str) -> int | None:
    """The id of the first parked schema change from the origin, if one waits here."""
    row = target.execute(
        "SELECT min(id) FROM pgconcord.parked_change"
        " WHERE state = 'parked' AND origin = %s AND operation = 'S'",
        (origin,),
    ).fetchone()
    return None if row is None or row[0] is None else int(str(row[0]))


# Whether parked changes of the origin (the parameter) wait here.
ANY_WAITING = (
    "SELECT EXISTS (SELECT 1 FROM pgconcord.parked_change WHERE state = 'parked' AND origin = %s)"
)
