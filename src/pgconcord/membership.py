"""Who belongs to the cluster: member records, `pgconcord part`, and eviction.

Each node keeps the members it knows of in pgconcord.member (009_membership.sql). `join`,
`part` and eviction write a state with a timestamp; the agents' purge copies newer rows from
the peers it reads anyway, so a node that was down learns the news from the others. A node
without a row is an active member (clusters set up before membership was recorded).

What the states mean to the rest of pgconcord:
- joining: its copy is being made; every node keeps its whole change log for it (purge holds),
  and nothing is applied into it until the join has finished.
- active: a normal member.
- evicted: it was offline longer than `replication.evict_after`; the others no longer keep
  changes for it and apply nothing from it (a trigger on pgconcord.position refuses), until
  `pgconcord join` copies it afresh.
- parted: removed for good by `pgconcord part`; the others forgot its positions.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import psycopg
from psycopg import sql

from pgconcord import catalog, history
from pgconcord.apply import Puller
from pgconcord.config import ClusterConfig, NodeConfig
from pgconcord.errors import ConfigError, NodeUnavailable, PgconcordError
from pgconcord.transport import CHANNEL, connect
from pgconcord.transport.postgres import flush_wal

log = logging.getLogger(__name__)

Connection = psycopg.Connection[tuple[object, ...]]

MEMBERSHIP_VERSION = 9  # the catalog version that records members
JOINING, ACTIVE, EVICTED, PARTED = "joining", "active", "evicted", "parted"
OUT_OF_CLUSTER = (EVICTED, PARTED)
# The NOTIFY payload (on transport.CHANNEL) of a membership change: the agents listening to the
# node try its pairs at once instead of at the end of their backoff (a join is acted on now).
MEMBERSHIP_NEWS = "membership"
# The triggers catalog.install_capture puts on a replicated table.
CAPTURE_TRIGGERS = ("pgconcord_capture", "pgconcord_notify", "pgconcord_truncate")
# A row created for a member nobody recorded yet: older than any recorded event.
_NEVER = datetime.min.replace(tzinfo=UTC)


@dataclass(frozen=True)
class Member:
    name: str
    state: str
    changed_at: datetime
    reason: str | None = None
    reached_at: datetime | None = None


def now() -> datetime:
    return datetime.now(UTC)


def installed(connection: Connection) -> bool:
    return catalog.installed_version(connection) >= MEMBERSHIP_VERSION


def read_members(connection: Connection) -> dict[str, Member]:
    rows = connection.execute(
        "SELECT name, state, changed_at, reason, reached_at FROM pgconcord.member"
    ).fetchall()
    members = {}
    for name, state, changed_at, reason, reached_at in rows:
        assert isinstance(changed_at, datetime)
        members[str(name)] = Member(
            str(name),
            str(state),
            changed_at,
            None if reason is None else str(reason),
            reached_at if isinstance(reached_at, datetime) else None,
        )
    return members


def merge(views: Iterable[dict[str, Member]]) -> dict[str, Member]:
    """The newest record of each member over several nodes' views."""
    merged: dict[str, Member] = {}
    for view in views:
        for name, member in view.items():
            known = merged.get(name)
            if known is None or member.changed_at > known.changed_at:
                merged[name] = member
    return merged


def state_of(members: dict[str, Member], name: str) -> str:
    member = members.get(name)
    return ACTIVE if member is None else member.state


def record(
    connection: Connection,
    name: str,
    state: str,
    changed_at: datetime,
    reason: str | None = None,
) -> bool:
    """Store a member's state unless the node already knows a newer one; whether it did."""
    written = connection.execute(
        "INSERT INTO pgconcord.member AS m (name, state, changed_at, reason, reached_at)"
        " VALUES (%s, %s, %s, %s, now())"
        " ON CONFLICT (name) DO UPDATE SET state = excluded.state,"
        " changed_at = excluded.changed_at, reason = excluded.reason,"
        " reached_at = now()"
        " WHERE m.changed_at < excluded.changed_at",
        (name, state, changed_at, reason),
    ).rowcount
    if written > 0:
        connection.execute("SELECT pg_notify(%s, %s)", (CHANNEL, MEMBERSHIP_NEWS))
    return written > 0


