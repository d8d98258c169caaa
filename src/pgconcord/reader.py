"""Reading an origin's committed changes without skipping late-committing transactions.

A window is every transaction visible in a newer snapshot of the origin but not in the snapshot
the target last applied (the PgQ/Londiste scheme): a long transaction that commits after a later
short one is simply not visible yet, and lands in the window that first sees it. Uncommitted and
rolled-back transactions are never visible.

Inside a window, transactions are ordered by their highest change id. If transaction B wrote a
row after transaction A had written it, B waited for A's commit, so every id of A is lower than
B's id on that row: ordering by the highest id respects the origin's commit order wherever
order matters, and lets a window be applied in pieces of whole transactions.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import psycopg
from psycopg import sql

from pgconcord.catalog import Table, discover_tables
from pgconcord.config import NodeConfig
from pgconcord.transport import connect

# Columns of one staged change, in the order the window query produces them.
STAGE_COLUMNS = (
    "transaction_order",
    "id",
    "schema_name",
    "table_name",
    "operation",
    "row_key",
    "clock",
    "previous_clock",
    "previous_origin",
    "new_row",
    "old_values",
    "order_key",
    "generation_clock",
    "generation_origin",
    "column_versions",
)

_WINDOW_FILTER = """
    c.txid >= pg_snapshot_xmin({applied}::pg_snapshot)
    AND c.txid < pg_snapshot_xmax({window}::pg_snapshot)
    AND pg_visible_in_snapshot(c.txid, {window}::pg_snapshot)
    AND NOT pg_visible_in_snapshot(c.txid, {applied}::pg_snapshot)
"""

_WINDOW_ROWS = (
    """
COPY (
    SELECT w.transaction_order, w.id, t.schema_name, t.table_name, w.operation, w.row_key,
           w.clock, w.previous_clock, w.previous_origin, w.new_row, w.old_values,
           w.order_key, w.generation_clock, w.generation_origin, w.column_versions
      FROM (SELECT max(c.id) OVER (PARTITION BY c.txid) AS transaction_order, c.*
              FROM pgconcord.change_log c
             WHERE """
    + _WINDOW_FILTER
    + """) w
      -- Schema changes (operation 'S') belong to no table.
      LEFT JOIN pgconcord.replicated_table t ON t.id = w.table_id
     WHERE w.transaction_order > {done} {not_copied}
) TO STDOUT
"""
)

# Changes a copied table already holds (pgconcord.copy_horizon, rows given as VALUES).
_NOT_COPIED = """
       AND NOT EXISTS (
           SELECT 1
             FROM (VALUES {horizons}) AS h(schema_name, table_name, applied_snapshot,
                                           window_snapshot, window_done)
            WHERE h.schema_name = t.schema_name AND h.table_name = t.table_name
              AND (pg_visible_in_snapshot(w.txid, h.applied_snapshot::pg_snapshot)
                   OR (h.window_snapshot IS NOT NULL
                       AND pg_visible_in_snapshot(w.txid, h.window_snapshot::pg_snapshot)
                       AND w.transaction_order <= h.window_done)))
"""


@dataclass(frozen=True)
class Horizon:
    """What a copied table already holds of one origin's changes (see 007_copy_horizon)."""

    schema_name: str
    table_name: str
    applied_snapshot: str
    window_snapshot: str | None
    window_done: int | None


def copy_horizons(target: psycopg.Connection[tuple[object, ...]], origin: str) -> list[Horizon]:
    rows = target.execute(
        "SELECT schema_name, table_name, applied_snapshot::text, window_snapshot::text,"
        " window_done FROM pgconcord.copy_horizon WHERE origin = %s",
        (origin,),
    ).fetchall()
    return [
        Horizon(
            str(schema),
            str(table),
            str(applied),
            None if window is None else str(window),
            None if done is None else int(str(done)),
        )
        for schema, table, applied, window, done in rows
    ]


_WINDOW_HAS_ROWS = (
    "SELECT EXISTS (SELECT 1 FROM pgconcord.change_log c WHERE " + _WINDOW_FILTER + ")"
)


