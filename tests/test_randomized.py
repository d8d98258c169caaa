"""Randomized sequences of writes on random nodes and syncs of random pairs: after a final
sync, verify finds every node identical, and every row nobody else touched is present."""

from __future__ import annotations

from typing import Any

import pytest
from harness import Cluster
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

NODES = ("north", "south", "east")
KEYS = st.integers(min_value=1, max_value=12)

write = st.one_of(
    st.tuples(st.just("upsert"), st.sampled_from(NODES), KEYS, st.integers(0, 1000)),
    st.tuples(st.just("delete"), st.sampled_from(NODES), KEYS, st.just(0)),
    st.tuples(st.just("move"), st.sampled_from(NODES), KEYS, KEYS),
)
pair_sync = st.tuples(st.just("pull"), st.sampled_from(NODES), st.sampled_from(NODES), st.just(0))
steps = st.lists(st.one_of(write, write, pair_sync), min_size=1, max_size=30)


@pytest.fixture
def empty_cluster(system_cluster: Cluster) -> Cluster:
    return system_cluster


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(schedule=steps)
@pytest.mark.slow
def test_random_writes_and_partial_syncs_converge(
    empty_cluster: Cluster, schedule: list[Any]
) -> None:
    cluster = empty_cluster
    table = f"t{abs(hash(tuple(schedule))) % 10**8}"
    for name in cluster.names:
        cluster.execute(name, f"CREATE TABLE {table} (id int PRIMARY KEY, value int, private text)")
    cluster.setup()
    private_rows: dict[str, int] = {}
    for number, (kind, node, first, second) in enumerate(schedule):
        if kind == "upsert":
            cluster.execute(
                node,
                f"INSERT INTO {table} VALUES (%s, %s, NULL) ON CONFLICT (id)"
                " DO UPDATE SET value = excluded.value",
                (first, second),
            )
        elif kind == "delete":
            cluster.execute(node, f"DELETE FROM {table} WHERE id = %s", (first,))
        elif kind == "move":
            cluster.execute(
                node,
                f"UPDATE {table} SET id = %s WHERE id = %s AND NOT EXISTS"
                f" (SELECT 1 FROM {table} WHERE id = %s)",
                (second + 100, first, second + 100),
            )
        elif node != first:
            cluster.pull(node, first)
        # A row only one node ever writes must survive whatever else happens.
        key = 1000 + number
        cluster.execute(node, f"INSERT INTO {table} VALUES (%s, 0, %s)", (key, node))
        private_rows[str(key)] = 0
    cluster.sync()
    cluster.assert_identical()
    for name in cluster.names:
        present = {
            str(row[0])
            for row in cluster.query(name, f"SELECT id FROM {table} WHERE private IS NOT NULL")
        }
        assert present == set(private_rows)
