"""Conflict records are kept for conflict.keep (30 days unless configured), then the agent's
purge deletes them; parked changes stay until an operator resolves them."""

from __future__ import annotations

from harness import Cluster

from pgconcord.agent import purge_node


def make_conflict(cluster: Cluster, row: int) -> None:
    """Concurrent updates of one row on north and south: a conflict recorded on both."""
    cluster.execute("north", "UPDATE t SET v = 'north' WHERE id = %s", (row,))
    cluster.execute("south", "UPDATE t SET v = 'south' WHERE id = %s", (row,))
    cluster.sync()


def conflict_rows(cluster: Cluster, node: str) -> list[int]:
    return [
        int(r[0]["id"])
        for r in cluster.admin_query(
            node, "SELECT row_key FROM pgconcord.conflict ORDER BY row_key ->> 'id'"
        )
    ]


def age(cluster: Cluster, row: int, days: int) -> None:
    """Make the records of one row look as if they were made days ago, on every node."""
    for name in cluster.names:
        cluster.admin_execute(
            name,
            "UPDATE pgconcord.conflict SET detected_at = now() - make_interval(days => %s)"
            " WHERE row_key = jsonb_build_object('id', %s::int)",
            (days, row),
        )


def test_old_conflict_records_are_purged(system_cluster: Cluster) -> None:
    cluster = system_cluster
    for name in cluster.names:
        cluster.execute(name, "CREATE TABLE t (id int PRIMARY KEY, v text)")
    cluster.setup()
    cluster.execute("north", "INSERT INTO t VALUES (1, 'a'), (2, 'b'), (3, 'c')")
    cluster.sync()
    for row in (1, 2, 3):
        make_conflict(cluster, row)
    assert conflict_rows(cluster, "north") == [1, 2, 3]
    age(cluster, 1, 40)
    age(cluster, 2, 20)

    # By default records are kept 30 days: a sync's purge deletes only the oldest.
    cluster.sync()
    for name in ("north", "south"):
        assert conflict_rows(cluster, name) == [2, 3], name
    assert all(r["key"]["id"] != 1 for r in cluster.conflicts())

    # A shorter time, from the config.
    cluster.write_config('[conflict]\nkeep = "10d"\n')
    report = purge_node(cluster.config, cluster.config.node_by_name("north"))
    assert report.conflicts_deleted == 1
    assert conflict_rows(cluster, "north") == [3]
    assert purge_node(cluster.config, cluster.config.node_by_name("north")).conflicts_deleted == 0
    cluster.assert_identical()
