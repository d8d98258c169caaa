"""The `pgconcord` command. Every failure the user can cause ends in one line and an exit code;
the commands' JSON is what scripts and the web console read."""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click
import psycopg
from rich.console import Console
from rich.table import Table as RichTable

from pgconcord import __version__
from pgconcord.config import ClusterConfig, NodeConfig, load_config
from pgconcord.errors import NodeUnavailable, NotSetUp, PgconcordError

if TYPE_CHECKING:
    from pgconcord.agent import Agent

F = TypeVar("F", bound=Callable[..., Any])

# soft_wrap: a message is one line however narrow the terminal, so scripts can read it.
console = Console(soft_wrap=True)
error_console = Console(stderr=True, soft_wrap=True)


def config_option(function: F) -> F:
    return click.option(
        "--config",
        "config_path",
        envvar="PGCONCORD_CONFIG",
        metavar="FILE",
        help="Cluster file (TOML); default: $PGCONCORD_CONFIG.",
    )(function)


def json_option(function: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")(function)


def _load(config_path: str | None) -> ClusterConfig:
    return load_config(config_path)


def _print_json(value: object) -> None:
    click.echo(json.dumps(value, indent=2, default=str))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="pgconcord")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def main_group(verbose: int) -> None:
    """Asynchronous multi-master replication for PostgreSQL."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr
    )


@main_group.command()
@config_option
def setup(config_path: str | None) -> None:
    """Install or upgrade pgconcord's schema and change capture on every node."""
    from pgconcord.install import setup as run_setup

    config = _load(config_path)
    report = run_setup(config, progress=lambda line: console.print(line, highlight=False))
    console.print(
        f"set up {len(config.nodes)} nodes, {len(report.tables)} replicated tables", highlight=False
    )


@main_group.command()
@config_option
@click.option("--node", "node_name", metavar="NAME", help="Replicate into this node only.")
def run(config_path: str | None, node_name: str | None) -> None:
    """Replicate continuously until SIGTERM or SIGINT; SIGHUP reloads the config file."""
    from pgconcord.agent import Agent, nodes_not_set_up

    config = _load(config_path)
    nodes = [config.node_by_name(node_name).name] if node_name else None
    # A node that is down now is waited for; one that is up without pgconcord's catalog would
    # only fail the same way for ever.
    missing = nodes_not_set_up(config, nodes)
    if missing:
        raise (
            NotSetUp(missing[0])
            if len(missing) == 1
            else PgconcordError(f"nodes {', '.join(missing)} are not set up: run pgconcord setup")
        )
    if logging.getLogger().level > logging.INFO:
        logging.getLogger().setLevel(logging.INFO)
    log = logging.getLogger(__name__)
    agent = Agent(config, nodes)
    reload_requested = threading.Event()

    def request_stop(signal_number: int, _frame: object) -> None:
        log.info("received signal %d, stopping", signal_number)
        agent.stopping.set()

    def request_reload(_signal_number: int, _frame: object) -> None:
        reload_requested.set()  # read in the main loop below, not in the signal handler

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    if hasattr(signal, "SIGHUP"):  # not on Windows: there a restart takes a new config
        signal.signal(signal.SIGHUP, request_reload)
    agent.start()
    log.info("replicating into %s", ", ".join(agent.nodes))
    while not agent.stopping.wait(0.5):
        if reload_requested.is_set():
            reload_requested.clear()
            _reload(agent, config_path)
    agent.stop()


def _reload(agent: Agent, config_path: str | None) -> None:
    """Give the running agent the config file as it is now; a config that cannot be used is
    logged and the agent goes on with the one it has."""
    log = logging.getLogger(__name__)
    try:
        config = _load(config_path)
        changes = agent.reconfigure(config)
    except PgconcordError as error:
        log.error("config not reloaded, replicating on with the previous one: %s", error)
        return
    log.info("config reloaded: %s", "; ".join(changes) if changes else "the same pairs replicate")


@main_group.command()
@config_option
def sync(config_path: str | None) -> None:
    """Exchange changes until every reachable node has every change."""
    from pgconcord.agent import sync as run_sync

    config = _load(config_path)
    report = run_sync(config)
    for result in report.results:
        if result.changes:
            console.print(
                f"{result.origin} -> {result.target}: {result.changes} changes in"
                f" {result.transactions} transactions, {result.conflicts} conflicts",
                highlight=False,
            )
    for name, state in report.departed.items():
        console.print(
            f"[yellow]node {name} is {state}: skipped (pgconcord join {name} brings it back,"
            " or remove it from the config)[/yellow]"
        )
    if report.ok:
        console.print("all nodes have every change", highlight=False)
        return
    problems = [
        f"node {name} unreachable ({reason})" for name, reason in report.unreachable.items()
    ]
    problems += [str(NotSetUp(name)) for name in report.not_set_up]
    problems += report.failures
    raise PgconcordError("sync incomplete: " + "; ".join(problems))


