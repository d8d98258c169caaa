"""pgconcord's own schema in each node's database: versioned migrations, node identity, the
registry of replicated tables and the capture triggers on them."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from importlib import resources

import psycopg
from psycopg import sql

from pgconcord.errors import ConfigError, SchemaError

SCHEMA = "pgconcord"
_MIGRATION_FILE = re.compile(r"^(\d{3})_[a-z0-9_]+\.sql$")
# Serializes concurrent setups of one database (two operators, or setup racing an agent).
_SETUP_LOCK = 0x70676363  # "pgcc"
# Session settings a capture function runs under when its logged text depends on them.
_PINNED = sql.SQL(
    "SET TimeZone = 'UTC' SET DateStyle = 'ISO, YMD' SET IntervalStyle = 'postgres'"
    " SET extra_float_digits = 3"
)


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


def read_sql(name: str) -> str:
    return resources.files("pgconcord").joinpath("sql", name).read_text(encoding="utf-8")


def migrations() -> list[tuple[int, str]]:
    found = []
    for entry in resources.files("pgconcord").joinpath("sql").iterdir():
        match = _MIGRATION_FILE.match(entry.name)
        if match:
            found.append((int(match.group(1)), entry.name))
    return sorted(found)


def latest_version() -> int:
    return migrations()[-1][0]


def installed_version(connection: psycopg.Connection[tuple[object, ...]]) -> int:
    row = connection.execute(
        "SELECT to_regclass('pgconcord.catalog_version') IS NOT NULL"
    ).fetchone()
    if not row or not row[0]:
        return 0
    version = connection.execute("SELECT version FROM pgconcord.catalog_version").fetchone()
    return int(str(version[0])) if version else 0


def migrate(connection: psycopg.Connection[tuple[object, ...]]) -> int:
    """Bring the catalog to the newest version inside the caller's transaction."""
    connection.execute("SELECT pg_advisory_xact_lock(%s)", (_SETUP_LOCK,))
    current = installed_version(connection)
    for version, file_name in migrations():
        if version <= current:
            continue
        connection.execute(read_sql(file_name).encode())
        connection.execute(
            "INSERT INTO pgconcord.catalog_version (version) VALUES (%s)"
            " ON CONFLICT (singleton) DO UPDATE SET version = excluded.version",
            (version,),
        )
        current = version
    return current


def local_node_name(connection: psycopg.Connection[tuple[object, ...]]) -> str | None:
    if installed_version(connection) == 0:
        return None
    row = connection.execute("SELECT name FROM pgconcord.local_node").fetchone()
    return str(row[0]) if row else None


def check_identity(connection: psycopg.Connection[tuple[object, ...]], node_name: str) -> None:
    """Refuse a database that already belongs to another node name."""
    existing = local_node_name(connection)
    if existing is not None and existing != node_name:
        raise ConfigError(
            f"node {node_name}: its database is already set up as node '{existing}'"
            " (two config entries for one database, or a renamed node)"
        )


def claim_identity(
    connection: psycopg.Connection[tuple[object, ...]], node_name: str, cluster_name: str
) -> None:
    check_identity(connection, node_name)
    connection.execute(
        "INSERT INTO pgconcord.local_node (name, cluster_name) VALUES (%s, %s)"
        " ON CONFLICT (singleton) DO UPDATE SET cluster_name = excluded.cluster_name",
        (node_name, cluster_name),
    )


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


