"""Copying tables from a donor node to a joining one: their definitions (pg_dump) and their
rows (COPY, streamed from one server to the other without landing on disk).

Rows are read by psql, in the donor's snapshot (exported by the donor's session, imported by
psql's), and forwarded to the joining node's COPY in blocks of a megabyte: Python never looks at
a row. Without psql, the donor's own session reads them with libpq's COPY calls, which costs a
few Python operations per row (about twice as slow). Binary format is used when every column is
of a built-in type (binary values of arrays and records carry type OIDs, which differ between
databases).
"""

from __future__ import annotations

import os
import re
import select
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import errors as pg_errors
from psycopg import pq, sql

from pgconcord import tools
from pgconcord.catalog import Table
from pgconcord.config import NodeConfig
from pgconcord.errors import SchemaError
from pgconcord.transport import connect, session_dsn

Connection = psycopg.Connection[tuple[object, ...]]

BLOCK_BYTES = 1 << 20
_FIRST_USER_OID = 16384
# Settings that make text COPY output read back identically on the other server.
SESSION_SETTINGS = (
    "SET DateStyle = 'ISO, YMD'; SET IntervalStyle = 'postgres'; SET TimeZone = 'UTC';"
    " SET extra_float_digits = 3; SET bytea_output = 'hex'"
)


# -- rows --------------------------------------------------------------------------------------


def _wait(pgconn: pq.abc.PGconn, *, write: bool = False) -> None:
    if write:
        select.select([], [pgconn.socket], [], 1.0)
    else:
        select.select([pgconn.socket], [], [], 1.0)


def _next_result(pgconn: pq.abc.PGconn) -> pq.abc.PGresult | None:
    while True:
        pgconn.consume_input()
        if not pgconn.is_busy():
            return pgconn.get_result()
        _wait(pgconn)


def _raise_for(pgconn: pq.abc.PGconn, result: pq.abc.PGresult) -> None:
    while _next_result(pgconn) is not None:
        pass
    raise pg_errors.error_from_result(result, encoding=pgconn._encoding)


def copy_out(donor: Connection, query: sql.Composable, sink: Callable[[bytes, int], None]) -> int:
    """Run a COPY ... TO STDOUT on the donor (inside its current transaction) and pass its
    output to sink in blocks of about BLOCK_BYTES, with the number of rows read so far; the
    number of rows copied."""
    pgconn = donor.pgconn
    if donor.info.transaction_status == pq.TransactionStatus.IDLE and not donor.autocommit:
        donor.execute("SELECT 1")  # open the transaction psycopg would have opened
    pgconn.send_query(query.as_bytes(donor))
    while pgconn.flush() != 0:
        _wait(pgconn, write=True)
    result = _next_result(pgconn)
    if result is None:
        raise psycopg.OperationalError("COPY returned no result")
    if result.status != pq.ExecStatus.COPY_OUT:
        _raise_for(pgconn, result)
    messages = 0
    parts: list[memoryview | bytes] = []
    size = 0
    while True:
        nbytes, data = pgconn.get_copy_data(1)
        if nbytes > 0:
            parts.append(data)
            size += nbytes
            messages += 1  # one per row, and the binary format's trailer
            if size >= BLOCK_BYTES:
                sink(b"".join(parts), messages)
                parts, size = [], 0
        elif nbytes == 0:
            _wait(pgconn)
            pgconn.consume_input()
        elif nbytes == -1:
            break
        else:
            raise psycopg.OperationalError(pgconn.get_error_message())
    if parts:
        sink(b"".join(parts), messages)
    final = _next_result(pgconn)
    if final is None:
        raise psycopg.OperationalError("COPY ended without a result")
    if final.status != pq.ExecStatus.COMMAND_OK:
        _raise_for(pgconn, final)
    while _next_result(pgconn) is not None:
        pass
    return final.command_tuples or 0