def adopt(connection: Connection, news: Iterable[Member]) -> list[Member]:
    """Take the newer records another node has; the ones that were new here. Only those are
    written: an upsert that changes nothing still takes a transaction id, whose end wakes
    every puller of this node (an idle cluster's purges would keep it busy)."""
    news = list(news)
    if not news:
        return []
    known = read_members(connection)
    return [
        member
        for member in news
        if (member.name not in known or known[member.name].changed_at < member.changed_at)
        and record(connection, member.name, member.state, member.changed_at, member.reason)
    ]


def lock(connection: Connection) -> None:
    """Serialize with purges and membership changes of this node until the transaction ends:
    a purge holds it from reading the members to deleting, so a join registered here either
    waited for that purge or is seen by it."""
    connection.execute("LOCK TABLE pgconcord.member IN SHARE ROW EXCLUSIVE MODE")


def drop_capture(connection: Connection) -> None:
    """Remove the capture triggers from every replicated table of this node (the registry and
    the row versions stay): its writes are no longer logged for the others."""
    for schema, name in catalog.registered_tables(connection):
        exists = connection.execute(
            "SELECT to_regclass(%s) IS NOT NULL",
            (sql.Identifier(schema, name).as_string(connection),),
        ).fetchone()
        if not exists or not exists[0]:
            continue
        for trigger in CAPTURE_TRIGGERS:
            connection.execute(
                sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(
                    sql.Identifier(trigger), sql.Identifier(schema, name)
                )
            )
    if catalog.installed_version(connection) >= history.AUDIT_VERSION:
        # Nor are they audited: the trail tells a member's story.
        history.remove_audit(connection, set())


def quiet_schema_changes(connection: Connection) -> None:
    """Keep this session's schema changes (pgconcord's own triggers, the tables a join creates)
    from being logged for the peers, or refused, by the event triggers that replicate schema
    changes: they do not fire with session_replication_role = replica, and skip statements
    marked as pgconcord's own work."""
    for statement in (
        "SET session_replication_role = replica",
        "SELECT set_config('pgconcord.installing', 'on', false)",
    ):
        try:
            connection.execute(statement)
            if not connection.autocommit:
                connection.commit()
        except psycopg.errors.InsufficientPrivilege:
            if not connection.autocommit:
                connection.rollback()


def switch_off_capture(connection: Connection, attempts: int = 20) -> None:
    """drop_capture on a node whose application may still be writing: in one transaction, so
    that a transaction of the application is captured whole or not at all, and with a short
    deadlock_timeout and lock_timeout so that a lock conflict with the application aborts this
    attempt, not the application's work; then it is tried again."""
    quiet_schema_changes(connection)
    for setting in ("deadlock_timeout = '50ms'", "lock_timeout = '2s'"):
        try:
            connection.execute(f"SET {setting}")
            connection.commit()
        except psycopg.errors.InsufficientPrivilege:
            connection.rollback()
    for attempt in range(attempts):
        try:
            with connection.transaction():
                drop_capture(connection)
            return
        except (psycopg.errors.DeadlockDetected, psycopg.errors.LockNotAvailable):
            if attempt == attempts - 1:
                raise
            time.sleep(0.1 * (attempt + 1))


def config_problems(config: ClusterConfig, members: dict[str, Member]) -> list[str]:
    """What is wrong between the config and the recorded membership, one sentence each."""
    problems = []
    listed = set(config.node_names)
    for name in config.node_names:
        member = members.get(name)
        if member is not None and member.state == PARTED:
            problems.append(
                f"node {name} was parted from the cluster on {member.changed_at:%Y-%m-%d %H:%M}"
                " but the config still lists it: remove it from the config"
            )
        elif member is not None and member.state == EVICTED:
            problems.append(
                f"node {name} was evicted on {member.changed_at:%Y-%m-%d %H:%M}"
                f" ({member.reason or 'offline too long'}): its changes are no longer kept;"
                f" `pgconcord join {name}` brings it back with a fresh copy"
            )
    for name, member in sorted(members.items()):
        if name not in listed and member.state not in OUT_OF_CLUSTER:
            problems.append(
                f"node {name} is a {member.state} member of the cluster but not in this config:"
                " its changes are not exchanged and every node keeps its change log for it"
                " (use the cluster's current config)"
            )
    return problems


# -- part ------------------------------------------------------------------------------------


