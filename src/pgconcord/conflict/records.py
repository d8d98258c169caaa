"""What a node recorded: its conflicts as `pgconcord conflicts --json` shows them."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import psycopg

_LIST_CONFLICTS = """
SELECT id, detected_at, schema_name, table_name, row_key, conflict_type, resolution,
       local_clock, local_origin, local_row, incoming_clock, incoming_origin,
       incoming_operation::text, incoming_row
  FROM pgconcord.conflict ORDER BY id
"""


def recorded_conflicts(
    connection: psycopg.Connection[tuple[object, ...]], node_name: str
) -> list[dict[str, Any]]:
    """The conflicts one node recorded, as JSON-ready objects (oldest first)."""
    records = []
    for row in connection.execute(_LIST_CONFLICTS):
        (
            identifier,
            detected_at,
            schema,
            table,
            key,
            kind,
            resolution,
            local_clock,
            local_origin,
            local_row,
            incoming_clock,
            incoming_origin,
            operation,
            incoming_row,
        ) = row
        records.append(
            {
                "kind": "conflict",
                "node": node_name,
                "id": identifier,
                "ref": f"{node_name}:{identifier}",
                "detected_at": detected_at.isoformat()
                if isinstance(detected_at, datetime)
                else None,
                "table": f"{schema}.{table}",
                "key": key,
                "type": kind,
                "resolution": resolution,
                "local": {"clock": local_clock, "origin": local_origin, "row": local_row},
                "incoming": change_object(incoming_clock, incoming_origin, operation, incoming_row),
            }
        )
    return records


def change_object(clock: object, origin: object, operation: object, row: object) -> dict[str, Any]:
    """An incoming change as `conflicts --json` shows it, for conflicts and parked changes."""
    names = {"I": "insert", "U": "update", "D": "delete"}
    return {
        "clock": clock,
        "origin": origin,
        "operation": names.get(str(operation), str(operation)),
        "row": row,
    }
