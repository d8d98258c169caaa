"""The replicated tables: what introspection finds (columns, keys, foreign keys), the keys
declared for tables without one, and the registry pgconcord keeps of them (table ids,
counter columns, resolvers, the fingerprint of it all)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import psycopg
from psycopg import sql

from pgconcord.errors import SchemaError


@dataclass(frozen=True)
class Column:
    name: str
    type_name: str
    generated: bool
    identity_always: bool = False  # GENERATED ALWAYS AS IDENTITY: UPDATE may not set it
    as_text: bool = False  # to_jsonb() would lose something (json text, -0, array bounds)
    # Its text depends on session settings (DateStyle, TimeZone, extra_float_digits).
    setting_dependent: bool = False


@dataclass(frozen=True)
class Table:
    schema: str
    name: str
    key_columns: tuple[str, ...]
    columns: tuple[Column, ...]

    @property
    def qualified_name(self) -> str:
        return f"{self.schema}.{self.name}"

    @property
    def identifier(self) -> sql.Identifier:
        return sql.Identifier(self.schema, self.name)

    @property
    def stored_columns(self) -> tuple[Column, ...]:
        """Columns whose values are replicated; generated ones are recomputed on each node."""
        return tuple(column for column in self.columns if not column.generated)


_DISCOVER_TABLES = """
SELECT n.nspname, c.relname,
       (SELECT array_agg(a.attname::text ORDER BY array_position(i.indkey::int2[], a.attnum))
          FROM pg_index i
          JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey::int2[])
         WHERE i.indrelid = c.oid AND i.indisprimary) AS key_columns,
       (SELECT array_agg(array[a.attname::text, format_type(a.atttypid, a.atttypmod),
                               (a.attgenerated <> '')::text, (a.attidentity = 'a')::text,
                               (b.typcategory = 'A'
                                OR b.oid = ANY ('{json,jsonb,float4,float8}'::regtype[]))::text,
                               (b.typcategory = 'A' OR b.typtype IN ('r', 'm', 'c')
                                OR b.oid = ANY ('{float4,float8,timestamptz,timetz,interval}'
                                                ::regtype[]))::text]
                         ORDER BY a.attnum)
          FROM pg_attribute a
          JOIN pg_type t ON t.oid = a.atttypid
          JOIN pg_type b ON b.oid = CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END
         WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped) AS columns
  FROM pg_class c
  JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = ANY (%s) AND c.relkind IN ('r', 'p') AND NOT c.relispartition
 ORDER BY 1, 2
"""


def discover_tables(
    connection: psycopg.Connection[tuple[object, ...]],
    schemas: list[str],
    excluded: set[str],
) -> list[Table]:
    """Every table of the replicated schemas, minus the excluded ones (partitions are reached
    through their parent)."""
    tables = []
    for schema, name, key_columns, columns in connection.execute(_DISCOVER_TABLES, (schemas,)):
        table_schema, table_name = str(schema), str(name)
        if f"{table_schema}.{table_name}" in excluded:
            continue
        column_rows = columns if isinstance(columns, list) else []
        tables.append(
            Table(
                schema=table_schema,
                name=table_name,
                key_columns=tuple(key_columns) if isinstance(key_columns, list) else (),
                columns=tuple(
                    Column(
                        name=c[0],
                        type_name=c[1],
                        generated=c[2] == "true",
                        identity_always=c[3] == "true",
                        as_text=c[4] == "true",
                        setting_dependent=c[5] == "true",
                    )
                    for c in column_rows
                ),
            )
        )
    return _with_registered_keys(connection, tables)


@dataclass(frozen=True)
class ForeignKey:
    """A foreign key of a replicated table: its columns and the parent's columns they name."""

    columns: tuple[str, ...]
    parent: sql.Identifier
    parent_columns: tuple[str, ...]


def foreign_keys(
    connection: psycopg.Connection[tuple[object, ...]], table: Table
) -> tuple[ForeignKey, ...]:
    rows = connection.execute(
        "SELECT (SELECT array_agg(a.attname::text ORDER BY k.n) FROM unnest(c.conkey)"
        "        WITH ORDINALITY AS k(attnum, n)"
        "        JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.attnum),"
        "       n.nspname::text, p.relname::text,"
        "       (SELECT array_agg(a.attname::text ORDER BY k.n) FROM unnest(c.confkey)"
        "        WITH ORDINALITY AS k(attnum, n)"
        "        JOIN pg_attribute a ON a.attrelid = c.confrelid AND a.attnum = k.attnum)"
        "  FROM pg_constraint c JOIN pg_class p ON p.oid = c.confrelid"
        "  JOIN pg_namespace n ON n.oid = p.relnamespace"
        " WHERE c.conrelid = %s::regclass AND c.contype = 'f'",
        (table.identifier.as_string(connection),),
    ).fetchall()
    return tuple(
        ForeignKey(tuple(columns), sql.Identifier(str(schema), str(name)), tuple(parents))
        for columns, schema, name, parents in rows
        if isinstance(columns, list) and isinstance(parents, list)
    )


def _with_registered_keys(
    connection: psycopg.Connection[tuple[object, ...]], tables: list[Table]
) -> list[Table]:
    """Tables without a primary key take the key setup registered for them (declared in the
    config under [replication.keys]), so every part of pgconcord sees the same key."""
    if all(table.key_columns for table in tables):
        return tables
    row = connection.execute("SELECT to_regclass('pgconcord.replicated_table')").fetchone()
    if row is None or row[0] is None:
        return tables
    registered = {
        (str(schema), str(name)): tuple(keys) if isinstance(keys, list) else ()
        for schema, name, keys in connection.execute(
            "SELECT schema_name, table_name, key_columns FROM pgconcord.replicated_table"
        )
    }
    return [
        table
        if table.key_columns
        else replace(table, key_columns=registered.get((table.schema, table.name), ()))
        for table in tables
    ]


