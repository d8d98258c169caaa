"""The Agent: a worker thread per (origin -> target) pair, woken when the origin's change log
grows (or on a timer), that pulls and backs off on failure; a watch loop per origin; and the
housekeeping loops. reconfigure() takes a new config while it runs."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import psycopg

from pgconcord import membership, transport
from pgconcord.agent.heartbeat import Heartbeats, tick
from pgconcord.agent.housekeeping import (
    CAPTURE_SECONDS,
    PURGE_SECONDS,
    capture_loop,
    purge_loop,
    stream_loop,
)
from pgconcord.agent.pair import PairState, pairs
from pgconcord.agent.readiness import is_set_up
from pgconcord.agent.report import REPORT_ROUND_SECONDS, Reporter, report_loop
from pgconcord.apply import Puller, PullResult
from pgconcord.config import ClusterConfig, NodeConfig
from pgconcord.errors import NodeUnavailable, NotSetUp, PgconcordError
from pgconcord.transport import connect, describe_lost_session, first_line, lost_session

log = logging.getLogger(__name__)

CHANNEL = transport.CHANNEL
# A pair looks at its origin at least this often, even when the origin's watch loop (below)
# saw nothing: a change missed by it (a watch connection being set up again) waits no longer.
POLL_SECONDS = 5.0
# How often the watch loop reads an origin's snapshot: while transactions end there, and at
# most when none does (the interval doubles from the first to the second). Each look that
# finds a commit stamps, at a fixed cost of some 0.5 ms of the origin's CPU however few rows
# it has: measured under pgbench (bench/goals.py, pulls 100 ms apart), looks every 10 ms
# instead of 30 left pgbench 0.45 of its throughput instead of 0.49-0.54, at no less lag.
WATCH_BUSY_SECONDS = 0.03
WATCH_IDLE_SECONDS = 0.25
# ... and, once no transaction has ended there for QUIET_AFTER_SECONDS, every QUIET_SECONDS:
# the first write after a quiet spell waits a little longer, and a quiet cluster of five
# nodes is not kept busy by its agents' looks (bench/goals.py idle).
QUIET_AFTER_SECONDS = 30.0
QUIET_SECONDS = 0.5
# Between the starts of two pulls of a pair: COALESCE_FACTOR times what the last one took,
# within COALESCE_MIN_SECONDS and COALESCE_SECONDS. A window's statements cost the origin, the
# target and the agent about the same however many rows it has (some 20 ms of CPU in all,
# measured under pgbench), and under load one window would follow another as soon as the last
# is applied. Measured under pgbench on two cores (bench/goals.py), windows at most every
# 100 ms instead of every 10 halved the CPU per replicated row of all three and let pgbench
# keep 0.49-0.70 of its throughput instead of 0.41, for a lag p50 of 145-177 ms instead of 123
# (the CPU the machine lacks is most of the lag). A pull that took a few milliseconds (a
# lightly written origin) is followed as soon as the next commit is seen.
COALESCE_MIN_SECONDS = 0.01
COALESCE_FACTOR = 3.0
COALESCE_SECONDS = 0.1
# A pair that fails waits longer after each failure, up to: the same work would fail again...
MAX_BACKOFF_SECONDS = 30.0
# ...but a node that is down is tried often, so that it is pulled again within seconds of its
# return (a failed connection attempt costs the other side next to nothing).
UNAVAILABLE_BACKOFF_SECONDS = 2.0


Snapshot = tuple[int, int, set[int]]

# The watch's look at an origin, which also stamps what capture appended there since (unless
# someone else is stamping): the pulls it wakes find it in the change log, without stamping
# it first themselves (stamp_captured.sql).
_STAMP_AND_LOOK = """
WITH stamped AS MATERIALIZED (SELECT pgconcord.stamp_captured(false) AS changes)
SELECT pg_current_snapshot()::text, stamped.changes FROM stamped
"""


def _snapshot(
    connection: psycopg.Connection[tuple[object, ...]], stamps: bool = False
) -> tuple[Snapshot, bool]:
    """The node's current snapshot: (xmin, xmax, the transaction ids in progress), and
    whether changes were stamped on the way (with stamps, on a node set up for it)."""
    if stamps:
        row = connection.execute(_STAMP_AND_LOOK).fetchone()
    else:
        row = connection.execute("SELECT pg_current_snapshot()::text, 0").fetchone()
    assert row is not None
    xmin, xmax, in_progress = str(row[0]).split(":")
    snapshot = (int(xmin), int(xmax), {int(xid) for xid in in_progress.split(",") if xid})
    return snapshot, int(str(row[1])) > 0


def _can_stamp(connection: psycopg.Connection[tuple[object, ...]]) -> bool:
    row = connection.execute(
        "SELECT coalesce(has_function_privilege("
        "to_regprocedure('pgconcord.stamp_captured(boolean)'), 'EXECUTE'), false)"
    ).fetchone()
    return bool(row and row[0])


def _watch_look(
    connection: psycopg.Connection[tuple[object, ...]], stamps: bool, origin: str
) -> tuple[Snapshot, bool, bool]:
    """_snapshot, stamping while that works: a stamp that fails (a right taken away, a
    catalog in the middle of an upgrade) leaves the polls to stamp, and the watch goes on
    looking. Also whether it still stamps."""
    if stamps:
        try:
            snapshot, stamped = _snapshot(connection, True)
            return snapshot, stamped, True
        except psycopg.DatabaseError as error:
            if isinstance(error, psycopg.OperationalError):
                raise
            log.warning("watching %s: stamping there failed, left to the pulls: %s", origin, error)
    snapshot, _ = _snapshot(connection, False)
    return snapshot, False, False


def transaction_ended(before: Snapshot, after: Snapshot) -> bool:
    """Whether a transaction that had an id ended (committed or rolled back) between the two
    snapshots: one in progress before and not after, or one that began and ended between
    them. Only those can make changes visible; reading sessions take no transaction id."""
    _, xmax_before, running_before = before
    _, xmax_after, running_after = after
    if any(xid not in running_after for xid in running_before):
        return True
    begun = xmax_after - xmax_before
    if begun > len(running_after):
        return True  # more began than are still running
    return any(xid not in running_after for xid in range(xmax_before, xmax_after))


@dataclass
class _Pair:
    """One (origin -> target) worker: its thread's events and its account for `status`."""

    origin: NodeConfig
    target: NodeConfig
    state: PairState
    wake: threading.Event = field(default_factory=threading.Event)  # a commit, or the timer
    # One of its nodes is reachable again: the backoff is cut short.
    retry: threading.Event = field(default_factory=threading.Event)
    stop: threading.Event = field(default_factory=threading.Event)  # a reload removed it

    def stopped(self, agent: Agent) -> bool:
        return agent.stopping.is_set() or self.stop.is_set()

    def interrupt(self) -> None:
        self.wake.set()
        self.retry.set()


