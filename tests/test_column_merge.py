"""Column-level merge: concurrent updates of different columns of one row both survive on every
node; only the same column changed on two nodes is a conflict, decided by the later version."""

from __future__ import annotations

import time
from typing import Any

import pytest
from harness import Cluster
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

CONTACTS = "CREATE TABLE contacts (id int PRIMARY KEY, phone text, email text, city text)"


def contacts(cluster: Cluster, *rows: tuple[Any, ...]) -> None:
    for name in cluster.names:
        cluster.execute(name, CONTACTS)
    cluster.setup()
    for row in rows:
        cluster.execute("north", "INSERT INTO contacts VALUES (%s, %s, %s, %s)", row)
    cluster.sync()


def rows(cluster: Cluster, name: str) -> list[tuple[Any, ...]]:
    return cluster.query(name, "SELECT id, phone, email, city FROM contacts ORDER BY id")


def test_different_columns_changed_on_two_nodes_both_survive(cluster: Cluster) -> None:
    contacts(cluster, (1, "111", "a@x", "Oslo"))
    cluster.execute("north", "UPDATE contacts SET phone = '222' WHERE id = 1")
    time.sleep(0.01)
    cluster.execute("south", "UPDATE contacts SET email = 'b@x' WHERE id = 1")
    cluster.sync()
    for name in cluster.names:
        assert rows(cluster, name) == [(1, "222", "b@x", "Oslo")]
    # Nothing overlapped: nothing to record.
    assert cluster.conflicts() == []
    cluster.assert_identical()


def test_the_same_column_changed_on_two_nodes_is_a_conflict_the_later_wins(
    cluster: Cluster,
) -> None:
    contacts(cluster, (1, "111", "a@x", "Oslo"))
    cluster.execute("south", "UPDATE contacts SET city = 'Bergen', phone = '333' WHERE id = 1")
    time.sleep(0.01)
    cluster.execute("north", "UPDATE contacts SET city = 'Tromsø' WHERE id = 1")
    cluster.sync()
    for name in cluster.names:
        assert rows(cluster, name) == [(1, "333", "a@x", "Tromsø")]
    records = [r for r in cluster.conflicts() if r["type"] == "update_origin_differs"]
    assert records, "the overlap on city is recorded"
    assert {r["resolution"] for r in records} <= {"incoming", "local"}
    cluster.assert_identical()


def test_three_nodes_merge_whatever_the_order_of_arrival(cluster: Cluster) -> None:
    contacts(cluster, (1, "111", "a@x", "Oslo"), (2, "211", "c@x", "Oslo"))
    cluster.execute("north", "UPDATE contacts SET phone = 'n' WHERE id = 1")
    cluster.execute("south", "UPDATE contacts SET email = 's' WHERE id = 1")
    time.sleep(0.01)
    cluster.execute("east", "UPDATE contacts SET phone = 'e', city = 'e' WHERE id = 1")
    cluster.execute("east", "UPDATE contacts SET city = 'e2' WHERE id = 2")
    cluster.execute("south", "UPDATE contacts SET phone = 's2' WHERE id = 2")
    # Relayed knowledge: north sees south's change, then edits on top of it.
    cluster.pull("south", "north")
    cluster.execute("north", "UPDATE contacts SET email = 'n-after-s' WHERE id = 2")
    # Deliberately different orders on each node.
    cluster.pull("east", "south")
    cluster.pull("north", "south")
    cluster.pull("north", "east")
    cluster.pull("south", "east")
    cluster.pull("east", "north")
    for name in cluster.names:
        assert rows(cluster, name) == [
            (1, "e", "s", "e"),
            (2, "s2", "n-after-s", "e2"),
        ], name
    cluster.sync()
    cluster.assert_identical()


def test_rows_that_were_there_before_replication_merge_too(cluster: Cluster) -> None:
    for name in cluster.names:
        cluster.execute(name, CONTACTS)
        cluster.execute(name, "INSERT INTO contacts VALUES (1, '111', 'a@x', 'Oslo')")
    cluster.setup()
    cluster.execute("south", "UPDATE contacts SET email = 'b@x' WHERE id = 1")
    time.sleep(0.01)
    cluster.execute("north", "UPDATE contacts SET phone = '222' WHERE id = 1")
    cluster.sync()
    for name in cluster.names:
        assert rows(cluster, name) == [(1, "222", "b@x", "Oslo")]
    cluster.assert_identical()


def test_counters_and_ordinary_columns_of_one_row_merge(cluster: Cluster) -> None:
    for name in cluster.names:
        cluster.execute(
            name, "CREATE TABLE account (id int PRIMARY KEY, owner text, balance int NOT NULL)"
        )
    cluster.write_config('[conflict.table."public.account"]\ndelta_columns = ["balance"]\n')
    cluster.setup()
    cluster.execute("north", "INSERT INTO account VALUES (1, 'ann', 100)")
    cluster.sync()
    cluster.execute("north", "UPDATE account SET balance = balance + 5")
    cluster.execute("south", "UPDATE account SET owner = 'anne', balance = balance - 20")
    cluster.execute("east", "UPDATE account SET balance = balance + 1")
    cluster.sync()
    for name in cluster.names:
        assert cluster.query(name, "SELECT owner, balance FROM account") == [("anne", 86)]
    cluster.assert_identical()


