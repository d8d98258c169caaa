"""The replication loop: wake when an origin's change log grows (or on a timer), pull from
each peer, back off on failure, purge what every peer has. Also the one-shot `sync`.

Each (origin -> target) pair has its own worker thread and Puller, so a slow or unreachable node
holds up only the pairs it is part of. Every worker keeps a one-line account of what it last did
and why (PairState.sentence), which `status` and the console show. A running agent takes a new
config (Agent.reconfigure, on SIGHUP): the pairs of added nodes start, those of removed ones stop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import LiteralString

import psycopg

from pgconcord import catalog, membership, transport
from pgconcord.apply import Puller, PullResult
from pgconcord.config import ClusterConfig, NodeConfig
from pgconcord.errors import ConfigError, NodeUnavailable, NotSetUp, PgconcordError
from pgconcord.membership import ACTIVE
from pgconcord.transport import connect, describe_lost_session, first_line, lost_session
from pgconcord.transport.postgres import flush_wal

log = logging.getLogger(__name__)

CHANNEL = transport.CHANNEL
# A pair looks at its origin at least this often, even when the origin's watch loop (below)
# saw nothing: a change missed by it (a watch connection being set up again) waits no longer.
POLL_SECONDS = 5.0
# How often the watch loop reads an origin's change log sequence: while it moves, and at most
# when it stands still (the interval doubles from the first to the second).
WATCH_BUSY_SECONDS = 0.01
WATCH_IDLE_SECONDS = 0.25
COALESCE_SECONDS = 0.02  # at most one pull per pair in this time, however busy the origin
PURGE_SECONDS = 15.0
CAPTURE_SECONDS = 2.0  # how often each node's own agent looks for capture to regenerate
# A pair that fails waits longer after each failure, up to: the same work would fail again...
MAX_BACKOFF_SECONDS = 30.0
# ...but a node that is down is tried often, so that it is pulled again within seconds of its
# return (a failed connection attempt costs the other side next to nothing).
UNAVAILABLE_BACKOFF_SECONDS = 2.0


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
    conflicts_deleted: int = 0  # conflict records older than conflict.keep


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
    A joining member, or one that cannot be read and is not evicted, keeps everything.
    First, conflict records older than conflict.keep go (whatever the members)."""
    report = PurgeReport(node.name)
    with connect(node) as connection:
        report.conflicts_deleted = _purge_conflicts(config, node, connection)
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


# The oldest records go. detected_at has no index (every conflict would pay for one): the
# records are walked in id order, which is the order they were made in, up to the first one
# to keep, so a purge reads little more than what it deletes. (A record made by a transaction
# that began long before its commit may be kept a little longer than conflict.keep.)
_OLD_CONFLICTS = """
DELETE FROM pgconcord.conflict
 WHERE detected_at < now() - make_interval(secs => %(keep)s)
   AND id < coalesce((SELECT id FROM pgconcord.conflict
                       WHERE detected_at >= now() - make_interval(secs => %(keep)s)
                       ORDER BY id LIMIT 1),
                     (SELECT max(id) + 1 FROM pgconcord.conflict))
"""


def _purge_conflicts(
    config: ClusterConfig, node: NodeConfig, connection: psycopg.Connection[tuple[object, ...]]
) -> int:
    """Delete the node's conflict records older than conflict.keep, in a transaction of its
    own; how many. A failure (a right missing) is logged and does not stop the rest of the
    purge: the change log must not grow because of the records."""
    try:
        with connection.transaction():
            deleted = connection.execute(
                _OLD_CONFLICTS, {"keep": config.conflict.keep_seconds}
            ).rowcount
    except psycopg.OperationalError:
        raise
    except psycopg.DatabaseError as error:
        log.warning(
            "%s: conflict records older than %s not deleted: %s",
            node.name,
            config.conflict.keep,
            str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__,
        )
        return 0
    if deleted > 0:
        log.info(
            "%s: deleted %d conflict records older than %s",
            node.name,
            deleted,
            config.conflict.keep,
        )
    return max(deleted, 0)


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
            # The peer commits what it applies asynchronously (apply.open_target): its
            # position is durable only once its WAL is flushed past it, and a position lost
            # in a crash of the peer is applied again from the origin's log, which must
            # still hold it. Flushed now, read before: what this purge trusts is durable.
            flush_wal(peer_connection)
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
    # Nodes reached whose database has no pgconcord catalog: skipped, and a failure.
    not_set_up: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.unreachable and not self.failures and not self.not_set_up


