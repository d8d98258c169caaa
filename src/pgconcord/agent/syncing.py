"""The one-shot `sync`: every pair pulls until current (the pairs into one node side by side),
then every node is purged."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

import psycopg

from pgconcord import catalog, membership
from pgconcord.agent.pair import pairs
from pgconcord.agent.purging import (
    clear_purge_failure,
    purge,
    purge_failure_reason,
    record_purge_failure,
)
from pgconcord.apply import Puller, PullResult
from pgconcord.config import ClusterConfig, NodeConfig
from pgconcord.errors import NodeUnavailable, PgconcordError
from pgconcord.transport import connect, first_line

log = logging.getLogger(__name__)

Item = TypeVar("Item")
Outcome = TypeVar("Outcome")


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
    for node, found in zip(config.nodes, _side_by_side(_look_at, config.nodes), strict=True):
        if isinstance(found, NodeUnavailable):
            report.unreachable[node.name] = found.reason
        elif found == _NOT_SET_UP:
            report.not_set_up.append(node.name)
        elif isinstance(found, dict):
            views.append(found)
    members = membership.merge(views)
    for node in config.nodes:
        state = membership.state_of(members, node.name)
        if state in (membership.EVICTED, membership.PARTED):
            report.departed[node.name] = state
            report.unreachable.pop(node.name, None)
    skipped = set(report.unreachable) | set(report.departed) | set(report.not_set_up)
    stopping = threading.Event()

    def pull(pair: tuple[NodeConfig, NodeConfig]) -> PullResult | NodeUnavailable | str:
        origin, target = pair
        puller = Puller(origin, target)
        try:
            return puller.pull(stopping.is_set, wait_for_turn=True, until_current=True)
        except NodeUnavailable as error:
            return error
        except PgconcordError as error:
            return str(error)
        except psycopg.Error as error:
            # One pair's database error must not keep the other pairs from their sync.
            return f"{origin.name} -> {target.name}: {first_line(error)}"
        finally:
            puller.close()

    for target in config.nodes:
        into_target = [
            pair
            for pair in pairs(config, [target.name])
            if not {pair[0].name, target.name} & skipped
        ]
        for outcome in _side_by_side(pull, into_target, stopping):
            if isinstance(outcome, NodeUnavailable):
                report.unreachable.setdefault(outcome.node, outcome.reason)
            elif isinstance(outcome, str):
                report.failures.append(outcome)
            else:
                report.results.append(outcome)
    # A node not reached, or not set up, has positions nobody can read: nothing could go.
    if not report.unreachable and not report.not_set_up:
        _side_by_side(
            lambda node: _purge(config, node),
            [node for node in config.nodes if node.name not in skipped],
            stopping,
        )
    return report


# The pairs into one node pull side by side, as the agent's pair loops do (a deadlock between
# two of them is taken again within the pull), and the nodes one after another: a look at an
# origin where another pull stamps (from the same origin, or applying into it) waits for that
# stamp and looks again (transport.postgres.poll), but misses one that commits just as the
# look begins (its snapshot is older), and the sync would end without those changes. Most of a
# small pull
# is waiting for the servers: a sync of three nodes with a few rows each took 0.43-0.53 s so,
# 0.52-0.70 s one pair after the other (WAL capture: 0.68-0.89 s, 0.70-1.23 s).
SIDE_BY_SIDE = 4

_NOT_SET_UP = "not set up"


def _side_by_side(
    function: Callable[[Item], Outcome],
    items: Sequence[Item],
    stopping: threading.Event | None = None,
) -> list[Outcome]:
    """function of each item, in threads, in the items' order. An interrupt (Ctrl-C) starts
    nothing more and tells what runs to stop (stopping) before it goes on."""
    if len(items) <= 1:
        return [function(item) for item in items]
    pool = ThreadPoolExecutor(max_workers=min(SIDE_BY_SIDE, len(items)), thread_name_prefix="sync")
    try:
        return list(pool.map(function, items))
    except BaseException:
        if stopping is not None:
            stopping.set()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    finally:
        pool.shutdown(wait=True)


def _look_at(node: NodeConfig) -> dict[str, membership.Member] | NodeUnavailable | str | None:
    """What a node's catalog says of the cluster: its membership view, _NOT_SET_UP, None
    without membership, or the NodeUnavailable met on the way."""
    try:
        with connect(node) as connection:
            if catalog.installed_version(connection) == 0:
                return _NOT_SET_UP
            if membership.installed(connection):
                return membership.read_members(connection)
            return None
    except NodeUnavailable as error:
        return error


def _purge(config: ClusterConfig, node: NodeConfig) -> None:
    try:
        purge(config, node)
    except NodeUnavailable as error:
        log.warning("purge of %s skipped: %s", node.name, error)
    except (PgconcordError, psycopg.Error) as error:
        reason = purge_failure_reason(config, node, error)
        if reason is not None:
            log.warning("%s: purge failed, its change log keeps growing: %s", node.name, reason)
            record_purge_failure(node, reason)
    else:
        clear_purge_failure(node)
