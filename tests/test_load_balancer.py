"""Behind HAProxy and PgBouncer, set up as the README's recipe (deploy/haproxy.cfg and
deploy/pgbouncer.ini) says: the application writes through HAProxy, the node HAProxy routes to
stops, HAProxy moves the writes to the other node within seconds, the application retries the
few writes that failed; the node comes back, catches up and takes the writes again; its
PgBouncer stops, and the writes move again; and nothing written is lost."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
from harness import APPLICATION_ROLE, Cluster, wait_for
from psycopg import sql

from pgconcord.sandbox import PASSWORD_LOGIN_ROLE, Server
from pgconcord.sandbox.proxies import (
    HAPROXY_PROGRAM,
    HAProxy,
    PgBouncer,
    Program,
    free_port,
    release_port,
)

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
SCHEMA = "CREATE TABLE writes (id int PRIMARY KEY, note text NOT NULL);"
LOGIN_ROLE = "app_login"
# The readiness lag the recipe asks for (`?lag=10`): the node that takes the writes stays ready
# while the other is away for longer than that.
RECIPE_LAG_SECONDS = int(re.findall(r"\?lag=(\d+)", (DEPLOY / "haproxy.cfg").read_text())[0])


class AgentProcess:
    """`pgconcord run --http`, one process for both nodes; stopped with the test, also when the
    test run is killed (a sandbox Program)."""

    def __init__(self, cluster: Cluster) -> None:
        self.port = free_port()
        self.program = Program("agent")
        self.program.prepare()
        self.program.launch(
            [
                sys.executable,
                "-m",
                "pgconcord",
                "run",
                "--http",
                f"127.0.0.1:{self.port}",
                "--config",
                cluster.config_path,
            ],
            # It reads the cluster's config in the test's own directory.
            as_server_user=False,
            environment=os.environ,
        )

    def text(self) -> str:
        return self.program.log_file.read_text(errors="replace")

    def get(self, path: str) -> tuple[int, str]:
        """The HTTP status and body of GET path, 0 while nothing answers."""
        assert self.program.is_running, f"the agent exited:\n{self.text()[-3000:]}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as r:
                return int(r.status), r.read().decode()
        except urllib.error.HTTPError as error:
            return int(error.code), error.read().decode()
        except OSError as error:
            return 0, str(error)

    def stop(self) -> int | None:
        return self.program.stop()

    def cleanup(self) -> None:
        try:
            self.program.cleanup()
        finally:
            release_port(self.port)


@dataclass(frozen=True)
class Ack:
    id: int
    node: str
    at: float


@dataclass(frozen=True)
class Failure:
    id: int
    error: str
    at: float


@dataclass
class Writer:
    """The application: role `app`, one connection through HAProxy, one row per transaction;
    a write that fails is retried, with the same row, on a new connection, until it succeeds,
    as an application retries. Each row's acknowledgement says which node took it."""

    dsn: str
    password: str = field(repr=False)
    node_of_port: dict[int, str] = field(default_factory=dict)
    acks: list[Ack] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    stopping: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self._run, name="application", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=30)
        assert not self.thread.is_alive(), "the application's writer did not stop"

    def acks_on(self, node: str, after: float = 0.0) -> list[Ack]:
        return [ack for ack in list(self.acks) if ack.node == node and ack.at > after]

    def _run(self) -> None:
        connection: psycopg.Connection[Any] | None = None
        row = 1
        retrying = False
        while not self.stopping.is_set():
            try:
                if connection is None:
                    # Transaction pooling: no server-side prepared statements (PgBouncer 1.18).
                    connection = psycopg.connect(
                        self.dsn,
                        password=self.password,
                        autocommit=True,
                        connect_timeout=3,
                        prepare_threshold=None,
                    )
                try:
                    port = connection.execute(
                        "INSERT INTO writes VALUES (%s, %s) RETURNING inet_server_port()",
                        (row, f"write {row}"),
                    ).fetchone()
                except psycopg.errors.UniqueViolation:
                    if not retrying:
                        raise
                    # The failed attempt had committed after all, only its answer was lost.
                    port = connection.execute("SELECT inet_server_port()").fetchone()
                assert port is not None
                self.acks.append(Ack(row, self.node_of_port[port[0]], time.monotonic()))
                row += 1
                retrying = False
                self.stopping.wait(0.02)
            except psycopg.OperationalError as error:
                self.failures.append(Failure(row, str(error).strip(), time.monotonic()))
                retrying = True
                if connection is not None:
                    connection.close()
                    connection = None
                self.stopping.wait(0.2)
            except Exception as error:  # reported by the test, which then fails
                self.unexpected.append(repr(error))
                self.stopping.wait(0.2)
        if connection is not None:
            connection.close()