def sync(config: ClusterConfig) -> SyncReport:
    """Exchange changes among all reachable nodes until each has what the others had when the
    sync started; name the nodes that could not be reached or are not set up."""
    report = SyncReport()
    views = []
    for node in config.nodes:
        try:
            with connect(node) as connection:
                if catalog.installed_version(connection) == 0:
                    report.not_set_up.append(node.name)
                elif membership.installed(connection):
                    views.append(membership.read_members(connection))
        except NodeUnavailable as error:
            report.unreachable[node.name] = error.reason
    members = membership.merge(views)
    for node in config.nodes:
        state = membership.state_of(members, node.name)
        if state in (membership.EVICTED, membership.PARTED):
            report.departed[node.name] = state
            report.unreachable.pop(node.name, None)
    skipped = set(report.unreachable) | set(report.departed) | set(report.not_set_up)
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
        except psycopg.Error as error:
            # One pair's database error must not keep the other pairs from their sync.
            report.failures.append(f"{origin.name} -> {target.name}: {first_line(error)}")
        finally:
            puller.close()
    # A node not reached, or not set up, has positions nobody can read: nothing could go.
    if not report.unreachable and not report.not_set_up:
        for node in config.nodes:
            if node.name in skipped:
                continue
            try:
                purge(config, node)
            except NodeUnavailable as error:
                log.warning("purge of %s skipped: %s", node.name, error)
            except (PgconcordError, psycopg.Error) as error:
                reason = purge_failure_reason(config, node, error)
                if reason is not None:
                    log.warning(
                        "%s: purge failed, its change log keeps growing: %s", node.name, reason
                    )
                    record_purge_failure(node, reason)
            else:
                clear_purge_failure(node)
    return report


def nodes_not_set_up(config: ClusterConfig, names: Iterable[str] | None = None) -> list[str]:
    """The named nodes (all by default) that are reachable and have no pgconcord catalog; an
    unreachable one is not judged (the agent waits for it)."""
    found = []
    for name in names if names is not None else config.node_names:
        try:
            with connect(config.node_by_name(name), autocommit=True) as connection:
                if catalog.installed_version(connection) == 0:
                    found.append(name)
        except (NodeUnavailable, psycopg.Error):
            continue
    return found


def is_set_up(node: NodeConfig) -> bool | None:
    """Whether the node has pgconcord's catalog; None when that cannot be told now."""
    try:
        with connect(node, autocommit=True) as connection:
            return catalog.installed_version(connection) > 0
    except (NodeUnavailable, psycopg.Error):
        return None


# -- purge failures, kept on the node for `status` (015_purge_failure.sql) ----------------------

_RECORD_PURGE_FAILURE = """
INSERT INTO pgconcord.purge_failure (reason) VALUES (%s)
ON CONFLICT (singleton) DO UPDATE SET reason = excluded.reason, failed_at = now()
"""


def purge_failure_reason(
    config: ClusterConfig, node: NodeConfig, error: BaseException
) -> str | None:
    """Why the node's purge failed, for the log and `status`; None when the node or a peer
    listed in the config is not set up yet (there is nothing to purge, or everything is
    rightly kept for that peer, whose positions cannot be read; the pairs name the node)."""
    if isinstance(error, psycopg.errors.UndefinedTable) and any(
        is_set_up(each) is False for each in config.nodes
    ):
        return None
    return first_line(error) if isinstance(error, psycopg.Error) else str(error)


def record_purge_failure(node: NodeConfig, reason: str) -> None:
    _write_purge_failure(node, _RECORD_PURGE_FAILURE, (reason,))


def clear_purge_failure(node: NodeConfig) -> None:
    _write_purge_failure(node, "DELETE FROM pgconcord.purge_failure", ())


