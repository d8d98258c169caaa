"""What the agent's log says about its work at info level (`pgconcord run`, `-v`), so that an
operator reading the journal sees replication alive or not without running `status`:

- a line per pair per minute: changes applied and conflicts in that minute, lag and backlog;
- a line per conflict: table, key, type, resolution and the nodes involved;
- a line when a node that was lost is caught up again (the runner logs the loss itself, and
  that it is reachable again: reachable is not yet caught up).

Each line carries its figures as fields of its own (`extra`), which `--log-format json` turns
into keys of the JSON object. It all runs in one thread of its own that reads the pairs'
accounts (PairState) and asks a database only when it has something to say: nothing at all
when info lines are not logged, so the agent's work never waits for its report."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import psycopg

from pgconcord.agent.heartbeat import tick
from pgconcord.agent.pair import PairState
from pgconcord.errors import PgconcordError
from pgconcord.transport import connect

if TYPE_CHECKING:
    from pgconcord.agent.runner import Agent

log = logging.getLogger(__name__)

# A minute, as operators read logs; the tests shorten it (PGCONCORD_REPORT_SECONDS).
REPORT_SECONDS = float(os.environ.get("PGCONCORD_REPORT_SECONDS", "60"))
TICK_SECONDS = 1.0  # how soon a conflict or a catch-up is in the log
# The longest a tick may take (the per-minute line reads every node's status, each connection
# attempt up to its timeout), for the agent's heartbeats (/health).
REPORT_ROUND_SECONDS = 60.0
MAX_CONFLICT_LINES = 100  # per node and tick: a storm of conflicts is summed up, not flooded

_NEW_CONFLICTS = """
SELECT id, schema_name, table_name, row_key, conflict_type, resolution, local_origin,
       incoming_origin, incoming_operation::text
  FROM pgconcord.conflict WHERE id > %s ORDER BY id LIMIT %s
"""
_LATEST_CONFLICTS = """
SELECT * FROM (SELECT id, schema_name, table_name, row_key, conflict_type, resolution,
       local_origin, incoming_origin, incoming_operation::text
  FROM pgconcord.conflict ORDER BY id DESC LIMIT %s) latest ORDER BY id
"""
_OPERATIONS = {"I": "insert", "U": "update", "D": "delete"}


@dataclass
class _Minute:
    """A pair's counters at the start of the current minute."""

    applied: int
    conflicts: int


