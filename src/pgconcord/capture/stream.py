"""Capture by streaming: a node's agent reads the node's slot through the replication protocol and
appends what it decodes to captured_change, so that the server decodes each change once. Reading
the slot from SQL instead (drain_wal) decodes again, on every call, everything from the slot's
restart point, which PostgreSQL moves only every 15 s or so (at its running-transactions
records): under a steady write load most of the decoding is repeated (measured before issue
9's design: pgbench kept 0.59 of its bare throughput under SQL polling, 0.82-0.90 streaming).
psycopg 3 has no replication protocol (its issue #71); psycopg2's LogicalReplicationConnection
has, and is used for that alone.

Exactly once: rows go into captured_change in the agent's transaction, with captured_lsn moved
to the end of the last whole transaction written; the server is told that position only after
that commits, and streams again from the position it was told. A transaction that ends before
captured_lsn is skipped, so what a restarted stream sends again, or what drain_wal drained
between two streams, is not captured twice (both hold the drain lock while they write). A
transaction too big for one batch is written in parts, all in the same agent transaction.

Each table's rows are written by the statement drain_wal.sql's decoded_statement makes for it
from the table as it is now, which the stream keeps, prepared, while the catalog's fingerprint
(catalog.FINGERPRINT_QUERY) and the table's decoded columns stay the same: under a write load of
small transactions, making and planning it for every batch cost more than the rows."""

from __future__ import annotations

import json
import logging
import select
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg
import psycopg2
import psycopg2.extras
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgconcord.capture.wal import Connection, slot_name
from pgconcord.catalog import FINGERPRINT_QUERY
from pgconcord.config import NodeConfig
from pgconcord.errors import NodeUnavailable
from pgconcord.transport.connections import CONNECT_TIMEOUT_SECONDS, session_dsn

log = logging.getLogger(__name__)

BATCH_ROWS = 10_000  # written in one statement; a bigger transaction in several
BATCH_SECONDS = 0.05  # written at the latest this long after its first change arrived
# How long a stream waits for the server before looking at whether it should stop: each
# look costs the agent a wake-up per WAL node, which an idle cluster of five nodes notices.
WAIT_SECONDS = 1.0
POSTGRES_EPOCH_MICROSECONDS = 946_684_800_000_000  # 2000-01-01 in Unix microseconds
# While the server sends without a pause, what is written is told at most this often.
FEEDBACK_SECONDS = 0.005

# The first statements of each of the stream's transactions: the drain lock (drain_wal.sql);
# then, in a snapshot taken once it is held, what is captured already, the next transaction id
# (for the epoch of the 32-bit ones that pgoutput sends) and the catalog's fingerprint.
_LOCK = "SELECT pg_advisory_xact_lock(1885823843, 1685217641)"
_BEGIN = (
    "SELECT c.captured_lsn::text, pg_snapshot_xmax(pg_current_snapshot())::text::bigint, ("
    + FINGERPRINT_QUERY.strip()
    + ") FROM pgconcord.capture_state c"
)
# Ids for the changes, and the next transaction id now (the changes' transactions all began
# before it).
_IDS = (
    "SELECT array_agg(nextval('pgconcord.change_log_id_seq')),"
    " pg_snapshot_xmax(pg_current_snapshot())::text::bigint FROM generate_series(1, %s)"
)
# Values travel as text: both ends of the stream read and write them under the settings
# drain_wal.sql pins, in UTF-8.
_TEXT_SETTINGS = (
    "-c TimeZone=UTC -c DateStyle=ISO,YMD -c IntervalStyle=postgres -c extra_float_digits=3"
)
_STATEMENT = (
    "SELECT pgconcord.decoded_statement(t, %s::jsonb), pgconcord.decoded_json_rows('%%s')"
    " FROM pgconcord.replicated_table t WHERE t.relation = %s::oid"
)
_CAPTURED = (
    "UPDATE pgconcord.capture_state SET captured_lsn = %s::pg_lsn, captured_at = clock_timestamp()"
    " WHERE captured_lsn < %s::pg_lsn"
)


def lsn_number(text: str) -> int:
    high, low = text.split("/")
    return (int(high, 16) << 32) | int(low, 16)