def _write_purge_failure(
    node: NodeConfig, statement: LiteralString, values: tuple[str, ...]
) -> None:
    try:
        with connect(node, autocommit=True) as connection:
            row = connection.execute(
                "SELECT to_regclass('pgconcord.purge_failure') IS NOT NULL"
            ).fetchone()
            if row and row[0]:  # a catalog older than version 15 has no place for it
                connection.execute(statement, values)
    except (NodeUnavailable, psycopg.Error) as error:
        log.debug("%s: purge failure not recorded: %s", node.name, error)


# -- the agent -----------------------------------------------------------------------------------


def _log_sequence(connection: psycopg.Connection[tuple[object, ...]]) -> object:
    """Where the node's change log sequence stands (every captured row advances it), or None
    before setup made it."""
    try:
        row = connection.execute("SELECT last_value FROM pgconcord.change_log_id_seq").fetchone()
    except (psycopg.errors.UndefinedTable, psycopg.errors.InsufficientPrivilege):
        return None
    return row[0] if row else None


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
        # The loops one node has, whatever its pairs: ("watch" | "capture", node) -> its stop.
        self._node_loops: dict[tuple[str, str], tuple[NodeConfig, threading.Event]] = {}
        self._threads: list[threading.Thread] = []
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

    def _targets(self, config: ClusterConfig) -> list[str]:
        if self._fixed_nodes is None:
            return list(config.node_names)
        for name in self._fixed_nodes:
            config.node_by_name(name)  # a reload that drops a --node target is refused
        return list(self._fixed_nodes)

    def start(self) -> Agent:
        with self._reconfiguring:
            self._arrange(self.config)
        self._spawn("purge", self._purge_loop)
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
            self._spawn(f"pull {pair.origin.name}->{pair.target.name}", self._pair_loop, pair)
        loops: dict[tuple[str, str], NodeConfig] = {
            ("watch", origin.name): origin for origin, _ in wanted.values()
        }
        loops.update({("capture", name): config.node_by_name(name) for name in self.nodes})
        running = dict(self._node_loops)
        for key, (node, stop) in list(running.items()):
            if loops.get(key) != node:
                stop.set()
                del running[key]
        for key, node in loops.items():
            if key not in running:
                stop = threading.Event()
                running[key] = (node, stop)
                loop = self._watch_loop if key[0] == "watch" else self._capture_loop
                self._spawn(f"{key[0]} {node.name}", loop, node, stop)
        self._node_loops = running
        return changes

    def _spawn(self, name: str, function: Callable[..., None], *arguments: object) -> None:
        thread = threading.Thread(target=function, args=arguments, name=name, daemon=True)
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
        puller = Puller(origin, target)
        backoff = 0.0
        waited = False  # the last failure was a node down: its return is logged by node

        def stopped() -> bool:
            return pair.stopped(self)

        def on_progress(progress: PullResult) -> None:
            state.sentence = (
                f"applying changes from {origin.name}: {progress.changes} so far"
                f" in {progress.transactions} transactions"
            )

        try:
            while not stopped():
                pair.wake.clear()
                pair.retry.clear()
                pulled_at = time.monotonic()
                try:
                    # One window per wake: a commit after its snapshot moves the change log's
                    # sequence, and the watch loop sets the wake again (the timer covers a
                    # missed one), so looking once more right away would only cost round trips.
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
                    pair.retry.wait(backoff)
                else:
                    pair.wake.wait(self.poll_seconds)
                    # Let the commits of the next few milliseconds join this pull: one pull
                    # per commit would cost the origin more than the changes themselves.
                    pair.stop.wait(max(0.0, pulled_at + COALESCE_SECONDS - time.monotonic()))
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
        state.sentence = sentence
        return min(cap, max(0.5, backoff * 2))

    def _wake_pairs_from(self, origin: str) -> None:
        for pair in self._pairs.values():
            if pair.origin.name == origin:
                pair.wake.set()

    def _watch_loop(self, origin: NodeConfig, stop: threading.Event) -> None:
        """Wakes the origin's pairs when its change log grows, and takes the NOTIFY of
        membership news (schema changes notify too); also the probe that notices first that a
        node which was down is back.

        Capture sends no notification (016_watch_not_notify.sql): this loop reads the change
        log's sequence, which every captured row advances, every WATCH_BUSY_SECONDS while it
        moves and up to every WATCH_IDLE_SECONDS when it does not. One small query per
        interval costs the origin the same whatever its write rate; a rolled-back write moves
        the sequence too, which costs one empty poll."""
        backoff = 0.5
        while not (self.stopping.is_set() or stop.is_set()):
            try:
                with connect(origin, autocommit=True) as connection:
                    connection.execute(f"LISTEN {CHANNEL}")
                    backoff = 0.5
                    self._reachable(origin.name)
                    self._learn_members(origin.name, connection)
                    # Anything committed before watching began is picked up by this wake.
                    self._wake_pairs_from(origin.name)
                    seen = _log_sequence(connection)
                    interval = WATCH_BUSY_SECONDS
                    while not (self.stopping.is_set() or stop.is_set()):
                        news = woken = False
                        for notify in connection.notifies(timeout=interval, stop_after=1):
                            if notify.payload == membership.MEMBERSHIP_NEWS:
                                news = True
                            else:
                                woken = True
                        if news:  # read outside the notifies() generator, which holds the lock
                            self._learn_members(origin.name, connection)
                            self._interrupt_pairs_of(origin.name)
                        now = _log_sequence(connection)
                        if now != seen or woken:
                            seen = now
                            interval = WATCH_BUSY_SECONDS
                            self._wake_pairs_from(origin.name)
                        else:
                            interval = min(WATCH_IDLE_SECONDS, interval * 2)
            except NodeUnavailable as error:
                self._unreachable(origin.name, error.reason)
            except psycopg.Error as error:
                if lost_session(error, {origin.name: None}) is not None:
                    self._unreachable(origin.name, describe_lost_session(error))
                else:
                    log.debug("watching %s: %s", origin.name, error)
            stop.wait(backoff)
            backoff = min(UNAVAILABLE_BACKOFF_SECONDS, backoff * 2)

    def _capture_loop(self, node: NodeConfig, stop: threading.Event) -> None:
        """Regenerate, on this agent's own node only, the capture of tables a schema change
        left on the generic capture (see catalog.regenerate_capture); never on a peer's."""
        connection: psycopg.Connection[tuple[object, ...]] | None = None
        while not (stop.wait(CAPTURE_SECONDS) or self.stopping.is_set()):
            try:
                if connection is None or connection.closed:
                    connection = connect(node)
                for name in catalog.regenerate_capture(connection, node.name):
                    log.info("%s: capture of %s regenerated after a schema change", node.name, name)
            except (NodeUnavailable, psycopg.Error) as error:
                log.debug("%s: capture regeneration skipped: %s", node.name, error)
                if connection is not None:
                    connection.close()
                connection = None
        if connection is not None:
            connection.close()

    def _purge_loop(self) -> None:
        """Purge each node's log now and then; membership news and evictions are logged loudly,
        a disagreement between the config and the membership once. A failed purge is logged
        (once until it changes) and kept on the node for `status`: its log only grows."""
        said: set[str] = set()
        failing: dict[str, str] = {}
        cleared: set[str] = set()  # nodes whose recorded failure this process has removed
        while True:
            config = self.config
            for name in list(self.nodes):
                if self.stopping.is_set():
                    return
                try:
                    node = config.node_by_name(name)
                except ConfigError:  # a reload is under way; the next round has it
                    continue
                try:
                    report = purge_node(config, node)
                except NodeUnavailable as error:
                    log.debug("purge of %s skipped: %s", name, error)
                    continue
                except (PgconcordError, psycopg.Error) as error:
                    reason = purge_failure_reason(config, node, error)
                    if reason is None:
                        log.debug("purge of %s waits for a setup: %s", name, error)
                        continue
                    if failing.get(name) != reason:
                        log.warning(
                            "%s: purge failed, its change log keeps growing: %s", name, reason
                        )
                    failing[name] = reason
                    cleared.discard(name)
                    record_purge_failure(node, reason)
                    continue
                if failing.pop(name, None) is not None:
                    log.info("%s: purge works again", name)
                if name not in cleared:
                    clear_purge_failure(node)
                    cleared.add(name)
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