@dataclass
class PartReport:
    node: str
    reached: bool = False  # the parting node could be reached: handed over and switched off
    already_parted: bool = False
    handed_over: dict[str, int] = field(default_factory=dict)  # remaining node -> changes
    recorded_on: list[str] = field(default_factory=list)
    unreachable: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def part(
    config: ClusterConfig,
    name: str,
    *,
    force: bool = False,
    progress: Callable[[str], None] = lambda _: None,
) -> PartReport:
    """Remove a node from the cluster. If it is reachable, its last changes are first delivered
    to every remaining node and its capture is switched off; if not (gone for good), the others
    just forget it. Either way every remaining node deletes its positions and stops keeping
    changes for it, and records it as parted."""
    report = PartReport(node=name)
    remaining = [node for node in config.nodes if node.name != name]
    if not remaining:
        raise ConfigError(f"node {name} is the only node in the config: nothing to part it from")
    connections: dict[str, Connection] = {}
    try:
        for node in remaining:
            try:
                connections[node.name] = connect(node, autocommit=True)
            except NodeUnavailable as error:
                report.unreachable[node.name] = error.reason
        if not connections:
            raise PgconcordError(
                f"cannot part {name}: no other node is reachable"
                f" ({'; '.join(f'{n}: {r}' for n, r in report.unreachable.items())})"
            )
        for node_name, connection in connections.items():
            if not installed(connection):
                raise PgconcordError(
                    f"node {node_name}: pgconcord's catalog is older than this command"
                    " (run pgconcord setup first)"
                )
        members = merge(read_members(c) for c in connections.values())
        positions = _positions_of(connections, name)
        if name not in config.node_names and name not in members and not positions:
            raise ConfigError(
                f"unknown node {name!r}: neither the config nor any reachable node knows it"
            )
        # Nodes that already left are not waited for.
        for node_name in list(report.unreachable):
            if state_of(members, node_name) in OUT_OF_CLUSTER:
                del report.unreachable[node_name]
        report.already_parted = state_of(members, name) == PARTED
        if name in config.node_names and not report.already_parted:
            _hand_over(config, name, connections, report, force, progress)
        if not report.reached and not report.already_parted:
            report.warnings.append(
                f"{name} was not reachable: changes it made that no other node had pulled are lost"
            )
            if len(set(positions.values())) > 1:
                report.warnings.append(
                    f"the remaining nodes had applied different amounts of {name}'s changes;"
                    " `pgconcord verify` names the rows that may differ"
                )
        when = now()
        reason = f"parted by pgconcord part at {when:%Y-%m-%d %H:%M:%S} UTC"
        for node_name, connection in connections.items():
            with connection.transaction():
                lock(connection)
                record(connection, name, PARTED, when, reason)
                connection.execute("DELETE FROM pgconcord.position WHERE origin = %s", (name,))
                connection.execute("DELETE FROM pgconcord.copy_horizon WHERE origin = %s", (name,))
            report.recorded_on.append(node_name)
            progress(f"{node_name}: forgot {name}")
        return report
    finally:
        for connection in connections.values():
            connection.close()


def _positions_of(connections: dict[str, Connection], origin: str) -> dict[str, tuple[object, ...]]:
    found = {}
    for node_name, connection in connections.items():
        row = connection.execute(
            "SELECT applied_snapshot::text, window_snapshot::text, window_done"
            " FROM pgconcord.position WHERE origin = %s",
            (origin,),
        ).fetchone()
        if row is not None:
            found[node_name] = tuple(row)
    return found


def _hand_over(
    config: ClusterConfig,
    name: str,
    connections: dict[str, Connection],
    report: PartReport,
    force: bool,
    progress: Callable[[str], None],
) -> None:
    """Deliver the parting node's last changes to every remaining node, then switch it off."""
    parting = config.node_by_name(name)
    try:
        leaving = connect(parting)
    except NodeUnavailable as error:
        progress(f"{name} is unreachable ({error.reason}): parting it without its last changes")
        return
    try:
        waiting = list(report.unreachable)
        if waiting and not force:
            raise PgconcordError(
                f"node {waiting[0]} is unreachable: it would miss {name}'s last changes;"
                f" run `pgconcord part {name}` again once it is back, or add --force"
            )
        targets = [config.node_by_name(n) for n in connections]
        # A first pass while the node still captures (nothing changes if it fails), then the
        # capture is switched off and a second pass takes whatever was committed meanwhile.
        _deliver(parting, targets, report)
        switch_off_capture(leaving)
        with leaving.transaction():
            if installed(leaving):
                leaving.execute("SELECT pgconcord.stamp_captured(true)")
        _deliver(parting, targets, report)
        with leaving.transaction():
            if installed(leaving):
                _nothing_left_to_stamp(leaving, name)
                lock(leaving)
                record(leaving, name, PARTED, now(), "parted by pgconcord part")
            leaving.execute("DELETE FROM pgconcord.position")
            leaving.execute("DELETE FROM pgconcord.change_log")
            leaving.execute("DELETE FROM pgconcord.captured_change")
            leaving.execute("DELETE FROM pgconcord.copy_horizon")
        report.reached = True
        delivered = sum(report.handed_over.values())
        progress(f"{name}: handed over its last {delivered} changes and stopped capturing")
    finally:
        leaving.close()