def lsn_text(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def _string(buffer: bytes, at: int) -> tuple[bytes, int]:
    end = buffer.index(0, at)
    return buffer[at:end], end + 1


@dataclass
class _Batch:
    """Decoded changes not yet written, in decode order."""

    relations: list[int] = field(default_factory=list)
    operations: list[str] = field(default_factory=list)
    new_rows: list[list[str | None] | None] = field(default_factory=list)
    old_rows: list[list[str | None] | None] = field(default_factory=list)
    xids: list[int] = field(default_factory=list)
    commit_lsns: list[int] = field(default_factory=list)
    clocks: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.relations)


class WalStream:
    """One node's stream: decodes pgoutput messages and writes them in batches of whole
    transactions, each committed before the server hears of it."""

    def __init__(self, node: NodeConfig, writer: Connection, encoding: str) -> None:
        self.node = node
        self.writer = writer
        self.encoding = encoding
        self.names: dict[int, list[str]] = {}  # relation oid -> its decoded column names
        self.batch = _Batch()
        self.batch_names: dict[int, list[str]] = {}  # the names the batch was decoded with
        self.started_at: float | None = None  # when the batch's first message came
        self.in_transaction = False
        self.open = False  # the writer's transaction holds a part of a transaction
        self.skipping = False
        self.xid = 0
        self.commit_lsn = 0
        self.clock = 0
        self.decoded_end = 0  # the end of the last whole transaction decoded
        self.written_end = 0  # ... and committed to captured_change (or skipped)
        self.captured = 0  # changes captured, for the log
        # Of the writer's transaction (_BEGIN): what was captured before it, the next xid.
        self.already = 0
        self.next_xid = 0
        self.fingerprint: int | None = None
        # (relation, decoded column names) -> its statement; None for a table not replicated.
        self.statements: dict[tuple[int, tuple[str, ...]], str | None] = {}

    # -- decoding ----------------------------------------------------------------------------

    def feed(self, payload: bytes) -> None:
        kind = payload[0]
        if kind == 0x42:  # B: the commit's LSN, its time, the xid
            final_lsn, commit_time, self.xid = struct.unpack_from(">QqI", payload, 1)
            self.commit_lsn = final_lsn
            self.clock = commit_time + POSTGRES_EPOCH_MICROSECONDS
            self.skipping = False
            self.in_transaction = True
        elif kind == 0x43:  # C: flags, the commit's LSN, its end, its time
            self.decoded_end = struct.unpack_from(">Q", payload, 10)[0]
            self.in_transaction = False
        elif kind == 0x4F:  # O: applied here by pgconcord, from a peer
            self.skipping = True
        elif kind == 0x52:  # R
            self._relation(payload)
        elif kind in (0x49, 0x55, 0x44) and not self.skipping:  # I, U, D
            self._change(chr(kind), payload)
        # T (truncate) is not replicated; Y (type) and M (message) carry nothing to capture.

    def _relation(self, payload: bytes) -> None:
        (relation,) = struct.unpack_from(">I", payload, 1)
        _, at = _string(payload, 5)  # namespace
        _, at = _string(payload, at)  # name
        at += 1  # replica identity
        (count,) = struct.unpack_from(">h", payload, at)
        at += 2
        names = []
        for _ in range(count):
            name, at = _string(payload, at + 1)  # after the flags
            names.append(name.decode(self.encoding))
            at += 8  # type oid, type modifier
        if relation in self.batch_names and self.batch_names[relation] != names:
            self.write(None)  # what is pending was decoded with the former columns
        self.names[relation] = names

    def _tuple(self, payload: bytes, at: int) -> tuple[list[str | None], str, int]:
        (count,) = struct.unpack_from(">h", payload, at)
        at += 2
        values: list[str | None] = []
        kinds = []
        for _ in range(count):
            kind = payload[at]
            if kind == 0x74:  # t: text
                (length,) = struct.unpack_from(">i", payload, at + 1)
                values.append(payload[at + 5 : at + 5 + length].decode(self.encoding))
                at += 5 + length
                kinds.append("t")
            else:  # n null, u unchanged toasted value
                values.append(None)
                at += 1
                kinds.append(chr(kind))
        return values, "".join(kinds), at

    def _change(self, operation: str, payload: bytes) -> None:
        (relation,) = struct.unpack_from(">I", payload, 1)
        at = 5
        new_row: list[str | None] | None = None
        old_row: list[str | None] | None = None
        new_kinds = ""
        # An old row (K key, O whole: REPLICA IDENTITY FULL), a new row (N), or both.
        while at < len(payload):
            part = payload[at]
            values, kinds, at = self._tuple(payload, at + 1)
            if part == 0x4E:
                new_row, new_kinds = values, kinds
            else:
                old_row = values
        if new_row is not None and old_row is not None and "u" in new_kinds:
            # Unchanged and toasted: REPLICA IDENTITY FULL logged it in the old row.
            for index, kind in enumerate(new_kinds):
                if kind == "u":
                    new_row[index] = old_row[index]
        batch = self.batch
        if not batch:
            self.started_at = time.monotonic()
        self.batch_names.setdefault(relation, self.names[relation])
        batch.relations.append(relation)
        batch.operations.append(operation)
        batch.new_rows.append(new_row)
        batch.old_rows.append(old_row)
        batch.xids.append(self.xid)
        batch.commit_lsns.append(self.commit_lsn)
        batch.clocks.append(self.clock)
        if len(batch) >= BATCH_ROWS:
            self.write(None if self.in_transaction else self.decoded_end)

    # -- writing ----------------------------------------------------------------------------

    def due(self, now: float) -> bool:
        """Whether the batch's whole transactions are to be written while the server is still
        sending: BATCH_SECONDS after the batch began (when it stops sending, at once)."""
        if self.in_transaction or self.decoded_end <= self.written_end:
            return False
        return self.started_at is not None and now - self.started_at >= BATCH_SECONDS

    def write(self, end: int | None) -> None:
        """Append the batch in the writer's transaction: and commit it, with captured_lsn
        moved to `end`, the end of the last whole transaction in it (None: a part)."""
        if self.batch or (end is not None and self.open):
            if not self.open:
                self._begin()
                self.open = True
            self._append()
        self.batch = _Batch()
        self.batch_names = {}
        self.started_at = None
        if end is not None:
            if self.open:
                if end > self.already:
                    self.writer.execute(_CAPTURED, (lsn_text(end), lsn_text(end)))
                self.writer.commit()
                self.open = False
            self.written_end = end

    def _begin(self) -> None:
        self.writer.execute(_LOCK)
        row = self.writer.execute(_BEGIN).fetchone()
        assert row is not None
        self.already, self.next_xid = lsn_number(str(row[0])), int(str(row[1]))
        fingerprint = int(str(row[2]))
        if fingerprint != self.fingerprint:
            self.statements.clear()
            self.fingerprint = fingerprint

    def _append(self) -> None:
        batch = self.batch
        # Drained already (drain_wal, or a stream before this one), or not.
        wanted = [i for i, lsn in enumerate(batch.commit_lsns) if lsn >= self.already]
        if not wanted:
            return
        count = len(wanted) + sum(1 for i in wanted if batch.operations[i] == "U")
        found = self.writer.execute(_IDS, (count,)).fetchone()
        assert found is not None
        self.next_xid = int(str(found[1]))
        numbers = iter(sorted(int(str(n)) for n in found[0]))  # type: ignore[attr-defined]
        # Ids in decode order, an update's second one (a key move) right after its first.
        ids: dict[int, tuple[int, int | None]] = {}
        for i in wanted:
            ids[i] = (next(numbers), next(numbers) if batch.operations[i] == "U" else None)
        epoch, low = self.next_xid >> 32, self.next_xid & 0xFFFFFFFF
        by_relation: dict[int, list[int]] = {}
        for i in wanted:
            by_relation.setdefault(batch.relations[i], []).append(i)
        for relation, rows in by_relation.items():
            statement = self._statement(relation)
            if statement is None:
                continue
            rows_json = json.dumps(
                [
                    [
                        ids[i][0],
                        ids[i][1],
                        batch.operations[i],
                        batch.new_rows[i],
                        batch.old_rows[i],
                        # The 32-bit xid with the epoch it belongs to.
                        str(((epoch - (batch.xids[i] > low)) << 32) | batch.xids[i]),
                        batch.clocks[i],
                    ]
                    for i in rows
                ]
            )
            written = self.writer.execute(statement, (rows_json,), prepare=True)
            self.captured += written.rowcount

    def _statement(self, relation: int) -> str | None:
        names = self.batch_names[relation]
        key = (relation, tuple(names))
        if key not in self.statements:
            row = self.writer.execute(
                _STATEMENT, (json.dumps({str(relation): names}), str(relation))
            ).fetchone()
            if row is None:
                self.statements[key] = None  # not replicated (any more)
            else:
                parts: list[str] = row[0]  # type: ignore[assignment]
                # Only the parameters are placeholders: a % in a name or literal is itself.
                self.statements[key] = (
                    parts[0].replace("%", "%%") + str(row[1]) + parts[1].replace("%", "%%")
                )
        return self.statements[key]


