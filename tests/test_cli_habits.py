"""The command line as operators type it: --config and -v before or after the command, JSON from
every reading command, `status --watch` until Ctrl-C, `conflicts` readable by a person and
filtered in SQL; and the agent's log: a line per pair per minute, conflicts at info level, a
node lost and caught up again, as JSON lines for log collectors."""

from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from harness import Cluster, wait_for


def pgconcord(
    *arguments: str, environment: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """The command line exactly as given: no --config appended (Cluster.cli appends one)."""
    return subprocess.run(
        [sys.executable, "-m", "pgconcord", *arguments],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, **(environment or {})},
    )


def make_conflicts(cluster: Cluster) -> None:
    """An insert_exists on the e-mail (a unique value besides the key), and an
    update_origin_differs on items whose note is too long for any terminal."""
    for name in cluster.names:
        cluster.execute(
            name,
            "CREATE TABLE users (id text PRIMARY KEY, email text UNIQUE, name text);"
            " CREATE TABLE items (id int PRIMARY KEY, note text);",
        )
    cluster.setup()
    cluster.execute("north", "INSERT INTO items VALUES (1, 'first')")
    cluster.sync()
    cluster.execute("north", "INSERT INTO users VALUES ('n1', 'ann@example.com', 'Ann North')")
    cluster.execute("north", "UPDATE items SET note = 'north' WHERE id = 1")
    cluster.execute("south", "INSERT INTO users VALUES ('s1', 'ann@example.com', 'Ann South')")
    cluster.execute("south", "UPDATE items SET note = %s WHERE id = 1", ("x" * 300 + "END",))
    cluster.sync()


def test_config_and_verbosity_before_or_after_the_command(system_cluster: Cluster) -> None:
    cluster = system_cluster
    cluster.execute("north", "CREATE TABLE items (id int PRIMARY KEY)")
    cluster.execute("south", "CREATE TABLE items (id int PRIMARY KEY)")
    cluster.execute("east", "CREATE TABLE items (id int PRIMARY KEY)")
    cluster.setup()
    path = str(cluster.config_path)
    missing = str(cluster.config_path.with_name("missing.toml"))
    shapes = []
    for arguments, environment in (
        (["--config", path, "status", "--json"], {}),
        (["status", "--json", "--config", path, "-v"], {}),
        (["-v", "status", "--json"], {"PGCONCORD_CONFIG": path}),
        # The command's own --config wins over the environment's.
        (["status", "--config", path, "--json"], {"PGCONCORD_CONFIG": missing}),
        (["--config", missing, "status", "--config", path, "--json"], {}),
    ):
        result = pgconcord(*arguments, environment=environment)
        assert result.returncode == 0, (arguments, result.stderr)
        report = json.loads(result.stdout)
        assert report["cluster"] == "test" and report["healthy"], report
        shapes.append(sorted(report))
    assert all(shape == shapes[0] for shape in shapes)
    # Every reading command speaks JSON, wherever --config stands.
    verified = json.loads(pgconcord("verify", "--json", "--config", path).stdout)
    assert verified["identical"] is True
    granted = json.loads(pgconcord("--config", path, "grant", "someone", "--json").stdout)
    assert {each["node"] for each in granted} == set(cluster.names)
    assert all(isinstance(each["statements"], list) for each in granted)
    assert json.loads(pgconcord("conflicts", "--config", path, "--json").stdout) == []
    result = pgconcord("status", "--config", missing)
    assert result.returncode != 0 and "missing.toml" in result.stderr


