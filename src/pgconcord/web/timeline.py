"""The last hour of each pair the agent runs, for the console's chart: a sample every
INTERVAL_SECONDS of its lag and of the changes it applied per second. Sampled from what the
agent already has (its pairs' accounts, and the status reading when one is fresh because
someone looks): the timeline costs the nodes no statement of its own, however long it runs."""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any

from pgconcord.web.live import Live, heartbeat_lag

INTERVAL_SECONDS = 5.0
KEEP_SECONDS = 3600.0

Sample = tuple[float, float | None, float | None]  # (unix seconds, lag seconds, applied/s)


class Timeline:
    def __init__(
        self,
        live: Live,
        *,
        interval_seconds: float = INTERVAL_SECONDS,
        keep_seconds: float = KEEP_SECONDS,
    ) -> None:
        self.live = live
        self.interval_seconds = interval_seconds
        self._size = max(1, int(keep_seconds / interval_seconds))
        self._samples: dict[tuple[str, str], deque[Sample]] = {}
        # Each pair's applied count at the previous sample: (when, count, its account).
        self._previous: dict[tuple[str, str], tuple[float, int, object]] = {}
        self._lock = threading.Lock()

    def sample(self) -> None:
        now = time.time()
        # The lag the status measured, when a reading is fresh: the figure the console's matrix
        # shows beside the chart. Without one, the agent's own estimate (no SQL).
        reading = self.live.recent_reading(self.interval_seconds)
        measured = (
            {}
            if reading is None
            else {
                (pair.origin, pair.target): pair.lag_seconds
                for pair in reading.status.pairs
                if pair.lag_seconds is not None
            }
        )
        states = self.live.agent.states
        with self._lock:
            for key, state in states.items():
                lag = measured.get(key)
                if lag is None:
                    lag = heartbeat_lag(state, now)
                rate = None
                previous = self._previous.get(key)
                if previous is not None and previous[2] is state and now > previous[0]:
                    rate = round(
                        max(0, state.applied_changes - previous[1]) / (now - previous[0]), 3
                    )
                self._previous[key] = (now, state.applied_changes, state)
                samples = self._samples.setdefault(key, deque(maxlen=self._size))
                samples.append((round(now, 3), lag, rate))
            for key in list(self._samples):
                if key not in states:  # a reload stopped the pair
                    del self._samples[key]
                    self._previous.pop(key, None)

    def to_json(self) -> dict[str, Any]:
        with self._lock:
            return {
                "interval_seconds": self.interval_seconds,
                "pairs": [
                    {"origin": origin, "target": target, "samples": [list(s) for s in samples]}
                    for (origin, target), samples in self._samples.items()
                ],
            }

    def run(self, stopping: threading.Event) -> None:
        """Sample every interval until stopping is set (the HTTP server's thread)."""
        self.sample()
        while not stopping.wait(self.interval_seconds):
            self.sample()
