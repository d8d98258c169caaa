"""The user's own resolver (`resolver = "module:function"`): called with both versions in the
same order on every node, its row is kept everywhere, or the change is parked for a person."""

from __future__ import annotations

import time

import pytest
from harness import Cluster

from pgconcord.errors import ConfigError

ORDERS = "CREATE TABLE orders (id int PRIMARY KEY, quantity int, note text, tags text)"


def orders(cluster: Cluster, resolver: str) -> None:
    for name in cluster.names:
        cluster.execute(name, ORDERS)
    cluster.write_config(f'[conflict.table."public.orders"]\nresolver = "{resolver}"\n')
    cluster.setup()


def test_the_resolver_decides_an_insert_insert_conflict_the_same_everywhere(
    cluster: Cluster,
) -> None:
    orders(cluster, "example_resolvers:larger_quantity")
    cluster.execute("north", "INSERT INTO orders VALUES (1, 9, 'north', '')")
    time.sleep(0.01)
    cluster.execute("south", "INSERT INTO orders VALUES (1, 3, 'south', '')")
    cluster.sync()
    for name in cluster.names:
        assert cluster.query(name, "SELECT quantity, note FROM orders") == [(9, "north")]
    resolutions = {r["resolution"] for r in cluster.conflicts() if r["type"] == "insert_exists"}
    assert resolutions == {"resolver"}
    cluster.assert_identical()


def test_the_resolver_merges_an_update_update_conflict(cluster: Cluster) -> None:
    orders(cluster, "example_resolvers:union_of_tags")
    cluster.execute("north", "INSERT INTO orders VALUES (1, 1, '', 'a')")
    cluster.sync()
    cluster.execute("north", "UPDATE orders SET tags = 'a,north'")
    cluster.execute("south", "UPDATE orders SET tags = 'a,south', quantity = 2")
    cluster.sync()
    for name in cluster.names:
        assert cluster.query(name, "SELECT quantity, tags FROM orders") == [(2, "a,north,south")]
    cluster.assert_identical()


def test_a_resolver_that_parks_leaves_the_conflict_to_a_person(cluster: Cluster) -> None:
    orders(cluster, "example_resolvers:ask_a_person")
    cluster.execute("north", "INSERT INTO orders VALUES (1, 1, 'north', '')")
    cluster.execute("south", "INSERT INTO orders VALUES (1, 2, 'south', '')")
    cluster.execute("north", "INSERT INTO orders VALUES (2, 1, 'no conflict', '')")
    cluster.sync()
    parked = [r for r in cluster.conflicts() if r["kind"] == "parked"]
    # Every node that met both versions parked the other one and kept its own.
    assert {r["node"] for r in parked} == set(cluster.names)
    assert all("asked to park" in r["reason"] for r in parked)
    # The stream went on: the row without a conflict is everywhere.
    for name in cluster.names:
        assert cluster.value(name, "SELECT note FROM orders WHERE id = 2") == "no conflict"
    # The person decides for south's order: drops the parked changes and writes it anew.
    for record in parked:
        assert cluster.cli("conflicts", "discard", record["ref"]).returncode == 0
    cluster.execute(
        "north",
        "BEGIN; DELETE FROM orders WHERE id = 1;"
        " INSERT INTO orders VALUES (1, 2, 'south', ''); COMMIT",
    )
    cluster.sync()
    for name in cluster.names:
        assert cluster.value(name, "SELECT note FROM orders WHERE id = 1") == "south"
    cluster.assert_identical()


def test_setup_refuses_a_resolver_that_cannot_be_imported(cluster: Cluster) -> None:
    for name in cluster.names:
        cluster.execute(name, ORDERS)
    cluster.write_config('[conflict.table."public.orders"]\nresolver = "no_such_module:f"\n')
    with pytest.raises(ConfigError, match="cannot import no_such_module"):
        cluster.setup()
