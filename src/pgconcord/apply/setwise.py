"""The set-wise apply of one table's staged changes (apply_table), the one apply both the pull
and the retry of parked changes use: the last change of each row wins over earlier ones of the
same origin, and each row's version (hybrid clock, origin) decides against the local version
(conflict.py). And when this node refuses the agent a table, the error of the pair: its node,
its table and the right the agent's role lacks."""

from __future__ import annotations

import psycopg
from psycopg import errors as pg_errors
from psycopg import sql

from pgconcord import conflict, resolver
from pgconcord.apply.draining import stamp_local_changes
from pgconcord.apply.errors import (
    ApplyError,
    RacedWithLocalWrite,
    TableDropped,
    TargetProblem,
    first_line,
    is_target_problem,
)
from pgconcord.apply.parents import ParentCheck
from pgconcord.apply.plan import TablePlan

Connection = psycopg.Connection[tuple[object, ...]]

# This node's own changes are stamped (stamp_captured.sql) before its rows are judged: a row's
# version must say what was last written to it here. The stamp lock is taken even when there
# is nothing to stamp and held until the applying transaction ends: a stamper reads row
# versions without locking them, trusting that nobody else writes them meanwhile. So it comes
# first in each applying transaction, before any savepoint (Puller._apply_piece,
# steady.apply_pipelined, fallback.apply_one_by_one, parked._retry_group); later calls stamp
# what committed since, if anything did (draining.stamp_local_changes).

# A local write that committed after the stamp and before the apply wrote its row is still
# captured, not stamped: the apply overwrote it without judging it. The piece is applied again
# (RacedWithLocalWrite), which stamps it first; and for a while the pair locks the rows that
# are here before it stamps for the last time and judges them (TableStatements.lock_rows), so
# that only a new row inserted meanwhile can race again.
#
# On a node in WAL mode this sees only what was drained, and draining once more here would
# wait again for the node's WAL to be read. Stamped later, such a write would carry the
# versions of the columns the apply wrote with the row as it was before them, and a node that
# got it first would keep the old values under the new versions. So a pair into a node in WAL
# mode always locks the rows first (PairState.lock_rows): a local write either committed
# before the lock, and the stamp after it waits for the node's WAL to be read that far
# (drain_wal.sql), or waits for the apply. (An asynchronous local commit whose WAL is not
# flushed yet can still race: README "Limits today".) A row that was not here to be locked
# can be inserted here meanwhile: the apply's upsert waits for that insert and then finds its
# row, which the upsert's answer tells (conflict.statements: pgconcord_absent), and the piece
# is applied again.

RACED_LOCAL_WRITE = """
SELECT EXISTS (SELECT 1 FROM pgconcord.captured_change q
                 JOIN pgconcord_winner w ON w.row_key = q.row_key
                WHERE q.table_id = %(table_id)s)
"""


def apply_table(
    target: Connection,
    plan: TablePlan,
    origin: str,
    selection: sql.Composable,
    parked_waiting: bool,
    lock_rows: bool = False,
    locked_ahead: bool = False,
) -> int:
    """Apply the staged changes the selection picks for one table; the number of conflicts.
    Runs inside the caller's transaction, which stamped this node's own changes first
    (draining.stamp_local_changes). With parked_waiting, the changes of transactions
    parking.hold_followers held are left out; with lock_rows, the rows here are locked before
    they are judged (RACED_LOCAL_WRITE); with locked_ahead, the caller locked them. Rows
    applied to a table with foreign keys are noted for ParentCheck.record_missing (parents.py)."""
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
    statements = conflict.table_statements(
        plan.table, plan.columns, plan.delta_columns, plan.audited
    )
    parameters = {
        "schema": plan.table.schema,
        "table": plan.table.name,
        "table_id": plan.table_id,
        "origin": origin,
    }
    # The caller's transaction stamped first; with the rows here locked, once more.
    if lock_rows:
        target.execute(statements.lock_rows(selection), parameters)
        stamp_local_changes(target)
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
    recorded = target.execute(statements.record(selection, parked_waiting), parameters).rowcount
    found_inserted = write_winners(target, plan, statements, parameters, lock_rows or locked_ahead)
    if verdicts is not None and verdicts.keep:
        resolver.write_kept_rows(target, plan.table, plan.columns, verdicts)
        resolver.mark_resolved(target, plan.table, verdicts)
    inserted = found_inserted.fetchone() if found_inserted is not None else None
    raced_local = target.execute(RACED_LOCAL_WRITE, parameters).fetchone()
    if (raced_local and raced_local[0]) or (inserted and inserted[0]):
        raise RacedWithLocalWrite(
            f"{plan.table.qualified_name}: a local write committed while its row was applied"
        )
    if filled.rowcount > 10_000:
        # A big piece: give the space back now rather than leave it for later DELETEs.
        target.execute("TRUNCATE pgconcord_decision, pgconcord_winner")
    return max(recorded, 0)


def write_winners(
    target: Connection,
    plan: TablePlan,
    statements: conflict.TableStatements,
    parameters: dict[str, object],
    rows_locked: bool,
) -> psycopg.Cursor[tuple[object, ...]] | None:
    """Write the rows chosen (pgconcord_winner) into the plan's table: the whole-row deletes
    and upserts, the column merges and the counter additions. With rows_locked (the apply
    locked the rows here before it judged them), the cursor counting the local inserts the
    upsert overwrote (conflict.statements: pgconcord_absent). Rows of a table with foreign
    keys are noted for the check of their parents, once the whole window is applied
    (ParentCheck.record_missing): a parent may come in a table applied after this one, or in
    a later transaction."""
    if rows_locked:
        target.execute("DELETE FROM pgconcord_absent")
        target.execute(statements.absent_rows, parameters)
    target.execute(statements.delete_rows, parameters)
    target.execute(statements.upsert_rows, parameters)
    inserted_over = target.execute(statements.inserted_over, parameters) if rows_locked else None
    if statements.merge_rows is not None:
        target.execute(statements.merge_rows, parameters)
    if statements.add_deltas is not None:
        target.execute(statements.add_deltas, parameters)
    if plan.foreign_keys:
        target.execute(conflict.CHILD_CANDIDATES, parameters)
    return inserted_over


def apply_window_table(
    target: Connection,
    plan: TablePlan,
    origin: str,
    selection: sql.Composable,
    held: bool,
    parents: ParentCheck,
    lock_rows: bool = False,
    locked_ahead: bool = False,
) -> int:
    """apply_table, noting the tables whose rows wait for the check of their parents, and
    telling a refusal of this node (a right, a table) from a change that cannot be applied."""
    parents.note(plan)
    try:
        return apply_table(target, plan, origin, selection, held, lock_rows, locked_ahead)
    except psycopg.DatabaseError as error:
        if is_target_problem(error):
            raise TargetProblem(error, plan) from error
        raise


def describe_target_problem(
    target: Connection, problem: TargetProblem, origin: str, target_name: str
) -> ApplyError:
    """The error of a pair this node refuses: its node, table and missing right. Called
    after the piece's transaction is rolled back."""
    target.rollback()
    table = problem.plan.table.qualified_name
    where = f"node {target_name}: table {table}"
    queued = f"changes from {origin} stay queued"
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
