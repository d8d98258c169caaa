"""Schema changes travel with the data: a table created on one node is created on the others and
replicated, ALTER TABLE reaches every node in order with the rows around it, what cannot be
replicated safely is refused at once, and a difference made by hand holds the table's changes
until it is healed."""

from __future__ import annotations

import threading

import psycopg
import pytest
from harness import Cluster, wait_for

from pgconcord.agent import Agent, sync

CAPTURE_MODES = ("trigger", "wal")

BASE = "CREATE TABLE items (id int PRIMARY KEY, name text, price numeric)"


def prepared(cluster: Cluster) -> Cluster:
    for name in cluster.names:
        cluster.execute(name, BASE)
    cluster.setup()
    cluster.execute("north", "INSERT INTO items VALUES (1, 'pen', 2), (2, 'ink', 5)")
    cluster.sync()
    return cluster


def columns(cluster: Cluster, node: str, table: str) -> list[tuple[str, str]]:
    return cluster.query(
        node,
        "SELECT column_name::text, data_type::text FROM information_schema.columns"
        " WHERE table_schema = 'public' AND table_name = %s ORDER BY ordinal_position",
        (table,),
    )


def synced_until(cluster: Cluster, condition: object, message: str) -> None:
    def step() -> object:
        cluster.sync()
        return condition() if callable(condition) else condition

    wait_for(step, timeout=60, message=message)


def test_a_table_created_on_one_node_is_created_everywhere_and_replicated(
    cluster: Cluster,
) -> None:
    prepared(cluster)
    cluster.execute("north", "CREATE TABLE notes (id serial PRIMARY KEY, body text NOT NULL)")
    # Written before any agent had seen the table: not lost.
    cluster.execute("north", "INSERT INTO notes (body) VALUES ('written at once')")
    synced_until(
        cluster,
        lambda: all(
            cluster.value(name, "SELECT count(*) FROM notes") == 1 for name in cluster.names
        ),
        "the new table and its first row on every node",
    )
    # Every node captures it now, and hands out keys that do not collide.
    for name in cluster.names:
        cluster.execute(name, "INSERT INTO notes (body) VALUES (%s)", (f"from {name}",))
    cluster.sync()
    for name in cluster.names:
        assert cluster.value(name, "SELECT count(*) FROM notes") == 4
    cluster.assert_identical()


def test_alter_table_reaches_every_node_in_order_with_the_rows_around_it(
    cluster: Cluster,
) -> None:
    prepared(cluster)
    cluster.execute("north", "UPDATE items SET price = 3 WHERE id = 1")
    cluster.execute("north", "ALTER TABLE items ADD COLUMN stock int NOT NULL DEFAULT 10")
    cluster.execute("north", "UPDATE items SET stock = 7 WHERE id = 1")
    with cluster.connect("north", autocommit=False) as connection:
        connection.execute("ALTER TABLE items ADD COLUMN colour text")
        connection.execute("UPDATE items SET colour = 'green' WHERE id = 2")
        connection.commit()
    cluster.execute("north", "INSERT INTO items VALUES (3, 'nib', 1, 4, 'blue')")
    # Meanwhile another node keeps writing with the old columns.
    cluster.execute("south", "UPDATE items SET name = 'fountain pen' WHERE id = 1")
    cluster.sync()
    cluster.sync()
    for name in cluster.names:
        assert [c for c, _ in columns(cluster, name, "items")] == [
            "id",
            "name",
            "price",
            "stock",
            "colour",
        ], name
        assert cluster.query(name, "SELECT * FROM items ORDER BY id") == [
            (1, "fountain pen", 3, 7, None),
            (2, "ink", 5, 10, "green"),
            (3, "nib", 1, 4, "blue"),
        ], name
    cluster.assert_identical()
    # Later updates of the new column merge like the others.
    cluster.execute("east", "UPDATE items SET colour = 'red' WHERE id = 2")
    cluster.sync()
    for name in cluster.names:
        assert cluster.value(name, "SELECT colour FROM items WHERE id = 2") == "red"


