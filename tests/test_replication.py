"""Three masters replicating: the core promises on real PostgreSQL servers."""

from __future__ import annotations

import random
import threading
import time

import psycopg
import pytest
from harness import Cluster, wait_for

from pgconcord.agent import Agent

# The core scenarios and fault schedules, in both capture modes.
CAPTURE_MODES = ("trigger", "wal")

SHOP_SCHEMA = """
CREATE TABLE customers (id text PRIMARY KEY, name text NOT NULL, city text);
CREATE TABLE orders (
    id text PRIMARY KEY,
    customer_id text,
    quantity integer NOT NULL,
    note text
);
CREATE TABLE "Order Items" ("order id" text, "line" integer, amount numeric(12, 2),
                            PRIMARY KEY ("order id", "line"));
"""


def shop(cluster: Cluster) -> Cluster:
    for name in cluster.names:
        cluster.execute(name, SHOP_SCHEMA)
    cluster.setup()
    return cluster


def test_concurrent_writes_on_three_nodes_while_the_agent_runs(cluster: Cluster) -> None:
    shop(cluster)
    running = Agent(cluster.config, poll_seconds=0.2).start()
    kept: dict[str, set[str]] = {name: set() for name in cluster.names}
    stop = threading.Event()
    failures: list[BaseException] = []

    def writer(node: str, seed: int) -> None:
        generator = random.Random(seed)
        try:
            with cluster.connect(node) as connection:
                number = 0
                while not stop.is_set():
                    number += 1
                    key = f"{node}-{number}"
                    with connection.transaction():
                        connection.execute(
                            "INSERT INTO orders VALUES (%s, %s, %s, NULL)",
                            (key, f"c-{node}", generator.randint(1, 9)),
                        )
                        connection.execute(
                            """INSERT INTO "Order Items" VALUES (%s, 1, %s)""",
                            (key, generator.randint(1, 10_000) / 100),
                        )
                    kept[node].add(key)
                    if number % 3 == 0 and kept[node]:
                        victim = generator.choice(sorted(kept[node]))
                        connection.execute(
                            "UPDATE orders SET quantity = quantity + 1, note = 'edited'"
                            " WHERE id = %s",
                            (victim,),
                        )
                    if number % 7 == 0 and kept[node]:
                        victim = generator.choice(sorted(kept[node]))
                        with connection.transaction():
                            connection.execute(
                                """DELETE FROM "Order Items" WHERE "order id" = %s""", (victim,)
                            )
                            connection.execute("DELETE FROM orders WHERE id = %s", (victim,))
                        kept[node].discard(victim)
                    # Rows every node writes to: concurrent conflicting upserts.
                    connection.execute(
                        "INSERT INTO customers VALUES (%s, %s, %s) ON CONFLICT (id)"
                        " DO UPDATE SET name = excluded.name, city = excluded.city",
                        (f"shared-{number % 5}", f"written at {node}", node),
                    )
        except BaseException as error:  # surfaced by the main thread
            failures.append(error)

    threads = [
        threading.Thread(target=writer, args=(name, index))
        for index, name in enumerate(cluster.names)
    ]
    for thread in threads:
        thread.start()
    time.sleep(4)
    stop.set()
    for thread in threads:
        thread.join()
    assert not failures, failures
    try:
        expected = sorted(key for keys in kept.values() for key in keys)

        def every_node_has_every_order() -> bool:
            return all(
                [row[0] for row in cluster.query(name, "SELECT id FROM orders ORDER BY id")]
                == expected
                for name in cluster.names
            )

        wait_for(every_node_has_every_order, timeout=60, message="orders on every node")
        wait_for(
            lambda: (
                cluster.cli("status", "--json").returncode == 0
                and all(
                    pair["pending_changes"] == 0
                    for pair in __import__("json").loads(cluster.cli("status", "--json").stdout)[
                        "pairs"
                    ]
                )
            ),
            timeout=60,
            message="nothing pending",
        )
    finally:
        running.stop()
    assert len(expected) > 30
    cluster.assert_identical()


