"""The capture triggers: each replicated table's own capture function, generated from its
Table (columns, key, counters, policy), and the generic capture that looks the table up when
it runs (a table a schema change has just made or altered is on it until regenerated)."""

from __future__ import annotations

import psycopg
from psycopg import sql

from pgconcord.capture import wal as wal_capture
from pgconcord.catalog.migrations import read_sql
from pgconcord.catalog.tables import Column, Table

# The key of the transaction lock stampers take (stamp_captured.sql): 'pgcc', 'stmp'.
STAMP_LOCK = "1885823843, 1937006960"

# Session settings a capture function runs under when its logged text depends on them.
_PINNED = sql.SQL(
    "SET TimeZone = 'UTC' SET DateStyle = 'ISO, YMD' SET IntervalStyle = 'postgres'"
    " SET extra_float_digits = 3"
)


def install_capture(
    connection: psycopg.Connection[tuple[object, ...]],
    table: Table,
    delta_columns: tuple[str, ...] = (),
    policy: str = "last-writer-wins",
    priority: tuple[str, ...] = (),
    resolver: str | None = None,
    wal: bool | None = None,
) -> int:
    """Register the table and (re)create its capture triggers, or with wal (by default: if
    the node captures from the WAL) publish it instead; idempotent. A table without a key
    (primary or declared) is captured insert-only."""
    if wal is None:
        wal = wal_capture.slot_name(connection) is not None
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
            new_key=key_object("NEW"),
            old_key=key_object("OLD"),
            new_row=_new_row(table),
            settings=_fixed_settings(table),
            old_values=_old_values(delta_columns),
            # Under node-priority every write starts a generation: nothing is merged.
            changed_columns=_changed_columns(table, delta_columns)
            if policy != "node-priority"
            else sql.SQL("'{}'::text[]"),
            declarations=sql.SQL(""),
            prologue=sql.SQL(""),
        )
    connection.execute(function)
    triggers = [
        ("pgconcord_capture", "AFTER INSERT OR UPDATE OR DELETE", "ROW", function_name),
        ("pgconcord_truncate", "BEFORE TRUNCATE", "STATEMENT", sql.Identifier("refuse_truncate")),
    ]
    if wal:
        wal_capture.publish_table(connection, table.identifier, not table.key_columns)
        triggers = triggers[1:]
    elif wal_capture.slot_name(connection) is not None:
        wal_capture.unpublish_table(connection, table.identifier)
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


# What the generic capture reads about its table when it runs (see capture_trigger.sql).
_GENERIC_PROLOGUE = """
    SELECT t.id, t.key_columns, t.delta_columns, t.policy,
           t.key_columns || t.delta_columns
             || coalesce((SELECT array_agg(a.attname::text) FROM pg_attribute a
                           WHERE a.attrelid = TG_RELID AND a.attgenerated <> ''), '{}')
             AS unmerged
      INTO registered
      FROM pgconcord.replicated_table t
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

    connection.execute(
        sql.SQL(read_sql("capture_trigger.sql")).format(
            function_name=sql.Identifier("capture_generic"),
            table_id=sql.SQL("registered.id"),
            new_key=key_of("NEW"),
            old_key=key_of("OLD"),
            new_row=sql.SQL("pgconcord.logged_row(TG_RELID, NEW)"),
            settings=_PINNED,
            old_values=sql.SQL(
                "(SELECT jsonb_object_agg(c, to_jsonb(OLD) -> c)"
                " FROM unnest(registered.delta_columns) c)"
            ),
            changed_columns=sql.SQL(
                "CASE WHEN registered.policy = 'node-priority' THEN '{}'::text[] ELSE"
                " ARRAY(SELECT n.key FROM jsonb_each(logged) AS n"
                " WHERE n.value IS DISTINCT FROM old_logged -> n.key"
                " AND n.key <> ALL (registered.unmerged)) END"
            ),
            declarations=sql.SQL("registered record;"),
            prologue=sql.SQL(_GENERIC_PROLOGUE),
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