FINGERPRINT_QUERY = """
SELECT coalesce(sum(hashtext(concat_ws(':', a.attrelid, a.attnum, a.attname, a.atttypid,
                                       a.atttypmod, a.attisdropped, a.attgenerated,
                                       a.attidentity))), 0)
       + (SELECT coalesce(sum(hashtext(concat_ws(':', t.id, t.schema_name, t.table_name,
                                                 t.key_columns, t.delta_columns, t.policy))), 0)
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


def install_capture(
    connection: psycopg.Connection[tuple[object, ...]],
    table: Table,
    node_name: str,
    delta_columns: tuple[str, ...] = (),
    policy: str = "last-writer-wins",
    priority: tuple[str, ...] = (),
    resolver: str | None = None,
) -> int:
    """Register the table and (re)create its capture triggers; idempotent. A table without a
    key (primary or declared) is captured insert-only."""
    row = connection.execute(
        "INSERT INTO pgconcord.replicated_table (schema_name, table_name, key_columns,"
        " delta_columns, policy, priority, resolver, relation, own_capture)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s::regclass, true)"
        " ON CONFLICT (schema_name, table_name) DO UPDATE SET key_columns = excluded.key_columns,"
        " delta_columns = excluded.delta_columns, policy = excluded.policy,"
        " priority = excluded.priority, resolver = excluded.resolver,"
        " relation = excluded.relation, own_capture = true RETURNING id",
        (
            table.schema,
            table.name,
            list(table.key_columns),
            list(delta_columns),
            policy,
            list(priority),
            resolver,
            table.identifier.as_string(connection),
        ),
    ).fetchone()
    assert row is not None
    table_id = int(str(row[0]))
    function_name = sql.Identifier(f"capture_{table_id}")

    def key_object(record: str) -> sql.Composed:
        pairs = [
            sql.SQL("{}, {}.{}").format(
                sql.Literal(column), sql.SQL(record), sql.Identifier(column)
            )
            for column in table.key_columns
        ]
        return sql.SQL("jsonb_build_object({})").format(sql.SQL(", ").join(pairs))

    if not table.key_columns:
        function = sql.SQL(read_sql("capture_insert_only.sql")).format(
            function_name=function_name,
            table_id=sql.Literal(table_id),
            new_row=_new_row(table),
            settings=_fixed_settings(table),
            declarations=sql.SQL(""),
            prologue=sql.SQL(""),
        )
    else:
        function = sql.SQL(read_sql("capture_trigger.sql")).format(
            function_name=function_name,
            table_id=sql.Literal(table_id),
            node_name=sql.Literal(node_name),
            new_key=key_object("NEW"),
            old_key=key_object("OLD"),
            new_row=_new_row(table),
            settings=_fixed_settings(table),
            old_values=_old_values(delta_columns),
            merges=sql.Literal(policy != "node-priority"),
            changed_columns=_changed_columns(table, delta_columns),
            declarations=sql.SQL(""),
            prologue=sql.SQL(""),
            **_order_keys(policy, priority, node_name),
        )
    connection.execute(function)
    triggers = [
        ("pgconcord_capture", "AFTER INSERT OR UPDATE OR DELETE", "ROW", function_name),
        ("pgconcord_truncate", "BEFORE TRUNCATE", "STATEMENT", sql.Identifier("refuse_truncate")),
    ]
    # Agents watch the change log's sequence instead (016_watch_not_notify.sql).
    connection.execute(
        sql.SQL("DROP TRIGGER IF EXISTS pgconcord_notify ON {}").format(table.identifier)
    )
    for trigger_name, events, level, target in triggers:
        connection.execute(
            sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(
                sql.Identifier(trigger_name), table.identifier
            )
        )
        connection.execute(
            sql.SQL(
                "CREATE TRIGGER {} {} ON {} FOR EACH {} EXECUTE FUNCTION pgconcord.{}()"
            ).format(
                sql.Identifier(trigger_name),
                sql.SQL(events),
                table.identifier,
                sql.SQL(level),
                target,
            )
        )
    return table_id


def _order_keys(
    policy: str, priority: tuple[str, ...], node_name: str
) -> dict[str, sql.Composable]:
    """Expressions for a write's order key (see 004_conflict_policies.sql), as the capture
    trigger's placeholders; a constant under last-writer-wins, which costs nothing per write."""
    if policy == "last-writer-wins":
        empty = sql.SQL("'{}'::bigint[]")
        return {
            name: empty
            for name in (
                "order_key_first_delete",
                "order_key_next_delete",
                "order_key_first_write",
                "order_key_next_write",
            )
        }
    level = priority.index(node_name) + 1 if node_name in priority else 0

    def call(previous: str, operation: str, clock: str) -> sql.Composable:
        return sql.SQL("pgconcord.next_order_key({}, {}, {}, {}, {}, {})").format(
            sql.Literal(policy),
            sql.Literal(level),
            sql.Literal(len(priority)),
            sql.SQL(previous),
            sql.SQL(operation),
            sql.SQL(clock),
        )

    write = 'left(TG_OP, 1)::"char"'
    return {
        "order_key_first_delete": call("NULL, NULL", "'D'", "now_clock"),
        "order_key_next_delete": call(
            "v.order_key, v.deleted", "'D'", "greatest(now_clock, v.clock + 1)"
        ),
        "order_key_first_write": call("NULL, NULL", write, "now_clock"),
        "order_key_next_write": call(
            "v.order_key, v.deleted", write, "greatest(now_clock, v.clock + 1)"
        ),
    }