@dataclass
class LoadBalanced:
    cluster: Cluster
    agent: AgentProcess
    bouncers: dict[str, PgBouncer]
    haproxy: HAProxy
    password: str = field(repr=False)

    def application_dsn(self) -> str:
        return (
            f"host=127.0.0.1 port={self.haproxy.port} dbname={self.cluster.database}"
            f" user={LOGIN_ROLE}"
        )


def verifier_lines(cluster: Cluster, node: str) -> list[str]:
    """PgBouncer's auth file for the node, made by the README's query ("PgBouncer's logins")."""
    readme = (DEPLOY.parent / "README.md").read_text()
    query = readme.split("**PgBouncer's logins.**", 1)[1].split("```sql\n", 1)[1]
    query = query.split("```", 1)[0]
    assert "IN ('app')" in query, query
    query = query.replace("IN ('app')", f"IN ('{LOGIN_ROLE}')")
    lines = [str(row[0]) for row in cluster.admin_query(node, query)]
    assert len(lines) == 1, "no SCRAM verifier for the application's login role"
    return lines


@pytest.fixture
def load_balanced(tmp_path: Path) -> Iterator[LoadBalanced]:
    """Two nodes on servers of their own, the agent with HTTP, a PgBouncer in front of each
    node and HAProxy in front of both, each from the recipe; all stopped at the end."""
    with contextlib.ExitStack() as stack:
        servers = [Server(name=f"lb-{index}") for index in range(2)]
        for server in servers:
            stack.callback(server.cleanup)
            server.start()
        cluster = Cluster(servers, tmp_path, SCHEMA)
        cluster.setup()
        agent = AgentProcess(cluster)
        stack.callback(agent.cleanup)
        # The application logs in with a password, as deployed: a role of its own in `app`
        # (whose rights it writes with) that the sandbox's servers ask SCRAM of; the password
        # is this run's, and is never written anywhere.
        password = secrets.token_urlsafe(18)
        for name in cluster.names:
            cluster.admin_execute(
                name,
                sql.SQL("CREATE ROLE {} LOGIN PASSWORD {} IN ROLE {}, {}").format(
                    sql.Identifier(LOGIN_ROLE),
                    sql.Literal(password),
                    sql.Identifier(APPLICATION_ROLE),
                    sql.Identifier(PASSWORD_LOGIN_ROLE),
                ),
            )
        bouncers = {
            name: stack.enter_context(
                PgBouncer(
                    DEPLOY / "pgbouncer.ini",
                    name=name,
                    database=cluster.database,
                    server_port=cluster.server_of[name].port,
                    auth_lines=verifier_lines(cluster, name),
                )
            )
            for name in cluster.names
        }
        haproxy = stack.enter_context(
            HAProxy(
                DEPLOY / "haproxy.cfg",
                servers={name: bouncer.port for name, bouncer in bouncers.items()},
                agent_port=agent.port,
            )
        )
        yield LoadBalanced(cluster, agent, bouncers, haproxy, password)


def switches(acks: list[Ack]) -> list[str]:
    """The nodes that took the writes, in order, each run of writes on one node counted once."""
    runs: list[str] = []
    for ack in acks:
        if not runs or runs[-1] != ack.node:
            runs.append(ack.node)
    return runs


