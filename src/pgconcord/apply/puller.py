"""The Puller: one pair's state machine (origin -> target). It takes the pair's turn, reads
the position, stages a window, cuts it in pieces and applies each piece in a transaction that
also moves the position; the steps are the package's other modules."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import psycopg
from psycopg import errors as pg_errors
from psycopg import pq

from pgconcord import catalog, resolver, schema
from pgconcord.apply.draining import drains_on, stamp_local_changes
from pgconcord.apply.errors import (
    ApplyError,
    PlansOutdated,
    RacedWithLocalWrite,
    TableDropped,
    TargetProblem,
    first_line,
    is_data_problem,
)
from pgconcord.apply.fallback import apply_one_by_one, hold_followers
from pgconcord.apply.pair import PairState
from pgconcord.apply.plan import TablePlan
from pgconcord.apply.position import (
    IDLE_ADVANCE_SECONDS,
    POSITION_QUERY,
    Position,
    Superseded,
    advance,
    advance_idle,
    check_position,
    finish_empty_window,
    position_of,
)
from pgconcord.apply.setwise import (
    apply_window_table,
    describe_target_problem,
)
from pgconcord.apply.stage import (
    HORIZONS_QUERY,
    Staged,
    cut_pieces,
    horizons_of,
    open_target,
    piece_selection,
    stage_in_turn,
)
from pgconcord.apply.steady import apply_pipelined, can_pipeline
from pgconcord.config import NodeConfig
from pgconcord.errors import NodeUnavailable
from pgconcord.transport import (
    Horizon,
    Poll,
    Window,
    describe_lost_session,
    erring_node,
    lost_session,
)
from pgconcord.transport.postgres import PostgresOrigin

log = logging.getLogger(__name__)

Connection = psycopg.Connection[tuple[object, ...]]

DEFAULT_PIECE_ROWS = 50_000
_TURN_LOCK_CLASS = 0x70676331  # advisory lock class of "applying this origin here"
# Whether the target captures from the WAL (PairState.wal_target), read with every turn: setup
# may move it between the modes while the agent runs.
_CAPTURES_FROM_WAL = (
    "SELECT EXISTS (SELECT 1 FROM pgconcord.capture_state WHERE slot_name IS NOT NULL)"
)


@dataclass(frozen=True)
class _Turn:
    """What taking a pair's turn read (Puller._take_turn)."""

    position: Position
    horizons: list[Horizon]


class _StepByStep(Exception):
    """The pipelined apply of a window met an error: the window is applied again step by
    step (its stage went with the rolled-back transaction)."""


@dataclass
class PullResult:
    origin: str
    target: str
    changes: int = 0
    transactions: int = 0
    conflicts: int = 0
    # Whether the pull asked the target anything (an idle poll asks only the origin): only
    # then does its success say the target is reachable.
    reached_target: bool = False


