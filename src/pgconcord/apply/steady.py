"""The steady state in few round trips: a piece of ordinary changes applied in one pipeline.

Under a steady write load almost every window is small, has no schema change, nothing parked
before it and no user resolver. For those the piece's statements (the position check, each
table's set-wise statements, the position's advance) go to the target in one pipeline and the
answers come back together: one round trip instead of one per statement. The statements keep
the same text from piece to piece (the piece's bounds are parameters), so the session prepares
them and the server plans each once. Anything unusual (an error, a conflict the pipeline cannot
settle, a big window) goes the step-by-step way (puller.Puller._apply_piece), which says what
went wrong and parks what must be parked.
"""

from __future__ import annotations

import psycopg
from psycopg import sql

from pgconcord import conflict
from pgconcord.apply.draining import STAMP_LOCAL_CHANGES, TAKE_STAMP_LOCK, flushing_when_stuck
from pgconcord.apply.errors import RacedWithLocalWrite
from pgconcord.apply.pair import PairState
from pgconcord.apply.plan import TablePlan
from pgconcord.apply.position import Position, advance, require_replica_mode
from pgconcord.apply.setwise import write_winners
from pgconcord.transport import Window

Connection = psycopg.Connection[tuple[object, ...]]

# A bigger piece goes step by step: its decision table is analyzed between the statements.
MAX_PIPELINED_ROWS = 10_000

# The piece's changes by their bounds as parameters (see apply_pipelined).
_SELECTION = sql.SQL("s.transaction_order > %(after)s AND s.transaction_order <= %(last)s")

# setwise.RACED_LOCAL_WRITE for every table of the piece at once, by the staged keys.
_RACED_IN_PIECE = """
SELECT EXISTS (SELECT 1 FROM pgconcord.captured_change q
                 JOIN pgconcord.replicated_table t ON t.id = q.table_id
                 JOIN pgconcord_stage s
                   ON s.schema_name = t.schema_name AND s.table_name = t.table_name
                  AND s.row_key = q.row_key
                WHERE s.transaction_order > %(after)s AND s.transaction_order <= %(last)s)
"""

# Composed statements by plan: composing them costs the agent more CPU than the rest of a
# small piece (the plans are kept while the catalogs do not change: plan.PlanCache).
_statements: dict[int, tuple[TablePlan, conflict.TableStatements]] = {}


def can_pipeline(pair: PairState, plans: dict[tuple[str, str], TablePlan], rows: int) -> bool:
    """Whether a piece of this many rows, with these plans, can be applied in one pipeline."""
    return (
        rows <= MAX_PIPELINED_ROWS
        and not pair.parked_waiting
        and all(
            plan.resolver is None and not plan.dropped and plan.held is None
            for plan in plans.values()
        )
    )


def apply_pipelined(
    pair: PairState,
    target: Connection,
    plans: dict[tuple[str, str], TablePlan],
    window: Window,
    after: int,
    last_order: int,
) -> tuple[int, Position]:
    """Apply the staged window's changes after `after` up to last_order, its last, and move
    the position past the window, in the caller's transaction (which locked the position:
    Puller._take_turn), whose statements are sent together; commits. The number of
    conflicts and the new position. RacedWithLocalWrite when a local write raced with a
    merge (the caller applies the window again). Other errors are raised as they come, with
    the transaction open for the caller to roll back."""
    bounds = {"after": after, "last": last_order}
    recorded: list[psycopg.Cursor[tuple[object, ...]]] = []
    raced: list[psycopg.Cursor[tuple[object, ...]]] = []
    # The stamps are in the pipeline: its sync is what waits for them.
    with flushing_when_stuck(target), target.pipeline():
        # Every applying transaction reads the mode it runs in (position.POSITION_QUERY).
        mode = target.execute("SELECT current_setting('session_replication_role')")
        # With lock_rows, every table's rows are locked first and stamped once after.
        target.execute(TAKE_STAMP_LOCK if pair.lock_rows else STAMP_LOCAL_CHANGES)
        keyed: list[tuple[TablePlan, conflict.TableStatements, dict[str, object]]] = []
        for plan in plans.values():
            pair.parents.note(plan)
            parameters: dict[str, object] = {
                "schema": plan.table.schema,
                "table": plan.table.name,
                "table_id": plan.table_id,
                "origin": pair.origin,
                **bounds,
            }
            if not plan.table.key_columns:
                target.execute(
                    conflict.insert_only_statement(plan.table, plan.columns, _SELECTION),
                    parameters,
                )
                continue
            statements = _statements_of(plan)
            keyed.append((plan, statements, parameters))
            if pair.lock_rows:
                target.execute(statements.lock_rows(_SELECTION), parameters)
        if pair.lock_rows:
            target.execute(STAMP_LOCAL_CHANGES)
        for plan, statements, parameters in keyed:
            target.execute("DELETE FROM pgconcord_decision")
            target.execute("DELETE FROM pgconcord_winner")
            target.execute(statements.decide(_SELECTION, False), parameters)
            raced.append(target.execute(statements.choose_winners, parameters))
            recorded.append(target.execute(statements.record(_SELECTION, False), parameters))
            inserted_over = write_winners(target, plan, statements, parameters, pair.lock_rows)
            if inserted_over is not None:
                raced.append(inserted_over)
        # One look for a local write that raced with the piece, for all its tables.
        raced.append(target.execute(_RACED_IN_PIECE, bounds))
        moved = advance(target, pair.origin, window, after, last_order, final=True)
    found = mode.fetchone()
    require_replica_mode(found[0] if found else None, pair.target)
    for cursor in raced:
        row = cursor.fetchone()
        if row and row[0]:
            raise RacedWithLocalWrite("a local write raced with the apply of its row")
    conflicts = sum(max(cursor.rowcount, 0) for cursor in recorded)
    conflicts += pair.parents.record_missing(target, pair.origin, last_order, True)
    target.commit()
    return conflicts, moved


def _statements_of(plan: TablePlan) -> conflict.TableStatements:
    kept = _statements.get(id(plan))
    if kept is not None and kept[0] is plan:
        return kept[1]
    if len(_statements) > 1_000:
        _statements.clear()
    statements = conflict.table_statements(
        plan.table, plan.columns, plan.delta_columns, plan.audited
    )
    _statements[id(plan)] = (plan, statements)
    return statements
