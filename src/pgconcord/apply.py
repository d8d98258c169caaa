"""Applying an origin's changes to a target: transactional, exactly once, in the origin's order.

A window (see reader.py) is copied into a temporary stage table on the target, then applied in
pieces of whole source transactions. Each piece commits together with the target's position for
that origin, so a crash at any instant repeats nothing and loses nothing. Inside a piece the
changes are applied set-wise per table: the last change of each row wins over earlier ones of
the same origin, and each row's version (hybrid clock, origin) decides against the local version
(conflict.py). The target session runs with session_replication_role = replica, so the
application's triggers and foreign keys stay quiet and nothing applied is captured again; a row
whose parent is still absent once the window is applied is recorded (parent_missing).

A change that cannot be applied here is parked with the rest of its source transaction
(parked.py), and so is every later transaction that touches one of its rows. A table the
agent's role may not write here, or one that is gone, is not the change's fault: its changes
stay queued, and the pair's error names the node, the table and the right.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import psycopg
from psycopg import errors as pg_errors
from psycopg import sql

from pgconcord import catalog, conflict, parked, reader, resolver, schema
from pgconcord.catalog import Table
from pgconcord.config import NodeConfig
from pgconcord.errors import NodeUnavailable, PgconcordError, SchemaError
from pgconcord.transport import connect, describe_lost_session, erring_node, lost_session

log = logging.getLogger(__name__)

Connection = psycopg.Connection[tuple[object, ...]]

DEFAULT_PIECE_ROWS = 50_000
MAX_FAILURES_ONE_BY_ONE = 100
_TURN_LOCK_CLASS = 0x70676331  # advisory lock class of "applying this origin here"
# How often an idle pair moves its position forward, so the origin can purge its log.
IDLE_ADVANCE_SECONDS = 10

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
    overlap text[]);
CREATE TEMPORARY TABLE IF NOT EXISTS pgconcord_winner (row_key jsonb);
CREATE TEMPORARY TABLE IF NOT EXISTS pgconcord_held (transaction_order bigint);
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
    _require_replica_mode(mode[0] if mode else None, node.name)
    # Values arrive rendered in these settings (see capture_trigger.sql); read them alike.
    connection.execute(
        "SET TimeZone = 'UTC'; SET DateStyle = 'ISO, YMD'; SET IntervalStyle = 'postgres'"
    )
    connection.execute(_TEMPORARY_TABLES)
    connection.commit()
    return connection


def _require_replica_mode(mode: object, node_name: str) -> None:
    """Refuse to apply in a session whose session_replication_role (mode) is not replica."""
    if mode != "replica":
        raise ApplyError(
            f"node {node_name}: the applying session is not in replica mode"
            f" (session_replication_role = {mode}); nothing is applied"
        )


class ApplyError(PgconcordError):
    """Changes from an origin cannot be applied; they stay queued and are retried."""


class RacedWithLocalWrite(PgconcordError):
    """A merge lost a race with a local write to the same new row: the piece is applied again
    (like a deadlock), now seeing that write."""


class TableDropped(PgconcordError):
    """Changes for a table that was replicated here and has been dropped since: parked (a
    DROP TABLE replicated while another node still wrote to the table), never waited for."""


class _ChangeFailed(Exception):
    """A change of a source transaction cannot be applied here (the reason is in the text)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _TargetProblem(Exception):
    """This node refuses the agent a table (a right missing) or the table is gone: not a
    change that cannot be applied (it is not parked), not an unreachable node. Turned into an
    ApplyError naming node, table and right once the piece's transaction is rolled back."""

    def __init__(self, error: psycopg.DatabaseError, plan: TablePlan) -> None:
        super().__init__(first_line(error))
        self.error = error
        self.plan = plan


class Superseded(Exception):
    """Another process moved this pair's position while we worked; start over from it."""


@dataclass(frozen=True)
class Position:
    applied_snapshot: str
    window_snapshot: str | None
    window_done: int | None


@dataclass
class PullResult:
    origin: str
    target: str
    changes: int = 0
    transactions: int = 0
    conflicts: int = 0


@dataclass(frozen=True)
class TablePlan:
    """How to apply one table's changes on this target."""

    table: Table
    table_id: int
    columns: tuple[str, ...]  # stored columns the origin sends and the target has
    delta_columns: tuple[str, ...] = ()  # counters: concurrent changes add up
    resolver: str | None = None  # the user's function for conflicts ('module:function')
    dropped: bool = False  # the table was replicated here and has been dropped
    # Why its changes are parked rather than applied: they need a schema change of the same
    # origin that is parked here (its table or column is missing until that one is applied).
    held: str | None = None
    foreign_keys: tuple[catalog.ForeignKey, ...] = ()  # checked after applying, and recorded


