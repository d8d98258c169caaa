"""The (origin -> target) pairs a config makes, and the account each pair's worker keeps of
what it last did (PairState.sentence), which `status` and the console show, with its live
heartbeat: when it last pulled, its last error, and since when it may be behind."""

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
    last_pull_at: float = 0.0  # time.time() of the last successful pull; 0: none yet
    last_progress_at: float = 0.0  # ...or of the last progress a long pull reported
    last_error: str | None = None  # the sentence of the last failure, and when (time.time())
    last_error_at: float = 0.0
    # When the origin's watch loop first saw a transaction end there that the pair may not have
    # pulled yet; None while the pair has everything the agent knows of. The timeline's lag.
    behind_since: float | None = None


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
