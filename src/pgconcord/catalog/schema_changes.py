"""Schema changes (011_schema_changes.sql): the event triggers that capture them, the scope
they apply to, and the regeneration of a table's own capture after one."""

from __future__ import annotations

import psycopg
from psycopg import sql

from pgconcord.catalog.capture import install_capture
from pgconcord.catalog.migrations import SCHEMA, read_sql
from pgconcord.catalog.node import key_slot, set_key_slot
from pgconcord.catalog.tables import discover_tables


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


def regenerate_capture(connection: psycopg.Connection[tuple[object, ...]]) -> list[str]:
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