class Donor:
    """Where rows are read: the donor's session, in the REPEATABLE READ transaction whose
    snapshot the copy is made on (open it first), and psql if one is found."""

    def __init__(self, node: NodeConfig, connection: Connection) -> None:
        self.node = node
        self.connection = connection
        self.psql = client_program("psql")
        self.snapshot: str | None = None
        if self.psql is not None:
            row = connection.execute("SELECT pg_export_snapshot()").fetchone()
            self.snapshot = None if row is None else str(row[0])

    def copy_out(self, query: sql.Composable, sink: Callable[[bytes, int], None]) -> None:
        """The output of a COPY ... TO STDOUT in the donor's snapshot, in blocks to sink with
        the number of bytes read so far."""
        if self.psql is None or self.snapshot is None:
            copy_out(self.connection, query, lambda block, _rows: sink(block, len(block)))
            return
        arguments: list[str | Path] = [
            self.psql,
            "--no-psqlrc",
            "--quiet",
            "--no-password",
            "--set=ON_ERROR_STOP=1",
            # The role's statement_timeout must not cut a table's copy off (transport.py).
            f"--dbname={session_dsn(self.node.dsn)}",
            "--command=BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY",
            f"--command=SET TRANSACTION SNAPSHOT '{self.snapshot}'",
            f"--command={SESSION_SETTINGS}",
            f"--command={query.as_string(self.connection)}",
            "--command=COMMIT",
        ]
        row = self.connection.execute("SHOW client_encoding").fetchone()
        encoding = "UTF8" if row is None else str(row[0])
        environment = dict(os.environ, PGAPPNAME="pgconcord", PGCLIENTENCODING=encoding)
        with tempfile.TemporaryFile() as errors:
            process = subprocess.Popen(
                arguments, stdout=subprocess.PIPE, stderr=errors, env=environment
            )
            assert process.stdout is not None
            read = 0
            try:
                while block := os.read(process.stdout.fileno(), BLOCK_BYTES):
                    read += len(block)
                    sink(block, read)
            except BaseException:
                process.kill()
                raise
            finally:
                process.stdout.close()
                code = process.wait()
            if code != 0:
                errors.seek(0)
                lines = [line for line in errors.read().decode(errors="replace").splitlines()]
                reason = next((line for line in lines if line.strip()), f"exit code {code}")
                raise psycopg.OperationalError(f"reading from {self.node.name}: {reason}")


def stream(
    donor: Donor,
    joiner: Connection,
    source: sql.Composable,
    destination: sql.Composed,
    on_bytes: Callable[[int], None] = lambda _: None,
) -> int:
    """COPY from a query on the donor into a table of the joiner, in the joiner's current
    transaction; the number of rows."""
    with joiner.cursor() as cursor:
        with cursor.copy(destination) as copy:

            def forward(block: bytes, read: int) -> None:
                copy.write(block)
                on_bytes(read)

            donor.copy_out(source, forward)
        return max(cursor.rowcount, 0)


def binary_safe(connection: Connection, table: Table) -> bool:
    """Whether every stored column is of a built-in type (domains judged by their base)."""
    row = connection.execute(
        """SELECT coalesce(bool_and(coalesce(b.typbasetype, 0) < %s AND b.oid < %s), true)
             FROM pg_attribute a
             JOIN pg_type t ON t.oid = a.atttypid
             JOIN pg_type b ON b.oid = CASE WHEN t.typtype = 'd'
                                            THEN t.typbasetype ELSE t.oid END
            WHERE a.attrelid = %s::regclass AND a.attnum > 0 AND NOT a.attisdropped
              AND a.attgenerated = ''""",
        (_FIRST_USER_OID, _FIRST_USER_OID, table.identifier.as_string(connection)),
    ).fetchone()
    return bool(row and row[0])


def table_rows(
    donor: Donor,
    joiner: Connection,
    table: Table,
    on_rows: Callable[[int], None] = lambda _: None,
) -> int:
    """Copy a table's stored columns (generated ones are computed again on the joiner); the
    progress is reported in rows estimated from the bytes read."""
    connection = donor.connection
    columns = sql.SQL(", ").join(sql.Identifier(c.name) for c in table.stored_columns)
    options = sql.SQL(" (FORMAT binary)" if binary_safe(connection, table) else "")
    row = connection.execute(
        "SELECT c.relkind = 'p', (SELECT sum(pg_table_size(p.relid))::float8"
        "                           / greatest(sum(greatest(k.reltuples, 0)), 1)"
        "                           FROM pg_partition_tree(c.oid) p"
        "                           JOIN pg_class k ON k.oid = p.relid WHERE p.isleaf)"
        " FROM pg_class c WHERE c.oid = %s::regclass",
        (table.identifier.as_string(connection),),
    ).fetchone()
    partitioned, row_bytes = (bool(row[0]), float(str(row[1] or 1))) if row else (False, 1.0)
    if partitioned:
        source = sql.SQL("COPY (SELECT {} FROM {}) TO STDOUT{}").format(
            columns, table.identifier, options
        )
    else:
        source = sql.SQL("COPY {} ({}) TO STDOUT{}").format(table.identifier, columns, options)
    destination = sql.SQL("COPY {} ({}) FROM STDIN{}").format(table.identifier, columns, options)
    return stream(
        donor, joiner, source, destination, lambda read: on_rows(int(read / max(row_bytes, 1)))
    )