def _fixed_settings(table: Table) -> sql.Composable:
    """Session settings pinned while capturing a table whose logged text would otherwise
    depend on the writer's session: floats (extra_float_digits), ranges and arrays (DateStyle,
    TimeZone), and time-zoned key columns (one row, one key). Pinning costs a little on every
    write, so tables that need none (most keys are integers or text) are left alone."""
    keys = set(table.key_columns)
    # Plain timestamps, times and intervals come out of to_jsonb() in a form any session reads
    # back the same; only as keys does their spelling (the time zone) matter.
    readable_anywhere = ("timestamp", "time ", "interval")

    def needs_pinning(column: Column) -> bool:
        if not column.setting_dependent:
            return False
        return (
            column.as_text
            or column.name in keys
            or not column.type_name.startswith(readable_anywhere)
        )

    if not any(needs_pinning(column) for column in table.stored_columns):
        return sql.SQL("")
    return _PINNED


def _new_row(table: Table, record: str = "NEW") -> sql.Composable:
    """The logged row: to_jsonb(NEW), with the columns jsonb would alter carried as their text
    (json keeps its text, floats their -0, arrays their bounds, a JSON null stays non-NULL)."""
    text_columns = [c.name for c in table.stored_columns if c.as_text]
    if not text_columns:
        return sql.SQL("to_jsonb({})").format(sql.SQL(record))
    pairs = sql.SQL(", ").join(
        sql.SQL("{}, {}.{}::text").format(sql.Literal(name), sql.SQL(record), sql.Identifier(name))
        for name in text_columns
    )
    # jsonb_object(text[]) takes any number of pairs (jsonb_build_object stops at 50).
    return sql.SQL("to_jsonb({}) || jsonb_object(ARRAY[{}])").format(sql.SQL(record), pairs)


# Types whose = operator tells values apart exactly as their text does; other columns are
# compared as text (json has no =, floats call -0 equal to 0, arrays vary by element type).
_EXACT_EQUALITY = {
    "bigint",
    "integer",
    "smallint",
    "numeric",
    "text",
    "character varying",
    "character",
    "boolean",
    "date",
    "timestamp without time zone",
    "timestamp with time zone",
    "uuid",
    "bytea",
}


def _changed_columns(table: Table, delta_columns: tuple[str, ...]) -> sql.Composable:
    """The names of the columns an update changed, as text[]: the ones it stamps with its
    version. Keys stay (an update of the key is a delete and an insert), counters add up
    instead of merging, generated columns are recomputed."""
    names = [
        column
        for column in table.stored_columns
        if column.name not in table.key_columns and column.name not in delta_columns
    ]
    if not names:
        return sql.SQL("'{}'::text[]")

    def differs(column: Column) -> sql.Composable:
        base_type = column.type_name.split("(")[0].strip()
        cast = sql.SQL("") if base_type in _EXACT_EQUALITY else sql.SQL("::text")
        return sql.SQL(
            "CASE WHEN NEW.{name}{cast} IS DISTINCT FROM OLD.{name}{cast} THEN {literal} END"
        ).format(name=sql.Identifier(column.name), cast=cast, literal=sql.Literal(column.name))

    return sql.SQL("array_remove(ARRAY[{}]::text[], NULL)").format(
        sql.SQL(", ").join(differs(column) for column in names)
    )


def _old_values(delta_columns: tuple[str, ...]) -> sql.Composable:
    """The expression logging counter columns' values before an update (NULL if none)."""
    if not delta_columns:
        return sql.SQL("NULL::jsonb")
    return sql.SQL("jsonb_build_object({})").format(
        sql.SQL(", ").join(
            sql.SQL("{}, OLD.{}").format(sql.Literal(column), sql.Identifier(column))
            for column in delta_columns
        )
    )


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


KEY_CAPACITY = 100  # slots, so at most this many nodes; every node steps its sequences by it

