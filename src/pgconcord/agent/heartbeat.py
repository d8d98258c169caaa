"""Whether the agent's loops are alive, told without SQL (the HTTP server's /health): each loop
runs in a thread of its own and ticks once a round; one whose thread ended by an error, or that
has not ticked for far longer than a round takes, is not."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

# A round may take its wait plus a connection attempt that times out (5 s) and a slow statement
# or two: a loop is only said to be stuck well past that.
STALE_ROUNDS = 3
STALE_MARGIN_SECONDS = 30.0

_current = threading.local()


@dataclass
class Loop:
    name: str
    round_seconds: float  # the longest a round normally takes: its wait or backoff
    ticked_at: float = field(default_factory=time.monotonic)
    error: str | None = None  # why its thread ended, when it ended by an error

    @property
    def stale_after_seconds(self) -> float:
        return STALE_ROUNDS * self.round_seconds + STALE_MARGIN_SECONDS


def tick() -> None:
    """Say that the calling thread's loop went round (or made progress in a long round)."""
    loop: Loop | None = getattr(_current, "loop", None)
    if loop is not None:
        loop.ticked_at = time.monotonic()


class Heartbeats:
    """The loops of one agent. run() is a thread's target: a loop that returns was asked to
    stop and is forgotten; one that raises is kept, dead, so that /health says so."""

    def __init__(self) -> None:
        self._loops: dict[int, Loop] = {}
        self._lock = threading.Lock()

    def run(
        self, name: str, round_seconds: float, function: Callable[..., None], *arguments: object
    ) -> None:
        loop = Loop(name, round_seconds)
        key = id(loop)
        with self._lock:
            self._loops[key] = loop
        _current.loop = loop
        try:
            function(*arguments)
        except BaseException as error:
            loop.error = f"{type(error).__name__}: {error}"
            log.exception("pgconcord: the agent's loop %s ended by an error", name)
            return
        finally:
            _current.loop = None
        with self._lock:
            del self._loops[key]

    def loops(self) -> list[Loop]:
        with self._lock:
            return list(self._loops.values())

    def problems(self) -> list[str]:
        """One sentence per loop that is not alive; none when all are."""
        now = time.monotonic()
        found = []
        for loop in self.loops():
            silent = now - loop.ticked_at
            if loop.error is not None:
                found.append(f"loop {loop.name} ended by an error: {loop.error}")
            elif silent > loop.stale_after_seconds:
                found.append(
                    f"loop {loop.name} has not gone round for {silent:.0f} s"
                    f" (a round takes up to {loop.round_seconds:g} s)"
                )
        return found