@dataclass
class Reporter:
    """The report's memory between ticks; one per agent."""

    agent: Agent
    minute_started: float = field(default_factory=time.monotonic)
    minute: dict[tuple[str, str], _Minute] = field(default_factory=dict)
    conflicts_seen: dict[str, int] = field(default_factory=dict)  # target -> sum of pairs'
    last_conflict_id: dict[str, int] = field(default_factory=dict)
    # Nodes lost and not yet caught up -> when they were lost (time.time(), as last_pull_at).
    lost: dict[str, float] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def tick(self) -> None:
        if not log.isEnabledFor(logging.INFO):
            self._forget()
            return
        states = dict(self.agent.states)
        self._follow_nodes(states)
        self._log_conflicts(states)
        if time.monotonic() - self.minute_started >= REPORT_SECONDS:
            self._log_minute(states)

    def _forget(self) -> None:
        """While nothing is logged, counting starts afresh at the next line logged."""
        self.minute.clear()
        self.conflicts_seen.clear()
        self.minute_started = time.monotonic()
        with self._lock:
            self.lost.clear()

    # -- a node lost and caught up again -----------------------------------------------------

    def node_lost(self, node: str) -> None:
        """Called by the runner when it logs a node lost: however short the loss, the line
        saying it is caught up follows."""
        with self._lock:
            self.lost.setdefault(node, time.time())

    def _follow_nodes(self, states: Mapping[tuple[str, str], PairState]) -> None:
        with self._lock:
            lost = dict(self.lost)
        down_now = set(self.agent._down.copy())  # the runner's own record of lost nodes
        for name, lost_at in lost.items():
            if name in down_now:
                continue
            involved = [state for key, state in states.items() if name in key]
            if not involved:
                with self._lock:
                    self.lost.pop(name, None)  # no pair with it any more (a reload)
                continue
            # Caught up: every pair with it pulled since it was lost, to the end of what its
            # origin had committed (behind_since: nothing ended there since that pull began).
            if all(
                state.healthy and state.behind_since is None and state.last_pull_at >= lost_at
                for state in involved
            ):
                with self._lock:
                    self.lost.pop(name, None)
                seconds = time.time() - lost_at
                log.info(
                    "node %s is caught up: every pair with it is up to date, %.1f s after it"
                    " was lost",
                    name,
                    seconds,
                    extra={"event": "node_caught_up", "node": name, "lost_seconds": seconds},
                )

    # -- conflicts, one line each ------------------------------------------------------------

    def _log_conflicts(self, states: Mapping[tuple[str, str], PairState]) -> None:
        totals: dict[str, int] = {}
        for (_, target), state in states.items():
            totals[target] = totals.get(target, 0) + state.conflicts
        for target, total in totals.items():
            seen = self.conflicts_seen.get(target)
            self.conflicts_seen[target] = total
            if seen is None:
                # First look at this target: only what comes from now on is news.
                if total:
                    self._log_new_conflicts(target, total)
                continue
            if total > seen:
                self._log_new_conflicts(target, total - seen)

    def _log_new_conflicts(self, target: str, count: int) -> None:
        try:
            node = self.agent.config.node_by_name(target)
            with connect(node, autocommit=True) as connection:
                last = self.last_conflict_id.get(target)
                rows = (
                    connection.execute(_NEW_CONFLICTS, (last, MAX_CONFLICT_LINES)).fetchall()
                    if last is not None
                    else connection.execute(
                        _LATEST_CONFLICTS, (min(count, MAX_CONFLICT_LINES),)
                    ).fetchall()
                )
        except (PgconcordError, psycopg.Error) as error:
            log.debug("conflicts of %s not read for the log: %s", target, error)
            return
        for row in rows:
            self.last_conflict_id[target] = int(str(row[0]))
            log_conflict(target, row)
        if count > len(rows) and len(rows) == MAX_CONFLICT_LINES:
            log.info(
                "node %s: %d more conflicts (pgconcord conflicts --node %s shows them all)",
                target,
                count - len(rows),
                target,
                extra={"event": "conflicts_more", "node": target, "count": count - len(rows)},
            )

    # -- a line per pair per minute ----------------------------------------------------------

    def _log_minute(self, states: Mapping[tuple[str, str], PairState]) -> None:
        lags = self._lags()
        elapsed = time.monotonic() - self.minute_started
        for key, state in sorted(states.items()):
            before = self.minute.get(key)
            self.minute[key] = _Minute(state.applied_changes, state.conflicts)
            if before is None:
                before = _Minute(0, 0)
            applied = state.applied_changes - before.applied
            conflicts = state.conflicts - before.conflicts
            lag, pending = lags.get(key, (None, None))
            log.info(
                "%s -> %s: %d changes applied in the last %.0f s, %d conflicts, lag %s,"
                " %s pending; %s",
                key[0],
                key[1],
                applied,
                elapsed,
                conflicts,
                "?" if lag is None else f"{lag:.1f} s",
                "?" if pending is None else pending,
                state.sentence,
                extra={
                    "event": "pair_minute",
                    "origin": key[0],
                    "target": key[1],
                    "applied_changes": applied,
                    "conflicts": conflicts,
                    "lag_seconds": lag,
                    "pending_changes": pending,
                    "healthy": state.healthy,
                    "seconds": round(elapsed, 1),
                },
            )
        for key in set(self.minute) - set(states):
            del self.minute[key]
        self.minute_started = time.monotonic()

    def _lags(self) -> dict[tuple[str, str], tuple[float | None, int | None]]:
        """Lag and backlog per pair, as `status` measures them."""
        from pgconcord.status import cluster_status

        try:
            report = cluster_status(self.agent.config)
        except (PgconcordError, psycopg.Error) as error:
            log.debug("lag not measured for the log: %s", error)
            return {}
        return {
            (pair.origin, pair.target): (pair.lag_seconds, pair.pending_changes)
            for pair in report.pairs
        }


def log_conflict(node: str, row: tuple[object, ...]) -> None:
    """One conflict recorded on `node` (a row of pgconcord.conflict), on one line."""
    (_, schema, table, key, kind, resolution, local_origin, incoming_origin, operation) = row
    kept = incoming_origin if resolution == "incoming" else local_origin or node
    log.info(
        "conflict on %s: %s.%s key %s, %s: %s from %s met %s's version; kept %s's (%s)",
        node,
        schema,
        table,
        _key_text(key),
        kind,
        _OPERATIONS.get(str(operation), operation),
        incoming_origin,
        local_origin or node,
        kept,
        resolution,
        extra={
            "event": "conflict",
            "node": node,
            "table": f"{schema}.{table}",
            "key": key,
            "type": kind,
            "resolution": resolution,
            "local_origin": local_origin,
            "incoming_origin": incoming_origin,
        },
    )


def _key_text(key: object) -> str:
    if isinstance(key, Mapping):
        return ", ".join(f"{column}={value!r}" for column, value in key.items())
    return repr(key)


def report_loop(reporter: Reporter) -> None:
    """The report's thread: a tick a second until the agent stops."""
    while not reporter.agent.stopping.wait(TICK_SECONDS):
        tick()
        try:
            reporter.tick()
        except Exception:  # the report must never be what stops an agent
            log.exception("the agent's report failed; replication goes on")
