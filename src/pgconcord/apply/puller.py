"""The Puller: one pair's state machine (origin -> target). It takes the pair's turn, reads
the position, stages a window, cuts it in pieces and applies each piece in a transaction that
also moves the position; the steps are the package's other modules."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import psycopg
from psycopg import errors as pg_errors

from pgconcord import reader, resolver, schema
from pgconcord.apply import parking
from pgconcord.apply.errors import (
    ApplyError,
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
    Position,
    Superseded,
    advance,
    advance_idle,
    check_position,
    finish_empty_window,
    read_position,
)
from pgconcord.apply.setwise import apply_window_table, describe_target_problem
from pgconcord.apply.stage import cut_pieces, open_target, piece_selection, stage_window
from pgconcord.config import NodeConfig
from pgconcord.errors import NodeUnavailable
from pgconcord.transport import describe_lost_session, erring_node, lost_session

log = logging.getLogger(__name__)

Connection = psycopg.Connection[tuple[object, ...]]

DEFAULT_PIECE_ROWS = 50_000
_TURN_LOCK_CLASS = 0x70676331  # advisory lock class of "applying this origin here"


@dataclass
class PullResult:
    origin: str
    target: str
    changes: int = 0
    transactions: int = 0
    conflicts: int = 0


class Puller:
    """Moves one origin's changes into one target. Not thread-safe: one per thread."""

    def __init__(
        self, origin: NodeConfig, target: NodeConfig, *, piece_rows: int = DEFAULT_PIECE_ROWS
    ) -> None:
        self.origin = origin
        self.target = target
        self.piece_rows = piece_rows
        # Parked changes waiting, plans, rows waiting for their parents (see PairState).
        self._pair = PairState(origin.name, target.name)
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
        position = read_position(target, self.origin.name, self.target.name, lock=False)
        target.commit()
        if position.window_snapshot is None:
            snapshot = reader.begin_window(origin)
            window = reader.Window(position.applied_snapshot, snapshot, 0)
            if not reader.window_has_changes(origin, window):
                reader.make_durable(origin)
                origin.commit()
                advance_idle(target, self.origin.name, position, snapshot)
                return None
        else:
            window = reader.Window(
                position.applied_snapshot, position.window_snapshot, position.window_done or 0
            )
        staged, schema_changes = stage_window(origin, target, self.origin.name, window)
        # A window with schema changes is applied with the columns its rows carry (schema.py).
        plans = None if schema_changes else self._pair.plans.for_window(origin, target)
        self._pair.parents.schema_window = bool(schema_changes)
        if position.window_snapshot is None:
            # Rows of an earlier window not checked yet (it was left unfinished) are not ours.
            self._pair.parents.forget(target)
        self._pair.parked_waiting = parking.any_waiting(target, self.origin.name)
        reader.make_durable(origin)
        origin.commit()
        if schema_changes:
            pieces = schema.pieces(target, window.done, self.piece_rows)
            target.commit()
        else:
            pieces = cut_pieces(target, window.done, self.piece_rows, many=staged > self.piece_rows)
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
            finish_empty_window(target, self.origin.name, self.target.name, position, window)
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
                self._pair.plans.forget_carried()
                conflicts = apply_one_by_one(
                    self._pair,
                    target,
                    self._plan_of_change,
                    expected,
                    window,
                    selection,
                    piece.last,
                    final,
                )
                self._pair.plans.forget()
                return conflicts
            if plans is None:
                plans = self._pair.plans.for_selection(self._origin, target, selection)
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
            self._origin, self._target(), schema_name, table_name, change_id
        )

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
        pair = self._pair
        piece = piece_selection(after, last_order)
        try:
            with target.transaction():
                check_position(target, pair.origin, pair.target, expected)
                hold_followers(pair, target, piece)
                conflicts = sum(
                    apply_window_table(
                        target, plan, pair.origin, piece, pair.parked_waiting, pair.parents
                    )
                    for plan in plans.values()
                )
                conflicts += pair.parents.record_missing(target, pair.origin, last_order, final)
                advance(target, pair.origin, window, piece, last_order, final)
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
        return apply_one_by_one(
            pair,
            target,
            lambda schema_name, table_name, _change: plans[(schema_name, table_name)],
            expected,
            window,
            piece,
            last_order,
            final,
        )