def _replication_session(node: NodeConfig) -> Any:
    return psycopg2.connect(
        _text_dsn(node.dsn),
        connection_factory=psycopg2.extras.LogicalReplicationConnection,
        connect_timeout=CONNECT_TIMEOUT_SECONDS,
        application_name="pgconcord",
        client_encoding="UTF8",
    )


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _text_dsn(dsn: str) -> str:
    parameters = conninfo_to_dict(session_dsn(dsn))
    parameters["options"] = f"{parameters.get('options') or ''} {_TEXT_SETTINGS}".strip()
    return make_conninfo("", **parameters)


def stream(
    node: NodeConfig, writer: Connection, stopped: Callable[[], bool], tick: Callable[[], None]
) -> bool:
    """Stream the node's slot, writing with `writer` (which the caller closes), until
    `stopped()` or the session fails (psycopg.Error, psycopg2.Error, NodeUnavailable); False
    at once, its transaction ended, when the node has no slot (it captures with triggers)."""
    # Durable before the server hears of it: the slot never moves past what is captured.
    writer.execute(
        "SET synchronous_commit = local; SET TimeZone = 'UTC'; SET DateStyle = 'ISO, YMD';"
        " SET IntervalStyle = 'postgres'; SET extra_float_digits = 3"
    )
    slot = slot_name(writer)
    state = writer.execute("SELECT publication_name FROM pgconcord.capture_state").fetchone()
    writer.commit()
    if slot is None or state is None:
        return False
    publication, encoding = str(state[0]), "utf-8"
    try:
        replication = _replication_session(node)
    except psycopg2.OperationalError as error:
        raise NodeUnavailable(node.name, str(error).strip().splitlines()[0]) from None
    try:
        cursor = replication.cursor()
        options = {"proto_version": "1", "publication_names": _quoted(publication)}
        if replication.server_version >= 160000:
            # What pgconcord applied here is left out by the server (drain_wal.sql).
            options["origin"] = "none"
        cursor.start_replication(slot_name=slot, decode=False, options=options)
        log.debug("%s: streaming the WAL from slot %s", node.name, slot)
        wal = WalStream(node, writer, encoding)
        _consume(wal, replication, cursor, stopped, tick)
        if wal.open:
            writer.rollback()  # a part of a transaction: it is sent again, whole
    finally:
        replication.close()
    return True


