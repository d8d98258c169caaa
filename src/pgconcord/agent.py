"""The replication loop: wake on LISTEN/NOTIFY or a timer, pull from each peer, back off on
failure, purge what every peer has. Also the one-shot `sync`.

Each (origin -> target) pair has its own worker thread and Puller, so a slow or unreachable node
holds up only the pairs it is part of. Every worker keeps a one-line account of what it last did
and why (PairState.sentence), which `status` and the console show.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import psycopg

from pgconcord.apply import Puller, PullResult
from pgconcord.config import ClusterConfig, NodeConfig
from pgconcord.errors import NodeUnavailable, PgconcordError
from pgconcord.transport import connect

log = logging.getLogger(__name__)

CHANNEL = "pgconcord_change"
POLL_SECONDS = 1.0
COALESCE_SECONDS = 0.02  # at most one pull per pair in this time, however busy the origin
PURGE_SECONDS = 15.0
MAX_BACKOFF_SECONDS = 30.0


@dataclass
class PairState:
    origin: str
    target: str
    sentence: str = "starting"
    healthy: bool = True
    applied_changes: int = 0
    conflicts: int = 0
    last_pull_at: float = 0.0


def pairs(
    config: ClusterConfig, targets: Iterable[str] | None = None
) -> list[tuple[NodeConfig, NodeConfig]]:
    wanted = set(targets) if targets is not None else set(config.node_names)
    return [
        (origin, target)
        for target in config.nodes
        if target.name in wanted
        for origin in config.nodes
        if origin.name != target.name
    ]


def purge(config: ClusterConfig, node: NodeConfig) -> int:
    """Delete the node's logged changes that every peer has applied; 0 if a peer is unknown."""
    lowest: int | None = None
    for peer in config.nodes:
        if peer.name == node.name:
            continue
        with connect(peer, autocommit=True) as connection:
            row = connection.execute(
                "SELECT pg_snapshot_xmin(applied_snapshot)::text::bigint"
                " FROM pgconcord.position WHERE origin = %s",
                (node.name,),
            ).fetchone()
        if row is None:
            return 0
        horizon = int(str(row[0]))
        lowest = horizon if lowest is None else min(lowest, horizon)
    if lowest is None:
        return 0
    with connect(node, autocommit=True) as connection:
        deleted = connection.execute(
            "DELETE FROM pgconcord.change_log WHERE txid < %s::text::xid8", (lowest,)
        ).rowcount
    return max(deleted, 0)