def nullable_columns(
    connection: psycopg.Connection[tuple[object, ...]], table: Table, columns: Sequence[str]
) -> list[str]:
    """Those of the columns that may hold NULL on this node."""
    row = connection.execute(
        "SELECT coalesce(array_agg(a.attname::text ORDER BY a.attnum), '{}') FROM pg_attribute a"
        " WHERE a.attrelid = %s::regclass AND a.attname = ANY (%s) AND NOT a.attnotnull",
        (table.identifier.as_string(connection), list(columns)),
    ).fetchone()
    assert row is not None and isinstance(row[0], list)
    return [str(name) for name in row[0]]


def check_declared_key(connection: psycopg.Connection[tuple[object, ...]], table: Table) -> None:
    """A key declared in the config must be what the upsert can rely on: NOT NULL columns
    with a unique index on exactly them."""
    row = connection.execute(
        "SELECT EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = %s::regclass"
        " AND i.indisunique AND i.indpred IS NULL AND i.indexprs IS NULL"
        " AND (SELECT array_agg(a.attname::text ORDER BY a.attname) FROM pg_attribute a"
        "      WHERE a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey::int2[]))"
        "     = (SELECT array_agg(c ORDER BY c) FROM unnest(%s::text[]) c)),"
        " (SELECT array_agg(a.attname::text) FROM pg_attribute a"
        "   WHERE a.attrelid = %s::regclass AND a.attname = ANY (%s) AND NOT a.attnotnull)",
        (
            table.identifier.as_string(connection),
            list(table.key_columns),
            table.identifier.as_string(connection),
            list(table.key_columns),
        ),
    ).fetchone()
    assert row is not None
    unique, nullable = row
    if isinstance(nullable, list) and nullable:
        raise SchemaError(
            f"table {table.qualified_name}: declared key column {nullable[0]} may be NULL"
            " (make it NOT NULL)"
        )
    if not unique:
        raise SchemaError(
            f"table {table.qualified_name}: the declared key ({', '.join(table.key_columns)})"
            " needs a unique index or constraint on exactly those columns"
        )


# (audited is read from the row's jsonb: a catalog older than version 17 has no such column.)
FINGERPRINT_QUERY = """
SELECT coalesce(sum(hashtext(concat_ws(':', a.attrelid, a.attnum, a.attname, a.atttypid,
                                       a.atttypmod, a.attisdropped, a.attgenerated,
                                       a.attidentity))), 0)
       + (SELECT coalesce(sum(hashtext(concat_ws(':', t.id, t.schema_name, t.table_name,
                                                 t.key_columns, t.delta_columns, t.policy,
                                                 to_jsonb(t) -> 'audited'))), 0)
            FROM pgconcord.replicated_table t)
       + (SELECT coalesce(sum(hashtext(concat_ws(':', i.indrelid, i.indkey::text))), 0)
            FROM pg_index i
           WHERE i.indisprimary AND i.indrelid IN (SELECT c.oid FROM pg_class c
                                                     JOIN pgconcord.replicated_table t
                                                       ON c.relname = t.table_name
                                                     JOIN pg_namespace n
                                                       ON n.oid = c.relnamespace
                                                      AND n.nspname = t.schema_name))
  FROM pg_attribute a
 WHERE a.attnum > 0
   AND a.attrelid IN (SELECT c.oid FROM pg_class c
                        JOIN pgconcord.replicated_table t ON c.relname = t.table_name
                        JOIN pg_namespace n ON n.oid = c.relnamespace
                                           AND n.nspname = t.schema_name)
"""


def fingerprint(connection: psycopg.Connection[tuple[object, ...]]) -> int:
    """A number that changes whenever a replicated table's columns, key or replication
    settings change: a cheap test of whether checks made against the catalog still hold."""
    row = connection.execute(FINGERPRINT_QUERY).fetchone()
    return int(str(row[0])) if row else 0


def registered_tables(
    connection: psycopg.Connection[tuple[object, ...]],
) -> dict[tuple[str, str], int]:
    """(schema, table) -> local table id of every table whose changes are captured here."""
    rows = connection.execute(
        "SELECT schema_name, table_name, id FROM pgconcord.replicated_table"
    ).fetchall()
    return {(str(schema), str(name)): int(str(table_id)) for schema, name, table_id in rows}


def resolvers_of(
    connection: psycopg.Connection[tuple[object, ...]],
) -> dict[tuple[str, str], str]:
    """(schema, table) -> the user's resolver function, for tables that have one."""
    rows = connection.execute(
        "SELECT schema_name, table_name, resolver FROM pgconcord.replicated_table"
        " WHERE resolver IS NOT NULL"
    ).fetchall()
    return {(str(schema), str(name)): str(resolver) for schema, name, resolver in rows}


def delta_columns_of(
    connection: psycopg.Connection[tuple[object, ...]],
) -> dict[tuple[str, str], tuple[str, ...]]:
    rows = connection.execute(
        "SELECT schema_name, table_name, delta_columns FROM pgconcord.replicated_table"
    ).fetchall()
    return {
        (str(schema), str(name)): tuple(columns) if isinstance(columns, list) else ()
        for schema, name, columns in rows
    }