@main_group.command()
@config_option
@json_option
@click.option(
    "--lag",
    "lag_seconds",
    type=click.FloatRange(min=0),
    default=60.0,
    show_default=True,
    metavar="SECONDS",
    help="A pair whose oldest pending change is older than this is a problem.",
)
def status(config_path: str | None, as_json: bool, lag_seconds: float) -> None:
    """Nodes, reachability, pending changes and lag per pair, conflicts; exits 1, with one
    line per reason, when something needs a person."""
    from pgconcord.status import cluster_status

    report = cluster_status(_load(config_path), lag_threshold_seconds=lag_seconds)
    if as_json:
        _print_json(report.to_json())
    else:
        nodes = RichTable(title=f"cluster {report.cluster}")
        for heading in ("node", "state", "change log", "conflicts"):
            nodes.add_column(heading)
        for node in report.nodes:
            state = "up" if node.reachable and not node.error else (node.error or "down")
            if node.membership not in (None, "active"):
                state = f"{node.membership.upper()}, {state}"
            log_size = (
                f"{node.change_log_rows} rows, {(node.change_log_bytes or 0) // 1024} kB"
                if node.change_log_rows is not None
                else "-"
            )
            nodes.add_row(node.name, state, log_size, str(node.conflicts or 0))
        console.print(nodes)
        pairs = RichTable(title="replication")
        for heading in ("from", "to", "pending", "pending size", "lag", "applied"):
            pairs.add_column(heading)
        for pair in report.pairs:
            pairs.add_row(
                pair.origin,
                pair.target,
                pair.state or "?" if pair.pending_changes is None else str(pair.pending_changes),
                "?" if pair.pending_bytes is None else f"{pair.pending_bytes // 1024} kB",
                "?" if pair.lag_seconds is None else f"{pair.lag_seconds:.1f} s",
                "?" if pair.applied_changes is None else str(pair.applied_changes),
            )
        console.print(pairs)
    problems = report.problems
    for problem in problems:
        error_console.print(problem, style="bold red", highlight=False)
    if problems:
        sys.exit(1)


@main_group.command()
@config_option
@json_option
def verify(config_path: str | None, as_json: bool) -> None:
    """Compare every replicated table across nodes; exit 1 if they differ."""
    from pgconcord.verify import verify as run_verify

    report = run_verify(_load(config_path))
    if as_json:
        _print_json(report.to_json())
    else:
        for name, reason in report.unreachable.items():
            error_console.print(f"node {name} unreachable: {reason}", highlight=False)
        for difference in report.differences:
            keys = ", ".join(difference.keys)
            console.print(
                f"{difference.table}: {difference.reason}"
                + (f" ({difference.key_count} keys: {keys})" if difference.keys else ""),
                highlight=False,
            )
        if report.identical:
            console.print(f"{len(report.tables)} tables identical on every node", highlight=False)
    if not report.identical:
        sys.exit(1)


@main_group.group(invoke_without_command=True)
@config_option
@json_option
@click.pass_context
def conflicts(context: click.Context, config_path: str | None, as_json: bool) -> None:
    """Recorded conflicts and parked changes; `retry` and `discard` act on parked ones."""
    context.ensure_object(dict)
    context.obj["config_path"] = config_path
    if context.invoked_subcommand is not None:
        return
    from pgconcord.conflict import recorded_conflicts
    from pgconcord.parked import list_parked
    from pgconcord.transport import connect

    config = _load(config_path)
    records: list[dict[str, Any]] = []
    unreachable = []
    for node in config.nodes:
        try:
            with connect(node, autocommit=True) as connection:
                records.extend(recorded_conflicts(connection, node.name))
                records.extend(list_parked(connection, node.name))
        except NodeUnavailable as error:
            unreachable.append(str(error))
        except psycopg.errors.UndefinedTable:
            unreachable.append(f"node {node.name}: pgconcord is not set up (run pgconcord setup)")
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


@main_group.command("join")
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


@main_group.command()
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


@main_group.command()
@config_option
@click.argument("role")
@click.option("--node", "node_name", metavar="NAME", help="Only this node's statements.")
def grant(config_path: str | None, role: str, node_name: str | None) -> None:
    """Print the SQL a superuser runs on each node so that ROLE can set up and run pgconcord
    (the rights setup checks for; the event triggers once setup has run)."""
    from psycopg.conninfo import conninfo_to_dict

    from pgconcord.rights import grant_scripts

    config = _load(config_path)
    for name, lines in grant_scripts(config, role, node_name).items():
        # Only where to run it: never the password a DSN may hold.
        where = conninfo_to_dict(config.node_by_name(name).dsn)
        click.echo(
            f"-- node {name}: run as a superuser in database {where.get('dbname', '?')}"
            f" on {where.get('host', 'localhost')}"
        )
        if not lines:
            click.echo(f"-- {role} has every right it needs on {name}")
        for line in lines:
            click.echo(line)


@main_group.command()
@click.option("--seconds", default=40, show_default=True, help="How long the workload runs.")
@click.option("--nodes", "node_count", default=3, show_default=True, help="How many nodes.")
def demo(seconds: int, node_count: int) -> None:
    """Start local throwaway nodes, replicate a live workload with conflicts, verify, clean up."""
    from pgconcord.demo import run_demo

    if not run_demo(seconds=seconds, node_count=node_count, console=console):
        sys.exit(1)


def main() -> None:
    try:
        main_group(standalone_mode=False)
    except click.exceptions.Abort:
        error_console.print("pgconcord: interrupted")
        sys.exit(130)
    except click.ClickException as error:
        error.show()
        sys.exit(error.exit_code)
    except PgconcordError as error:
        click.echo(f"pgconcord: {error}", err=True)
        sys.exit(error.exit_code)
    except psycopg.Error as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        click.echo(f"pgconcord: database error: {first_line}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        error_console.print("pgconcord: interrupted")
        sys.exit(130)
