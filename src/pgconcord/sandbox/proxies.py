"""HAProxy and PgBouncer in front of sandbox servers, configured from the recipe in deploy/.

The load-balancer test runs the README's recipe for real: `haproxy_config` and
`pgbouncer_config` take the text of deploy/haproxy.cfg and deploy/pgbouncer.ini and change only
what a throwaway run must (addresses and ports on 127.0.0.1, files in the run's own directory,
no user switching or daemonizing by the program itself), so the test checks the very health
check, routing, logins and timeouts an operator copies.

Each program runs in the foreground, in a session of its own, from a directory of its own under
/tmp, as the servers' OS user when we are root (PgBouncer refuses root). A watchdog (as for the
servers) stops it and removes the directory should this process die first, and
`clean_up_stale_programs` removes what a run killed together with its watchdogs left behind.
POSIX only: these programs are Debian's packages, and the tests run them on Linux.
"""

from __future__ import annotations

import configparser
import contextlib
import csv
import io
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO

from pgconcord.errors import FatalError
from pgconcord.sandbox.binaries import SANDBOX_PARENT, _server_account, _server_environment
from pgconcord.sandbox.server import _choose_free_port, _release_port, end_watchdog

HAPROXY_PROGRAM = Path("/usr/sbin/haproxy")
PGBOUNCER_PROGRAM = Path("/usr/sbin/pgbouncer")
_DIRECTORY_PREFIX = "pgconcord-program-"
_PID_FILE = "program.pid"
_OWNER_FILE = "owner.pid"
_START_TIMEOUT_SECONDS = 15.0
_STOP_TIMEOUT_SECONDS = 10.0
_LOG_TAIL_LINES = 30

# Standard library only, run with `python -I -S`, like the servers' watchdog: it blocks reading a
# pipe whose only write end is ours, so our exit, however it happens, ends the read. The program's
# pid file is removed by a clean stop before the pipe is closed, so a pid reused since is never
# signalled.
_WATCHDOG_SOURCE = """# pgconcord.sandbox proxy watchdog
import os, shutil, signal, sys, time

pid_file, directory = sys.argv[1:]
while os.read(0, 4096):
    pass
try:
    with open(pid_file) as source:
        pid = int(source.read())
except (OSError, ValueError):
    pid = None
if pid is not None:
    try:
        os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            os.killpg(pid, 0)
            time.sleep(0.05)
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass
shutil.rmtree(directory, ignore_errors=True)
"""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on, from the servers' range and ledger."""
    return _choose_free_port()