class Puller:
    """Moves one origin's changes into one target. Not thread-safe: one per thread."""

    def __init__(
        self, origin: NodeConfig, target: NodeConfig, *, piece_rows: int = DEFAULT_PIECE_ROWS
    ) -> None:
        self.origin = origin
        self.target = target
        self.piece_rows = piece_rows
        # Whether this target holds parked changes from this origin (refreshed each window).
        self._parked_waiting = False
        # Table checks are kept while neither node's catalog changed (see catalog.fingerprint).
        self._plans_cache: dict[tuple[str, str], TablePlan] = {}
        self._plans_key: object = None
        # Plans of single changes around a schema change, by table and carried columns.
        self._carried_cache: dict[tuple[str, str, tuple[str, ...]], TablePlan] = {}
        # Tables with foreign keys that had rows applied in this window: their foreign keys, for
        # _check_parents (pgconcord_child says which rows wait for the check).
        self._child_plans: dict[tuple[str, str], TablePlan] = {}
        self._schema_window = False  # the window holds a schema change
        self._origin_connection: Connection | None = None
        self._target_connection: Connection | None = None

    # -- connections ---------------------------------------------------------------------

    def _origin(self) -> Connection:
        if self._origin_connection is None or self._origin_connection.closed:
            self._origin_connection = reader.open_origin(self.origin)
        return self._origin_connection

    def _target(self) -> Connection:
        if self._target_connection is None or self._target_connection.closed:
            self._target_connection = open_target(self.target)
        return self._target_connection

    def close(self) -> None:
        for connection in (self._origin_connection, self._target_connection):
            if connection is not None and not connection.closed:
                connection.close()
        self._origin_connection = self._target_connection = None

    # -- the pull --------------------------------------------------------------------------

    def pull(
        self,
        should_stop: Callable[[], bool] = lambda: False,
        on_progress: Callable[[PullResult], None] = lambda _: None,
        *,
        wait_for_turn: bool = False,
        until_current: bool = False,
    ) -> PullResult:
        """Apply windows until the origin has nothing newer, or with until_current until
        everything the origin had committed when the call began is applied (a busy origin
        never runs dry). Another process applying this pair makes the call return at once,
        or wait for its turn with wait_for_turn. Connection failures raise NodeUnavailable;
        the caller retries later."""
        result = PullResult(origin=self.origin.name, target=self.target.name)
        try:
            while not should_stop():
                if not self._take_turn(wait=wait_for_turn):
                    break
                try:
                    applied = self._pull_window(result, should_stop, on_progress)
                except Superseded:
                    log.debug(
                        "%s -> %s: position moved by another process",
                        self.origin.name,
                        self.target.name,
                    )
                    continue
                except (pg_errors.DeadlockDetected, RacedWithLocalWrite):
                    self._rollback()
                    continue
                finally:
                    self._end_turn()
                if applied is None or (until_current and applied == "fresh"):
                    break
        except psycopg.Error as error:
            # Only a lost session makes a node unavailable (transport.lost_session); any other
            # OperationalError (a cancelled statement, a lock not granted, a full disk) stalls
            # the pair naming the node; other errors go to the caller as before.
            sessions = {
                self.origin.name: self._origin_connection,
                self.target.name: self._target_connection,
            }
            lost = lost_session(error, sessions)
            if lost is None and not isinstance(error, psycopg.OperationalError):
                self._rollback()
                raise
            erring = erring_node(sessions) or self.target.name
            self.close()
            if lost is not None:
                raise NodeUnavailable(lost, describe_lost_session(error)) from None
            raise ApplyError(f"node {erring}: {first_line(error)}") from None
        except BaseException:
            self._rollback()
            raise
        return result

    def _turn_key(self) -> tuple[int, str]:
        return (_TURN_LOCK_CLASS, self.origin.name)

    def _take_turn(self, *, wait: bool) -> bool:
        """One process at a time applies a pair (the position check keeps it correct anyway;
        the lock saves the others from staging the same window for nothing)."""
        target = self._target()
        if wait:
            target.execute("SELECT pg_advisory_lock(%s, hashtext(%s))", self._turn_key())
            taken = True
        else:
            row = target.execute(
                "SELECT pg_try_advisory_lock(%s, hashtext(%s))", self._turn_key()
            ).fetchone()
            taken = bool(row and row[0])
        target.commit()
        return taken

    def _end_turn(self) -> None:
        target = self._target_connection
        if target is None or target.broken or target.closed:
            return
        target.rollback()
        target.execute("SELECT pg_advisory_unlock(%s, hashtext(%s))", self._turn_key())
        target.commit()

    def _rollback(self) -> None:
        for connection in (self._origin_connection, self._target_connection):
            if connection is not None and not connection.closed:
                connection.rollback()

    def _pull_window(
        self,
        result: PullResult,
        should_stop: Callable[[], bool],
        on_progress: Callable[[PullResult], None],
    ) -> Literal["fresh", "resumed"] | None:
        """Apply one window: a fresh one, or one another run had begun; None when there was
        nothing to apply."""
        origin, target = self._origin(), self._target()
        position = self._read_position(target, lock=False)
        target.commit()
        if position.window_snapshot is None:
            snapshot = reader.begin_window(origin)
            window = reader.Window(position.applied_snapshot, snapshot, 0)
            if not reader.window_has_changes(origin, window):
                reader.make_durable(origin)
                origin.commit()
                self._advance_idle(target, position, snapshot)
                return None
        else:
            window = reader.Window(
                position.applied_snapshot, position.window_snapshot, position.window_done or 0
            )
        staged, schema_changes = self._stage(origin, target, window)
        # A window with schema changes is applied with the columns its rows carry (schema.py).
        plans = None if schema_changes else self._plans(origin, target)
        self._schema_window = bool(schema_changes)
        if position.window_snapshot is None:
            # Rows of an earlier window not checked yet (it was left unfinished) are not ours.
            target.execute("DELETE FROM pgconcord_child")
            self._child_plans.clear()
        self._parked_waiting = parked.any_waiting(target, self.origin.name)
        reader.make_durable(origin)
        origin.commit()
        if schema_changes:
            pieces = schema.pieces(target, window.done, self.piece_rows)
            target.commit()
        else:
            pieces = self._pieces(target, window.done, many=staged > self.piece_rows)
        done = window.done
        for index, piece in enumerate(pieces):
            if should_stop():
                return None
            final = index == len(pieces) - 1
            expected = (
                position
                if index == 0
                else Position(window.applied_snapshot, window.window_snapshot, done)
            )
            conflicts = self._apply_window_piece(target, piece, plans, expected, window, final)
            done = piece.last
            result.changes += piece.rows
            result.transactions += piece.transactions
            result.conflicts += conflicts
            on_progress(result)
        if not pieces:
            self._finish_empty_window(target, position, window)
        return "fresh" if position.window_snapshot is None else "resumed"

    def _apply_window_piece(
        self,
        target: Connection,
        piece: schema.Piece,
        plans: dict[tuple[str, str], TablePlan] | None,
        expected: Position,
        window: reader.Window,
        final: bool,
    ) -> int:
        """Apply one piece: set-wise, or change by change when it holds a schema change."""
        selection = piece_selection(piece.after, piece.last)
        try:
            if piece.schema:
                self._carried_cache.clear()
                conflicts = self._apply_one_by_one(
                    target, self._carried_plan, expected, window, selection, piece.last, final
                )
                self._plans_cache, self._plans_key = {}, None
                return conflicts
            if plans is None:
                plans = self._carried_plans(target, selection)
                target.commit()
            return self._apply_piece(
                target, plans, expected, window, piece.after, piece.last, final
            )
        except _TargetProblem as problem:
            # The plans are made again next time: the table may have changed meanwhile.
            self._plans_cache, self._plans_key = {}, None
            raise self._describe_target_problem(problem) from None

    # -- position ------------------------------------------------------------------------

    def _read_position(self, target: Connection, *, lock: bool) -> Position:
        # Every applying transaction reads its position here, and with it the mode it runs in:
        # nothing may have undone replica mode unseen.
        query = (
            "SELECT applied_snapshot::text, window_snapshot::text, window_done,"
            " current_setting('session_replication_role')"
            " FROM pgconcord.position WHERE origin = %s"
        )
        row = target.execute(
            query + (" FOR UPDATE" if lock else ""), (self.origin.name,)
        ).fetchone()
        if row is None:
            raise ApplyError(
                f"node {self.target.name} has no position for origin {self.origin.name};"
                " run pgconcord setup"
            )
        _require_replica_mode(row[3], self.target.name)
        done = row[2]
        return Position(
            str(row[0]),
            None if row[1] is None else str(row[1]),
            None if done is None else int(str(done)),
        )

    def _advance_idle(self, target: Connection, position: Position, snapshot: str) -> None:
        target.execute(
            "UPDATE pgconcord.position SET applied_snapshot = %s, updated_at = now()"
            " WHERE origin = %s AND applied_snapshot::text = %s AND window_snapshot IS NULL"
            " AND updated_at < now() - make_interval(secs => %s)",
            (snapshot, self.origin.name, position.applied_snapshot, IDLE_ADVANCE_SECONDS),
        )
        target.commit()

    def _finish_empty_window(
        self, target: Connection, position: Position, window: reader.Window
    ) -> None:
        with target.transaction():
            if self._read_position(target, lock=True) != position:
                raise Superseded
            target.execute(
                "UPDATE pgconcord.position SET applied_snapshot = %s, window_snapshot = NULL,"
                " window_done = NULL, updated_at = now() WHERE origin = %s",
                (window.window_snapshot, self.origin.name),
            )

    # -- staging -------------------------------------------------------------------------

    def _stage(
        self, origin: Connection, target: Connection, window: reader.Window
    ) -> tuple[int, int]:
        with target.transaction():
            horizons = reader.copy_horizons(target, self.origin.name)
            target.execute("TRUNCATE pgconcord_stage")
            target.execute("DROP INDEX IF EXISTS pgconcord_stage_order")
            target.execute("DROP INDEX IF EXISTS pgconcord_stage_id")
            with target.cursor() as cursor, cursor.copy("COPY pgconcord_stage FROM STDIN") as copy:
                for block in reader.stream_window(origin, window, horizons):
                    copy.write(block)
            row = target.execute(
                "SELECT count(*), count(*) FILTER (WHERE operation = 'S') FROM pgconcord_stage"
            ).fetchone()
            staged = int(str(row[0])) if row else 0
            schema_changes = int(str(row[1])) if row else 0
            if staged > 10_000:
                target.execute("ANALYZE pgconcord_stage")
        return staged, schema_changes

    def _plans(self, origin: Connection, target: Connection) -> dict[tuple[str, str], TablePlan]:
        """Plans for the staged window, checked against both nodes' tables (kept while neither
        catalog changed and the rows carry the same columns)."""
        carried = self._carried_columns(target, sql.SQL("true"))
        if not carried:
            return {}
        fingerprints = (catalog.fingerprint(origin), catalog.fingerprint(target))
        key = (fingerprints, frozenset(carried.items()))
        if key == self._plans_key:
            return dict(self._plans_cache)
        plans = self._build_plans(origin, target, carried)
        self._plans_cache, self._plans_key = plans, key
        return plans

    def _carried_columns(
        self, target: Connection, selection: sql.Composable
    ) -> dict[tuple[str, str], frozenset[str]]:
        """Per staged table, the columns the selected rows carry: what counts, not the origin's
        table as it is now, which may have changed since (a schema change ahead in its log)."""
        rows = target.execute(
            sql.SQL(
                "SELECT s.schema_name, s.table_name,"
                " array_agg(DISTINCT k) FILTER (WHERE k IS NOT NULL)"
                " FROM pgconcord_stage s LEFT JOIN LATERAL jsonb_object_keys(s.new_row) k ON true"
                " WHERE s.schema_name IS NOT NULL AND ({}) GROUP BY 1, 2"
            ).format(selection)
        ).fetchall()
        return {
            (str(schema_name), str(table_name)): frozenset(
                str(column) for column in (columns if isinstance(columns, list) else [])
            )
            for schema_name, table_name, columns in rows
        }

    def _carried_plans(
        self, target: Connection, selection: sql.Composable
    ) -> dict[tuple[str, str], TablePlan]:
        """Plans for some staged changes of a window with schema changes (after the origin's
        window transaction ended)."""
        carried = self._carried_columns(target, selection)
        if not carried:
            return {}
        origin = self._origin()
        try:
            return self._build_plans(origin, target, carried)
        finally:
            origin.rollback()

    def _carried_plan(self, schema_name: str, table_name: str, change_id: int) -> TablePlan:
        """The plan of one change in a piece with a schema change (cached until the next)."""
        target = self._target()
        selection = sql.SQL("s.id = {}").format(sql.Literal(change_id))
        carried = self._carried_columns(target, selection)
        key = (schema_name, table_name, tuple(sorted(carried.get((schema_name, table_name), ()))))
        if key not in self._carried_cache:
            self._carried_cache[key] = self._carried_plans(target, selection)[
                (schema_name, table_name)
            ]
        return self._carried_cache[key]

    def _build_plans(
        self,
        origin: Connection,
        target: Connection,
        carried: dict[tuple[str, str], frozenset[str]],
    ) -> dict[tuple[str, str], TablePlan]:
        names = set(carried)
        at_origin = reader.origin_tables(origin, names)
        registered = catalog.registered_tables(target)
        counters = catalog.delta_columns_of(target)
        resolvers = catalog.resolvers_of(target)
        at_target = {
            (t.schema, t.name): t
            for t in catalog.discover_tables(target, sorted({s for s, _ in names}), set())
        }
        plans = {}
        waiting = parked.schema_change_waiting(target, self.origin.name)
        held = None if waiting is None else f"waits for parked schema change {waiting}"
        for name in sorted(names):
            qualified = ".".join(name)
            source, destination = at_origin.get(name), at_target.get(name)
            if destination is None and name in registered:
                table = source or Table(name[0], name[1], (), ())
                plans[name] = TablePlan(table, registered[name], (), dropped=True)
                continue
            if held is not None and (
                destination is None
                or name not in registered
                or carried[name] - {c.name for c in destination.columns}
            ):
                # A parked schema change of this origin made what these changes need: they
                # follow it, parked whole, and the stream goes on.
                table = destination or source or Table(name[0], name[1], (), ())
                plans[name] = TablePlan(table, registered.get(name, 0), (), held=held)
                continue
            if destination is None or name not in registered:
                raise SchemaError(
                    f"table {qualified}: changes from {self.origin.name} cannot be applied on"
                    f" {self.target.name}: the table is missing there"
                    + ("" if destination is None else " from replication (run pgconcord setup)")
                )
            if source is not None and source.key_columns != destination.key_columns:
                raise SchemaError(
                    f"table {qualified}: primary key differs between {self.origin.name}"
                    f" ({', '.join(source.key_columns)}) and {self.target.name}"
                    f" ({', '.join(destination.key_columns)})"
                )
            stored = [c.name for c in destination.stored_columns]
            generated = {c.name for c in destination.columns if c.generated}
            at_origin_now = {c.name for c in source.columns} if source is not None else set()
            for column in sorted(carried[name] - set(stored) - generated):
                if column in at_origin_now:
                    # The origin has it and this node does not: made by hand on one node, or
                    # a schema change that failed here. Its changes wait (nothing is lost).
                    raise SchemaError(
                        f"table {qualified}: column {column} exists on {self.origin.name}"
                        f" but not on {self.target.name}; its changes wait until it exists"
                        " there"
                    )
                # Dropped (or renamed) at the origin since: the value goes with the column.
                log.warning(
                    "%s -> %s: %s: value of column %s dropped (the column no longer exists)",
                    self.origin.name,
                    self.target.name,
                    qualified,
                    column,
                )
            wanted = carried[name] | set(destination.key_columns)
            plans[name] = TablePlan(
                table=destination,
                table_id=registered[name],
                columns=tuple(c for c in stored if c in wanted),
                delta_columns=counters.get(name, ()),
                resolver=resolvers.get(name),
                foreign_keys=catalog.foreign_keys(target, destination),
            )
        return plans

    def _pieces(self, target: Connection, after: int, *, many: bool) -> list[schema.Piece]:
        """The staged window (no schema changes in it) cut into pieces of about piece_rows."""
        if many:
            target.execute(
                "CREATE INDEX pgconcord_stage_order ON pgconcord_stage (transaction_order)"
            )
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
            (self.piece_rows,),
        ).fetchall()
        target.commit()
        pieces = []
        for last, changes, transactions in rows:
            pieces.append(
                schema.Piece(
                    after, int(str(last)), int(str(changes)), int(str(transactions)), False
                )
            )
            after = int(str(last))
        return pieces

    # -- applying ------------------------------------------------------------------------

    def _apply_piece(
        self,
        target: Connection,
        plans: dict[tuple[str, str], TablePlan],
        expected: Position,
        window: reader.Window,
        after: int,
        last_order: int,
        final: bool,
    ) -> int:
        piece = piece_selection(after, last_order)
        try:
            with target.transaction():
                self._check_position(target, expected)
                self._hold_followers(target, piece)
                conflicts = sum(
                    self._apply_table(target, plan, piece, self._parked_waiting)
                    for plan in plans.values()
                )
                conflicts += self._check_parents(target, last_order, final)
                self._advance(target, window, piece, last_order, final)
            return conflicts
        except psycopg.DatabaseError as error:
            if not is_data_problem(error):
                raise
        except (resolver.Parked, TableDropped):
            pass
        # Some change cannot be applied (or the user's resolver asked to park one), or the
        # set-wise apply lost the order between rows (a unique value moved from one row to
        # another inside the piece): go change by change, parking those that fail, so that
        # the stream goes on.
        return self._apply_one_by_one(
            target,
            lambda schema_name, table_name, _change: plans[(schema_name, table_name)],
            expected,
            window,
            piece,
            last_order,
            final,
        )

    def _apply_one_by_one(
        self,
        target: Connection,
        plan_for: Callable[[str, str, int], TablePlan],
        expected: Position,
        window: reader.Window,
        piece: sql.Composable,
        last_order: int,
        final: bool,
    ) -> int:
        conflicts = 0
        with target.transaction():
            self._check_position(target, expected)
            # Each change is picked by its id: without an index that is quadratic.
            target.execute("CREATE INDEX IF NOT EXISTS pgconcord_stage_id ON pgconcord_stage (id)")
            target.execute("ANALYZE pgconcord_stage")
            changes = target.execute(
                sql.SQL(
                    "SELECT s.transaction_order, s.id, s.schema_name, s.table_name"
                    " FROM pgconcord_stage s WHERE {} ORDER BY s.transaction_order, s.id"
                ).format(piece)
            ).fetchall()
            transactions: dict[int, list[tuple[int, str | None, str | None]]] = {}
            for transaction_order, change_id, schema_name, table_name in changes:
                transactions.setdefault(int(str(transaction_order)), []).append(
                    (
                        int(str(change_id)),
                        None if schema_name is None else str(schema_name),
                        None if table_name is None else str(table_name),
                    )
                )
            failures = 0
            orders = list(transactions)
            for index, order in enumerate(orders):
                # A transaction that touches a row with a parked change waits whole.
                this_one = sql.SQL("s.transaction_order = {}").format(sql.Literal(order))
                if self._hold_followers(target, this_one):
                    continue
                try:
                    conflicts += self._apply_transaction(target, plan_for, transactions[order])
                    continue
                except _ChangeFailed as failed:
                    reason = failed.reason
                # A source transaction is applied whole or not at all: park all of it.
                parked.park(
                    target,
                    self.origin.name,
                    sql.SQL("s.transaction_order = {}").format(sql.Literal(order)),
                    reason,
                )
                self._parked_waiting = True
                failures += 1
                log.warning(
                    "%s -> %s: parked a transaction of %d changes: %s",
                    self.origin.name,
                    self.target.name,
                    len(transactions[order]),
                    reason,
                )
                rest = orders[index + 1 :]
                if failures >= MAX_FAILURES_ONE_BY_ONE and rest:
                    # Savepoints slow down as they pile up in one transaction; after this many
                    # failures the rest of the piece is parked as it is, in order, for
                    # `pgconcord conflicts retry`.
                    parked.park(
                        target,
                        self.origin.name,
                        sql.SQL("s.transaction_order = ANY({})").format(sql.Literal(rest)),
                        f"parked unapplied after {failures} failures in one batch ({reason})",
                    )
                    log.warning(
                        "%s -> %s: parked %d more transactions after %d failures",
                        self.origin.name,
                        self.target.name,
                        len(rest),
                        failures,
                    )
                    break
            conflicts += self._check_parents(target, last_order, final)
            self._advance(target, window, piece, last_order, final)
        return conflicts

    def _hold_followers(self, target: Connection, selection: sql.Composable) -> int:
        """Park, whole, the selected source transactions that touch a row with a parked
        change (parked.hold_followers); how many changes that parked."""
        if not self._parked_waiting:
            return 0
        held = parked.hold_followers(target, self.origin.name, selection)
        if held:
            log.warning(
                "%s -> %s: parked %d changes whose source transactions wait behind earlier"
                " parked changes",
                self.origin.name,
                self.target.name,
                held,
            )
        return held

    def _apply_transaction(
        self,
        target: Connection,
        plan_for: Callable[[str, str, int], TablePlan],
        changes: list[tuple[int, str | None, str | None]],
    ) -> int:
        """Apply one source transaction change by change, under one savepoint; raise
        _ChangeFailed (with everything undone) if a change cannot be applied."""
        conflicts = 0
        with target.transaction():
            for change_id, schema_name, table_name in changes:
                what = "schema change" if schema_name is None else f"{schema_name}.{table_name}"
                plan: TablePlan | None = None
                try:
                    if schema_name is None or table_name is None:
                        schema.run_statement(target, change_id)
                        self._carried_cache.clear()
                        continue
                    plan = plan_for(schema_name, table_name, change_id)
                    conflicts += self._apply_change(target, plan, change_id)
                except psycopg.DatabaseError as error:
                    if plan is not None and is_target_problem(error):
                        # This node refuses the agent, or the table went: waits, not parked.
                        raise _TargetProblem(error, plan) from error
                    # A schema change runs as the role that made it (schema.run_statement): a
                    # right that role lacks here, or an object missing here, parks it, and the
                    # stream goes on (as a missing role does).
                    if not (is_data_problem(error) or (plan is None and is_target_problem(error))):
                        raise
                    raise _ChangeFailed(f"{what}: {first_line(error)}") from error
                except (resolver.Parked, TableDropped, schema.RoleMissing) as not_applied:
                    raise _ChangeFailed(f"{what}: {not_applied}") from None
        return conflicts

    def _apply_change(self, target: Connection, plan: TablePlan, change_id: int) -> int:
        """Apply one staged change under a savepoint; the number of conflicts. A collision on
        a unique constraint other than the key is resolved; other failures are raised."""
        selection = sql.SQL("s.id = {}").format(sql.Literal(change_id))
        # Transactions that wait behind a parked change were left out whole before (see
        # _apply_one_by_one): nothing to hold here.
        try:
            with target.transaction():
                return self._apply_table(target, plan, selection, False)
        except pg_errors.UniqueViolation:
            with target.transaction():
                apply_now = conflict.resolve_unique_collision(
                    target, plan.table, plan.table_id, self.origin.name, change_id
                )
                if apply_now is None:
                    raise
                if not apply_now:
                    return 1
                return 1 + self._apply_table(target, plan, selection, False)

    def _apply_table(
        self, target: Connection, plan: TablePlan, selection: sql.Composable, held: bool
    ) -> int:
        """apply_table, noting the tables whose rows wait for _check_parents, and telling a
        refusal of this node (a right, a table) from a change that cannot be applied."""
        if plan.foreign_keys:
            self._child_plans[(plan.table.schema, plan.table.name)] = plan
        try:
            return apply_table(target, plan, self.origin.name, selection, held)
        except psycopg.DatabaseError as error:
            if is_target_problem(error):
                raise _TargetProblem(error, plan) from error
            raise

    def _check_parents(self, target: Connection, last_order: int, final: bool) -> int:
        """Record the rows applied in this window whose parent (by a foreign key) is not here:
        at the end of the window, when every parent it brings has arrived whatever the order of
        tables and transactions, or at the end of an earlier piece for a table whose parents
        the rest of the window does not touch (a window cut in pieces is checked as it goes,
        so that an agent restarted halfway forgets as few rows as possible). The number of
        conflicts recorded. Runs inside the piece's transaction."""
        if not self._child_plans:
            return 0
        waiting = target.execute(
            "SELECT DISTINCT schema_name, table_name FROM pgconcord_child"
        ).fetchall()
        recorded = 0
        for schema_name, table_name in waiting:
            name = (str(schema_name), str(table_name))
            plan = self._child_plans.get(name)
            foreign_keys = plan.foreign_keys if plan is not None else ()
            if plan is not None and self._schema_window:
                # A schema change of this window may have added, dropped or changed keys.
                exists = target.execute(
                    "SELECT to_regclass(%s) IS NOT NULL",
                    (plan.table.identifier.as_string(target),),
                ).fetchone()
                foreign_keys = (
                    catalog.foreign_keys(target, plan.table) if exists and exists[0] else ()
                )
            if (
                not final
                and foreign_keys
                and self._parents_coming(target, foreign_keys, last_order)
            ):
                continue
            if plan is not None:
                for foreign_key in foreign_keys:
                    try:
                        checked = target.execute(
                            conflict.parent_missing_statement(plan.table, foreign_key),
                            {
                                "schema": name[0],
                                "table": name[1],
                                "origin": self.origin.name,
                                "columns": list(foreign_key.columns),
                            },
                        )
                    except psycopg.DatabaseError as error:
                        if is_target_problem(error):
                            raise _TargetProblem(error, plan) from error
                        raise
                    recorded += max(checked.rowcount, 0)
            target.execute(
                "DELETE FROM pgconcord_child WHERE schema_name = %s AND table_name = %s", name
            )
        return recorded

    @staticmethod
    def _parents_coming(
        target: Connection, foreign_keys: tuple[catalog.ForeignKey, ...], last_order: int
    ) -> bool:
        """Whether the window's transactions after last_order write a parent table."""
        row = target.execute(
            "SELECT EXISTS (SELECT 1 FROM (SELECT DISTINCT s.schema_name, s.table_name"
            "   FROM pgconcord_stage s WHERE s.transaction_order > %s AND s.operation <> 'D'"
            "    AND s.schema_name IS NOT NULL) AS later"
            " WHERE to_regclass(format('%%I.%%I', later.schema_name, later.table_name))"
            "       = ANY (SELECT to_regclass(parent) FROM unnest(%s::text[]) AS parent))",
            (last_order, [fk.parent.as_string(target) for fk in foreign_keys]),
        ).fetchone()
        return bool(row and row[0])

    def _describe_target_problem(self, problem: _TargetProblem) -> ApplyError:
        """The error of a pair this node refuses: its node, table and missing right. Called
        after the piece's transaction is rolled back."""
        target = self._target()
        target.rollback()
        table = problem.plan.table.qualified_name
        where = f"node {self.target.name}: table {table}"
        queued = f"changes from {self.origin.name} stay queued"
        text = first_line(problem.error)
        if isinstance(problem.error, pg_errors.UndefinedTable):
            return ApplyError(f"{where}: {text}; {queued} until it is there")
        role, missing = _missing_rights(target, problem.plan)
        target.rollback()
        if missing:
            lacks = "; ".join(f"{', '.join(rights)} on {on}" for on, rights in missing)
            return ApplyError(
                f"{where}: permission denied: the agent's role {role} lacks {lacks};"
                f" {queued} until it is granted ({text})"
            )
        return ApplyError(f"{where}: {text} (the agent's role is {role}); {queued}")

    def _check_position(self, target: Connection, expected: Position) -> None:
        if self._read_position(target, lock=True) != expected:
            raise Superseded

    def _advance(
        self,
        target: Connection,
        window: reader.Window,
        piece: sql.Composable,
        last_order: int,
        final: bool,
    ) -> None:
        """Move the position past this piece, in the transaction that applied it."""
        summary = target.execute(
            sql.SQL("SELECT count(*), max(s.clock) FROM pgconcord_stage s WHERE {}").format(piece)
        ).fetchone()
        assert summary is not None
        values: tuple[str, str | None, int | None]
        if final:
            values = (window.window_snapshot, None, None)
        else:
            values = (window.applied_snapshot, window.window_snapshot, last_order)
        target.execute(
            "UPDATE pgconcord.position SET applied_snapshot = %s, window_snapshot = %s,"
            " window_done = %s, applied_changes = applied_changes + %s,"
            " last_applied_clock = greatest(last_applied_clock, %s), updated_at = now()"
            " WHERE origin = %s",
            (*values, summary[0], summary[1], self.origin.name),
        )