def test_policies_that_rank_whole_rows_do_not_merge(cluster: Cluster) -> None:
    for name in cluster.names:
        cluster.execute(name, CONTACTS)
    cluster.write_config(
        '[conflict.table."public.contacts"]\npolicy = "node-priority"\npriority = ["south"]\n'
    )
    cluster.setup()
    cluster.execute("north", "INSERT INTO contacts VALUES (1, '111', 'a@x', 'Oslo')")
    cluster.sync()
    cluster.execute("south", "UPDATE contacts SET email = 'head office' WHERE id = 1")
    time.sleep(0.01)
    cluster.execute("north", "UPDATE contacts SET phone = 'branch' WHERE id = 1")
    cluster.sync()
    for name in cluster.names:
        assert rows(cluster, name) == [(1, "111", "head office", "Oslo")]
    cluster.assert_identical()


NODES = ("north", "south", "east")
COLUMNS = ("phone", "email", "city")
ROW_IDS = st.integers(1, 3)
column_write = st.tuples(
    st.just("update"), st.sampled_from(NODES), ROW_IDS, st.sampled_from(COLUMNS)
)
row_write = st.tuples(
    st.sampled_from(("delete", "insert")), st.sampled_from(NODES), ROW_IDS, st.just("")
)
pull = st.tuples(st.just("pull"), st.sampled_from(NODES), st.sampled_from(NODES), st.just(""))
schedules = st.lists(
    st.one_of(column_write, column_write, column_write, row_write, pull), min_size=1, max_size=25
)


@pytest.fixture
def merge_cluster(system_cluster: Cluster) -> Cluster:
    return system_cluster


@settings(
    max_examples=10,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(schedule=schedules)
@pytest.mark.slow
def test_random_column_writes_converge_and_keep_every_uncontested_write(
    merge_cluster: Cluster, schedule: list[tuple[str, str, Any, str]]
) -> None:
    cluster = merge_cluster
    table = f"c{abs(hash(tuple(schedule))) % 10**8}"
    for name in cluster.names:
        cluster.execute(
            name, f"CREATE TABLE {table} (id int PRIMARY KEY, phone text, email text, city text)"
        )
    cluster.setup()
    for row_id in (1, 2, 3):
        cluster.execute("north", f"INSERT INTO {table} VALUES ({row_id}, '-', '-', '-')")
    cluster.sync()
    writes: dict[tuple[int, str], list[str]] = {}
    rows_recreated: set[int] = set()
    for number, (kind, node, first, column) in enumerate(schedule):
        if kind == "update":
            value = f"{node}-{number}"
            cluster.execute(node, f"UPDATE {table} SET {column} = %s WHERE id = %s", (value, first))
            writes.setdefault((first, column), []).append(value)
        elif kind == "delete":
            cluster.execute(node, f"DELETE FROM {table} WHERE id = %s", (first,))
            rows_recreated.add(first)
        elif kind == "insert":
            cluster.execute(
                node,
                f"INSERT INTO {table} VALUES (%s, 'new', 'new', 'new') ON CONFLICT DO NOTHING",
                (first,),
            )
            rows_recreated.add(first)
        elif node != first:
            cluster.pull(node, first)
    cluster.sync()
    cluster.assert_identical()
    final = {row[0]: row for row in cluster.query("north", f"SELECT * FROM {table}")}
    # A column only one write ever touched, of a row nobody deleted or inserted, has that
    # write's value on every node: merging never loses an uncontested change.
    for (row_id, column), values in writes.items():
        if len(values) == 1 and row_id not in rows_recreated:
            assert final[row_id][1 + COLUMNS.index(column)] == values[0], (row_id, column)


def test_counters_of_rows_that_were_there_before_replication_add_up_everywhere(
    cluster: Cluster,
) -> None:
    for name in cluster.names:
        cluster.execute(
            name, "CREATE TABLE account (id int PRIMARY KEY, owner text, balance int NOT NULL)"
        )
        cluster.execute(name, "INSERT INTO account VALUES (1, 'ann', 100)")
    cluster.write_config('[conflict.table."public.account"]\ndelta_columns = ["balance"]\n')
    cluster.setup()
    cluster.execute("north", "UPDATE account SET balance = balance + 5")
    cluster.execute("south", "UPDATE account SET balance = balance - 20, owner = 'anne'")
    # east never wrote the row: both differences must still add up there.
    cluster.sync()
    for name in cluster.names:
        assert cluster.query(name, "SELECT owner, balance FROM account") == [("anne", 85)]
    cluster.assert_identical()
