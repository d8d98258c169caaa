"""One throwaway server's life: its sandbox directory, port and configuration, start, stop,
crash and cleanup, and the watchdog that removes the sandbox should this process die first."""

from __future__ import annotations

import atexit
import os
import random
import re
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import IO

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from pgconcord import tools
from pgconcord.errors import FatalError
from pgconcord.sandbox.binaries import (
    SANDBOX_PARENT,
    PostgresBinaries,
    _run_as_server_user,
    _server_account,
    _ServerCommand,
    find_binaries,
)

PASSWORD_LOGIN_ROLE = "password_login"

# Ports below Linux's default ephemeral range (32768-60999), so that the kernel does not hand our
# port to some client socket between choosing it and a (re)start of the server.
_PORT_RANGE = range(20000, 32768)
# Several processes making sandboxes at once (the test suite's workers) each take their own
# slice "INDEX/COUNT" of the range: a port is only reserved within one process, and a server
# stopped for a while keeps its port for its restart.
PORT_SLICE_VARIABLE = "PGCONCORD_SANDBOX_PORT_SLICE"


def _port_range() -> range:
    text = os.environ.get(PORT_SLICE_VARIABLE, "")
    index, slash, count = text.partition("/")
    if not (slash and index.isdigit() and count.isdigit() and int(index) < int(count)):
        return _PORT_RANGE
    width = len(_PORT_RANGE) // int(count)
    start = _PORT_RANGE.start + int(index) * width
    return range(start, start + width)


_PORT_ATTEMPTS = 200
_LOG_TAIL_LINES = 30
_SERVER_TIMEOUT_SECONDS = 60
_POLL_SECONDS = 0.005  # how often start and stop look whether the server is there (gone)

# The watchdog is kept to the standard library and run with `python -I -S` so that it starts in a
# few milliseconds and does not depend on pgconcord being importable, nor on what the package
# imports. It blocks reading its standard input, a pipe whose only write end stays in the parent
# (pipes are not inherited by other children): when the parent exits, however it exits, the read
# returns end-of-file. A standard input works the same on Windows, where pass_fds does not.
_WATCHDOG_SOURCE = """# pgconcord.sandbox watchdog
import os, shutil, subprocess, sys

pg_ctl, data_directory, sandbox_directory, uid, gid = sys.argv[1:]
while os.read(0, 4096):
    pass
if os.path.exists(os.path.join(data_directory, "postmaster.pid")):
    switch = {"user": int(uid), "group": int(gid), "extra_groups": []} if uid else {}
    subprocess.run(
        [pg_ctl, "stop", "-D", data_directory, "-m", "immediate", "-w"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        cwd="/", **switch,
    )
shutil.rmtree(sandbox_directory, ignore_errors=True)
"""


_ports_lock = threading.Lock()
_ports_in_use: set[int] = set()


def _choose_free_port() -> int:
    with _ports_lock:
        ports = _port_range()
        for _ in range(_PORT_ATTEMPTS):
            port = random.choice(ports)
            if port in _ports_in_use:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                try:
                    probe.bind(("127.0.0.1", port))
                except OSError:
                    continue
            _ports_in_use.add(port)
            return port
    raise FatalError(f"no free TCP port on 127.0.0.1 in {ports.start}-{ports.stop - 1}")


def _release_port(port: int) -> None:
    with _ports_lock:
        _ports_in_use.discard(port)


def end_watchdog(
    watchdog: subprocess.Popen[bytes] | None, pipe: IO[bytes] | None, timeout: float
) -> None:
    """Close a watchdog's pipe, which makes it do its cleanup, and wait for it (killed after
    timeout seconds)."""
    if pipe is not None:
        pipe.close()
    if watchdog is not None:
        try:
            watchdog.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            watchdog.kill()
            watchdog.wait()


