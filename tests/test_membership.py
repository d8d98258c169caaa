"""Living membership: a node joins a running cluster with a copy, a node parts, the change
log is purged down to what some member still needs, and a node offline too long is evicted
and joins again. Every scenario ends with verify finding identical nodes."""

from __future__ import annotations

import json
import random
import threading
import time
from typing import Any

import pytest
from harness import Cluster, wait_for

from pgconcord import agent
from pgconcord.agent import Agent, purge_node
from pgconcord.errors import NodeUnavailable, PgconcordError
from pgconcord.join import QuietObserver, join

SCHEMA = """
CREATE TABLE accounts (id int PRIMARY KEY, owner text, balance numeric(12, 2) NOT NULL,
                       operations bigint NOT NULL);
CREATE TABLE stock (item text PRIMARY KEY, quantity bigint NOT NULL);
CREATE TABLE orders (id text PRIMARY KEY, node text NOT NULL, quantity int NOT NULL,
                     note text, made timestamptz DEFAULT now());
CREATE INDEX orders_by_node ON orders (node);
CREATE TABLE "Order Items" ("order id" text, line int, amount numeric(12, 2),
                            PRIMARY KEY ("order id", line));
"""
COUNTERS = (
    '[conflict.table."public.accounts"]\ndelta_columns = ["balance", "operations"]\n'
    '[conflict.table."public.stock"]\ndelta_columns = ["quantity"]\n'
)


def configure(cluster: Cluster, names: list[str], extra: str = COUNTERS, **dsns: str) -> None:
    """Write the cluster file with these nodes (a node's dsn may be replaced)."""
    nodes = "".join(
        f'[[node]]\nname = "{name}"\ndsn = "{dsns.get(name, cluster.dsns[name])}"\n\n'
        for name in names
    )
    cluster.config_path.write_text(f'[cluster]\nname = "test"\n\n{nodes}{extra}')


def two_node_shop(cluster: Cluster) -> None:
    """north and south replicating with data; east is an empty database, not in the config."""
    for name in ("north", "south"):
        cluster.execute(name, SCHEMA)
    configure(cluster, ["north", "south"])
    cluster.setup()
    cluster.execute(
        "north",
        "INSERT INTO accounts SELECT g, 'owner ' || g, 100, 0 FROM generate_series(1, 40) g",
    )
    cluster.execute(
        "south", "INSERT INTO stock SELECT 'item' || g, 1000 FROM generate_series(1, 20) g"
    )
    cluster.execute(
        "north",
        "INSERT INTO orders (id, node, quantity) SELECT 'n' || g, 'north', g % 7"
        " FROM generate_series(1, 3000) g",
    )
    cluster.execute(
        "south",
        """INSERT INTO "Order Items" SELECT 'n' || g, 1, g / 100.0"""
        " FROM generate_series(1, 500) g",
    )
    cluster.sync()


class Writer:
    """Writes on one node until stopped: orders, updates, deletes and counter increments; it
    remembers what every node must end with."""

    def __init__(self, cluster: Cluster, node: str, seed: int) -> None:
        self.cluster, self.node = cluster, node
        self.random = random.Random(seed)
        self.orders: set[str] = set()
        self.balance_added = 0
        self.stock_added = 0
        self.stop = threading.Event()
        self.failure: BaseException | None = None
        self.thread = threading.Thread(target=self.run)

    def run(self) -> None:
        try:
            with self.cluster.connect(self.node) as connection:
                number = 0
                while not self.stop.is_set():
                    number += 1
                    key = f"{self.node}-{number}"
                    with connection.transaction():
                        connection.execute(
                            "INSERT INTO orders (id, node, quantity) VALUES (%s, %s, %s)",
                            (key, self.node, self.random.randint(1, 9)),
                        )
                        account = self.random.randint(1, 40)
                        connection.execute(
                            "UPDATE accounts SET balance = balance + 1,"
                            " operations = operations + 1 WHERE id = %s",
                            (account,),
                        )
                        connection.execute(
                            "UPDATE stock SET quantity = quantity - 2 WHERE item = %s",
                            (f"item{self.random.randint(1, 20)}",),
                        )
                    self.orders.add(key)
                    self.balance_added += 1
                    self.stock_added -= 2
                    if number % 5 == 0:
                        victim = self.random.choice(sorted(self.orders))
                        connection.execute("DELETE FROM orders WHERE id = %s", (victim,))
                        self.orders.discard(victim)
                    if number % 3 == 0:
                        connection.execute(
                            "UPDATE orders SET note = %s WHERE id = %s",
                            (f"edited {number}", self.random.choice(sorted(self.orders))),
                        )
                    time.sleep(0.002)
        except BaseException as error:  # surfaced by the test
            self.failure = error

    def __enter__(self) -> Writer:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join()
        assert self.failure is None, self.failure


