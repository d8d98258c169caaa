"""The Origin port over a direct PostgreSQL session (PostgresOrigin), and the SQL of reading an
origin's change log without skipping late-committing transactions (see origin.py for windows).

Inside a window, transactions are ordered by their highest change id. If transaction B wrote a
row after transaction A had written it, B waited for A's commit, so every id of A is lower than
B's id on that row: ordering by the highest id respects the origin's commit order wherever
order matters, and lets a window be applied in pieces of whole transactions.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import psycopg
from psycopg import sql

from pgconcord.catalog import FINGERPRINT_QUERY, Table, discover_tables, fingerprint
from pgconcord.config import NodeConfig
from pgconcord.transport.connections import Connection, connect
from pgconcord.transport.origin import Horizon, Poll, Window

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
      -- A change's own transaction (transaction_id); its txid is the stamping one's.
      FROM (SELECT max(c.id) OVER (PARTITION BY coalesce(c.transaction_id, c.txid))
                       AS transaction_order, c.*
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


# An origin poll in one statement (one round trip, no transaction of its own beyond it): the
# snapshot a new window would end at, whether the window holds changes, the catalog
# fingerprint then (for the plans), and where the origin's WAL is written and flushed. On the
# way it stamps what capture appended since: those changes are in the change log for the next
# statement, not for this one's snapshot.
_POLL = (
    """
WITH stamped AS MATERIALIZED (SELECT pgconcord.stamp_captured({wait}) AS changes)
SELECT current.snapshot::text, w.has_changes,
       CASE WHEN w.has_changes THEN ("""
    + FINGERPRINT_QUERY.strip()
    + """) END,
       pg_current_wal_insert_lsn()::text, pg_current_wal_flush_lsn() >= pg_current_wal_insert_lsn(),
       stamped.changes,
       w.has_changes OR EXISTS (SELECT 1 FROM pgconcord.change_log c
                                 WHERE c.txid >= pg_snapshot_xmin({applied}::pg_snapshot))
  FROM stamped, (SELECT pg_current_snapshot() AS snapshot) AS current,
       LATERAL (SELECT EXISTS (SELECT 1 FROM pgconcord.change_log c WHERE """
    + _WINDOW_FILTER.replace("{window}::pg_snapshot", "current.snapshot")
    + """)) AS w(has_changes)