_OWNED_SEQUENCES = """
SELECT s.oid::regclass::text, a.attname::text
  FROM pg_class s
  JOIN pg_depend d ON d.classid = 'pg_class'::regclass AND d.objid = s.oid
                  AND d.refclassid = 'pg_class'::regclass AND d.deptype IN ('a', 'i')
  JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
 WHERE s.relkind = 'S' AND d.refobjid = %s::regclass
"""


def key_slot(connection: psycopg.Connection[tuple[object, ...]]) -> int | None:
    if installed_version(connection) < 5:
        return None
    row = connection.execute("SELECT key_slot FROM pgconcord.local_node").fetchone()
    return None if row is None or row[0] is None else int(str(row[0]))


def set_key_slot(
    connection: psycopg.Connection[tuple[object, ...]],
    slot: int,
    tables: list[Table],
    *,
    only_new: bool = False,
) -> None:
    """Make the sequences behind the tables' columns (serial, identity) and pgconcord's own
    unique_id() hand out values congruent to the slot, above every value already used; with
    only_new, just the tables' sequences that do not step by the cluster's capacity yet."""
    sequences: list[tuple[str, sql.Composable]] = []
    if not only_new:
        connection.execute("UPDATE pgconcord.local_node SET key_slot = %s", (slot,))
        sequences.append(("pgconcord.unique_id_sequence", sql.SQL("0")))
    for table in tables:
        for sequence, column in connection.execute(
            _OWNED_SEQUENCES, (table.identifier.as_string(connection),)
        ).fetchall():
            if only_new:
                step = connection.execute(
                    "SELECT seqincrement FROM pg_sequence WHERE seqrelid = %s::regclass",
                    (str(sequence),),
                ).fetchone()
                if step is not None and int(str(step[0])) == KEY_CAPACITY:
                    continue
            used = sql.SQL("(SELECT max({}) FROM {})").format(
                sql.Identifier(str(column)), table.identifier
            )
            sequences.append((str(sequence), used))
    # Sequence names come from regclass output, which PostgreSQL quotes where needed.
    for sequence, used_expression in sequences:
        connection.execute(
            sql.SQL("ALTER SEQUENCE {} INCREMENT BY {}").format(
                sql.SQL(sequence), sql.Literal(KEY_CAPACITY)
            )
        )
        highest = sql.SQL("greatest(s.last_value, {})").format(used_expression)
        # The first value above everything used that falls in this node's slot.
        connection.execute(
            sql.SQL(
                "SELECT setval({name}, (h / {capacity} + 1) * {capacity} + {slot}, false)"
                " FROM (SELECT {highest} AS h FROM {sequence} s) AS used"
            ).format(
                name=sql.Literal(sequence),
                capacity=sql.Literal(KEY_CAPACITY),
                slot=sql.Literal(slot),
                highest=highest,
                sequence=sql.SQL(sequence),
            )
        )


def ensure_positions(
    connection: psycopg.Connection[tuple[object, ...]], origins: list[str]
) -> None:
    """A new peer starts from the beginning of each origin's change log."""
    for origin in origins:
        connection.execute(
            "INSERT INTO pgconcord.position (origin, applied_snapshot)"
            " VALUES (%s, '1:1:') ON CONFLICT (origin) DO NOTHING",
            (origin,),
        )


# -- schema changes (011_schema_changes.sql) -----------------------------------------------


def installing(connection: psycopg.Connection[tuple[object, ...]]) -> None:
    """Mark the current transaction as pgconcord's own work, which the event triggers do not
    log as a schema change to replicate."""
    connection.execute("SELECT set_config('pgconcord.installing', 'on', true)")


def store_scope(
    connection: psycopg.Connection[tuple[object, ...]], schemas: list[str], excluded: list[str]
) -> None:
    connection.execute(
        "INSERT INTO pgconcord.replication_scope (schemas, excluded) VALUES (%s, %s)"
        " ON CONFLICT (singleton) DO UPDATE SET schemas = excluded.schemas,"
        " excluded = excluded.excluded",
        (schemas, excluded),
    )


EVENT_TRIGGERS = (
    ("pgconcord_schema_change", "ddl_command_end", "capture_schema_change"),
    ("pgconcord_schema_drop", "sql_drop", "capture_schema_drop"),
)


