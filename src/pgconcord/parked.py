"""Changes that cannot be applied are parked with their reason instead of stalling the stream;
an operator retries them (after fixing the cause) or discards them, and the record stays."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql

# Module imports (not names) on both sides: apply parks changes, retry applies them again.
from pgconcord import apply, catalog
from pgconcord.config import NodeConfig
from pgconcord.conflict import change_object
from pgconcord.errors import SchemaError

Connection = psycopg.Connection[tuple[object, ...]]

_STAGED_CHANGE = """
SELECT {origin}, s.schema_name, s.table_name, s.row_key, s.operation, s.clock,
       s.previous_clock, s.previous_origin, s.new_row, s.old_values, s.order_key, {reason}
  FROM pgconcord_stage s
"""

_PARK = (
    """
INSERT INTO pgconcord.parked_change (origin, schema_name, table_name, row_key, operation, clock,
                                     previous_clock, previous_origin, new_row, old_values,
                                     order_key, reason)
"""
    + _STAGED_CHANGE
    + " WHERE {selection} ORDER BY s.transaction_order, s.id"
)

_PARK_FOLLOWERS = (
    """
INSERT INTO pgconcord.parked_change (origin, schema_name, table_name, row_key, operation, clock,
                                     previous_clock, previous_origin, new_row, old_values,
                                     order_key, reason)
"""
    + _STAGED_CHANGE
    + """
 WHERE s.schema_name = %(schema)s AND s.table_name = %(table)s AND ({selection})
   AND EXISTS (SELECT 1 FROM pgconcord.parked_change p
                WHERE p.state = 'parked' AND p.origin = %(origin)s
                  AND p.schema_name = s.schema_name AND p.table_name = s.table_name
                  AND p.row_key = s.row_key)
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


def park_followers(selection: sql.Composable) -> sql.Composed:
    return sql.SQL(_PARK_FOLLOWERS).format(
        origin=sql.SQL("%(origin)s"),
        reason=sql.Literal("waits for an earlier parked change of the same row"),
        selection=selection,
    )


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
    """Apply parked changes again, oldest first (all of them, or one); those that fail again
    stay parked with the new reason."""
    report = RetryReport()
    target = apply.open_target(node)
    try:
        candidates = target.execute(
            "SELECT id FROM pgconcord.parked_change WHERE state = 'parked'"
            " AND (%s::bigint IS NULL OR id = %s) ORDER BY id",
            (parked_id, parked_id),
        ).fetchall()
        target.commit()
        for (candidate,) in candidates:
            identifier = int(str(candidate))
            reason = _retry_one(target, identifier)
            if reason is None:
                report.retried.append(identifier)
            else:
                report.still_parked[identifier] = reason
    finally:
        target.close()
    return report


def _retry_one(target: Connection, identifier: int) -> str | None:
    """Retry one parked change in its own transaction; None on success, else the reason."""
    with target.transaction():
        row = target.execute(
            "SELECT origin, schema_name, table_name, row_key, new_row,"
            " (SELECT min(earlier.id) FROM pgconcord.parked_change earlier"
            "   WHERE earlier.state = 'parked' AND earlier.id < p.id"
            "     AND earlier.origin = p.origin AND earlier.schema_name = p.schema_name"
            "     AND earlier.table_name = p.table_name AND earlier.row_key = p.row_key)"
            " FROM pgconcord.parked_change p WHERE id = %s AND state = 'parked' FOR UPDATE",
            (identifier,),
        ).fetchone()
        if row is None:
            return "no longer parked"
        origin, schema, name, _key, new_row, earlier = row
        if earlier is not None:
            return f"waits for parked change {earlier} of the same row"
        target.execute(
            "UPDATE pgconcord.parked_change SET state = 'retried', resolved_at = now()"
            " WHERE id = %s",
            (identifier,),
        )
        target.execute("TRUNCATE pgconcord_stage")
        target.execute(
            "INSERT INTO pgconcord_stage SELECT 0, id, schema_name, table_name, operation,"
            " row_key, clock, previous_clock, previous_origin, new_row, old_values, order_key"
            " FROM pgconcord.parked_change WHERE id = %s",
            (identifier,),
        )
        try:
            with target.transaction():
                plan = _plan_for_row(target, str(schema), str(name), new_row)
                apply.apply_table(
                    target,
                    plan,
                    str(origin),
                    sql.SQL("s.id = {}").format(sql.Literal(identifier)),
                    parked_waiting=False,
                )
        except (psycopg.DatabaseError, SchemaError) as error:
            if isinstance(error, psycopg.DatabaseError) and not apply.is_data_problem(error):
                raise
            reason = f"{schema}.{name}: {apply.first_line(error)}"
            target.execute(
                "UPDATE pgconcord.parked_change SET state = 'parked', resolved_at = NULL,"
                " reason = %s WHERE id = %s",
                (reason, identifier),
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
    )
