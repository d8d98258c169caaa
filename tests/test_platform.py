"""Platforms and versions: every module imports without POSIX-only modules (as on Windows),
programs are found by their platform's file names, and servers older than PostgreSQL 13 are
refused in one line. The suite itself runs on Linux; what these tests cannot show (a real
Windows or macOS machine) is said in the README."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import available_postgres_binaries
from harness import Cluster

from pgconcord import tools, transport
from pgconcord.sandbox import Server

POSIX_ONLY = ("pwd", "grp", "fcntl", "resource", "termios")

# Imports every pgconcord module, and what the commands import when they run, with the
# POSIX-only modules unavailable as they are on Windows (an import of one raises ImportError).
_IMPORT_EVERYTHING = """
import sys
for name in {blocked!r}:
    sys.modules[name] = None
import importlib, pkgutil
import pgconcord
found = pkgutil.walk_packages(pgconcord.__path__, "pgconcord.")
names = sorted(m.name for m in found if m.name != "pgconcord.__main__")  # it runs the CLI
for name in names:
    importlib.import_module(name)
import rich.progress, rich.live  # the commands' lazy imports of third-party modules
from click.testing import CliRunner
from pgconcord.cli import main_group
for command in [[], *[[name] for name in main_group.commands]]:
    result = CliRunner().invoke(main_group, [*command, "--help"])
    assert result.exit_code == 0, (command, result.output, result.exception)
print(len(names), "modules")
"""


def test_every_module_imports_without_posix_only_modules() -> None:
    result = subprocess.run(
        [sys.executable, "-c", _IMPORT_EVERYTHING.format(blocked=POSIX_ONLY)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert int(result.stdout.split()[0]) >= 20, result.stdout


def test_the_blocking_itself_works() -> None:
    """The check above would prove nothing if a blocked module could still be imported."""
    result = subprocess.run(
        [sys.executable, "-c", "import sys; sys.modules['pwd'] = None; import pwd"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0 and "import of pwd halted" in result.stderr


def test_program_file_names_follow_the_platform(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "pg_dump.exe").write_text("")
    (tmp_path / "pg_restore.exe").write_text("")
    monkeypatch.setattr(tools, "WINDOWS", True)
    assert tools.executable(tmp_path, "pg_dump") == tmp_path / "pg_dump.exe"
    assert tools.has_programs(tmp_path, "pg_dump", "pg_restore")
    monkeypatch.setattr(tools, "WINDOWS", False)
    assert tools.executable(tmp_path, "pg_dump") == tmp_path / "pg_dump"
    assert not tools.has_programs(tmp_path, "pg_dump")


def test_installations_are_ordered_newest_first() -> None:
    paths = [Path("/usr/lib/postgresql/9.6/bin"), Path("/usr/lib/postgresql/16/bin")]
    assert sorted(paths, key=tools._version_key, reverse=True)[0].parts[-2] == "16"
    assert tools._version_key(Path("/opt/homebrew/opt/postgresql@15/bin")) == (15,)
    assert tools._version_key(Path("C:/Program Files/PostgreSQL/17/bin")) == (17,)


@pytest.mark.parametrize(
    ("server_version", "release"), [(90624, "9.6"), (110022, "11"), (120019, "12")]
)
def test_servers_older_than_13_are_refused_by_name(server_version: int, release: str) -> None:
    problem = transport.server_version_problem("north", server_version)
    assert problem is not None
    assert problem.startswith(f"node north runs PostgreSQL {release}:")
    assert "13 or newer" in problem and "\n" not in problem


def test_servers_from_13_on_are_accepted(cluster: Cluster) -> None:
    assert transport.server_version_problem("north", 130000) is None
    with cluster.admin_connect("north") as connection:
        transport.check_server_version(connection, "north")  # the running server: no error


def test_a_servers_liveness_is_asked_of_pg_ctl_where_signals_would_kill(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On Windows os.kill(pid, 0) terminates the process: there pg_ctl status says instead."""
    server = Server(available_postgres_binaries()[0], name="liveness").start()
    try:
        monkeypatch.setattr(tools, "WINDOWS", True)
        monkeypatch.setattr(tools, "executable", lambda directory, name: directory / name)
        assert server.is_running
        monkeypatch.undo()
        server.stop()
        monkeypatch.setattr(tools, "WINDOWS", True)
        monkeypatch.setattr(tools, "executable", lambda directory, name: directory / name)
        assert not server.is_running
    finally:
        monkeypatch.undo()
        server.cleanup()