def event_trigger_statements(*, superuser_schema: bool = False) -> list[sql.Composed]:
    """What installs the event triggers that capture schema changes (superuser only): calling
    pgconcord's own functions, when pgconcord's role is a superuser (setup does it), or with
    superuser_schema the superuser-owned ones of sql/event_triggers.sql (pgconcord grant)."""
    schema = "pgconcord_event" if superuser_schema else SCHEMA
    statements: list[sql.Composed] = []
    if superuser_schema:
        statements.append(sql.Composed([sql.SQL(read_sql("event_triggers.sql"))]))
    for name, event, function in EVENT_TRIGGERS:
        statements.append(sql.SQL("DROP EVENT TRIGGER IF EXISTS {}").format(sql.Identifier(name)))
        statements.append(
            sql.SQL("CREATE EVENT TRIGGER {} ON {} EXECUTE FUNCTION {}.{}()").format(
                sql.Identifier(name),
                sql.SQL(event),
                sql.Identifier(schema),
                sql.Identifier(function),
            )
        )
    return statements


def install_event_triggers(connection: psycopg.Connection[tuple[object, ...]]) -> bool:
    """Capture schema changes; False if this role may not (event triggers need superuser)."""
    try:
        with connection.transaction():
            for statement in event_trigger_statements():
                connection.execute(statement)
    except psycopg.errors.InsufficientPrivilege:
        return False
    return True


# What the generic capture reads about its table when it runs (see capture_trigger.sql).
_GENERIC_PROLOGUE = """
    SELECT t.id, t.key_columns, t.delta_columns, t.policy, t.priority, n.name AS node,
           coalesce(array_position(t.priority, n.name), 0) AS level,
           t.key_columns || t.delta_columns
             || coalesce((SELECT array_agg(a.attname::text) FROM pg_attribute a
                           WHERE a.attrelid = TG_RELID AND a.attgenerated <> ''), '{}')
             AS unmerged
      INTO registered
      FROM pgconcord.replicated_table t, pgconcord.local_node n
     WHERE t.relation = TG_RELID;
    IF TG_OP = 'UPDATE' THEN
        old_logged := pgconcord.logged_row(TG_RELID, OLD);
    END IF;"""


def install_generic_capture(connection: psycopg.Connection[tuple[object, ...]]) -> None:
    """(Re)create pgconcord.capture_generic() and capture_generic_insert_only() from the same
    templates as every table's own function, with expressions that look the table up when
    they run instead of constants: slower, but right for any columns the table has now."""

    def key_of(record: str) -> sql.Composable:
        return sql.SQL(
            "(SELECT jsonb_object_agg(k, to_jsonb({}) -> k) FROM unnest(registered.key_columns) k)"
        ).format(sql.SQL(record))

    def order_key(previous: str, operation: str, clock: str) -> sql.Composable:
        return sql.SQL(
            "pgconcord.next_order_key(registered.policy, registered.level,"
            " cardinality(registered.priority), {}, {}, {})"
        ).format(sql.SQL(previous), sql.SQL(operation), sql.SQL(clock))

    write = 'left(TG_OP, 1)::"char"'
    connection.execute(
        sql.SQL(read_sql("capture_trigger.sql")).format(
            function_name=sql.Identifier("capture_generic"),
            table_id=sql.SQL("registered.id"),
            node_name=sql.SQL("registered.node"),
            new_key=key_of("NEW"),
            old_key=key_of("OLD"),
            new_row=sql.SQL("pgconcord.logged_row(TG_RELID, NEW)"),
            settings=_PINNED,
            old_values=sql.SQL(
                "(SELECT jsonb_object_agg(c, to_jsonb(OLD) -> c)"
                " FROM unnest(registered.delta_columns) c)"
            ),
            merges=sql.SQL("(registered.policy <> 'node-priority')"),
            changed_columns=sql.SQL(
                "ARRAY(SELECT n.key FROM jsonb_each(logged) AS n"
                " WHERE n.value IS DISTINCT FROM old_logged -> n.key"
                " AND n.key <> ALL (registered.unmerged))"
            ),
            declarations=sql.SQL("registered record;"),
            prologue=sql.SQL(_GENERIC_PROLOGUE),
            order_key_first_delete=order_key("NULL, NULL", "'D'", "now_clock"),
            order_key_next_delete=order_key(
                "v.order_key, v.deleted", "'D'", "greatest(now_clock, v.clock + 1)"
            ),
            order_key_first_write=order_key("NULL, NULL", write, "now_clock"),
            order_key_next_write=order_key(
                "v.order_key, v.deleted", write, "greatest(now_clock, v.clock + 1)"
            ),
        )
    )
    connection.execute(
        sql.SQL(read_sql("capture_insert_only.sql")).format(
            function_name=sql.Identifier("capture_generic_insert_only"),
            table_id=sql.SQL("registered.id"),
            new_row=sql.SQL("pgconcord.logged_row(TG_RELID, NEW)"),
            settings=_PINNED,
            declarations=sql.SQL("registered record;"),
            prologue=sql.SQL(
                "SELECT t.id INTO registered FROM pgconcord.replicated_table t"
                " WHERE t.relation = TG_RELID;"
            ),
        )
    )


