"""Unique values besides the primary key: an incoming row that collides with other local rows
on one (two shops registered the same e-mail) keeps the value on every node if its version is
the greater (rules.incoming_wins); the loser goes, and both are recorded."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import psycopg
import psycopg.types.json
from psycopg import sql

from pgconcord.catalog import Table
from pgconcord.conflict.rules import Version, incoming_wins, order_key_of

_UNIQUE_INDEXES = """
SELECT array_agg(a.attname::text ORDER BY k.position)
  FROM pg_index i
 CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, position)
  JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
 WHERE i.indrelid = %s::regclass AND i.indisunique AND NOT i.indisprimary
   AND i.indpred IS NULL AND i.indexprs IS NULL
 GROUP BY i.indexrelid
"""


@dataclass(frozen=True)
class LocalHolder:
    """A local row holding a unique value an incoming row also claims."""

    row_key: Any
    row: Any
    version: Version | None


def resolve_unique_collision(
    connection: psycopg.Connection[tuple[object, ...]],
    table: Table,
    table_id: int,
    origin: str,
    change_id: int,
) -> bool | None:
    """An incoming row collides with other local rows on unique constraints besides the
    primary key (two shops registered the same e-mail). The later version keeps the value
    on every node: the local holders are deleted, or the incoming row is dropped; both are
    recorded. Returns whether the incoming row should now be applied, or None when the
    collision is not on such a constraint (the caller parks the change)."""
    if not table.key_columns:
        return None  # rows without a key cannot be told apart: park it
    staged = connection.execute(
        "SELECT row_key, new_row, clock, operation::text, order_key FROM pgconcord_stage"
        " WHERE id = %s",
        (change_id,),
    ).fetchone()
    if staged is None or staged[3] == "D":
        return None
    incoming_key, incoming_row, incoming_clock, operation, order_key = staged
    incoming = Version(int(str(incoming_clock)), origin, order_key_of(order_key))
    key_object = sql.SQL("jsonb_build_object({})").format(
        sql.SQL(", ").join(
            sql.SQL("{}, t.{}").format(sql.Literal(column), sql.Identifier(column))
            for column in table.key_columns
        )
    )
    holders: dict[str, LocalHolder] = {}
    constraints_hit = 0
    for (columns,) in connection.execute(
        _UNIQUE_INDEXES, (table.identifier.as_string(connection),)
    ).fetchall():
        names = [str(column) for column in (columns if isinstance(columns, list) else [])]
        found = connection.execute(
            sql.SQL(
                "SELECT {key}, to_jsonb(t.*), coalesce(v.last_clock, v.clock),"
                " coalesce(v.last_origin, v.origin), v.order_key FROM {table} t"
                " LEFT JOIN pgconcord.row_version v ON v.table_id = %s AND v.row_key = {key}"
                " WHERE ({columns}) = (SELECT {record_columns}"
                "   FROM jsonb_populate_record(NULL::{table}, %s) r) AND {key} <> %s"
            ).format(
                key=key_object,
                table=table.identifier,
                columns=sql.SQL(", ").join(
                    sql.SQL("t.{}").format(sql.Identifier(c)) for c in names
                ),
                record_columns=sql.SQL(", ").join(
                    sql.SQL("r.{}").format(sql.Identifier(c)) for c in names
                ),
            ),
            (
                table_id,
                psycopg.types.json.Jsonb(incoming_row),
                psycopg.types.json.Jsonb(incoming_key),
            ),
        ).fetchall()
        if found:
            constraints_hit += 1
        for key, row, clock, holder_origin, holder_order_key in found:
            version = (
                None
                if clock is None
                else Version(int(str(clock)), str(holder_origin), order_key_of(holder_order_key))
            )
            holders[json.dumps(key, sort_keys=True)] = LocalHolder(key, row, version)
    if not holders:
        return None
    incoming_wins_all = all(incoming_wins(incoming, h.version) for h in holders.values())
    kind = (
        "multiple_unique_conflicts"
        if constraints_hit > 1
        else "update_exists"
        if operation == "U"
        else "insert_exists"
    )
    for holder in holders.values():
        connection.execute(
            "INSERT INTO pgconcord.conflict (schema_name, table_name, row_key, conflict_type,"
            " resolution, local_clock, local_origin, local_row, incoming_clock,"
            " incoming_origin, incoming_operation, incoming_row)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (
                table.schema,
                table.name,
                psycopg.types.json.Jsonb(incoming_key),
                kind,
                "incoming" if incoming_wins_all else "local",
                holder.version.clock if holder.version else None,
                holder.version.origin if holder.version else None,
                psycopg.types.json.Jsonb(holder.row),
                incoming.clock,
                origin,
                operation,
                psycopg.types.json.Jsonb(incoming_row),
            ),
        )
        if incoming_wins_all:
            _remove_loser(connection, table, table_id, key_object, holder.row_key)
    if not incoming_wins_all and operation == "U":
        # The row whose update lost goes, as it does on the nodes where it was the holder.
        _remove_loser(connection, table, table_id, key_object, incoming_key)
    return incoming_wins_all


def _remove_loser(
    connection: psycopg.Connection[tuple[object, ...]],
    table: Table,
    table_id: int,
    key_object: sql.Composable,
    row_key: Any,
) -> None:
    """Delete the row that lost a unique value. It stays a tombstone at its own version: if its
    write reaches a node later, it meets the winner there and loses the same way."""
    connection.execute(
        sql.SQL("DELETE FROM {table} t WHERE {key} = %s").format(
            table=table.identifier, key=key_object
        ),
        (psycopg.types.json.Jsonb(row_key),),
    )
    connection.execute(
        "UPDATE pgconcord.row_version SET deleted = true, column_versions = NULL,"
        " last_clock = NULL, last_origin = NULL WHERE table_id = %s AND row_key = %s",
        (table_id, psycopg.types.json.Jsonb(row_key)),
    )