def piece_selection(after: int, last: int) -> sql.Composable:
    """The staged changes of the source transactions ordered after `after`, up to `last`."""
    return sql.SQL("s.transaction_order > {} AND s.transaction_order <= {}").format(
        sql.Literal(after), sql.Literal(last)
    )


def is_data_problem(error: psycopg.DatabaseError) -> bool:
    """A change that cannot be applied as it is (as opposed to a lost connection or a
    deadlock, which a retry of the same work overcomes, or a target problem, which its
    operator fixes: the changes wait for it, none is parked)."""
    if isinstance(error, psycopg.OperationalError | pg_errors.DeadlockDetected):
        return False
    if is_target_problem(error):
        return False
    if isinstance(error, psycopg.DataError | psycopg.IntegrityError | psycopg.ProgrammingError):
        return True
    # Errors raised by the user's ENABLE ALWAYS triggers (PL/pgSQL RAISE).
    return (error.sqlstate or "").startswith("P0")


def is_target_problem(error: psycopg.DatabaseError) -> bool:
    """The target refuses the agent's role a right on a table (a GRANT missing, a row-level
    security policy), or the table is not there: nothing is wrong with the change itself."""
    return isinstance(error, pg_errors.InsufficientPrivilege | pg_errors.UndefinedTable)