# A table's own capture is regenerated after a schema change by its node's agent, one table
# per short transaction that takes the table's lock before anything else and waits for it
# only this long: an application's migration never queues behind it for more, and the two
# can never deadlock (the agent holds nothing the migration could be waiting for).
REGENERATE_LOCK_TIMEOUT = "100ms"

# The definition of every table in the replicated scope: what capture depends on.
_TABLE_DEFINITIONS = """
SELECT c.oid::bigint,
       (SELECT string_agg(concat_ws(':', a.attnum, a.attname, a.atttypid, a.atttypmod,
                                    a.attgenerated, a.attidentity), ',' ORDER BY a.attnum)
          FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped)
       || '|' || coalesce((SELECT i.indkey::text FROM pg_index i
                            WHERE i.indrelid = c.oid AND i.indisprimary), '')
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition
   AND pgconcord.in_scope(n.nspname::text, c.relname::text)
"""


def table_definitions(connection: psycopg.Connection[tuple[object, ...]]) -> dict[int, str]:
    """oid -> definition of every table in the replicated scope here."""
    return {int(str(oid)): str(text) for oid, text in connection.execute(_TABLE_DEFINITIONS)}


def capture_changed_tables(
    connection: psycopg.Connection[tuple[object, ...]], before: dict[int, str]
) -> None:
    """After a replayed schema change (no event trigger fires for it): put the generic capture
    on the tables it created or altered, as the event trigger does where a change is made.
    Runs in the caller's transaction, which already holds those tables' locks."""
    installing(connection)
    for relation, definition in table_definitions(connection).items():
        if before.get(relation) != definition:
            connection.execute("SELECT pgconcord.capture_generically(%s::oid)", (relation,))


def regenerate_capture(
    connection: psycopg.Connection[tuple[object, ...]], node_name: str
) -> list[str]:
    """Give every table that a schema change left on the generic capture its own capture
    function again (and its keys' slot, for a new table); a table whose lock is not free at
    once is left for the next call. The names of the tables regenerated; commits."""
    rows = connection.execute(
        "SELECT t.schema_name, t.table_name, t.delta_columns, t.policy, t.priority, t.resolver"
        " FROM pgconcord.replicated_table t JOIN pg_class c ON c.oid = t.relation"
        " JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE NOT t.own_capture AND n.nspname = t.schema_name AND c.relname = t.table_name"
        " ORDER BY 1, 2"
    ).fetchall()
    connection.commit()
    regenerated = []
    for schema_name, table_name, delta, policy, priority, resolver in rows:
        identifier = sql.Identifier(str(schema_name), str(table_name))
        try:
            with connection.transaction():
                installing(connection)
                connection.execute(
                    "SELECT set_config('lock_timeout', %s, true)", (REGENERATE_LOCK_TIMEOUT,)
                )
                connection.execute(
                    sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(identifier)
                )
                found = [
                    table
                    for table in discover_tables(connection, [str(schema_name)], set())
                    if table.name == table_name
                ]
                if not found:
                    continue
                install_capture(
                    connection,
                    found[0],
                    node_name,
                    tuple(delta) if isinstance(delta, list) else (),
                    str(policy),
                    tuple(priority) if isinstance(priority, list) else (),
                    None if resolver is None else str(resolver),
                )
                slot = key_slot(connection)
                if slot is not None:
                    # A table the event trigger registered has not had its keys' slot yet.
                    set_key_slot(connection, slot, found, only_new=True)
            regenerated.append(f"{schema_name}.{table_name}")
        except (psycopg.errors.LockNotAvailable, psycopg.errors.DeadlockDetected):
            continue
    return regenerated
