"""What `pgconcord status` reports: each node's reachability, change log size and conflicts,
and each pair's pending changes and lag. Read from the databases, so it works whether or not
an agent is running. Everything that needs a person (a node down or not set up, parked changes,
a purge that fails, a pair lagging beyond the threshold, membership trouble) is one sentence in
`problems`, and makes the command exit non-zero."""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import psycopg

from pgconcord import capture, catalog, membership
from pgconcord.config import ClusterConfig
from pgconcord.errors import NodeUnavailable, NotSetUp
from pgconcord.transport import connect, first_line

# A pair whose oldest pending change is older than this is a problem (`status --lag SECONDS`):
# an agent that runs keeps pairs within a second or so, so a minute means it is not running,
# or a pair is stalled.
DEFAULT_LAG_SECONDS = 60.0


@dataclass(frozen=True)
class PairStatus:
    origin: str
    target: str
    pending_changes: int | None  # None when either node is unreachable
    pending_bytes: int | None  # size of those changes in the origin's log
    lag_seconds: float | None  # age of the oldest change not yet applied; 0 when none pending
    applied_changes: int | None
    position_updated_at: str | None
    # "evicted" or "parted" (the target's backlog is dropped), "joining" (kept whole for it).
    state: str | None = None


@dataclass(frozen=True)
class NodeStatus:
    name: str
    reachable: bool
    error: str | None = None
    catalog_version: int | None = None
    replicated_tables: int | None = None
    change_log_rows: int | None = None
    change_log_bytes: int | None = None
    conflicts: int | None = None
    conflicts_by_type: dict[str, int] | None = None  # the same, per conflict type
    membership: str | None = None  # joining, active, evicted or parted (as the nodes record it)
    membership_changed_at: str | None = None
    parked_changes: int | None = None  # waiting for an operator (pgconcord conflicts)
    # Why the node's change log could not be purged, while it cannot (015_purge_failure.sql).
    purge_failure: str | None = None
    purge_failing_since: str | None = None
    capture: str | None = None  # how the node captures its changes: "trigger" or "wal"
    # WAL mode: the WAL its slot keeps from being removed, and how long what it holds waits.
    capture_slot_bytes: int | None = None
    capture_slot_seconds: float | None = None


