"""The (origin -> target) pairs a config makes, and the account each pair's worker keeps of
what it last did (PairState.sentence), which `status` and the console show."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from pgconcord.config import ClusterConfig, NodeConfig


@dataclass
class PairState:
    origin: str
    target: str
    sentence: str = "starting"
    healthy: bool = True
    applied_changes: int = 0
    conflicts: int = 0
    last_pull_at: float = 0.0


def pairs(
    config: ClusterConfig, targets: Iterable[str] | None = None
) -> list[tuple[NodeConfig, NodeConfig]]:
    wanted = set(targets) if targets is not None else set(config.node_names)
    return [
        (origin, target)
        for target in config.nodes
        if target.name in wanted
        for origin in config.nodes
        if origin.name != target.name
    ]