def test_long_transaction_committing_after_a_later_short_one_arrives(cluster: Cluster) -> None:
    shop(cluster)
    with cluster.connect("north", autocommit=False) as long_one:
        long_one.execute("INSERT INTO orders VALUES ('long', 'c', 1, NULL)")
        # The short transaction starts later, gets a higher id and commits first.
        cluster.execute("north", "INSERT INTO orders VALUES ('short', 'c', 1, NULL)")
        cluster.sync()
        assert cluster.query("south", "SELECT id FROM orders") == [("short",)]
        long_one.commit()
    cluster.sync()
    for name in cluster.names:
        assert cluster.query(name, "SELECT id FROM orders ORDER BY id") == [("long",), ("short",)]
    cluster.assert_identical()


def test_rolled_back_and_uncommitted_changes_never_travel(cluster: Cluster) -> None:
    shop(cluster)
    with cluster.connect("north", autocommit=False) as connection:
        connection.execute("INSERT INTO orders VALUES ('rolled-back', 'c', 1, NULL)")
        connection.rollback()
        connection.execute("INSERT INTO orders VALUES ('open', 'c', 1, NULL)")
        with connection.cursor() as cursor:
            cursor.execute("SAVEPOINT s")
            cursor.execute("INSERT INTO orders VALUES ('savepoint-undone', 'c', 1, NULL)")
            cursor.execute("ROLLBACK TO SAVEPOINT s")
        cluster.sync()
        assert cluster.query("south", "SELECT id FROM orders") == []
        connection.commit()
    cluster.sync()
    assert cluster.query("east", "SELECT id FROM orders") == [("open",)]


@pytest.mark.slow
def test_same_row_changed_on_three_nodes_converges_to_the_latest_write(cluster: Cluster) -> None:
    shop(cluster)
    cluster.execute("north", "INSERT INTO customers VALUES ('c1', 'first', 'Oslo')")
    cluster.sync()
    for name in cluster.names:  # one after another: east's write is the latest
        cluster.execute(name, "UPDATE customers SET name = %s WHERE id = 'c1'", (f"by {name}",))
        time.sleep(0.01)
    cluster.sync()
    for name in cluster.names:
        assert cluster.query(name, "SELECT name FROM customers") == [("by east",)]
    records = cluster.conflicts()
    assert records, "the conflict is listed"
    assert {record["type"] for record in records} == {"update_origin_differs"}
    for record in records:
        assert record["table"] == "public.customers"
        assert record["key"] == {"id": "c1"}
        assert record["local"]["row"] is not None
        kept, lost = (record["incoming"], record["local"])[
            :: 1 if record["resolution"] == "incoming" else -1
        ]
        # Whichever two versions met, the later one was kept, and east's is the latest of all.
        assert kept["clock"] > lost["clock"]
        if "east" in (kept["origin"], lost["origin"]):
            assert kept["origin"] == "east"
    cluster.assert_identical()


def test_a_change_is_never_captured_again_where_it_is_applied(cluster: Cluster) -> None:
    shop(cluster)
    cluster.execute("north", "INSERT INTO customers VALUES ('c1', 'x', NULL)")
    cluster.execute("north", "UPDATE customers SET city = 'Rome' WHERE id = 'c1'")
    before = cluster.logged_changes("north")
    cluster.sync()
    cluster.sync()
    for name in ("south", "east"):
        assert cluster.logged_changes(name) == 0
        assert cluster.applied_changes(name, "north") == before == 2
        assert cluster.applied_changes(name, "south" if name == "east" else "east") == 0
    cluster.assert_identical()


def test_primary_key_updates_deletes_and_reinserts(cluster: Cluster) -> None:
    shop(cluster)
    cluster.execute(
        "north", "INSERT INTO customers SELECT 'c' || g, 'n', NULL FROM generate_series(1, 50) g"
    )
    cluster.sync()
    cluster.execute("south", "UPDATE customers SET id = id || '-moved' WHERE id IN ('c1', 'c2')")
    cluster.execute("east", "DELETE FROM customers WHERE id = 'c3'")
    cluster.execute("east", "INSERT INTO customers VALUES ('c3', 'again', NULL)")
    cluster.execute("north", "DELETE FROM customers WHERE id = 'c4'")
    cluster.sync()
    ids = {row[0] for row in cluster.query("north", "SELECT id FROM customers")}
    assert {"c1-moved", "c2-moved", "c3"} <= ids and not {"c1", "c2", "c4"} & ids
    assert cluster.value("south", "SELECT name FROM customers WHERE id = 'c3'") == "again"
    cluster.assert_identical()


