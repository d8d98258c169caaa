"""Conflict resolution: every node picks the same winner alone, and records what it saw.

A version is (order key, clock, origin): the hybrid logical clock of a write, in microseconds,
and the node that wrote it (the order key is empty under last-writer-wins; see
004_conflict_policies.sql). Capture makes a write's clock one past the row's latest version,
so a write that follows another in causal order always has the greater version, even from a
node whose wall clock lags. Concurrent writes are ordered by clock, then node name (bytes).

A row's life is a generation (008_column_versions.sql): its insert, then updates that stamp the
columns they change. Two versions of one generation merge column by column, each column taking
its greatest version; of two generations the greater one is kept whole; a delete newer than
the generation ends it, and no update of that generation brings it back. The merge is
commutative, associative and idempotent, so every node ends with the same rows whatever the
order of arrival.

A conflict is recorded when the target held a version the incoming change's writer had not
seen (for a merge: when both changed the same column).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any, NamedTuple

import psycopg
import psycopg.types.json
from psycopg import sql

from pgconcord.catalog import ForeignKey, Table


class Version(NamedTuple):
    clock: int
    origin: str
    order_key: tuple[int, ...] = ()  # empty under last-writer-wins; see 004_conflict_policies

    def sort_key(self) -> tuple[tuple[int, ...], int, bytes]:
        # Node names compare as bytes (COLLATE "C" in SQL) so no locale can disagree.
        return (self.order_key, self.clock, self.origin.encode())


def _order_key(value: object) -> tuple[int, ...]:
    return tuple(int(str(part)) for part in value) if isinstance(value, list) else ()


def incoming_wins(incoming: Version, local: Version | None) -> bool:
    """The greater version wins: the reference of the rule the apply SQL implements."""
    return local is None or incoming.sort_key() > local.sort_key()


def is_conflict(previous: Version | None, local: Version | None) -> bool:
    """Did the target hold a version the incoming change's writer had not seen?"""
    if local is None or local == previous:
        return False
    return previous is None or local.sort_key() > previous.sort_key()


def conflict_type(operation: str, local_deleted: bool) -> str:
    """PostgreSQL's vocabulary where it has a word; insert_deleted is ours (an insert meeting
    a tombstone), and a delete meeting a tombstone is delete_missing."""
    match operation, local_deleted:
        case "I", False:
            return "insert_exists"
        case "I", True:
            return "insert_deleted"
        case "U", False:
            return "update_origin_differs"
        case "U", True:
            return "update_deleted"
        case "D", False:
            return "delete_origin_differs"
        case _:
            return "delete_missing"


_CONFLICT_TYPE_SQL = """
CASE
    WHEN d.operation = 'I' AND NOT d.local_deleted THEN 'insert_exists'
    WHEN d.operation = 'I' THEN 'insert_deleted'
    WHEN d.operation = 'U' AND NOT d.local_deleted THEN 'update_origin_differs'
    WHEN d.operation = 'U' THEN 'update_deleted'
    WHEN d.operation = 'D' AND NOT d.local_deleted THEN 'delete_origin_differs'
    ELSE 'delete_missing'
END"""