"""
)


# The snapshot and the wait are parameters: the statement's text stays the same from poll to
# poll, so the session prepares it at its first (one round trip more, once), and the server
# does not plan it again at every poll (1.5 ms with the fingerprint's look at the catalogs,
# measured: bench/statement_costs.py).
_POLL_QUERY = _POLL.replace("{applied}", "%(applied)s").replace("{wait}", "%(wait)s")


def poll(
    origin: psycopg.Connection[tuple[object, ...]], applied_snapshot: str, *, settled: bool = True
) -> Poll:
    """Look at the origin (an autocommit session, open_origin_session).
    Unsettled (the agent's pairs): in one round trip, or two when that one stamped captured
    changes, which only the next statement sees, or found another session stamping (an apply
    there), whose end the second one waits for. A first look that found changes is the
    window: what it stamped, or found being stamped, is in the next one, which that stamp's
    commit wakes them for.
    Settled (sync, part): the window holds everything captured before the call. A look's
    snapshot is taken as it begins, so it sees neither what it stamps, nor a stamp it waits
    for, nor one another session commits just then, nor what a streaming agent has not yet
    written from the WAL: everything is stamped first, waiting for other stampers and the
    stream, and the look after it sees all that (two round trips)."""
    if settled:
        origin.execute("SELECT pgconcord.stamp_captured(true)")
    row = origin.execute(
        _POLL_QUERY, {"applied": applied_snapshot, "wait": False}, prepare=True
    ).fetchone()
    assert row is not None
    stamped = int(str(row[5]))
    if not settled and stamped != 0 and not row[1]:
        row = origin.execute(
            _POLL_QUERY, {"applied": applied_snapshot, "wait": stamped < 0}, prepare=True
        ).fetchone()
        assert row is not None
    return Poll(
        applied_snapshot,
        str(row[0]),
        bool(row[1]),
        None if row[2] is None else int(str(row[2])),
        str(row[3]),
        bool(row[4]),
        bool(row[6]),
    )


def make_window_durable(origin: psycopg.Connection[tuple[object, ...]], polled: Poll) -> None:
    """Make sure the origin has flushed its WAL up to where it stood when the window's snapshot
    was taken, before anything read in the window is applied elsewhere. Otherwise a crash of
    the origin can lose what the snapshot calls committed or rolled back (asynchronous commits,
    and rollbacks, which PostgreSQL never flushes by itself): a commit a peer already applied
    disappears at its origin, and the origin hands out the lost transaction ids again, to new
    transactions that the peer's position already counts as applied, so that their changes are
    skipped for good. (PostgreSQL's own replication only sends WAL its origin has flushed, for
    the same reason.)

    Usually nothing is left to do: the origin's synchronous commits flush everything before
    them, so the flush position has passed the window when it is polled (an idle origin), or
    by the time the window is staged (a busy one). Only when it has not does this force a
    flush, with a transaction that writes WAL and commits synchronously (a transaction id
    and an fsync; every window of an origin whose commits are all asynchronous pays it).
    origin is an autocommit session."""
    if polled.durable:
        return
    row = origin.execute(
        "SELECT pg_current_wal_flush_lsn() >= %s::pg_lsn", (polled.wal_written,)
    ).fetchone()
    if not (row and row[0]):
        _force_flush(origin)


def flush_wal(connection: psycopg.Connection[tuple[object, ...]]) -> None:
    """Make everything the node has written so far durable (connection is an autocommit
    session): what a target applied with asynchronous commits, before another node trusts it."""
    row = connection.execute(
        "SELECT pg_current_wal_flush_lsn() >= pg_current_wal_insert_lsn()"
    ).fetchone()
    if not (row and row[0]):
        _force_flush(connection)


def _force_flush(connection: psycopg.Connection[tuple[object, ...]]) -> None:
    # One string, one round trip: a transaction of its own that writes WAL and commits
    # synchronously flushes everything before it too (a transactional message is allowed in a
    # read-only transaction).
    connection.execute(
        "BEGIN; SET LOCAL synchronous_commit = local;"
        " SELECT pg_logical_emit_message(true, 'pgconcord', 'durable'); COMMIT"
    )


def begin_snapshot(origin: psycopg.Connection[tuple[object, ...]]) -> str:
    """The snapshot of the origin transaction this call starts (the connection is in
    repeatable-read mode, see open_origin): every later query in that transaction sees
    exactly the transactions the snapshot calls visible."""
    row = origin.execute("SELECT pg_current_snapshot()::text").fetchone()
    assert row is not None
    return str(row[0])


def open_origin(node: NodeConfig) -> psycopg.Connection[tuple[object, ...]]:
    """A read-only, repeatable-read session, for reading a node in one snapshot (join)."""
    connection = connect(node)
    connection.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
    connection.read_only = True
    return connection


def open_origin_session(node: NodeConfig) -> psycopg.Connection[tuple[object, ...]]:
    """An autocommit session for reading an origin's change log. A window is defined by its
    snapshots, not by a transaction: any later statement sees every transaction the window's
    snapshot calls committed (purge keeps what a position has not passed), so each look at the
    origin is one statement. Not read-only: a poll stamps what capture appended (poll)."""
    return connect(node, autocommit=True)


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


class PostgresOrigin:
    """The Origin port over one autocommit session with the origin's database, opened when
    first needed and again after close()."""

    def __init__(self, node: NodeConfig) -> None:
        self.node = node
        self.name = node.name
        self._connection: Connection | None = None

    @property
    def session(self) -> Connection | None:
        """The session, if open: for telling a lost one from a failed statement."""
        return self._connection

    def _session(self) -> Connection:
        if self._connection is None or self._connection.closed:
            self._connection = open_origin_session(self.node)
        return self._connection

    def poll(self, applied_snapshot: str, *, settled: bool = True) -> Poll:
        return poll(self._session(), applied_snapshot, settled=settled)

    def stream_window(self, window: Window, horizons: Sequence[Horizon] = ()) -> Iterator[bytes]:
        return stream_window(self._session(), window, horizons)

    def make_durable(self, polled: Poll | None) -> None:
        if polled is None:
            flush_wal(self._session())
        else:
            make_window_durable(self._session(), polled)

    def fingerprint(self) -> int:
        return fingerprint(self._session())

    def tables(self, names: set[tuple[str, str]]) -> dict[tuple[str, str], Table]:
        return origin_tables(self._session(), names)

    def close(self) -> None:
        if self._connection is not None and not self._connection.closed:
            self._connection.close()
        self._connection = None
