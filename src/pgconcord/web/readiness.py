"""Whether a node may take traffic (`GET /ready/NODE?lag=SECONDS`, HAProxy's check): reachable,
set up, an active member, and holding every peer's changes to within SECONDS; from the cached
status, so that every check of every load balancer costs the nodes at most one reading a
second."""

from __future__ import annotations

from dataclasses import dataclass, field

from pgconcord import membership
from pgconcord.status import ClusterStatus

DEFAULT_LAG_SECONDS = 10.0


@dataclass
class Readiness:
    node: str
    reasons: list[str] = field(default_factory=list)  # why not; none: ready
    # What could not be judged and does not count against the node: a peer that is down has
    # changes nobody can have, so they do not make this node less current than any other.
    notes: list[str] = field(default_factory=list)

    @property
    def ready(self) -> bool:
        return not self.reasons

    def to_json(self) -> dict[str, object]:
        return {
            "node": self.node,
            "ready": self.ready,
            "reasons": self.reasons,
            "notes": self.notes,
        }


def readiness(status: ClusterStatus, node: str, lag_seconds: float) -> Readiness:
    result = Readiness(node)
    nodes = {each.name: each for each in status.nodes}
    own = nodes.get(node)
    if own is None:  # in the config, not yet in the reading (a reload a moment ago)
        result.reasons.append("not in the cluster's status yet")
        return result
    if not own.reachable:
        result.reasons.append(f"unreachable: {own.error}")
        return result
    if own.catalog_version == 0:
        result.reasons.append("not set up: run pgconcord setup")
        return result
    if own.error:
        result.reasons.append(own.error)
        return result
    if own.membership not in (None, membership.ACTIVE):
        result.reasons.append(f"not a member: it is {own.membership}")
    for pair in status.pairs:
        if pair.target != node:
            continue
        origin = nodes.get(pair.origin)
        if pair.state in membership.OUT_OF_CLUSTER:
            continue  # a departed peer's changes are not waited for
        if origin is None or not origin.reachable or origin.error or not origin.catalog_version:
            result.notes.append(f"{pair.origin} cannot be read: its changes are not counted")
            continue
        if pair.lag_seconds is None:
            result.reasons.append(f"behind {pair.origin}: nothing of it applied yet")
        elif pair.lag_seconds > lag_seconds:
            result.reasons.append(
                f"behind {pair.origin} by {pair.lag_seconds:.3f} s, more than {lag_seconds:g} s"
                f" ({pair.pending_changes} changes pending)"
            )
    return result