# One decision per row: its last change in the piece (an update carries the whole row and its
# column map, so the last change says everything), judged against the row's version here. The
# version rows are locked first, in key order: a local write committing meanwhile is waited for
# and then compared, never overwritten blindly. A row only updated in the piece, in a table
# with counter columns, carries the sum of its counters' differences (delta).
#   mode 'delete': a delete newer than the row's generation (or tombstone) here;
#   'full': an insert or update of a newer generation than the one here: the whole row;
#   'merge': an update of the generation here: the columns whose version is newer;
#   'lose': older than what is here.
_DECIDE = """
WITH locked AS MATERIALIZED (
    SELECT v.row_key, v.clock, v.origin, v.deleted, v.order_key, v.column_versions,
           coalesce(v.last_clock, v.clock) AS last_clock,
           coalesce(v.last_origin, v.origin) AS last_origin
      FROM pgconcord.row_version v
     WHERE v.table_id = %(table_id)s
       AND v.row_key IN (SELECT s.row_key FROM pgconcord_stage s
                          WHERE s.schema_name = %(schema)s AND s.table_name = %(table)s
                            AND ({selection}))
     ORDER BY v.row_key
       FOR UPDATE)
INSERT INTO pgconcord_decision
SELECT i.row_key, i.operation, i.clock, i.new_row, i.previous_clock, i.previous_origin,
       i.order_key, i.delta, i.generation_clock, i.generation_origin, i.column_versions,
       l.clock, l.origin, l.deleted, l.order_key, l.column_versions, l.last_clock, l.last_origin,
       m.mode,
       CASE WHEN m.mode = 'merge' THEN
           ARRAY(SELECT e.key FROM jsonb_each_text(i.column_versions) e
                  WHERE e.value COLLATE "C"
                        > coalesce(l.column_versions ->> e.key, '') COLLATE "C") END,
       CASE WHEN m.mode = 'merge'
            THEN pgconcord.merge_versions(l.column_versions, i.column_versions) END,
       CASE WHEN m.mode = 'merge' AND (l.last_clock, l.last_origin COLLATE "C")
                                      > (i.clock, %(origin)s COLLATE "C")
            THEN l.last_clock ELSE i.clock END,
       CASE WHEN m.mode = 'merge' AND (l.last_clock, l.last_origin COLLATE "C")
                                      > (i.clock, %(origin)s COLLATE "C")
            THEN l.last_origin ELSE %(origin)s END,
       -- Columns both sides changed since the incoming writer's last sight of the row.
       CASE WHEN m.mode = 'merge' THEN
           ARRAY(SELECT e.key FROM jsonb_each_text(i.column_versions) e
                  WHERE e.value COLLATE "C" > m.seen COLLATE "C"
                    AND l.column_versions ->> e.key COLLATE "C" > m.seen COLLATE "C"
                    AND l.column_versions ->> e.key <> e.value) END
  FROM (SELECT DISTINCT ON (s.row_key) s.row_key, s.operation, s.clock, s.new_row, s.order_key,
               first_value(s.previous_clock) OVER earliest AS previous_clock,
               first_value(s.previous_origin) OVER earliest AS previous_origin,
               {delta} AS delta,
               coalesce(s.generation_clock, s.clock) AS generation_clock,
               coalesce(s.generation_origin, %(origin)s) AS generation_origin,
               s.column_versions
          FROM pgconcord_stage s
         WHERE s.schema_name = %(schema)s AND s.table_name = %(table)s AND ({selection})
               {parked_filter}
        WINDOW earliest AS (PARTITION BY s.row_key ORDER BY s.id),
               every_change AS (PARTITION BY s.row_key)
         ORDER BY s.row_key, s.id DESC) AS i
  LEFT JOIN locked l ON l.row_key = i.row_key
 CROSS JOIN LATERAL (
    SELECT CASE
        WHEN i.operation = 'D' THEN
            CASE WHEN l.row_key IS NULL
                      OR (l.order_key, l.clock, l.origin COLLATE "C")
                         < (i.order_key, i.clock, %(origin)s COLLATE "C")
                 THEN 'delete' ELSE 'lose' END
        -- A row that was there before replication began, never written here since.
        WHEN l.row_key IS NULL AND i.operation = 'U'
             AND (i.generation_clock, i.generation_origin) = (0, '')
            THEN 'merge'
        WHEN l.row_key IS NULL
             OR (l.order_key, l.clock, l.origin COLLATE "C")
                < (i.order_key, i.generation_clock, i.generation_origin COLLATE "C")
            THEN 'full'
        WHEN NOT l.deleted AND (l.order_key, l.clock, l.origin)
                               = (i.order_key, i.generation_clock, i.generation_origin)
            THEN 'merge'
        ELSE 'lose'
    END AS mode,
    coalesce(pgconcord.version_text(i.previous_clock, i.previous_origin), '') AS seen) AS m
"""

# Source transactions that wait behind a parked change were parked whole just before
# (parked.hold_followers): none of their changes is applied now.
_NOT_HELD = """
   AND NOT EXISTS (SELECT 1 FROM pgconcord_held h
                    WHERE h.transaction_order = s.transaction_order)"""

