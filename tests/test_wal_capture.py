"""Capture from the WAL (capture = "wal"): the same changes, conflicts and versions as with
triggers, no echo of what was applied, and a node moved between the modes loses and doubles
nothing."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from harness import AGENT_ROLE, Cluster, wait_for

from pgconcord.capture import wal as wal_capture

CAPTURE_MODES = ("wal",)

SCHEMA = """
CREATE TABLE items (id integer PRIMARY KEY, name text, stock integer NOT NULL DEFAULT 0,
                    tags text[], doc jsonb, big text);
CREATE TABLE events (happened timestamptz NOT NULL DEFAULT now(), what text);
"""


def items(cluster: Cluster, name: str) -> list[tuple[object, ...]]:
    return cluster.query(name, "SELECT id, name, stock, tags, doc, big FROM items ORDER BY id")


@pytest.mark.slow
def test_changes_replicate_without_triggers_and_do_not_echo(cluster: Cluster) -> None:
    for name in cluster.names:
        cluster.execute(name, SCHEMA)
    cluster.setup()
    assert (
        cluster.value("north", "SELECT count(*) FROM pg_trigger WHERE tgname = 'pgconcord_capture'")
        == 0
    )
    cluster.execute(
        "north",
        "INSERT INTO items VALUES (1, 'a \"quoted\" \\\\ name', 5, '{x,\"y z\"}',"
        " '{\"k\": [1, 2]}', repeat('long', 5000)), (2, NULL, 0, NULL, NULL, NULL)",
    )
    cluster.execute("south", "INSERT INTO events (what) VALUES ('opened')")
    cluster.sync()
    cluster.assert_identical()
    cluster.execute("north", "UPDATE items SET name = 'b' WHERE id = 1")  # big stays toasted
    cluster.execute("east", "UPDATE items SET id = 3 WHERE id = 2")  # the key moves
    cluster.execute("south", "DELETE FROM items WHERE id = 1")
    cluster.sync()
    cluster.sync()
    cluster.assert_identical()
    assert items(cluster, "west" if "west" in cluster.names else "east") == [
        (3, None, 0, None, None, None)
    ]
    logged = {name: cluster.logged_changes(name) for name in cluster.names}
    cluster.sync()
    # Nothing applied came back as a local change (replication origins).
    assert {name: cluster.logged_changes(name) for name in cluster.names} == logged
    assert cluster.cli("status").returncode == 0
    assert "wal" in cluster.cli("status").stdout


@pytest.mark.slow
def test_a_conflict_is_resolved_alike_and_recorded(cluster: Cluster) -> None:
    for name in cluster.names:
        cluster.execute(name, SCHEMA)
    cluster.setup()
    cluster.execute("north", "INSERT INTO items (id, name) VALUES (1, 'first')")
    cluster.sync()
    cluster.execute("north", "UPDATE items SET name = 'north' WHERE id = 1")
    cluster.execute("south", "UPDATE items SET name = 'south' WHERE id = 1")
    cluster.sync()
    cluster.sync()
    cluster.assert_identical()
    assert cluster.conflicts()


def test_a_change_refused_here_is_parked_and_the_rest_of_its_piece_applied(
    cluster: Cluster,
) -> None:
    """The change-by-change way into a node in WAL mode: the piece's rows are locked and
    stamped once, not once per change (each stamp there waits for the node's WAL to be read),
    and what it applies is judged like any other apply."""
    north, south = cluster.names[0], cluster.names[1]
    for name in cluster.names:
        cluster.execute(name, SCHEMA)
    cluster.execute(south, "ALTER TABLE items ADD CONSTRAINT small CHECK (stock < 1000)")
    cluster.setup()
    cluster.execute(south, "INSERT INTO items (id, name) VALUES (7, 'south')")
    cluster.execute(
        north,
        "DO $$ BEGIN FOR i IN 1..200 LOOP"
        " INSERT INTO items (id, name, stock) VALUES (i, 'north', CASE WHEN i = 100 THEN 5000"
        " ELSE i END); COMMIT; END LOOP; END $$",
    )
    cluster.pull(north, south)
    assert cluster.admin_value(south, "SELECT count(*) FROM pgconcord.parked_change") == 1
    assert cluster.value(south, "SELECT count(*) FROM items") == 199
    cluster.pull(south, north)
    assert cluster.query(north, "SELECT name FROM items WHERE id = 7") == cluster.query(
        south, "SELECT name FROM items WHERE id = 7"
    )


@pytest.mark.parametrize("streaming", [False, True], ids=["no agent", "agent streaming"])
@pytest.mark.slow
def test_setup_moves_a_node_between_modes_while_it_is_written(
    cluster: Cluster, tmp_path: Path, streaming: bool
) -> None:
    """Trigger -> WAL -> trigger on north while a writer inserts: every row arrives once,
    also while an agent streams the slot that setup drops (it waits for the stream)."""
    for name in cluster.names:
        cluster.execute(name, SCHEMA)
    cluster.capture = "trigger"
    cluster.write_config()
    cluster.setup()
    agent = None
    if streaming:
        with (tmp_path / "agent.log").open("ab") as log_file:
            agent = subprocess.Popen(
                [sys.executable, "-m", "pgconcord", "--config", str(cluster.config_path), "run"],
                stdout=subprocess.DEVNULL,
                stderr=log_file,
            )
    stop = threading.Event()
    written: list[int] = []

    def writer() -> None:
        with cluster.connect("north") as connection:
            number = 0
            while not stop.is_set():
                number += 1
                connection.execute("INSERT INTO items (id, stock) VALUES (%s, 1)", (number,))
                written.append(number)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        wait_for(lambda: len(written) > 50)
        cluster.capture = "wal"
        cluster.write_config()
        cluster.setup()
        wait_for(lambda: len(written) > 150)
        assert wal_capture.slot_name(cluster.admin_connect("north")) is not None
        if streaming:
            streamed = (
                "SELECT r.active FROM pgconcord.capture_state s"
                " JOIN pg_replication_slots r ON r.slot_name = s.slot_name"
            )
            wait_for(lambda: cluster.admin_query("north", streamed) == [(True,)])
            wait_for(lambda: len(written) > 250)
        cluster.capture = "trigger"
        cluster.write_config()
        cluster.setup()
        wait_for(lambda: len(written) > 400)
    finally:
        stop.set()
        thread.join()
        if agent is not None:
            agent.send_signal(signal.SIGTERM)
            agent.wait(timeout=30)
    cluster.sync()
    cluster.assert_identical()
    assert cluster.value("south", "SELECT count(*) FROM items") == len(written)
    # Each row was captured once: by its trigger or from the WAL, never both.
    assert cluster.applied_changes("south", "north") == len(written)


def test_an_agent_killed_mid_stream_loses_and_doubles_nothing(cluster: Cluster) -> None:
    for name in cluster.names:
        cluster.execute(name, SCHEMA)
    cluster.setup()
    agent = subprocess.Popen(
        [sys.executable, "-m", "pgconcord", "--config", str(cluster.config_path), "run"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for batch in range(20):
            cluster.execute(
                "north",
                "INSERT INTO items (id, stock)"
                " SELECT g, 1 FROM generate_series(%s::int, %s::int) g",
                (batch * 500 + 1, batch * 500 + 500),
            )
            if batch == 10:
                agent.send_signal(signal.SIGKILL)
                agent.wait()
                agent = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "pgconcord",
                        "--config",
                        str(cluster.config_path),
                        "run",
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
        wait_for(
            lambda: all(
                cluster.value(name, "SELECT count(*) FROM items") == 10_000
                for name in cluster.names
            ),
            timeout=120,
        )
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=30)
    cluster.assert_identical()
    assert cluster.applied_changes("south", "north") == 10_000


@pytest.mark.slow
def test_the_agent_streams_its_slot_and_keeps_it_moving(cluster: Cluster, tmp_path: Path) -> None:
    """A running agent reads its nodes' slots through the replication protocol: rows arrive
    once, a transaction bigger than one batch whole, the slots move on while nothing is
    captured, and a sync beside the agent waits for the stream instead of fighting it."""
    for name in cluster.names:
        cluster.execute(name, SCHEMA)
    cluster.setup()
    log_path = tmp_path / "agent.log"
    with log_path.open("ab") as log_file:
        agent = subprocess.Popen(
            [sys.executable, "-m", "pgconcord", "--config", str(cluster.config_path), "run"],
            stdout=subprocess.DEVNULL,
            stderr=log_file,
        )
    slots = (
        "SELECT bool_and(r.active) FROM pgconcord.capture_state s"
        " JOIN pg_replication_slots r ON r.slot_name = s.slot_name"
    )
    try:
        wait_for(lambda: all(cluster.admin_query(n, slots) == [(True,)] for n in cluster.names))
        for number in range(1, 201):
            cluster.execute("north", "INSERT INTO items (id, stock) VALUES (%s, 1)", (number,))
        # More rows than one batch holds (capture.stream.BATCH_ROWS), in one transaction.
        cluster.execute(
            "south",
            "INSERT INTO items (id, stock, big) SELECT g, 2, CASE WHEN g = 1001 THEN"
            " repeat('toasted', 3000) END FROM generate_series(1001, 26000) g",
        )
        cluster.execute("south", "UPDATE items SET name = 'moved', id = 27000 WHERE id = 26000")
        cluster.execute("north", "UPDATE items SET stock = stock + 1 WHERE id <= 100")
        cluster.execute("south", "UPDATE items SET name = 'big stays' WHERE id = 1001")
        expected = 200 + 25_000
        wait_for(
            lambda: all(
                cluster.value(name, "SELECT count(*) FROM items WHERE stock > 0") == expected
                for name in cluster.names
            ),
            timeout=120,
        )
        assert cluster.cli("sync").returncode == 0
        # What captures nothing (applied from peers, pgconcord's own) moves the slot on too.
        flushed = cluster.value("north", "SELECT pg_current_wal_flush_lsn()::text")
        wait_for(
            lambda: (
                cluster.admin_query(
                    "north",
                    "SELECT r.confirmed_flush_lsn >= %s::pg_lsn FROM pgconcord.capture_state s"
                    " JOIN pg_replication_slots r ON r.slot_name = s.slot_name",
                    (flushed,),
                )
                == [(True,)]
            )
        )
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=30)
    log = log_path.read_text()
    assert "Traceback" not in log and "streaming the WAL stopped" not in log, log
    cluster.assert_identical()
    assert cluster.applied_changes("east", "north") == 200 + 100
    assert cluster.applied_changes("east", "south") == 25_000 + 2 + 1
    assert cluster.value("east", "SELECT length(big) FROM items WHERE id = 1001") == 21_000


EQUIVALENCE_SCHEMA = """
CREATE TABLE goods (id integer PRIMARY KEY, "discount%" numeric(5,2), price float8, doc jsonb,
                    tags text[], seen timestamptz, stock integer NOT NULL DEFAULT 0,
                    total integer GENERATED ALWAYS AS (stock * 2) STORED);
CREATE TABLE notes (said text);
CREATE TABLE wide (id integer PRIMARY KEY, {columns});
""".format(columns=", ".join(f"f{number} float8" for number in range(1, 61)))

# Steps written alike on a trigger node and a WAL node; between steps the WAL node is drained,
# so that each change is read under the schema it was made with (WAL capture reads a row as
# its table is when it drains: a column dropped before then is gone from the logged row).
EQUIVALENCE_STEPS = [
    [
        "INSERT INTO goods VALUES (1, 12.5, 0.1, '{\"a\": 1.50}', '{x,\"y z\"}',"
        " '2026-01-01 10:00+02', 3), (2, NULL, 1e300, NULL, NULL, NULL, 0)",
        "UPDATE goods SET stock = stock + 2 WHERE id = 1",
        'UPDATE goods SET price = 0.3, doc = \'{"b": [1, 2]}\', "discount%" = 1 WHERE id = 1',
        "UPDATE goods SET id = 3 WHERE id = 2",
        "UPDATE goods SET price = price WHERE id = 3",
        "DELETE FROM goods WHERE id = 1",
        "INSERT INTO notes VALUES ('hello'), (NULL)",
        "INSERT INTO wide (id, f1, f60) VALUES (1, 1.5, 60.25)",
        "UPDATE wide SET f30 = 3, f60 = NULL WHERE id = 1",
        "BEGIN; INSERT INTO goods (id, stock) VALUES (4, 1);"
        " UPDATE goods SET stock = 5, price = 2 WHERE id = 4; COMMIT",
    ],
    [
        "ALTER TABLE goods ADD COLUMN colour text",
        "INSERT INTO goods (id, colour) VALUES (5, 'red')",
        "UPDATE goods SET colour = 'blue' WHERE id = 5",
    ],
    [
        "ALTER TABLE goods DROP COLUMN tags",
        "INSERT INTO goods (id) VALUES (6)",
        "UPDATE goods SET stock = 1 WHERE id = 3",
    ],
    [
        # The WAL's description of the table changes in the middle of one transaction.
        "BEGIN",
        "INSERT INTO goods (id, colour) VALUES (7, 'grey')",
        "ALTER TABLE goods ADD COLUMN size integer",
        "INSERT INTO goods (id, size) VALUES (8, 3)",
        "UPDATE goods SET size = 4, colour = 'white' WHERE id = 7",
        "COMMIT",
    ],
]


def captured_records(cluster: Cluster, name: str) -> list[tuple[object, ...]]:
    # pgoutput leaves generated columns out before PostgreSQL 18, so the WAL's logged row has
    # them NULL there: apply never writes them.
    return cluster.admin_query(
        name,
        "SELECT t.table_name, c.operation, c.row_key, c.new_row - 'total', c.old_values,"
        # A set: the generic trigger lists them in jsonb's order, a table's own by position.
        "       ARRAY(SELECT unnest(c.changed_columns) ORDER BY 1)"
        "  FROM pgconcord.captured_change c JOIN pgconcord.replicated_table t"
        "    ON t.id = c.table_id ORDER BY c.id",
    )


def test_both_modes_capture_the_same_records(cluster: Cluster) -> None:
    """A trigger node and a WAL node given the same writes capture the same change records."""
    trigger_node, wal_node = cluster.names[0], cluster.names[1]
    cluster.capture = "auto"
    cluster.dsns[trigger_node] = cluster.server_of[trigger_node].dsn(
        cluster.database, user=AGENT_ROLE
    )
    cluster.write_config('\n[conflict.table."public.goods"]\ndelta_columns = ["stock"]\n')
    for name in cluster.names:
        cluster.execute(name, EQUIVALENCE_SCHEMA)
    cluster.setup()
    assert wal_capture.slot_name(cluster.admin_connect(wal_node)) is not None
    assert wal_capture.slot_name(cluster.admin_connect(trigger_node)) is None
    for step in EQUIVALENCE_STEPS:
        for name in (trigger_node, wal_node):
            with cluster.connect(name) as connection:
                connection.execute("SET TimeZone = 'UTC'")
                for statement in step:
                    connection.execute(statement)
        cluster.admin_execute(wal_node, "SELECT pgconcord.drain_wal()")
    records = captured_records(cluster, trigger_node)
    assert len(records) == 21
    assert captured_records(cluster, wal_node) == records


def test_grant_prints_what_wal_capture_needs(cluster: Cluster) -> None:
    """A role with none of the rights: setup names them; run as `pgconcord grant` prints them,
    setup then captures from the WAL."""
    role = "pgconcord_wal_grantee"
    for name in cluster.names:
        cluster.execute(name, SCHEMA)
    cluster.use_weak_agent(role)
    refused = cluster.cli("setup")
    assert refused.returncode != 0
    assert "pgconcord grant" in refused.stderr and "Traceback" not in refused.stderr
    for name in cluster.names:
        printed = cluster.cli("grant", role, "--node", name)
        assert printed.returncode == 0, printed.stderr
        assert "REPLICATION" in printed.stdout
        assert "pg_replication_origin_session_setup" in printed.stdout
        cluster.admin_execute(name, printed.stdout)
    set_up = cluster.cli("setup")
    assert set_up.returncode == 0, set_up.stderr
    for name in cluster.names:
        assert wal_capture.slot_name(cluster.admin_connect(name)) is not None
    cluster.execute("north", "INSERT INTO items (id, name) VALUES (1, 'granted')")
    cluster.sync()
    cluster.assert_identical()
