"""The agent's HTTP server, as a load balancer, Prometheus and an operator's browser see it: a
real `pgconcord run --http` on real PostgreSQL; nodes stopped and started under it; the token
refused and accepted; the agent killed."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from harness import Cluster, wait_for

from pgconcord.agent import Agent
from pgconcord.agent.heartbeat import Heartbeats
from pgconcord.config import load_config, parse_config
from pgconcord.errors import ConfigError
from pgconcord.web import start_http_server
from pgconcord.web.live import Live
from pgconcord.web.readiness import readiness

TOKEN = "s3cret-token-for-tests"
SCHEMA = "CREATE TABLE stock (id int PRIMARY KEY, item text, quantity int)"
# A constraint only one node has: made there alone, not replicated (see test_parking).
BY_HAND = "SET session_replication_role = replica; "


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


class Answer:
    def __init__(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.status = status
        self.body = body
        self.headers = headers

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode()


class HttpAgent:
    """`pgconcord run --http 127.0.0.1:PORT` as a subprocess, its log in a file."""

    def __init__(
        self,
        cluster: Cluster,
        log: Path,
        *arguments: str,
        token: str | None = TOKEN,
        host: str = "127.0.0.1",
    ) -> None:
        self.port = free_port(host)
        self.address = f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"
        self.log = log
        environment = dict(os.environ)
        environment.pop("PGCONCORD_TOKEN", None)
        if token is not None:
            environment["PGCONCORD_TOKEN"] = token
        command = [sys.executable, "-m", "pgconcord", "run", "--http", self.address]
        with log.open("ab") as output:
            self.process = subprocess.Popen(
                [*command, *arguments, "--config", str(cluster.config_path)],
                stdout=subprocess.DEVNULL,
                stderr=output,
                env=environment,
            )
        wait_for(self._answers, timeout=30, message="the agent's HTTP server")

    def _answers(self) -> bool:
        assert self.process.poll() is None, f"the agent exited:\n{self.log.read_text()}"
        try:
            self.request("GET", "/health")
        except OSError:
            return False
        return True

    def request(
        self,
        method: str,
        path: str,
        *,
        token: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> Answer:
        sent = dict(headers or {})
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        request = urllib.request.Request(
            f"http://{self.address}{path}", method=method, headers=sent
        )
        opener = urllib.request.build_opener(_NoRedirect)
        try:
            with opener.open(request, timeout=15) as response:
                return Answer(response.status, response.read(), dict(response.headers))
        except urllib.error.HTTPError as error:
            return Answer(error.code, error.read(), dict(error.headers))

    def get(self, path: str, **options: Any) -> Answer:
        return self.request("GET", path, **options)

    def post(self, path: str, **options: Any) -> Answer:
        return self.request("POST", path, **options)

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=30)

    def __enter__(self) -> HttpAgent:
        return self

    def __exit__(self, *_: object) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *_: Any, **__: Any) -> None:
        return None


def metric(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in Prometheus' text format."""
    wanted = ",".join(f'{key}="{value}"' for key, value in labels.items())
    head = f"{name}{{{wanted}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(head + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def status_json(cluster: Cluster) -> dict[str, Any]:
    result = cluster.cli("status", "--json")
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def pair_of(data: dict[str, Any], origin: str, target: str) -> dict[str, Any]:
    found: dict[str, Any] = next(
        p for p in data["pairs"] if (p["origin"], p["target"]) == (origin, target)
    )
    return found


# -- the config ------------------------------------------------------------------------------

NODES = '[cluster]\nname = "c"\n[[node]]\nname = "north"\ndsn = "host=127.0.0.1 dbname=a"\n'


@pytest.mark.parametrize(
    ("listen", "address"),
    [("127.0.0.1:8585", ("127.0.0.1", 8585)), ("[::1]:9000", ("::1", 9000))],
)
def test_http_listen_takes_host_and_port(listen: str, address: tuple[str, int]) -> None:
    config = parse_config(NODES + f'[http]\nlisten = "{listen}"\ntoken_file = "token"\n')
    assert config.http.address == address
    assert parse_config(NODES).http.address is None