# The rows locked above are decided; a row inserted here after that statement began is
# checked again by the upsert's condition (and a merge decided without it is retried).
_CHOOSE_WINNERS = """
WITH won AS (
    INSERT INTO pgconcord.row_version AS v
        (table_id, row_key, clock, origin, deleted, order_key, column_versions, last_clock,
         last_origin)
    SELECT %(table_id)s, d.row_key,
           CASE WHEN d.mode = 'delete' THEN d.clock ELSE d.generation_clock END,
           CASE WHEN d.mode = 'delete' THEN %(origin)s ELSE d.generation_origin END,
           d.mode = 'delete', d.order_key,
           CASE d.mode WHEN 'merge' THEN d.merged_versions WHEN 'full' THEN d.column_versions END,
           CASE WHEN d.mode <> 'delete' THEN d.last_clock END,
           CASE WHEN d.mode <> 'delete' THEN d.last_origin END
      FROM pgconcord_decision d WHERE d.mode <> 'lose' ORDER BY d.row_key
    ON CONFLICT (table_id, row_key) DO UPDATE
       SET clock = excluded.clock, origin = excluded.origin, deleted = excluded.deleted,
           order_key = excluded.order_key,
           -- The same generation (a local write may have stamped columns meanwhile): merge.
           column_versions = CASE WHEN (v.order_key, v.clock, v.origin, v.deleted)
                                       = (excluded.order_key, excluded.clock, excluded.origin,
                                          excluded.deleted)
                                  THEN pgconcord.merge_versions(v.column_versions,
                                                                excluded.column_versions)
                                  ELSE excluded.column_versions END,
           last_clock = excluded.last_clock, last_origin = excluded.last_origin,
           previous_clock = NULL, previous_origin = NULL
     WHERE (v.order_key, v.clock, v.origin COLLATE "C")
           < (excluded.order_key, excluded.clock, excluded.origin COLLATE "C")
        OR (NOT v.deleted AND NOT excluded.deleted
            AND (v.order_key, v.clock, v.origin) = (excluded.order_key, excluded.clock,
                                                    excluded.origin))
    RETURNING v.row_key, v.xmax <> 0 AS updated),
winners AS (INSERT INTO pgconcord_winner SELECT row_key FROM won)
-- A merge decided against a row version that did not exist yet, which a local write created
-- before the upsert: the columns it took were chosen blind. The caller retries the piece.
SELECT count(*) FROM won JOIN pgconcord_decision d ON d.row_key = won.row_key
 WHERE won.updated AND d.mode = 'merge' AND d.local_clock IS NULL
"""

_RECORD_CONFLICTS = (
    """
INSERT INTO pgconcord.conflict
    (schema_name, table_name, row_key, conflict_type, resolution, local_clock, local_origin,
     local_row, incoming_clock, incoming_origin, incoming_operation, incoming_row)
SELECT %(schema)s, %(table)s, d.row_key, """
    + _CONFLICT_TYPE_SQL
    + """,
       CASE WHEN w.row_key IS NULL THEN 'local'
            WHEN d.mode <> 'merge' OR d.overlap <@ d.taken THEN 'incoming'
            WHEN d.overlap && d.taken THEN 'merged'
            ELSE 'local' END,
       d.local_last_clock, d.local_last_origin, l.local_row, d.clock, %(origin)s, d.operation,
       d.new_row
  FROM pgconcord_decision d
  LEFT JOIN pgconcord_winner w ON w.row_key = d.row_key
  LEFT JOIN LATERAL (SELECT to_jsonb(t.*) AS local_row
                       FROM {table} t, jsonb_populate_record(NULL::{table}, d.row_key) k
                      WHERE {key_match}) AS l ON true
 WHERE d.local_clock IS NOT NULL
   AND CASE WHEN d.mode = 'merge' THEN cardinality(d.overlap) > 0
       ELSE
           -- Counters changed on both sides add up: no conflict unless another column differs.
           (d.delta IS NULL
            OR (d.new_row - {delta_names}) IS DISTINCT FROM (l.local_row - {delta_names}))
           AND (d.local_last_clock, d.local_last_origin)
               IS DISTINCT FROM (d.previous_clock, d.previous_origin)
           AND (d.previous_clock IS NULL
                OR (d.local_last_clock, d.local_last_origin COLLATE "C")
                   > (d.previous_clock, d.previous_origin COLLATE "C"))
       END
"""
)

# Deleted rows go; so do rows whose GENERATED ALWAYS identity value changed, which no UPDATE
# may set: the upsert then inserts them again with OVERRIDING SYSTEM VALUE.
_DELETE_ROWS = """
DELETE FROM {table} t
 USING pgconcord_decision d
  JOIN pgconcord_winner w ON w.row_key = d.row_key
 CROSS JOIN LATERAL jsonb_populate_record(NULL::{table}, d.row_key) k
 CROSS JOIN LATERAL jsonb_populate_record(NULL::{table}, d.new_row) r
 WHERE {key_match} AND (d.mode = 'delete' {identity_changed})
"""