def _config_value(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


_SETTING_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")


class Server:
    """One throwaway PostgreSQL cluster in its own directory under /tmp.

    Not thread-safe per instance; different instances may be used from different threads.
    A process forked (without exec) after start keeps the watchdog's pipe open, so a SIGKILL of
    the parent is only noticed once such children have exited too.
    """

    host = "127.0.0.1"
    superuser = "postgres"

    def __init__(
        self,
        binaries: PostgresBinaries | None = None,
        *,
        name: str = "node",
        fsync: bool = False,
        settings: Mapping[str, str] | None = None,
    ) -> None:
        self.binaries = binaries if binaries is not None else find_binaries()
        self.name = name
        self.fsync = fsync
        self.settings = dict(settings or {})
        for setting in self.settings:
            if not _SETTING_NAME.fullmatch(setting):
                raise ValueError(f"invalid PostgreSQL setting name: {setting!r}")
        self.port = _choose_free_port()
        # The socket path (directory + "/.s.PGSQL.<port>") must stay under 107 bytes.
        label = re.sub(r"[^A-Za-z0-9_-]", "_", name)[:32]
        self.sandbox_directory = SANDBOX_PARENT / f"pgconcord-{label}-{secrets.token_hex(4)}"
        self.data_directory = self.sandbox_directory / "data"
        self.log_file = self.sandbox_directory / "server.log"
        self._watchdog: subprocess.Popen[bytes] | None = None
        self._watchdog_pipe: IO[bytes] | None = None
        self._owner_process_id = os.getpid()
        self._password_login_role_missing = False

    def __repr__(self) -> str:
        return (
            f"Server(name={self.name!r}, port={self.port}, "
            f"version={self.binaries.major_version}, directory={str(self.sandbox_directory)!r})"
        )

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(
        self,
        exception_type: type[BaseException] | None,
        exception: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.cleanup()

    @property
    def is_running(self) -> bool:
        try:
            process_id = int((self.data_directory / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return False
        if tools.WINDOWS:
            # os.kill(pid, 0) would terminate the process there; pg_ctl knows (3: not running).
            status = _run_as_server_user(
                [self.binaries.program("pg_ctl"), "status", "-D", self.data_directory]
            )
            return status.returncode == 0
        try:
            os.kill(process_id, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def dsn(self, dbname: str = "postgres", user: str | None = None) -> str:
        return make_conninfo(
            host=self.host, port=self.port, dbname=dbname, user=user or self.superuser
        )

    def start(self) -> Server:
        """Initializes the cluster on first use, starts it, waits until it accepts connections."""
        if self.is_running:
            return self
        if not (self.data_directory / "PG_VERSION").exists():
            self._initialize()
            self._password_login_role_missing = True
        # pg_ctl's own wait looks at the server every 100 ms: ready is seen here within a few
        # (the tests start servers again after each crash, hundreds of times), and pg_ctl,
        # still waiting, reports a server that did not start.
        launched = time.time()
        command = _ServerCommand(
            [
                self.binaries.program("pg_ctl"),
                "start",
                "-D",
                self.data_directory,
                "-l",
                self.log_file,
                "-w",
                "-t",
                str(_SERVER_TIMEOUT_SECONDS),
                "-s",
            ],
            cwd=self.sandbox_directory,
        )
        while command.poll() is None:
            if self._ready_since(launched):
                command.leave()
                break
            time.sleep(_POLL_SECONDS)
        else:
            result = command.result()
            if result.returncode != 0:
                raise FatalError(
                    f"PostgreSQL {self.binaries.major_version} server {self.name!r} did not"
                    f" start on port {self.port}: {(result.stderr or result.stdout).strip()}\n"
                    f"last lines of {self.log_file}:\n{self._log_tail()}"
                )
        if self._password_login_role_missing:
            with psycopg.connect(self.dsn(), autocommit=True) as connection:
                connection.execute(
                    sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(PASSWORD_LOGIN_ROLE))
                )
            self._password_login_role_missing = False
        return self

    def stop(self) -> None:
        """Stops the server cleanly; data is kept and start() brings it back."""
        self._stop("fast")

    def crash(self) -> None:
        """Stops the server without a shutdown checkpoint, so the next start runs crash recovery.

        With fsync=False, synchronous_commit is off as well: the last fraction of a second of
        acknowledged commits may be lost, as after a real crash with that setting.
        """
        self._stop("immediate")

    def restart(self) -> None:
        self.stop()
        self.start()

    def cleanup(self) -> None:
        """Stops the server if it runs and deletes the sandbox; safe to call more than once."""
        try:
            if self.is_running:
                self._stop("immediate")
        finally:
            # Even if the stop failed: a postmaster whose lock file is gone shuts itself down.
            shutil.rmtree(self.sandbox_directory, ignore_errors=True)
            self._stop_watchdog()
            _release_port(self.port)
            with _servers_lock:
                _servers_to_clean_up.discard(self)

    def create_database(self, name: str, template: str | None = None) -> str:
        """Creates a database and returns its DSN; a template must have no open connections."""
        statement = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if template is not None:
            statement += sql.SQL(" TEMPLATE {}").format(sql.Identifier(template))
        with psycopg.connect(self.dsn(), autocommit=True) as connection:
            connection.execute(statement)
        return self.dsn(name)

    def drop_database(self, name: str) -> None:
        """Drops a database if it exists, disconnecting its sessions."""
        with psycopg.connect(self.dsn(), autocommit=True) as connection:
            # A logical slot (pgconcord's WAL capture) keeps a database from being dropped;
            # replication origins belong to the server and would pile up.
            oid = connection.execute(
                "SELECT oid FROM pg_database WHERE datname = %s", (name,)
            ).fetchone()
            if oid is not None:
                connection.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s"
                    " AND pid <> pg_backend_pid()",
                    (name,),
                )
                # A terminated session lets go of its slot and its replication origin as it
                # exits, which takes a moment: dropping either before that is refused.
                for _ in range(200):
                    busy = connection.execute(
                        "SELECT (SELECT count(*) FROM pg_stat_activity WHERE datname = %s"
                        " AND pid <> pg_backend_pid())"
                        " + (SELECT count(*) FROM pg_replication_slots"
                        " WHERE database = %s AND active)",
                        (name, name),
                    ).fetchone()
                    if not busy or not busy[0]:
                        break
                    time.sleep(0.05)
                connection.execute(
                    "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
                    " WHERE database = %s",
                    (name,),
                )
                connection.execute(
                    "SELECT pg_replication_origin_drop(roname) FROM pg_replication_origin"
                    " WHERE roname LIKE %s",
                    (f"pgconcord\\_{oid[0]}\\_%",),
                )
            connection.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )

    def _initialize(self) -> None:
        self._create_sandbox_directory()
        initdb: list[str | Path] = [
            self.binaries.program("initdb"),
            "-D",
            self.data_directory,
            "-U",
            self.superuser,
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
        ]
        if not self.fsync:
            initdb.append("--no-sync")
        result = _run_as_server_user(initdb, cwd=self.sandbox_directory)
        if result.returncode != 0:
            # A half-written data directory would make every later attempt fail the same way.
            shutil.rmtree(self.data_directory, ignore_errors=True)
            raise FatalError(
                f"initdb failed for PostgreSQL server {self.name!r}: "
                f"{(result.stderr or result.stdout).strip()}"
            )
        self._write_configuration()

    def _create_sandbox_directory(self) -> None:
        if self._watchdog is not None:
            return
        # Fails rather than adopts a directory that is already there, someone else's perhaps.
        self.sandbox_directory.mkdir(mode=0o755)
        # mkdir applies the umask, but clients of the Unix socket and readers of the log need in.
        self.sandbox_directory.chmod(0o755)
        account = _server_account()
        if account is not None:
            os.chown(self.sandbox_directory, account.uid, account.gid)
        with _servers_lock:
            _servers_to_clean_up.add(self)
        self._start_watchdog()

    def _start_watchdog(self) -> None:
        account = _server_account()
        self._watchdog = subprocess.Popen(
            [
                sys.executable,
                "-I",
                "-S",
                "-c",
                _WATCHDOG_SOURCE,
                str(self.binaries.program("pg_ctl")),
                str(self.data_directory),
                str(self.sandbox_directory),
                str(account.uid) if account else "",
                str(account.gid) if account else "",
            ],
            # Its write end is ours alone (the pipe is not inherited by other children), so
            # our exit is the only thing that closes it.
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=SANDBOX_PARENT.anchor,
            # A session (a process group on Windows) of its own, so that Ctrl-C or a hang-up
            # aimed at us does not reach it.
            start_new_session=not tools.WINDOWS,
            creationflags=getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0),
        )
        self._watchdog_pipe = self._watchdog.stdin

    def _stop_watchdog(self) -> None:
        end_watchdog(self._watchdog, self._watchdog_pipe, _SERVER_TIMEOUT_SECONDS)
        self._watchdog = self._watchdog_pipe = None

    def _write_configuration(self) -> None:
        lines = [
            "",
            "# Written by pgconcord.sandbox; later lines override earlier ones.",
            "listen_addresses = '127.0.0.1'",
            f"port = {self.port}",
            # Clients connect over TCP (dsn()); on Windows a socket path is of no use.
            "unix_socket_directories = "
            + _config_value("" if tools.WINDOWS else str(self.sandbox_directory)),
            "max_connections = 100",
            "shared_buffers = '128MB'",
            "wal_level = logical",
            # A slot per database in WAL mode, each streamed by an agent (capture.stream).
            "max_wal_senders = 40",
            "max_replication_slots = 40",
            "logging_collector = off",
            "log_destination = 'stderr'",
        ]
        if not self.fsync:
            # synchronous_commit stays on (it costs nothing without fsync): a commit is then
            # flushed before it is seen, as WAL capture expects (capture.wal).
            lines += ["fsync = off", "full_page_writes = off"]
        lines += [f"{name} = {_config_value(value)}" for name, value in self.settings.items()]
        with (self.data_directory / "postgresql.conf").open("a") as configuration:
            configuration.write("\n".join(lines) + "\n")
        # First match wins: members of password_login must authenticate, everyone else is trusted.
        role = f"+{PASSWORD_LOGIN_ROLE}"
        (self.data_directory / "pg_hba.conf").write_text(
            "# Written by pgconcord.sandbox.\n"
            f"host    all          {role}  127.0.0.1/32  scram-sha-256\n"
            f"host    replication  {role}  127.0.0.1/32  scram-sha-256\n"
            "host    all          all              127.0.0.1/32  trust\n"
            "host    replication  all              127.0.0.1/32  trust\n"
            "host    all          all              ::1/128       trust\n"
            "host    replication  all              ::1/128       trust\n"
            "local   all          all                            trust\n"
            "local   replication  all                            trust\n"
        )

    def _stop(self, mode: str) -> None:
        if not self.is_running:
            return
        # Signalled without pg_ctl's wait (it looks every 100 ms): the postmaster's lock file
        # is gone a few milliseconds after an immediate stop.
        result = _run_as_server_user(
            [
                self.binaries.program("pg_ctl"),
                "stop",
                "-D",
                self.data_directory,
                "-m",
                mode,
                "-W",
                "-s",
            ],
            cwd=self.sandbox_directory,
        )
        if result.returncode != 0 and self.is_running:
            raise FatalError(
                f"could not stop PostgreSQL server {self.name!r} ({mode}): "
                f"{(result.stderr or result.stdout).strip()}\n"
                f"last lines of {self.log_file}:\n{self._log_tail()}"
            )
        deadline = time.monotonic() + _SERVER_TIMEOUT_SECONDS
        while self.is_running:
            if time.monotonic() > deadline:
                raise FatalError(
                    f"PostgreSQL server {self.name!r} did not stop ({mode}) within"
                    f" {_SERVER_TIMEOUT_SECONDS} s\nlast lines of {self.log_file}:\n"
                    f"{self._log_tail()}"
                )
            time.sleep(_POLL_SECONDS)

    def _ready_since(self, launched: float) -> bool:
        """The postmaster's lock file says it accepts connections, and is that of a postmaster
        started since `launched` (as pg_ctl tells its server from a stale file's)."""
        try:
            lines = (self.data_directory / "postmaster.pid").read_text().splitlines()
        except OSError:
            return False
        # Lines 1, 3 and 8: its process id, start time and status (PostgreSQL's pidfile.h).
        if len(lines) < 8 or lines[7].strip() != "ready":
            return False
        try:
            started = int(lines[2])
        except ValueError:
            return False
        return started >= int(launched) - 2 and self.is_running

    def _log_tail(self) -> str:
        try:
            lines = self.log_file.read_text(errors="replace").splitlines()
        except OSError as error:
            return f"(no log: {error})"
        return "\n".join(lines[-_LOG_TAIL_LINES:])


_servers_lock = threading.Lock()
_servers_to_clean_up: set[Server] = set()


def _clean_up_servers_at_exit() -> None:
    with _servers_lock:
        servers = list(_servers_to_clean_up)
    for server in servers:
        # A child forked from the owner inherits this handler but not the servers.
        if server._owner_process_id != os.getpid():
            continue
        try:
            server.cleanup()
        except Exception as error:  # the watchdog still removes what is left
            print(f"pgconcord.sandbox: cleanup of {server!r} failed: {error}", file=sys.stderr)


atexit.register(_clean_up_servers_at_exit)
