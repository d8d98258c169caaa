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

from pgconcord import membership
from pgconcord.apply import Puller, PullResult
from pgconcord.config import ClusterConfig, NodeConfig
from pgconcord.errors import NodeUnavailable, PgconcordError
from pgconcord.membership import ACTIVE
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


@dataclass
class PurgeReport:
    node: str
    deleted: int = 0
    kept_for: str | None = None  # why nothing was deleted: the member that holds it back
    evicted: list[str] = field(default_factory=list)  # sentences, one per member evicted now
    learned: list[str] = field(default_factory=list)  # membership news taken from the peers
    problems: list[str] = field(default_factory=list)  # config and membership disagree


def purge(config: ClusterConfig, node: NodeConfig) -> int:
    """Delete the node's logged changes that every member has applied; how many."""
    return purge_node(config, node).deleted


_PEER_POSITION = """
SELECT pg_snapshot_xmin(applied_snapshot)::text::bigint,
       extract(epoch FROM now() - updated_at)::float8
  FROM pgconcord.position WHERE origin = %s
"""

# Copy horizons the position has passed: every transaction they cover is older than the
# oldest one the position may still be missing (see 007_copy_horizon.sql).
_PASSED_HORIZONS = """
DELETE FROM pgconcord.copy_horizon h USING pgconcord.position p
 WHERE p.origin = h.origin
   AND pg_snapshot_xmin(p.applied_snapshot)
       >= pg_snapshot_xmax(coalesce(h.window_snapshot, h.applied_snapshot))
"""


def purge_node(config: ClusterConfig, node: NodeConfig) -> PurgeReport:
    """Delete the node's logged changes that every member has applied, in one transaction that
    holds the node's membership lock (a join registered meanwhile waits, so nothing it needs
    goes). On the way: take the membership news the peers have, evict a member silent for
    longer than replication.evict_after, and forget copy horizons the positions have passed.
    A joining member, or one that cannot be read and is not evicted, keeps everything."""
    report = PurgeReport(node.name)
    with connect(node) as connection:
        if not membership.installed(connection):
            connection.rollback()
            report.deleted = _purge_without_members(config, node, connection)
            return report
        membership.lock(connection)
        members = membership.read_members(connection)
        positions: dict[str, tuple[int, float] | None] = {}
        for peer in config.nodes:
            if peer.name == node.name:
                continue
            if membership.state_of(members, peer.name) in membership.OUT_OF_CLUSTER:
                continue
            positions[peer.name] = _read_peer(peer, node.name, connection, report)
        members = membership.read_members(connection)
        report.problems = membership.config_problems(config, members)
        local = membership.state_of(members, node.name)
        if local != membership.ACTIVE:
            report.kept_for = f"{node.name} is {local}"
            connection.commit()
            return report
        holds = _holds(config, node, connection, members, positions, report)
        lowest = min((p[0] for p in positions.values() if p is not None), default=None)
        if holds:
            report.kept_for = holds[0]
        elif lowest is not None:
            deleted = connection.execute(
                "DELETE FROM pgconcord.change_log WHERE txid < %s::text::xid8", (lowest,)
            ).rowcount
            report.deleted = max(deleted, 0)
        connection.execute(_PASSED_HORIZONS)
        connection.commit()
    return report


def _read_peer(
    peer: NodeConfig,
    origin: str,
    connection: psycopg.Connection[tuple[object, ...]],
    report: PurgeReport,
) -> tuple[int, float] | None:
    """The peer's position for the origin (oldest transaction it may lack, age in seconds by
    its own clock), None if unreachable or absent; adopts the peer's newer member records."""
    try:
        with connect(peer, autocommit=True) as peer_connection:
            row = peer_connection.execute(_PEER_POSITION, (origin,)).fetchone()
            news = (
                membership.read_members(peer_connection).values()
                if membership.installed(peer_connection)
                else ()
            )
    except (NodeUnavailable, psycopg.OperationalError):
        return None
    for member in membership.adopt(connection, news):
        sentence = f"{member.name} is {member.state} (learned from {peer.name})"
        if member.state == ACTIVE:
            log.debug("membership: %s", sentence)  # the usual news after a setup or a join
        else:
            report.learned.append(sentence)
    if row is None:
        return None
    return int(str(row[0])), float(str(row[1]))


