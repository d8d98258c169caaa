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
from psycopg import sql

from pgconcord import catalog
from pgconcord.errors import PgconcordError

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


_REPLAY_FUNCTION = (
    "CREATE FUNCTION pg_temp.pgconcord_replay(statement text) RETURNS void"
    " LANGUAGE plpgsql SECURITY DEFINER AS $replay$BEGIN EXECUTE statement; END$replay$"
)


class RoleMissing(PgconcordError):
    """A schema change was made by a role this node lacks: parked, naming the role (running it
    as anyone else would give its objects another owner here)."""


def run_statement(target: Connection, change_id: int) -> None:
    """Run a staged schema change as its origin ran it: same search_path, same role, so that
    what it creates has the same owner on every node and it can do no more than its maker
    could. Then put the generic capture on the tables it created or changed here (the event
    triggers do not fire for pgconcord's own session); the node's agent regenerates their own
    capture later (catalog.regenerate_capture)."""
    row = target.execute(
        "SELECT new_row ->> 'statement', new_row ->> 'search_path', new_row ->> 'role'"
        " FROM pgconcord_stage WHERE id = %s",
        (change_id,),
    ).fetchone()
    if row is None or row[0] is None:
        return
    statement, search_path = str(row[0]), str(row[1] or "public")
    # Changes logged before catalog version 14 name no role: they run as the agent's.
    role = None if row[2] is None else str(row[2])
    node = target.execute("SELECT name FROM pgconcord.local_node").fetchone()
    node_name = str(node[0]) if node else "?"
    if role is not None:
        exists = target.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone()
        if exists is None:
            raise RoleMissing(
                f"role {role} does not exist on {node_name}; create it (with the same rights"
                " as on the other nodes), then retry the parked change"
            )
    before = catalog.table_definitions(target)
    saved = target.execute("SELECT current_setting('search_path')").fetchone()
    log.info(
        "%s: running a replicated schema change%s: %s",
        node_name,
        "" if role is None else f" as {role}",
        statement[:200],
    )
    if role is not None:
        target.execute(sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(role)))
    target.execute("SELECT set_config('search_path', %s, true)", (search_path,))
    # Inside a SECURITY DEFINER function of the author's, made for it: PostgreSQL refuses a
    # RESET ROLE there, so nothing the statement calls (a CHECK, a default) can go back to
    # being the agent's role.
    target.execute(_REPLAY_FUNCTION)
    target.execute("SELECT pg_temp.pgconcord_replay(%s)", (statement,))
    target.execute("DROP FUNCTION pg_temp.pgconcord_replay(text)")
    target.execute("SELECT set_config('search_path', %s, true)", (saved[0] if saved else "",))
    if role is not None:
        target.execute("RESET ROLE")
    catalog.capture_changed_tables(target, before)