@pytest.mark.parametrize(
    ("listen", "words"),
    [
        ("::1:8585", "http.listen: '::1:8585': write an IPv6 address in brackets"),
        ("localhost", "http.listen: 'localhost' is not HOST:PORT"),
        ("127.0.0.1:99999", "the port must be a number from 1 to 65535"),
        ("127.0.0.1:http", "the port must be a number from 1 to 65535"),
    ],
)
def test_a_bad_http_listen_is_one_clear_line(listen: str, words: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_config(NODES + f'[http]\nlisten = "{listen}"\n')
    assert words in str(raised.value)
    assert "\n" not in str(raised.value)


def test_an_unknown_http_key_is_named() -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'http.port' \(expected one of: listen"):
        parse_config(NODES + "[http]\nport = 8585\n")


# -- liveness without SQL ----------------------------------------------------------------------


def test_a_loop_that_died_or_stopped_going_round_is_a_health_problem() -> None:
    heartbeats = Heartbeats()

    def broken() -> None:
        raise RuntimeError("a bug")

    heartbeats.run("pull north->south", 30.0, broken)
    heartbeats.run("watch north", 2.0, lambda: None)  # returned: asked to stop, forgotten
    assert heartbeats.problems() == [
        "loop pull north->south ended by an error: RuntimeError: a bug"
    ]
    quiet = Heartbeats()
    release = []

    def stuck() -> None:
        loop = quiet.loops()[0]
        loop.ticked_at -= 1000  # as if it had not ticked for 1000 s
        release.append(quiet.problems())

    quiet.run("purge", 15.0, stuck)
    assert release[0][0].startswith("loop purge has not gone round for 1000 s")


def test_health_is_503_once_a_loop_of_a_running_agent_died(system_cluster: Cluster) -> None:
    cluster = system_cluster
    cluster.setup()
    port = free_port()
    agent = Agent(cluster.config)
    server = start_http_server(agent, f"127.0.0.1:{port}")  # as `pgconcord run --http` does
    agent.start()
    try:
        url = f"http://127.0.0.1:{port}/health"
        with urllib.request.urlopen(url, timeout=10) as response:
            assert json.loads(response.read()) == {"status": "ok"}

        def broken() -> None:
            raise RuntimeError("a bug")

        # A loop's thread, started the way the agent starts its own (Agent._spawn).
        thread = threading.Thread(target=agent.heartbeats.run, args=("watch x", 1.0, broken))
        thread.start()
        thread.join()
        with pytest.raises(urllib.error.HTTPError) as raised:
            urllib.request.urlopen(url, timeout=10)
        assert raised.value.code == 503
        body = json.loads(raised.value.read())
        assert body["status"] == "failing"
        assert body["problems"] == ["loop watch x ended by an error: RuntimeError: a bug"]
    finally:
        server.stop()
        agent.stop()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_a_node_that_does_not_answer_does_not_hold_up_the_checks(
    system_cluster: Cluster, tmp_path: Path
) -> None:
    cluster = system_cluster
    cluster.setup()
    # A host that takes the connection and never answers (as one cut off by a firewall): each
    # reading of the status waits for its connection timeout.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        nodes = "".join(
            f'[[node]]\nname = "{name}"\ndsn = "{dsn}"\n\n' for name, dsn in cluster.dsns.items()
        )
        silent_node = f'[[node]]\nname = "west"\ndsn = "host=127.0.0.1 port={port} dbname=x"\n'
        path = tmp_path / "silent.toml"
        path.write_text(f'[cluster]\nname = "test"\n\n{nodes}{silent_node}')
        live = Live(Agent(load_config(path)))
        began = time.monotonic()
        first = live.reading()  # nothing at hand yet: waited for
        assert time.monotonic() - began >= 4
        west = next(node for node in first.status.nodes if node.name == "west")
        assert not west.reachable and "timeout" in str(west.error)
        time.sleep(live.cache_seconds)
        began = time.monotonic()
        assert live.reading() is first  # the new reading is under way: the last one meanwhile
        assert time.monotonic() - began < 2
        assert readiness(first.status, "north", 10.0).ready


# -- a running agent -------------------------------------------------------------------------


def test_the_endpoints_of_a_running_agent(system_cluster: Cluster, tmp_path: Path) -> None:
    cluster = system_cluster
    for name in cluster.names:
        cluster.execute(name, SCHEMA)
    cluster.setup()
    # Only north refuses negative quantities: east's change is parked there.
    cluster.admin_execute(
        "north", BY_HAND + "ALTER TABLE stock ADD CONSTRAINT no_negative CHECK (quantity >= 0)"
    )
    cluster.execute("east", "INSERT INTO stock VALUES (1, 'pen', -5)")
    cluster.execute("east", "INSERT INTO stock VALUES (2, 'pot', 1)")
    cluster.execute("north", "INSERT INTO stock SELECT g, 'cup', 1 FROM generate_series(10, 14) g")
    # This agent replicates into north and south only: east's changes reach them, theirs stay
    # pending for east (its agent is not running), where the metrics must count them.
    with HttpAgent(cluster, tmp_path / "agent.log", "--node", "north") as agent:
        answer = agent.get("/health")
        assert (answer.status, answer.json) == (200, {"status": "ok"})
        wait_for(lambda: agent.get("/ready/north").status == 200, message="north ready")
        ready = agent.get("/ready/north").json
        assert ready["node"] == "north" and ready["ready"] is True and ready["reasons"] == []
        # east has nothing of north: behind by more than a microsecond.
        behind = agent.get("/ready/east?lag=0.000001")
        assert behind.status == 503, behind.json
        assert behind.json["ready"] is False
        assert any(r.startswith("behind north by") for r in behind.json["reasons"]), behind.json
        unknown = agent.get("/ready/nowhere")
        assert unknown.status == 404 and unknown.json["ready"] is False
        assert "unknown node 'nowhere'" in unknown.json["reasons"][0]
        assert agent.get("/ready/north?lag=soon").status == 400

        # /api/v1/status: `status --json`, with the heartbeats of the pairs this agent runs.
        def parked_on_north() -> dict[str, Any] | None:
            data: dict[str, Any] = agent.get("/api/v1/status").json
            return data if any("parked change" in p for p in data["problems"]) else None

        live = wait_for(parked_on_north, message="east's change parked on north")
        printed = status_json(cluster)
        assert set(printed) <= set(live)
        assert [n["name"] for n in live["nodes"]] == [n["name"] for n in printed["nodes"]]
        assert set(printed["nodes"][0]) == set(live["nodes"][0])
        assert set(printed["pairs"][0]) < set(live["pairs"][0])
        into_north = pair_of(live, "east", "north")
        assert into_north["agent_running"] is True and into_north["live"] is True
        assert 0 <= into_north["last_pull_seconds_ago"] < 10
        assert into_north["agent_sentence"]
        assert pair_of(live, "north", "east")["agent_running"] is False
        assert live["agent"]["nodes"] == ["north"]
        strict = agent.get("/api/v1/status?lag=0.000001").json  # as `status --lag`
        assert strict["lag_threshold_seconds"] == 0.000001
        assert any(p.startswith("east lags") for p in strict["problems"]), strict["problems"]
        assert agent.get("/api/v1/status?lag=-1").status == 400

        # /metrics: the figures of `status --json`.
        text = agent.get("/metrics").text
        printed = status_json(cluster)
        for pair in printed["pairs"]:
            labels = {"origin": pair["origin"], "target": pair["target"]}
            assert metric(text, "pgconcord_pending_changes", **labels) == pair["pending_changes"]
        assert pair_of(printed, "north", "east")["pending_changes"] == 5
        for node in printed["nodes"]:
            assert metric(text, "pgconcord_node_up", node=node["name"]) == 1
            parked = metric(text, "pgconcord_parked_changes", node=node["name"])
            assert parked == node["parked_changes"]
        assert metric(text, "pgconcord_parked_changes", node="north") == 1
        assert metric(text, "pgconcord_agent_up") == 1
        for name in (
            "pgconcord_lag_seconds",
            "pgconcord_applied_changes_total",
            "pgconcord_last_pull_age_seconds",
        ):
            assert metric(text, name, origin="east", target="north") is not None, name
        applied = metric(text, "pgconcord_applied_changes_total", origin="east", target="north")
        assert applied == pair_of(printed, "east", "north")["applied_changes"] >= 1
        cluster.execute("east", "INSERT INTO stock VALUES (3, 'ink', 1)")
        wait_for(
            lambda: (
                (
                    metric(
                        agent.get("/metrics").text,
                        "pgconcord_applied_changes_total",
                        origin="east",
                        target="north",
                    )
                    or 0
                )
                > applied
            ),
            message="the applied counter going up",
        )

        # The token: refused without it (and nothing discarded), accepted with it.
        waiting = [r for r in cluster.conflicts() if r["kind"] == "parked"]
        assert [(r["node"], r["state"]) for r in waiting] == [("north", "parked")]
        reference = waiting[0]["ref"]
        for token in (None, "wrong"):
            assert agent.post(f"/api/v1/conflicts/{reference}/discard", token=token).status == 401
            assert agent.get("/api/v1/conflicts", token=token).status == 401
            page = agent.get("/", token=token)
            assert page.status == 401 and "token" in page.text
        assert [r["state"] for r in cluster.conflicts() if r["kind"] == "parked"] == ["parked"]
        listed = agent.get("/api/v1/conflicts", token=TOKEN)
        assert listed.status == 200
        assert [r["ref"] for r in listed.json if r["kind"] == "parked"] == [reference]
        missing = agent.post("/api/v1/conflicts/north:999999/discard", token=TOKEN)
        assert missing.status == 404 and "not a parked change" in missing.json["error"]
        assert agent.post("/api/v1/conflicts/nowhere:1/retry", token=TOKEN).status == 404
        assert agent.post("/api/v1/conflicts/garbage/retry", token=TOKEN).status == 404
        # Retry before the cause is fixed: still parked, and said so.
        again = agent.post(f"/api/v1/conflicts/{reference}/retry", token=TOKEN)
        assert again.status == 409 and again.json["done"] is False, again.json
        done = agent.post(f"/api/v1/conflicts/{reference}/discard", token=TOKEN)
        assert done.status == 200, done.json
        assert done.json == {"ref": reference, "action": "discard", "done": True}
        assert [r["state"] for r in cluster.conflicts() if r["kind"] == "parked"] == ["discarded"]

        # The console: once with ?token=, then by the cookie it set.
        first = agent.get(f"/?token={TOKEN}")
        assert first.status == 303
        cookie = first.headers["Set-Cookie"]
        assert "pgconcord_token=" in cookie and "HttpOnly" in cookie
        page = agent.get("/", headers={"Cookie": cookie.split(";")[0]})
        assert page.status == 200 and "<title>pgconcord console</title>" in page.text
        # The cookie goes with a request another site's page makes too: no POST from there.
        elsewhere = {"Cookie": cookie.split(";")[0], "Origin": "http://elsewhere.example"}
        assert agent.post("/api/v1/conflicts/north:1/retry", headers=elsewhere).status == 401
        assert agent.get("/", token=TOKEN).status == 200
        assert agent.get("/static/index.html").status == 200
        assert agent.get("/static/../app.py").status == 404

        # The timeline: a sample per pair the agent runs every 5 s.
        def sampled() -> dict[str, Any] | None:
            data: dict[str, Any] = agent.get("/api/v1/timeline").json
            return data if data["pairs"] and data["pairs"][0]["samples"] else None

        timeline = wait_for(sampled, timeout=15, message="a timeline sample")
        assert timeline["interval_seconds"] == 5
        assert {(p["origin"], p["target"]) for p in timeline["pairs"]} == {
            ("south", "north"),
            ("east", "north"),
        }
        moment, lag, _rate = timeline["pairs"][0]["samples"][-1]
        assert abs(moment - time.time()) < 30 and lag is not None and lag >= 0

        later = agent.get("/metrics").text
        after = metric(later, "pgconcord_applied_changes_total", origin="east", target="north")
        assert after is not None and after > applied
        assert agent.stop() == 0
    log = agent.log.read_text()
    assert TOKEN not in log
    assert "Traceback" not in log, log


def test_without_a_token_the_open_endpoints_are_served_and_the_rest_refused(
    system_cluster: Cluster, tmp_path: Path
) -> None:
    cluster = system_cluster
    cluster.setup()
    # On IPv6's loopback, bound as written in brackets.
    with HttpAgent(cluster, tmp_path / "agent.log", token=None, host="::1") as agent:
        assert agent.get("/health").status == 200
        # Health and the timeline cost the nodes nothing: the only reading of the status (at
        # most one a second, whoever asks) is the one this scrape makes.
        wait_for(lambda: agent.get("/api/v1/timeline").json["pairs"], message="a sample")
        assert metric(agent.get("/metrics").text, "pgconcord_status_reads_total") == 1
        assert agent.get("/api/v1/status").status == 200
        refused = agent.post("/api/v1/conflicts/north:1/discard", token="anything")
        assert refused.status == 401 and "no token" in refused.json["error"]
        assert agent.get("/", token="anything").status == 401
        assert agent.stop() == 0
    lines = [line for line in agent.log.read_text().splitlines() if "no token" in line]
    assert len(lines) == 1 and "refused until one is set" in lines[0], lines


def test_an_address_in_use_is_one_line_and_a_non_zero_exit(system_cluster: Cluster) -> None:
    cluster = system_cluster
    cluster.setup()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = cluster.cli("run", "--http", f"127.0.0.1:{port}", timeout=30)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if "pgconcord:" in line]
    assert errors == [f"pgconcord: http: cannot listen on 127.0.0.1:{port}: Address already in use"]
    assert "Traceback" not in result.stderr