_UPSERT_ROWS = """
INSERT INTO {table} AS t ({columns}) OVERRIDING SYSTEM VALUE
SELECT {record_columns}
  FROM pgconcord_decision d
  JOIN pgconcord_winner w ON w.row_key = d.row_key
 CROSS JOIN LATERAL jsonb_populate_record(NULL::{table}, d.new_row) r
 WHERE d.mode = 'full' AND NOT {counted}
    ON CONFLICT ({key_columns}) DO {on_conflict}
"""

# Counters changed by updates only (d.delta) on a row that is here: the origin's differences
# are added whoever wins the row (across generations too, as under node-priority, where every
# write is one); the other columns follow the winner.
_ADD_DELTAS = """
UPDATE {table} AS t SET {assignments}
  FROM pgconcord_decision d
  LEFT JOIN pgconcord_winner w ON w.row_key = d.row_key
 CROSS JOIN LATERAL jsonb_populate_record(NULL::{table}, d.new_row) r
 WHERE d.mode IN ('full', 'lose') AND {counted} AND {key_match}
"""

# Rows whose counters are added rather than written (see _ADD_DELTAS).
_COUNTED = "(d.delta IS NOT NULL AND d.local_clock IS NOT NULL AND NOT d.local_deleted)"

# An update of the generation here: the columns it brings newer versions of, and the
# difference of each counter.
_MERGE_ROWS = """
UPDATE {table} AS t SET {assignments}
  FROM pgconcord_decision d
  JOIN pgconcord_winner w ON w.row_key = d.row_key
 CROSS JOIN LATERAL jsonb_populate_record(NULL::{table}, d.new_row) r
 WHERE d.mode = 'merge' AND (cardinality(d.taken) > 0 OR d.delta IS NOT NULL) AND {key_match}
"""


@dataclass(frozen=True)
class TableStatements:
    decide_template: sql.SQL
    choose_winners: sql.Composed | sql.SQL
    record_conflicts: sql.Composed
    delete_rows: sql.Composed
    upsert_rows: sql.Composed
    merge_rows: sql.Composed | None
    add_deltas: sql.Composed | None
    delta: sql.Composable

    def decide(self, selection: sql.Composable, parked_waiting: bool) -> sql.Composed:
        return self.decide_template.format(
            selection=selection,
            parked_filter=sql.SQL(_NOT_HELD if parked_waiting else ""),
            delta=self.delta,
        )


def row_value(table: Table, name: str, change: str) -> sql.Composable:
    """A column's value in the row a change carries (`r` = jsonb_populate_record of it)."""
    column = next((c for c in table.columns if c.name == name), None)
    if column is not None and column.as_text:
        # Carried as text by capture (catalog._new_row): its own input function reads it.
        return sql.SQL("({}.new_row ->> {})::{}").format(
            sql.Identifier(change), sql.Literal(name), sql.SQL(column.type_name)
        )
    return sql.SQL("r.{}").format(sql.Identifier(name))


# Foreign keys are not checked while applying (the session runs in replica mode), and the
# tables of a piece are applied one after the other, in name order: a child row often lands
# before its parent of the same piece. So each table's applied rows are noted as candidates
# (pgconcord_child) and checked once the parents may have arrived: after the window
# (apply.Puller._check_parents). A merge that changed none of the key's columns cannot have
# made an orphan: it is checked only if it took one of them.
CHILD_CANDIDATES = sql.SQL("""
INSERT INTO pgconcord_child (schema_name, table_name, row_key, clock, operation, new_row, taken)
SELECT %(schema)s, %(table)s, d.row_key, d.clock, d.operation, d.new_row,
       CASE WHEN d.mode = 'merge' THEN d.taken END
  FROM pgconcord_decision d
  JOIN pgconcord_winner w ON w.row_key = d.row_key
 WHERE d.mode IN ('full', 'merge')
""")

