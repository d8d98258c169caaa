"""`pgconcord conflicts`: the conflicts recorded and the changes parked on every node, and
`retry` and `discard` for the parked ones."""

from __future__ import annotations

import json
import sys
from typing import Any

import click
from rich.table import Table as RichTable

from pgconcord.cli.options import _load, _print_json, config_option, console, json_option
from pgconcord.config import ClusterConfig, NodeConfig
from pgconcord.errors import PgconcordError


@click.group(invoke_without_command=True)
@config_option
@json_option
@click.pass_context
def conflicts(context: click.Context, config_path: str | None, as_json: bool) -> None:
    """Recorded conflicts and parked changes; `retry` and `discard` act on parked ones."""
    context.ensure_object(dict)
    context.obj["config_path"] = config_path
    if context.invoked_subcommand is not None:
        return
    from pgconcord.parked import conflicts_and_parked

    records, unreachable = conflicts_and_parked(_load(config_path))
    for line in unreachable:
        click.echo(line, err=True)
    if as_json:
        _print_json(records)
    else:
        _print_conflicts(records)
    if unreachable:
        sys.exit(1)


def _print_conflicts(records: list[dict[str, Any]]) -> None:
    resolved = [r for r in records if r["kind"] == "conflict"]
    waiting = [r for r in records if r["kind"] == "parked" and r["state"] == "parked"]
    if not resolved and not waiting:
        console.print("no conflicts recorded and no changes parked", highlight=False)
        return
    table = RichTable(title=f"{len(resolved)} conflicts resolved")
    for heading in ("node", "when", "table", "key", "type", "kept"):
        table.add_column(heading)
    for record in resolved:
        winner = record["incoming"] if record["resolution"] == "incoming" else record["local"]
        table.add_row(
            record["node"],
            str(record["detected_at"])[:19],
            record["table"],
            json.dumps(record["key"]),
            record["type"],
            f"{winner['origin']}'s version",
        )
    console.print(table)
    parked_table = RichTable(title=f"{len(waiting)} changes parked (pgconcord conflicts retry)")
    for heading in ("id", "from", "table", "key", "reason"):
        parked_table.add_column(heading)
    for record in waiting:
        parked_table.add_row(
            record["ref"],
            record["incoming"]["origin"],
            record["table"],
            json.dumps(record["key"]),
            record["reason"],
        )
    console.print(parked_table)


def _parked_reference(config: ClusterConfig, reference: str) -> tuple[NodeConfig, int]:
    node_name, separator, number = reference.partition(":")
    if not separator or not number.isdigit():
        raise click.BadParameter(
            f"{reference!r}: a parked change is named NODE:ID, as `pgconcord conflicts` shows it"
        )
    return config.node_by_name(node_name), int(number)


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
