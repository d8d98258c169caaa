"""Rows whose parent is missing: the target session runs in replica mode, so its foreign keys
stay quiet while a window is applied; a row whose parent (by a foreign key) is still absent
once the window is applied is recorded as a conflict (parent_missing). The set-wise apply notes
the rows applied to a table with foreign keys in pgconcord_child (conflict.CHILD_CANDIDATES)."""

from __future__ import annotations

import psycopg

from pgconcord import catalog, conflict
from pgconcord.apply.errors import TargetProblem, is_target_problem
from pgconcord.apply.plan import TablePlan

Connection = psycopg.Connection[tuple[object, ...]]


class ParentCheck:
    """The rows of a window that wait for the check of their parents, by table."""

    def __init__(self) -> None:
        # Tables with foreign keys that had rows applied in this window: their foreign keys, for
        # record_missing (pgconcord_child says which rows wait for the check).
        self.child_plans: dict[tuple[str, str], TablePlan] = {}
        self.schema_window = False  # the window holds a schema change

    def note(self, plan: TablePlan) -> None:
        """Rows of the plan's table are applied in this window: check them later."""
        if plan.foreign_keys:
            self.child_plans[(plan.table.schema, plan.table.name)] = plan

    def forget(self, target: Connection) -> None:
        """Rows of an earlier window not checked yet (it was left unfinished) are not ours."""
        target.execute("DELETE FROM pgconcord_child")
        self.child_plans.clear()

    def record_missing(self, target: Connection, origin: str, last_order: int, final: bool) -> int:
        """Record the rows applied in this window whose parent (by a foreign key) is not here:
        at the end of the window, when every parent it brings has arrived whatever the order of
        tables and transactions, or at the end of an earlier piece for a table whose parents
        the rest of the window does not touch (a window cut in pieces is checked as it goes,
        so that an agent restarted halfway forgets as few rows as possible). The number of
        conflicts recorded. Runs inside the piece's transaction."""
        if not self.child_plans:
            return 0
        waiting = target.execute(
            "SELECT DISTINCT schema_name, table_name FROM pgconcord_child"
        ).fetchall()
        recorded = 0
        for schema_name, table_name in waiting:
            name = (str(schema_name), str(table_name))
            plan = self.child_plans.get(name)
            foreign_keys = plan.foreign_keys if plan is not None else ()
            if plan is not None and self.schema_window:
                # A schema change of this window may have added, dropped or changed keys.
                exists = target.execute(
                    "SELECT to_regclass(%s) IS NOT NULL",
                    (plan.table.identifier.as_string(target),),
                ).fetchone()
                foreign_keys = (
                    catalog.foreign_keys(target, plan.table) if exists and exists[0] else ()
                )
            if not final and foreign_keys and _parents_coming(target, foreign_keys, last_order):
                continue
            if plan is not None:
                for foreign_key in foreign_keys:
                    try:
                        checked = target.execute(
                            conflict.parent_missing_statement(plan.table, foreign_key),
                            {
                                "schema": name[0],
                                "table": name[1],
                                "origin": origin,
                                "columns": list(foreign_key.columns),
                            },
                        )
                    except psycopg.DatabaseError as error:
                        if is_target_problem(error):
                            raise TargetProblem(error, plan) from error
                        raise
                    recorded += max(checked.rowcount, 0)
            target.execute(
                "DELETE FROM pgconcord_child WHERE schema_name = %s AND table_name = %s", name
            )
        return recorded


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