def test_conflicts_for_a_person_and_filtered(system_cluster: Cluster) -> None:
    cluster = system_cluster
    make_conflicts(cluster)
    records = cluster.conflicts()
    assert {"insert_exists", "update_origin_differs"} <= {r["type"] for r in records}
    # Piped (not a terminal): every value whole, both versions, differences marked.
    text = cluster.cli("conflicts")
    assert text.returncode == 0, text.stderr
    out = text.stdout
    assert "x" * 300 + "END" in out
    assert 'colliding unique value: email="ann@example.com"' in out
    assert "local (north)" in out and "incoming (south, update)" in out
    lines = out.splitlines()
    assert "* note" in lines, out  # the long value on lines of its own, marked as different
    assert any(line.startswith("* name") and "Ann North" in line for line in lines), out
    assert any(line.startswith("  id      1 ") for line in lines), out  # the same: not marked
    assert "…" not in out

    def filtered(*arguments: str) -> list[dict[str, Any]]:
        result = cluster.cli("conflicts", "--json", *arguments)
        assert result.returncode == 0, result.stderr
        found: list[dict[str, Any]] = json.loads(result.stdout)
        return found

    unique = filtered("--type", "insert_exists")
    assert unique and {r["type"] for r in unique} == {"insert_exists"}
    assert {r["table"] for r in filtered("--table", "public.items")} == {"public.items"}
    assert {r["table"] for r in filtered("--table", "users")} == {"public.users"}
    assert {r["node"] for r in filtered("--node", "east")} == {"east"}
    assert len(filtered("--limit", "1")) == 1
    latest = max(records, key=lambda record: (record["detected_at"], record["ref"]))
    assert filtered("--limit", "1") == [latest]
    assert filtered("--since", "1h") == records
    assert filtered("--since", "2999-01-01") == []
    assert filtered("--type", "apply_failed") == []
    # A value is a parameter, never SQL: nothing matches, and nothing is dropped.
    assert filtered("--table", "public.users'; DROP TABLE users; --") == []
    assert cluster.value("north", "SELECT count(*) FROM users") == 1
    for arguments, named in (
        (("--since", "soon"), "--since"),
        (("--table", ".users"), "--table"),
        (("--type", "clash"), "--type"),
        (("--limit", "0"), "--limit"),
    ):
        result = cluster.cli("conflicts", *arguments)
        assert result.returncode == 2 and named in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    result = cluster.cli("conflicts", "--node", "nowhere")
    assert result.returncode != 0 and "nowhere" in result.stderr


def _watch(cluster: Cluster, *, terminal: bool) -> tuple[int, str]:
    """`status --watch` until it has drawn twice, then Ctrl-C: its exit code and output."""
    arguments = [sys.executable, "-m", "pgconcord", "status", "--watch", "--interval", "0.3"]
    arguments += ["--config", str(cluster.config_path)]
    environment = {**os.environ, "TERM": "xterm", "COLUMNS": "120"}
    output: list[bytes] = []
    if terminal:
        leader, follower = pty.openpty()
        process = subprocess.Popen(
            arguments, stdin=follower, stdout=follower, stderr=follower, env=environment
        )
        os.close(follower)

        def read() -> None:
            while True:
                try:
                    chunk = os.read(leader, 65536)
                except OSError:
                    return
                if not chunk:
                    return
                output.append(chunk)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
    else:
        process = subprocess.Popen(
            arguments, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=environment
        )
        assert process.stdout is not None
        pipe = process.stdout

        def read_pipe() -> None:
            for chunk in iter(lambda: pipe.read1(65536), b""):
                output.append(chunk)

        reader = threading.Thread(target=read_pipe, daemon=True)
        reader.start()
    try:
        wait_for(
            lambda: b"".join(output).count(b"Ctrl-C to stop") >= 2,
            timeout=30,
            message="two readings of status --watch",
        )
        process.send_signal(signal.SIGINT)
        code = process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    reader.join(5)
    if terminal:
        os.close(leader)
    return code, b"".join(output).decode(errors="replace")


def test_status_watch_refreshes_until_ctrl_c(system_cluster: Cluster) -> None:
    cluster = system_cluster
    for name in cluster.names:
        cluster.execute(name, "CREATE TABLE items (id int PRIMARY KEY)")
    cluster.setup()
    code, shown = _watch(cluster, terminal=True)
    assert code == 0, shown
    assert "cluster test" in shown and "north" in shown and "replication" in shown
    assert "\x1b[" in shown  # drawn as a live view, in place
    code, printed = _watch(cluster, terminal=False)
    assert code == 0, printed
    assert printed.count("cluster test") >= 2 and "Traceback" not in printed


