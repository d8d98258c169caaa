"""The rights pgconcord's role needs on a node, checked before setup installs anything, and the
statements that grant them (`pgconcord grant ROLE` prints them for a superuser to run).

The role in the config's DSN installs pgconcord's schema (so it owns it and the SECURITY
DEFINER capture functions in it), creates capture triggers on the replicated tables and steps
their sequences (which takes the rights of the tables' owners: membership in the owning role),
applies changes with session_replication_role = replica (a superuser's setting, which
PostgreSQL 15 and newer can grant), and runs replicated schema changes as the roles that made
them (membership again). Event triggers, which capture schema changes, only a superuser can
create; setup says so, and the statements below include them once pgconcord's schema exists.
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
from psycopg import sql

from pgconcord.capture import wal as wal_capture
from pgconcord.capture import wal_level
from pgconcord.catalog import EVENT_TRIGGERS, Table, discover_tables, event_trigger_statements
from pgconcord.config import ClusterConfig
from pgconcord.transport import connect

Connection = psycopg.Connection[tuple[object, ...]]


# Superuser settings the agent's sessions set (PostgreSQL 15 and newer can grant them).
_SETTINGS = (
    ("session_replication_role", "applied changes must not be captured again"),
    (
        "deadlock_timeout",
        "when applying meets an application's transaction in a deadlock, pgconcord's side is"
        " the one rolled back and retried",
    ),
)


@dataclass(frozen=True)
class MissingRight:
    """A right the role lacks on a node: what it is for, and the statement that grants it."""

    right: str
    statement: str


def _text(connection: Connection, composable: sql.Composable) -> str:
    return composable.as_string(connection)


def missing_rights(connection: Connection, role: str, tables: list[Table]) -> list[MissingRight]:
    """What `role` lacks on this node to set up and run pgconcord for these tables."""
    row = connection.execute(
        "SELECT r.rolsuper, current_setting('server_version_num')::int,"
        " has_database_privilege(r.oid, current_database(), 'CREATE'),"
        " (SELECT pg_has_role(r.oid, n.nspowner, 'USAGE') FROM pg_namespace n"
        "   WHERE n.nspname = 'pgconcord'),"
        " current_database()"
        " FROM pg_roles r WHERE r.rolname = %s",
        (role,),
    ).fetchone()
    if row is None:
        return [MissingRight(f"a role named {role}", _text(connection, _create_role(role)))]
    superuser, version, may_create, owns_schema, database = row
    if superuser:
        return []
    missing = []
    grantee = sql.Identifier(role)
    if owns_schema is False:
        missing.append(
            MissingRight(
                "ownership of the pgconcord schema (it was installed by another role)",
                _text(
                    connection,
                    sql.SQL("GRANT {} TO {}").format(
                        sql.Identifier(_schema_owner(connection)), grantee
                    ),
                ),
            )
        )
    elif owns_schema is None and not may_create:
        missing.append(
            MissingRight(
                "CREATE on the database (to install the pgconcord schema)",
                _text(
                    connection,
                    sql.SQL("GRANT CREATE ON DATABASE {} TO {}").format(
                        sql.Identifier(str(database)), grantee
                    ),
                ),
            )
        )
    if int(str(version)) < 150000:
        missing.append(
            MissingRight(
                "superuser (before PostgreSQL 15 only a superuser may set"
                " session_replication_role, which keeps applied changes from echoing)",
                _text(connection, sql.SQL("ALTER ROLE {} SUPERUSER").format(grantee)),
            )
        )
    else:
        for parameter, purpose in _SETTINGS:
            may_set = connection.execute(
                "SELECT has_parameter_privilege(%s, %s, 'SET')", (role, parameter)
            ).fetchone()
            if not (may_set and may_set[0]):
                missing.append(
                    MissingRight(
                        f"SET on {parameter} ({purpose})",
                        _text(
                            connection,
                            sql.SQL("GRANT SET ON PARAMETER {} TO {}").format(
                                sql.SQL(parameter), grantee
                            ),
                        ),
                    )
                )
    forced = [
        table.qualified_name
        for table in tables
        if (
            row := connection.execute(
                "SELECT c.relforcerowsecurity AND NOT r.rolbypassrls FROM pg_class c,"
                " pg_roles r WHERE c.oid = %s::regclass AND r.rolname = %s",
                (_text(connection, table.identifier), role),
            ).fetchone()
        )
        and row[0]
    ]
    if forced:
        # Row-level security that applies even to the owner would hide rows from the agent:
        # its updates and deletes would silently match nothing.
        missing.append(
            MissingRight(
                f"BYPASSRLS (row-level security is forced on {', '.join(forced)})",
                _text(connection, sql.SQL("ALTER ROLE {} BYPASSRLS").format(grantee)),
            )
        )
    owners: dict[str, list[str]] = {}
    for table in tables:
        owner = connection.execute(
            "SELECT c.relowner::regrole::text, pg_has_role(%s, c.relowner, 'USAGE')"
            " FROM pg_class c WHERE c.oid = %s::regclass",
            (role, _text(connection, table.identifier)),
        ).fetchone()
        if owner is not None and not owner[1]:
            owners.setdefault(str(owner[0]), []).append(table.qualified_name)
    for owner_name, names in sorted(owners.items()):
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        missing.append(
            MissingRight(
                f"the rights of {owner_name}, which owns {shown} (capture triggers, key"
                f" sequences, and schema changes made as {owner_name})",
                # regrole text is already quoted where needed.
                _text(connection, sql.SQL("GRANT {} TO {}").format(sql.SQL(owner_name), grantee)),
            )
        )
    return missing


def untrusted_casts(connection: Connection) -> list[str]:
    """Casts with a function a non-superuser owns: to_jsonb() and ::text call them by
    themselves, so capture, which runs with pgconcord's rights, would run that function."""
    rows = connection.execute(
        "SELECT format('(%s AS %s) WITH FUNCTION %s', c.castsource::regtype,"
        " c.casttarget::regtype, c.castfunc::regprocedure)"
        " FROM pg_cast c JOIN pg_proc p ON p.oid = c.castfunc"
        " JOIN pg_roles r ON r.oid = p.proowner WHERE NOT r.rolsuper ORDER BY 1"
    ).fetchall()
    return [str(row[0]) for row in rows]


