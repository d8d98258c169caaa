"""Every kind of conflict is detected, resolved the same way on every node, and recorded."""

from __future__ import annotations

import time

from harness import Cluster


def setup_users(cluster: Cluster) -> None:
    for name in cluster.names:
        cluster.execute(
            name,
            "CREATE TABLE users (id text PRIMARY KEY, email text UNIQUE, phone text UNIQUE,"
            " name text)",
        )
    cluster.setup()


def conflict_types(cluster: Cluster) -> set[str]:
    return {str(r["type"]) for r in cluster.conflicts() if r["kind"] == "conflict"}


def test_insert_insert_on_another_unique_constraint(cluster: Cluster) -> None:
    setup_users(cluster)
    cluster.execute("north", "INSERT INTO users VALUES ('n1', 'ann@example.com', '1', 'Ann N')")
    time.sleep(0.01)
    cluster.execute("south", "INSERT INTO users VALUES ('s1', 'ann@example.com', '2', 'Ann S')")
    cluster.sync()
    for name in cluster.names:
        # The later registration keeps the e-mail on every node.
        assert cluster.query(name, "SELECT id, email FROM users") == [("s1", "ann@example.com")]
    assert "insert_exists" in conflict_types(cluster)
    assert not [r for r in cluster.conflicts() if r["kind"] == "parked"]
    cluster.assert_identical()


def test_insert_colliding_on_several_unique_constraints(cluster: Cluster) -> None:
    setup_users(cluster)
    cluster.execute("north", "INSERT INTO users VALUES ('n1', 'a@x', 'p1', 'n')")
    cluster.execute("south", "INSERT INTO users VALUES ('s1', 'b@x', 'p2', 's')")
    time.sleep(0.01)
    # east's row takes north's e-mail and south's phone.
    cluster.execute("east", "INSERT INTO users VALUES ('e1', 'a@x', 'p2', 'e')")
    cluster.sync()
    for name in cluster.names:
        assert cluster.query(name, "SELECT id FROM users ORDER BY id") == [("e1",)]
    assert "multiple_unique_conflicts" in conflict_types(cluster)
    cluster.assert_identical()


def test_updates_giving_two_rows_the_same_unique_value(cluster: Cluster) -> None:
    setup_users(cluster)
    cluster.execute(
        "north", "INSERT INTO users VALUES ('n1', 'n@x', '1', 'N'), ('s1', 's@x', '2', 'S')"
    )
    cluster.sync()
    cluster.execute("north", "UPDATE users SET email = 'same@x' WHERE id = 'n1'")
    time.sleep(0.01)
    cluster.execute("south", "UPDATE users SET email = 'same@x' WHERE id = 's1'")
    cluster.sync()
    # The later update keeps the value on every node, as for inserts; recorded.
    for name in cluster.names:
        assert cluster.query(name, "SELECT id FROM users WHERE email = 'same@x'") == [("s1",)]
    assert "update_exists" in conflict_types(cluster)
    cluster.assert_identical()


def test_same_clock_reading_breaks_the_tie_by_node_name(cluster: Cluster) -> None:
    for name in cluster.names:
        cluster.execute(name, "CREATE TABLE t (id int PRIMARY KEY, v text)")
    cluster.setup()
    cluster.execute("north", "INSERT INTO t VALUES (1, 'base')")
    cluster.sync()
    # With every wall clock far behind, each node's write gets the version it replaced
    # plus one, the same number everywhere: the clocks tie exactly.
    for name in cluster.names:
        cluster.admin_execute(name, "UPDATE pgconcord.local_node SET clock_offset_us = -1e12")
        cluster.execute(name, "UPDATE t SET v = %s WHERE id = 1", (f"by {name}",))
    clocks = {
        name: cluster.admin_value(name, "SELECT clock FROM pgconcord.row_version")
        for name in cluster.names
    }
    cluster.sync()
    assert len(set(clocks.values())) == 1
    winner = "south"  # the greatest name in byte order: south > north > east
    for name in cluster.names:
        assert cluster.value(name, "SELECT v FROM t") == f"by {winner}"
    cluster.assert_identical()