def column_names(connection: Connection, table: str) -> list[str]:
    rows = connection.execute(
        "SELECT attname::text FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0"
        " AND NOT attisdropped ORDER BY attnum",
        (table,),
    ).fetchall()
    return [str(row[0]) for row in rows]


def catalog_rows(
    donor: Donor,
    joiner: Connection,
    table: str,
    where: sql.Composable,
    replaced: dict[str, sql.Composable] | None = None,
    skipped: Iterable[str] = (),
    order: sql.Composable | None = None,
) -> int:
    """Copy rows of one of pgconcord's own tables (pgconcord.row_version, parked_change) with
    every column both nodes have, some of them replaced by expressions (a local table id)."""
    replaced = replaced or {}
    donor_columns = set(column_names(donor.connection, table))
    names = [
        name
        for name in column_names(joiner, table)
        if (name in donor_columns or name in replaced) and name not in set(skipped)
    ]
    selected = sql.SQL(", ").join(replaced.get(name, sql.Identifier(name)) for name in names)
    qualified = sql.SQL(table)
    # Rows in the order of the joiner's index (its primary key) fill it from one end.
    ordered = sql.SQL("") if order is None else sql.SQL(" ORDER BY {}").format(order)
    source = sql.SQL("COPY (SELECT {} FROM {} WHERE {}{}) TO STDOUT (FORMAT binary)").format(
        selected, qualified, where, ordered
    )
    destination = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT binary)").format(
        qualified, sql.SQL(", ").join(sql.Identifier(name) for name in names)
    )
    return stream(donor, joiner, source, destination)


# -- definitions -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Definitions:
    """SQL creating the missing tables: before their rows are copied (tables, types,
    sequences, functions) and after (indexes, constraints, the application's triggers)."""

    pre_data: str
    post_data: str


def client_program(name: str) -> Path | None:
    """A PostgreSQL client program (psql), from the places dump_tools looks in."""
    for directory in _tool_directories():
        if tools.has_programs(directory, name):
            return tools.executable(directory, name)
    return None


def dump_tools(server_version: int) -> Path:
    """A directory holding pg_dump and pg_restore able to dump a server of this version
    (server_version_num): PG_BINDIR, PATH, the platform's usual installation places, the
    embedded wheel."""
    needed = server_version // 10000
    seen = []
    for directory in _tool_directories():
        version = _tool_version(directory)
        if version is not None:
            seen.append(f"{directory} ({version})")
            if version >= needed:
                return directory
    raise SchemaError(
        f"pg_dump {needed} or newer is needed to create the missing tables"
        f" ({', '.join(seen) or 'none found'}); create the tables on the joining node or set"
        " PG_BINDIR to a PostgreSQL bin directory"
    )


def _tool_directories() -> list[Path]:
    candidates: list[Path] = []
    if os.environ.get("PG_BINDIR"):
        candidates.append(Path(os.environ["PG_BINDIR"]))
    on_path = shutil.which("pg_dump")  # pg_dump.exe too: which() follows PATHEXT on Windows
    if on_path:
        candidates.append(Path(on_path).parent)
    candidates += tools.installation_directories()
    embedded = tools.embedded_directory()
    if embedded is not None:
        candidates.append(embedded)
    return candidates


def _tool_version(directory: Path) -> int | None:
    if not tools.has_programs(directory, "pg_dump", "pg_restore"):
        return None
    try:
        result = subprocess.run(
            [tools.executable(directory, "pg_dump"), "--version"],
            capture_output=True,
            text=True,
            check=False,
        )
    except OSError:
        return None
    match = re.search(r"\(PostgreSQL\) (\d+)", result.stdout)
    return int(match.group(1)) if match else None


_TOC_ENTRY = re.compile(r"^(\d+); (\d+) (\d+) (.*)$")
_PG_CLASS, _PG_TYPE, _PG_PROC, _PG_NAMESPACE, _PG_TRIGGER = 1259, 1247, 1255, 2615, 2620


def dump_definitions(
    donor_node: NodeConfig,
    joiner_node: NodeConfig,
    schemas: list[str],
    skipped_tables: Iterable[str],
) -> Definitions:
    """The definitions of the replicated schemas' tables except skipped_tables (excluded ones,
    and those the joiner has), without pgconcord's triggers nor objects the joiner has."""
    with (
        connect(donor_node, autocommit=True) as donor,
        connect(joiner_node, autocommit=True) as joiner,
    ):
        # Names printed schema-qualified, the same way on both sides.
        donor.execute("SET search_path = pg_catalog")
        joiner.execute("SET search_path = pg_catalog")
        return _dump(donor_node, donor, joiner, schemas, skipped_tables)