def test_drop_rename_and_type_changes_of_columns_are_replicated(cluster: Cluster) -> None:
    prepared(cluster)
    cluster.execute("south", "ALTER TABLE items RENAME COLUMN name TO title")
    cluster.execute("south", "UPDATE items SET title = 'pencil' WHERE id = 1")
    cluster.execute("south", "ALTER TABLE items ALTER COLUMN price TYPE numeric(10, 2)")
    cluster.execute("south", "ALTER TABLE items DROP COLUMN IF EXISTS missing_one")
    cluster.execute("south", "CREATE INDEX items_title ON items (title)")
    cluster.sync()
    cluster.execute("east", "ALTER TABLE items DROP COLUMN price")
    cluster.execute("east", "INSERT INTO items VALUES (5, 'eraser')")
    cluster.sync()
    for name in cluster.names:
        assert [c for c, _ in columns(cluster, name, "items")] == ["id", "title"], name
        assert cluster.query(name, "SELECT * FROM items ORDER BY id") == [
            (1, "pencil"),
            (2, "ink"),
            (5, "eraser"),
        ]
        assert cluster.value(name, "SELECT to_regclass('public.items_title')::text") == (
            "items_title"
        )
    cluster.assert_identical()


@pytest.mark.parametrize(
    ("statement", "message"),
    [
        ("CREATE TABLE copy AS SELECT * FROM items", "CREATE TABLE AS is not replicated"),
        ("ALTER TABLE items RENAME TO goods", "renaming or moving the replicated table"),
        (
            "ALTER TABLE items ADD COLUMN a int; UPDATE items SET name = 'x'",
            "must be sent as one plain statement",
        ),
        (
            "DO $$ BEGIN EXECUTE 'ALTER TABLE items ADD COLUMN b int'; END $$",
            "must be sent as one plain statement",
        ),
    ],
)
def test_schema_changes_that_cannot_be_replicated_are_refused(
    system_cluster: Cluster, statement: str, message: str
) -> None:
    cluster = prepared(system_cluster)
    with pytest.raises(psycopg.errors.FeatureNotSupported, match=message):
        cluster.execute("north", statement)
    assert [c for c, _ in columns(cluster, "north", "items")] == ["id", "name", "price"]


def test_a_difference_made_by_hand_holds_the_changes_until_it_is_healed(
    system_cluster: Cluster,
) -> None:
    cluster = prepared(system_cluster)
    by_hand = "SET session_replication_role = replica; ALTER TABLE items ADD COLUMN extra int"
    cluster.admin_execute("south", by_hand)
    cluster.execute("south", "INSERT INTO items VALUES (9, 'clip', 1, 42)")
    cluster.execute("north", "INSERT INTO items VALUES (10, 'pad', 3)")
    report = sync(cluster.config)
    assert not report.ok
    assert any("column extra" in failure for failure in report.failures), report.failures
    # Everything else flowed; the held change is still queued.
    assert cluster.value("south", "SELECT name FROM items WHERE id = 10") == "pad"
    assert cluster.value("north", "SELECT count(*) FROM items WHERE id = 9") == 0
    for name in ("north", "east"):
        cluster.admin_execute(name, by_hand)
    cluster.sync()
    for name in cluster.names:
        assert cluster.value(name, "SELECT extra FROM items WHERE id = 9") == 42
    cluster.assert_identical()


def test_a_dropped_table_is_dropped_everywhere_and_late_writes_to_it_are_parked(
    cluster: Cluster,
) -> None:
    prepared(cluster)
    cluster.execute("north", "CREATE TABLE scratch (id int PRIMARY KEY, v text)")
    synced_until(
        cluster,
        lambda: all(
            cluster.value(name, "SELECT to_regclass('public.scratch') IS NOT NULL")
            for name in cluster.names
        ),
        "scratch on every node",
    )
    # south writes to the table while north drops it.
    cluster.execute("south", "INSERT INTO scratch VALUES (1, 'late')")
    cluster.execute("north", "DROP TABLE scratch")
    cluster.execute("north", "INSERT INTO items VALUES (7, 'after the drop', 1)")
    cluster.sync()
    cluster.sync()
    for name in cluster.names:
        assert cluster.value(name, "SELECT to_regclass('public.scratch')") is None, name
        assert cluster.value(name, "SELECT name FROM items WHERE id = 7") == "after the drop"
    parked = [r for r in cluster.conflicts() if r["kind"] == "parked"]
    assert parked and all("was dropped on this node" in r["reason"] for r in parked)
    cluster.assert_identical()


