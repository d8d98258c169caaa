"""Whether nodes are set up (have pgconcord's catalog): asked by the agent, `run` and the purge."""

from __future__ import annotations

from collections.abc import Iterable

import psycopg

from pgconcord import catalog
from pgconcord.config import ClusterConfig, NodeConfig
from pgconcord.errors import NodeUnavailable
from pgconcord.transport import connect


def nodes_not_set_up(config: ClusterConfig, names: Iterable[str] | None = None) -> list[str]:
    """The named nodes (all by default) that are reachable and have no pgconcord catalog; an
    unreachable one is not judged (the agent waits for it)."""
    found = []
    for name in names if names is not None else config.node_names:
        try:
            with connect(config.node_by_name(name), autocommit=True) as connection:
                if catalog.installed_version(connection) == 0:
                    found.append(name)
        except (NodeUnavailable, psycopg.Error):
            continue
    return found


def is_set_up(node: NodeConfig) -> bool | None:
    """Whether the node has pgconcord's catalog; None when that cannot be told now."""
    try:
        with connect(node, autocommit=True) as connection:
            return catalog.installed_version(connection) > 0
    except (NodeUnavailable, psycopg.Error):
        return None
