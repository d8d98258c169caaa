"""Schema changes among the data changes: a window holding one (operation 'S', logged by the
event triggers of 011_schema_changes.sql) is applied around it, in the origin's order.

Rows logged before an ALTER carry the old columns and rows after it the new ones, so each
table is applied with the columns its rows carry (apply.Puller._build_plans), checked against
the target's table as it is at that point.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import psycopg

from pgconcord import catalog

log = logging.getLogger(__name__)
Connection = psycopg.Connection[tuple[object, ...]]


@dataclass(frozen=True)
class Piece:
    """Transactions applied together: (after, last] in transaction order; `schema` pieces
    hold one source transaction with a schema change, applied change by change."""

    after: int
    last: int
    rows: int
    transactions: int
    schema: bool


def pieces(target: Connection, after: int, piece_rows: int) -> list[Piece]:
    """The staged window cut into pieces, each transaction with a schema change alone."""
    rows = target.execute(
        "SELECT transaction_order, count(*), bool_or(operation = 'S')"
        " FROM pgconcord_stage GROUP BY transaction_order ORDER BY transaction_order"
    ).fetchall()
    result: list[Piece] = []
    start, count, transactions, previous = after, 0, 0, after

    def close() -> None:
        nonlocal start, count, transactions
        if transactions:
            result.append(Piece(start, previous, count, transactions, False))
        start, count, transactions = previous, 0, 0

    for order, changes, has_schema in rows:
        order_number, change_count = int(str(order)), int(str(changes))
        if has_schema:
            close()
            result.append(Piece(previous, order_number, change_count, 1, True))
            previous = start = order_number
            continue
        if count and count + change_count > piece_rows:
            close()
        count += change_count
        transactions += 1
        previous = order_number
    close()
    return result


def run_statement(target: Connection, change_id: int) -> None:
    """Run a staged schema change as its origin ran it, then capture what it created or
    changed here (the event triggers do not fire for pgconcord's own session)."""
    row = target.execute(
        "SELECT new_row ->> 'statement', new_row ->> 'search_path' FROM pgconcord_stage"
        " WHERE id = %s",
        (change_id,),
    ).fetchone()
    if row is None or row[0] is None:
        return
    statement, search_path = str(row[0]), str(row[1] or "public")
    node = target.execute("SELECT name FROM pgconcord.local_node").fetchone()
    node_name = str(node[0]) if node else "?"
    saved = target.execute("SELECT current_setting('search_path')").fetchone()
    target.execute("SELECT set_config('search_path', %s, true)", (search_path,))
    log.info("%s: running a replicated schema change: %s", node_name, statement[:200])
    target.execute(statement.encode())
    target.execute("SELECT set_config('search_path', %s, true)", (saved[0] if saved else "",))
    catalog.refresh_capture(target, node_name)