def _json_lines(path: Path) -> list[dict[str, Any]]:
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    # Every line of the log is one JSON object, whoever logged it.
    return [json.loads(line) for line in lines]


def test_the_agent_log_shows_its_work_as_json_lines(
    system_cluster: Cluster, tmp_path: Path
) -> None:
    cluster = system_cluster
    for name in cluster.names:
        cluster.execute(name, "CREATE TABLE items (id int PRIMARY KEY, note text)")
    cluster.setup()
    # Concurrent inserts of one key, made before the agent runs: it resolves them at start.
    cluster.execute("north", "INSERT INTO items VALUES (1, 'north')")
    cluster.execute("south", "INSERT INTO items VALUES (1, 'south')")
    log_path = tmp_path / "agent.log"
    command = [sys.executable, "-m", "pgconcord", "--log-format", "json", "run"]
    command += ["--config", str(cluster.config_path), "-v"]
    with log_path.open("ab") as log_file:
        agent = subprocess.Popen(
            command,
            stdout=subprocess.DEVNULL,
            stderr=log_file,
            env={**os.environ, "PGCONCORD_REPORT_SECONDS": "1"},
        )
    try:

        def logged(**fields: Any) -> list[dict[str, Any]]:
            assert agent.poll() is None, log_path.read_text()[-3000:]
            return [
                line
                for line in _json_lines(log_path)
                if all(line.get(key) == value for key, value in fields.items())
            ]

        conflicts = wait_for(
            lambda: logged(event="conflict", table="public.items"),
            timeout=30,
            message="a conflict line",
        )
        first = conflicts[0]
        assert first["level"] == "info" and first["type"] == "insert_exists"
        assert first["key"] == {"id": 1} and first["resolution"] in ("incoming", "local")
        assert {first["local_origin"], first["incoming_origin"]} == {"north", "south"}
        assert "public.items" in first["message"] and "insert_exists" in first["message"]
        assert {"time", "logger", "message", "level"} <= set(first)
        # A line per pair per minute (here a second), with what it applied and its lag.
        cluster.execute("east", "INSERT INTO items SELECT g, 'e' FROM generate_series(2, 51) g")
        minute = wait_for(
            lambda: [
                line
                for line in logged(event="pair_minute", origin="east", target="north")
                if line["applied_changes"] > 0
            ],
            timeout=30,
            message="a per-minute line counting east's rows",
        )[0]
        assert minute["applied_changes"] == 50
        assert minute["lag_seconds"] is not None and minute["pending_changes"] is not None
        pairs = {(line["origin"], line["target"]) for line in logged(event="pair_minute")}
        assert len(pairs) == 6
        # A node lost (its connections refused), then caught up again.
        cluster.admin_execute(
            "south", f'ALTER DATABASE "{cluster.database}" WITH CONNECTION LIMIT 0'
        )
        cluster.admin_execute(
            "south",
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND usename = 'pgconcord_agent'",
        )
        wait_for(
            lambda: [
                line
                for line in logged(level="warning")
                if "node south is unreachable" in line["message"]
            ],
            timeout=30,
            message="south lost",
        )
        cluster.execute("north", "INSERT INTO items VALUES (100, 'while south was away')")
        cluster.admin_execute(
            "south", f'ALTER DATABASE "{cluster.database}" WITH CONNECTION LIMIT -1'
        )
        caught_up = wait_for(
            lambda: logged(event="node_caught_up", node="south"),
            timeout=30,
            message="south caught up",
        )
        assert caught_up[0]["level"] == "info"
        assert cluster.value("south", "SELECT note FROM items WHERE id = 100") == (
            "while south was away"
        )
    finally:
        if agent.poll() is None:
            agent.send_signal(signal.SIGTERM)
            try:
                agent.wait(timeout=30)
            except subprocess.TimeoutExpired:
                agent.kill()
                agent.wait()
    assert agent.returncode == 0, log_path.read_text()[-3000:]
    _json_lines(log_path)


def test_the_conflict_rendering_examples_hold() -> None:
    import doctest

    from pgconcord.cli import conflict_text

    failures, tried = doctest.testmod(conflict_text)
    assert tried >= 5 and failures == 0
