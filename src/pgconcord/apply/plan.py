"""How to apply each table's changes on this target (TablePlan): the columns the staged rows
carry, checked against the origin's table and the target's, with the table's counters, its
resolver and its foreign keys; and the pair's cache of plans, kept while neither node's catalog
changed."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import psycopg
from psycopg import sql

from pgconcord import catalog
from pgconcord.apply import parking
from pgconcord.catalog import Table
from pgconcord.errors import SchemaError
from pgconcord.history.trail import audited_tables
from pgconcord.transport import Origin

log = logging.getLogger(__name__)

Connection = psycopg.Connection[tuple[object, ...]]


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
    audited: bool = False  # what the apply does with each change is recorded (row history)


def carried_columns(
    target: Connection, selection: sql.Composable
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
    return columns_of(rows)


def columns_of(rows: Sequence[tuple[object, ...]]) -> dict[tuple[str, str], frozenset[str]]:
    """carried_columns from the rows of its query (schema, table, columns)."""
    return {
        (str(schema_name), str(table_name)): frozenset(
            str(column) for column in (columns if isinstance(columns, list) else [])
        )
        for schema_name, table_name, columns in rows
    }


def build_plans(
    origin: Origin,
    target: Connection,
    carried: dict[tuple[str, str], frozenset[str]],
    origin_name: str,
    target_name: str,
) -> dict[tuple[str, str], TablePlan]:
    """Plans for the tables of carried (with the columns their rows carry), checked against
    both nodes' tables as they are now."""
    names = set(carried)
    at_origin = origin.tables(names)
    registered = catalog.registered_tables(target)
    counters = catalog.delta_columns_of(target)
    resolvers = catalog.resolvers_of(target)
    audited = audited_tables(target)
    at_target = {
        (t.schema, t.name): t
        for t in catalog.discover_tables(target, sorted({s for s, _ in names}), set())
    }
    plans = {}
    waiting = parking.schema_change_waiting(target, origin_name)
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
                f"table {qualified}: changes from {origin_name} cannot be applied on"
                f" {target_name}: the table is missing there"
                + ("" if destination is None else " from replication (run pgconcord setup)")
            )
        if source is not None and source.key_columns != destination.key_columns:
            raise SchemaError(
                f"table {qualified}: primary key differs between {origin_name}"
                f" ({', '.join(source.key_columns)}) and {target_name}"
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
                    f"table {qualified}: column {column} exists on {origin_name}"
                    f" but not on {target_name}; its changes wait until it exists"
                    " there"
                )
            # Dropped (or renamed) at the origin since: the value goes with the column.
            log.warning(
                "%s -> %s: %s: value of column %s dropped (the column no longer exists)",
                origin_name,
                target_name,
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
            audited=name in audited,
        )
    return plans


class PlanCache:
    """The plans of one pair (origin -> target), made again only when something changed."""

    def __init__(self, origin_name: str, target_name: str) -> None:
        self.origin_name = origin_name
        self.target_name = target_name
        # Table checks are kept while neither node's catalog changed (see catalog.fingerprint).
        self._plans: dict[tuple[str, str], TablePlan] = {}
        self._key: object = None
        # Plans of single changes around a schema change, by table and carried columns.
        self._carried: dict[tuple[str, str, tuple[str, ...]], TablePlan] = {}

    def forget(self) -> None:
        """Make the window's plans again next time (a table may have changed meanwhile)."""
        self._plans, self._key = {}, None

    def forget_carried(self) -> None:
        """Make the plans of single changes again (a schema change ran)."""
        self._carried.clear()

    def for_known(
        self,
        origin: Origin,
        target: Connection,
        carried: dict[tuple[str, str], frozenset[str]],
        fingerprints: tuple[int, int],
    ) -> dict[tuple[str, str], TablePlan]:
        """Plans for the staged window, whose tables carry these columns, checked against both
        nodes' tables (kept while neither catalog changed, by their fingerprints, and the rows
        carry the same columns)."""
        if not carried:
            return {}
        key = (fingerprints, frozenset(carried.items()))
        if key == self._key:
            return dict(self._plans)
        plans = build_plans(origin, target, carried, self.origin_name, self.target_name)
        self._plans, self._key = plans, key
        return plans

    def for_selection(
        self,
        origin: Origin,
        target: Connection,
        selection: sql.Composable,
    ) -> dict[tuple[str, str], TablePlan]:
        """Plans for some staged changes of a window with schema changes (after the origin's
        window transaction ended)."""
        carried = carried_columns(target, selection)
        if not carried:
            return {}
        return build_plans(origin, target, carried, self.origin_name, self.target_name)

    def for_change(
        self,
        origin: Origin,
        target: Connection,
        schema_name: str,
        table_name: str,
        change_id: int,
    ) -> TablePlan:
        """The plan of one change in a piece with a schema change (cached until the next)."""
        selection = sql.SQL("s.id = {}").format(sql.Literal(change_id))
        carried = carried_columns(target, selection)
        key = (schema_name, table_name, tuple(sorted(carried.get((schema_name, table_name), ()))))
        if key not in self._carried:
            self._carried[key] = self.for_selection(origin, target, selection)[
                (schema_name, table_name)
            ]
        return self._carried[key]
