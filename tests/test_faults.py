"""Replication under faults: the agent killed with SIGKILL, a node stopped, two processes at
once. Every scenario ends with verify finding identical nodes and exact change counts."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest
from harness import Cluster, wait_for

from pgconcord.agent import Agent

SCHEMA = """
CREATE TABLE events (id bigint PRIMARY KEY, origin text NOT NULL, payload text);
CREATE TABLE counters (id int PRIMARY KEY, value bigint NOT NULL);
"""


def start_agent_process(cluster: Cluster) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "pgconcord", "run", "--config", str(cluster.config_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


@pytest.mark.slow
def test_agent_killed_repeatedly_while_applying_a_large_backlog(system_cluster: Cluster) -> None:
    cluster = system_cluster
    for name in cluster.names:
        cluster.execute(name, SCHEMA)
    cluster.setup()
    # A backlog: many transactions on north, one big one on south.
    with cluster.connect("north") as connection:
        for batch in range(200):
            connection.execute(
                "INSERT INTO events SELECT g, 'north', repeat('x', 50)"
                " FROM generate_series(%s::int, %s::int) g",
                (batch * 500 + 1, batch * 500 + 500),
            )
    cluster.execute(
        "south",
        "INSERT INTO events SELECT g, 'south', 'y' FROM generate_series(1000001, 1060000) g",
    )
    captured = {name: cluster.logged_changes(name) for name in ("north", "south")}
    assert captured == {"north": 100_000, "south": 60_000}
    generator = random.Random(7)
    kills = 0
    for _ in range(5):
        process = start_agent_process(cluster)
        time.sleep(generator.uniform(0.8, 2.5))
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            kills += 1
        process.wait()
    assert kills == 5
    cluster.sync()
    for name in cluster.names:
        assert cluster.value(name, "SELECT count(*) FROM events") == 160_000
    # Exactly once: every captured change counted once by each target, never twice.
    for target in cluster.names:
        for origin, count in captured.items():
            if origin != target:
                assert cluster.applied_changes(target, origin) == count
    cluster.assert_identical()


def test_sync_names_a_stopped_node_and_succeeds_once_it_is_back(private_cluster: Cluster) -> None:
    cluster = private_cluster
    for name in cluster.names:
        cluster.execute(name, SCHEMA)
    cluster.setup()
    cluster.server_of["east"].stop()
    cluster.execute(
        "north", "INSERT INTO events SELECT g, 'north', NULL FROM generate_series(1, 100) g"
    )
    cluster.execute(
        "south", "INSERT INTO events SELECT g, 'south', NULL FROM generate_series(101, 150) g"
    )
    result = cluster.cli("sync")
    assert result.returncode != 0
    assert "east" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    # The reachable nodes were synced all the same.
    for name in ("north", "south"):
        assert cluster.value(name, "SELECT count(*) FROM events") == 150
    status = cluster.cli("status", "--json")
    assert status.returncode == 1 and '"reachable": false' in status.stdout
    cluster.server_of["east"].start()
    result = cluster.cli("sync")
    assert result.returncode == 0, result.stderr
    assert cluster.value("east", "SELECT count(*) FROM events") == 150
    cluster.assert_identical()


def test_agent_rides_out_a_node_restart_and_a_crash(private_cluster: Cluster) -> None:
    cluster = private_cluster
    for name in cluster.names:
        cluster.execute(name, SCHEMA)
    cluster.setup()
    running = Agent(cluster.config, poll_seconds=0.2).start()
    try:
        cluster.execute("north", "INSERT INTO events VALUES (1, 'north', NULL)")
        wait_for(lambda: cluster.value("south", "SELECT count(*) FROM events") == 1)
        cluster.server_of["south"].crash()
        cluster.execute("north", "INSERT INTO events VALUES (2, 'north', NULL)")
        cluster.execute("east", "INSERT INTO events VALUES (3, 'east', NULL)")
        wait_for(lambda: cluster.value("north", "SELECT count(*) FROM events") == 2)
        cluster.server_of["south"].start()
        cluster.execute("south", "INSERT INTO events VALUES (4, 'south', NULL)")
        for name in cluster.names:
            wait_for(
                lambda name=name: cluster.value(name, "SELECT count(*) FROM events") == 4,
                timeout=60,
                message=f"all events on {name}",
            )
    finally:
        running.stop()
    cluster.assert_identical()


@pytest.mark.slow
def test_an_agent_and_a_sync_at_once_neither_double_nor_lose(system_cluster: Cluster) -> None:
    cluster = system_cluster
    for name in cluster.names:
        cluster.execute(name, SCHEMA)
    cluster.execute("north", "INSERT INTO counters SELECT g, 0 FROM generate_series(1, 20) g")
    for name in ("south", "east"):
        cluster.execute(name, "INSERT INTO counters SELECT g, 0 FROM generate_series(1, 20) g")
    cluster.setup()
    agents = [start_agent_process(cluster), start_agent_process(cluster)]  # two by mistake
    stop = threading.Event()
    written = []

    def write() -> None:
        with cluster.connect("north") as connection:
            number = 0
            while not stop.is_set():
                number += 1
                with connection.transaction():
                    connection.execute("INSERT INTO events VALUES (%s, 'north', NULL)", (number,))
                    connection.execute(
                        "UPDATE counters SET value = value + 1 WHERE id = %s", (number % 20 + 1,)
                    )
                written.append(number)

    writer = threading.Thread(target=write)
    writer.start()
    try:
        for _ in range(3):
            result = cluster.cli("sync")
            assert result.returncode == 0, result.stderr
        stop.set()
        writer.join()
        result = cluster.cli("sync")
        assert result.returncode == 0, result.stderr
    finally:
        stop.set()
        for process in agents:
            process.send_signal(signal.SIGTERM)
        for process in agents:
            assert process.wait(timeout=30) == 0
    for name in cluster.names:
        assert cluster.value(name, "SELECT count(*) FROM events") == len(written)
        assert cluster.value(name, "SELECT sum(value) FROM counters") == len(written)
    # Each transaction captured two changes; each target counted each of them exactly once.
    for target in ("south", "east"):
        assert cluster.applied_changes(target, "north") == 2 * len(written)
    cluster.assert_identical()
