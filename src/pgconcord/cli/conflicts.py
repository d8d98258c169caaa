"""`pgconcord conflicts`: the conflicts recorded and the changes parked on every node, and
`retry` and `discard` for the parked ones."""

from __future__ import annotations

import sys
from datetime import UTC, datetime, timedelta
from typing import Any

import click
import psycopg

from pgconcord.cli.conflict_text import colliding_value, conflict_lines, parked_lines
from pgconcord.cli.options import _load, _print_json, config_option, console, json_option
from pgconcord.config import ClusterConfig, NodeConfig, parse_duration
from pgconcord.conflict.records import PARKED_TYPE, RecordFilter
from pgconcord.errors import NodeUnavailable, PgconcordError

_UNIQUE_TYPES = ("insert_exists", "update_exists", "multiple_unique_conflicts")
RECORD_TYPES = (
    "insert_exists",
    "update_exists",
    "multiple_unique_conflicts",
    "update_origin_differs",
    "update_deleted",
    "delete_origin_differs",
    "delete_missing",
    "insert_deleted",
    "parent_missing",
    PARKED_TYPE,
)

# A table's unique constraints besides its key, to name the value two rows collided on.
_UNIQUE_COLUMNS = """
SELECT array_agg(a.attname::text ORDER BY k.position)
  FROM pg_index i
  JOIN pg_class c ON c.oid = i.indrelid
  JOIN pg_namespace n ON n.oid = c.relnamespace
 CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, position)
  JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
 WHERE n.nspname = %s AND c.relname = %s AND i.indisunique AND NOT i.indisprimary
 GROUP BY i.indexrelid
"""


def _since(_context: click.Context, _param: click.Parameter, value: str | None) -> datetime | None:
    """A duration back from now ("90m", "2d") or a timestamp ("2026-03-01", ISO 8601)."""
    if value is None:
        return None
    text = value.strip()
    try:
        return datetime.now(UTC) - timedelta(seconds=parse_duration(text))
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise click.BadParameter(
            f"{text!r} is neither a duration (such as 30m, 12h, 7d) nor a timestamp"
            " (such as 2026-03-01 or 2026-03-01T12:00:00+00:00)"
        ) from None
    # A timestamp without a zone is the local time of the person typing it.
    return moment if moment.tzinfo else moment.astimezone()


def _table_name(
    _context: click.Context, _param: click.Parameter, value: str | None
) -> tuple[str | None, str] | None:
    if value is None:
        return None
    schema, dot, table = value.rpartition(".")
    if not table or (dot and not schema):
        raise click.BadParameter(f"{value!r} is not SCHEMA.TABLE (or TABLE, in any schema)")
    return (schema if dot else None), table


@click.group(invoke_without_command=True)
@config_option
@json_option
@click.option(
    "--since",
    metavar="DURATION|TIMESTAMP",
    callback=_since,
    help="Only records this recent: 30m, 12h, 7d, or a time.",
)
@click.option(
    "--table", "table_name", metavar="SCHEMA.TABLE", callback=_table_name, help="Only this table."
)
@click.option(
    "--type",
    "record_type",
    type=click.Choice(RECORD_TYPES),
    metavar="TYPE",
    help=f"Only this type: {', '.join(RECORD_TYPES)}.",
)
@click.option("--node", "node_name", metavar="NAME", help="Only the records of this node.")
@click.option("--limit", type=click.IntRange(min=1), metavar="N", help="Only the latest N.")
@click.pass_context
def conflicts(
    context: click.Context,
    config_path: str | None,
    as_json: bool,
    since: datetime | None,
    table_name: tuple[str | None, str] | None,
    record_type: str | None,
    node_name: str | None,
    limit: int | None,
) -> None:
    """Recorded conflicts and parked changes; `retry` and `discard` act on parked ones."""
    context.ensure_object(dict)
    context.obj["config_path"] = config_path
    if context.invoked_subcommand is not None:
        return
    from pgconcord.parked import conflicts_and_parked

    config = _load(config_path)
    only = RecordFilter(
        since=since,
        schema=table_name[0] if table_name else None,
        table=table_name[1] if table_name else None,
        type=record_type,
        limit=limit,
    )
    records, unreachable = conflicts_and_parked(config, only, node_name)
    for line in unreachable:
        click.echo(line, err=True)
    if as_json:
        _print_json(records)
    else:
        _print_conflicts(records, _colliding_values(config, records))
    if unreachable:
        sys.exit(1)


