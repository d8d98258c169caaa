"""Changes that cannot be applied are parked with their reason instead of stalling the stream;
an operator retries them (after fixing the cause) or discards them, and the record stays.

A source transaction is parked whole, never in part: one that touches a row with a parked
change from the same origin waits behind it with all its changes (hold_followers), and the
rows it holds make later transactions wait in turn. Retried in order, a transaction at a time,
they are applied as the origin committed them."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql

# Module imports (not names) on both sides: apply parks changes, retry applies them again.
from pgconcord import apply, catalog, resolver, schema
from pgconcord.config import NodeConfig
from pgconcord.conflict import change_object
from pgconcord.errors import SchemaError

Connection = psycopg.Connection[tuple[object, ...]]

_STAGED_CHANGE = """
SELECT {origin}, coalesce(s.schema_name, ''), coalesce(s.table_name, ''), s.row_key,
       s.operation, s.clock, s.previous_clock, s.previous_origin, s.new_row, s.old_values,
       s.order_key, s.transaction_order, s.generation_clock, s.generation_origin,
       s.column_versions, {reason}
  FROM pgconcord_stage s
"""

_PARK = (
    """
INSERT INTO pgconcord.parked_change (origin, schema_name, table_name, row_key, operation, clock,
                                     previous_clock, previous_origin, new_row, old_values,
                                     order_key, transaction_order, generation_clock,
                                     generation_origin, column_versions, reason)
"""
    + _STAGED_CHANGE
    + " WHERE {selection} ORDER BY s.transaction_order, s.id"
)

# Source transactions of the selection that follow a parked change: one that touches a row
# with a change parked before this step, or held by this step for an earlier transaction. They
# are parked whole (all of their changes, whatever rows they touch) and recorded in
# pgconcord_held, so that the set-wise apply leaves them out (conflict._NOT_HELD). One
# statement takes one link of a chain; hold_followers repeats it until nothing more follows.
_HOLD_FOLLOWERS = (
    """
WITH followers AS MATERIALIZED (
    SELECT DISTINCT ON (s.transaction_order) s.transaction_order,
           s.schema_name || '.' || s.table_name || ' ' || s.row_key::text AS blocked_row
      FROM pgconcord_stage s
     WHERE ({selection}) AND s.schema_name IS NOT NULL
       AND NOT EXISTS (SELECT 1 FROM pgconcord_held h
                        WHERE h.transaction_order = s.transaction_order)
       AND EXISTS (SELECT 1 FROM pgconcord.parked_change p
                    WHERE p.state = 'parked' AND p.origin = %(origin)s
                      AND p.schema_name = s.schema_name AND p.table_name = s.table_name
                      AND p.row_key = s.row_key
                      AND (p.transaction_order < s.transaction_order
                           OR p.transaction_order IS NULL
                           OR NOT EXISTS (SELECT 1 FROM pgconcord_held h
                                           WHERE h.transaction_order = p.transaction_order)))
     ORDER BY s.transaction_order, s.id),
held AS (INSERT INTO pgconcord_held SELECT transaction_order FROM followers)
INSERT INTO pgconcord.parked_change (origin, schema_name, table_name, row_key, operation, clock,
                                     previous_clock, previous_origin, new_row, old_values,
                                     order_key, transaction_order, generation_clock,
                                     generation_origin, column_versions, reason)
"""
    + _STAGED_CHANGE
    + """
  JOIN followers f ON f.transaction_order = s.transaction_order
 ORDER BY s.transaction_order, s.id
"""
)


def park(target: Connection, origin: str, selection: sql.Composable, reason: str) -> None:
    """Park the staged changes the selection picks, in the caller's transaction."""
    target.execute(
        sql.SQL(_PARK).format(
            origin=sql.Literal(origin), reason=sql.Literal(reason), selection=selection
        )
    )


