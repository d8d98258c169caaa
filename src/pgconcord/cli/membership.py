"""The commands that change who is in the cluster: join (with its progress bars) and part."""

from __future__ import annotations

from typing import Any

import click

from pgconcord.cli.options import _load, config_option, console, error_console
from pgconcord.errors import PgconcordError


@click.command("join")
@config_option
@click.argument("name")
@click.option("--from", "donor", metavar="NODE", help="Copy from this node (default: the first).")
@click.option("--discard", is_flag=True, help="Replace rows the new node already holds.")
def join_command(config_path: str | None, name: str, donor: str | None, discard: bool) -> None:
    """Add node NAME (declared in the config) to the running cluster with a copy of a live node;
    run it again to resume an interrupted copy."""
    from pgconcord.join import join

    config = _load(config_path)
    with _JoinProgress() as observer:
        report = join(config, name, donor=donor, discard=discard, observer=observer)
    copied = f"copied {len(report.copied)} tables ({report.rows} rows) from {report.donor}"
    if report.kept:
        copied += f", kept {len(report.kept)} tables an earlier run had copied"
    console.print(f"{name} joined the cluster: {copied} in {report.seconds:.1f} s", highlight=False)


class _JoinProgress:
    """Draws a join's progress on stderr: a bar for the tables and one for the current table's
    rows (an estimate from the donor's statistics until the table is done)."""

    def __init__(self) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=error_console,
            transient=True,
        )
        self.tables: Any = None
        self.rows: Any = None

    def __enter__(self) -> _JoinProgress:
        return self

    def __exit__(self, *_: object) -> None:
        if self.tables is not None:
            self.progress.stop()

    def note(self, text: str) -> None:
        self.progress.console.print(text, highlight=False)

    def table_started(self, name: str, number: int, count: int, estimated_rows: int) -> None:
        if self.tables is None:
            self.progress.start()  # only now: an early refusal stays one line
            self.tables = self.progress.add_task("tables", total=count)
        self.progress.update(self.tables, completed=number - 1)
        if self.rows is not None:
            self.progress.remove_task(self.rows)
        self.rows = self.progress.add_task(f"  {name} rows", total=estimated_rows or None)

    def rows_copied(self, rows: int) -> None:
        task = self.progress.tasks[-1]
        total = task.total if task.total is None else max(task.total, rows)
        self.progress.update(self.rows, completed=rows, total=total)

    def table_done(self, name: str, rows: int) -> None:
        self.progress.update(self.rows, completed=rows, total=rows)
        self.progress.advance(self.tables)
        self.progress.console.print(f"copied {name}: {rows} rows", highlight=False)


@click.command()
@config_option
@click.argument("name")
@click.option(
    "--force",
    is_flag=True,
    help="Part even if a remaining node is unreachable and misses NAME's last changes.",
)
def part(config_path: str | None, name: str, force: bool) -> None:
    """Remove node NAME from the cluster; NAME may be unreachable (gone for good)."""
    from pgconcord.membership import part as run_part

    config = _load(config_path)
    report = run_part(
        config, name, force=force, progress=lambda line: console.print(line, highlight=False)
    )
    for warning in report.warnings:
        error_console.print(f"warning: {warning}", highlight=False)
    if report.already_parted:
        console.print(f"{name} was already parted", highlight=False)
    console.print(
        f"{name} parted: forgotten by {', '.join(report.recorded_on)}"
        + (f"; remove [[node]] {name} from the config" if name in config.node_names else ""),
        highlight=False,
    )
    if report.unreachable:
        missing = ", ".join(f"{n} ({r})" for n, r in report.unreachable.items())
        raise PgconcordError(
            f"part of {name} not recorded on unreachable nodes: {missing};"
            " they learn it from the others once their agent runs, or run part again"
        )
