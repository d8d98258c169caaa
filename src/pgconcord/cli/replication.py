"""The commands that set up, run and check replication: setup, run, sync, status, verify, and
grant (the rights setup and run need)."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from typing import TYPE_CHECKING

import click
from rich.table import Table as RichTable

from pgconcord.cli.options import (
    _load,
    _print_json,
    config_option,
    console,
    error_console,
    json_option,
)
from pgconcord.errors import NotSetUp, PgconcordError

if TYPE_CHECKING:
    from pgconcord.agent import Agent


@click.command()
@config_option
def setup(config_path: str | None) -> None:
    """Install or upgrade pgconcord's schema and change capture on every node."""
    from pgconcord.install import setup as run_setup

    config = _load(config_path)
    report = run_setup(config, progress=lambda line: console.print(line, highlight=False))
    console.print(
        f"set up {len(config.nodes)} nodes, {len(report.tables)} replicated tables", highlight=False
    )


@click.command()
@config_option
@click.option("--node", "node_name", metavar="NAME", help="Replicate into this node only.")
@click.option(
    "--http",
    "http_listen",
    metavar="HOST:PORT",
    help="Serve health, readiness, metrics, the API and the console here ([http] listen).",
)
def run(config_path: str | None, node_name: str | None, http_listen: str | None) -> None:
    """Replicate continuously until SIGTERM or SIGINT; SIGHUP reloads the config file."""
    from pgconcord.agent import Agent, nodes_not_set_up
    from pgconcord.config import parse_listen

    config = _load(config_path)
    if http_listen is not None:
        try:
            parse_listen(http_listen)
        except ValueError as error:
            raise click.BadParameter(str(error), param_hint="--http") from None
    listen = http_listen or config.http.listen
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
    # Bound before replication starts: an address in use stops `run` with one line.
    server = None
    if listen:
        from pgconcord.web import start_http_server

        server = start_http_server(agent, listen)
    try:
        agent.start()
        log.info("replicating into %s", ", ".join(agent.nodes))
        while not agent.stopping.wait(0.5):
            if reload_requested.is_set():
                reload_requested.clear()
                _reload(agent, config_path)
    finally:
        if server is not None:  # first: a load balancer sees the node go at once
            server.stop()
        agent.stop()


def _reload(agent: Agent, config_path: str | None) -> None:
    """Give the running agent the config file as it is now; a config that cannot be used is
    logged and the agent goes on with the one it has."""
    log = logging.getLogger(__name__)
    listen = agent.config.http.listen
    try:
        config = _load(config_path)
        changes = agent.reconfigure(config)
    except PgconcordError as error:
        log.error("config not reloaded, replicating on with the previous one: %s", error)
        return
    if config.http.listen != listen:  # the token file is read at each request: no restart
        log.warning("http: a changed [http] listen takes effect when the agent is restarted")
    log.info("config reloaded: %s", "; ".join(changes) if changes else "the same pairs replicate")


@click.command()
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


@click.command()
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


@click.command()
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


@click.command()
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