@dataclass
class SyncReport:
    unreachable: dict[str, str] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    results: list[PullResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.unreachable and not self.failures


def sync(config: ClusterConfig) -> SyncReport:
    """Exchange changes among all reachable nodes until each has what the others had when the
    sync started; name the nodes that could not be reached."""
    report = SyncReport()
    for node in config.nodes:
        try:
            connect(node).close()
        except NodeUnavailable as error:
            report.unreachable[node.name] = error.reason
    for origin, target in pairs(config):
        if origin.name in report.unreachable or target.name in report.unreachable:
            continue
        puller = Puller(origin, target)
        try:
            report.results.append(puller.pull(wait_for_turn=True, until_current=True))
        except NodeUnavailable as error:
            report.unreachable.setdefault(error.node, error.reason)
        except PgconcordError as error:
            report.failures.append(str(error))
        finally:
            puller.close()
    if not report.unreachable:
        for node in config.nodes:
            try:
                purge(config, node)
            except (NodeUnavailable, psycopg.Error) as error:
                log.warning("purge of %s skipped: %s", node.name, error)
    return report


class Agent:
    """Replicates into the given nodes (all by default) until stop() is called."""

    def __init__(
        self,
        config: ClusterConfig,
        nodes: Iterable[str] | None = None,
        *,
        poll_seconds: float = POLL_SECONDS,
    ) -> None:
        self.config = config
        self.nodes = list(nodes) if nodes is not None else list(config.node_names)
        self.poll_seconds = poll_seconds
        self.stopping = threading.Event()
        self.states: dict[tuple[str, str], PairState] = {}
        self._wake: dict[tuple[str, str], threading.Event] = {}
        self._threads: list[threading.Thread] = []

    def start(self) -> Agent:
        work = pairs(self.config, self.nodes)
        for origin, target in work:
            key = (origin.name, target.name)
            self.states[key] = PairState(origin.name, target.name)
            self._wake[key] = threading.Event()
            self._spawn(f"pull {origin.name}->{target.name}", self._pair_loop, origin, target)
        for origin in {origin.name: origin for origin, _ in work}.values():
            self._spawn(f"listen {origin.name}", self._listen_loop, origin)
        self._spawn("purge", self._purge_loop)
        return self

    def _spawn(self, name: str, function: Callable[..., None], *arguments: object) -> None:
        thread = threading.Thread(target=function, args=arguments, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def stop(self, timeout: float = 30.0) -> None:
        self.stopping.set()
        for event in self._wake.values():
            event.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def wait(self) -> None:
        while not self.stopping.wait(0.5):
            pass

    # -- loops ---------------------------------------------------------------------------

    def _pair_loop(self, origin: NodeConfig, target: NodeConfig) -> None:
        key = (origin.name, target.name)
        state, wake = self.states[key], self._wake[key]
        puller = Puller(origin, target)
        backoff = 0.0

        def on_progress(progress: PullResult) -> None:
            state.sentence = (
                f"applying changes from {origin.name}: {progress.changes} so far"
                f" in {progress.transactions} transactions"
            )

        try:
            while not self.stopping.is_set():
                wake.clear()
                pulled_at = time.monotonic()
                try:
                    # One window per wake: a commit after its snapshot has sent a NOTIFY that
                    # sets the wake again (the timer covers a lost one), so looking once more
                    # for changes right away would only cost the origin round trips.
                    result = puller.pull(self.stopping.is_set, on_progress, until_current=True)
                except NodeUnavailable as error:
                    backoff = self._failed(
                        state, f"waiting for node {error.node}: {error.reason}", backoff
                    )
                except PgconcordError as error:
                    backoff = self._failed(state, f"stalled, changes stay queued: {error}", backoff)
                except Exception as error:  # a bug must not stop the other pairs
                    log.exception("%s -> %s: unexpected error", origin.name, target.name)
                    puller.close()
                    backoff = self._failed(state, f"unexpected error: {error!r}", backoff)
                else:
                    backoff = 0.0
                    state.healthy = True
                    state.last_pull_at = time.time()
                    state.applied_changes += result.changes
                    state.conflicts += result.conflicts
                    if result.changes:
                        state.sentence = (
                            f"applied {result.changes} changes in {result.transactions}"
                            f" transactions from {origin.name}"
                            + (
                                f", {result.conflicts} conflicts resolved"
                                if result.conflicts
                                else ""
                            )
                        )
                    elif not state.sentence.startswith("up to date"):
                        state.sentence = f"up to date with {origin.name}"
                if backoff:
                    self.stopping.wait(backoff)
                else:
                    wake.wait(self.poll_seconds)
                    # Let the commits of the next few milliseconds join this pull: one pull
                    # per commit would cost the origin more than the changes themselves.
                    self.stopping.wait(max(0.0, pulled_at + COALESCE_SECONDS - time.monotonic()))
        finally:
            puller.close()

    def _failed(self, state: PairState, sentence: str, backoff: float) -> float:
        if state.healthy or state.sentence != sentence:
            log.warning("%s -> %s: %s", state.origin, state.target, sentence)
        state.healthy = False
        state.sentence = sentence
        return min(MAX_BACKOFF_SECONDS, max(0.5, backoff * 2))

    def _listen_loop(self, origin: NodeConfig) -> None:
        listeners = [event for (o, _), event in self._wake.items() if o == origin.name]
        backoff = 0.5
        while not self.stopping.is_set():
            try:
                with connect(origin, autocommit=True) as connection:
                    connection.execute(f"LISTEN {CHANNEL}")
                    backoff = 0.5
                    # Anything committed before LISTEN took effect is picked up by this wake.
                    for event in listeners:
                        event.set()
                    while not self.stopping.is_set():
                        for _ in connection.notifies(timeout=0.5, stop_after=1):
                            for event in listeners:
                                event.set()
            except (NodeUnavailable, psycopg.Error):
                self.stopping.wait(backoff)
                backoff = min(MAX_BACKOFF_SECONDS, backoff * 2)

    def _purge_loop(self) -> None:
        while not self.stopping.wait(PURGE_SECONDS):
            for name in self.nodes:
                try:
                    deleted = purge(self.config, self.config.node_by_name(name))
                    if deleted:
                        log.info("%s: purged %d changes every peer has", name, deleted)
                except (NodeUnavailable, psycopg.Error) as error:
                    log.debug("purge of %s skipped: %s", name, error)