def _nothing_left_to_stamp(leaving: Connection, name: str) -> None:
    """Every change the parting node captured is in its change log, delivered: none is lost
    with the log."""
    left = leaving.execute("SELECT count(*) FROM pgconcord.captured_change").fetchone()
    if left and int(str(left[0])):
        raise PgconcordError(
            f"node {name}: {left[0]} changes it captured were not stamped yet as it parted;"
            f" run `pgconcord part {name}` again"
        )


def _deliver(origin: NodeConfig, targets: list[NodeConfig], report: PartReport) -> None:
    for target in targets:
        puller = Puller(origin, target)
        try:
            result = puller.pull(wait_for_turn=True, until_current=True)
        except PgconcordError as error:
            raise PgconcordError(
                f"cannot hand over {origin.name}'s last changes to {target.name}: {error};"
                " nothing was parted"
            ) from None
        finally:
            puller.close()
        report.handed_over[target.name] = report.handed_over.get(target.name, 0) + result.changes
        # The target commits what it applies asynchronously (apply.open_target), and the
        # parting node's log goes next: what it received must be on its disk first.
        with connect(target, autocommit=True) as flushing:
            flush_wal(flushing)


# -- eviction --------------------------------------------------------------------------------


def evict(connection: Connection, name: str, reason: str) -> bool:
    """Record, on this node, that a member is evicted; whether it was news. The others learn
    it from this node at their next purge."""
    return record(connection, name, EVICTED, now(), reason)


# How stale a member's reached_at may be before a purge that reached it writes it again, at
# most, and as a share of the eviction limit: each write wakes the node's pullers.
REACHED_PRECISION_SECONDS = 300.0
REACHED_PRECISION_SHARE = 0.05


def reached_precision(evict_after_seconds: float | None) -> float:
    """How old a reached member's reached_at may be (note_reached): the purge evicts only once
    a member has been unreached for the limit plus this, never before the limit."""
    if evict_after_seconds is None:
        return REACHED_PRECISION_SECONDS
    return min(REACHED_PRECISION_SECONDS, REACHED_PRECISION_SHARE * evict_after_seconds)


def note_reached(connection: Connection, name: str, evict_after_seconds: float | None) -> None:
    """This node's purge has just read the member's position: restart its eviction clock, to
    within a twentieth of the limit or five minutes (a look that writes nothing takes no
    transaction id)."""
    precision = reached_precision(evict_after_seconds)
    fresh = connection.execute(
        "SELECT reached_at >= now() - make_interval(secs => %s) FROM pgconcord.member"
        " WHERE name = %s",
        (precision, name),
    ).fetchone()
    if fresh is not None and fresh[0]:
        return
    connection.execute(
        "INSERT INTO pgconcord.member AS m (name, state, changed_at, reached_at)"
        " VALUES (%s, 'active', %s, now())"
        " ON CONFLICT (name) DO UPDATE SET reached_at = now()",
        (name, _NEVER),
    )


def unreached_seconds(connection: Connection, name: str) -> float:
    """How long ago this node last reached the member; the clock starts when this node first
    looks (a member nobody reached yet gets the full limit)."""
    connection.execute(
        "INSERT INTO pgconcord.member (name, state, changed_at, reached_at)"
        " VALUES (%s, 'active', %s, now())"
        " ON CONFLICT (name) DO UPDATE"
        " SET reached_at = coalesce(pgconcord.member.reached_at, now())",
        (name, _NEVER),
    )
    row = connection.execute(
        "SELECT extract(epoch FROM now() - reached_at)::float8 FROM pgconcord.member"
        " WHERE name = %s",
        (name,),
    ).fetchone()
    return float(str(row[0])) if row else 0.0