def hold_followers(target: Connection, origin: str, selection: sql.Composable) -> int:
    """Park whole every source transaction of the selection that must wait behind a parked
    change of the same origin, transitively: a transaction that touches a row with a parked
    change waits, with every row it touches, and so do later transactions that touch one of
    those rows. (A transaction ordered before a held one goes on: it came first at the origin.)
    The held transactions are listed in pgconcord_held for the rest of the caller's transaction;
    the number of changes parked. Runs inside the caller's transaction."""
    target.execute("DELETE FROM pgconcord_held")
    statement = sql.SQL(_HOLD_FOLLOWERS).format(
        origin=sql.SQL("%(origin)s"),
        reason=sql.SQL("'waits for an earlier parked change of ' || f.blocked_row"),
        selection=selection,
    )
    total = 0
    while True:
        parked = target.execute(statement, {"origin": origin}).rowcount
        if parked <= 0:
            return total
        total += parked


def schema_change_waiting(target: Connection, origin: str) -> int | None:
    """The id of the first parked schema change from the origin, if one waits here."""
    row = target.execute(
        "SELECT min(id) FROM pgconcord.parked_change"
        " WHERE state = 'parked' AND origin = %s AND operation = 'S'",
        (origin,),
    ).fetchone()
    return None if row is None or row[0] is None else int(str(row[0]))


def any_waiting(target: Connection, origin: str) -> bool:
    row = target.execute(
        "SELECT EXISTS (SELECT 1 FROM pgconcord.parked_change"
        " WHERE state = 'parked' AND origin = %s)",
        (origin,),
    ).fetchone()
    target.commit()
    return bool(row and row[0])


def list_parked(connection: Connection, node_name: str) -> list[dict[str, Any]]:
    """Every parked change of one node, resolved ones included, as JSON-ready objects."""
    records = []
    for row in connection.execute(
        "SELECT id, parked_at, origin, schema_name, table_name, row_key, operation::text,"
        " clock, new_row, reason, state, resolved_at FROM pgconcord.parked_change ORDER BY id"
    ):
        (
            identifier,
            parked_at,
            origin,
            schema,
            table,
            key,
            operation,
            clock,
            new_row,
            reason,
            state,
            resolved_at,
        ) = row
        records.append(
            {
                "kind": "parked",
                "node": node_name,
                "id": identifier,
                "ref": f"{node_name}:{identifier}",
                "detected_at": parked_at.isoformat() if isinstance(parked_at, datetime) else None,
                "table": f"{schema}.{table}",
                "key": key,
                "type": "apply_failed",
                "state": state,
                "reason": reason,
                "resolved_at": resolved_at.isoformat()
                if isinstance(resolved_at, datetime)
                else None,
                "incoming": change_object(clock, origin, operation, new_row),
            }
        )
    return records


@dataclass
class RetryReport:
    retried: list[int] = field(default_factory=list)
    still_parked: dict[int, str] = field(default_factory=dict)


def discard(connection: Connection, parked_id: int) -> bool:
    """Drop a parked change for good; its record stays, marked discarded."""
    with connection.transaction():
        updated = connection.execute(
            "UPDATE pgconcord.parked_change SET state = 'discarded', resolved_at = now()"
            " WHERE id = %s AND state = 'parked'",
            (parked_id,),
        ).rowcount
    return updated == 1


def retry_parked(node: NodeConfig, parked_id: int | None = None) -> RetryReport:
    """Apply parked changes again, oldest first (all of them, or the source transaction one
    belongs to), a source transaction at a time; those that fail again stay parked with the
    new reason."""
    report = RetryReport()
    target = apply.open_target(node)
    try:
        rows = target.execute(
            "SELECT id, origin, transaction_order FROM pgconcord.parked_change p"
            " WHERE state = 'parked' AND (%(id)s::bigint IS NULL OR id = %(id)s"
            "   OR (origin, transaction_order) = (SELECT origin, transaction_order"
            "        FROM pgconcord.parked_change WHERE id = %(id)s))"
            " ORDER BY id",
            {"id": parked_id},
        ).fetchall()
        target.commit()
        groups: list[list[int]] = []
        previous: tuple[object, object] | None = None
        for identifier, origin, transaction_order in rows:
            source = (origin, transaction_order)
            if groups and transaction_order is not None and source == previous:
                groups[-1].append(int(str(identifier)))
            else:
                groups.append([int(str(identifier))])
            previous = source
        for group in groups:
            reason = _retry_group(target, group)
            if reason is None:
                report.retried.extend(group)
            else:
                report.still_parked.update(dict.fromkeys(group, reason))
    finally:
        target.close()
    return report


