"""The applying session and its stage: a target session in replica mode (open_target) with its
temporary tables, what the window copied from the origin into pgconcord_stage holds, and the
staged window cut into pieces of whole source transactions."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import psycopg
from psycopg import errors as pg_errors
from psycopg import sql

from pgconcord import schema
from pgconcord.apply import draining, parking
from pgconcord.apply.errors import ApplyError
from pgconcord.apply.pair import PairState
from pgconcord.apply.plan import columns_of
from pgconcord.apply.position import require_replica_mode
from pgconcord.capture import wal as wal_capture
from pgconcord.catalog import FINGERPRINT_QUERY
from pgconcord.config import NodeConfig
from pgconcord.transport import Horizon, Origin, Window, connect

Connection = psycopg.Connection[tuple[object, ...]]

# The stage keeps a window across the transactions of its pieces, and pgconcord_child the rows
# whose parents are checked at the window's end. The others are scratch, emptied by DELETE
# before each use within a transaction and by their commit: autovacuum never visits a temporary
# table, so dead rows left from one transaction to the next would be scanned by every statement
# after it, more and more (a quarter of a busy target's apply time within a minute).
_TEMPORARY_TABLES = """
CREATE TEMPORARY TABLE IF NOT EXISTS pgconcord_stage (
    transaction_order bigint, id bigint, schema_name text, table_name text, operation "char",
    row_key jsonb, clock bigint, previous_clock bigint, previous_origin text, new_row jsonb,
    old_values jsonb, order_key bigint[], generation_clock bigint, generation_origin text,
    column_versions jsonb);
CREATE TEMPORARY TABLE IF NOT EXISTS pgconcord_decision (
    row_key jsonb, operation "char", clock bigint, new_row jsonb,
    previous_clock bigint, previous_origin text, order_key bigint[], delta jsonb,
    generation_clock bigint, generation_origin text, column_versions jsonb,
    local_clock bigint, local_origin text, local_deleted boolean, local_order_key bigint[],
    local_versions jsonb, local_last_clock bigint, local_last_origin text,
    mode text, taken text[], merged_versions jsonb, last_clock bigint, last_origin text,
    overlap text[]) ON COMMIT DELETE ROWS;
CREATE TEMPORARY TABLE IF NOT EXISTS pgconcord_winner (row_key jsonb) ON COMMIT DELETE ROWS;
CREATE TEMPORARY TABLE IF NOT EXISTS pgconcord_absent (row_key jsonb) ON COMMIT DELETE ROWS;
CREATE TEMPORARY TABLE IF NOT EXISTS pgconcord_held (transaction_order bigint)
    ON COMMIT DELETE ROWS;
CREATE TEMPORARY TABLE IF NOT EXISTS pgconcord_child (
    schema_name text, table_name text, row_key jsonb, clock bigint, operation "char",
    new_row jsonb, taken text[]);
"""


def open_target(node: NodeConfig) -> Connection:
    """A session that applies changes: replica role, so that nothing applied is captured
    again and the application's triggers and foreign keys stay quiet. A session that is not
    in replica mode never applies anything (an echo would bounce changes between the nodes
    for ever): a refused setting is an error that names the right."""
    connection = connect(node)
    try:
        connection.execute("SET session_replication_role = replica")
        connection.commit()
    except pg_errors.InsufficientPrivilege:
        connection.close()
        raise ApplyError(
            f"node {node.name}: the agent's role may not set session_replication_role"
            " (needs superuser, or on PostgreSQL 15+ GRANT SET ON PARAMETER"
            " session_replication_role; see pgconcord grant)"
        ) from None
    # With a short deadlock timeout this session notices a deadlock first and is the one
    # rolled back (and retried), not the application's transaction. Optional: a role that may
    # not set it keeps the server's (its own transaction, so a refusal undoes nothing else).
    try:
        connection.execute("SET deadlock_timeout = '50ms'")
        connection.commit()
    except pg_errors.InsufficientPrivilege:
        connection.rollback()
    mode = connection.execute("SELECT current_setting('session_replication_role')").fetchone()
    require_replica_mode(mode[0] if mode else None, node.name)
    connection.commit()
    # Replica mode keeps triggers quiet, but not the WAL: a replication origin marks what this
    # session commits, which a node in WAL mode then does not capture (drain_wal.sql). Every
    # applying session gets one if it may, so that a node moved to WAL mode while it is open
    # does not echo.
    wal_node = wal_capture.slot_name(connection) is not None
    if not wal_capture.mark_applying_session(connection) and wal_node:
        connection.close()
        raise ApplyError(
            f"node {node.name} captures from the WAL, but the agent's role may not mark what"
            " it applies with a replication origin (GRANT EXECUTE ON FUNCTION"
            " pg_replication_origin_session_setup(text), pg_replication_origin_create(text);"
            " see pgconcord grant); nothing is applied"
        )
    # Values arrive rendered in these settings (see capture_trigger.sql); read them alike.
    # Commits need not wait for the disk: the position commits with the rows it covers, so a
    # crash of this node loses both together and the origin's log, which purge keeps until
    # this node's WAL is flushed past the position (agent.purging._read_peer), has them again.
    # On a node in WAL mode they flush their WAL at commit after all: the WAL writer flushes
    # whole pages, and a flushed position inside a record cannot be drained up to (see
    # flushed_boundary in drain_wal.sql); a commit flushes to the end of one.
    connection.execute(
        "SET TimeZone = 'UTC'; SET DateStyle = 'ISO, YMD'; SET IntervalStyle = 'postgres';"
        + (" SET synchronous_commit = local" if wal_node else " SET synchronous_commit = off")
    )
    connection.execute(_TEMPORARY_TABLES)
    connection.commit()
    draining.drains_on(connection, node if wal_node else None)
    return connection


# The copy horizons of an origin here (pgconcord.copy_horizon, see 007_copy_horizon.sql): what
# tables copied by a join already hold of that origin's changes.
HORIZONS_QUERY = (
    "SELECT schema_name, table_name, applied_snapshot::text, window_snapshot::text,"
    " window_done FROM pgconcord.copy_horizon WHERE origin = %s"
)


def horizons_of(rows: Sequence[tuple[object, ...]]) -> list[Horizon]:
    """The Horizons HORIZONS_QUERY's rows give."""
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