def test_a_delete_wins_over_concurrent_updates_and_a_new_insert_starts_afresh(
    cluster: Cluster,
) -> None:
    shop(cluster)
    cluster.execute(
        "north", "INSERT INTO customers VALUES ('a', 'x', NULL), ('b', 'x', NULL), ('c', 'x', NULL)"
    )
    cluster.sync()
    # a: deleted first, updated later elsewhere; b: updated first, deleted later. Neither
    # update had seen the delete, so it cannot bring the row back, whatever the clocks say.
    cluster.execute("north", "DELETE FROM customers WHERE id = 'a'")
    time.sleep(0.01)
    cluster.execute("south", "UPDATE customers SET name = 'late update' WHERE id = 'a'")
    cluster.execute("south", "UPDATE customers SET name = 'early update' WHERE id = 'b'")
    time.sleep(0.01)
    cluster.execute("north", "DELETE FROM customers WHERE id = 'b'")
    # c: deleted, then inserted again by a node that had seen the delete: a new row.
    cluster.execute("north", "DELETE FROM customers WHERE id = 'c'")
    cluster.sync()
    cluster.execute("south", "INSERT INTO customers VALUES ('c', 'again', NULL)")
    cluster.sync()
    for name in cluster.names:
        assert cluster.query(name, "SELECT id, name FROM customers") == [("c", "again")]
    types = {record["type"] for record in cluster.conflicts()}
    assert {"update_deleted", "delete_origin_differs"} <= types
    cluster.assert_identical()


def test_user_triggers_and_foreign_keys_do_not_break_apply(cluster: Cluster) -> None:
    schema = """
    CREATE TABLE parent (id int PRIMARY KEY);
    CREATE TABLE child (id int PRIMARY KEY, parent_id int REFERENCES parent (id));
    CREATE TABLE audit (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, what text);
    CREATE FUNCTION note_child() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN INSERT INTO audit (what) VALUES ('child ' || NEW.id); RETURN NEW; END $$;
    CREATE TRIGGER child_audit AFTER INSERT ON child FOR EACH ROW EXECUTE FUNCTION note_child();
    """
    for name in cluster.names:
        cluster.execute(name, schema)
    cluster.write_config('[replication]\nexclude = ["public.audit"]\n')
    cluster.setup()
    with cluster.connect("north", autocommit=False) as connection:
        # The child is written before its parent in one transaction (a deferred-style order).
        connection.execute("SET CONSTRAINTS ALL DEFERRED")
        connection.execute("INSERT INTO parent VALUES (1)")
        connection.execute("INSERT INTO child VALUES (10, 1)")
        connection.commit()
    cluster.execute("north", "DELETE FROM child")
    cluster.execute("north", "DELETE FROM parent")
    cluster.execute("north", "INSERT INTO parent VALUES (2)")
    cluster.execute("north", "INSERT INTO child VALUES (20, 2)")
    cluster.sync()
    for name in ("south", "east"):
        assert cluster.query(name, "SELECT id, parent_id FROM child") == [(20, 2)]
        # The user's trigger fired where the application wrote, not again where we applied.
        assert cluster.value(name, "SELECT count(*) FROM audit") == 0
    assert cluster.value("north", "SELECT count(*) FROM audit") == 2
    cluster.assert_identical()


def test_truncate_of_a_replicated_table_is_refused(cluster: Cluster) -> None:
    shop(cluster)
    with cluster.connect("north") as connection:
        try:
            connection.execute("TRUNCATE orders")
        except psycopg.errors.FeatureNotSupported as error:
            assert "use DELETE" in str(error)
        else:
            raise AssertionError("TRUNCATE was accepted")