def _retry_group(target: Connection, identifiers: list[int]) -> str | None:
    """Retry the parked changes of one source transaction together, in their own
    transaction; None on success, else the reason."""
    with target.transaction():
        rows = target.execute(
            "SELECT id, origin, schema_name, table_name, new_row,"
            " (SELECT min(earlier.id) FROM pgconcord.parked_change earlier"
            "   WHERE earlier.state = 'parked' AND earlier.id < p.id"
            "     AND NOT earlier.id = ANY (%(group)s)"
            "     AND earlier.origin = p.origin AND earlier.schema_name = p.schema_name"
            "     AND earlier.table_name = p.table_name AND earlier.row_key = p.row_key)"
            " FROM pgconcord.parked_change p WHERE id = ANY (%(group)s) AND state = 'parked'"
            " ORDER BY id FOR UPDATE",
            {"group": identifiers},
        ).fetchall()
        if len(rows) != len(identifiers):
            return "no longer parked"
        for row in rows:
            if row[5] is not None:
                return f"waits for parked change {row[5]} of the same row"
        target.execute(
            "UPDATE pgconcord.parked_change SET state = 'retried', resolved_at = now()"
            " WHERE id = ANY (%s)",
            (identifiers,),
        )
        target.execute("TRUNCATE pgconcord_stage")
        target.execute(
            "INSERT INTO pgconcord_stage SELECT 0, id, schema_name, table_name, operation,"
            " row_key, clock, previous_clock, previous_origin, new_row, old_values, order_key,"
            " generation_clock, generation_origin, column_versions"
            " FROM pgconcord.parked_change WHERE id = ANY (%s)",
            (identifiers,),
        )
        failing = ""
        try:
            with target.transaction():
                for identifier, origin, schema_name, name, new_row, _ in rows:
                    failing = f"{schema_name}.{name}"
                    if not schema_name:  # a schema change (schema.py)
                        failing = "schema change"
                        schema.run_statement(target, int(str(identifier)))
                        continue
                    plan = _plan_for_row(target, str(schema_name), str(name), new_row)
                    apply.apply_table(
                        target,
                        plan,
                        str(origin),
                        sql.SQL("s.id = {}").format(sql.Literal(int(str(identifier)))),
                        parked_waiting=False,
                    )
        except (psycopg.DatabaseError, SchemaError, resolver.Parked) as error:
            # A right the agent lacks here keeps them parked too, with that reason.
            if isinstance(error, psycopg.DatabaseError) and not (
                apply.is_data_problem(error) or apply.is_target_problem(error)
            ):
                raise
            reason = f"{failing}: {apply.first_line(error)}"
            target.execute(
                "UPDATE pgconcord.parked_change SET state = 'parked', resolved_at = NULL,"
                " reason = %s WHERE id = ANY (%s)",
                (reason, identifiers),
            )
            return reason
    return None


def _plan_for_row(target: Connection, schema: str, name: str, row: object) -> apply.TablePlan:
    """How to apply a parked row: the target's table, with the columns the row carries."""
    registered = catalog.registered_tables(target)
    tables = {t.name: t for t in catalog.discover_tables(target, [schema], set()) if t.name == name}
    if (schema, name) not in registered or name not in tables:
        raise SchemaError("table is missing on this node or not set up for replication")
    table = tables[name]
    stored = [c.name for c in table.stored_columns]
    carried = set(row) if isinstance(row, dict) else set(table.key_columns)
    generated = {c.name for c in table.columns if c.generated}
    unknown = sorted(carried - set(stored) - generated)
    if unknown:
        raise SchemaError(f"column {unknown[0]} does not exist on this node")
    return apply.TablePlan(
        table=table,
        table_id=registered[(schema, name)],
        columns=tuple(c for c in stored if c in carried),
        delta_columns=catalog.delta_columns_of(target).get((schema, name), ()),
        resolver=catalog.resolvers_of(target).get((schema, name)),
    )
