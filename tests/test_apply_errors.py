"""Errors drive the right action on a target: a change that cannot be applied is parked, but a
right the agent's role lacks there is the node's problem, not the change's. Its changes stay
queued (none is parked, the node is not called unreachable), the pair's error names the node,
the table and the right, and granting it is all it takes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import Cluster
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgconcord import agent
from pgconcord.config import load_config


@pytest.fixture
def restricted_role(system_cluster: Cluster) -> Iterator[str]:
    """A non-superuser role for the agent on south, with what applying there takes, less
    nothing yet (the test takes a right away); dropped afterwards (roles outlive databases)."""
    cluster = system_cluster
    role = f"agent_{cluster.database}"
    cluster.admin_execute("south", sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
    try:
        yield role
    finally:
        with cluster.admin_connect("south") as connection:
            connection.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
                (role,),
            )
            connection.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            connection.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def config_with_south_as(cluster: Cluster, role: str, directory: Path) -> Path:
    """A copy of the cluster's config in which the agent connects to south as `role`."""
    lines = ['[cluster]\nname = "test"\n']
    for node in cluster.config.nodes:
        dsn = node.dsn
        if node.name == "south":
            dsn = make_conninfo("", **{**conninfo_to_dict(dsn), "user": role})
        lines.append(f'[[node]]\nname = "{node.name}"\ndsn = "{dsn}"\n')
    path = directory / "restricted.toml"
    path.write_text("\n".join(lines))
    return path


def test_a_missing_right_keeps_the_changes_queued_and_names_it(
    system_cluster: Cluster, restricted_role: str, tmp_path: Path
) -> None:
    cluster, role = system_cluster, restricted_role
    for name in cluster.names:
        cluster.execute(name, "CREATE TABLE orders (id int PRIMARY KEY, status text)")
    cluster.setup()
    cluster.execute("north", "INSERT INTO orders VALUES (1, 'new'), (2, 'new')")
    cluster.sync()
    # The agent's rights on south, as an administrator grants them, but UPDATE on orders.
    agent_role = sql.Identifier(role)
    for statement in (
        "GRANT USAGE ON SCHEMA pgconcord TO {}",
        "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA pgconcord TO {}",
        "GRANT USAGE, SELECT, UPDATE ON ALL SEQUENCES IN SCHEMA pgconcord TO {}",
        "GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA pgconcord TO {}",
        "GRANT SET ON PARAMETER session_replication_role TO {}",
        "GRANT SELECT, INSERT, DELETE ON orders TO {}",
    ):
        cluster.admin_execute("south", sql.SQL(statement).format(agent_role))
    restricted = load_config(config_with_south_as(cluster, role, tmp_path))

    cluster.execute("north", "UPDATE orders SET status = 'shipped' WHERE id = 1")
    for _attempt in range(2):  # and again: it waits, it is not skipped
        report = agent.sync(restricted)
        assert report.unreachable == {}, report
        [failure] = report.failures
        assert failure.startswith("node south: table public.orders: permission denied"), failure
        assert f"the agent's role {role} lacks UPDATE on public.orders" in failure, failure
        assert "from north stay queued" in failure, failure
    assert [r for r in cluster.conflicts() if r["kind"] == "parked"] == []
    assert cluster.query("south", "SELECT status FROM orders ORDER BY id") == [("new",), ("new",)]
    assert cluster.query("east", "SELECT status FROM orders ORDER BY id") == [
        ("shipped",),
        ("new",),
    ]

    cluster.admin_execute("south", sql.SQL("GRANT UPDATE ON orders TO {}").format(agent_role))
    report = agent.sync(restricted)
    assert report.ok, report
    assert cluster.query("south", "SELECT status FROM orders ORDER BY id") == [
        ("shipped",),
        ("new",),
    ]
    assert [r for r in cluster.conflicts() if r["kind"] == "parked"] == []
    cluster.sync()
    cluster.assert_identical()
