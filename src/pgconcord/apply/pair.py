"""What applying one pair (one origin's changes into one target) keeps from piece to piece and
from window to window, shared by the puller and the steps it drives."""

from __future__ import annotations

from dataclasses import dataclass, field

from pgconcord.apply.parents import ParentCheck
from pgconcord.apply.plan import PlanCache


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

    def __post_init__(self) -> None:
        self.plans = PlanCache(self.origin, self.target)
