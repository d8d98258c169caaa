"""What the demo shows while it runs: an observer reading status and row counts from every node,
and the live view of the run (on a terminal) or a plain progress line every few seconds."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import psycopg
from psycopg import sql
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from pgconcord.agent import Agent
from pgconcord.config import ClusterConfig
from pgconcord.demo.workload import TABLES, THREAD_JOIN_SECONDS, ConflictLog, ConflictRound, Shop
from pgconcord.errors import NodeUnavailable, PgconcordError
from pgconcord.sandbox import Server
from pgconcord.status import ClusterStatus, cluster_status
from pgconcord.transport import connect

STATUS_INTERVAL_SECONDS = 1.0  # cluster_status queries every node: once a second is plenty


# -- observing the cluster -------------------------------------------------------------------


@dataclass(frozen=True)
class Observation:
    taken_at: float  # time.monotonic() when the queries started
    status: ClusterStatus
    row_counts: dict[str, dict[str, int]]  # node -> table -> rows

    @property
    def pending_changes(self) -> int | None:
        """Changes not yet applied over all pairs; None while a pair cannot be measured."""
        counts = [pair.pending_changes for pair in self.status.pairs]
        if any(count is None for count in counts):
            return None
        return sum(count or 0 for count in counts)

    @property
    def max_lag_seconds(self) -> float:
        return max((pair.lag_seconds or 0.0 for pair in self.status.pairs), default=0.0)


_COUNT_ROWS = sql.SQL(" UNION ALL ").join(
    sql.SQL("SELECT {name}, count(*) FROM {table}").format(
        name=sql.Literal(table), table=sql.Identifier(table)
    )
    for table in TABLES
)


class Observer:
    """Reads status and row counts from every node once a second, in a thread of its own so
    that a slow node never freezes the live view."""

    def __init__(self, config: ClusterConfig) -> None:
        self.config = config
        self.latest: Observation | None = None
        self.max_lag_seconds = 0.0
        self.error: str | None = None
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="observer", daemon=True)

    def start(self) -> Observer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._thread.ident is not None:
            self._thread.join(THREAD_JOIN_SECONDS)

    def _run(self) -> None:
        while not self._stopping.is_set():
            began = time.monotonic()
            try:
                self._observe(began)
                self.error = None
            except (PgconcordError, psycopg.Error) as error:
                self.error = (
                    str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
                )
            self._stopping.wait(max(0.0, began + STATUS_INTERVAL_SECONDS - time.monotonic()))

    def _observe(self, began: float) -> None:
        status = cluster_status(self.config)
        row_counts: dict[str, dict[str, int]] = {}
        for node in self.config.nodes:
            try:
                with connect(node, autocommit=True) as connection:
                    row_counts[node.name] = {
                        str(table): int(str(count))
                        for table, count in connection.execute(_COUNT_ROWS)
                    }
            except NodeUnavailable:
                row_counts[node.name] = {}
        observation = Observation(began, status, row_counts)
        self.max_lag_seconds = max(self.max_lag_seconds, observation.max_lag_seconds)
        self.latest = observation


# -- the run ---------------------------------------------------------------------------------


class DemoRun:
    """What the live view and the summary read while the demo runs."""

    def __init__(
        self,
        config: ClusterConfig,
        servers: dict[str, Server],
        shops: list[Shop],
        agent: Agent,
        observer: Observer,
        rounds: list[ConflictRound],
        conflict_log: ConflictLog,
        seconds: int,
    ) -> None:
        self.config = config
        self.servers = servers
        self.shops = shops
        self.agent = agent
        self.observer = observer
        self.rounds = rounds
        self.conflict_log = conflict_log
        self.seconds = seconds
        self.started_at = time.monotonic()
        self.phase = "running the workload"

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started_at

    @property
    def conflicts_resolved(self) -> int:
        return sum(state.conflicts for state in self.agent.states.values())

    @property
    def transactions(self) -> int:
        return sum(shop.activity.transactions for shop in self.shops)

    def dashboard(self) -> RenderableType:
        observation = self.observer.latest
        header = Table.grid(padding=(0, 2))
        header.add_row(
            Text(f"pgconcord demo: {len(self.shops)} nodes, {self.phase}", style="bold"),
            ProgressBar(total=self.seconds, completed=min(self.elapsed, self.seconds), width=30),
            Text(f"{min(self.elapsed, self.seconds):4.0f} s / {self.seconds} s"),
            Text(f"conflicts resolved: {self.conflicts_resolved}", style="magenta"),
        )
        parts: list[RenderableType] = [header, self._node_table(observation)]
        parts.append(self._pair_table(observation))
        latest = self.conflict_log.latest(self.rounds)
        if latest is not None:
            conflict_round, spread = latest
            parts.append(
                Text(
                    f"latest deliberate conflict #{conflict_round.number}: "
                    f"{conflict_round.describe()}, committed within {spread * 1000:.1f} ms",
                    style="magenta",
                )
            )
        if self.observer.error:
            parts.append(Text(f"status: {self.observer.error}", style="yellow"))
        parts.extend(
            Text(f"{shop.name}: workload stopped: {shop.activity.failure}", style="red")
            for shop in self.shops
            if shop.activity.failure
        )
        return Group(*parts)

    def _node_table(self, observation: Observation | None) -> Table:
        table = Table(title="nodes", title_justify="left", expand=False)
        for heading in ("node", "port", "transactions", "rows written here", *TABLES, "change log"):
            table.add_column(heading, justify="left" if heading == "node" else "right")
        table.add_column("conflicts", justify="right")
        statuses = {node.name: node for node in observation.status.nodes} if observation else {}
        for shop in self.shops:
            counts = observation.row_counts.get(shop.name, {}) if observation else {}
            node_status = statuses.get(shop.name)
            table.add_row(
                shop.name,
                str(self.servers[shop.name].port),
                str(shop.activity.transactions),
                str(shop.activity.rows_written),
                *(_number(counts.get(name)) for name in TABLES),
                _number(node_status.change_log_rows if node_status else None),
                _number(node_status.conflicts if node_status else None),
            )
        return table

    def _pair_table(self, observation: Observation | None) -> Table:
        table = Table(title="replication", title_justify="left", expand=False)
        table.add_column("origin -> target")
        table.add_column("pending", justify="right")
        table.add_column("lag", justify="right")
        table.add_column("applied", justify="right")
        table.add_column("agent")
        pairs = (
            {(pair.origin, pair.target): pair for pair in observation.status.pairs}
            if observation
            else {}
        )
        for (origin, target), state in self.agent.states.items():
            pair = pairs.get((origin, target))
            lag = pair.lag_seconds if pair else None
            table.add_row(
                f"{origin} -> {target}",
                _number(pair.pending_changes if pair else None),
                "-" if lag is None else f"{lag:.1f} s",
                str(state.applied_changes),
                Text(state.sentence, style="default" if state.healthy else "yellow"),
            )
        return table

    def progress_line(self) -> str:
        observation = self.observer.latest
        pending = "?" if observation is None else _number(observation.pending_changes)
        lag = 0.0 if observation is None else observation.max_lag_seconds
        return (
            f"{self.elapsed:5.1f} s  {self.transactions} transactions on {len(self.shops)} nodes,"
            f" {self.conflicts_resolved} conflicts resolved, pending changes: {pending},"
            f" lag {lag:.1f} s"
        )


def _number(value: int | None) -> str:
    return "-" if value is None else str(value)


@contextmanager
def _display(run: DemoRun, console: Console) -> Iterator[Callable[[], None]]:
    """A live view on a terminal; elsewhere (CI, a pipe) a plain line every few seconds."""
    if console.is_terminal and not console.is_dumb_terminal:
        with Live(run.dashboard(), console=console, auto_refresh=False, transient=False) as live:
            yield lambda: live.update(run.dashboard(), refresh=True)
        return
    every = max(5.0, run.seconds / 4)
    printed_at = time.monotonic()

    def maybe_print() -> None:
        nonlocal printed_at
        if time.monotonic() - printed_at >= every:
            printed_at = time.monotonic()
            console.print(run.progress_line(), highlight=False)

    yield maybe_print
