"""Changes that cross on the way: schema changes on one node while another writes, counters
under node-priority. Found by a review; each failed before its fix."""

from __future__ import annotations

import threading
from decimal import Decimal

import pytest
from harness import Cluster, wait_for

from pgconcord.agent import sync


def values(cluster: Cluster, statement: str) -> dict[str, object]:
    return {name: tuple(cluster.query(name, statement)) for name in cluster.names}


def test_counters_under_node_priority_add_up(cluster: Cluster) -> None:
    for name in cluster.names:
        cluster.execute(name, "CREATE TABLE acc (id int PRIMARY KEY, balance numeric NOT NULL)")
    cluster.write_config(
        '[conflict.table."public.acc"]\npriority = ["north", "south"]\n'
        'delta_columns = ["balance"]\n'
    )
    cluster.setup()
    cluster.execute("north", "INSERT INTO acc VALUES (1, 100)")
    cluster.sync()
    cluster.execute("east", "UPDATE acc SET balance = balance + 10 WHERE id = 1")
    cluster.execute("south", "UPDATE acc SET balance = balance + 1 WHERE id = 1")
    cluster.sync()
    cluster.sync()
    got = values(cluster, "SELECT balance FROM acc")
    assert set(got.values()) == {((111,),)}, got


def drop_a_column_on_north_while_south_writes_it(cluster: Cluster) -> None:
    for name in cluster.names:
        cluster.execute(name, "CREATE TABLE items (id int PRIMARY KEY, name text, price int)")
        cluster.execute(name, "CREATE TABLE other (id int PRIMARY KEY)")
    cluster.setup()
    cluster.execute("north", "INSERT INTO items VALUES (1, 'pen', 2)")
    cluster.sync()
    cluster.execute("north", "ALTER TABLE items DROP COLUMN price")
    # Concurrently south writes the column, then makes an unrelated schema change.
    cluster.execute("south", "UPDATE items SET price = 3, name = 'pencil' WHERE id = 1")
    cluster.execute("south", "CREATE INDEX other_id ON other (id)")


def test_an_update_of_a_column_dropped_meanwhile_does_not_stall_the_stream(
    cluster: Cluster,
) -> None:
    drop_a_column_on_north_while_south_writes_it(cluster)
    reports = [sync(cluster.config) for _ in range(3)]
    got = values(cluster, "SELECT * FROM items ORDER BY id")
    assert reports[-1].ok, (reports[-1], got)
    assert len(set(got.values())) == 1, got


def test_an_update_pulled_in_while_another_origin_drops_its_column_is_not_parked(
    cluster: Cluster,
) -> None:
    """As the agent's pair loops do: north's DROP COLUMN and south's update of that column
    are pulled into east at the same time. The update's plan, made before the drop committed
    there, fails; it is planned again (and waits for the drop to reach south), not parked."""
    drop_a_column_on_north_while_south_writes_it(cluster)
    pulls = [
        threading.Thread(target=cluster.pull, args=(origin, "east"))
        for origin in ("north", "south")
    ]
    for pull in pulls:
        pull.start()
    for pull in pulls:
        pull.join()
    reports = [sync(cluster.config) for _ in range(3)]
    got = values(cluster, "SELECT * FROM items ORDER BY id")
    assert reports[-1].ok, (reports[-1], got)
    assert set(got.values()) == {((1, "pencil"),)}, got
    assert cluster.admin_value("east", "SELECT count(*) FROM pgconcord.parked_change") == 0


def test_rows_written_before_a_concurrent_add_column_get_its_default(
    cluster: Cluster,
) -> None:
    for name in cluster.names:
        cluster.execute(name, "CREATE TABLE items (id int PRIMARY KEY, name text)")
    cluster.setup()
    cluster.execute("north", "INSERT INTO items VALUES (1, 'pen')")
    cluster.sync()
    cluster.execute("north", "ALTER TABLE items ADD COLUMN stock int DEFAULT 10")
    # south writes with the old columns before it has seen the ALTER.
    cluster.execute("south", "INSERT INTO items VALUES (2, 'ink')")
    cluster.execute("south", "UPDATE items SET name = 'fountain pen' WHERE id = 1")
    cluster.pull("north", "south")  # south adds the column: its row 2 gets stock 10
    cluster.pull("north", "east")
    cluster.pull("south", "north")  # staged rows lack `stock`; the plan has it
    cluster.pull("south", "east")
    cluster.sync()
    got = values(cluster, "SELECT * FROM items ORDER BY id")
    assert len(set(got.values())) == 1, got


def pull_while_a_local_transaction_waits(
    cluster: Cluster, origin: str, target: str, statement: str
) -> None:
    """Pull origin -> target while a local transaction at the target, which ran `statement`,
    holds the row the apply writes: it commits once the apply waits for it."""
    with cluster.connect(target, autocommit=False) as local:
        local.execute(statement.encode())
        applying = threading.Thread(target=cluster.pull, args=(origin, target))
        applying.start()
        wait_for(
            lambda: cluster.admin_value(
                target,
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND wait_event_type = 'Lock'",
            ),
            message="the apply never waited for the local transaction",
        )
        local.commit()
    applying.join(60)
    assert not applying.is_alive()


@pytest.mark.parametrize("capture_mode", ["trigger", "wal"])
def test_a_local_write_an_apply_waited_for_carries_only_its_own_columns(
    cluster: Cluster,
) -> None:
    """An apply blocked by a local transaction on its row writes it once that commits. The
    local change must be stamped before the apply judges the row: stamped after, it would carry
    the applied column's new version with the row as it was before (a WAL-mode node captures
    it only once its WAL is read), and a node that got it first would keep the old value under
    the new version for ever (found by the demo: one price differed on one node)."""
    north, south, east = cluster.names
    for name in cluster.names:
        cluster.execute(
            name,
            "CREATE TABLE products (id text PRIMARY KEY, price numeric NOT NULL,"
            " stock int NOT NULL); INSERT INTO products VALUES ('p', 4.35, 100)",
        )
    cluster.write_config('[conflict.table."public.products"]\ndelta_columns = ["stock"]\n')
    cluster.setup()
    cluster.execute(north, "UPDATE products SET price = 4.13")
    pull_while_a_local_transaction_waits(
        cluster, north, south, "UPDATE products SET stock = stock - 1"
    )
    cluster.pull(south, east)  # east hears of the local write before the price itself
    cluster.pull(north, east)
    cluster.sync()
    got = values(cluster, "SELECT price, stock FROM products")
    assert set(got.values()) == {((Decimal("4.13"), 99),)}, got


@pytest.mark.parametrize("capture_mode", ["trigger", "wal"])
def test_a_local_insert_an_apply_waited_for_is_judged(cluster: Cluster) -> None:
    """The same key inserted here while an apply inserts it: the apply waits for the local
    transaction and then finds the row there. It must judge the local insert (one of the two
    wins everywhere), not overwrite it unseen."""
    north, south = cluster.names[0], cluster.names[1]
    for name in cluster.names:
        cluster.execute(name, "CREATE TABLE items (id int PRIMARY KEY, note text NOT NULL)")
    cluster.setup()
    cluster.execute(north, "INSERT INTO items VALUES (1, 'from north')")
    pull_while_a_local_transaction_waits(
        cluster, north, south, "INSERT INTO items VALUES (1, 'from south')"
    )
    cluster.sync()
    cluster.sync()
    got = values(cluster, "SELECT note FROM items")
    assert len(set(got.values())) == 1, got
