"""Changes that cannot be applied are parked with their reason instead of stalling the stream;
an operator retries them (after fixing the cause) or discards them, and the record stays.

A source transaction is parked whole, never in part: one that touches a row with a parked
change from the same origin waits behind it with all its changes (hold_followers), and the
rows it holds make later transactions wait in turn. Retried in order, a transaction at a time,
they are applied as the origin committed them."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql

from pgconcord import catalog, resolver, schema

# The apply parks changes (apply/parking.py); retry applies them again with the apply's one
# set-wise step (apply/setwise.py), never the Puller, and the apply never imports this module.
from pgconcord.apply.draining import stamp_local_changes
from pgconcord.apply.errors import (
    RacedWithLocalWrite,
    first_line,
    is_data_problem,
    is_target_problem,
)
from pgconcord.apply.plan import TablePlan
from pgconcord.apply.setwise import apply_table
from pgconcord.apply.stage import open_target
from pgconcord.config import ClusterConfig, NodeConfig
from pgconcord.conflict import change_object, recorded_conflicts
from pgconcord.conflict.records import PARKED_TYPE, RecordFilter
from pgconcord.errors import NodeUnavailable, SchemaError
from pgconcord.history.trail import audited_tables
from pgconcord.transport import connect

Connection = psycopg.Connection[tuple[object, ...]]

# How often a retry starts again when a local write raced with it.
RACED_ATTEMPTS = 5


def list_parked(
    connection: Connection, node_name: str, only: RecordFilter | None = None
) -> list[dict[str, Any]]:
    """Every parked change of one node, resolved ones included, as JSON-ready objects."""
    only = only or RecordFilter()
    if not only.wants(PARKED_TYPE):
        return []
    where, parameters = only.where("parked_at")
    records = []
    rows = connection.execute(
        sql.SQL(
            "SELECT id, parked_at, origin, schema_name, table_name, row_key, operation::text,"
            " clock, new_row, reason, state, resolved_at FROM pgconcord.parked_change"
        )
        + where,
        parameters,
    ).fetchall()
    for row in sorted(rows, key=lambda row: int(str(row[0]))):
        (
            identifier,
            parked_at,
            origin,
            schema,
            table,
            key,
            operation,
            clock,
            new_row,
            reason,
            state,
            resolved_at,
        ) = row
        records.append(
            {
                "kind": "parked",
                "node": node_name,
                "id": identifier,
                "ref": f"{node_name}:{identifier}",
                "detected_at": parked_at.isoformat() if isinstance(parked_at, datetime) else None,
                "table": f"{schema}.{table}",
                "key": key,
                "type": "apply_failed",
                "state": state,
                "reason": reason,
                "resolved_at": resolved_at.isoformat()
                if isinstance(resolved_at, datetime)
                else None,
                "incoming": change_object(clock, origin, operation, new_row),
            }
        )
    return records


def conflicts_and_parked(
    config: ClusterConfig, only: RecordFilter | None = None, node_name: str | None = None
) -> tuple[list[dict[str, Any]], list[str]]:
    """What `pgconcord conflicts --json` and the HTTP API list: every node's recorded conflicts
    and parked changes (or one node's, or those `only` lets through), as JSON-ready objects;
    and a sentence per node that could not be read. With a limit, the latest of all nodes
    together, oldest first."""
    nodes = [config.node_by_name(node_name)] if node_name else config.nodes
    records: list[dict[str, Any]] = []
    unreachable = []
    for node in nodes:
        try:
            with connect(node, autocommit=True) as connection:
                records.extend(recorded_conflicts(connection, node.name, only))
                records.extend(list_parked(connection, node.name, only))
        except NodeUnavailable as error:
            unreachable.append(str(error))
        except psycopg.errors.UndefinedTable:
            unreachable.append(f"node {node.name}: pgconcord is not set up (run pgconcord setup)")
    if only is not None and only.limit is not None:
        records.sort(key=lambda record: (str(record.get("detected_at")), record["ref"]))
        records = records[-only.limit :]
    return records, unreachable


@dataclass
class RetryReport:
    retried: list[int] = field(default_factory=list)
    still_parked: dict[int, str] = field(default_factory=dict)


def parse_reference(config: ClusterConfig, reference: str) -> tuple[NodeConfig, int]:
    """The node and id of a parked change named NODE:ID (as `pgconcord conflicts` prints it);
    ValueError for another shape, ConfigError for a node the config does not have."""
    node_name, separator, number = reference.partition(":")
    if not separator or not number.isdigit():
        raise ValueError(
            f"{reference!r}: a parked change is named NODE:ID, as `pgconcord conflicts` shows it"
        )
    return config.node_by_name(node_name), int(number)


def discard(connection: Connection, parked_id: int) -> bool:
    """Drop a parked change for good; its record stays, marked discarded."""
    with connection.transaction():
        updated = connection.execute(
            "UPDATE pgconcord.parked_change SET state = 'discarded', resolved_at = now()"
            " WHERE id = %s AND state = 'parked'",
            (parked_id,),
        ).rowcount
    return updated == 1


def retry_parked(node: NodeConfig, parked_id: int | None = None) -> RetryReport:
    """Apply parked changes again, oldest first (all of them, or the source transaction one
    belongs to), a source transaction at a time; those that fail again stay parked with the
    new reason."""
    report = RetryReport()
    target = open_target(node)
    try:
        rows = target.execute(
            "SELECT id, origin, transaction_order FROM pgconcord.parked_change p"
            " WHERE state = 'parked' AND (%(id)s::bigint IS NULL OR id = %(id)s"
            "   OR (origin, transaction_order) = (SELECT origin, transaction_order"
            "        FROM pgconcord.parked_change WHERE id = %(id)s))"
            " ORDER BY id",
            {"id": parked_id},
        ).fetchall()
        target.commit()
        groups: list[list[int]] = []
        previous: tuple[object, object] | None = None
        for identifier, origin, transaction_order in rows:
            source = (origin, transaction_order)
            if groups and transaction_order is not None and source == previous:
                groups[-1].append(int(str(identifier)))
            else:
                groups.append([int(str(identifier))])
            previous = source
        for group in groups:
            reason = _retry_group_again(target, group)
            if reason is None:
                report.retried.extend(group)
            else:
                report.still_parked.update(dict.fromkeys(group, reason))
    finally:
        target.close()
    return report


def _retry_group_again(target: Connection, identifiers: list[int]) -> str | None:
    """_retry_group, again when a local write raced with it (it then sees that write)."""
    for _ in range(RACED_ATTEMPTS - 1):
        try:
            return _retry_group(target, identifiers)
        except RacedWithLocalWrite:
            continue
    try:
        return _retry_group(target, identifiers)
    except RacedWithLocalWrite as raced:
        return f"{raced} (tried {RACED_ATTEMPTS} times)"


def _retry_group(target: Connection, identifiers: list[int]) -> str | None:
    """Retry the parked changes of one source transaction together, in their own
    transaction; None on success, else the reason."""
    with target.transaction():
        rows = target.execute(
            "SELECT id, origin, schema_name, table_name, new_row,"
            " (SELECT min(earlier.id) FROM pgconcord.parked_change earlier"
            "   WHERE earlier.state = 'parked' AND earlier.id < p.id"
            "     AND NOT earlier.id = ANY (%(group)s)"
            "     AND earlier.origin = p.origin AND earlier.schema_name = p.schema_name"
            "     AND earlier.table_name = p.table_name AND earlier.row_key = p.row_key)"
            " FROM pgconcord.parked_change p WHERE id = ANY (%(group)s) AND state = 'parked'"
            " ORDER BY id FOR UPDATE",
            {"group": identifiers},
        ).fetchall()
        if len(rows) != len(identifiers):
            return "no longer parked"
        for row in rows:
            if row[5] is not None:
                return f"waits for parked change {row[5]} of the same row"
        target.execute(
            "UPDATE pgconcord.parked_change SET state = 'retried', resolved_at = now()"
            " WHERE id = ANY (%s)",
            (identifiers,),
        )
        target.execute("TRUNCATE pgconcord_stage")
        # Before the savepoint: the stamp lock stays held through its rollback.
        stamp_local_changes(target)
        target.execute(
            "INSERT INTO pgconcord_stage SELECT 0, id, schema_name, table_name, operation,"
            " row_key, clock, previous_clock, previous_origin, new_row, old_values, order_key,"
            " generation_clock, generation_origin, column_versions"
            " FROM pgconcord.parked_change WHERE id = ANY (%s)",
            (identifiers,),
        )
        failing = ""
        try:
            with target.transaction():
                for identifier, origin, schema_name, name, new_row, _ in rows:
                    failing = f"{schema_name}.{name}"
                    if not schema_name:  # a schema change (schema.py)
                        failing = "schema change"
                        schema.run_statement(target, int(str(identifier)))
                        continue
                    plan = _plan_for_row(target, str(schema_name), str(name), new_row)
                    apply_table(
                        target,
                        plan,
                        str(origin),
                        sql.SQL("s.id = {}").format(sql.Literal(int(str(identifier)))),
                        parked_waiting=False,
                        # A retry is rare: its rows are locked before they are judged
                        # whatever the node's capture mode (setwise.RACED_LOCAL_WRITE).
                        lock_rows=True,
                    )
        except (psycopg.DatabaseError, SchemaError, resolver.Parked) as error:
            # A right the agent lacks here keeps them parked too, with that reason.
            if isinstance(error, psycopg.DatabaseError) and not (
                is_data_problem(error) or is_target_problem(error)
            ):
                raise
            reason = f"{failing}: {first_line(error)}"
            target.execute(
                "UPDATE pgconcord.parked_change SET state = 'parked', resolved_at = NULL,"
                " reason = %s WHERE id = ANY (%s)",
                (reason, identifiers),
            )
            return reason
    return None


def _plan_for_row(target: Connection, schema: str, name: str, row: object) -> TablePlan:
    """How to apply a parked row: the target's table, with the columns the row carries."""
    registered = catalog.registered_tables(target)
    tables = {t.name: t for t in catalog.discover_tables(target, [schema], set()) if t.name == name}
    if (schema, name) not in registered or name not in tables:
        raise SchemaError("table is missing on this node or not set up for replication")
    table = tables[name]
    stored = [c.name for c in table.stored_columns]
    carried = set(row) if isinstance(row, dict) else set(table.key_columns)
    generated = {c.name for c in table.columns if c.generated}
    unknown = sorted(carried - set(stored) - generated)
    if unknown:
        raise SchemaError(f"column {unknown[0]} does not exist on this node")
    return TablePlan(
        table=table,
        table_id=registered[(schema, name)],
        columns=tuple(c for c in stored if c in carried),
        delta_columns=catalog.delta_columns_of(target).get((schema, name), ()),
        resolver=catalog.resolvers_of(target).get((schema, name)),
        audited=(schema, name) in audited_tables(target),
    )