def test_readiness_follows_a_node_down_and_up_and_a_killed_agent_refuses(
    private_cluster: Cluster, tmp_path: Path
) -> None:
    cluster = private_cluster
    for name in cluster.names:
        cluster.execute(name, SCHEMA)
    cluster.setup()
    with HttpAgent(cluster, tmp_path / "agent.log") as agent:
        for name in cluster.names:
            wait_for(lambda name=name: agent.get(f"/ready/{name}").status == 200, message=name)
        cluster.server_of["south"].stop()
        stopped_at = time.monotonic()
        answer = wait_for(
            lambda: (a := agent.get("/ready/south")).status == 503 and a,
            timeout=10,
            message="south not ready",
        )
        assert time.monotonic() - stopped_at < 5
        assert answer.json["reasons"][0].startswith("unreachable"), answer.json
        # The others take traffic still; what south holds of theirs cannot be known.
        north = agent.get("/ready/north")
        assert north.status == 200 and north.json["notes"], north.json
        text = agent.get("/metrics").text
        assert metric(text, "pgconcord_node_up", node="south") == 0
        assert metric(text, "pgconcord_node_up", node="north") == 1
        status = agent.get("/api/v1/status").json
        assert status["healthy"] is False
        assert pair_of(status, "north", "south")["live"] is False
        cluster.execute("north", "INSERT INTO stock VALUES (1, 'pen', 1)")
        cluster.server_of["south"].start()
        wait_for(lambda: agent.get("/ready/south").status == 200, timeout=30, message="south back")
        assert agent.get("/health").status == 200
        agent.process.send_signal(signal.SIGKILL)
        agent.process.wait(timeout=10)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", agent.port), timeout=5).close()