class SlowObserver(QuietObserver):
    """Lets writes happen on the other nodes while a table is being copied."""

    def table_started(self, name: str, number: int, count: int, estimated_rows: int) -> None:
        time.sleep(0.3)


def assert_totals(cluster: Cluster, names: list[str], balance: int, stock: int) -> None:
    for name in names:
        assert cluster.value(name, "SELECT sum(balance) FROM accounts") == 4000 + balance
        assert cluster.value(name, "SELECT sum(operations) FROM accounts") == balance
        assert cluster.value(name, "SELECT sum(quantity) FROM stock") == 20_000 + stock


def test_join_under_concurrent_writes(system_cluster: Cluster) -> None:
    cluster = system_cluster
    two_node_shop(cluster)
    configure(cluster, ["north", "south", "east"])
    running = Agent(cluster.config, ["north", "south"], poll_seconds=0.2).start()
    try:
        with Writer(cluster, "north", 1) as north, Writer(cluster, "south", 2) as south:
            report = join(cluster.config, "east", observer=SlowObserver())
            time.sleep(0.5)
    finally:
        running.stop()
    assert report.donor == "north"
    assert sorted(report.created) == [
        "public.Order Items",
        "public.accounts",
        "public.orders",
        "public.stock",
    ]
    assert report.copied["public.orders"] >= 3000
    horizons = cluster.admin_value("east", "SELECT count(*) FROM pgconcord.copy_horizon")
    cluster.sync()
    # east writes too, and its changes reach the others.
    cluster.execute(
        "east", "UPDATE accounts SET balance = balance + 1, operations = operations + 1"
    )
    cluster.execute("east", "INSERT INTO orders (id, node, quantity) VALUES ('east-1', 'east', 1)")
    cluster.sync()
    cluster.assert_identical()
    expected = {f"n{g}" for g in range(1, 3001)} | north.orders | south.orders | {"east-1"}
    for name in cluster.names:
        assert {row[0] for row in cluster.query(name, "SELECT id FROM orders")} == expected
    # Counters: every increment counted exactly once everywhere (nothing lost or doubled).
    assert_totals(
        cluster,
        cluster.names,
        north.balance_added + south.balance_added + 40,
        north.stock_added + south.stock_added,
    )
    # The index and key came from the donor's definitions; serial keys got a free slot.
    assert cluster.value(
        "east", "SELECT count(*) FROM pg_indexes WHERE indexname = 'orders_by_node'"
    )
    slots = {
        cluster.admin_value(name, "SELECT key_slot FROM pgconcord.local_node")
        for name in cluster.names
    }
    assert len(slots) == 3
    assert not [r for r in cluster.conflicts() if r["kind"] == "parked"]
    # Once east's positions had passed the copy's horizons, the purge forgot them.
    assert horizons == 4 * 2
    assert cluster.admin_value("east", "SELECT count(*) FROM pgconcord.copy_horizon") == 0


class Interrupt(Exception):
    pass


class InterruptSecondTable(QuietObserver):
    def table_started(self, name: str, number: int, count: int, estimated_rows: int) -> None:
        self.table = name

    def rows_copied(self, rows: int) -> None:
        if self.table == "public.orders":
            raise Interrupt


def test_interrupted_join_is_resumed(cluster: Cluster) -> None:
    two_node_shop(cluster)
    configure(cluster, ["north", "south", "east"])
    with pytest.raises(Interrupt):
        join(cluster.config, "east", observer=InterruptSecondTable())
    # Tables are copied in name order: "Order Items" and accounts are in, orders is not.
    copied = cluster.admin_query("east", "SELECT table_name FROM pgconcord.join_table ORDER BY 1")
    assert copied == [("Order Items",), ("accounts",)]
    assert cluster.value("east", "SELECT count(*) FROM orders") == 0
    # While east waits, both copied and not yet copied tables change on both nodes.
    for name in ("north", "south"):
        cluster.execute(
            name, "UPDATE accounts SET balance = balance + 1, operations = operations + 1"
        )
        cluster.execute(name, "UPDATE stock SET quantity = quantity + 5")
        cluster.execute(name, f"UPDATE orders SET note = 'by {name}' WHERE id = 'n7'")
    cluster.pull("south", "north")  # north's copy of stock now holds south's increments
    # A purge on the way keeps what east still needs.
    assert agent.purge(cluster.config, cluster.config.node_by_name("north")) == 0
    report = join(cluster.config, "east")
    assert sorted(report.kept) == ["public.Order Items", "public.accounts"]
    assert sorted(report.copied) == ["public.orders", "public.stock"]
    cluster.sync()
    cluster.assert_identical()
    assert_totals(cluster, cluster.names, 80, 200)
    assert cluster.admin_value("east", "SELECT count(*) FROM pgconcord.join_table") == 0