@pytest.mark.slow
def test_haproxy_moves_writes_off_a_stopped_node_and_nothing_is_lost(
    load_balanced: LoadBalanced,
) -> None:
    setup = load_balanced
    cluster, agent, haproxy = setup.cluster, setup.agent, setup.haproxy
    for name in cluster.names:
        wait_for(
            lambda name=name: agent.get(f"/ready/{name}")[0] == 200,
            timeout=20,
            message=f"the agent to call {name} ready",
        )
    wait_for(
        lambda: haproxy.server_states() == {"north": "UP", "south": "UP"},
        timeout=15,
        message="HAProxy to see both nodes up",
    )
    # The recipe's logins: PgBouncer checks the application's password (SCRAM).
    with pytest.raises(psycopg.OperationalError, match="authentication failed"):
        psycopg.connect(setup.application_dsn(), password="wrong", connect_timeout=5).close()
    node_of_port = {server.port: name for name, server in cluster.server_of.items()}
    writer = Writer(setup.application_dsn(), setup.password, node_of_port)
    writer.start()
    try:
        wait_for(lambda: len(writer.acks) >= 30, timeout=15, message="writes through HAProxy")
        # One node takes the writes (the first server line), so that a client reads its own.
        assert switches(writer.acks) == ["north"], switches(writer.acks)
        assert not writer.failures, writer.failures

        stopped_at = time.monotonic()
        cluster.server_of["north"].stop()
        # What north acknowledged but had not carried to south yet: delivered once it is back.
        on_south = {row[0] for row in cluster.query("south", "SELECT id FROM writes")}
        not_carried = {ack.id for ack in writer.acks_on("north")} - on_south
        wait_for(
            lambda: writer.acks_on("south", after=stopped_at),
            timeout=15,
            message="writes through the same port to land on south",
        )
        moved_after = writer.acks_on("south", after=stopped_at)[0].at - stopped_at
        assert moved_after < 8, f"HAProxy moved the writes to south after {moved_after:.1f} s"
        assert haproxy.server_states()["north"].startswith("DOWN")
        status, body = agent.get("/ready/north")
        assert status == 503, (status, body)
        assert json.loads(body), body  # a reason, for whoever looks

        # South keeps taking the writes while north is away for longer than the readiness lag:
        # its own readiness does not depend on a peer that is down.
        outage_end = stopped_at + moved_after + RECIPE_LAG_SECONDS + 3
        wait_for(
            lambda: time.monotonic() > outage_end,
            timeout=RECIPE_LAG_SECONDS + 10,
            message="an outage longer than the lag",
        )
        failures_during_outage = [f for f in writer.failures if f.at > stopped_at + moved_after]
        assert not failures_during_outage, failures_during_outage
        assert haproxy.server_states()["south"] == "UP"
        assert agent.get("/ready/south")[0] == 200

        restarted_at = time.monotonic()
        cluster.server_of["north"].start()
        # Once caught up, north is ready again and takes the writes back: HAProxy closes the
        # backup's sessions, so that one node takes them again.
        wait_for(
            lambda: writer.acks_on("north", after=restarted_at),
            timeout=30,
            message="the writes back on north once it is caught up",
        )
        wait_for(lambda: len(writer.acks_on("north", after=restarted_at)) >= 10, timeout=10)

        # A node whose PgBouncer is gone is down as well, though its database is ready.
        bouncer_stopped_at = time.monotonic()
        setup.bouncers["north"].stop()
        wait_for(
            lambda: writer.acks_on("south", after=bouncer_stopped_at),
            timeout=15,
            message="the writes on south once north's PgBouncer is gone",
        )
        moved_again_after = writer.acks_on("south", after=bouncer_stopped_at)[0].at
        moved_again_after -= bouncer_stopped_at
        assert moved_again_after < 8, f"moved after {moved_again_after:.1f} s"
        assert agent.get("/ready/north")[0] == 200
        wait_for(lambda: len(writer.acks_on("south", after=bouncer_stopped_at)) >= 10, timeout=10)
    finally:
        writer.stop()

    # The figures the README quotes, shown with -s or when the test fails.
    print(
        f"moved after {moved_after:.1f} s (node stopped), {moved_again_after:.1f} s (PgBouncer"
        f" stopped); {len(writer.failures)} failed writes of {len(writer.acks)}, each retried;"
        f" {len(not_carried)} rows north had not carried yet when it stopped"
    )
    assert not writer.unexpected, writer.unexpected
    assert switches(writer.acks) == ["north", "south", "north", "south"], switches(writer.acks)
    # A handful of failed writes around each move, each retried until it succeeded.
    assert len(writer.failures) <= 25, "\n".join(
        [
            f"{f.at - stopped_at:.2f} s after the stop, row {f.id}: {f.error}"
            for f in writer.failures
        ]
        + [f"restarted at {restarted_at - stopped_at:.2f} s; HAProxy's log:", haproxy.log_tail()]
    )
    acknowledged = [ack.id for ack in writer.acks]
    assert acknowledged == list(range(1, len(acknowledged) + 1))
    assert {failure.id for failure in writer.failures} <= set(acknowledged)

    # Nothing written is lost: every acknowledged row reaches both nodes, whichever took it.
    def stored(node: str) -> set[int]:
        return {row[0] for row in cluster.query(node, "SELECT id FROM writes")}

    wait_for(
        lambda: all(stored(node) == set(acknowledged) for node in cluster.names),
        timeout=30,
        message="every acknowledged row on both nodes",
    )
    assert not_carried <= stored("south")
    cluster.assert_identical()
    assert agent.stop() == 0
    log = agent.text()
    assert "Traceback" not in log and "unexpected error" not in log, log[-3000:]


def test_the_recipe_is_valid_as_written_and_the_readme_shows_it() -> None:
    recipe = DEPLOY / "haproxy.cfg"
    checked = subprocess.run(
        [str(HAPROXY_PROGRAM), "-c", "-f", str(recipe)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert checked.returncode == 0, checked.stderr
    # The README's listen section is the recipe's, comments aside.
    section = recipe.read_text().split("\nlisten ", 1)[1]
    recipe_lines = ["listen " + section.splitlines()[0]] + [
        line.strip()
        for line in section.splitlines()[1:]
        if line.strip() and not line.strip().startswith("#")
    ]
    readme = (DEPLOY.parent / "README.md").read_text()
    shown = readme.split("\nlisten postgres\n", 1)[1].split("```", 1)[0]
    assert ["listen postgres"] + [line.strip() for line in shown.splitlines() if line.strip()] == (
        recipe_lines
    )
