"""Change by change, when a piece cannot be applied set-wise (a change cannot be applied here,
the user's resolver asked to park one, or the set-wise apply lost the order between rows) and
for a piece that holds a schema change. A source transaction is applied whole or not at all:
one with a change that cannot be applied here is parked whole with its reason (parking.py), and
so is every later transaction that touches one of its rows, so that the stream goes on."""

from __future__ import annotations

import logging
from collections.abc import Callable

import psycopg
from psycopg import errors as pg_errors
from psycopg import sql

from pgconcord import conflict, resolver, schema
from pgconcord.apply import parking
from pgconcord.apply.draining import stamp_local_changes
from pgconcord.apply.errors import (
    TableDropped,
    TargetProblem,
    first_line,
    is_data_problem,
    is_target_problem,
)
from pgconcord.apply.pair import PairState
from pgconcord.apply.plan import TablePlan
from pgconcord.apply.position import Position, advance, check_position
from pgconcord.apply.setwise import apply_window_table
from pgconcord.transport import Window

log = logging.getLogger(__name__)

Connection = psycopg.Connection[tuple[object, ...]]

MAX_FAILURES_ONE_BY_ONE = 100


class _ChangeFailed(Exception):
    """A change of a source transaction cannot be applied here (the reason is in the text)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def hold_followers(pair: PairState, target: Connection, selection: sql.Composable) -> int:
    """Park, whole, the selected source transactions that touch a row with a parked
    change (parking.hold_followers); how many changes that parked."""
    if not pair.parked_waiting:
        return 0
    held = parking.hold_followers(target, pair.origin, selection)
    if held:
        log.warning(
            "%s -> %s: parked %d changes whose source transactions wait behind earlier"
            " parked changes",
            pair.origin,
            pair.target,
            held,
        )
    return held


def apply_one_by_one(
    pair: PairState,
    target: Connection,
    plan_for: Callable[[str, str, int], TablePlan],
    expected: Position,
    window: Window,
    piece: sql.Composable,
    after: int,
    last_order: int,
    final: bool,
) -> int:
    """Apply the piece's source transactions (ordered after `after` up to last_order, which
    the selection piece picks) one at a time, change by change, parking those
    that fail, and move the position past the piece; the number of conflicts."""
    conflicts = 0
    with target.transaction():
        check_position(target, pair.origin, pair.target, expected)
        # Before any savepoint: the stamp lock stays held through their rollbacks.
        stamp_local_changes(target)
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
        locked_ahead = pair.lock_rows and _lock_rows_ahead(
            target, plan_for, piece, [change for each in transactions.values() for change in each]
        )
        failures = 0
        orders = list(transactions)
        for index, order in enumerate(orders):
            # A transaction that touches a row with a parked change waits whole.
            this_one = sql.SQL("s.transaction_order = {}").format(sql.Literal(order))
            if hold_followers(pair, target, this_one):
                continue
            try:
                conflicts += _apply_transaction(
                    pair, target, plan_for, transactions[order], locked_ahead
                )
                continue
            except _ChangeFailed as failed:
                reason = failed.reason
            # A source transaction is applied whole or not at all: park all of it.
            parking.park(
                target,
                pair.origin,
                sql.SQL("s.transaction_order = {}").format(sql.Literal(order)),
                reason,
            )
            pair.parked_waiting = True
            failures += 1
            log.warning(
                "%s -> %s: parked a transaction of %d changes: %s",
                pair.origin,
                pair.target,
                len(transactions[order]),
                reason,
            )
            rest = orders[index + 1 :]
            if failures >= MAX_FAILURES_ONE_BY_ONE and rest:
                # Savepoints slow down as they pile up in one transaction; after this many
                # failures the rest of the piece is parked as it is, in order, for
                # `pgconcord conflicts retry`.
                parking.park(
                    target,
                    pair.origin,
                    sql.SQL("s.transaction_order = ANY({})").format(sql.Literal(rest)),
                    f"parked unapplied after {failures} failures in one batch ({reason})",
                )
                log.warning(
                    "%s -> %s: parked %d more transactions after %d failures",
                    pair.origin,
                    pair.target,
                    len(rest),
                    failures,
                )
                break
        conflicts += pair.parents.record_missing(target, pair.origin, last_order, final)
        advance(target, pair.origin, window, after, last_order, final)
    return conflicts


def _lock_rows_ahead(
    target: Connection,
    plan_for: Callable[[str, str, int], TablePlan],
    piece: sql.Composable,
    changes: list[tuple[int, str | None, str | None]],
) -> bool:
    """Lock the piece's rows that are here and stamp once more, before any is judged
    (setwise.RACED_LOCAL_WRITE), rather than once per change: on a node in WAL mode each
    stamp waits for the node's WAL to be read. False, with the changes then locking their
    rows one by one, for a piece with a schema change (its tables change on the way)."""
    first: dict[tuple[str, str], int] = {}
    for change_id, schema_name, table_name in changes:
        if schema_name is None or table_name is None:
            return False
        first.setdefault((schema_name, table_name), change_id)
    for (schema_name, table_name), change_id in first.items():
        plan = plan_for(schema_name, table_name, change_id)
        if plan.dropped or plan.held is not None or not plan.table.key_columns:
            continue
        statements = conflict.table_statements(
            plan.table, plan.columns, plan.delta_columns, plan.audited
        )
        target.execute(statements.lock_rows(piece), {"schema": schema_name, "table": table_name})
    stamp_local_changes(target)
    return True


def _apply_transaction(
    pair: PairState,
    target: Connection,
    plan_for: Callable[[str, str, int], TablePlan],
    changes: list[tuple[int, str | None, str | None]],
    locked_ahead: bool,
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
                    pair.plans.forget_carried()
                    continue
                plan = plan_for(schema_name, table_name, change_id)
                conflicts += _apply_change(pair, target, plan, change_id, locked_ahead)
            except psycopg.DatabaseError as error:
                if plan is not None and is_target_problem(error):
                    # This node refuses the agent, or the table went: waits, not parked.
                    raise TargetProblem(error, plan) from error
                # A schema change runs as the role that made it (schema.run_statement): a
                # right that role lacks here, or an object missing here, parks it, and the
                # stream goes on (as a missing role does).
                if not (is_data_problem(error) or (plan is None and is_target_problem(error))):
                    raise
                raise _ChangeFailed(f"{what}: {first_line(error)}") from error
            except (resolver.Parked, TableDropped, schema.RoleMissing) as not_applied:
                raise _ChangeFailed(f"{what}: {not_applied}") from None
    return conflicts


def _apply_change(
    pair: PairState, target: Connection, plan: TablePlan, change_id: int, locked_ahead: bool
) -> int:
    """Apply one staged change under a savepoint; the number of conflicts. A collision on
    a unique constraint other than the key is resolved; other failures are raised. With
    locked_ahead the piece's rows are locked already (_lock_rows_ahead)."""
    selection = sql.SQL("s.id = {}").format(sql.Literal(change_id))
    lock_rows = pair.lock_rows and not locked_ahead
    # Transactions that wait behind a parked change were left out whole before (see
    # apply_one_by_one): nothing to hold here.
    try:
        with target.transaction():
            return apply_window_table(
                target, plan, pair.origin, selection, False, pair.parents, lock_rows, locked_ahead
            )
    except pg_errors.UniqueViolation:
        with target.transaction():
            # The local holders' versions must be stamped before they are judged (the
            # savepoint rolled back what the apply had stamped).
            stamp_local_changes(target)
            apply_now = conflict.resolve_unique_collision(
                target, plan.table, plan.table_id, pair.origin, change_id
            )
            if apply_now is None:
                raise
            if not apply_now:
                return 1
            return 1 + apply_window_table(
                target, plan, pair.origin, selection, False, pair.parents, lock_rows, locked_ahead
            )
