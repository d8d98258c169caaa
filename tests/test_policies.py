"""Per-table conflict policies: every node picks the same winner, causal edits still win."""

from __future__ import annotations

import time

from harness import Cluster


def make_tables(cluster: Cluster, extra_config: str) -> None:
    for name in cluster.names:
        cluster.execute(name, "CREATE TABLE prices (id int PRIMARY KEY, price numeric)")
        cluster.execute(name, "CREATE TABLE members (id text PRIMARY KEY, name text)")
    cluster.write_config(extra_config)
    cluster.setup()


def values(cluster: Cluster, statement: str) -> set[object]:
    return {tuple(cluster.query(name, statement)) for name in cluster.names}


def test_node_priority_head_office_wins_concurrent_edits(cluster: Cluster) -> None:
    make_tables(cluster, '[conflict.table."public.prices"]\npriority = ["north", "south"]\n')
    cluster.execute("north", "INSERT INTO prices VALUES (1, 10), (2, 20)")
    cluster.sync()
    # north (head office) edits first; east edits later by the clock but concurrently.
    cluster.execute("north", "UPDATE prices SET price = 11 WHERE id = 1")
    time.sleep(0.01)
    cluster.execute("east", "UPDATE prices SET price = 99 WHERE id = 1")
    # south outranks east, but not north.
    cluster.execute("south", "UPDATE prices SET price = 21 WHERE id = 2")
    time.sleep(0.01)
    cluster.execute("east", "UPDATE prices SET price = 98 WHERE id = 2")
    cluster.sync()
    assert values(cluster, "SELECT id, price FROM prices ORDER BY id") == {((1, 11), (2, 21))}
    # An edit made after seeing the head office's version wins: priority decides only
    # between concurrent writes.
    cluster.execute("east", "UPDATE prices SET price = 12 WHERE id = 1")
    cluster.sync()
    assert values(cluster, "SELECT price FROM prices WHERE id = 1") == {((12,),)}
    cluster.assert_identical()


def test_keep_existing_keeps_the_first_insert(cluster: Cluster) -> None:
    make_tables(cluster, '[conflict.table."public.members"]\npolicy = "keep-existing"\n')
    cluster.execute("south", "INSERT INTO members VALUES ('m1', 'first: south')")
    time.sleep(0.01)
    cluster.execute("north", "INSERT INTO members VALUES ('m1', 'second: north')")
    cluster.execute("north", "UPDATE members SET name = 'second: north, edited' WHERE id = 'm1'")
    cluster.sync()
    assert values(cluster, "SELECT name FROM members") == {(("first: south",),)}
    # Later edits of the kept row follow the clock; a re-insert after a delete stands.
    cluster.execute("north", "UPDATE members SET name = 'edited after' WHERE id = 'm1'")
    cluster.sync()
    assert values(cluster, "SELECT name FROM members") == {(("edited after",),)}
    cluster.execute("east", "DELETE FROM members WHERE id = 'm1'")
    cluster.sync()
    cluster.execute("south", "INSERT INTO members VALUES ('m1', 'again')")
    cluster.sync()
    assert values(cluster, "SELECT name FROM members") == {(("again",),)}
    cluster.assert_identical()