@dataclass
class ClusterStatus:
    cluster: str
    nodes: list[NodeStatus] = field(default_factory=list)
    pairs: list[PairStatus] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # membership: evictions, stale config
    lag_threshold_seconds: float = DEFAULT_LAG_SECONDS

    @property
    def problems(self) -> list[str]:
        """What needs a person, one sentence each; none when the cluster is healthy."""
        found = []
        latest = catalog.latest_version()
        for node in self.nodes:
            if not node.reachable:
                found.append(f"node {node.name} is unreachable: {node.error}")
                continue
            if node.catalog_version == 0:
                found.append(str(NotSetUp(node.name)))
                continue
            if node.error:
                found.append(f"node {node.name}: {node.error}")
                continue
            if node.catalog_version is not None and node.catalog_version < latest:
                found.append(
                    f"node {node.name} has pgconcord's catalog version {node.catalog_version},"
                    f" this pgconcord needs {latest}: run pgconcord setup"
                )
            if node.parked_changes:
                plural = "s" if node.parked_changes > 1 else ""
                found.append(
                    f"node {node.name} holds {node.parked_changes} parked change{plural}:"
                    " see pgconcord conflicts, then retry or discard"
                )
            if node.purge_failure:
                found.append(
                    f"node {node.name}: its change log is not purged"
                    f" (failing since {node.purge_failing_since}): {node.purge_failure}"
                )
        for pair in self.pairs:
            if pair.lag_seconds is not None and pair.lag_seconds > self.lag_threshold_seconds:
                found.append(
                    f"{pair.target} lags {pair.lag_seconds:.0f} s behind {pair.origin}"
                    f" ({pair.pending_changes} changes pending;"
                    f" threshold {self.lag_threshold_seconds:g} s)"
                )
        return found + self.warnings

    @property
    def healthy(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {
            "cluster": self.cluster,
            "healthy": self.healthy,
            "nodes": [asdict(node) for node in self.nodes],
            "pairs": [asdict(pair) for pair in self.pairs],
            "warnings": self.warnings,
            "problems": self.problems,
            "lag_threshold_seconds": self.lag_threshold_seconds,
        }


def _node_status(connection: psycopg.Connection[tuple[object, ...]], name: str) -> NodeStatus:
    version = catalog.installed_version(connection)
    if version == 0:
        return NodeStatus(
            name=name,
            reachable=True,
            catalog_version=0,
            error="pgconcord is not set up here (run pgconcord setup)",
        )
    row = connection.execute(
        """SELECT (SELECT count(*) FROM pgconcord.replicated_table),
                  (SELECT count(*) FROM pgconcord.change_log),
                  pg_total_relation_size('pgconcord.change_log'),
                  (SELECT count(*) FROM pgconcord.conflict),
                  (SELECT count(*) FROM pgconcord.parked_change WHERE state = 'parked'),
                  to_regclass('pgconcord.purge_failure') IS NOT NULL,
                  (SELECT coalesce(jsonb_object_agg(conflict_type, n), '{}')
                     FROM (SELECT conflict_type, count(*) AS n FROM pgconcord.conflict
                            GROUP BY conflict_type) t)"""
    ).fetchone()
    assert row is not None
    tables, rows, size, conflicts, parked = (int(str(value)) for value in row[:5])
    failure = None
    if row[5]:
        failure = connection.execute(
            "SELECT reason, since::text FROM pgconcord.purge_failure"
        ).fetchone()
    retention = capture.wal.slot_retention(connection)
    return NodeStatus(
        name=name,
        reachable=True,
        catalog_version=version,
        replicated_tables=tables,
        change_log_rows=rows,
        change_log_bytes=size,
        conflicts=conflicts,
        conflicts_by_type={str(k): int(v) for k, v in dict(row[6]).items()}
        if isinstance(row[6], dict)
        else {},
        parked_changes=parked,
        purge_failure=None if failure is None else str(failure[0]),
        purge_failing_since=None if failure is None else str(failure[1]),
        capture=capture.installed_mode(connection),
        capture_slot_bytes=retention[0] if retention else None,
        capture_slot_seconds=retention[1] if retention else None,
    )


def _read_node_status(connection: psycopg.Connection[tuple[object, ...]], name: str) -> NodeStatus:
    try:
        return _node_status(connection, name)
    except psycopg.Error as error:  # reached, but pgconcord's tables cannot be read (rights)
        connection.rollback()
        return NodeStatus(
            name=name, reachable=True, error=f"cannot read its status: {first_line(error)}"
        )


# What the target has not applied: the origin's change log past the target's position, and
# what capture appended there that is not stamped yet (stamp_captured.sql), which no target has.
_PENDING = """
SELECT sum(n), min(oldest), sum(size)
  FROM (SELECT count(*) AS n, min(c.clock) AS oldest,
               coalesce(sum(pg_column_size(c.*)), 0) AS size
          FROM pgconcord.change_log c
         WHERE c.txid >= pg_snapshot_xmin(%(applied)s::pg_snapshot)
           AND NOT pg_visible_in_snapshot(c.txid, %(applied)s::pg_snapshot)
        UNION ALL
        SELECT count(*), min(q.wall_clock + n.clock_offset_us),
               coalesce(sum(pg_column_size(q.*)), 0)
          FROM pgconcord.captured_change q, pgconcord.local_node n) AS both_logs
"""


def _membership(
    config: ClusterConfig,
    connections: dict[str, psycopg.Connection[tuple[object, ...]]],
    status: ClusterStatus,
) -> dict[str, membership.Member]:
    """The membership as the reachable nodes record it (the newest record of each member),
    written into the node statuses, with a loud sentence for what needs a person."""
    members = membership.merge(
        membership.read_members(connection)
        for connection in connections.values()
        if membership.installed(connection)
    )
    for index, node in enumerate(status.nodes):
        member = members.get(node.name)
        status.nodes[index] = replace(
            node,
            membership=membership.state_of(members, node.name),
            membership_changed_at=None if member is None else str(member.changed_at),
        )
    status.warnings += membership.config_problems(config, members)
    for name, member in sorted(members.items()):
        if member.state == membership.JOINING:
            status.warnings.append(
                f"node {name} is joining since {member.changed_at:%Y-%m-%d %H:%M}: every node"
                f" keeps its whole change log for it until `pgconcord join {name}` has finished"
            )
    return members


def cluster_status(
    config: ClusterConfig, *, lag_threshold_seconds: float = DEFAULT_LAG_SECONDS
) -> ClusterStatus:
    status = ClusterStatus(cluster=config.cluster.name, lag_threshold_seconds=lag_threshold_seconds)
    connections: dict[str, psycopg.Connection[tuple[object, ...]]] = {}
    try:
        for node in config.nodes:
            try:
                # One read-only transaction per node, not one per statement: the agent's HTTP
                # server reads the status every second while load balancers check it.
                connection = connect(node)
            except NodeUnavailable as error:
                status.nodes.append(NodeStatus(name=node.name, reachable=False, error=error.reason))
                continue
            connections[node.name] = connection
            status.nodes.append(_read_node_status(connection, node.name))
        ready = {n.name for n in status.nodes if n.reachable and n.catalog_version and not n.error}
        members = _membership(config, {n: c for n, c in connections.items() if n in ready}, status)
        now_microseconds = time.time() * 1_000_000
        for target in config.nodes:
            for origin in config.nodes:
                if origin.name == target.name:
                    continue
                # The first of the pair that is not an active member names the pair's state.
                state = next(
                    (
                        each
                        for each in (
                            membership.state_of(members, target.name),
                            membership.state_of(members, origin.name),
                        )
                        if each != membership.ACTIVE
                    ),
                    None,
                )
                if (
                    state in membership.OUT_OF_CLUSTER
                    or origin.name not in ready
                    or target.name not in ready
                ):
                    status.pairs.append(
                        PairStatus(origin.name, target.name, None, None, None, None, None, state)
                    )
                    continue
                position = (
                    connections[target.name]
                    .execute(
                        "SELECT applied_snapshot::text, applied_changes,"
                        " updated_at::text FROM pgconcord.position WHERE origin = %s",
                        (origin.name,),
                    )
                    .fetchone()
                )
                # A window in progress counts as pending as a whole: it is not applied yet.
                if position is None:
                    status.pairs.append(
                        PairStatus(origin.name, target.name, None, None, None, None, None, state)
                    )
                    continue
                pending = (
                    connections[origin.name]
                    .execute(_PENDING, {"applied": str(position[0])})
                    .fetchone()
                )
                assert pending is not None
                count = int(str(pending[0]))
                oldest = pending[1]
                lag = (
                    0.0
                    if oldest is None
                    else max(0.0, (now_microseconds - int(str(oldest))) / 1_000_000)
                )
                status.pairs.append(
                    PairStatus(
                        origin.name,
                        target.name,
                        count,
                        int(str(pending[2])),
                        round(lag, 3),
                        int(str(position[1])),
                        str(position[2]),
                        state,
                    )
                )
    finally:
        for connection in connections.values():
            with contextlib.suppress(psycopg.Error):
                connection.rollback()
            connection.close()
    return status