# A candidate row that is here (as it is now: a later change may have deleted it or pointed it
# elsewhere) and whose parent is not: recorded with the last change applied to it. The row is
# kept (on every node alike), and the parent may still come from another origin.
_PARENT_MISSING = """
INSERT INTO pgconcord.conflict
    (schema_name, table_name, row_key, conflict_type, resolution, incoming_clock,
     incoming_origin, incoming_operation, incoming_row)
SELECT %(schema)s, %(table)s, c.row_key, 'parent_missing', 'incoming', c.clock, %(origin)s,
       c.operation, c.new_row
  FROM (SELECT DISTINCT ON (row_key) row_key, clock, operation, new_row
          FROM pgconcord_child
         WHERE schema_name = %(schema)s AND table_name = %(table)s
           AND (taken IS NULL OR taken && %(columns)s::text[])
         ORDER BY row_key, clock DESC) AS c
 CROSS JOIN LATERAL jsonb_populate_record(NULL::{table}, c.row_key) k
  JOIN {table} t ON {key_match}
 WHERE {all_set}
   AND NOT EXISTS (SELECT 1 FROM {parent} p WHERE {matches})
"""


def parent_missing_statement(table: Table, foreign_key: ForeignKey) -> sql.Composed:
    """Record the candidates of one table (CHILD_CANDIDATES) whose parent is missing by one
    foreign key; parameters schema, table, origin and columns (the foreign key's)."""
    return sql.SQL(_PARENT_MISSING).format(
        table=table.identifier,
        key_match=sql.SQL(" AND ").join(
            sql.SQL("t.{column} = k.{column}").format(column=sql.Identifier(column))
            for column in table.key_columns
        ),
        parent=foreign_key.parent,
        all_set=sql.SQL(" AND ").join(
            sql.SQL("t.{} IS NOT NULL").format(sql.Identifier(c)) for c in foreign_key.columns
        ),
        matches=sql.SQL(" AND ").join(
            sql.SQL("p.{} = t.{}").format(sql.Identifier(parent), sql.Identifier(child))
            for child, parent in zip(foreign_key.columns, foreign_key.parent_columns, strict=True)
        ),
    )


# A table without a key takes inserts only (catalog: capture_insert_only.sql): in order, as
# they come.
_INSERT_ONLY = """
INSERT INTO {table} ({columns}) OVERRIDING SYSTEM VALUE
SELECT {values}
  FROM pgconcord_stage s
 CROSS JOIN LATERAL jsonb_populate_record(NULL::{table}, s.new_row) r
 WHERE s.schema_name = %(schema)s AND s.table_name = %(table)s AND ({selection})
 ORDER BY s.id
"""


def insert_only_statement(
    table: Table, columns: tuple[str, ...], selection: sql.Composable
) -> sql.Composed:
    return sql.SQL(_INSERT_ONLY).format(
        table=table.identifier,
        columns=sql.SQL(", ").join(sql.Identifier(c) for c in columns),
        values=sql.SQL(", ").join(row_value(table, c, "s") for c in columns),
        selection=selection,
    )


@lru_cache(maxsize=512)
def table_statements(
    table: Table, columns: tuple[str, ...], delta_columns: tuple[str, ...] = ()
) -> TableStatements:
    """The set-wise statements that apply one piece of changes to one table."""
    identifier = table.identifier
    key_match = sql.SQL(" AND ").join(
        sql.SQL("t.{column} = k.{column}").format(column=sql.Identifier(column))
        for column in table.key_columns
    )
    by_name = {column.name: column for column in table.columns}
    always_identity = [c for c in columns if c in by_name and by_name[c].identity_always]
    updatable = [c for c in columns if c not in table.key_columns and c not in always_identity]
    identity_changed: sql.Composable = sql.SQL("")
    if always_identity:
        identity_changed = sql.SQL("OR (d.mode = 'full' AND ({}) IS DISTINCT FROM ({}))").format(
            sql.SQL(", ").join(sql.SQL("t.{}").format(sql.Identifier(c)) for c in always_identity),
            sql.SQL(", ").join(sql.SQL("r.{}").format(sql.Identifier(c)) for c in always_identity),
        )

    def record_column(name: str) -> sql.Composable:
        return row_value(table, name, "d")

    on_conflict: sql.Composable = (
        sql.SQL("UPDATE SET {}").format(
            sql.SQL(", ").join(
                sql.SQL("{column} = excluded.{column}").format(column=sql.Identifier(c))
                for c in updatable
            )
        )
        if updatable
        else sql.SQL("NOTHING")
    )
    delta_names = sql.SQL("ARRAY[{}]::text[]").format(
        sql.SQL(", ").join(sql.Literal(c) for c in delta_columns)
    )
    return TableStatements(
        decide_template=sql.SQL(_DECIDE),
        choose_winners=sql.SQL(_CHOOSE_WINNERS),
        record_conflicts=sql.SQL(_RECORD_CONFLICTS).format(
            table=identifier, key_match=key_match, delta_names=delta_names
        ),
        delete_rows=sql.SQL(_DELETE_ROWS).format(
            table=identifier, key_match=key_match, identity_changed=identity_changed
        ),
        upsert_rows=sql.SQL(_UPSERT_ROWS).format(
            table=identifier,
            columns=sql.SQL(", ").join(sql.Identifier(c) for c in columns),
            record_columns=sql.SQL(", ").join(record_column(c) for c in columns),
            key_columns=sql.SQL(", ").join(sql.Identifier(c) for c in table.key_columns),
            on_conflict=on_conflict,
            counted=sql.SQL(_COUNTED),
        ),
        add_deltas=_add_deltas(table, columns, delta_columns, record_column),
        merge_rows=_merge_rows(table, columns, delta_columns, record_column),
        delta=_delta_expression(delta_columns),
    )