def test_part_a_reachable_node_then_write(system_cluster: Cluster) -> None:
    cluster = system_cluster
    for name in cluster.names:
        cluster.execute(name, SCHEMA)
    configure(cluster, cluster.names)
    cluster.setup()
    cluster.execute("east", "INSERT INTO stock VALUES ('from east', 1)")
    cluster.pull("east", "north")  # south has not got it yet: part hands it over
    result = cluster.cli("part", "east")
    assert result.returncode == 0, result.stderr
    assert "east parted" in result.stdout
    for name in ("north", "south"):
        assert cluster.value(name, "SELECT quantity FROM stock WHERE item = 'from east'") == 1
        assert (
            cluster.admin_value(
                name, "SELECT count(*) FROM pgconcord.position WHERE origin = 'east'"
            )
            == 0
        )
    # east no longer captures anything.
    cluster.execute("east", "INSERT INTO stock VALUES ('after part', 1)")
    assert cluster.logged_changes("east") == 0
    # A config that still lists east gets one clear line, whatever the command.
    result = cluster.cli("setup")
    assert result.returncode != 0
    assert result.stderr.count("\n") == 1 and "east was parted" in result.stderr, result.stderr
    assert any(
        "was parted" in p
        for p in purge_node(cluster.config, cluster.config.node_by_name("north")).problems
    )
    configure(cluster, ["north", "south"])
    cluster.execute("north", "INSERT INTO stock VALUES ('north after', 2)")
    cluster.execute("south", "UPDATE stock SET quantity = quantity + 1 WHERE item = 'from east'")
    cluster.sync()
    cluster.assert_identical()
    assert cluster.value("north", "SELECT quantity FROM stock WHERE item = 'from east'") == 2


def test_part_a_node_gone_for_good(system_cluster: Cluster) -> None:
    cluster = system_cluster
    for name in cluster.names:
        cluster.execute(name, SCHEMA)
    configure(cluster, cluster.names)
    cluster.setup()
    cluster.execute("north", "INSERT INTO stock VALUES ('a', 1)")
    cluster.sync()
    # east's machine burned: its address leads nowhere.
    configure(cluster, cluster.names, east="host=127.0.0.1 port=9 dbname=gone connect_timeout=2")
    result = cluster.cli("part", "east")
    assert result.returncode == 0, result.stderr
    assert "east was not reachable" in result.stderr
    # Parting it again is harmless; so is doing it once the config no longer lists it.
    configure(cluster, ["north", "south"])
    result = cluster.cli("part", "east")
    assert result.returncode == 0 and "already parted" in result.stdout, result.stderr
    report = purge_node(cluster.config, cluster.config.node_by_name("north"))
    assert report.kept_for is None and not report.problems
    cluster.execute("south", "UPDATE stock SET quantity = 3")
    cluster.sync()
    cluster.assert_identical()
    result = cluster.cli("part", "nobody")
    assert result.returncode != 0 and result.stderr.count("\n") == 1, result.stderr


def status_json(cluster: Cluster) -> dict[str, Any]:
    result = cluster.cli("status", "--json")
    value: dict[str, Any] = json.loads(result.stdout)
    return value


def test_purge_keeps_only_what_some_member_needs(system_cluster: Cluster) -> None:
    cluster = system_cluster
    for name in cluster.names:
        cluster.execute(name, SCHEMA)
    configure(cluster, cluster.names)
    cluster.setup()
    north = cluster.config.node_by_name("north")
    with cluster.connect("north") as connection:
        for number in range(100):
            connection.execute("INSERT INTO stock VALUES (%s, 1)", (f"s{number}",))
    cluster.pull("north", "south")
    assert agent.purge(cluster.config, north) == 0  # east has not applied them
    pairs = {(p["origin"], p["target"]): p for p in status_json(cluster)["pairs"]}
    assert pairs[("north", "east")]["pending_changes"] == 100
    assert pairs[("north", "east")]["pending_bytes"] > 0
    assert pairs[("north", "south")]["pending_changes"] == 0
    cluster.pull("north", "east")
    with cluster.connect("north") as connection:
        for number in range(10):
            connection.execute("INSERT INTO stock VALUES (%s, 1)", (f"late{number}",))
    cluster.pull("north", "south")
    assert agent.purge(cluster.config, north) == 100  # the 10 that east lacks stay
    assert cluster.admin_value("north", "SELECT count(*) FROM pgconcord.change_log") == 10
    cluster.pull("north", "east")
    assert agent.purge(cluster.config, north) == 10
    cluster.sync()
    cluster.assert_identical()