def _dump(
    donor_node: NodeConfig,
    donor: Connection,
    joiner: Connection,
    schemas: list[str],
    skipped_tables: Iterable[str],
) -> Definitions:
    directory = dump_tools(int(str(donor.info.server_version)))
    pg_dump = tools.executable(directory, "pg_dump")
    pg_restore = tools.executable(directory, "pg_restore")

    def pattern(*parts: str) -> str:
        return ".".join('"' + part.replace('"', '""') + '"' for part in parts)

    arguments: list[str | Path] = [
        pg_dump,
        # Owners and grants as on the donor: the application's role keeps writing its tables
        # on the new node (the agent's role may act for the owner, see README).
        "--schema-only",
        "--format=custom",
        f"--dbname={donor_node.dsn}",
    ]
    arguments += [f"--schema={pattern(schema)}" for schema in schemas]
    arguments += [f"--exclude-table={pattern(*name.split('.', 1))}" for name in skipped_tables]
    with tempfile.TemporaryDirectory(prefix="pgconcord-join-") as scratch:
        archive = Path(scratch) / "schema.dump"
        _run([*arguments, f"--file={archive}"], "pg_dump")
        listing = _run([pg_restore, "--list", archive], "pg_restore")
        kept = _filter_listing(listing, donor, joiner)
        list_file = Path(scratch) / "schema.list"
        list_file.write_text("\n".join(kept) + "\n")

        def section(name: str) -> str:
            text = _run(
                [
                    pg_restore,
                    f"--section={name}",
                    f"--use-list={list_file}",
                    "--file=-",
                    archive,
                ],
                "pg_restore",
            )
            # psql meta-commands newer pg_dump versions emit around a plain-text script.
            return "\n".join(
                line for line in text.splitlines() if not line.startswith(("\\restrict", "\\unr"))
            )

        return Definitions(pre_data=section("pre-data"), post_data=section("post-data"))


def _run(arguments: list[str | Path], program: str) -> str:
    environment = dict(os.environ, PGAPPNAME="pgconcord")
    result = subprocess.run(arguments, capture_output=True, text=True, check=False, env=environment)
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        raise SchemaError(f"{program} failed: {lines[0] if lines else result.returncode}")
    return result.stdout


def _filter_listing(listing: str, donor: Connection, joiner: Connection) -> list[str]:
    """The archive's table of contents without pgconcord's triggers and without what the
    joiner already has (schemas, types, functions, sequences, views)."""
    entries = []
    for line in listing.splitlines():
        match = _TOC_ENTRY.match(line)
        if match:
            entries.append((line, int(match.group(2)), int(match.group(3))))
    ours = {
        int(str(row[0]))
        for row in donor.execute(
            "SELECT t.oid FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid"
            " JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = 'pgconcord'"
        )
    }
    kept = []
    for line, class_id, object_id in entries:
        if class_id == _PG_TRIGGER and object_id in ours:
            continue
        if " COMMENT - SCHEMA " in line:
            continue  # a schema's comment needs its owner, and the joiner has the schema
        name = _donor_name(donor, class_id, object_id)
        if name is not None and _joiner_has(joiner, class_id, name):
            continue
        kept.append(line)
    return kept


def _donor_name(donor: Connection, class_id: int, object_id: int) -> str | None:
    queries = {
        _PG_NAMESPACE: "SELECT quote_ident(nspname) FROM pg_namespace WHERE oid = %s",
        _PG_TYPE: "SELECT format_type(oid, NULL) FROM pg_type WHERE oid = %s",
        _PG_PROC: "SELECT oid::regprocedure::text FROM pg_proc WHERE oid = %s",
        _PG_CLASS: "SELECT oid::regclass::text FROM pg_class WHERE oid = %s AND relkind IN"
        " ('S', 'v', 'm', 'c')",
    }
    query = queries.get(class_id)
    if query is None:
        return None
    row = donor.execute(query, (object_id,)).fetchone()
    return None if row is None else str(row[0])


def _joiner_has(joiner: Connection, class_id: int, name: str) -> bool:
    checks = {
        _PG_NAMESPACE: "SELECT to_regnamespace(%s) IS NOT NULL",
        _PG_TYPE: "SELECT to_regtype(%s) IS NOT NULL",
        _PG_PROC: "SELECT to_regprocedure(%s) IS NOT NULL",
        _PG_CLASS: "SELECT to_regclass(%s) IS NOT NULL",
    }
    row = joiner.execute(checks[class_id], (name,)).fetchone()
    return bool(row and row[0])
