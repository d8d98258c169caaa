"""The cluster as the HTTP server tells it: `status --json` (pgconcord.status, read from the
databases at most once a CACHE_SECONDS, whoever asks: load balancers, Prometheus and the
console cannot hammer the nodes) with the agent's live heartbeats added to each pair it runs,
so that a dead link shows as not live within seconds, whatever the databases still say."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, replace
from typing import Any

import psycopg

from pgconcord.agent import Agent, PairState
from pgconcord.errors import PgconcordError
from pgconcord.status import DEFAULT_LAG_SECONDS, ClusterStatus, cluster_status
from pgconcord.transport import first_line

CACHE_SECONDS = 1.0
WAIT_SECONDS = 0.5
STALE_SECONDS = 10.0
# A healthy pair looks at its origin at least once a poll (Agent.poll_seconds): one that has
# not pulled for this many polls is stuck, whatever its last sentence says.
STALE_POLLS = 3


class StatusUnavailable(PgconcordError):
    """The status could not be read (a node failed halfway through the reading)."""


@dataclass(frozen=True)
class Reading:
    status: ClusterStatus
    read_at: float  # time.time() when the reading began
    seconds: float  # how long it took


class Live:
    """What the endpoints read: the cached status, and the agent's heartbeats."""

    def __init__(self, agent: Agent, *, cache_seconds: float = CACHE_SECONDS) -> None:
        self.agent = agent
        self.cache_seconds = cache_seconds
        self.started_at = time.time()
        self._lock = threading.Lock()
        self._reading: Reading | None = None
        self._read_at_monotonic = 0.0  # when the reading at hand began
        self._attempted_at_monotonic = -cache_seconds  # when the last one (or a failed one) did
        self._refresh: threading.Thread | None = None  # the reading under way: one at a time
        self._error: str | None = None  # why the last reading failed
        self.status_reads = 0

    # -- the databases, once a second at most -----------------------------------------------

    def reading(self) -> Reading:
        """The status: the reading at hand while it is younger than cache_seconds, else a new
        one. A request waits for a new reading WAIT_SECONDS at most while the one at hand is
        younger than STALE_SECONDS (a node whose host does not answer makes a reading wait for
        the connection timeout; a load balancer's check must not); else until it is done."""
        with self._lock:
            previous = self._reading
            now = time.monotonic()
            age = now - self._read_at_monotonic
            if previous is not None and age < self.cache_seconds:
                return previous
            if self._refresh is None and now - self._attempted_at_monotonic >= self.cache_seconds:
                self._attempted_at_monotonic = now
                self._refresh = threading.Thread(target=self._read, name="http status", daemon=True)
                self._refresh.start()
            refresh = self._refresh
            usable = previous is not None and age < STALE_SECONDS
        if refresh is not None:
            refresh.join(WAIT_SECONDS if usable else None)
        with self._lock:
            if self._reading is not None and self._reading is not previous:
                return self._reading
            if usable and previous is not None:
                return previous
            raise StatusUnavailable(self._error or "the status could not be read yet")

    def _read(self) -> None:
        began, began_monotonic = time.time(), time.monotonic()
        reading = None
        error_text = "the status could not be read: an unexpected error (see the agent's log)"
        try:
            status = cluster_status(self.agent.config, lag_threshold_seconds=DEFAULT_LAG_SECONDS)
            reading = Reading(status, began, time.monotonic() - began_monotonic)
        except (psycopg.Error, PgconcordError) as error:
            # A node that went away between two statements of the reading: said as such, and
            # the next request reads again.
            message = first_line(error) if isinstance(error, psycopg.Error) else str(error)
            error_text = f"the status could not be read: {message}"
        finally:
            with self._lock:  # all at once: a request never sees the reading done but not kept
                self._refresh = None
                if reading is None:
                    self._error = error_text
                else:
                    self._reading = reading
                    self._read_at_monotonic = began_monotonic
                    self._error = None
                    self.status_reads += 1

    def recent_reading(self, max_age_seconds: float) -> Reading | None:
        """The last reading if it is younger than max_age_seconds; never reads."""
        reading = self._reading
        if reading is None or time.time() - reading.read_at > max_age_seconds:
            return None
        return reading

    # -- the agent, without SQL ---------------------------------------------------------------

    def health_problems(self) -> list[str]:
        """Why the agent is not healthy (a loop dead or stuck, a stop under way); none: it is."""
        if self.agent.stopping.is_set():
            return ["the agent is stopping"]
        return self.agent.heartbeats.problems()

    @property
    def stale_after_seconds(self) -> float:
        return STALE_POLLS * self.agent.poll_seconds

    def pair_problem(self, state: PairState, now: float) -> str | None:
        """Why a pair this agent runs is not live; None when it is."""
        pair = f"{state.origin} -> {state.target}"
        if not state.healthy:
            return f"{pair}: {state.sentence}"
        last = max(state.last_pull_at, state.last_progress_at)
        if last == 0.0:
            running = now - self.started_at
            if running > self.stale_after_seconds:
                return f"{pair}: no pull finished in the {running:.0f} s the agent has run"
            return None
        if now - last > self.stale_after_seconds:  # a pull stuck, or one long under way
            return f"{pair}: no pull finished for {now - last:.0f} s ({state.sentence})"
        return None

    def heartbeat(self, state: PairState | None, now: float) -> dict[str, Any]:
        """The live fields of one pair: those of the agent's own account of it, null for a
        pair this agent does not run (another agent's, with --node)."""
        if state is None:
            return {
                "agent_running": False,
                "agent_healthy": None,
                "agent_sentence": None,
                "live": None,
                "last_pull_at": None,
                "last_pull_seconds_ago": None,
                "last_error": None,
                "last_error_at": None,
                "agent_applied_changes": None,
                "agent_conflicts": None,
                "heartbeat_lag_seconds": None,
            }
        return {
            "agent_running": True,
            "agent_healthy": state.healthy,
            "agent_sentence": state.sentence,
            "live": self.pair_problem(state, now) is None,
            "last_pull_at": state.last_pull_at or None,
            "last_pull_seconds_ago": round(now - state.last_pull_at, 3)
            if state.last_pull_at
            else None,
            "last_error": state.last_error,
            "last_error_at": state.last_error_at or None,
            "agent_applied_changes": state.applied_changes,
            "agent_conflicts": state.conflicts,
            "heartbeat_lag_seconds": heartbeat_lag(state, now),
        }

    def status_json(
        self, reading: Reading, *, lag_threshold_seconds: float | None = None
    ) -> dict[str, Any]:
        """`status --json` of the reading (with `--lag lag_threshold_seconds` when given), each
        pair with its heartbeat; a pair of this agent that is not live, or a node it cannot
        reach, is a problem (and the cluster not healthy) at once, not when the lag threshold
        is passed."""
        now = time.time()
        status = reading.status
        if lag_threshold_seconds is not None:
            status = replace(status, lag_threshold_seconds=lag_threshold_seconds)
        data = status.to_json()
        reachable = {node.name: node.reachable for node in reading.status.nodes}
        states = self.agent.states
        problems: list[str] = []
        for pair in data["pairs"]:
            state = states.get((pair["origin"], pair["target"]))
            pair.update(self.heartbeat(state, now))
            if state is None:
                continue
            problem = self.pair_problem(state, now)
            if problem is not None:
                problems.append(problem)
            elif not (reachable.get(state.origin, True) and reachable.get(state.target, True)):
                pair["live"] = False  # the reading says so: said once, by node, in problems
        health = self.health_problems()
        problems += [f"agent: {problem}" for problem in health]
        data["problems"] = data["problems"] + [p for p in problems if p not in data["problems"]]
        data["healthy"] = not data["problems"]
        data["agent"] = {
            "pid": os.getpid(),
            "started_at": self.started_at,
            "nodes": list(self.agent.nodes),
            "healthy": not health,
            "problems": health,
            "loops": [
                {
                    "name": loop.name,
                    "seconds_since_round": round(time.monotonic() - loop.ticked_at, 3),
                    "round_seconds": loop.round_seconds,
                    "error": loop.error,
                }
                for loop in self.agent.heartbeats.loops()
            ],
            "status_read_at": reading.read_at,
            "status_read_seconds": round(reading.seconds, 4),
        }
        return data


def heartbeat_lag(state: PairState, now: float) -> float | None:
    """How far behind its origin the pair may be, as the agent knows without SQL: 0 while it
    has pulled everything the origin's watch loop saw end there; else the time since the
    first transaction it has not pulled ended there (healthy), or since its last successful
    pull (failing: nothing is known of the origin since). None before its first pull."""
    if not state.last_pull_at:
        return None
    behind_since = state.behind_since
    if state.healthy:
        return 0.0 if behind_since is None else round(max(0.0, now - behind_since), 3)
    since = state.last_pull_at if behind_since is None else min(behind_since, state.last_pull_at)
    return round(max(0.0, now - since), 3)
