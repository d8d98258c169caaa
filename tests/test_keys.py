"""Serial and identity keys keep working on every master without collisions."""

from __future__ import annotations

import threading

from harness import Cluster


def test_three_nodes_insert_into_serial_tables_at_once(cluster: Cluster) -> None:
    for name in cluster.names:
        cluster.execute(name, "CREATE TABLE orders (id bigserial PRIMARY KEY, node text)")
        cluster.execute(
            name,
            "CREATE TABLE tickets (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY, node text)",
        )
    # Rows that existed before setup: new keys go above them.
    for name in cluster.names:
        cluster.execute(name, "INSERT INTO orders (id, node) VALUES (1, 'old'), (7, 'old')")
    cluster.setup()

    def insert(name: str) -> None:
        with cluster.connect(name) as connection:
            for _ in range(200):
                connection.execute("INSERT INTO orders (node) VALUES (%s)", (name,))
                connection.execute("INSERT INTO tickets (node) VALUES (%s)", (name,))

    threads = [threading.Thread(target=insert, args=(name,)) for name in cluster.names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    cluster.sync()
    for name in cluster.names:
        assert cluster.value(name, "SELECT count(*) FROM orders") == 602
        assert cluster.value(name, "SELECT count(*) FROM tickets") == 600
        assert cluster.value(name, "SELECT min(id) FROM orders WHERE node <> 'old'") > 7
    assert not [r for r in cluster.conflicts() if r["kind"] == "conflict"]
    # Setting up again keeps each node's slot and goes on without collisions.
    cluster.setup()
    for name in cluster.names:
        cluster.execute(name, "INSERT INTO orders (node) VALUES (%s)", (name,))
    cluster.sync()
    assert cluster.value("north", "SELECT count(*) FROM orders") == 605
    cluster.assert_identical()


def test_unique_id_is_unique_across_the_cluster(system_cluster: Cluster) -> None:
    cluster = system_cluster
    cluster.setup()
    seen: set[int] = set()
    for name in cluster.names:
        with cluster.connect(name) as connection:
            for _ in range(50):
                row = connection.execute("SELECT pgconcord.unique_id()").fetchone()
                assert row is not None
                seen.add(int(row[0]))
    assert len(seen) == 150