def _colliding_values(config: ClusterConfig, records: list[dict[str, Any]]) -> dict[str, str]:
    """For the text view: the unique value each unique conflict collided on, by ref, read
    from the unique indexes of the nodes that recorded one."""
    from pgconcord.transport import connect

    nodes = {r["node"] for r in records if r["kind"] == "conflict" and r["type"] in _UNIQUE_TYPES}
    values: dict[str, str] = {}
    for name in sorted(nodes):
        try:
            with connect(config.node_by_name(name), autocommit=True) as connection:
                values.update(_unique_values(connection, [r for r in records if r["node"] == name]))
        except (NodeUnavailable, psycopg.Error):
            continue  # the rows are shown all the same, without the name of the value
    return values


def _unique_values(
    connection: psycopg.Connection[tuple[object, ...]], records: list[dict[str, Any]]
) -> dict[str, str]:
    indexes: dict[str, list[list[str]]] = {}
    values = {}
    for record in records:
        if record["kind"] != "conflict" or record["type"] not in _UNIQUE_TYPES:
            continue
        table = record["table"]
        if table not in indexes:
            schema, _, name = table.partition(".")
            indexes[table] = [
                [str(column) for column in columns]
                for (columns,) in connection.execute(_UNIQUE_COLUMNS, (schema, name))
                if isinstance(columns, list)
            ]
        value = colliding_value(record, indexes[table])
        if value:
            values[record["ref"]] = value
    return values


def _print_conflicts(records: list[dict[str, Any]], unique_values: dict[str, str]) -> None:
    resolved = [r for r in records if r["kind"] == "conflict"]
    waiting = [r for r in records if r["kind"] == "parked" and r["state"] == "parked"]
    if not resolved and not waiting:
        click.echo("no conflicts recorded and no changes parked")
        return
    # Plain lines, not a table: a table is cut to the terminal's width, and a pipe has none.
    click.echo(f"{len(resolved)} conflicts resolved")
    for record in resolved:
        click.echo("")
        for line in conflict_lines(record, unique_values.get(record["ref"])):
            click.echo(line)
    if waiting:
        click.echo("")
        click.echo(f"{len(waiting)} changes parked (pgconcord conflicts retry [NODE:ID])")
        for record in waiting:
            click.echo("")
            for line in parked_lines(record):
                click.echo(line)


def _parked_reference(config: ClusterConfig, reference: str) -> tuple[NodeConfig, int]:
    from pgconcord.parked import parse_reference

    try:
        return parse_reference(config, reference)
    except ValueError as error:
        raise click.BadParameter(str(error)) from None


@conflicts.command()
@config_option
@click.argument("reference", required=False, metavar="[NODE:ID]")
@click.pass_context
def retry(context: click.Context, config_path: str | None, reference: str | None) -> None:
    """Apply parked changes again (all of them, or one) after the cause was fixed."""
    from pgconcord.parked import retry_parked

    config = _load(config_path or context.obj.get("config_path"))
    targets = (
        [_parked_reference(config, reference)]
        if reference
        else [(node, None) for node in config.nodes]
    )
    failed = 0
    for node, number in targets:
        report = retry_parked(node, number)
        for identifier in report.retried:
            console.print(f"{node.name}:{identifier} applied", highlight=False)
        for identifier, reason in report.still_parked.items():
            failed += 1
            console.print(f"{node.name}:{identifier} still parked: {reason}", highlight=False)
        if number is not None and not report.retried and not report.still_parked:
            raise PgconcordError(f"{node.name}:{number} is not a parked change")
    if failed:
        raise PgconcordError(f"{failed} changes are still parked")


@conflicts.command()
@config_option
@click.argument("reference", metavar="NODE:ID")
@click.pass_context
def discard(context: click.Context, config_path: str | None, reference: str) -> None:
    """Drop one parked change for good (its record stays, marked discarded)."""
    from pgconcord.parked import discard as discard_parked
    from pgconcord.transport import connect

    config = _load(config_path or context.obj.get("config_path"))
    node, number = _parked_reference(config, reference)
    with connect(node) as connection:
        if not discard_parked(connection, number):
            raise PgconcordError(f"{reference} is not a parked change")
    console.print(f"{reference} discarded", highlight=False)
