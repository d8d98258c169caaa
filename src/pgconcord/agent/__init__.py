"""The replication loop: wake when an origin's change log grows (or on a timer), pull from
each peer, back off on failure, purge what every peer has. Also the one-shot `sync`.

Each (origin -> target) pair has its own worker thread and Puller, so a slow or unreachable node
holds up only the pairs it is part of. Every worker keeps a one-line account of what it last did
and why (PairState.sentence), which `status` and the console show. A running agent takes a new
config (Agent.reconfigure, on SIGHUP): the pairs of added nodes start, those of removed ones stop.

The package: runner (the Agent, its pairs' and watch loops), pair (the pairs a config makes
and their accounts), housekeeping (the purge loop, and the capture loop on the agent's own
node), purging (purge and eviction as functions of what it read of the peers; purge failures),
syncing (the one-shot sync) and readiness (whether a node is set up).
"""

from pgconcord.agent.housekeeping import CAPTURE_SECONDS, PURGE_SECONDS
from pgconcord.agent.pair import PairState, pairs
from pgconcord.agent.purging import (
    PurgeReport,
    clear_purge_failure,
    purge,
    purge_failure_reason,
    purge_node,
    record_purge_failure,
)
from pgconcord.agent.readiness import is_set_up, nodes_not_set_up
from pgconcord.agent.runner import (
    CHANNEL,
    COALESCE_SECONDS,
    MAX_BACKOFF_SECONDS,
    POLL_SECONDS,
    UNAVAILABLE_BACKOFF_SECONDS,
    WATCH_BUSY_SECONDS,
    WATCH_IDLE_SECONDS,
    Agent,
)
from pgconcord.agent.syncing import SyncReport, sync

__all__ = [
    "CAPTURE_SECONDS",
    "CHANNEL",
    "COALESCE_SECONDS",
    "MAX_BACKOFF_SECONDS",
    "POLL_SECONDS",
    "PURGE_SECONDS",
    "UNAVAILABLE_BACKOFF_SECONDS",
    "WATCH_BUSY_SECONDS",
    "WATCH_IDLE_SECONDS",
    "Agent",
    "PairState",
    "PurgeReport",
    "SyncReport",
    "clear_purge_failure",
    "is_set_up",
    "nodes_not_set_up",
    "pairs",
    "purge",
    "purge_failure_reason",
    "purge_node",
    "record_purge_failure",
    "sync",
]
