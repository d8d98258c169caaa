"""The purge of a node's change log: what every member has applied goes, on the way the
membership news the peers have is taken and a member silent for too long is evicted; and
the purge failures kept on the node for `status`."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import LiteralString

import psycopg

from pgconcord import history, membership
from pgconcord.agent.readiness import is_set_up
from pgconcord.config import ClusterConfig, NodeConfig
from pgconcord.errors import NodeUnavailable
from pgconcord.membership import ACTIVE
from pgconcord.transport import connect, first_line
from pgconcord.transport.postgres import flush_wal

log = logging.getLogger(__name__)


@dataclass
class PurgeReport:
    node: str
    deleted: int = 0
    kept_for: str | None = None  # why nothing was deleted: the member that holds it back
    evicted: list[str] = field(default_factory=list)  # sentences, one per member evicted now
    learned: list[str] = field(default_factory=list)  # membership news taken from the peers
    problems: list[str] = field(default_factory=list)  # config and membership disagree
    conflicts_deleted: int = 0  # conflict records older than conflict.keep
    audit_deleted: int = 0  # row history older than audit.keep


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
    First, conflict records older than conflict.keep and row history older than audit.keep go
    (whatever the members)."""
    report = PurgeReport(node.name)
    with connect(node) as connection:
        report.conflicts_deleted = _purge_conflicts(config, node, connection)
        report.audit_deleted = history.purge_audit(
            connection, node.name, config.audit.keep_seconds, config.audit.keep
        )
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
            membership.note_reached(connection, name, limit)
            continue
        unreached = membership.unreached_seconds(connection, name)
        # reached_at may be that much older than the last look that reached the member.
        late = membership.reached_precision(limit)
        if limit is not None and unreached > limit + late and majority:
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
