"""`GET /metrics`: the cluster in Prometheus' text format (prometheus_client), collected at
each scrape from the cached status and the agent's heartbeats, so that a scrape costs the nodes
at most the one reading a second that every endpoint shares.

Counters (applied changes, conflicts) come from totals in the databases, which can go down (a
purge of old conflict records, a position started over by a join): each is exported as the
sum of its increases since the agent started, starting from the total first seen, so that it
never goes backwards across scrapes."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pgconcord import membership
from pgconcord.web.live import Live, StatusUnavailable

PAIR = ["origin", "target"]
NODE = ["node"]
# Exported at 0 on every node that is up before the first of them happens, so that an alert on
# increase() sees the first one too (conflict.rules.conflict_type, conflict.unique and the
# parent check of conflict.statements name them).
CONFLICT_TYPES = (
    "insert_exists",
    "insert_deleted",
    "update_exists",
    "update_origin_differs",
    "update_deleted",
    "delete_origin_differs",
    "delete_missing",
    "multiple_unique_conflicts",
    "parent_missing",
)


class _Counters:
    """Totals read from the databases, made monotonic per label set."""

    def __init__(self) -> None:
        self._seen: dict[tuple[str, ...], tuple[int, float]] = {}  # labels -> (raw, exported)
        self._lock = threading.Lock()

    def advance(self, labels: tuple[str, ...], raw: int | None) -> float | None:
        with self._lock:
            previous = self._seen.get(labels)
            if raw is None:  # not readable now: the last value, so the series goes on
                return None if previous is None else previous[1]
            exported = float(raw) if previous is None else previous[1] + max(0, raw - previous[0])
            self._seen[labels] = (raw, exported)
            return exported


class ClusterCollector(Collector):
    def __init__(self, live: Live) -> None:
        self.live = live
        self._applied = _Counters()
        self._conflicts = _Counters()

    def collect(self) -> Iterable[Metric]:
        health = self.live.health_problems()
        yield GaugeMetricFamily(
            "pgconcord_agent_up",
            "1 while the agent's loops are alive (as /health)",
            0 if health else 1,
        )
        now = time.time()
        self_pairs = GaugeMetricFamily(
            "pgconcord_pair_live",
            "1 while a pair this agent runs pulls successfully (its heartbeat)",
            labels=PAIR,
        )
        pull_age = GaugeMetricFamily(
            "pgconcord_last_pull_age_seconds",
            "Seconds since a pair this agent runs last pulled successfully",
            labels=PAIR,
        )
        for (origin, target), state in self.live.agent.states.items():
            self_pairs.add_metric([origin, target], 0 if self.live.pair_problem(state, now) else 1)
            if state.last_pull_at:
                pull_age.add_metric([origin, target], max(0.0, now - state.last_pull_at))
        yield self_pairs
        yield pull_age
        try:
            reading = self.live.reading()
        except StatusUnavailable:
            yield GaugeMetricFamily(
                "pgconcord_status_up", "1 when the cluster's status could be read", 0
            )
            return
        status = reading.status
        yield GaugeMetricFamily(
            "pgconcord_status_up", "1 when the cluster's status could be read", 1
        )
        yield GaugeMetricFamily(
            "pgconcord_status_read_seconds",
            "How long the last reading of the cluster's status took",
            reading.seconds,
        )
        yield CounterMetricFamily(
            "pgconcord_status_reads",
            "Readings of the cluster's status from the nodes (at most one a second, on request)",
            self.live.status_reads,
        )
        node_up = GaugeMetricFamily(
            "pgconcord_node_up", "1 when the node is reachable and set up", labels=NODE
        )
        evicted = GaugeMetricFamily(
            "pgconcord_node_evicted",
            "1 when the node was evicted or parted (not replicated any more)",
            labels=NODE,
        )
        log_rows = GaugeMetricFamily(
            "pgconcord_change_log_rows", "Changes in the node's change log", labels=NODE
        )
        log_bytes = GaugeMetricFamily(
            "pgconcord_change_log_bytes", "Size of the node's change log", labels=NODE
        )
        parked = GaugeMetricFamily(
            "pgconcord_parked_changes",
            "Changes parked on the node, waiting for an operator",
            labels=NODE,
        )
        purge_failing = GaugeMetricFamily(
            "pgconcord_purge_failing", "1 while the node's change log cannot be purged", labels=NODE
        )
        conflicts = CounterMetricFamily(
            "pgconcord_conflicts",
            "Conflicts the node resolved and recorded",
            labels=["node", "type"],
        )
        for node in status.nodes:
            up = node.reachable and not node.error and bool(node.catalog_version)
            node_up.add_metric([node.name], 1 if up else 0)
            if node.membership is not None:
                out = node.membership in membership.OUT_OF_CLUSTER
                evicted.add_metric([node.name], 1 if out else 0)
            if node.change_log_rows is not None:
                log_rows.add_metric([node.name], node.change_log_rows)
            if node.change_log_bytes is not None:
                log_bytes.add_metric([node.name], node.change_log_bytes)
            if node.parked_changes is not None:
                parked.add_metric([node.name], node.parked_changes)
            if up:
                purge_failing.add_metric([node.name], 1 if node.purge_failure else 0)
            counts = dict.fromkeys(CONFLICT_TYPES, 0) if up else {}
            counts.update(node.conflicts_by_type or {})
            for kind, count in sorted(counts.items()):
                value = self._conflicts.advance((node.name, kind), count)
                if value is not None:
                    conflicts.add_metric([node.name, kind], value)
        lag = GaugeMetricFamily(
            "pgconcord_lag_seconds",
            "Age of the oldest change of the origin the target has not applied (0: none)",
            labels=PAIR,
        )
        pending = GaugeMetricFamily(
            "pgconcord_pending_changes",
            "Changes of the origin the target has not applied",
            labels=PAIR,
        )
        pending_bytes = GaugeMetricFamily(
            "pgconcord_pending_bytes", "Size of those changes in the origin's log", labels=PAIR
        )
        applied = CounterMetricFamily(
            "pgconcord_applied_changes", "Changes of the origin applied to the target", labels=PAIR
        )
        for pair in status.pairs:
            labels = [pair.origin, pair.target]
            if pair.lag_seconds is not None:
                lag.add_metric(labels, pair.lag_seconds)
            if pair.pending_changes is not None:
                pending.add_metric(labels, pair.pending_changes)
            if pair.pending_bytes is not None:
                pending_bytes.add_metric(labels, pair.pending_bytes)
            value = self._applied.advance((pair.origin, pair.target), pair.applied_changes)
            if value is not None:
                applied.add_metric(labels, value)
        yield from (node_up, evicted, log_rows, log_bytes, parked, purge_failing, conflicts)
        yield from (lag, pending, pending_bytes, applied)


def registry_for(live: Live) -> CollectorRegistry:
    """The metrics of one HTTP server: the cluster's, and the agent process's own (CPU,
    memory, open files)."""
    registry = CollectorRegistry(auto_describe=False)  # no reading of the status at start
    registry.register(ClusterCollector(live))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry
