"""Changes that cannot be applied are parked with their reason instead of stalling the stream;
an operator retries them (after fixing the cause) or discards them, and the record stays."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql

from pgconcord.conflict import change_object

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