def _delta_expression(delta_columns: tuple[str, ...]) -> sql.Composable:
    """Per row, the sum of each counter's differences, when every change of the row in the
    piece is a plain update (an insert or delete carries whole values instead)."""
    if not delta_columns:
        return sql.SQL("NULL::jsonb")
    sums = sql.SQL(", ").join(
        sql.SQL(
            "{name}, sum((s.new_row ->> {name})::numeric - (s.old_values ->> {name})::numeric)"
            " OVER every_change"
        ).format(name=sql.Literal(column))
        for column in delta_columns
    )
    return sql.SQL(
        "CASE WHEN bool_and(s.operation = 'U' AND s.old_values IS NOT NULL) OVER every_change"
        " THEN jsonb_build_object({}) END"
    ).format(sums)


def _add_deltas(
    table: Table,
    columns: tuple[str, ...],
    delta_columns: tuple[str, ...],
    record_column: Callable[[str], sql.Composable],
) -> sql.Composed | None:
    counters = [c for c in delta_columns if c in columns]
    if not counters:
        return None
    assignments = _counter_additions(counters) + [
        sql.SQL(
            "{column} = CASE WHEN w.row_key IS NOT NULL AND d.mode = 'full' THEN {value}"
            " ELSE t.{column} END"
        ).format(column=sql.Identifier(c), value=record_column(c))
        for c in _updatable(table, columns, delta_columns)
    ]
    return sql.SQL(_ADD_DELTAS).format(
        table=table.identifier,
        assignments=sql.SQL(", ").join(assignments),
        counted=sql.SQL(_COUNTED),
        key_match=_row_key_match(table),
    )


def _counter_additions(counters: list[str]) -> list[sql.Composable]:
    """Each counter plus the origin's difference (d.delta)."""
    return [
        sql.SQL("{column} = t.{column} + coalesce((d.delta ->> {name})::numeric, 0)").format(
            column=sql.Identifier(c), name=sql.Literal(c)
        )
        for c in counters
    ]


def _updatable(table: Table, columns: tuple[str, ...], delta_columns: tuple[str, ...]) -> list[str]:
    by_name = {column.name: column for column in table.columns}
    return [
        c
        for c in columns
        if c not in delta_columns
        and c not in table.key_columns
        and not (c in by_name and by_name[c].identity_always)
    ]


def _row_key_match(table: Table) -> sql.Composable:
    return sql.SQL(" AND ").join(
        sql.SQL("t.{column} = r.{column}").format(column=sql.Identifier(c))
        for c in table.key_columns
    )


def _merge_rows(
    table: Table,
    columns: tuple[str, ...],
    delta_columns: tuple[str, ...],
    record_column: Callable[[str], sql.Composable],
) -> sql.Composed | None:
    assignments = _counter_additions([c for c in delta_columns if c in columns]) + [
        sql.SQL(
            "{column} = CASE WHEN {name} = ANY (d.taken) THEN {value} ELSE t.{column} END"
        ).format(column=sql.Identifier(c), name=sql.Literal(c), value=record_column(c))
        for c in _updatable(table, columns, delta_columns)
    ]
    if not assignments:
        return None
    return sql.SQL(_MERGE_ROWS).format(
        table=table.identifier,
        assignments=sql.SQL(", ").join(assignments),
        key_match=_row_key_match(table),
    )


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
    incoming = Version(int(str(incoming_clock)), origin, _order_key(order_key))
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
                else Version(int(str(clock)), str(holder_origin), _order_key(holder_order_key))
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
