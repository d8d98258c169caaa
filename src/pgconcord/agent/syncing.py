"""The one-shot `sync`: every pair pulls until current, then every node is purged."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

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
from pgconcord.config import ClusterConfig
from pgconcord.errors import NodeUnavailable, PgconcordError
from pgconcord.transport import connect, first_line

log = logging.getLogger(__name__)


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
