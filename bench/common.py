"""Shared helpers for the pgconcord benchmarks (bench/*.py).

Everything here runs against real throwaway PostgreSQL servers from pgconcord.sandbox. The
pgconcord agent runs in a child process (``python bench/common.py agent CONFIG LOG``) so that
its Python work neither shares a GIL with the measuring threads nor hides from the CPU budget
of the machine: its cost lands where it would in production, on the same two cores.

Run as a script with ``agent`` it is that child; imported, it is the helper library.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import logging
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from pgconcord.sandbox import Server

BENCH_DIRECTORY = Path(__file__).resolve().parent
_STARTED = time.perf_counter()


# -- output ----------------------------------------------------------------------------------


def progress(message: str) -> None:
    """One line of progress on stderr (results go to stdout)."""
    print(f"[{time.perf_counter() - _STARTED:7.1f}s] {message}", file=sys.stderr, flush=True)


def load_note() -> str:
    """The machine's load averages: other work on the 2 cores skews absolute numbers."""
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} CPUs"


def median(values: Iterable[float]) -> float:
    found = list(values)
    return statistics.median(found) if found else float("nan")


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile (fraction in 0..1) of values; nan when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-fraction * len(ordered) // 1))))
    return ordered[rank - 1]


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A plain aligned text table on stdout."""
    cells = [[str(h) for h in headers]] + [[_cell(value) for value in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    print()
    print(title)
    for index, row in enumerate(cells):
        print(
            "  ".join(
                value.ljust(widths[i]) if i == 0 else value.rjust(widths[i])
                for i, value in enumerate(row)
            )
        )
        if index == 0:
            print("  ".join("-" * width for width in widths))
    sys.stdout.flush()


def _cell(value: object) -> str:
    if isinstance(value, float):
        if value != value:  # nan
            return "-"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


# -- waiting ---------------------------------------------------------------------------------


class DeadlineExceeded(RuntimeError):
    pass


class AgentStalled(RuntimeError):
    """The pgconcord agent reported that it cannot apply (the measurement cannot complete)."""


def wait_until(
    condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.01
) -> float:
    """Poll condition until it holds; returns the seconds waited. Raises DeadlineExceeded."""
    started = time.perf_counter()
    deadline = started + timeout
    while True:
        if condition():
            return time.perf_counter() - started
        if time.perf_counter() > deadline:
            raise DeadlineExceeded(f"{what}: not reached within {timeout:.0f} s")
        time.sleep(interval)


# -- servers and SQL ---------------------------------------------------------------------------


def start_servers(names: Sequence[str], *, fsync: bool = True, **settings: str) -> list[Server]:
    """Start one sandbox server per name, in parallel; all cleaned up at interpreter exit."""
    servers = [Server(name=name, fsync=fsync, settings=settings or None) for name in names]
    errors: list[BaseException] = []

    def start(server: Server) -> None:
        try:
            server.start()
        except BaseException as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=start, args=(server,)) for server in servers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        for server in servers:
            server.cleanup()
        raise errors[0]
    return servers


def connect(dsn: str, autocommit: bool = True) -> psycopg.Connection[Any]:
    return psycopg.connect(dsn, autocommit=autocommit, application_name="bench")


def execute(dsn: str, *statements: str | sql.Composable) -> None:
    with connect(dsn) as connection:
        for statement in statements:
            connection.execute(statement)  # type: ignore[arg-type]


def scalar(dsn: str, query: str | sql.Composable, parameters: Sequence[Any] = ()) -> Any:
    with connect(dsn) as connection:
        row = connection.execute(query, parameters).fetchone()  # type: ignore[arg-type]
    return None if row is None else row[0]


def checkpoint(*servers: Server) -> None:
    for server in servers:
        execute(server.dsn(), "CHECKPOINT")


# Logged by our own teardown (DROP SUBSCRIPTION / DROP DATABASE ... WITH (FORCE)).
EXPECTED_LOG_LINES = (
    "terminating logical replication worker due to administrator command",
    "terminating connection due to administrator command",
    "terminating autovacuum process due to administrator command",
)


def log_problems(server: Server, since: int = 0) -> dict[str, int]:
    """Distinct WARNING/ERROR/FATAL/PANIC messages the server logged after byte offset since,
    with their counts (timestamps and process ids stripped)."""
    try:
        with server.log_file.open("rb") as log_file:
            log_file.seek(since)
            text = log_file.read().decode(errors="replace")
    except OSError:
        return {}
    found: dict[str, int] = {}
    for line in text.splitlines():
        match = re.search(r"\b(WARNING|ERROR|FATAL|PANIC):\s+(.*)", line)
        if match and not any(expected in line for expected in EXPECTED_LOG_LINES):
            key = f"{match.group(1)}: {match.group(2)}"
            found[key] = found.get(key, 0) + 1
    return found


def report_server_logs(servers: Sequence[Server], offsets: dict[str, int]) -> None:
    for server in servers:
        problems = log_problems(server, offsets.get(server.name, 0))
        total = sum(problems.values())
        print(f"\nserver {server.name} log: {total} WARNING/ERROR/FATAL lines")
        for message, count in sorted(problems.items(), key=lambda item: -item[1])[:8]:
            print(f"  [{count}x] {message[:250]}")
    sys.stdout.flush()


def log_size(server: Server) -> int:
    try:
        return server.log_file.stat().st_size
    except OSError:
        return 0


# -- pgbench ---------------------------------------------------------------------------------


def _client_environment() -> dict[str, str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    environment["LC_ALL"] = "C"
    return environment


def _pgbench_base(server: Server, dbname: str) -> list[str]:
    executable = shutil.which("pgbench")
    if executable is None:
        raise SystemExit("pgbench is not on PATH (apt-get install postgresql-client)")
    return [executable, "-h", server.host, "-p", str(server.port), "-U", "postgres", dbname]


def pgbench_init(server: Server, dbname: str, scale: int) -> None:
    command = _pgbench_base(server, dbname)
    command[1:1] = ["-i", "-s", str(scale), "-q"]
    result = subprocess.run(
        command, capture_output=True, text=True, env=_client_environment(), check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"pgbench -i failed: {result.stderr.strip()}")


def pgbench_command(
    server: Server, dbname: str, *, clients: int, seconds: float, extra: Sequence[str] = ()
) -> list[str]:
    command = _pgbench_base(server, dbname)
    # -n: no vacuum/truncate by pgbench itself (TRUNCATE is refused on a pgconcord-replicated
    # table; the callers vacuum the same tables themselves on every database alike).
    command[1:1] = [
        "-n",
        "-c",
        str(clients),
        "-j",
        str(min(clients, 2)),
        "-T",
        str(max(1, round(seconds))),
        *extra,
    ]
    return command


def pgbench_popen(
    server: Server, dbname: str, *, clients: int, seconds: float
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        pgbench_command(server, dbname, clients=clients, seconds=seconds),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_client_environment(),
    )


@dataclass
class PgbenchResult:
    tps: float
    transactions: int
    failed_output: str = ""


def pgbench_finish(process: subprocess.Popen[str]) -> PgbenchResult:
    stdout, stderr = process.communicate()
    output = stdout + stderr
    match = re.search(r"tps = ([0-9.]+) \(without initial connection time\)", output)
    processed = re.search(r"number of transactions actually processed: (\d+)", output)
    if process.returncode != 0 or match is None:
        raise RuntimeError(f"pgbench failed (exit {process.returncode}):\n{output.strip()}")
    return PgbenchResult(float(match.group(1)), int(processed.group(1)) if processed else 0)


def pgbench_run(server: Server, dbname: str, *, clients: int, seconds: float) -> PgbenchResult:
    return pgbench_finish(pgbench_popen(server, dbname, clients=clients, seconds=seconds))


def pgbench_transactions(server: Server, dbname: str, transactions: int) -> None:
    """Run exactly this many pgbench tpcb-like transactions, one client."""
    command = pgbench_command(server, dbname, clients=1, seconds=1)
    at = command.index("-T")
    command[at : at + 2] = ["-t", str(transactions)]
    result = subprocess.run(
        command, capture_output=True, text=True, env=_client_environment(), check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"pgbench failed: {result.stderr.strip()}")


def pgbench_database(server: Server, dbname: str, scale: int) -> str:
    """A pgbench database of that scale whose pgbench_history has a primary key (hid)."""
    dsn = server.create_database(dbname)
    pgbench_init(server, dbname, scale)
    execute(
        dsn,
        "ALTER TABLE pgbench_history ADD COLUMN hid bigserial PRIMARY KEY",
        "VACUUM ANALYZE",
    )
    return dsn


def wait_pgbench_connected(server: Server, dbname: str, clients: int, timeout: float = 30) -> None:
    """Wait until pgbench's clients are connected to the database."""
    query = (
        "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND application_name = 'pgbench'"
    )
    wait_until(
        lambda: int(scalar(server.dsn(), query, (dbname,))) >= clients,
        timeout,
        "pgbench clients connected",
        interval=0.02,
    )


