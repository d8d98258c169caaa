"""Changes that cross on the way: schema changes on one node while another writes, counters
under node-priority. Found by a review; each failed before its fix."""

from __future__ import annotations

from harness import Cluster

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


def test_an_update_of_a_column_dropped_meanwhile_does_not_stall_the_stream(
    cluster: Cluster,
) -> None:
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
    reports = [sync(cluster.config) for _ in range(3)]
    got = values(cluster, "SELECT * FROM items ORDER BY id")
    assert reports[-1].ok, (reports[-1], got)
    assert len(set(got.values())) == 1, got


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
