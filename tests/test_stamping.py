"""The stamper (stamp_captured.sql) stamps row by row, each row's changes in capture order from
its version read once, and writes in batches. It must give every change the version the
capture trigger once gave it inside the writer's transaction, which tests/stamp_one_by_one.sql
does (one row-version upsert per change): the same captured changes over the same row
versions, stamped both ways, leave the same change log and the same row versions behind,
whatever the mix of inserts, updates, deletes, repeated keys, tombstones and clocks that lag
or lead."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from harness import Cluster, wait_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pgconcord.agent import Agent
from pgconcord.agent.housekeeping import CAPTURED_TRUNCATE_PAGES
from pgconcord.apply import Puller
from pgconcord.catalog import STAMP_LOCK

KEYS = st.integers(min_value=1, max_value=5)
CLOCK = st.integers(min_value=-5, max_value=5)  # how far a write's wall clock strays
COLUMNS = st.lists(st.sampled_from(["a", "b"]), unique=True)

change = st.one_of(
    st.tuples(st.just("I"), KEYS, st.none(), CLOCK),
    st.tuples(st.just("D"), KEYS, st.none(), CLOCK),
    st.tuples(st.just("U"), KEYS, COLUMNS, CLOCK),  # an update of the same key
    st.tuples(st.just("U"), KEYS, st.none(), CLOCK),  # the new key of a moved row
    st.tuples(st.just("K"), KEYS, st.none(), CLOCK),  # a row of the keyless table
)
# A row's version before the changes: none, live (with or without column stamps), a tombstone.
state = st.tuples(KEYS, st.sampled_from(["live", "stamped", "deleted"]), CLOCK)
schedules = st.tuples(
    st.lists(state, max_size=4, unique_by=lambda s: s[0]),
    st.lists(st.lists(change, min_size=1, max_size=6), min_size=1, max_size=4),
)

BASE_CLOCK = 1_000_000_000_000
OUTCOME = {
    "change_log": "SELECT id, transaction_id::text, table_id, operation, row_key, clock,"
    " previous_clock, previous_origin, new_row, old_values, order_key, generation_clock,"
    " generation_origin, column_versions FROM pgconcord.change_log ORDER BY id",
    "row_version": "SELECT table_id, row_key, clock, origin, deleted, previous_clock,"
    " previous_origin, order_key, column_versions, last_clock, last_origin"
    " FROM pgconcord.row_version ORDER BY table_id, row_key",
}


@pytest.fixture
def one_node(system_cluster: Cluster) -> Cluster:
    cluster = system_cluster
    for name in cluster.names:
        cluster.execute(name, "CREATE TABLE items (id int PRIMARY KEY, a text, b text)")
        cluster.execute(name, "CREATE TABLE lines (note text)")
    cluster.setup()
    return cluster


def _table_ids(cluster: Cluster, node: str) -> dict[str, int]:
    return {
        str(name): int(table_id)
        for name, table_id in cluster.admin_query(
            node, "SELECT table_name, id FROM pgconcord.replicated_table"
        )
    }


ONE_BY_ONE = (Path(__file__).parent / "stamp_one_by_one.sql").read_text()
WAYS = {
    "one by one": "SELECT pg_temp.stamp_one_by_one()",
    "row by row": "SELECT pgconcord.stamp_captured(true)",
}


def _stamp_each_way(cluster: Cluster, schedule: Any) -> dict[str, dict[str, Any]]:
    node = cluster.names[0]
    ids = _table_ids(cluster, node)
    states, transactions = schedule
    outcomes: dict[str, dict[str, Any]] = {}
    for way, stamp in WAYS.items():
        with cluster.admin_connect(node) as connection:
            connection.execute(ONE_BY_ONE)
            for table in ("change_log", "row_version", "captured_change"):
                connection.execute(f"DELETE FROM pgconcord.{table}")
            for key, kind, skew in states:
                connection.execute(
                    "INSERT INTO pgconcord.row_version (table_id, row_key, clock, origin,"
                    " deleted, column_versions, last_clock, last_origin)"
                    " VALUES (%s, jsonb_build_object('id', %s), %s, 'other', %s, %s, %s, %s)",
                    (
                        ids["items"],
                        key,
                        BASE_CLOCK + 10 * skew,
                        kind == "deleted",
                        '{"a": "00000000000000ffother"}' if kind == "stamped" else None,
                        BASE_CLOCK + 10 * skew + 3 if kind == "stamped" else None,
                        "other" if kind == "stamped" else None,
                    ),
                )
            connection.commit()
            number = 0
            for changes in transactions:
                for operation, key, columns, skew in changes:
                    number += 1
                    keyless = operation == "K"
                    connection.execute(
                        "INSERT INTO pgconcord.captured_change (table_id, operation, row_key,"
                        " new_row, changed_columns, wall_clock) VALUES (%s, %s, %s, %s, %s, %s)",
                        (
                            ids["lines" if keyless else "items"],
                            "I" if keyless else operation,
                            None if keyless else f'{{"id": {key}}}',
                            None if operation == "D" else f'{{"id": {key}, "n": {number}}}',
                            columns,
                            BASE_CLOCK + number + skew,
                        ),
                    )
                connection.commit()
            stamped = connection.execute(stamp).fetchone()
            connection.commit()
            assert stamped == (number,)
            # Ids count from where the sequence stands: compare them from the first.
            first = connection.execute(
                "SELECT coalesce(min(id), 0) FROM pgconcord.change_log"
            ).fetchone()
            assert first is not None
            outcomes[way] = {
                name: [_relative(name, row, int(first[0])) for row in connection.execute(query)]
                for name, query in OUTCOME.items()
            }
            # The source transactions, by their order: the same grouping both ways.
            outcomes[way]["transactions"] = connection.execute(
                "SELECT array_agg(id - %s ORDER BY id) FROM pgconcord.change_log"
                " GROUP BY transaction_id ORDER BY min(id)",
                (int(first[0]),),
            ).fetchall()
    return outcomes


def _relative(name: str, row: tuple[Any, ...], first: int) -> tuple[Any, ...]:
    if name != "change_log":
        return tuple(row)
    return (row[0] - first, *row[2:])  # the transaction ids differ too


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(schedule=schedules)
def test_every_way_of_stamping_gives_the_versions_capture_gave(
    one_node: Cluster, schedule: Any
) -> None:
    outcomes = _stamp_each_way(one_node, schedule)
    assert outcomes["row by row"] == outcomes["one by one"]


def test_a_write_is_stamped_one_past_the_version_it_replaced(one_node: Cluster) -> None:
    """The hybrid clock survives deferred stamping: a node whose wall clock lags far behind
    still gives its edit of a row a clock past the version the row had."""
    cluster = one_node
    node = cluster.names[0]
    cluster.execute(node, "INSERT INTO items VALUES (1, 'x', 'y')")
    cluster.admin_value(node, "SELECT pgconcord.stamp_captured()")
    first = cluster.admin_value(node, "SELECT clock FROM pgconcord.row_version")
    cluster.admin_execute(node, "UPDATE pgconcord.local_node SET clock_offset_us = -60000000")
    cluster.execute(node, "UPDATE items SET a = 'z' WHERE id = 1")
    cluster.admin_value(node, "SELECT pgconcord.stamp_captured()")
    clock, previous = cluster.admin_query(
        node, "SELECT clock, previous_clock FROM pgconcord.change_log ORDER BY id DESC LIMIT 1"
    )[0]
    assert previous == first
    assert clock == first + 1


def test_a_local_row_not_stamped_yet_wins_a_unique_collision_it_should(cluster: Cluster) -> None:
    """south's later insert of the same e-mail is still captured, not stamped, when north's
    arrives: the collision is judged with south's version all the same (the later one wins
    everywhere)."""
    for name in cluster.names:
        cluster.execute(
            name, "CREATE TABLE users (id text PRIMARY KEY, email text UNIQUE, name text)"
        )
    cluster.setup()
    cluster.execute("north", "INSERT INTO users VALUES ('n1', 'ann@example.com', 'Ann N')")
    time.sleep(0.01)
    cluster.execute("south", "INSERT INTO users VALUES ('s1', 'ann@example.com', 'Ann S')")
    assert cluster.admin_value("south", "SELECT count(*) FROM pgconcord.captured_change") == 1
    cluster.pull("north", "south")
    cluster.sync()
    for name in cluster.names:
        assert cluster.query(name, "SELECT id, email FROM users") == [("s1", "ann@example.com")]


def test_a_row_written_here_all_the_time_does_not_stall_its_pair(
    system_cluster: Cluster,
) -> None:
    """A row the target writes every moment races with every apply of it; after the first
    race the pair locks the rows it applies, and the stream goes on."""
    cluster = system_cluster
    origin, target = cluster.names[0], cluster.names[1]
    for name in cluster.names:
        cluster.execute(name, "CREATE TABLE hot (id int PRIMARY KEY, value int, note text)")
    cluster.setup()
    cluster.execute(origin, "INSERT INTO hot SELECT g, 0, '' FROM generate_series(1, 20) g")
    cluster.pull(origin, target)
    stop = threading.Event()

    def write_hot_row() -> None:
        with cluster.connect(target) as connection:
            number = 0
            while not stop.is_set():
                number += 1
                connection.execute("UPDATE hot SET note = %s WHERE id = 1", (str(number),))
                time.sleep(0.002)

    writer = threading.Thread(target=write_hot_row)
    writer.start()
    try:
        for round_number in range(1, 11):
            cluster.execute(origin, "UPDATE hot SET value = %s", (round_number,))
            cluster.pull(origin, target)
            assert cluster.query(target, "SELECT min(value) FROM hot") == [(round_number,)]
    finally:
        stop.set()
        writer.join()
    cluster.sync()
    rows = {name: cluster.query(name, "SELECT * FROM hot ORDER BY id") for name in cluster.names}
    assert rows[origin] == rows[target]
    assert rows[origin][0][1] == 10


def test_a_poll_with_nothing_to_stamp_takes_no_transaction_id(one_node: Cluster) -> None:
    """Agents watch each origin's snapshot for transactions that ended: a poll that took a
    transaction id every time would wake them for ever."""
    node = one_node.names[0]
    assert one_node.admin_query(
        node, "SELECT pgconcord.stamp_captured(false), pg_current_xact_id_if_assigned()"
    ) == [(0, None)]


def test_the_agent_gives_back_the_pages_a_big_transaction_left_to_stamp(
    system_cluster: Cluster,
) -> None:
    """Every stamp reads all of captured_change, several times a second even on an idle node:
    the pages a big transaction filled must not stay behind once it is stamped."""
    cluster = system_cluster
    origin = cluster.names[0]
    for name in cluster.names:
        cluster.execute(name, "CREATE TABLE big (id int PRIMARY KEY, note text)")
    cluster.setup()
    cluster.execute(
        origin, "INSERT INTO big SELECT g, repeat('x', 200) FROM generate_series(1, 60000) g"
    )
    pages = (
        "SELECT pg_relation_size('pgconcord.captured_change')"
        " / current_setting('block_size')::bigint"
    )
    assert cluster.admin_value(origin, pages) >= CAPTURED_TRUNCATE_PAGES
    running = Agent(cluster.config, poll_seconds=0.2).start()
    try:
        for name in cluster.names:
            wait_for(
                lambda name=name: cluster.query(name, "SELECT count(*) FROM big") == [(60000,)],
                timeout=90,
                message=f"the rows on {name}",
            )
        wait_for(
            lambda: cluster.admin_value(origin, pages) < CAPTURED_TRUNCATE_PAGES,
            timeout=60,
            message="captured_change given back",
        )
    finally:
        running.stop()
    cluster.assert_identical()


def test_a_pair_applies_what_is_stamped_while_another_session_stamps(
    system_cluster: Cluster,
) -> None:
    """The agent's pairs take the window their first look finds (Puller settled=False): they
    do not wait for a stamp in progress (the origin's watch, an apply there), whose commit
    wakes them for the rest. sync still waits, and applies everything."""
    cluster = system_cluster
    origin, target = cluster.names[0], cluster.names[1]
    for name in cluster.names:
        cluster.execute(name, "CREATE TABLE items (id int PRIMARY KEY, note text)")
    cluster.setup()
    config = cluster.config
    puller = Puller(config.node_by_name(origin), config.node_by_name(target), settled=False)
    try:
        cluster.execute(origin, "INSERT INTO items VALUES (0, 'first')")
        puller.pull()  # the position and the plans
        cluster.execute(
            origin, "INSERT INTO items SELECT g, 'stamped' FROM generate_series(1, 5) g"
        )
        cluster.admin_execute(origin, "SELECT pgconcord.stamp_captured()")
        cluster.execute(origin, "INSERT INTO items VALUES (6, 'captured')")
        with cluster.admin_connect(origin) as stamper:
            stamper.execute(f"SELECT pg_advisory_xact_lock({STAMP_LOCK})")  # stamping on
            pulled = threading.Thread(target=lambda: puller.pull(until_current=True))
            pulled.start()
            pulled.join(timeout=20)
            assert not pulled.is_alive(), "the pull waited for the other stamper"
            assert cluster.query(target, "SELECT max(id) FROM items") == [(5,)]
            stamper.rollback()
        puller.pull(until_current=True)
        assert cluster.query(target, "SELECT max(id) FROM items") == [(6,)]
    finally:
        puller.close()
    cluster.sync()
    cluster.assert_identical()


def test_a_settled_pull_applies_what_another_session_stamps_while_it_looks(
    system_cluster: Cluster,
) -> None:
    """sync and part (settled) wait for a stamp in progress at the origin (an apply there,
    the agent's watch) and apply what it stamped: a look's snapshot, taken before it waits,
    would not see it."""
    cluster = system_cluster
    origin, target = cluster.names[0], cluster.names[1]
    for name in cluster.names:
        cluster.execute(name, "CREATE TABLE items (id int PRIMARY KEY, note text)")
    cluster.setup()
    config = cluster.config
    puller = Puller(config.node_by_name(origin), config.node_by_name(target))
    try:
        cluster.execute(origin, "INSERT INTO items VALUES (0, 'first')")
        puller.pull()  # the position and the plans
        cluster.execute(origin, "INSERT INTO items VALUES (1, 'stamped meanwhile')")
        with cluster.admin_connect(origin, autocommit=False) as stamper:
            stamper.execute("SELECT pgconcord.stamp_captured()")  # holds the stamp lock
            pulled = threading.Thread(target=lambda: puller.pull(until_current=True))
            pulled.start()
            wait_for(
                lambda: (
                    cluster.admin_value(
                        origin,
                        "SELECT count(*) FROM pg_stat_activity"
                        " WHERE application_name = 'pgconcord' AND wait_event = 'advisory'",
                    )
                    == 1
                ),
                message="the pull waits for the other stamper",
            )
            stamper.commit()
            pulled.join(timeout=30)
            assert not pulled.is_alive()
        assert cluster.query(target, "SELECT id FROM items ORDER BY id") == [(0,), (1,)]
    finally:
        puller.close()
