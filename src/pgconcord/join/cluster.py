"""The nodes a join works with: who is who, what each records of the others, and the donor."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg

from pgconcord import catalog, membership
from pgconcord.config import ClusterConfig, NodeConfig
from pgconcord.errors import ConfigError, NodeUnavailable, PgconcordError
from pgconcord.membership import ACTIVE, EVICTED, JOINING, PARTED, Member
from pgconcord.transport import connect

Connection = psycopg.Connection[tuple[object, ...]]


@dataclass
class _Cluster:
    """The nodes a join works with, and what they record."""

    config: ClusterConfig
    joiner: NodeConfig
    admin: dict[str, Connection]  # autocommit sessions to the joiner and every member
    members: dict[str, Member]  # merged over the members
    peers: list[NodeConfig]  # active members other than the joiner

    def close(self) -> None:
        for connection in self.admin.values():
            connection.close()


# -- who is who ------------------------------------------------------------------------------


def _open(config: ClusterConfig, name: str) -> _Cluster:
    joiner = config.node_by_name(name)
    if len(config.nodes) < 2:
        raise ConfigError(f"node {name} is the only node in the config: nothing to join")
    admin: dict[str, Connection] = {}
    unreachable: dict[str, str] = {}
    try:
        admin[name] = connect(joiner, autocommit=True)
        for node in config.nodes:
            if node.name == name:
                continue
            try:
                admin[node.name] = connect(node, autocommit=True)
            except NodeUnavailable as error:
                unreachable[node.name] = error.reason
        views = []
        outside = set()  # listed but never set up: nodes waiting to join themselves
        for node_name, connection in list(admin.items()):
            if node_name == name:
                continue
            if catalog.installed_version(connection) == 0:
                outside.add(node_name)
                admin.pop(node_name).close()
                continue
            with connection.transaction():
                catalog.migrate(connection)
            views.append(membership.read_members(connection))
        if membership.installed(admin[name]):
            views.append(membership.read_members(admin[name]))
        members = membership.merge(views)
        _check_members(config, name, members, unreachable)
        peers = [
            node
            for node in config.nodes
            if node.name not in outside
            and node.name != name
            and node.name not in unreachable
            and membership.state_of(members, node.name) == ACTIVE
        ]
        if not peers:
            raise PgconcordError(
                f"no node to copy {name} from: run pgconcord setup for the cluster without"
                f" {name} first"
            )
        return _Cluster(config, joiner, admin, members, peers)
    except BaseException:
        for connection in admin.values():
            connection.close()
        raise


def _check_members(
    config: ClusterConfig, name: str, members: dict[str, Member], unreachable: dict[str, str]
) -> None:
    for node in config.nodes:
        state = membership.state_of(members, node.name)
        if node.name == name:
            continue
        if state == PARTED:
            raise ConfigError(
                f"node {node.name} was parted from the cluster: remove it from the config"
            )
        if state == JOINING:
            raise PgconcordError(f"node {node.name} is joining: finish that join first")
        if node.name in unreachable and state != EVICTED:
            raise NodeUnavailable(
                node.name,
                f"{unreachable[node.name]}; a join needs every member reachable, so that none"
                f" purges changes {name} will need",
            )
    for member_name, member in members.items():
        if member_name not in config.node_names and member.state in (ACTIVE, JOINING):
            raise ConfigError(
                f"node {member_name} is a member of the cluster but not in this config"
            )


def _joiner_state(joiner: Connection) -> dict[str, Any]:
    """The joining node's own record of itself and of a join in progress."""
    found: dict[str, Any] = {}
    if not membership.installed(joiner):
        return found
    own = catalog.local_node_name(joiner)
    if own is not None:
        found["own"] = membership.state_of(membership.read_members(joiner), own)
    row = joiner.execute(
        "SELECT donor, created_tables, post_data FROM pgconcord.join_state"
    ).fetchone()
    if row is not None:
        found["join_state"] = {"donor": str(row[0]), "created": row[1], "post_data": row[2]}
    return found


def _choose_donor(
    cluster: _Cluster, wanted: str | None, join_state: dict[str, Any] | None
) -> NodeConfig:
    active = {node.name: node for node in cluster.peers}
    if wanted is not None:
        cluster.config.node_by_name(wanted)
        if wanted == cluster.joiner.name:
            raise ConfigError(f"node {wanted} cannot copy from itself")
        if wanted not in active:
            state = membership.state_of(cluster.members, wanted)
            raise PgconcordError(f"node {wanted} cannot be the donor: it is {state}")
        return active[wanted]
    if join_state is not None and join_state["donor"] in active:
        return active[str(join_state["donor"])]
    return cluster.peers[0]