# -- pgconcord ------------------------------------------------------------------------------


def concord_config_text(
    nodes: Sequence[tuple[str, str]],
    *,
    exclude: Sequence[str] = (),
    cluster: str = "bench",
    capture: str = "trigger",
) -> str:
    """A config naming these nodes; capture "trigger" unless asked (the benchmarks connect as
    the superuser, under which "auto" would capture from the WAL)."""
    lines = ["[cluster]", f'name = "{cluster}"']
    for name, dsn in nodes:
        lines += ["[[node]]", f'name = "{name}"', f"dsn = {_toml_string(dsn)}"]
    lines += ["[replication]", f"capture = {_toml_string(capture)}"]
    if exclude:
        lines.append('schemas = ["public"]')
        lines.append("exclude = [" + ", ".join(_toml_string(t) for t in exclude) + "]")
    return "\n".join(lines) + "\n"


def _toml_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def concord_setup(config_text: str) -> None:
    from pgconcord import install
    from pgconcord.config import parse_config

    install.setup(parse_config(config_text, "bench"))


def pgconcord_sessions(dsn: str) -> int:
    return int(
        scalar(
            dsn,
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE application_name = 'pgconcord' AND datname = current_database()",
        )
    )


class AgentProcess:
    """The pgconcord agent replicating a config, in a child process, logging at WARNING."""

    def __init__(self, config_text: str, label: str = "agent") -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="pgconcord-bench-"))
        atexit.register(shutil.rmtree, self.directory, True)
        self.config_path = self.directory / "cluster.toml"
        self.config_path.write_text(config_text)
        self.log_path = self.directory / f"{label}.log"
        self.label = label
        self.process: subprocess.Popen[str] | None = None
        self._log_offset = 0
        self._parked_checked_at = 0.0
        self.node_dsns: list[str] = []
        self.started_at = 0.0
        self.stopped_at = 0.0
        self.cpu_seconds = 0.0

    def start(self, ready_dsns: Sequence[str] = (), timeout: float = 30) -> AgentProcess:
        """Start the agent; wait until it is connected to every database in ready_dsns (whose
        parked changes, if pgconcord parks failed changes, check() then watches too)."""
        self.node_dsns = list(ready_dsns)
        self.process = subprocess.Popen(
            [
                sys.executable,
                str(Path(__file__)),
                "agent",
                str(self.config_path),
                str(self.log_path),
            ],
            # The child stops when this pipe closes, i.e. also when we die without stopping it.
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        atexit.register(self.stop)
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if line.strip() != "ready":
            rest = self.process.stdout.read() if self.process.poll() is not None else ""
            self.stop()
            raise RuntimeError(f"agent did not start: {line}{rest}{self.log_text()}")
        self.started_at = time.perf_counter()
        # Every pair has opened its connections (at least one per node and pair, plus LISTEN).
        for dsn in ready_dsns:
            wait_until(lambda dsn=dsn: pgconcord_sessions(dsn) >= 3, timeout, "agent connected")
        return self

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def check(self) -> None:
        """Raise AgentStalled if the agent died or logged that a pair stalled or hit a bug."""
        if self.process is not None and self.process.poll() is not None:
            raise AgentStalled(f"the agent process exited:\n{self.log_text()[-3000:]}")
        try:
            with self.log_path.open("rb") as log_file:
                log_file.seek(self._log_offset)
                fresh = log_file.read()
        except OSError:
            return
        self._log_offset += len(fresh)
        for line in fresh.decode(errors="replace").splitlines():
            if any(
                signal_text in line
                for signal_text in ("stalled", "unexpected error", " ERROR ", "parked a change")
            ):
                raise AgentStalled(line)
        now = time.perf_counter()
        if now - self._parked_checked_at >= 0.5:
            self._parked_checked_at = now
            for dsn in self.node_dsns:
                count, reason = parked_changes(dsn)
                if count:
                    raise AgentStalled(f"{count} changes parked at {dsn}: {reason}")

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.close()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.cpu_seconds = _child_cpu_seconds(self.log_path)
        self.stopped_at = time.perf_counter()
        if self.process.stdout is not None:
            self.process.stdout.close()
        self.process = None
        atexit.unregister(self.stop)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def warnings(self) -> list[str]:
        return [
            line
            for line in self.log_text().splitlines()
            if line and not line.startswith("cpu_seconds=")
        ]

    def __enter__(self) -> AgentProcess:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()


def _child_cpu_seconds(log_path: Path) -> float:
    try:
        for line in log_path.read_text().splitlines():
            if line.startswith("cpu_seconds="):
                return float(line.split("=", 1)[1])
    except (OSError, ValueError):
        pass
    return float("nan")


def report_agent(agent: AgentProcess, limit: int = 15) -> list[str]:
    """Print the agent's WARNING (and worse) log lines, de-duplicated; returns them all."""
    lines = agent.warnings()
    seen: dict[str, int] = {}
    for line in lines:
        # strip the timestamp so repeated messages collapse
        key = line.split(" ", 2)[-1] if line[:2].isdigit() else line
        seen[key] = seen.get(key, 0) + 1
    try:
        source = Path(str(agent.log_path) + ".source").read_text()
    except OSError:
        source = "unknown"
    print()
    print(f"agent ran {source}")
    print(
        f"agent log ({agent.label}): {len(lines)} warning/error lines,"
        f" agent CPU {agent.cpu_seconds:.1f} s"
    )
    for index, (text, count) in enumerate(seen.items()):
        if index >= limit:
            print(f"  ... {len(seen) - limit} more distinct lines in {agent.log_path}")
            break
        print(f"  [{count}x] {text[:300]}")
    sys.stdout.flush()
    return lines


def parked_changes(dsn: str) -> tuple[int, str]:
    """(changes pgconcord parked at this node because they failed to apply, one reason), or
    (0, "") where this pgconcord version has no parked_change table."""
    with connect(dsn) as connection:
        exists = connection.execute(
            "SELECT to_regclass('pgconcord.parked_change') IS NOT NULL"
        ).fetchone()
        if not exists or not exists[0]:
            return 0, ""
        row = connection.execute(
            "SELECT count(*), min(reason) FROM pgconcord.parked_change WHERE state = 'parked'"
        ).fetchone()
    assert row is not None
    return int(row[0]), str(row[1] or "")


def source_note() -> str:
    """Which pgconcord source is measured: its directory and a digest of its files (others may
    edit the package while a benchmark runs; the agent child reports its own digest)."""
    import hashlib

    import pgconcord

    package = Path(pgconcord.__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*")):
        if path.suffix in (".py", ".sql") and path.is_file():
            digest.update(path.relative_to(package).as_posix().encode())
            digest.update(path.read_bytes())
    return f"pgconcord from {package}, source digest {digest.hexdigest()[:12]}"


def change_log_state(dsn: str) -> tuple[int, int, int]:
    """(rows captured so far, rows present, total size in bytes) of pgconcord.change_log."""
    with connect(dsn) as connection:
        row = connection.execute(
            "SELECT coalesce(pg_sequence_last_value('pgconcord.change_log_id_seq'), 0),"
            " count(*), pg_total_relation_size('pgconcord.change_log') FROM pgconcord.change_log"
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1]), int(row[2])


# -- CPU accounting --------------------------------------------------------------------------

# Categories of CpuSnapshot keys (label, category).
PGCONCORD_SESSIONS = "pgconcord"  # client backends whose application_name is 'pgconcord'
APP_BACKENDS = "app"  # every other client backend (pgbench, the benchmark's own sessions)
OTHER_PROCESSES = "other"  # postmaster, checkpointer, walwriter, autovacuum, walsender, ...
AGENT = "agent"  # an AgentProcess (all its threads)
# CPU of a server's children that exited before a sample saw their last value (short-lived
# backends: a connection opened and closed within one interval), from the postmaster's cutime.
EXITED = "exited"
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
MB = 1024 * 1024


def _proc_stat(pid: int) -> tuple[int, int, float, float] | None:
    """(parent pid, start time in ticks, CPU seconds utime + stime, CPU seconds of its waited-for
    children cutime + cstime) of a process; None if it is gone (or this is not Linux)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat_file:
            text = stat_file.read()
    except OSError:
        return None
    fields = text.rsplit(b")", 1)[1].split()  # fields[0] is stat's field 3 (state)
    try:
        return (
            int(fields[1]),
            int(fields[19]),
            (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS,
            (int(fields[13]) + int(fields[14])) / _CLOCK_TICKS,
        )
    except (IndexError, ValueError):
        return None


def _proc_memory(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process in bytes, (0, 0) if it is gone."""
    found = {"VmRSS": 0, "VmHWM": 0}
    try:
        with open(f"/proc/{pid}/status") as status_file:
            for line in status_file:
                name, _, value = line.partition(":")
                if name in found:
                    found[name] = int(value.split()[0]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return found["VmRSS"], found["VmHWM"]


@dataclass
class CpuSnapshot:
    """Cumulative CPU seconds by (label, category) at one moment; a - b is the CPU in between."""

    seconds: dict[tuple[str, str], float]
    at: float

    def __sub__(self, earlier: CpuSnapshot) -> CpuSnapshot:
        keys = set(self.seconds) | set(earlier.seconds)
        return CpuSnapshot(
            {k: self.seconds.get(k, 0.0) - earlier.seconds.get(k, 0.0) for k in keys},
            self.at - earlier.at,
        )

    def get(self, label: str | None, category: str) -> float:
        return 0.0 if label is None else self.seconds.get((label, category), 0.0)

    def total(self) -> float:
        return sum(self.seconds.values())


class _ServerWatch:
    """One server's processes: the postmaster's children, classified by pg_stat_activity."""

    def __init__(self, label: str, server: Server) -> None:
        self.label = label
        self.connection = psycopg.connect(
            server.dsn(), autocommit=True, application_name="bench-cpu"
        )
        self.own_pid = self.connection.info.backend_pid  # this sampler's session: left out
        stat = _proc_stat(self.own_pid)
        if stat is None:
            self.connection.close()
            raise RuntimeError(f"cannot read /proc/{self.own_pid}/stat (not Linux?)")
        self.postmaster_pid = stat[0]
        self.category: dict[tuple[int, int], str] = {}
        self.asked: dict[tuple[int, int], int] = {}
        self.broken = False
        # The postmaster reaps its children: its cutime + cstime grows by each one's whole CPU.
        self.reaped_at_start: float | None = None
        self.reaped = 0.0
        self.alive: set[tuple[int, int]] = set()  # children seen by the last scan
        self.gone: set[tuple[int, int]] = set()  # children seen once, missing since

    def classify(self, keys: list[tuple[int, int]]) -> None:
        """Ask pg_stat_activity about new processes; one it does not list after several
        samples (the postmaster, a backend gone before it was asked) counts as other."""
        if self.broken:
            return
        try:
            rows = self.connection.execute(
                "SELECT pid, backend_type, application_name FROM pg_stat_activity"
                " WHERE pid = ANY(%s)",
                ([pid for pid, _ in keys],),
            ).fetchall()
        except psycopg.Error:
            self.broken = True  # the server is going away
            return
        listed = {int(pid): (str(kind), str(name or "")) for pid, kind, name in rows}
        for key in keys:
            if key[0] in listed:
                kind, name = listed[key[0]]
                if kind != "client backend":
                    self.category[key] = OTHER_PROCESSES
                elif name == "pgconcord":
                    self.category[key] = PGCONCORD_SESSIONS
                elif name:
                    self.category[key] = APP_BACKENDS
                else:  # still authenticating: its application_name is not set yet
                    self.asked[key] = self.asked.get(key, 0) + 1
            else:
                self.asked[key] = self.asked.get(key, 0) + 1
                if self.asked[key] >= 10:
                    self.category[key] = OTHER_PROCESSES

    def close(self) -> None:
        with contextlib.suppress(psycopg.Error):
            self.connection.close()


class CpuSampler:
    """Where the CPU goes, from /proc: every interval a background thread reads utime + stime
    of each watched server's processes (the children of its postmaster), split into the
    backends of pgconcord's sessions (application_name 'pgconcord'), other client backends
    ("app backends": pgbench, ...) and all other processes of that server (postmaster,
    checkpointer, walwriter, autovacuum, walsender, logical replication workers), and of each
    watched AgentProcess, with its peak RSS (VmHWM). Processes come and go: the last value
    read per process (pid and start time) is kept, so a total never shrinks. What a process
    spent after its last sample, or one that lived less than an interval, is counted as
    category EXITED: the postmaster's cutime + cstime (the CPU of the children it reaped)
    minus what the samples attributed to those children. snapshot() samples at once and
    returns the totals; the difference of two is the CPU spent between them. The sampler's
    own session on each server is left out."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval = interval
        self._servers: list[_ServerWatch] = []
        self._agents: list[tuple[str, AgentProcess]] = []
        self._cpu: dict[tuple[int, int], tuple[_ServerWatch | str, float]] = {}
        self._peak: dict[str, int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def add_server(self, label: str, server: Server) -> CpuSampler:
        watch = _ServerWatch(label, server)
        with self._lock:
            self._servers.append(watch)
        return self

    def add_agent(self, agent: AgentProcess, label: str = AGENT) -> CpuSampler:
        """Watch an agent's process under label (several agents, one after the other, may
        share a label: their CPU adds up, their peak is the highest)."""
        with self._lock:
            self._agents.append((label, agent))
        self.sample()
        return self

    def start(self) -> CpuSampler:
        self._thread = threading.Thread(target=self._run, name="cpu-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        for watch in self._servers:
            watch.close()

    def __enter__(self) -> CpuSampler:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sample()
            except Exception as error:  # reported by snapshot()'s callers through .error
                self.error = error

    def sample(self) -> None:
        with self._lock:
            by_postmaster = {watch.postmaster_pid: watch for watch in self._servers}
            new: dict[_ServerWatch, list[tuple[int, int]]] = {}
            seen: dict[_ServerWatch, set[tuple[int, int]]] = {w: set() for w in self._servers}
            if by_postmaster:
                for name in os.listdir("/proc"):
                    if not name.isdigit():
                        continue
                    pid = int(name)
                    stat = _proc_stat(pid)
                    if stat is None:
                        continue
                    parent, started, cpu, reaped = stat
                    watch = by_postmaster.get(pid) or by_postmaster.get(parent)
                    if watch is None or pid == watch.own_pid:
                        continue
                    key = (pid, started)
                    self._cpu[key] = (watch, cpu)
                    if pid == watch.postmaster_pid:
                        watch.category[key] = OTHER_PROCESSES
                        if watch.reaped_at_start is None:
                            watch.reaped_at_start = reaped
                        watch.reaped = reaped - watch.reaped_at_start
                        continue
                    seen[watch].add(key)
                    if key not in watch.category:
                        new.setdefault(watch, []).append(key)
                for watch in self._servers:
                    if watch.reaped_at_start is not None:  # the scan found its postmaster
                        watch.gone |= watch.alive - seen[watch]
                        watch.alive = seen[watch]
            for watch, keys in new.items():
                watch.classify(keys)
            for label, agent in self._agents:
                process = agent.process
                if process is None:
                    continue
                stat = _proc_stat(process.pid)
                if stat is None:
                    continue
                self._cpu[(process.pid, stat[1])] = (label, stat[2])
                _, high_water = _proc_memory(process.pid)
                self._peak[label] = max(self._peak.get(label, 0), high_water)

    def snapshot(self) -> CpuSnapshot:
        self.sample()
        with self._lock:
            seconds: dict[tuple[str, str], float] = {}
            for key, (owner, cpu) in self._cpu.items():
                if isinstance(owner, str):
                    slot = (owner, AGENT)
                else:
                    slot = (owner.label, owner.category.get(key, OTHER_PROCESSES))
                seconds[slot] = seconds.get(slot, 0.0) + cpu
            for watch in self._servers:
                # Reaped minus what the samples attributed to the reaped ones: children that
                # were there when the sampler started count in both, those gone before in none.
                attributed = sum(self._cpu[key][1] for key in watch.gone if key in self._cpu)
                seconds[(watch.label, EXITED)] = max(0.0, watch.reaped - attributed)
        return CpuSnapshot(seconds, time.perf_counter())

    def agent_peak_rss(self, label: str = AGENT) -> int:
        """The highest VmHWM (bytes) read of the agents under label since the last reset."""
        self.sample()
        return self._peak.get(label, 0)

    def reset_agent_peak(self, label: str = AGENT) -> bool:
        """Start the label's peak over (VmHWM reset through /proc/PID/clear_refs, Linux 4.0+);
        False if the kernel refused, when the peak stays the process's lifetime peak."""
        reset = True
        with self._lock:
            for agent_label, agent in self._agents:
                if agent_label != label or agent.process is None:
                    continue
                try:
                    Path(f"/proc/{agent.process.pid}/clear_refs").write_text("5")
                except OSError:
                    reset = False
            if reset:
                self._peak[label] = 0
        self.sample()
        return reset


def cpu_per_rows_line(
    delta: CpuSnapshot,
    rows: int,
    *,
    origin: str,
    target: str | None = None,
    agent: str | None = None,
) -> str:
    """'CPU seconds per 1,000 replicated rows: ...' for the CPU between two snapshots."""
    if rows <= 0:
        return "CPU seconds per 1,000 replicated rows: - (no rows)"
    per = 1000 / rows
    parts = [
        ("origin app backends", delta.get(origin, APP_BACKENDS)),
        ("origin pgconcord sessions", delta.get(origin, PGCONCORD_SESSIONS)),
        ("target pgconcord sessions", delta.get(target, PGCONCORD_SESSIONS)),
        ("agent", delta.get(agent, AGENT)),
    ]
    others = [
        ("origin other processes", delta.get(origin, OTHER_PROCESSES)),
        ("origin exited unsampled", delta.get(origin, EXITED)),
    ]
    if target is not None:
        others += [
            ("target other processes", delta.get(target, OTHER_PROCESSES)),
            ("target app backends", delta.get(target, APP_BACKENDS)),
            ("target exited unsampled", delta.get(target, EXITED)),
        ]
    total = sum(value for _, value in parts + others)
    return (
        "CPU seconds per 1,000 replicated rows: "
        + ", ".join(f"{name} {value * per:.3f}" for name, value in parts)
        + "; besides: "
        + ", ".join(f"{name} {value * per:.3f}" for name, value in others)
        + f"; all {total * per:.3f} ({total:.1f} CPU s over {delta.at:.1f} s for {rows:,} rows)"
    )


def report_cpu_per_rows(
    delta: CpuSnapshot,
    rows: int,
    *,
    origin: str,
    target: str | None = None,
    agent: str | None = None,
    prefix: str = "  ",
) -> None:
    """Print cpu_per_rows_line (for the report of a benchmark)."""
    print(prefix + cpu_per_rows_line(delta, rows, origin=origin, target=target, agent=agent))
    sys.stdout.flush()


# -- PostgreSQL logical replication ------------------------------------------------------------


def create_logical_replication(
    publisher: Server,
    publisher_db: str,
    subscriber: Server,
    subscriber_db: str,
    *,
    name: str,
    tables: Sequence[str] | None = None,
    timeout: float = 60,
) -> None:
    """Publication on the publisher db, subscription (copy_data = false: both sides already hold
    the same rows) on the subscriber db; returns once the walsender streams."""
    target = (
        sql.SQL("FOR ALL TABLES")
        if tables is None
        else sql.SQL("FOR TABLE ") + sql.SQL(", ").join(sql.Identifier(t) for t in tables)
    )
    execute(
        publisher.dsn(publisher_db),
        sql.SQL("CREATE PUBLICATION {} ").format(sql.Identifier(name)) + target,
    )
    execute(
        subscriber.dsn(subscriber_db),
        sql.SQL(
            "CREATE SUBSCRIPTION {} CONNECTION {} PUBLICATION {} WITH (copy_data = false)"
        ).format(
            sql.Identifier(name),
            sql.Literal(publisher.dsn(publisher_db)),
            sql.Identifier(name),
        ),
    )
    wait_until(
        lambda: bool(
            scalar(
                publisher.dsn(publisher_db),
                "SELECT EXISTS (SELECT 1 FROM pg_stat_replication"
                " WHERE application_name = %s AND state = 'streaming')",
                (name,),
            )
        ),
        timeout,
        f"subscription {name} streaming",
        interval=0.05,
    )


def drop_logical_replication(
    publisher: Server, publisher_db: str, subscriber: Server, subscriber_db: str, *, name: str
) -> None:
    execute(
        subscriber.dsn(subscriber_db),
        sql.SQL("DROP SUBSCRIPTION IF EXISTS {}").format(sql.Identifier(name)),
    )
    execute(
        publisher.dsn(publisher_db),
        sql.SQL("DROP PUBLICATION IF EXISTS {}").format(sql.Identifier(name)),
    )


# -- command line ----------------------------------------------------------------------------


def base_arguments(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="a short run (under a minute)")
    parser.add_argument(
        "--no-logical",
        action="store_true",
        help="skip the PostgreSQL logical replication reference",
    )
    return parser


@contextlib.contextmanager
def timer() -> Iterator[Callable[[], float]]:
    started = time.perf_counter()
    finished: list[float] = []
    yield lambda: (finished[0] if finished else time.perf_counter()) - started
    finished.append(time.perf_counter())


# -- the agent child process -----------------------------------------------------------------


def _run_agent(config_path: str, log_path: str) -> int:
    from pgconcord.agent import Agent
    from pgconcord.config import load_config

    logging.basicConfig(
        filename=log_path,
        level=getattr(logging, os.environ.get("PGCONCORD_BENCH_LOG", "WARNING")),
        format="%(asctime)s %(levelname)s %(name)s [%(threadName)s] %(message)s",
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent's Ctrl-C; the parent stops us

    def watch_parent() -> None:
        sys.stdin.read()  # returns at end of file: the parent closed the pipe or died
        stop.set()

    threading.Thread(target=watch_parent, daemon=True).start()
    agent = Agent(load_config(config_path)).start()
    with open(log_path + ".source", "w") as note:
        note.write(source_note())
    print("ready", flush=True)
    while not stop.wait(0.5):
        dead = [t.name for t in agent._threads if not t.is_alive()]
        if dead:
            logging.getLogger("bench").error("agent threads died: %s", ", ".join(dead))
            break
    agent.stop()
    usage = os.times()
    with open(log_path, "a") as log_file:
        log_file.write(f"cpu_seconds={usage.user + usage.system:.3f}\n")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "agent":
        sys.exit(_run_agent(sys.argv[2], sys.argv[3]))
    print(
        "usage: python bench/common.py agent CONFIG LOG (used by the benchmarks)", file=sys.stderr
    )
    sys.exit(2)
