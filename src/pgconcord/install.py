"""`pgconcord setup`: check every node can take part, then install or upgrade pgconcord's
catalog and change capture on each. Checks run on all nodes before anything is installed, so
a refused setup leaves every database as it was."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import psycopg

from pgconcord import capture, catalog, history, resolver, rights
from pgconcord.apply import first_line
from pgconcord.catalog import Table
from pgconcord.config import ClusterConfig
from pgconcord.errors import PgconcordError, SchemaError
from pgconcord.transport import check_server_version, connect


@dataclass
class SetupReport:
    tables: list[str] = field(default_factory=list)
    catalog_versions: dict[str, int] = field(default_factory=dict)


def check_tables(node_tables: dict[str, list[Table]]) -> list[Table]:
    """The tables to replicate, identical in shape on every node, or SchemaError naming the
    node, table and column that differ."""
    problems: list[str] = []
    nodes = list(node_tables)
    by_node = {node: {t.qualified_name: t for t in tables} for node, tables in node_tables.items()}
    names = sorted({name for tables in by_node.values() for name in tables})
    for name in names:
        present = [node for node in nodes if name in by_node[node]]
        missing = [node for node in nodes if name not in by_node[node]]
        if missing:
            problems.append(
                f"table {name} exists on {', '.join(present)} but not on {', '.join(missing)}"
            )
            continue
        reference_node = present[0]
        reference = by_node[reference_node][name]
        columns = {c.name: c for c in reference.columns}
        for node in present[1:]:
            other = by_node[node][name]
            other_columns = {c.name: c for c in other.columns}
            for column_name in sorted(set(columns) | set(other_columns)):
                here, there = columns.get(column_name), other_columns.get(column_name)
                if here is None or there is None:
                    has, lacks = (node, reference_node) if here is None else (reference_node, node)
                    problems.append(
                        f"table {name}: column {column_name} exists on {has} but not on {lacks}"
                    )
                elif here.type_name != there.type_name:
                    problems.append(
                        f"table {name}: column {column_name} is {here.type_name} on"
                        f" {reference_node} but {there.type_name} on {node}"
                    )
            if other.key_columns != reference.key_columns:
                problems.append(
                    f"table {name}: primary key differs between {reference_node} and {node}"
                )
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise SchemaError(problems[0] + more)
    return [by_node[nodes[0]][name] for name in names]


_COUNTER_TYPES = ("smallint", "integer", "bigint", "numeric", "real", "double precision")


def check_delta_columns(config: ClusterConfig, tables: list[Table]) -> dict[str, tuple[str, ...]]:
    """Counter columns per table, checked to exist, be numbers and not be part of the key."""
    by_name = {table.qualified_name: table for table in tables}
    counters: dict[str, tuple[str, ...]] = {}
    for qualified_name, table_config in config.conflict.table.items():
        if not table_config.delta_columns:
            continue
        table = by_name.get(qualified_name)
        if table is None:
            raise SchemaError(f"table {qualified_name} (conflict.table) does not exist")
        columns = {column.name: column for column in table.columns}
        for name in table_config.delta_columns:
            column = columns.get(name)
            if column is None:
                raise SchemaError(f"table {qualified_name}: delta column {name} does not exist")
            if not column.type_name.startswith(_COUNTER_TYPES) or column.generated:
                raise SchemaError(
                    f"table {qualified_name}: delta column {name} is {column.type_name};"
                    " counters must be stored numbers"
                )
            if name in table.key_columns:
                raise SchemaError(
                    f"table {qualified_name}: delta column {name} is part of the primary key"
                )
        counters[qualified_name] = tuple(table_config.delta_columns)
    return counters


def check_counters_not_null(
    connections: dict[str, psycopg.Connection[tuple[object, ...]]],
    tables: list[Table],
    counters: dict[str, tuple[str, ...]],
) -> None:
    """A counter that may be NULL has no difference to add when it goes to or from NULL: the
    nodes would silently end with different values, so it is refused."""
    for table in tables:
        columns = counters.get(table.qualified_name)
        if not columns:
            continue
        for node_name, connection in connections.items():
            nullable = catalog.nullable_columns(connection, table, columns)
            if nullable:
                raise SchemaError(
                    f"table {table.qualified_name}: delta column {nullable[0]} may be NULL on"
                    f" {node_name}; counters must be NOT NULL (ALTER TABLE"
                    f" {table.qualified_name} ALTER COLUMN {nullable[0]} SET NOT NULL)"
                )


def assign_key_slots(existing: dict[str, int | None]) -> dict[str, int]:
    """Keep each node's slot; give nodes without one the lowest free slots, in config order."""
    taken = {slot for slot in existing.values() if slot is not None}
    free = (slot for slot in range(catalog.KEY_CAPACITY) if slot not in taken)
    slots = {}
    for name, slot in existing.items():
        if slot is None:
            slot = next(free, None)
            if slot is None:
                raise SchemaError(f"no free key slot for node {name}: the cluster is full")
        slots[name] = slot
    return slots


