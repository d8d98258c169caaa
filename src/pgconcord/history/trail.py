"""The audit trail on one node: the audit trigger of each audited table (installed and removed
by setup), which tables are audited (the apply's plans ask), and the purge of old rows."""

from __future__ import annotations

import logging

import psycopg
from psycopg import sql

from pgconcord.catalog import Table, read_sql
from pgconcord.catalog.capture import _fixed_settings

log = logging.getLogger(__name__)

Connection = psycopg.Connection[tuple[object, ...]]

TRIGGER = "pgconcord_history"
# A trigger with transition tables takes one event: one trigger per event, one function.
_TRIGGERS = (
    ("insert", "INSERT", "NEW TABLE AS new_rows"),
    ("update", "UPDATE", "OLD TABLE AS old_rows NEW TABLE AS new_rows"),
    ("delete", "DELETE", "OLD TABLE AS old_rows"),
)


def _key_of(table: Table, values: str) -> sql.Composable:
    """The row's key as the capture writes it (catalog.capture), read from its jsonb."""
    return sql.SQL("jsonb_build_object({})").format(
        sql.SQL(", ").join(
            sql.SQL("{name}, {values} -> {name}").format(
                name=sql.Literal(column), values=sql.SQL(values)
            )
            for column in table.key_columns
        )
    )


def install_audit(connection: Connection, table: Table, table_id: int, node_name: str) -> None:
    """(Re)create the audit trigger of one registered table and mark it audited; idempotent."""
    function_name = sql.Identifier(f"audit_{table_id}")
    connection.execute(
        sql.SQL(read_sql("audit_trigger.sql")).format(
            function_name=function_name,
            table_id=sql.Literal(table_id),
            node_name=sql.Literal(node_name),
            settings=_fixed_settings(table),
            old_key=_key_of(table, "r.row_values"),
            new_key=_key_of(table, "r.row_values"),
        )
    )
    for suffix, event, transition in _TRIGGERS:
        name = sql.Identifier(f"{TRIGGER}_{suffix}")
        connection.execute(
            sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(name, table.identifier)
        )
        connection.execute(
            sql.SQL(
                "CREATE TRIGGER {} AFTER {} ON {} REFERENCING {}"
                " FOR EACH STATEMENT EXECUTE FUNCTION pgconcord.{}()"
            ).format(name, sql.SQL(event), table.identifier, sql.SQL(transition), function_name)
        )
    connection.execute(
        "UPDATE pgconcord.replicated_table SET audited = true WHERE id = %s", (table_id,)
    )


def remove_audit(connection: Connection, keep: set[int]) -> list[str]:
    """Drop the audit trigger of every registered table whose id is not in keep (no longer
    listed under [audit]); the names of the tables it was dropped from. Their rows stay in
    the trail until the purge."""
    rows = connection.execute(
        "SELECT t.id, (SELECT c.oid::regclass::text FROM pg_class c WHERE c.oid = t.relation)"
        " FROM pgconcord.replicated_table t"
        " WHERE t.audited OR EXISTS (SELECT 1 FROM pg_trigger g"
        "   WHERE g.tgrelid = t.relation AND g.tgname = ANY (%s))",
        ([f"{TRIGGER}_{suffix}" for suffix, _, _ in _TRIGGERS],),
    ).fetchall()
    removed = []
    for table_id, relation in rows:
        identifier = int(str(table_id))
        if identifier in keep:
            continue
        if relation is not None:
            # relation is regclass text: already quoted where needed.
            for suffix, _, _ in _TRIGGERS:
                connection.execute(
                    sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(
                        sql.Identifier(f"{TRIGGER}_{suffix}"), sql.SQL(str(relation))
                    )
                )
            removed.append(str(relation))
        connection.execute(
            sql.SQL("DROP FUNCTION IF EXISTS pgconcord.{}()").format(
                sql.Identifier(f"audit_{identifier}")
            )
        )
        connection.execute(
            "UPDATE pgconcord.replicated_table SET audited = false WHERE id = %s", (identifier,)
        )
    return removed


def audited_tables(connection: Connection) -> frozenset[tuple[str, str]]:
    """(schema, table) of every table audited here (none on a catalog older than row
    history's, version 17, which an agent of this version may meet before setup ran)."""
    rows = connection.execute(
        "SELECT schema_name, table_name FROM pgconcord.replicated_table t"
        " WHERE (to_jsonb(t) ->> 'audited')::boolean"
    ).fetchall()
    return frozenset((str(schema), str(name)) for schema, name in rows)


# The BRIN index on recorded_at finds the old block ranges; rows come in time order.
_OLD_ROWS = "DELETE FROM pgconcord.audit WHERE recorded_at < now() - make_interval(secs => %s)"


def purge_audit(connection: Connection, node_name: str, keep_seconds: float, keep: str) -> int:
    """Delete the node's audit rows older than audit.keep, in a transaction of its own; how
    many. A failure is logged and does not stop the rest of the purge."""
    try:
        with connection.transaction():
            deleted = connection.execute(_OLD_ROWS, (keep_seconds,)).rowcount
    except psycopg.OperationalError:
        raise
    except psycopg.DatabaseError as error:
        if isinstance(error, psycopg.errors.UndefinedTable):
            return 0  # a node set up before row history existed
        log.warning(
            "%s: audit rows older than %s not deleted: %s",
            node_name,
            keep,
            str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__,
        )
        return 0
    if deleted > 0:
        log.info("%s: deleted %d audit rows older than %s", node_name, deleted, keep)
    return max(deleted, 0)