class Puller:
    """Moves one origin's changes into one target. Not thread-safe: one per thread."""

    def __init__(
        self,
        origin: NodeConfig,
        target: NodeConfig,
        *,
        piece_rows: int = DEFAULT_PIECE_ROWS,
        settled: bool = True,
    ) -> None:
        self.origin = origin
        self.target = target
        self.piece_rows = piece_rows
        # Whether a window holds everything the origin had captured when the pull began
        # (sync, part), or is the first one a look finds (the agent: transport.postgres.poll).
        self.settled = settled
        # Parked changes waiting, plans, rows waiting for their parents (see PairState).
        self._pair = PairState(origin.name, target.name)
        self._source = PostgresOrigin(origin)  # the origin, through its transport
        self._target_connection: Connection | None = None
        # The position as this puller last read or wrote it: an idle poll compares the origin
        # with it, at no round trip here (_look). Forgotten whenever it may be wrong.
        self._position: Position | None = None
        self._idle_advanced_at = 0.0
        self._turn_held = False  # the turn as a session lock (_hold_turn)
        # The target's catalog fingerprint when the window's plans were made (_pull_window).
        self._planned_fingerprint: int | None = None
        # Whether the step-by-step way may have indexed the stage since it was last emptied.
        self._stage_indexed = True
        # The last window's pipelined apply gave up: apply the next one step by step.
        self._step_by_step = False

    # -- connections ---------------------------------------------------------------------

    def _target(self) -> Connection:
        if self._target_connection is None or self._target_connection.closed:
            self._target_connection = open_target(self.target)
        return self._target_connection

    def close(self) -> None:
        self._source.close()
        if self._target_connection is not None and not self._target_connection.closed:
            self._target_connection.close()
        self._target_connection = None
        self._position = None
        self._turn_held = False

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
                polled = self._look()
                if polled is not None and not polled.has_changes:
                    break
                turn = self._take_turn(wait=wait_for_turn)
                result.reached_target = True
                if turn is None:
                    break
                try:
                    applied = self._pull_window(result, turn, polled, should_stop, on_progress)
                except Superseded:
                    self._position = None
                    log.debug(
                        "%s -> %s: position moved by another process",
                        self.origin.name,
                        self.target.name,
                    )
                    continue
                except (pg_errors.DeadlockDetected, RacedWithLocalWrite, PlansOutdated) as again:
                    self._rollback()
                    self._position = None
                    if isinstance(again, RacedWithLocalWrite):
                        self._pair.raced()
                    if isinstance(again, PlansOutdated):
                        self._pair.plans.forget()
                    log.debug(
                        "%s -> %s: window taken again (%s)",
                        self.origin.name,
                        self.target.name,
                        type(again).__name__,
                    )
                    continue
                except _StepByStep:
                    # The pipelined apply met something it leaves to the step-by-step way,
                    # which stages the window again and says what went wrong.
                    self._rollback()
                    self._step_by_step = True
                    log.debug(
                        "%s -> %s: window taken again, step by step",
                        self.origin.name,
                        self.target.name,
                    )
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
                self.origin.name: self._source.session,
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

    def _look(self) -> Poll | None:
        """Whether the origin has changes newer than the position this puller last knew: one
        statement at the origin and none here, the idle poll of a quiet pair. None when it
        knows no position, or one in the middle of a window. On the way, an idle pair's
        position moves to the origin's snapshot now and then (advance_idle), so that the
        origin can purge its log."""
        known = self._position
        if known is None or known.window_snapshot is not None:
            return None
        polled = self._source.poll(known.applied_snapshot, settled=self.settled)
        if not polled.has_changes:
            self._advance_idle(known, polled)
        return polled

    def _advance_idle(self, known: Position, polled: Poll) -> None:
        if time.monotonic() - self._idle_advanced_at < IDLE_ADVANCE_SECONDS:
            return
        # Also what makes an asynchronous commit that WAL capture has not seen yet (its WAL
        # not flushed) durable at the origin, whose next look then captures it.
        self._source.make_durable(polled)
        if not polled.holds_applied:
            # Moving would free nothing, and its commit here would wake this node's own
            # pullers, whose idle advances wake the next: an idle cluster would never rest.
            self._idle_advanced_at = time.monotonic()
            return
        if advance_idle(self._target(), self.origin.name, known, polled.snapshot):
            self._position = Position(polled.snapshot, None, None)
        else:  # moved by someone else, or recently: read it again next time
            self._position = None
        self._idle_advanced_at = time.monotonic()

    def _take_turn(self, *, wait: bool) -> _Turn | None:
        """One process at a time applies a pair (the position check keeps it correct anyway;
        the lock saves the others from staging the same window for nothing). The turn is a
        transaction lock, in a transaction that stays open for staging, with the position
        locked, the copy horizons, whether the target captures from the WAL and an empty
        stage, all in one round trip: a window applied in that transaction (the steady state)
        commits and ends the turn at once. A window that takes several transactions holds the
        turn as a session lock as well (_hold_turn)."""
        target = self._target()
        lock = "pg_advisory_xact_lock" if wait else "pg_try_advisory_xact_lock"
        with target.pipeline():
            taken = target.execute(f"SELECT {lock}(%s, hashtext(%s))", self._turn_key())
            position = target.execute(POSITION_QUERY + " FOR UPDATE", (self.origin.name,))
            horizons = target.execute(HORIZONS_QUERY, (self.origin.name,))
            captures = target.execute(_CAPTURES_FROM_WAL)
            target.execute("TRUNCATE pgconcord_stage")
            if self._stage_indexed:
                # Indexes the step-by-step way built on the stage (cut_pieces, fallback).
                target.execute("DROP INDEX IF EXISTS pgconcord_stage_order")
                target.execute("DROP INDEX IF EXISTS pgconcord_stage_id")
        row = taken.fetchone()
        if not wait and not (row and row[0]):
            target.rollback()
            return None
        wal = captures.fetchone()
        self._pair.wal_target = bool(wal and wal[0])
        drains_on(target, self.target if self._pair.wal_target else None)
        return _Turn(
            position_of(position.fetchone(), self.origin.name, self.target.name),
            horizons_of(horizons.fetchall()),
        )

    def _hold_turn(self) -> None:
        """Keep the turn beyond the current transaction (it holds the transaction lock, so
        the session lock is granted at once), until _end_turn."""
        if not self._turn_held:
            self._target().execute("SELECT pg_advisory_lock(%s, hashtext(%s))", self._turn_key())
            self._turn_held = True

    def _end_turn(self) -> None:
        target = self._target_connection
        if target is None or target.broken or target.closed:
            return
        if target.info.transaction_status != pq.TransactionStatus.IDLE:
            target.rollback()
        if self._turn_held:
            self._turn_held = False
            with target.pipeline():
                target.execute("SELECT pg_advisory_unlock(%s, hashtext(%s))", self._turn_key())
                target.commit()

    def _rollback(self) -> None:
        # The origin's session runs in autocommit: it never holds a transaction.
        target = self._target_connection
        if target is not None and not target.closed:
            target.rollback()

    def _pull_window(
        self,
        result: PullResult,
        turn: _Turn,
        polled: Poll | None,
        should_stop: Callable[[], bool],
        on_progress: Callable[[PullResult], None],
    ) -> Literal["fresh", "resumed"] | None:
        """Apply one window: a fresh one, or one another run had begun; None when there was
        nothing to apply. Runs in the turn's transaction (_take_turn)."""
        origin, target = self._source, self._target()
        position = self._position = turn.position
        if position.window_snapshot is None:
            if polled is None or polled.applied_snapshot != position.applied_snapshot:
                polled = origin.poll(position.applied_snapshot, settled=self.settled)
            if not polled.has_changes:
                target.rollback()
                self._advance_idle(position, polled)
                return None
            window = Window(position.applied_snapshot, polled.snapshot, 0)
        else:
            polled = None  # a window begun earlier was made durable when it was first staged
            window = Window(
                position.applied_snapshot, position.window_snapshot, position.window_done or 0
            )
        staged = stage_in_turn(
            self._source,
            self._target(),
            self._pair,
            window,
            turn.horizons,
            fresh=polled is not None,
        )
        log.debug(
            "%s -> %s: %s window of %d changes staged",
            self.origin.name,
            self.target.name,
            "a new" if polled is not None else "an unfinished",
            staged.changes,
        )
        # A window with schema changes is applied with the columns its rows carry (schema.py).
        plans = None
        if not staged.schema_changes:
            origin_fingerprint = (
                polled.fingerprint
                if polled is not None and polled.fingerprint is not None
                else origin.fingerprint()
            )
            plans = self._pair.plans.for_known(
                origin, target, staged.carried, (origin_fingerprint, staged.fingerprint)
            )
            self._planned_fingerprint = staged.fingerprint
        if polled is not None:
            origin.make_durable(polled)
        if (
            plans is not None
            and not self._step_by_step
            and staged.changes <= self.piece_rows
            and can_pipeline(self._pair, plans, staged.changes)
        ):
            return self._apply_steady(result, position, window, plans, staged, on_progress)
        self._step_by_step = False
        # Several transactions: the stage is committed, and the turn held until the end.
        self._hold_turn()
        self._stage_indexed = True
        target.commit()
        if staged.schema_changes:
            pieces = schema.pieces(target, window.done, self.piece_rows)
            target.commit()
        elif staged.changes > self.piece_rows:
            pieces = cut_pieces(target, window.done, self.piece_rows, many=True)
        elif staged.changes:
            pieces = [
                schema.Piece(
                    window.done, staged.last_order, staged.changes, staged.transactions, False
                )
            ]
        else:
            pieces = []
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
            self._idle_advanced_at = time.monotonic()
            done = piece.last
            self._position = (
                Position(window.window_snapshot, None, None)
                if final
                else Position(window.applied_snapshot, window.window_snapshot, done)
            )
            result.changes += piece.rows
            result.transactions += piece.transactions
            result.conflicts += conflicts
            on_progress(result)
        if not pieces:
            finish_empty_window(target, self.origin.name, self.target.name, position, window)
            self._position = Position(window.window_snapshot, None, None)
        return "fresh" if position.window_snapshot is None else "resumed"

    def _apply_steady(
        self,
        result: PullResult,
        position: Position,
        window: Window,
        plans: dict[tuple[str, str], TablePlan],
        staged: Staged,
        on_progress: Callable[[PullResult], None],
    ) -> Literal["fresh", "resumed"]:
        """Apply the whole staged window in the turn's transaction, pipelined (steady.py)."""
        target = self._target()
        try:
            conflicts, self._position = apply_pipelined(
                self._pair, target, plans, window, window.done, staged.last_order
            )
        except psycopg.DatabaseError as error:
            if target.broken:
                raise
            raise _StepByStep from error
        self._stage_indexed = False  # dropped by the turn, and that is committed now
        self._idle_advanced_at = time.monotonic()  # the position has just moved
        result.changes += staged.changes
        result.transactions += staged.transactions
        result.conflicts += conflicts
        on_progress(result)
        return "fresh" if position.window_snapshot is None else "resumed"

    def _apply_window_piece(
        self,
        target: Connection,
        piece: schema.Piece,
        plans: dict[tuple[str, str], TablePlan] | None,
        expected: Position,
        window: Window,
        final: bool,
    ) -> int:
        """Apply one piece: set-wise, or change by change when it holds a schema change."""
        selection = piece_selection(piece.after, piece.last)
        try:
            if piece.schema:
                self._pair.plans.forget_carried()
                conflicts = apply_one_by_one(
                    self._pair,
                    target,
                    self._plan_of_change,
                    expected,
                    window,
                    selection,
                    piece.after,
                    piece.last,
                    final,
                )
                self._pair.plans.forget()
                return conflicts
            if plans is None:
                self._planned_fingerprint = catalog.fingerprint(target)
                plans = self._pair.plans.for_selection(self._source, target, selection)
                target.commit()
            return self._apply_piece(
                target, plans, expected, window, piece.after, piece.last, final
            )
        except TargetProblem as problem:
            # The plans are made again next time: the table may have changed meanwhile.
            self._pair.plans.forget()
            raise describe_target_problem(
                self._target(), problem, self.origin.name, self.target.name
            ) from None

    def _plan_of_change(self, schema_name: str, table_name: str, change_id: int) -> TablePlan:
        """The plan of one change in a piece with a schema change (cached until the next)."""
        return self._pair.plans.for_change(
            self._source, self._target(), schema_name, table_name, change_id
        )

    def _apply_piece(
        self,
        target: Connection,
        plans: dict[tuple[str, str], TablePlan],
        expected: Position,
        window: Window,
        after: int,
        last_order: int,
        final: bool,
    ) -> int:
        pair = self._pair
        piece = piece_selection(after, last_order)
        try:
            with target.transaction():
                check_position(target, pair.origin, pair.target, expected)
                stamp_local_changes(target)
                hold_followers(pair, target, piece)
                conflicts = sum(
                    apply_window_table(
                        target,
                        plan,
                        pair.origin,
                        piece,
                        pair.parked_waiting,
                        pair.parents,
                        pair.lock_rows,
                    )
                    for plan in plans.values()
                )
                conflicts += pair.parents.record_missing(target, pair.origin, last_order, final)
                advance(target, pair.origin, window, after, last_order, final)
            return conflicts
        except psycopg.DatabaseError as error:
            if not is_data_problem(error):
                raise
            # Another pull may have changed the table here since the plans were made (its
            # schema change waited for no one): planned again, the piece may well apply.
            now = catalog.fingerprint(target)
            target.rollback()  # the look's own transaction: the way below begins its own
            if now != self._planned_fingerprint:
                raise PlansOutdated(first_line(error)) from error
        except (resolver.Parked, TableDropped):
            pass
        # Some change cannot be applied (or the user's resolver asked to park one), or the
        # set-wise apply lost the order between rows (a unique value moved from one row to
        # another inside the piece): go change by change, parking those that fail, so that
        # the stream goes on.
        return apply_one_by_one(
            pair,
            target,
            lambda schema_name, table_name, _change: plans[(schema_name, table_name)],
            expected,
            window,
            piece,
            after,
            last_order,
            final,
        )