def with_declared_keys(config: ClusterConfig, tables: list[Table]) -> list[Table]:
    """Tables take the key declared for them under [replication.keys]; declaring one for a
    table that has a primary key is refused, as the two could disagree."""
    result = []
    for table in tables:
        declared = config.replication.declared_key(table.schema, table.name)
        if declared and table.key_columns and declared != table.key_columns:
            raise SchemaError(
                f"table {table.qualified_name} has a primary key"
                f" ({', '.join(table.key_columns)}); remove it from [replication.keys]"
            )
        missing = [c for c in declared if c not in {column.name for column in table.columns}]
        if missing:
            raise SchemaError(
                f"table {table.qualified_name}: declared key column {missing[0]} does not exist"
            )
        result.append(replace(table, key_columns=declared) if declared else table)
    return result


def setup(config: ClusterConfig, progress: Callable[[str], None] = lambda _: None) -> SetupReport:
    connections: dict[str, psycopg.Connection[tuple[object, ...]]] = {}
    try:
        # Opened one by one inside the try: an unreachable node closes the others again.
        modes: dict[str, capture.CaptureMode] = {}
        for node in config.nodes:
            connections[node.name] = connect(node)
            check_server_version(connections[node.name], node.name)
            modes[node.name] = capture.resolve(
                connections[node.name], node.name, config.replication.capture
            )
        node_tables = {}
        for node in config.nodes:
            connection = connections[node.name]
            catalog.check_identity(connection, node.name)
            node_tables[node.name] = with_declared_keys(
                config,
                catalog.discover_tables(
                    connection, config.replication.schemas, set(config.replication.exclude)
                ),
            )
            for table in node_tables[node.name]:
                if config.replication.declared_key(table.schema, table.name):
                    catalog.check_declared_key(connection, table)
            connection.rollback()
        tables = check_tables(node_tables)
        counters = check_delta_columns(config, tables)
        check_counters_not_null(connections, tables, counters)
        history.check_audited(config, tables)
        for table in tables:
            spec = config.table_resolver(table.schema, table.name)
            if spec:
                resolver.load(spec)  # refuses, by name, a function that cannot be imported
        slots = assign_key_slots({name: catalog.key_slot(c) for name, c in connections.items()})
        check_rights(connections, tables)
        for connection in connections.values():
            connection.rollback()
        report = SetupReport(tables=[t.qualified_name for t in tables])
        for table in tables:
            if not table.key_columns:
                progress(
                    f"table {table.qualified_name} has no primary key: only its inserts are"
                    " replicated, and UPDATE or DELETE of it is refused (declare a key under"
                    " [replication.keys] to change that)"
                )
        for node in config.nodes:
            connection = connections[node.name]
            try:
                # A slot is made outside any transaction, before the tables join its
                # publication in the install's.
                slot = capture.wal.create_slot(connection) if modes[node.name] == "wal" else None
                connection.commit()
                schema_changes = _install_node(
                    config, node.name, connection, tables, counters, slots, report, slot
                )
                if slot is None and capture.wal.slot_name(connection) is not None:
                    _leave_wal_capture(connection, node.name)
            except psycopg.Error as error:
                raise PgconcordError(
                    f"node {node.name}: setup failed: {first_line(error)}"
                ) from None
            if not schema_changes:
                progress(
                    f"{node.name}: schema changes made there are not replicated: creating event"
                    " triggers needs a superuser (`pgconcord grant ROLE --node"
                    f" {node.name}` prints the statements for one to run)"
                )
            progress(
                f"{node.name}: catalog v{report.catalog_versions[node.name]},"
                f" capture ({modes[node.name]}) on {len(tables)} tables"
            )
        return report
    finally:
        for connection in connections.values():
            connection.close()


