"""Foreign keys are not checked while applying (replica mode): a row whose parent is really
absent once the window is applied is recorded as parent_missing, and only such a row. Tables
are applied one after the other and a window in pieces, so a child may land before its parent
of the same window: that is not a conflict."""

from __future__ import annotations

from typing import Any

from harness import Cluster

from pgconcord.apply import Puller

SCHEMA = """
CREATE TABLE z_orders (id int PRIMARY KEY, customer text);
CREATE TABLE a_lines (id int PRIMARY KEY, order_id int NOT NULL REFERENCES z_orders,
                      item text);
"""


def missing_parents(cluster: Cluster) -> list[tuple[Any, ...]]:
    return sorted(
        (r["node"], r["table"], r["key"]["id"])
        for r in cluster.conflicts()
        if r["type"] == "parent_missing"
    )


def test_children_of_parents_in_the_same_window_are_no_conflict(cluster: Cluster) -> None:
    # a_lines sorts before z_orders: its rows are applied before their parents'.
    for name in cluster.names:
        cluster.execute(name, SCHEMA)
    cluster.setup()
    # Separate source transactions of one window, as an application commits them.
    cluster.execute("north", "INSERT INTO z_orders VALUES (1, 'ann')")
    cluster.execute("north", "INSERT INTO a_lines VALUES (1, 1, 'pen'), (2, 1, 'ink')")
    with cluster.connect("north", autocommit=False) as connection:
        connection.execute("INSERT INTO z_orders VALUES (2, 'bob')")
        connection.execute("INSERT INTO a_lines VALUES (3, 2, 'cup'), (4, 2, 'mug')")
        connection.commit()
    cluster.execute("north", "INSERT INTO a_lines VALUES (5, 1, 'nib')")
    cluster.execute("north", "UPDATE a_lines SET order_id = 2 WHERE id = 1")
    cluster.execute("south", "INSERT INTO z_orders VALUES (3, 'cy')")
    cluster.execute("south", "INSERT INTO a_lines VALUES (6, 3, 'pad')")
    cluster.sync()
    assert missing_parents(cluster) == []
    # A parent that arrived in an earlier window is here already.
    cluster.execute("north", "INSERT INTO a_lines VALUES (7, 3, 'cap')")
    cluster.execute("east", "INSERT INTO a_lines VALUES (8, 1, 'tin')")
    cluster.sync()
    assert missing_parents(cluster) == []
    for name in cluster.names:
        assert cluster.value(name, "SELECT count(*) FROM a_lines") == 8
        assert (
            cluster.value(
                name,
                "SELECT count(*) FROM a_lines l LEFT JOIN z_orders o ON o.id = l.order_id"
                " WHERE o.id IS NULL",
            )
            == 0
        )
    cluster.assert_identical()


def test_a_window_in_pieces_is_checked_once_its_parents_arrived(system_cluster: Cluster) -> None:
    """A deferred foreign key lets a child's transaction commit after its parent's while it
    wrote first: it is ordered before the parent's transaction and, with small pieces, lands
    in an earlier piece. A real orphan of the same window is still recorded, once."""
    cluster = system_cluster
    for name in cluster.names:
        cluster.execute(
            name,
            "CREATE TABLE z_orders (id int PRIMARY KEY);"
            " CREATE TABLE a_lines (id int PRIMARY KEY, order_id int NOT NULL"
            "   REFERENCES z_orders DEFERRABLE INITIALLY DEFERRED)",
        )
    cluster.setup()
    # An order north has alone: made by hand, so not replicated.
    cluster.admin_execute(
        "north", "SET session_replication_role = replica; INSERT INTO z_orders VALUES (99)"
    )
    cluster.execute("north", "INSERT INTO a_lines VALUES (2, 99)")  # a real orphan elsewhere
    with cluster.connect("north", autocommit=False) as child:
        child.execute("INSERT INTO a_lines VALUES (1, 10)")  # logged before its parent
        cluster.execute("north", "INSERT INTO z_orders VALUES (10)")
        child.commit()
    cluster.execute("north", "INSERT INTO z_orders VALUES (11)")
    config = cluster.config
    puller = Puller(config.node_by_name("north"), config.node_by_name("south"), piece_rows=1)
    try:
        result = puller.pull()
    finally:
        puller.close()
    assert result.transactions == 4
    assert cluster.query("south", "SELECT id, order_id FROM a_lines ORDER BY id") == [
        (1, 10),
        (2, 99),
    ]
    assert missing_parents(cluster) == [("south", "public.a_lines", 2)]


def test_a_parent_really_missing_is_recorded(system_cluster: Cluster) -> None:
    cluster = system_cluster
    for name in cluster.names:
        cluster.execute(name, SCHEMA)
    cluster.setup()
    cluster.execute("north", "INSERT INTO z_orders VALUES (5, 'dee')")
    cluster.sync()
    # At the same time: north adds a line to order 5, south deletes the order (it has no
    # lines there yet, so south's own foreign key lets it).
    cluster.execute("north", "INSERT INTO a_lines VALUES (50, 5, 'pen')")
    cluster.execute("south", "DELETE FROM z_orders WHERE id = 5")
    cluster.pull("north", "south")
    assert cluster.query("south", "SELECT id FROM a_lines") == [(50,)]
    assert missing_parents(cluster) == [("south", "public.a_lines", 50)]
    cluster.sync()
    # The line stays on every node alike (verify agrees), its parent gone everywhere.
    for name in cluster.names:
        assert cluster.query(name, "SELECT id FROM a_lines") == [(50,)]
        assert cluster.query(name, "SELECT id FROM z_orders") == []
    cluster.assert_identical()
