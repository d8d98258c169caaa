"""What applying one pair (one origin's changes into one target) keeps from piece to piece and
from window to window, shared by the puller and the steps it drives."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from pgconcord.apply.parents import ParentCheck
from pgconcord.apply.plan import PlanCache

# How long a pair locks the target's rows before judging them, after a local write raced with
# it: a row written here all the time would otherwise make every apply of it start again.
LOCK_ROWS_SECONDS = 60.0


@dataclass
class PairState:
    """The pair's names, its plans, the rows waiting for their parents, and whether parked
    changes of the origin wait here."""

    origin: str  # the origin's name
    target: str  # the target's name
    plans: PlanCache = field(init=False)
    parents: ParentCheck = field(default_factory=ParentCheck)
    # Whether this target holds parked changes from this origin (refreshed each window).
    parked_waiting: bool = False
    # Until when (time.monotonic) the target's rows are locked before they are judged: since
    # a local write raced with an apply of this pair (apply.setwise.RACED_LOCAL_WRITE).
    lock_rows_until: float = 0.0
    # The target captures from the WAL (read with each turn): its rows are always locked
    # before they are judged, because a local write that raced with an apply is seen there
    # only once its WAL is read, too late to notice (apply.setwise.RACED_LOCAL_WRITE).
    wal_target: bool = False

    @property
    def lock_rows(self) -> bool:
        return self.wal_target or time.monotonic() < self.lock_rows_until

    def raced(self) -> None:
        """A local write raced with an apply: lock rows first for a while."""
        self.lock_rows_until = time.monotonic() + LOCK_ROWS_SECONDS

    def __post_init__(self) -> None:
        self.plans = PlanCache(self.origin, self.target)