# The rights applying a table's changes takes (apply_table's statements; conflict.py), per
# object, and those the agent's role lacks.
_TABLE_RIGHTS = ("SELECT", "INSERT", "UPDATE", "DELETE")
_MISSING_RIGHTS = """
SELECT current_user::text, n.nspname::text, n.nspname || '.' || c.relname,
       NOT has_schema_privilege(n.oid, 'USAGE'),
       ARRAY(SELECT r FROM unnest(%s::text[]) AS r WHERE NOT has_table_privilege(c.oid, r))
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE c.oid = to_regclass(%s)
"""


def _missing_rights(
    target: Connection, plan: TablePlan
) -> tuple[str, list[tuple[str, tuple[str, ...]]]]:
    """The agent's role, and per object the rights applying the plan's table needs that the
    role lacks: the table, the parents its foreign keys are checked against, and pgconcord's
    own tables the apply writes."""
    needs: list[tuple[sql.Composable, tuple[str, ...]]] = [(plan.table.identifier, _TABLE_RIGHTS)]
    needs += [(foreign_key.parent, ("SELECT",)) for foreign_key in plan.foreign_keys]
    needs += [
        (sql.Identifier("pgconcord", "row_version"), ("SELECT", "INSERT", "UPDATE")),
        (sql.Identifier("pgconcord", "conflict"), ("INSERT",)),
    ]
    role = ""
    missing: list[tuple[str, tuple[str, ...]]] = []
    for identifier, rights in needs:
        row = target.execute(
            _MISSING_RIGHTS, (list(rights), identifier.as_string(target))
        ).fetchone()
        if row is None:
            continue
        role = str(row[0])
        if row[3]:
            missing.append((f"schema {row[1]}", ("USAGE",)))
        lacking = tuple(str(right) for right in row[4]) if isinstance(row[4], list) else ()
        if lacking:
            missing.append((str(row[2]), lacking))
    if not role:
        found = target.execute("SELECT current_user::text").fetchone()
        role = str(found[0]) if found else "?"
    return role, list(dict.fromkeys(missing))


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def apply_table(
    target: Connection,
    plan: TablePlan,
    origin: str,
    selection: sql.Composable,
    parked_waiting: bool,
) -> int:
    """Apply the staged changes the selection picks for one table; the number of conflicts.
    Runs inside the caller's transaction. With parked_waiting, the changes of transactions
    parked.hold_followers held are left out. Rows applied to a table with foreign keys are
    noted for Puller._check_parents."""
    if plan.dropped or plan.held is not None:
        staged = target.execute(
            sql.SQL(
                "SELECT EXISTS (SELECT 1 FROM pgconcord_stage s WHERE s.schema_name = %s"
                " AND s.table_name = %s AND ({}))"
            ).format(selection),
            (plan.table.schema, plan.table.name),
        ).fetchone()
        if staged and staged[0]:
            raise TableDropped(
                f"table {plan.table.qualified_name}: "
                + (plan.held or "the table was dropped on this node")
            )
        return 0
    if not plan.table.key_columns:
        target.execute(
            conflict.insert_only_statement(plan.table, plan.columns, selection),
            {"schema": plan.table.schema, "table": plan.table.name},
        )
        return 0
    statements = conflict.table_statements(plan.table, plan.columns, plan.delta_columns)
    parameters = {
        "schema": plan.table.schema,
        "table": plan.table.name,
        "table_id": plan.table_id,
        "origin": origin,
    }
    # DELETE, not TRUNCATE: truncating gives the temporary tables new files and costs
    # catalog work each time, too much for the small pieces of a busy steady state.
    target.execute("DELETE FROM pgconcord_decision")
    target.execute("DELETE FROM pgconcord_winner")
    filled = target.execute(statements.decide(selection, parked_waiting), parameters)
    if filled.rowcount == 0:
        return 0
    if filled.rowcount > 10_000:
        target.execute("ANALYZE pgconcord_decision")
    verdicts = None
    if plan.resolver:
        verdicts = resolver.judge(target, plan.table, origin, plan.resolver)
        if verdicts.park:
            raise resolver.Parked(next(iter(verdicts.reasons.values())))
    raced = target.execute(statements.choose_winners, parameters).fetchone()
    if raced and int(str(raced[0])):
        raise RacedWithLocalWrite(
            f"{plan.table.qualified_name}: a local write created a row version while it was"
            " being merged"
        )
    recorded = target.execute(statements.record_conflicts, parameters).rowcount
    target.execute(statements.delete_rows, parameters)
    target.execute(statements.upsert_rows, parameters)
    if statements.merge_rows is not None:
        target.execute(statements.merge_rows, parameters)
    if statements.add_deltas is not None:
        target.execute(statements.add_deltas, parameters)
    if plan.foreign_keys:
        # Checked once the whole window is applied (Puller._check_parents): a parent may come
        # in a table applied after this one, or in a later transaction.
        target.execute(conflict.CHILD_CANDIDATES, parameters)
    if verdicts is not None and verdicts.keep:
        resolver.write_kept_rows(target, plan.table, plan.columns, verdicts)
        resolver.mark_resolved(target, plan.table, verdicts)
    if filled.rowcount > 10_000:
        # A big piece: give the space back now rather than leave it for later DELETEs.
        target.execute("TRUNCATE pgconcord_decision, pgconcord_winner")
    return max(recorded, 0)