def test_delete_delete_and_update_of_a_row_deleted_elsewhere(cluster: Cluster) -> None:
    for name in cluster.names:
        cluster.execute(name, "CREATE TABLE t (id int PRIMARY KEY, v text)")
    cluster.setup()
    cluster.execute("north", "INSERT INTO t VALUES (1, 'a'), (2, 'b')")
    cluster.sync()
    cluster.execute("north", "DELETE FROM t WHERE id = 1")
    cluster.execute("south", "DELETE FROM t WHERE id = 1")
    cluster.execute("north", "DELETE FROM t WHERE id = 2")
    time.sleep(0.01)
    cluster.execute("east", "UPDATE t SET v = 'edited later' WHERE id = 2")
    cluster.sync()
    for name in cluster.names:
        # The update had not seen the delete: the delete wins, whatever the clocks say.
        assert cluster.query(name, "SELECT id, v FROM t") == []
    assert {"delete_missing", "update_deleted"} <= conflict_types(cluster)
    cluster.assert_identical()


def test_a_late_update_of_a_row_frozen_by_vacuum(cluster: Cluster) -> None:
    for name in cluster.names:
        cluster.execute(name, "CREATE TABLE t (id int PRIMARY KEY, v text)")
    cluster.setup()
    cluster.execute("north", "INSERT INTO t VALUES (1, 'a')")
    cluster.sync()
    cluster.execute("south", "UPDATE t SET v = 'late' WHERE id = 1")
    for name in cluster.names:
        cluster.execute(name, "VACUUM (FREEZE) t")
    cluster.sync()
    for name in cluster.names:
        assert cluster.value(name, "SELECT v FROM t") == "late"
    cluster.assert_identical()


def test_a_node_whose_clock_lags_30_seconds_still_wins_with_a_later_edit(cluster: Cluster) -> None:
    for name in cluster.names:
        cluster.execute(name, "CREATE TABLE t (id int PRIMARY KEY, v text)")
    cluster.setup()
    # south's clock runs 30 s behind (for every session of its database).
    cluster.admin_execute("south", "UPDATE pgconcord.local_node SET clock_offset_us = -30000000")
    cluster.execute("north", "INSERT INTO t VALUES (1, 'north')")
    cluster.sync()
    # south edits after it has seen north's edit: causally later, so it wins everywhere,
    # although its wall clock reads 30 s earlier.
    cluster.execute("south", "UPDATE t SET v = 'south, later' WHERE id = 1")
    cluster.sync()
    for name in cluster.names:
        assert cluster.value(name, "SELECT v FROM t") == "south, later"
    # A concurrent edit (south did not see east's) is decided by the clocks: east wins.
    cluster.execute("east", "UPDATE t SET v = 'east' WHERE id = 1")
    cluster.execute("south", "UPDATE t SET v = 'south, lagging' WHERE id = 1")
    cluster.sync()
    for name in cluster.names:
        assert cluster.value(name, "SELECT v FROM t") == "east"
    cluster.assert_identical()


def test_a_child_arriving_before_its_parent(cluster: Cluster) -> None:
    for name in cluster.names:
        cluster.execute(
            name,
            "CREATE TABLE parent (id int PRIMARY KEY);"
            " CREATE TABLE child (id int PRIMARY KEY, parent_id int NOT NULL REFERENCES parent)",
        )
    cluster.setup()
    cluster.execute("south", "INSERT INTO parent VALUES (1)")
    cluster.pull("south", "north")
    cluster.execute("north", "INSERT INTO child VALUES (10, 1)")
    # east gets the child from north before the parent from south: it waits for nothing,
    # the foreign key is not checked while applying, and the parent arrives later.
    cluster.pull("north", "east")
    assert cluster.query("east", "SELECT id FROM child") == [(10,)]
    assert cluster.query("east", "SELECT id FROM parent") == []
    # Recorded where it happened, and only there.
    missing = [r for r in cluster.conflicts() if r["type"] == "parent_missing"]
    assert [(r["node"], r["table"], r["key"]) for r in missing] == [
        ("east", "public.child", {"id": 10})
    ]
    cluster.sync()
    for name in cluster.names:
        assert cluster.query(
            name, "SELECT c.id, p.id FROM child c JOIN parent p ON p.id = c.parent_id"
        ) == [(10, 1)]
    cluster.assert_identical()