def release_port(port: int) -> None:
    _release_port(port)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_up_stale_programs() -> None:
    """Stops and removes what runs of ours that were killed with their watchdogs left behind.

    A directory is stale when the process that made it is gone; its program is signalled only
    if its working directory is still that directory (a pid may have been reused since).
    """
    for directory in SANDBOX_PARENT.glob(f"{_DIRECTORY_PREFIX}*"):
        try:
            owner = int((directory / _OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue
        if _process_alive(owner):
            continue
        with contextlib.suppress(OSError, ValueError):
            pid = int((directory / _PID_FILE).read_text())
            # Every program is started in its directory (launch), and stays there.
            if os.readlink(f"/proc/{pid}/cwd") == str(directory):
                os.killpg(pid, signal.SIGKILL)
        shutil.rmtree(directory, ignore_errors=True)


class Program:
    """One program in the foreground, from a directory of its own, stopped by stop() or
    cleanup(), by the watchdog if we die, or by the next run's clean_up_stale_programs if both
    die. Also for a test's own subprocess (the agent) that must not outlive a killed run."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.directory = SANDBOX_PARENT / f"{_DIRECTORY_PREFIX}{label}-{secrets.token_hex(4)}"
        self.log_file = self.directory / "program.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._watchdog: subprocess.Popen[bytes] | None = None
        self._watchdog_pipe: IO[bytes] | None = None

    def prepare(self) -> None:
        """Makes the directory and starts the watchdog; files go in before launch()."""
        clean_up_stale_programs()
        self.directory.mkdir(mode=0o755)
        # mkdir applies the umask; the program, running as the servers' user, reads its files.
        self.directory.chmod(0o755)
        account = _server_account()
        if account is not None:
            os.chown(self.directory, account.uid, account.gid)
        (self.directory / _OWNER_FILE).write_text(str(os.getpid()))
        self._watchdog = subprocess.Popen(
            [
                sys.executable,
                "-I",
                "-S",
                "-c",
                _WATCHDOG_SOURCE,
                str(self.directory / _PID_FILE),
                str(self.directory),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd="/",
            start_new_session=True,
        )
        self._watchdog_pipe = self._watchdog.stdin

    def write_file(self, name: str, text: str, *, private: bool = False) -> Path:
        """A file for the program, readable by it (and only by it when private)."""
        path = self.directory / name
        path.touch(mode=0o600)
        path.chmod(0o600)
        account = _server_account()
        if account is not None:
            os.chown(path, account.uid, account.gid)
        path.write_text(text)
        if not private:
            path.chmod(0o644)
        return path

    def launch(
        self,
        arguments: Sequence[str | Path],
        *,
        as_server_user: bool = True,
        environment: Mapping[str, str] | None = None,
    ) -> None:
        """Starts the program, its output to log_file; as the servers' OS user when we are root,
        unless as_server_user is false (a program that reads files only we may read)."""
        account = _server_account() if as_server_user else None
        with self.log_file.open("ab") as log:
            self.process = subprocess.Popen(
                [str(argument) for argument in arguments],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.directory,
                env=dict(environment) if environment is not None else _server_environment(),
                # Its own session: a stop signals the whole group, and Ctrl-C aimed at the
                # tests does not reach it before its stop does.
                start_new_session=True,
                user=account.uid if account else None,
                group=account.gid if account else None,
                extra_groups=[] if account else None,
            )
        (self.directory / _PID_FILE).write_text(str(self.process.pid))

    @property
    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self) -> str:
        try:
            lines = self.log_file.read_text(errors="replace").splitlines()
        except OSError as error:
            return f"(no log: {error})"
        return "\n".join(lines[-_LOG_TAIL_LINES:])

    def check_running(self, what: str) -> None:
        if not self.is_running:
            raise FatalError(
                f"{self.label} exited while {what}; last lines of its log:\n{self.log_tail()}"
            )

    def stop(self) -> int | None:
        """Stops the program with SIGTERM to its process group (SIGKILL if it lingers) and
        returns its exit status (None if it never started); the directory stays."""
        process = self.process
        if process is None:
            return None
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=_STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        # Before the watchdog's pipe closes: it must not signal a pid that may be reused.
        (self.directory / _PID_FILE).unlink(missing_ok=True)
        return process.returncode

    def cleanup(self) -> None:
        """Stops the program and removes its directory; safe to call more than once."""
        try:
            self.stop()
        finally:
            end_watchdog(self._watchdog, self._watchdog_pipe, _STOP_TIMEOUT_SECONDS)
            self._watchdog = self._watchdog_pipe = None
            shutil.rmtree(self.directory, ignore_errors=True)


def _wait_for_port(program: Program, port: int) -> None:
    deadline = time.monotonic() + _START_TIMEOUT_SECONDS
    while True:
        program.check_running(f"starting to listen on 127.0.0.1:{port}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.settimeout(1.0)
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        if time.monotonic() > deadline:
            raise FatalError(
                f"{program.label} does not listen on 127.0.0.1:{port} after "
                f"{_START_TIMEOUT_SECONDS:.0f} s; last lines of its log:\n"
                f"{program.log_tail()}"
            )
        time.sleep(0.05)


# -- HAProxy --------------------------------------------------------------------------------

# What only a system-wide HAProxy does: it switches user and detaches itself, and it logs to
# syslog; here the program runs as the servers' user already, in the foreground, logging to
# its standard error, which goes to the run's log file.
_HAPROXY_GLOBAL_DROPPED = {"daemon", "user", "group", "chroot", "pidfile", "log", "stats"}


def haproxy_config(
    recipe: str,
    *,
    listen_port: int,
    servers: Mapping[str, int],
    agent_port: int,
    stats_socket: Path,
) -> str:
    """The recipe's HAProxy configuration with the test's addresses and files: the listener on
    listen_port, server line NAME to 127.0.0.1:servers[NAME], the health check's connection to
    the agent (`tcp-check connect port N`) to agent_port.

    The recipe's server lines must be exactly `servers`, with one bind line and one check of
    the agent's port: if the recipe changes shape, this refuses rather than run something else.
    """
    output: list[str] = []
    section = ""
    bind_lines = agent_checks = 0
    seen: set[str] = set()
    for line in recipe.splitlines():
        words = line.split()
        if not words or words[0].startswith("#"):
            output.append(line)
            continue
        if not line[:1].isspace():
            section = words[0]
            output.append(line)
            if section == "global":
                output.append("    log stderr format short local0 info")
                output.append(f"    stats socket {stats_socket} mode 600 level admin")
            continue
        if section == "global" and words[0] in _HAPROXY_GLOBAL_DROPPED:
            continue
        if words[0] == "bind":
            bind_lines += 1
            line = f"    bind 127.0.0.1:{listen_port}"
        elif words[:2] == ["tcp-check", "connect"] and "port" in words:
            agent_checks += 1
            port = words[words.index("port") + 1]
            line = line.replace(f" port {port}", f" port {agent_port}", 1)
        elif words[0] == "server":
            name = words[1]
            if name not in servers:
                raise ValueError(f"the recipe's server {name!r} is not one of {sorted(servers)}")
            seen.add(name)
            line = line.replace(f" {words[2]}", f" 127.0.0.1:{servers[name]}", 1)
        output.append(line)
    if bind_lines != 1 or agent_checks != 1:
        raise ValueError(
            f"the recipe has {bind_lines} bind lines and {agent_checks} checks of the agent's"
            " port (`tcp-check connect port N`), not one of each"
        )
    if seen != set(servers):
        raise ValueError(f"the recipe has no server line for {sorted(set(servers) - seen)}")
    return "\n".join(output) + "\n"


class HAProxy(Program):
    """HAProxy from the recipe, listening on a free port of 127.0.0.1, its admin socket in its
    directory, so that a test reads what it thinks of each server."""

    def __init__(self, recipe: Path, *, servers: Mapping[str, int], agent_port: int) -> None:
        super().__init__("haproxy")
        self.recipe = recipe
        self.servers = dict(servers)
        self.agent_port = agent_port
        self.port = free_port()
        self.stats_socket = self.directory / "admin.sock"

    def __enter__(self) -> HAProxy:
        return self.start()

    def __exit__(
        self,
        exception_type: type[BaseException] | None,
        exception: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.cleanup()

    def start(self) -> HAProxy:
        if not HAPROXY_PROGRAM.exists():
            raise FatalError(f"no {HAPROXY_PROGRAM}: install Debian's haproxy (./run test does)")
        self.prepare()
        configuration = self.write_file(
            "haproxy.cfg",
            haproxy_config(
                self.recipe.read_text(),
                listen_port=self.port,
                servers=self.servers,
                agent_port=self.agent_port,
                stats_socket=self.stats_socket,
            ),
        )
        checked = subprocess.run(
            [str(HAPROXY_PROGRAM), "-c", "-q", "-f", str(configuration)],
            capture_output=True,
            text=True,
            check=False,
        )
        if checked.returncode != 0:
            raise FatalError(f"HAProxy refuses {configuration}: {checked.stderr.strip()}")
        # -db: stay in the foreground, in our process group of one, until signalled.
        self.launch([HAPROXY_PROGRAM, "-db", "-f", configuration])
        _wait_for_port(self, self.port)
        return self

    def command(self, line: str) -> str:
        """One command on HAProxy's admin socket ("show stat", "disable server ...")."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
            connection.settimeout(5.0)
            connection.connect(str(self.stats_socket))
            connection.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := connection.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def server_states(self) -> dict[str, str]:
        """HAProxy's view of each server: "UP", "DOWN", or on the way ("UP 1/2", "DOWN 1/3")."""
        text = self.command("show stat").lstrip("# ")
        states: dict[str, str] = {}
        for row in _csv_rows(text):
            if row.get("svname") in self.servers:
                states[row["svname"]] = row["status"]
        return states

    def cleanup(self) -> None:
        try:
            super().cleanup()
        finally:
            release_port(self.port)


def _csv_rows(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


# -- PgBouncer ------------------------------------------------------------------------------

# What a run must not share with a system-wide PgBouncer (Debian's log, pid and socket files),
# and the lookup of logins in the database, which the recipe does not use.
_PGBOUNCER_DROPPED = {"auth_user", "auth_query", "auth_hba_file", "logfile", "pidfile", "user"}


def pgbouncer_config(
    recipe: str,
    *,
    listen_port: int,
    database: str,
    server_port: int,
    auth_file: Path,
    trust: bool = False,
    server_host: str = "127.0.0.1",
) -> str:
    """The recipe's PgBouncer configuration for one sandbox server: its [pgbouncer] settings
    (authentication, pooling, timeouts, retries) with the test's addresses and auth_file, and
    one database entry for the test's database on that server; trust: no password asked, for
    roles the sandbox's servers trust."""
    parser = configparser.ConfigParser(interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(recipe)
    if not parser.has_section("pgbouncer") or not parser.has_section("databases"):
        raise ValueError("the recipe lacks a [databases] or a [pgbouncer] section")
    settings = parser["pgbouncer"]
    if "auth_file" not in settings:
        raise ValueError("the recipe's PgBouncer has no auth_file")
    for name in _PGBOUNCER_DROPPED:
        settings.pop(name, None)
    settings["listen_addr"] = "127.0.0.1"
    settings["listen_port"] = str(listen_port)
    settings["unix_socket_dir"] = ""
    settings["auth_file"] = str(auth_file)
    if trust:
        settings["auth_type"] = "trust"
    parser.remove_section("databases")
    parser.add_section("databases")
    parser["databases"][database] = f"host={server_host} port={server_port} dbname={database}"
    text = io.StringIO()
    parser.write(text)
    return text.getvalue()


_AUTH_LINE = re.compile(r'"[A-Za-z_][A-Za-z0-9_]*" "[^"\n]*"')


class PgBouncer(Program):
    """PgBouncer from the recipe in front of one sandbox server's database, on a free port.

    auth_lines are its auth file's lines, as the README's query prints them from pg_authid
    (`"role" "SCRAM-SHA-256$..."`), for the recipe's SCRAM logins; with trust, `"role" ""` for
    each role that may log in (PgBouncer still admits only the roles its auth file names).
    """

    def __init__(
        self,
        recipe: Path,
        *,
        name: str,
        database: str,
        server_port: int,
        auth_lines: Sequence[str],
        trust: bool = False,
    ) -> None:
        super().__init__(f"pgbouncer-{name}")
        for line in auth_lines:
            if not _AUTH_LINE.fullmatch(line):
                # Not shown: it may hold a verifier.
                raise ValueError('a line for PgBouncer\'s auth file is not \'"role" "secret"\'')
        self.recipe = recipe
        self.database = database
        self.server_port = server_port
        self.auth_lines = list(auth_lines)
        self.trust = trust
        self.port = free_port()

    def __enter__(self) -> PgBouncer:
        return self.start()

    def __exit__(
        self,
        exception_type: type[BaseException] | None,
        exception: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.cleanup()

    def start(self) -> PgBouncer:
        if not PGBOUNCER_PROGRAM.exists():
            raise FatalError(
                f"no {PGBOUNCER_PROGRAM}: install Debian's pgbouncer (./run test does)"
            )
        self.prepare()
        # Verifiers are no passwords, but no business of other local users either.
        auth_file = self.write_file(
            "userlist.txt", "".join(f"{line}\n" for line in self.auth_lines), private=True
        )
        configuration = self.write_file(
            "pgbouncer.ini",
            pgbouncer_config(
                self.recipe.read_text(),
                listen_port=self.port,
                database=self.database,
                server_port=self.server_port,
                auth_file=auth_file,
                trust=self.trust,
            ),
        )
        self.launch([PGBOUNCER_PROGRAM, configuration])
        _wait_for_port(self, self.port)
        return self

    def cleanup(self) -> None:
        try:
            super().cleanup()
        finally:
            release_port(self.port)