def _schema_owner(connection: Connection) -> str:
    row = connection.execute(
        "SELECT nspowner::regrole::text FROM pg_namespace WHERE nspname = 'pgconcord'"
    ).fetchone()
    return str(row[0]) if row else "?"


def _create_role(role: str) -> sql.Composable:
    return sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role))


def event_triggers_missing(connection: Connection) -> bool:
    """Whether pgconcord's schema is installed here without its event triggers."""
    row = connection.execute(
        "SELECT to_regprocedure('pgconcord.capture_schema_change()') IS NOT NULL,"
        " (SELECT count(*) FROM pg_event_trigger WHERE evtname = ANY (%s))",
        ([name for name, _, _ in EVENT_TRIGGERS],),
    ).fetchone()
    return bool(row and row[0] and int(str(row[1])) < len(EVENT_TRIGGERS))


def event_trigger_script(connection: Connection) -> list[sql.Composed]:
    """The statements a superuser runs to create the event triggers here, after setup: calling
    functions of a superuser's own schema unless pgconcord's role is a superuser itself (a
    role that owns what every schema change of the database runs could make itself one)."""
    row = connection.execute(
        "SELECT r.rolsuper FROM pg_namespace n JOIN pg_roles r ON r.oid = n.nspowner"
        " WHERE n.nspname = 'pgconcord'"
    ).fetchone()
    return event_trigger_statements(superuser_schema=not (row and row[0]))


def grant_script(
    connection: Connection, role: str, tables: list[Table], capture: str = "trigger"
) -> list[str]:
    """The statements that give `role` what it lacks on this node (and, on a node with
    wal_level = logical, what WAL capture needs: statements under "wal", comments under
    "auto"), and the event triggers if pgconcord is installed here without them; each ends
    with a semicolon (or is a comment)."""
    lines = [
        f"{missing.statement};  -- {missing.right}"
        for missing in missing_rights(connection, role, tables)
    ]
    if capture != "trigger" and wal_level(connection) == "logical":
        # Under "auto" they are a choice (without them the node captures with triggers):
        # printed as comments, to run by hand.
        prefix = "" if capture == "wal" else "-- "
        lines += [
            f'{prefix}{statement};  -- WAL capture (capture = "{capture}")'
            for statement in wal_capture.missing_rights(connection, role)
        ]
    if event_triggers_missing(connection):
        lines += [
            _text(connection, statement).rstrip().rstrip(";") + ";"
            for statement in event_trigger_script(connection)
        ]
    return lines


def grant_scripts(
    config: ClusterConfig, role: str, node_name: str | None = None
) -> dict[str, list[str]]:
    """Per node (all, or one), the statements a superuser runs there so that `role` can set
    up and run pgconcord (`pgconcord grant ROLE`)."""
    nodes = [config.node_by_name(node_name)] if node_name else config.nodes
    scripts = {}
    for node in nodes:
        with connect(node) as connection:
            tables = discover_tables(
                connection, config.replication.schemas, set(config.replication.exclude)
            )
            scripts[node.name] = grant_script(connection, role, tables, config.replication.capture)
    return scripts
