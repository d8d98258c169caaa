"""The set-wise statements that apply one piece of changes to one table (table_statements):
decide (decision.py), choose the winners, record the conflicts, then delete, upsert, merge and
add counters; and those of tables without a key (insert_only_statement) and of the foreign-key
check after the window (CHILD_CANDIDATES, parent_missing_statement)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

from psycopg import sql

from pgconcord.catalog import ForeignKey, Table
from pgconcord.conflict.decision import _CHOOSE_WINNERS, _DECIDE, _NOT_HELD, _RECORD_CONFLICTS
from pgconcord.conflict.outcomes import record_with_outcomes

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

# The new rows the piece brings that are not here now, noted before the upsert where the apply
# locks rows (apply.setwise.write_winners)...
_ABSENT_ROWS = """
INSERT INTO pgconcord_absent
SELECT d.row_key FROM pgconcord_decision d
  JOIN pgconcord_winner w ON w.row_key = d.row_key
 CROSS JOIN LATERAL jsonb_populate_record(NULL::{table}, d.row_key) k
 WHERE d.mode = 'full' AND (d.local_clock IS NULL OR d.local_deleted)
   AND NOT EXISTS (SELECT 1 FROM {table} t WHERE {key_match})
"""

# ... and, after it, those it found there all the same: a local insert that committed
# meanwhile, which the upsert waited for and then updated (an updated row's new version has
# an xmax, an inserted one none) without judging it.
_INSERTED_OVER = """
SELECT count(*) FROM pgconcord_absent a
 CROSS JOIN LATERAL jsonb_populate_record(NULL::{table}, a.row_key) k
  JOIN {table} t ON {key_match}
 WHERE t.xmax <> '0'::xid
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


# The rows of the piece that are here, locked (in key order) before this node's own changes
# are stamped for the last time and the rows judged: a local write to one of them then waits
# for the apply instead of racing it (apply.setwise, when a pair met such a race).
_LOCK_ROWS = """
SELECT count(*) FROM (
    SELECT 1
      FROM (SELECT DISTINCT s.row_key FROM pgconcord_stage s
             WHERE s.schema_name = %(schema)s AND s.table_name = %(table)s
               AND ({selection})) AS s
     CROSS JOIN LATERAL jsonb_populate_record(NULL::{table}, s.row_key) k
      JOIN {table} t ON {key_match}
     ORDER BY s.row_key
       FOR UPDATE OF t) AS locked
"""


@dataclass(frozen=True)
class TableStatements:
    decide_template: sql.SQL
    choose_winners: sql.Composed | sql.SQL
    record_conflicts: sql.Composed
    delete_rows: sql.Composed
    upsert_rows: sql.Composed
    absent_rows: sql.Composed
    inserted_over: sql.Composed
    merge_rows: sql.Composed | None
    add_deltas: sql.Composed | None
    delta: sql.Composable
    identifier: sql.Composable  # the table
    key_match: sql.Composable  # t's key = k's key
    audited: bool = False  # the table's row history is kept (conflict/outcomes.py)

    def lock_rows(self, selection: sql.Composable) -> sql.Composed:
        return sql.SQL(_LOCK_ROWS).format(
            table=self.identifier, key_match=self.key_match, selection=selection
        )

    def decide(self, selection: sql.Composable, parked_waiting: bool) -> sql.Composed:
        return self.decide_template.format(
            selection=selection,
            parked_filter=sql.SQL(_NOT_HELD if parked_waiting else ""),
            delta=self.delta,
        )

    def record(self, selection: sql.Composable, parked_waiting: bool) -> sql.Composed:
        """The statement recording the piece's conflicts (its row count is theirs), and for an
        audited table what the apply did with each change."""
        if not self.audited:
            return self.record_conflicts
        return record_with_outcomes(
            self.record_conflicts, selection, sql.SQL(_NOT_HELD if parked_waiting else "")
        )


def row_value(table: Table, name: str, change: str) -> sql.Composable:
    """A column's value in the row a change carries (`r` = jsonb_populate_record of it)."""
    column = next((c for c in table.columns if c.name == name), None)
    if column is not None and column.as_text:
        # Carried as text by capture (catalog.capture._new_row): its own input function reads it.
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
    table: Table,
    columns: tuple[str, ...],
    delta_columns: tuple[str, ...] = (),
    audited: bool = False,
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
        absent_rows=sql.SQL(_ABSENT_ROWS).format(table=identifier, key_match=key_match),
        inserted_over=sql.SQL(_INSERTED_OVER).format(table=identifier, key_match=key_match),
        add_deltas=_add_deltas(table, columns, delta_columns, record_column),
        merge_rows=_merge_rows(table, columns, delta_columns, record_column),
        delta=_delta_expression(delta_columns),
        identifier=identifier,
        key_match=key_match,
        audited=audited,
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
