"""Operating a cluster: the role's timeouts do not cut pgconcord's sessions short, only a lost
connection is "unavailable", `status` says what needs a person and exits non-zero, commands on
a node without setup say so in one line, and a running agent follows the config (SIGHUP), a
join, a part, and a node back from an outage within seconds."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from harness import Cluster, wait_for
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from pgconcord import install, transport
from pgconcord.agent import Agent
from pgconcord.errors import NodeUnavailable, PgconcordError

SCHEMA = "CREATE TABLE items (id int PRIMARY KEY, note text);"
# Objects only one node has: made there alone, as a superuser, so not replicated.
BY_HAND = "SET session_replication_role = replica; "


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def count(cluster: Cluster, node: str) -> int:
    return int(cluster.value(node, "SELECT count(*) FROM items"))


def configure(cluster: Cluster, names: list[str], extra: str = "") -> None:
    nodes = "".join(f'[[node]]\nname = "{n}"\ndsn = "{cluster.dsns[n]}"\n\n' for n in names)
    cluster.config_path.write_text(f'[cluster]\nname = "test"\n\n{nodes}{extra}')


class AgentProcess:
    """`pgconcord run` as a subprocess, its log in a file (a pipe nobody reads would fill)."""

    def __init__(self, cluster: Cluster, log: Path, *arguments: str) -> None:
        self.log = log
        with log.open("ab") as output:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "pgconcord",
                    "run",
                    *arguments,
                    "--config",
                    str(cluster.config_path),
                ],
                stdout=subprocess.DEVNULL,
                stderr=output,
            )

    def text(self) -> str:
        return self.log.read_text()

    def wait_for_line(self, words: str, timeout: float = 30.0) -> str:
        def found() -> str | None:
            assert self.process.poll() is None, f"the agent exited:\n{self.text()[-3000:]}"
            return next((line for line in self.text().splitlines() if words in line), None)

        line: str = wait_for(found, timeout=timeout, message=f"{words!r} in the agent's log")
        return line

    def signal(self, number: int) -> None:
        os.kill(self.process.pid, number)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise

    def __enter__(self) -> AgentProcess:
        return self

    def __exit__(self, *_: object) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


# -- sessions ------------------------------------------------------------------------------


def test_the_roles_timeouts_do_not_cut_pgconcord_short(
    system_cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    cluster = system_cluster
    for name in cluster.names:
        cluster.execute(name, SCHEMA)
    limits = {
        "statement_timeout": "1ms",
        "lock_timeout": "1ms",
        "idle_in_transaction_session_timeout": "1ms",
    }
    compiling = {"jit": "on", "jit_above_cost": "0"}
    if int(cluster.admin_value("north", "SHOW server_version_num")) >= 140000:
        limits["idle_session_timeout"] = "300ms"
    for name in cluster.names:
        role = conninfo_to_dict(cluster.dsns[name])["user"]
        for setting, value in (limits | compiling).items():
            cluster.admin_execute(
                name,
                sql.SQL("ALTER ROLE {} IN DATABASE {} SET {} = {}").format(
                    sql.Identifier(str(role)),
                    sql.Identifier(cluster.database),
                    sql.Identifier(setting),
                    sql.Literal(value),
                ),
            )
    # The limits are in force for the role's ordinary sessions, not for pgconcord's.
    with psycopg.connect(cluster.dsns["north"], autocommit=True) as plain:
        assert plain.execute("SHOW statement_timeout").fetchone() == ("1ms",)
    with transport.connect(cluster.config.node_by_name("north")) as ours:
        for setting in limits:
            assert ours.execute(sql.SQL("SHOW {}").format(sql.Identifier(setting))).fetchone() == (
                "0",
            )
        # A role that compiles every statement (jit_above_cost 0) does not make pgconcord's
        # stamps and applies pay hundreds of milliseconds each for it.
        assert ours.execute("SHOW jit").fetchone() == ("off",)
    cluster.setup()
    cluster.execute(
        "north", "INSERT INTO items SELECT g, repeat('x', 200) FROM generate_series(1, 5000) g"
    )
    result = cluster.cli("sync")
    assert result.returncode == 0, result.stderr
    assert [count(cluster, name) for name in cluster.names] == [5000, 5000, 5000]
    # An agent whose sessions sit idle between pulls, in and out of transactions.
    with caplog.at_level(logging.INFO):
        running = Agent(cluster.config, poll_seconds=0.2).start()
        try:
            time.sleep(1.0)
            cluster.execute("east", "INSERT INTO items VALUES (0, 'from east')")
            wait_for(lambda: count(cluster, "north") == 5001, timeout=10, message="east's row")
            wait_for(lambda: count(cluster, "south") == 5001, timeout=10, message="east's row")
        finally:
            running.stop()
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    cluster.assert_identical()


def test_a_session_pins_the_newer_timeouts_at_startup_once_the_server_is_known(
    system_cluster: Cluster,
) -> None:
    """The first session to a node SETs the timeouts its server version has; later ones carry
    them in the startup packet (no extra statement, no transaction: an idle cluster's purges
    open many). An address whose server is now older than remembered still connects."""
    cluster = system_cluster
    node = cluster.config.node_by_name("north")
    role = conninfo_to_dict(cluster.dsns["north"])["user"]
    cluster.admin_execute(
        "north",
        sql.SQL("ALTER ROLE {} IN DATABASE {} SET idle_session_timeout = '300ms'").format(
            sql.Identifier(str(role)), sql.Identifier(cluster.database)
        ),
    )

    def commits() -> int:
        with psycopg.connect(cluster.servers[0].dsn(), autocommit=True) as counter:
            row = counter.execute(
                "SELECT xact_commit FROM pg_stat_database WHERE datname = %s", (cluster.database,)
            ).fetchone()
        assert row is not None
        return int(str(row[0]))

    def transactions_once(opening: Any) -> int:
        before = commits()
        with opening() as session:
            assert session.execute("SHOW idle_session_timeout").fetchone() == ("0",)
        # An ended session's counts reach the statistics as it exits.
        wait_for(lambda: commits() > before, timeout=10, message="the session's statistics")
        time.sleep(0.2)
        return commits() - before

    def transactions_of(opening: Any) -> int:
        # The count is the whole database's: autovacuum analysing the tables an earlier test
        # filled adds to it, never takes away, so the fewest of a few tries is the session's.
        return min(transactions_once(opening) for _ in range(3))

    # A session opened with the settings in its startup packet: its start and the SHOW.
    pinned = transport.session_dsn(node.dsn, (("idle_session_timeout", "0"),))
    bare = transactions_of(lambda: psycopg.connect(pinned, autocommit=True))

    def opened_with_one_transaction() -> None:
        assert transactions_of(lambda: transport.connect(node, autocommit=True)) == bare

    transport.connect(node).close()  # the server is known from now on
    opened_with_one_transaction()
    real = transport.connections._server_versions[node.dsn]
    # Remembered newer than it is (a downgrade at the same address): unknown names, refused.
    transport.connections._server_versions[node.dsn] = 990000
    with transport.connect(node, autocommit=True) as ours:
        assert ours.execute("SHOW idle_session_timeout").fetchone() == ("0",)
    assert transport.connections._server_versions[node.dsn] == real
    opened_with_one_transaction()
    # Remembered older than it is (an upgrade): what it has gained is SET.
    transport.connections._server_versions[node.dsn] = 130000
    with transport.connect(node, autocommit=True) as ours:
        assert ours.execute("SHOW idle_session_timeout").fetchone() == ("0",)
    assert transport.connections._server_versions[node.dsn] == real
    opened_with_one_transaction()


def test_only_a_lost_session_is_a_lost_connection(system_cluster: Cluster) -> None:
    cluster = system_cluster
    with cluster.admin_connect("north") as connection:
        with pytest.raises(psycopg.errors.QueryCanceled) as cancelled:
            connection.execute("SET statement_timeout = '20ms'")
            connection.execute("SELECT pg_sleep(2)")
        assert transport.lost_session(cancelled.value, {"north": connection}) is None
    with cluster.admin_connect("north") as victim:
        cluster.admin_execute(
            "north", "SELECT pg_terminate_backend(%s)", (victim.info.backend_pid,)
        )
        with pytest.raises(psycopg.OperationalError) as lost:
            victim.execute("SELECT 1")
        assert transport.lost_session(lost.value, {"north": victim}) == "north"


def test_an_error_of_a_reachable_node_stalls_the_pair_without_calling_it_unavailable(
    system_cluster: Cluster,
) -> None:
    cluster = system_cluster
    for name in cluster.names:
        cluster.execute(name, SCHEMA)
    cluster.setup()
    # south's server reports a full disk (an OperationalError, like a lost connection's).
    cluster.admin_execute(
        "south",
        BY_HAND
        + """CREATE FUNCTION public.full_disk() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN RAISE EXCEPTION 'no space left on the test device' USING ERRCODE = 'disk_full';
             END $$;
             CREATE TRIGGER full_disk BEFORE INSERT ON items
                 FOR EACH ROW EXECUTE FUNCTION public.full_disk();
             ALTER TABLE items ENABLE ALWAYS TRIGGER full_disk""",
    )
    cluster.execute("north", "INSERT INTO items VALUES (1, 'queued')")
    with pytest.raises(PgconcordError) as stalled:
        cluster.pull("north", "south")
    assert not isinstance(stalled.value, NodeUnavailable)
    assert "node south" in str(stalled.value) and "no space left" in str(stalled.value)
    line = one_line(cluster.cli("sync"))
    assert "no space left" in line and "unreachable" not in line
    assert count(cluster, "east") == 1  # the other pairs were synced all the same
    assert cluster.applied_changes("south", "north") == 0  # queued, not parked
    assert not [r for r in cluster.conflicts() if r["kind"] == "parked"]
    cluster.admin_execute("south", BY_HAND + "DROP TRIGGER full_disk ON items")
    cluster.sync()
    assert count(cluster, "south") == 1
    cluster.assert_identical()


# -- status --------------------------------------------------------------------------------


def status(cluster: Cluster, *arguments: str) -> tuple[int, dict[str, Any], list[str]]:
    result = cluster.cli("status", "--json", *arguments)
    assert "Traceback" not in result.stderr, result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    lines = result.stderr.strip().splitlines()
    assert report["problems"] == lines  # one line per reason, the same in the JSON
    assert report["healthy"] == (result.returncode == 0)
    return result.returncode, report, lines


def test_status_exits_non_zero_with_one_line_per_reason(
    system_cluster: Cluster, tmp_path: Path
) -> None:
    cluster = system_cluster
    for name in cluster.names:
        cluster.execute(name, SCHEMA)
    code, report, lines = status(cluster)
    assert code == 1
    assert lines == [f"node {n} is not set up: run pgconcord setup" for n in cluster.names]
    text = cluster.cli("status")
    assert text.returncode == 1 and text.stderr.strip().splitlines() == lines
    cluster.setup()
    assert status(cluster)[0] == 0
    # Lag: a change nobody has pulled yet.
    cluster.execute("north", "INSERT INTO items VALUES (1, 'one')")
    code, report, lines = status(cluster, "--lag", "0")
    assert code == 1 and report["lag_threshold_seconds"] == 0
    assert {line.split(" lags ")[0] for line in lines} == {"south", "east"}
    assert all("behind north (1 changes pending" in line for line in lines), lines
    assert status(cluster)[0] == 0  # well within the default minute
    # A parked change.
    cluster.admin_execute(
        "south", BY_HAND + "ALTER TABLE items ADD CONSTRAINT small CHECK (id < 100)"
    )
    cluster.execute("north", "INSERT INTO items VALUES (500, 'too big for south')")
    cluster.sync()
    code, report, lines = status(cluster)
    assert code == 1
    assert lines == [
        "node south holds 1 parked change: see pgconcord conflicts, then retry or discard"
    ]
    assert {n["name"]: n["parked_changes"] for n in report["nodes"]} == {
        "north": 0,
        "south": 1,
        "east": 0,
    }
    parked = next(r for r in cluster.conflicts() if r["kind"] == "parked")
    assert cluster.cli("conflicts", "discard", str(parked["ref"])).returncode == 0
    assert status(cluster)[0] == 0
    # A purge that fails: logged by the agent at warning level, kept for status.
    cluster.admin_execute(
        "north",
        BY_HAND
        + """CREATE FUNCTION public.refuse_purge() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN RAISE EXCEPTION 'purge refused by the test'; END $$;
             CREATE TRIGGER refuse_purge BEFORE DELETE ON pgconcord.change_log
                 FOR EACH STATEMENT EXECUTE FUNCTION public.refuse_purge();
             ALTER TABLE pgconcord.change_log ENABLE ALWAYS TRIGGER refuse_purge""",
    )
    with AgentProcess(cluster, tmp_path / "agent.log") as agent:
        line = agent.wait_for_line("purge failed")
        assert " WARNING " in line and "north" in line and "purge refused by the test" in line
        assert agent.stop() == 0
    code, report, lines = status(cluster)
    assert code == 1 and len(lines) == 1
    assert lines[0].startswith("node north: its change log is not purged (failing since ")
    assert lines[0].endswith("): purge refused by the test")
    cluster.admin_execute("north", BY_HAND + "DROP TRIGGER refuse_purge ON pgconcord.change_log")
    assert cluster.cli("sync").returncode == 0  # its purge works, and clears the record
    assert status(cluster)[0] == 0
    # A node that cannot be reached.
    configure(
        cluster,
        cluster.names,
        '[[node]]\nname = "far"\ndsn = "host=127.0.0.1 port=9 dbname=x connect_timeout=2"\n',
    )
    code, report, lines = status(cluster)
    assert code == 1
    assert lines[0].startswith("node far is unreachable: cannot connect")


# -- commands on a node without setup --------------------------------------------------------


def test_sync_and_run_name_a_node_without_setup_in_one_line(system_cluster: Cluster) -> None:
    cluster = system_cluster
    for name in cluster.names:
        cluster.execute(name, SCHEMA)
    configure(cluster, ["north", "south"])
    install.setup(cluster.config)  # north and south only (schema changes are not at stake)
    cluster.execute("north", "INSERT INTO items VALUES (1, 'one')")
    configure(cluster, cluster.names)  # east is listed, never set up
    line = one_line(cluster.cli("sync"))
    assert "node east is not set up: run pgconcord setup" in line
    assert count(cluster, "south") == 1  # the others were synced
    for arguments in (["run", "--node", "east"], ["run"]):
        line = one_line(cluster.cli(*arguments, timeout=60))
        assert line == "pgconcord: node east is not set up: run pgconcord setup", arguments


# -- a living membership ---------------------------------------------------------------------


def test_a_running_agent_follows_the_config_a_join_and_a_part(
    system_cluster: Cluster, tmp_path: Path
) -> None:
    cluster = system_cluster
    for name in ("north", "south"):
        cluster.execute(name, SCHEMA)
    configure(cluster, ["north", "south"])
    install.setup(cluster.config)  # north and south only (schema changes are not at stake)
    with AgentProcess(cluster, tmp_path / "agent.log") as agent:
        agent.wait_for_line("replicating into north, south")
        cluster.execute("north", "INSERT INTO items VALUES (1, 'before the join')")
        wait_for(lambda: count(cluster, "south") == 1, timeout=10, message="north's row")
        # east is added to the config of the running agent, then joins.
        configure(cluster, cluster.names)
        agent.signal(signal.SIGHUP)
        agent.wait_for_line("config reloaded")
        agent.wait_for_line("node east is not set up")
        result = cluster.cli("join", "east")
        assert result.returncode == 0, result.stderr
        cluster.execute("east", "INSERT INTO items VALUES (2, 'from east')")
        cluster.execute("north", "INSERT INTO items VALUES (3, 'after the join')")
        for name in cluster.names:
            wait_for(lambda name=name: count(cluster, name) == 3, timeout=15, message=name)
        # A config that cannot be used is refused; the agent goes on with the one it has.
        cluster.config_path.write_text("[cluster\n")
        agent.signal(signal.SIGHUP)
        agent.wait_for_line("config not reloaded")
        cluster.execute("south", "INSERT INTO items VALUES (4, 'while the config is broken')")
        for name in cluster.names:
            wait_for(lambda name=name: count(cluster, name) == 4, timeout=15, message=name)
        # east parts: its pairs stop at once, while the config still lists it.
        configure(cluster, cluster.names)
        agent.signal(signal.SIGHUP)
        result = cluster.cli("part", "east")
        assert result.returncode == 0, result.stderr
        agent.wait_for_line("node east was parted: it is not replicated any more")
        agent.wait_for_line("stopped replicating east -> north")
        configure(cluster, ["north", "south"])
        agent.signal(signal.SIGHUP)
        agent.wait_for_line("the same pairs replicate")
        cluster.execute("north", "INSERT INTO items VALUES (5, 'after the part')")
        wait_for(lambda: count(cluster, "south") == 5, timeout=15, message="north's row")
        assert agent.stop() == 0
    log = agent.text()
    assert "Traceback" not in log and "unexpected error" not in log, log
    assert log.count("node east is not set up") == 1, log
    assert count(cluster, "east") == 4
    cluster.assert_identical()


@pytest.mark.slow
def test_a_node_back_from_an_outage_is_pulled_again_within_seconds(
    private_cluster: Cluster, tmp_path: Path
) -> None:
    cluster = private_cluster
    for name in cluster.names:
        cluster.execute(name, SCHEMA)
    cluster.setup()
    with AgentProcess(cluster, tmp_path / "agent.log") as agent:
        cluster.execute("north", "INSERT INTO items VALUES (1, 'before')")
        wait_for(lambda: count(cluster, "south") == 1, timeout=10, message="north's row")
        cluster.server_of["south"].stop()
        cluster.execute("north", "INSERT INTO items VALUES (2, 'while south is down')")
        # Long enough for a doubling backoff to have grown past 15 s.
        time.sleep(16)
        cluster.server_of["south"].start()
        cluster.execute("south", "INSERT INTO items VALUES (3, 'south is back')")
        # Well under the old 30 s backoff.
        wait_for(lambda: count(cluster, "south") == 2 + 1, timeout=10, message="south pulled")
        for name in ("north", "east"):
            wait_for(
                lambda name=name: count(cluster, name) == 3,
                timeout=10,
                message=f"{name} pulled from south",
            )
        agent.wait_for_line("node south is reachable again", timeout=5)
        assert agent.stop() == 0
    log = agent.text()
    assert log.count("node south is unreachable") == 1, log
    assert "Traceback" not in log and "unexpected error" not in log, log
    cluster.assert_identical()