class Agent:
    """Replicates into the given nodes (all by default) until stop() is called. reconfigure()
    takes a new config while it runs (`pgconcord run` calls it on SIGHUP)."""

    def __init__(
        self,
        config: ClusterConfig,
        nodes: Iterable[str] | None = None,
        *,
        poll_seconds: float = POLL_SECONDS,
    ) -> None:
        self.config = config
        self._fixed_nodes = list(nodes) if nodes is not None else None
        self.nodes = self._targets(config)
        self.poll_seconds = poll_seconds
        self.stopping = threading.Event()
        # These two are replaced whole by a reload, never changed in place: other threads (the
        # demo's view, the watch loops) read them meanwhile without a lock.
        self.states: dict[tuple[str, str], PairState] = {}
        self._pairs: dict[tuple[str, str], _Pair] = {}
        # The loops one node has, whatever its pairs: ("watch" | "capture" | "stream", node)
        # -> its stop.
        self._node_loops: dict[tuple[str, str], tuple[NodeConfig, threading.Event]] = {}
        self._threads: list[threading.Thread] = []
        self.heartbeats = Heartbeats()  # the loops' liveness, for the HTTP server's /health
        self._reconfiguring = threading.Lock()
        # Nodes last seen unreachable, with the reason: one log line when one goes, one when
        # it comes back, however many pairs notice.
        self._down: dict[str, str] = {}
        self._not_set_up: set[str] = set()
        self._down_lock = threading.Lock()
        # The membership as each origin last told it, and the members that left the cluster
        # (parted, evicted): their pairs do not run, whatever the config says.
        self._views: dict[str, dict[str, membership.Member]] = {}
        self._departed: dict[str, str] = {}
        self.report = Reporter(self)  # the log's lines per pair per minute, per conflict

    def _targets(self, config: ClusterConfig) -> list[str]:
        if self._fixed_nodes is None:
            return list(config.node_names)
        for name in self._fixed_nodes:
            config.node_by_name(name)  # a reload that drops a --node target is refused
        return list(self._fixed_nodes)

    def start(self) -> Agent:
        with self._reconfiguring:
            self._arrange(self.config)
        self._spawn("purge", PURGE_SECONDS, purge_loop, self)
        self._spawn("report", REPORT_ROUND_SECONDS, report_loop, self.report)
        return self

    def reconfigure(self, config: ClusterConfig) -> list[str]:
        """Replicate as the new config says, without a restart: the pairs of a node added start,
        those of a node removed stop, those of a node whose DSN changed start over. Returns
        what changed, one sentence each; ConfigError (and nothing changes) if this agent's own
        --node is not in the new config."""
        with self._reconfiguring:
            targets = self._targets(config)
            self.config = config
            self.nodes = targets
            self._threads = [thread for thread in self._threads if thread.is_alive()]
            return self._arrange(config)

    def _arrange(self, config: ClusterConfig) -> list[str]:
        changes: list[str] = []
        wanted = {
            (o.name, t.name): (o, t)
            for o, t in pairs(config, self.nodes)
            if o.name not in self._departed and t.name not in self._departed
        }
        current = dict(self._pairs)
        for key, pair in list(current.items()):
            if wanted.get(key) != (pair.origin, pair.target):
                pair.stop.set()
                pair.interrupt()
                del current[key]
                if key not in wanted:
                    changes.append(f"stopped replicating {key[0]} -> {key[1]}")
        started = []
        for key, (origin, target) in wanted.items():
            if key not in current:
                current[key] = _Pair(origin, target, PairState(origin.name, target.name))
                started.append(current[key])
                restarted = key in self._pairs
                changes.append(
                    f"replicating {key[0]} -> {key[1]}"
                    + (" (node's dsn changed)" if restarted else "")
                )
        self._pairs = current
        self.states = {key: pair.state for key, pair in current.items()}
        for pair in started:
            self._spawn(
                f"pull {pair.origin.name}->{pair.target.name}",
                max(self.poll_seconds, MAX_BACKOFF_SECONDS),
                self._pair_loop,
                pair,
            )
        loops: dict[tuple[str, str], NodeConfig] = {
            ("watch", origin.name): origin for origin, _ in wanted.values()
        }
        for name in self.nodes:
            loops[("capture", name)] = loops[("stream", name)] = config.node_by_name(name)
        running = dict(self._node_loops)
        for key, (node, stop) in list(running.items()):
            if loops.get(key) != node:
                stop.set()
                del running[key]
        for key, node in loops.items():
            if key not in running:
                stop = threading.Event()
                running[key] = (node, stop)
                if key[0] == "watch":
                    self._spawn(
                        f"{key[0]} {node.name}",
                        UNAVAILABLE_BACKOFF_SECONDS,
                        self._watch_loop,
                        node,
                        stop,
                    )
                else:  # housekeeping's capture_loop and stream_loop, on its own nodes
                    self._spawn(
                        f"{key[0]} {node.name}",
                        CAPTURE_SECONDS,
                        capture_loop if key[0] == "capture" else stream_loop,
                        self,
                        node,
                        stop,
                    )
        self._node_loops = running
        return changes

    def _spawn(
        self, name: str, round_seconds: float, function: Callable[..., None], *arguments: object
    ) -> None:
        thread = threading.Thread(
            target=self.heartbeats.run,
            args=(name, round_seconds, function, *arguments),
            name=name,
            daemon=True,
        )
        thread.start()
        self._threads.append(thread)

    def stop(self, timeout: float = 30.0) -> None:
        self.stopping.set()
        with self._reconfiguring:
            for pair in self._pairs.values():
                pair.interrupt()
            for _, stop in self._node_loops.values():
                stop.set()
            threads = list(self._threads)
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def wait(self) -> None:
        while not self.stopping.wait(0.5):
            pass

    # -- reachability ------------------------------------------------------------------------

    def _unreachable(self, node: str, reason: str) -> None:
        with self._down_lock:
            news = node not in self._down
            self._down[node] = reason
        if news:
            log.warning("node %s is unreachable: %s", node, reason)
            self.report.node_lost(node)

    def _reachable(self, node: str) -> None:
        """A loop talked to the node: if it was down, say so and have its pairs try at once
        instead of at the end of their backoff."""
        with self._down_lock:
            self._not_set_up.discard(node)
            if self._down.pop(node, None) is None:
                return
        log.info("node %s is reachable again", node)
        self._interrupt_pairs_of(node)

    def _learn_members(self, node: str, connection: psycopg.Connection[tuple[object, ...]]) -> None:
        """Take the node's view of the membership: the pairs of a member that left the cluster
        (part, eviction) stop without a restart, and start again when it joins again."""
        try:
            view = membership.read_members(connection) if membership.installed(connection) else {}
        except psycopg.Error as error:
            log.debug("membership of %s not read: %s", node, error)
            return
        with self._down_lock:
            self._views[node] = view
            merged = membership.merge(self._views.values())
        departed = {
            name: member.state
            for name, member in merged.items()
            if member.state in membership.OUT_OF_CLUSTER
        }
        with self._reconfiguring:
            if departed == self._departed or self.stopping.is_set():
                return
            listed = set(self.config.node_names)
            for name, state in departed.items():
                if name in listed and self._departed.get(name) != state:
                    log.warning(
                        "node %s was %s: it is not replicated any more (pgconcord join %s"
                        " brings it back; or remove it from the config)",
                        name,
                        state,
                        name,
                    )
            for name in self._departed.keys() - departed.keys():
                if name in listed:
                    log.info("node %s is a member of the cluster again", name)
            self._departed = departed
            changes = self._arrange(self.config)
        if changes:
            log.info("membership changed: %s", "; ".join(changes))

    def _interrupt_pairs_of(self, node: str) -> None:
        for pair in self._pairs.values():
            if node in (pair.origin.name, pair.target.name):
                pair.interrupt()

    def _diagnose(self, pair: _Pair, error: psycopg.Error) -> tuple[str, bool]:
        """The sentence for a database error the apply code let through, and whether it is
        news for the log: a node without pgconcord's catalog is named once, whatever pairs
        run into it."""
        for node in (pair.target, pair.origin):
            if is_set_up(node) is False:
                with self._down_lock:
                    news = node.name not in self._not_set_up
                    self._not_set_up.add(node.name)
                return str(NotSetUp(node.name)), news
        sentence = (
            f"stalled, changes stay queued: {pair.origin.name} -> {pair.target.name}:"
            f" {first_line(error)}"
        )
        return sentence, pair.state.healthy or pair.state.sentence != sentence

    # -- loops -------------------------------------------------------------------------------

    def _pair_loop(self, pair: _Pair) -> None:
        origin, target, state = pair.origin, pair.target, pair.state
        # Changes a look finds are applied at once; the watch wakes the pair for the rest.
        puller = Puller(origin, target, settled=False)
        backoff = 0.0
        waited = False  # the last failure was a node down: its return is logged by node

        def stopped() -> bool:
            return pair.stopped(self)

        def on_progress(progress: PullResult) -> None:
            tick()
            state.last_progress_at = time.time()
            state.sentence = (
                f"applying changes from {origin.name}: {progress.changes} so far"
                f" in {progress.transactions} transactions"
            )

        try:
            while not stopped():
                tick()
                pair.wake.clear()
                pair.retry.clear()
                pulled_at = time.monotonic()
                started_at = time.time()
                try:
                    # One window per wake: a commit after its snapshot is seen by the watch
                    # loop, which sets the wake again (the timer covers a missed one), so
                    # looking once more right away would only cost round trips.
                    result = puller.pull(stopped, on_progress, until_current=True)
                except NodeUnavailable as error:
                    waited = True
                    self._unreachable(error.node, error.reason)
                    # A node that is down is tried again often: it is back within seconds.
                    backoff = self._failed(
                        state,
                        f"waiting for node {error.node}: {error.reason}",
                        backoff,
                        cap=UNAVAILABLE_BACKOFF_SECONDS,
                        log_it=False,
                    )
                except PgconcordError as error:
                    waited = False
                    backoff = self._failed(state, f"stalled, changes stay queued: {error}", backoff)
                except psycopg.Error as error:
                    waited = False
                    puller.close()
                    sentence, news = self._diagnose(pair, error)
                    backoff = self._failed(state, sentence, backoff, log_it=news)
                except Exception as error:  # a bug must not stop the other pairs
                    waited = False
                    puller.close()
                    sentence = f"unexpected error: {error!r}"
                    if state.healthy or state.sentence != sentence:
                        log.exception("%s -> %s: unexpected error", origin.name, target.name)
                    backoff = self._failed(state, sentence, backoff, log_it=False)
                else:
                    if not state.healthy and not waited:
                        log.info("%s -> %s: replicating again", origin.name, target.name)
                    self._reachable(origin.name)
                    if result.reached_target:
                        self._reachable(target.name)
                    backoff = 0.0
                    state.healthy = True
                    state.last_pull_at = state.last_progress_at = time.time()
                    behind_since = state.behind_since
                    if behind_since is not None and behind_since <= started_at:
                        state.behind_since = None  # this pull's snapshot had it
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
                    pair.retry.wait(backoff)
                else:
                    took = time.monotonic() - pulled_at
                    pair.wake.wait(self.poll_seconds)
                    # Let the commits of the next few milliseconds join the next pull: one pull
                    # per commit would cost the origin more than the changes themselves.
                    spacing = min(
                        COALESCE_SECONDS, max(COALESCE_MIN_SECONDS, COALESCE_FACTOR * took)
                    )
                    pair.stop.wait(max(0.0, pulled_at + spacing - time.monotonic()))
        finally:
            puller.close()

    def _failed(
        self,
        state: PairState,
        sentence: str,
        backoff: float,
        *,
        cap: float = MAX_BACKOFF_SECONDS,
        log_it: bool | None = None,
    ) -> float:
        if log_it if log_it is not None else (state.healthy or state.sentence != sentence):
            log.warning("%s -> %s: %s", state.origin, state.target, sentence)
        state.healthy = False
        state.sentence = state.last_error = sentence
        state.last_error_at = time.time()
        return min(cap, max(0.5, backoff * 2))

    def _wake_pairs_from(self, origin: str) -> None:
        now = time.time()
        for pair in self._pairs.values():
            if pair.origin.name == origin:
                if pair.state.behind_since is None:
                    pair.state.behind_since = now
                pair.wake.set()

    def _watch_loop(self, origin: NodeConfig, stop: threading.Event) -> None:
        """Wakes the origin's pairs when a transaction ended there, and takes the NOTIFY of
        membership news (schema changes notify too); also the probe that notices first that a
        node which was down is back.

        Capture sends no notification (016_watch_not_notify.sql): this loop reads the origin's
        snapshot every WATCH_BUSY_SECONDS while transactions end, up to every
        WATCH_IDLE_SECONDS when none does, and every QUIET_SECONDS after a quiet spell.
        Changes become visible only when their transaction ends, so a big transaction still
        running wakes nobody (a pull would only scan its invisible rows); a transaction that
        captured nothing costs one empty poll. One small query per interval costs the origin
        the same whatever its write rate."""
        backoff = 0.5
        while not (self.stopping.is_set() or stop.is_set()):
            tick()
            try:
                with connect(origin, autocommit=True) as connection:
                    connection.execute(f"LISTEN {CHANNEL}")
                    backoff = 0.5
                    self._reachable(origin.name)
                    self._learn_members(origin.name, connection)
                    # Anything committed before watching began is picked up by this wake.
                    self._wake_pairs_from(origin.name)
                    stamps = _can_stamp(connection)
                    seen, _, stamps = _watch_look(connection, stamps, origin.name)
                    interval = WATCH_BUSY_SECONDS
                    ended_at = time.monotonic()
                    while not (self.stopping.is_set() or stop.is_set()):
                        tick()
                        news = woken = False
                        for notify in connection.notifies(timeout=interval, stop_after=1):
                            if notify.payload == membership.MEMBERSHIP_NEWS:
                                news = True
                            else:
                                woken = True
                        if news:  # read outside the notifies() generator, which holds the lock
                            self._learn_members(origin.name, connection)
                            self._interrupt_pairs_of(origin.name)
                        now, stamped, stamps = _watch_look(connection, stamps, origin.name)
                        if transaction_ended(seen, now) or woken or stamped:
                            interval = WATCH_BUSY_SECONDS
                            ended_at = time.monotonic()
                            self._wake_pairs_from(origin.name)
                        elif time.monotonic() - ended_at > QUIET_AFTER_SECONDS:
                            interval = QUIET_SECONDS
                        else:
                            interval = min(WATCH_IDLE_SECONDS, interval * 2)
                        seen = now
            except NodeUnavailable as error:
                self._unreachable(origin.name, error.reason)
            except psycopg.Error as error:
                if lost_session(error, {origin.name: None}) is not None:
                    self._unreachable(origin.name, describe_lost_session(error))
                else:
                    log.debug("watching %s: %s", origin.name, error)
            stop.wait(backoff)
            backoff = min(UNAVAILABLE_BACKOFF_SECONDS, backoff * 2)