def test_eviction_of_an_offline_node_and_its_return(system_cluster: Cluster) -> None:
    cluster = system_cluster
    for name in cluster.names:
        cluster.execute(name, SCHEMA)
    limit = '[replication]\nevict_after = "2s"\n'
    configure(cluster, cluster.names, COUNTERS + limit)
    cluster.setup()
    cluster.execute("north", "INSERT INTO stock VALUES ('a', 1)")
    cluster.sync()
    # east goes offline; north and south go on.
    real_east = cluster.dsns["east"]
    configure(
        cluster,
        cluster.names,
        COUNTERS + limit,
        east="host=127.0.0.1 port=9 dbname=gone connect_timeout=1",
    )
    cluster.execute("east", "INSERT INTO stock VALUES ('written while away', 1)")
    north = cluster.config.node_by_name("north")
    with cluster.connect("north") as connection:
        for number in range(50):
            connection.execute("INSERT INTO stock VALUES (%s, 1)", (f"n{number}",))
    for origin, target in (("north", "south"), ("south", "north")):
        cluster.pull(origin, target)
    first = purge_node(cluster.config, north)
    assert first.evicted or first.kept_for == "east cannot be read"
    report = wait_for(
        lambda: (r := purge_node(cluster.config, north)).evicted and r,
        timeout=10,
        message="east evicted",
    )
    assert "EVICTED node east" in report.evicted[0]
    cluster.execute("north", "INSERT INTO stock VALUES ('after eviction', 1)")
    cluster.pull("north", "south")
    wait_for(lambda: agent.purge(cluster.config, north) > 0, timeout=10, message="purge")
    assert cluster.admin_value("north", "SELECT count(*) FROM pgconcord.change_log") <= 1
    status = status_json(cluster)
    assert not status["healthy"]
    assert any("east was evicted" in warning for warning in status["warnings"])
    # south learns it from north; east itself learns it once it is back.
    purge_node(cluster.config, cluster.config.node_by_name("south"))
    assert (
        cluster.admin_value("south", "SELECT state FROM pgconcord.member WHERE name = 'east'")
        == "evicted"
    )
    configure(cluster, cluster.names, COUNTERS + limit)
    assert cluster.dsns["east"] == real_east
    purge_node(cluster.config, cluster.config.node_by_name("east"))
    cluster.execute("north", "INSERT INTO stock VALUES ('after return', 1)")
    # Refused by the node, which is reachable: a stall naming the reason, not "unavailable".
    with pytest.raises(PgconcordError, match="east was evicted") as refused:
        cluster.pull("north", "east")
    assert not isinstance(refused.value, NodeUnavailable)
    with pytest.raises(PgconcordError, match="east was evicted"):
        cluster.pull("east", "north")
    # Joining again discards what east has and copies afresh.
    result = cluster.cli("join", "east")
    assert result.returncode == 0, result.stderr
    assert "discarded" in result.stderr and "east joined" in result.stdout
    cluster.sync()
    cluster.assert_identical()
    assert (
        cluster.value("east", "SELECT count(*) FROM stock WHERE item = 'written while away'") == 0
    )
    assert cluster.value("east", "SELECT count(*) FROM stock") == 53
    assert status_json(cluster)["healthy"]


def test_join_refusals_are_one_line(system_cluster: Cluster) -> None:
    cluster = system_cluster
    for name in ("north", "south"):
        cluster.execute(name, SCHEMA)
    configure(cluster, ["north", "south"])
    cluster.setup()
    configure(cluster, ["north", "south", "east"])
    cluster.execute("east", "CREATE TABLE stock (item text PRIMARY KEY, quantity bigint NOT NULL)")
    cluster.execute("east", "INSERT INTO stock VALUES ('mine', 1)")
    for arguments, expected in (
        (["join", "west"], "unknown node 'west'"),
        (["join", "north"], "north is already an active member"),
        (["join", "east", "--from", "east"], "cannot copy from itself"),
        (["join", "east"], "already holds rows"),
    ):
        result = cluster.cli(*arguments)
        assert result.returncode != 0, arguments
        assert result.stderr.count("\n") == 1 and expected in result.stderr, result.stderr