# Per capture mode, each replicated table and whether it has its own capture back after a
# schema change: (name, true, true) once it has.
OWN_CAPTURE = {
    "trigger": "SELECT t.table_name, t.own_capture, p.proname = 'capture_' || t.id"
    " FROM pgconcord.replicated_table t"
    " JOIN pg_trigger g ON g.tgrelid = t.relation AND g.tgname = 'pgconcord_capture'"
    " JOIN pg_proc p ON p.oid = g.tgfoid ORDER BY 1",
    "wal": "SELECT t.table_name,"
    " EXISTS (SELECT 1 FROM pg_publication_rel r WHERE r.prrelid = t.relation),"
    " NOT EXISTS (SELECT 1 FROM pg_trigger g WHERE g.tgrelid = t.relation"
    "             AND g.tgname = 'pgconcord_capture')"
    " FROM pgconcord.replicated_table t ORDER BY 1",
}


def test_schema_changes_arrive_under_a_running_agent_while_writes_go_on(
    cluster: Cluster, capture_mode: str
) -> None:
    prepared(cluster)
    stop = threading.Event()
    written: list[int] = []

    def keep_writing() -> None:
        number = 100
        while not stop.is_set():
            number += 1
            node = cluster.names[number % len(cluster.names)]
            cluster.execute(node, "INSERT INTO items VALUES (%s, 'busy', 1)", (number,))
            written.append(number)

    writer = threading.Thread(target=keep_writing)
    running = Agent(cluster.config, poll_seconds=5).start()
    writer.start()
    try:
        cluster.execute("south", "CREATE TABLE tags (id int PRIMARY KEY, label text)")
        cluster.execute("south", "INSERT INTO tags VALUES (1, 'new')")
        cluster.execute("north", "ALTER TABLE items ADD COLUMN weight int")
        wait_for(
            lambda: all(
                cluster.value(name, "SELECT to_regclass('public.tags') IS NOT NULL")
                and cluster.value(name, "SELECT count(*) FROM tags") == 1
                and "weight" in [c for c, _ in columns(cluster, name, "items")]
                for name in cluster.names
            ),
            timeout=60,
            message="the new table, its row and the new column on every node",
        )
        cluster.execute("east", "INSERT INTO tags VALUES (2, 'from east')")
        cluster.execute("east", "UPDATE items SET weight = 3 WHERE id = 1")
    finally:
        stop.set()
        writer.join()
    try:
        wait_for(
            lambda: all(
                cluster.value(name, "SELECT count(*) FROM items WHERE id > 100") == len(written)
                and cluster.value(name, "SELECT count(*) FROM tags") == 2
                and cluster.value(name, "SELECT weight FROM items WHERE id = 1") == 3
                for name in cluster.names
            ),
            timeout=60,
            message="every write on every node",
        )
        # Each node's own agent gave the changed and the new table their own capture again:
        # a capture function, or a place in the publication and no trigger.
        wait_for(
            lambda: all(
                cluster.admin_query(name, OWN_CAPTURE[capture_mode])
                == [("items", True, True), ("tags", True, True)]
                for name in cluster.names
            ),
            timeout=30,
            message="every table on its own capture function again",
        )
    finally:
        running.stop()
    cluster.assert_identical()


def test_writes_go_on_right_after_a_schema_change_with_no_agent_running(
    cluster: Cluster,
) -> None:
    for name in cluster.names:
        cluster.execute(
            name,
            "CREATE TABLE docs (id int PRIMARY KEY, body json, score float8, tags int[],"
            " note text)",
        )
    cluster.setup()
    cluster.execute("north", """INSERT INTO docs VALUES (1, '{"a": 1}', -0.0, '{1,2}', 'x')""")
    cluster.sync()
    # No agent has seen these yet: the table's capture must keep working on its own.
    cluster.execute("north", "ALTER TABLE docs DROP COLUMN body")
    cluster.execute("north", "UPDATE docs SET note = 'after the drop', score = 1.5 WHERE id = 1")
    cluster.execute("north", "ALTER TABLE docs ADD COLUMN extra jsonb")
    cluster.execute("north", """UPDATE docs SET extra = '{"b": 2}' WHERE id = 1""")
    cluster.execute("north", "INSERT INTO docs VALUES (2, '-0', '[0:1]={3,4}', 'y', '[]')")
    cluster.sync()
    cluster.sync()
    expected = [
        ("1", "1.5", "{1,2}", "after the drop", '{"b": 2}'),
        ("2", "-0", "[0:1]={3,4}", "y", "[]"),
    ]
    for name in cluster.names:
        assert (
            cluster.query(
                name,
                "SELECT id::text, score::text, tags::text, note, extra::text FROM docs ORDER BY id",
            )
            == expected
        ), name
    cluster.assert_identical()