@dataclass(frozen=True)
class Window:
    applied_snapshot: str
    window_snapshot: str
    done: int  # transactions with an ordering id up to this one are applied already


def begin_snapshot(origin: psycopg.Connection[tuple[object, ...]]) -> str:
    """The snapshot of the origin transaction this call starts (the connection is in
    repeatable-read mode, see open_origin): every later query in that transaction sees
    exactly the transactions the snapshot calls visible."""
    row = origin.execute("SELECT pg_current_snapshot()::text").fetchone()
    assert row is not None
    return str(row[0])


def begin_window(origin: psycopg.Connection[tuple[object, ...]]) -> str:
    """The snapshot a new window of the origin ends at (see begin_snapshot)."""
    return begin_snapshot(origin)


def make_durable(origin: psycopg.Connection[tuple[object, ...]]) -> None:
    """Have the origin flush its WAL when the current transaction commits, before anything
    read in it is applied elsewhere. Otherwise a crash of the origin can lose what the window's
    snapshot calls committed or rolled back (asynchronous commits, and rollbacks, which
    PostgreSQL never flushes by itself): a commit a peer already applied disappears at its
    origin, and the origin hands out the lost transaction ids again, to new transactions that
    the peer's position already counts as applied, so that their changes are skipped for good.
    (PostgreSQL's own replication only sends WAL its origin has flushed, for the same reason.)
    Call it inside the origin transaction that took the snapshot, before its commit."""
    row = origin.execute(
        "SELECT pg_current_wal_flush_lsn() < pg_current_wal_insert_lsn()"
    ).fetchone()
    if row and row[0]:
        # A transaction that writes WAL commits synchronously: everything before it is
        # flushed too. A transactional message is allowed in a read-only transaction.
        origin.execute("SET LOCAL synchronous_commit = local")
        origin.execute("SELECT pg_logical_emit_message(true, 'pgconcord', 'durable')")


def open_origin(node: NodeConfig) -> psycopg.Connection[tuple[object, ...]]:
    """A read-only, repeatable-read session for reading an origin's change log."""
    connection = connect(node)
    connection.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
    connection.read_only = True
    return connection


def window_has_changes(origin: psycopg.Connection[tuple[object, ...]], window: Window) -> bool:
    query = sql.SQL(_WINDOW_HAS_ROWS).format(
        applied=sql.Literal(window.applied_snapshot), window=sql.Literal(window.window_snapshot)
    )
    row = origin.execute(query).fetchone()
    return bool(row and row[0])


def stream_window(
    origin: psycopg.Connection[tuple[object, ...]],
    window: Window,
    horizons: Sequence[Horizon] = (),
) -> Iterator[bytes]:
    """The window's changes as COPY text rows (STAGE_COLUMNS), for the target to COPY in,
    less those the target's copied tables already hold."""
    not_copied: sql.Composable = sql.SQL("")
    if horizons:
        not_copied = sql.SQL(_NOT_COPIED).format(
            horizons=sql.SQL(", ").join(
                sql.SQL("({}, {}, {}, {}::text, {}::bigint)").format(
                    sql.Literal(h.schema_name),
                    sql.Literal(h.table_name),
                    sql.Literal(h.applied_snapshot),
                    sql.Literal(h.window_snapshot),
                    sql.Literal(h.window_done),
                )
                for h in horizons
            )
        )
    query = sql.SQL(_WINDOW_ROWS).format(
        applied=sql.Literal(window.applied_snapshot),
        window=sql.Literal(window.window_snapshot),
        done=sql.Literal(window.done),
        not_copied=not_copied,
    )
    with origin.cursor() as cursor, cursor.copy(query) as copy:
        for block in copy:
            yield bytes(block)


def origin_tables(
    origin: psycopg.Connection[tuple[object, ...]], names: set[tuple[str, str]]
) -> dict[tuple[str, str], Table]:
    """The origin's definition of the named (schema, table) pairs, to check the target."""
    schemas = sorted({schema for schema, _ in names})
    found = discover_tables(origin, schemas, excluded=set())
    return {(t.schema, t.name): t for t in found if (t.schema, t.name) in names}