def _consume(
    wal: WalStream,
    replication: Any,
    cursor: Any,
    stopped: Callable[[], bool],
    tick: Callable[[], None],
) -> None:
    told = 0  # the position the server was last told
    told_at = 0.0
    while not stopped():
        tick()
        message = cursor.read_message()
        if message is not None:
            wal.feed(bytes(message.payload))
            now = time.monotonic()
            if wal.due(now):
                wal.write(wal.decoded_end)
            elif not (wal.in_transaction or wal.batch or wal.open):
                wal.write(wal.decoded_end)  # nothing to capture: written at once
            # Told while the server keeps sending too: whoever stamps on this node waits for
            # the slot to pass the WAL flushed when it began (drain_wal.sql), and on a node
            # that pgconcord applies into, before PostgreSQL 16 (no origin option), the
            # server sends all that was applied, skipped here, without a pause.
            if wal.written_end > told and now - told_at >= FEEDBACK_SECONDS:
                cursor.send_feedback(
                    write_lsn=wal.written_end, flush_lsn=wal.written_end, force=True
                )
                told, told_at = wal.written_end, now
            continue
        # The server has sent nothing more for now: what is whole is written at once.
        if not wal.in_transaction and wal.decoded_end > wal.written_end:
            wal.write(wal.decoded_end)
        position = wal.written_end
        if not wal.in_transaction and not wal.batch and not wal.open:
            # Everything sent so far is written or held nothing to capture.
            position = max(position, int(cursor.wal_end or 0))
        if position > told:
            cursor.send_feedback(write_lsn=position, flush_lsn=position, force=True)
            told, told_at = position, time.monotonic()
        select.select([replication], [], [], WAIT_SECONDS)


def stream_errors() -> tuple[type[BaseException], ...]:
    """What ends a stream, to be tried again later."""
    return (psycopg.Error, psycopg2.Error, NodeUnavailable)