def _install_node(
    config: ClusterConfig,
    node_name: str,
    connection: psycopg.Connection[tuple[object, ...]],
    tables: list[Table],
    counters: dict[str, tuple[str, ...]],
    slots: dict[str, int],
    report: SetupReport,
    wal_slot: str | None = None,
) -> bool:
    """Install on one node in one transaction; whether schema changes are captured there.
    With wal_slot, its tables are captured from the WAL from that transaction on."""
    with connection.transaction():
        catalog.installing(connection)
        report.catalog_versions[node_name] = catalog.migrate(connection)
        if wal_slot is not None:
            capture.wal.start(connection, wal_slot)
        catalog.claim_identity(connection, node_name, config.cluster.name)
        catalog.store_scope(connection, config.replication.schemas, config.replication.exclude)
        catalog.install_generic_capture(connection)
        audited: set[int] = set()
        for table in tables:
            policy, priority = config.table_policy(table.schema, table.name)
            table_id = catalog.install_capture(
                connection,
                table,
                counters.get(table.qualified_name, ()),
                policy,
                priority,
                config.table_resolver(table.schema, table.name),
                wal=wal_slot is not None,
            )
            if table.qualified_name in config.audit.tables:
                history.install_audit(connection, table, table_id, node_name)
                audited.add(table_id)
        history.remove_audit(connection, audited)
        catalog.ensure_positions(
            connection, [peer for peer in config.node_names if peer != node_name]
        )
        catalog.set_key_slot(connection, slots[node_name], tables)
        # A superuser may have created them for this role (pgconcord grant): keep those.
        if not rights.event_triggers_missing(connection):
            return True
        return catalog.install_event_triggers(connection)


def check_rights(
    connections: dict[str, psycopg.Connection[tuple[object, ...]]], tables: list[Table]
) -> None:
    """Refuse, before anything is installed, a role that lacks a right it needs on some node,
    naming each node and right."""
    problems = []
    for name, connection in connections.items():
        row = connection.execute("SELECT current_user").fetchone()
        role = str(row[0]) if row else "?"
        for missing in rights.missing_rights(connection, role, tables):
            problems.append(f"node {name}: role {role} lacks {missing.right}")
        for cast in rights.untrusted_casts(connection):
            problems.append(
                f"node {name}: the cast {cast} runs a function of a role that is not a"
                " superuser, which capture would run with pgconcord's rights (drop it, or"
                " make it WITH INOUT or as a superuser)"
            )
        connection.rollback()
    if problems:
        raise PgconcordError(
            "; ".join(problems)
            + " (`pgconcord grant ROLE` prints the statements for a superuser to run)"
        )


def _leave_wal_capture(connection: psycopg.Connection[tuple[object, ...]], node_name: str) -> None:
    """A node moved back to trigger capture (its tables left the publication, committed):
    drain what its slot still holds of the time before (ending an agent's stream of it),
    then drop the slot."""
    capture.wal.drain_for_good(connection, node_name)
    with connection.transaction():
        capture.wal.stop(connection)