def _holds(
    config: ClusterConfig,
    node: NodeConfig,
    connection: psycopg.Connection[tuple[object, ...]],
    members: dict[str, membership.Member],
    positions: dict[str, tuple[int, float] | None],
    report: PurgeReport,
) -> list[str]:
    """The members that keep the node's changes. One that has not been reached for longer than
    replication.evict_after is evicted, but only by a node that reaches a majority of the
    active members (itself included): a node cut off from the others must not evict them."""
    limit = config.replication.evict_after_seconds
    active = [name for name in positions if membership.state_of(members, name) == ACTIVE]
    reached = [name for name in active if positions[name] is not None]
    majority = 2 * (1 + len(reached)) > 1 + len(active)
    holds = []
    for name, position in list(positions.items()):
        state = membership.state_of(members, name)
        if state in membership.OUT_OF_CLUSTER:
            positions.pop(name)
            continue
        if state == membership.JOINING:
            holds.append(f"{name} is joining")
            continue
        if position is not None:
            membership.note_reached(connection, name)
            continue
        unreached = membership.unreached_seconds(connection, name)
        if limit is not None and unreached > limit and majority:
            reason = (
                f"could not be reached for {_duration(unreached)}"
                f" (replication.evict_after = {config.replication.evict_after})"
            )
            membership.evict(connection, name, reason)
            report.evicted.append(
                f"EVICTED node {name} from {node.name}'s backlog: it {reason}; {node.name} no"
                f" longer keeps changes for it nor applies any from it;"
                f" `pgconcord join {name}` brings it back with a fresh copy"
            )
            positions.pop(name)
            continue
        holds.append(f"{name} cannot be read")
    for name, member in members.items():
        listed = name == node.name or name in config.node_names
        if not listed and member.state not in membership.OUT_OF_CLUSTER:
            holds.append(f"{name} is a member missing from the config")
    return holds


def _duration(seconds: float) -> str:
    for unit, size in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= 2 * size:
            return f"{seconds / size:.0f} {unit}"
    return f"{seconds:.0f} s"


def _purge_without_members(
    config: ClusterConfig, node: NodeConfig, connection: psycopg.Connection[tuple[object, ...]]
) -> int:
    """The purge of a catalog older than membership: every configured peer's position."""
    lowest: int | None = None
    for peer in config.nodes:
        if peer.name == node.name:
            continue
        try:
            with connect(peer, autocommit=True) as peer_connection:
                row = peer_connection.execute(_PEER_POSITION, (node.name,)).fetchone()
        except NodeUnavailable:
            return 0
        if row is None:
            return 0
        horizon = int(str(row[0]))
        lowest = horizon if lowest is None else min(lowest, horizon)
    if lowest is None:
        return 0
    deleted = connection.execute(
        "DELETE FROM pgconcord.change_log WHERE txid < %s::text::xid8", (lowest,)
    ).rowcount
    connection.commit()
    return max(deleted, 0)


@dataclass
class SyncReport:
    unreachable: dict[str, str] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    results: list[PullResult] = field(default_factory=list)
    # Nodes the config lists that left the cluster (evicted, parted): skipped, not failures.
    departed: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.unreachable and not self.failures


def sync(config: ClusterConfig) -> SyncReport:
    """Exchange changes among all reachable nodes until each has what the others had when the
    sync started; name the nodes that could not be reached."""
    report = SyncReport()
    views = []
    for node in config.nodes:
        try:
            with connect(node) as connection:
                if membership.installed(connection):
                    views.append(membership.read_members(connection))
        except NodeUnavailable as error:
            report.unreachable[node.name] = error.reason
    members = membership.merge(views)
    for node in config.nodes:
        state = membership.state_of(members, node.name)
        if state in (membership.EVICTED, membership.PARTED):
            report.departed[node.name] = state
            report.unreachable.pop(node.name, None)
    skipped = set(report.unreachable) | set(report.departed)
    for origin, target in pairs(config):
        if origin.name in skipped or target.name in skipped:
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
        """Purge each node's log now and then; membership news and evictions are logged loudly,
        a disagreement between the config and the membership once."""
        said: set[str] = set()
        while True:
            for name in self.nodes:
                try:
                    report = purge_node(self.config, self.config.node_by_name(name))
                except (NodeUnavailable, psycopg.Error) as error:
                    log.debug("purge of %s skipped: %s", name, error)
                    continue
                if report.deleted:
                    log.info("%s: purged %d changes every peer has", name, report.deleted)
                for sentence in report.evicted:
                    log.error("pgconcord: %s", sentence)
                for sentence in report.learned:
                    log.warning("%s: membership: %s", name, sentence)
                for problem in report.problems:
                    if problem not in said:
                        said.add(problem)
                        log.warning("pgconcord: %s", problem)
            if self.stopping.wait(PURGE_SECONDS):
                return