# What pipelined staging (Puller._stage_in_turn) needs to know of the staged window.
STAGE_SUMMARY = (
    "SELECT count(*), count(*) FILTER (WHERE operation = 'S'), coalesce(max(transaction_order), 0),"
    " count(DISTINCT transaction_order) FROM pgconcord_stage"
)
# The rows of a table mostly carry the same columns, and a jsonb object lists its keys in one
# order: the distinct key lists are few, and merging them costs half of merging every row's keys.
STAGED_COLUMNS = (
    "SELECT s.schema_name, s.table_name, array_agg(DISTINCT k) FILTER (WHERE k IS NOT NULL)"
    " FROM (SELECT DISTINCT schema_name, table_name, ARRAY(SELECT jsonb_object_keys(new_row))"
    " AS keys FROM pgconcord_stage WHERE schema_name IS NOT NULL) s"
    " LEFT JOIN LATERAL unnest(s.keys) k ON true GROUP BY 1, 2"
)


@dataclass(frozen=True)
class Staged:
    """What a staged window holds (stage_in_turn)."""

    changes: int
    schema_changes: int
    last_order: int  # the ordering id of its last source transaction
    transactions: int
    carried: dict[tuple[str, str], frozenset[str]]  # per table, the columns its rows carry
    fingerprint: int  # the target's catalog (catalog.fingerprint)


def stage_in_turn(
    source: Origin,
    target: Connection,
    pair: PairState,
    window: Window,
    horizons: list[Horizon],
    *,
    fresh: bool,
) -> Staged:
    """Copy the window into the stage emptied by Puller._take_turn, and learn what it holds,
    in the turn's transaction (left open)."""
    with target.cursor() as cursor, cursor.copy("COPY pgconcord_stage FROM STDIN") as copy:
        for block in source.stream_window(window, horizons):
            copy.write(block)
    with target.pipeline():
        summary = target.execute(STAGE_SUMMARY)
        columns = target.execute(STAGED_COLUMNS)
        fingerprint = target.execute(FINGERPRINT_QUERY)
        waiting = target.execute(parking.ANY_WAITING, (pair.origin,))
        if fresh:
            # Rows of an earlier window not checked yet (it was left unfinished) are not ours.
            target.execute("DELETE FROM pgconcord_child")
    row = summary.fetchone()
    assert row is not None
    changes, schema_changes, last_order, transactions = (int(str(value)) for value in row)
    if changes > 10_000:
        target.execute("ANALYZE pgconcord_stage")
    if fresh:
        pair.parents.child_plans.clear()
    pair.parents.schema_window = bool(schema_changes)
    waiting_row = waiting.fetchone()
    pair.parked_waiting = bool(waiting_row and waiting_row[0])
    fingerprint_row = fingerprint.fetchone()
    return Staged(
        changes,
        schema_changes,
        last_order,
        transactions,
        columns_of(columns.fetchall()),
        int(str(fingerprint_row[0])) if fingerprint_row else 0,
    )


def piece_selection(after: int, last: int) -> sql.Composable:
    """The staged changes of the source transactions ordered after `after`, up to `last`."""
    return sql.SQL("s.transaction_order > {} AND s.transaction_order <= {}").format(
        sql.Literal(after), sql.Literal(last)
    )


def cut_pieces(
    target: Connection, after: int, piece_rows: int, *, many: bool
) -> list[schema.Piece]:
    """The staged window (no schema changes in it) cut into pieces of about piece_rows."""
    if many:
        target.execute("CREATE INDEX pgconcord_stage_order ON pgconcord_stage (transaction_order)")
    rows = target.execute(
        """
        SELECT max(transaction_order), sum(changes), count(*)
          FROM (SELECT transaction_order, changes,
                       (sum(changes) OVER (ORDER BY transaction_order) - changes)::bigint / %s
                         AS piece
                  FROM (SELECT transaction_order, count(*) AS changes
                          FROM pgconcord_stage GROUP BY transaction_order) AS per_transaction
               ) AS numbered
         GROUP BY piece ORDER BY 1
        """,
        (piece_rows,),
    ).fetchall()
    target.commit()
    pieces = []
    for last, changes, transactions in rows:
        pieces.append(
            schema.Piece(after, int(str(last)), int(str(changes)), int(str(transactions)), False)
        )
        after = int(str(last))
    return pieces
