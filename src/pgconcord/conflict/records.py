"""What a node recorded: its conflicts as `pgconcord conflicts --json` shows them."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql

_LIST_CONFLICTS = sql.SQL("""
SELECT id, detected_at, schema_name, table_name, row_key, conflict_type, resolution,
       local_clock, local_origin, local_row, incoming_clock, incoming_origin,
       incoming_operation::text, incoming_row
  FROM pgconcord.conflict
""")

PARKED_TYPE = "apply_failed"  # the `type` of a parked change in `conflicts --json`


@dataclass(frozen=True)
class RecordFilter:
    """Which records `conflicts --since/--table/--type/--limit` asks a node for; the query
    filters, so a node with a long history sends only what is asked."""

    since: datetime | None = None
    schema: str | None = None  # None: a table of that name in any schema
    table: str | None = None
    type: str | None = None
    limit: int | None = None  # the latest ones

    def where(
        self, time_column: str, type_column: str | None = None
    ) -> tuple[sql.Composable, list[object]]:
        """The WHERE clause (with its ORDER BY and LIMIT) of a record table, and its
        parameters; the newest first when limited, so that LIMIT keeps the latest."""
        conditions: list[sql.Composable] = []
        parameters: list[object] = []
        if self.since is not None:
            conditions.append(sql.SQL("{} >= %s").format(sql.Identifier(time_column)))
            parameters.append(self.since)
        if self.schema is not None:
            conditions.append(sql.SQL("schema_name = %s"))
            parameters.append(self.schema)
        if self.table is not None:
            conditions.append(sql.SQL("table_name = %s"))
            parameters.append(self.table)
        if self.type is not None and type_column is not None:
            conditions.append(sql.SQL("{} = %s").format(sql.Identifier(type_column)))
            parameters.append(self.type)
        clause = (
            sql.SQL(" WHERE ") + sql.SQL(" AND ").join(conditions) if conditions else sql.SQL("")
        )
        if self.limit is None:
            return clause + sql.SQL(" ORDER BY id"), parameters
        parameters.append(self.limit)
        return clause + sql.SQL(" ORDER BY id DESC LIMIT %s"), parameters

    def wants(self, record_type: str) -> bool:
        return self.type is None or self.type == record_type


def recorded_conflicts(
    connection: psycopg.Connection[tuple[object, ...]],
    node_name: str,
    only: RecordFilter | None = None,
) -> list[dict[str, Any]]:
    """The conflicts one node recorded, as JSON-ready objects (oldest first)."""
    only = only or RecordFilter()
    if only.type == PARKED_TYPE:
        return []
    where, parameters = only.where("detected_at", type_column="conflict_type")
    records = []
    rows = connection.execute(_LIST_CONFLICTS + where, parameters).fetchall()
    for row in sorted(rows, key=lambda row: int(str(row[0]))):
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
