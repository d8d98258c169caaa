"""What the demo prints once the workload has stopped: rows per table, what the workload and
replication did, the conflicts recorded (a few deliberate ones in full), and verify's verdict."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from pgconcord.config import ClusterConfig
from pgconcord.conflict import recorded_conflicts
from pgconcord.demo.view import DemoRun, _number
from pgconcord.demo.workload import ConflictRound, _round_column
from pgconcord.errors import NodeUnavailable
from pgconcord.transport import connect
from pgconcord.verify import VerifyReport

EXAMPLE_CONFLICTS = 3


def _all_conflicts(config: ClusterConfig, console: Console) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    for node in config.nodes:
        try:
            with connect(node, autocommit=True) as connection:
                records.extend(recorded_conflicts(connection, node.name))
        except NodeUnavailable as error:
            console.print(f"conflicts of {error}", style="red", highlight=False)
    return records


def _pick_examples(
    records: list[dict[str, Any]], rounds: Sequence[ConflictRound]
) -> list[dict[str, Any]]:
    """A few conflicts between the writes of deliberate rounds (not ordinary writes that hit
    the same row), from both tables and with both outcomes when there are some."""
    candidates = []
    for record in records:
        local, incoming = record["local"]["row"], record["incoming"]["row"]
        if record["type"] != "update_origin_differs" or not local or not incoming:
            continue
        for conflict_round in rounds:
            column = _round_column(conflict_round.table)
            written = {str(value) for value in conflict_round.values.values()}
            if (
                record["table"] == f"public.{conflict_round.table}"
                and (record["key"] or {}).get("id") == conflict_round.key
                and _as_text(local.get(column)) in written
                and _as_text(incoming.get(column)) in written
            ):
                candidates.append(record)
                break
    examples: list[dict[str, Any]] = []
    seen: set[str] = set()
    wishes = [("customers", "incoming"), ("products", "local"), ("", "")]
    for table, resolution in wishes:
        for record in candidates:
            identity = f"{record['table']} {record['key']}"
            if identity in seen or (table and record["table"] != f"public.{table}"):
                continue
            if resolution and record["resolution"] != resolution:
                continue
            examples.append(record)
            seen.add(identity)
            break
    return examples[:EXAMPLE_CONFLICTS]


def _as_text(value: object) -> str:
    # jsonb numbers arrive as floats; the planned prices are Decimals with two places.
    if isinstance(value, float):
        return str(Decimal(str(value)).quantize(Decimal("0.01")))
    return str(value)


def _example(record: dict[str, Any]) -> RenderableType:
    local, incoming = record["local"], record["incoming"]
    # updated_at differs in every pair of concurrent writes and says nothing about the outcome.
    columns = [
        column
        for column in incoming["row"]
        if column != "updated_at" and local["row"].get(column) != incoming["row"].get(column)
    ]
    gap = abs(int(incoming["clock"]) - int(local["clock"])) / 1000
    title = Text(
        f"{record['table']} {json.dumps(record['key'])}: {record['type']} seen on"
        f" {record['node']}, the writes {gap:.1f} ms apart"
    )
    table = Table()
    table.add_column("version")
    table.add_column("written by")
    for column in columns:
        table.add_column(column)
    table.add_column("outcome")
    for role, version in (("local", local), ("incoming", incoming)):
        kept = record["resolution"] == role
        table.add_row(
            role,
            str(version["origin"]),
            *(_as_text(version["row"].get(column)) for column in columns),
            Text("kept (later write)" if kept else "discarded", style="green" if kept else "dim"),
        )
    return Group(title, table)


def _print_summary(
    run: DemoRun,
    report: VerifyReport,
    console: Console,
) -> None:
    console.rule("summary")
    rows = Table(title="rows per table", title_justify="left")
    rows.add_column("table")
    rows.add_column("rows", justify="right")
    for table_name in report.tables:
        rows.add_row(table_name, _number(report.rows.get(table_name)))
    console.print(rows)
    written = sum(shop.activity.rows_written for shop in run.shops)
    applied = sum(state.applied_changes for state in run.agent.states.values())
    console.print(
        f"workload: {run.transactions} transactions writing {written} rows on"
        f" {len(run.shops)} nodes in {run.seconds} s; replication applied {applied} changes,"
        f" highest lag seen {run.observer.max_lag_seconds:.1f} s",
        highlight=False,
    )
    retries = sum(shop.activity.retries for shop in run.shops)
    if retries:
        console.print(
            f"{retries} workload transactions were deadlock victims and skipped", highlight=False
        )
    records = _all_conflicts(run.config, console)
    per_node = Counter(record["node"] for record in records)
    per_type = Counter(record["type"] for record in records)
    by_type = ", ".join(f"{kind} {count}" for kind, count in per_type.most_common())
    console.print(
        f"{len(records)} conflicts recorded"
        f" ({', '.join(f'{node} {per_node[node]}' for node in run.config.node_names)})"
        + (f"; by type: {by_type}" if by_type else ""),
        style="magenta",
        highlight=False,
    )
    for record in _pick_examples(records, run.rounds):
        console.print(_example(record))
    for shop in run.shops:
        if shop.activity.failure:
            console.print(
                f"{shop.name}: workload failed: {shop.activity.failure}",
                style="red",
                highlight=False,
            )
    for name, reason in report.unreachable.items():
        console.print(f"node {name} unreachable: {reason}", style="red", highlight=False)
    for difference in report.differences:
        keys = ", ".join(str(key) for key in difference.keys)
        console.print(
            f"{difference.table}: {difference.reason}"
            + (f" ({difference.key_count} keys: {keys})" if difference.keys else ""),
            style="red",
            highlight=False,
        )
    if report.identical:
        total = sum(report.rows.values())
        console.print(
            f"all {len(run.shops)} nodes identical ({len(report.tables)} tables, {total} rows):"
            " every node resolved every conflict the same way, without asking the others",
            style="bold green",
            highlight=False,
        )
    else:
        console.print(f"the {len(run.shops)} nodes differ", style="bold red", highlight=False)
