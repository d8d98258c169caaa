"""The joining node's tables: those it lacks created from the donor's definitions, the others
checked against the donor's, and every one copied on one snapshot of the donor with its row
versions and its copy horizons (tablecopy moves the definitions and the rows)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import psycopg
from psycopg import sql

from pgconcord import catalog, install, membership, tablecopy
from pgconcord.apply import open_target
from pgconcord.catalog import STAMP_LOCK, Table
from pgconcord.config import ClusterConfig, NodeConfig
from pgconcord.errors import PgconcordError, SchemaError
from pgconcord.join.cluster import Connection, _Cluster
from pgconcord.join.report import JoinObserver, JoinReport
from pgconcord.transport import connect
from pgconcord.transport import postgres as reader

Position = tuple[str, str | None, int | None]  # applied_snapshot, window_snapshot, window_done
EMPTY_POSITION: Position = ("1:1:", None, None)


def _check_shapes(
    cluster: _Cluster,
    donor: NodeConfig,
    tables: list[Table],
    joiner: Connection,
    created: set[str],
) -> None:
    """The joining node's tables in the replicated schemas must be the donor's, column for
    column (tables an earlier run created are the donor's, their keys still to come)."""
    replication = cluster.config.replication
    own = [
        t
        for t in catalog.discover_tables(joiner, replication.schemas, set(replication.exclude))
        if t.qualified_name not in created
    ]
    names = {t.qualified_name for t in own}
    install.check_tables(
        {
            donor.name: [t for t in tables if t.qualified_name in names],
            cluster.joiner.name: own,
        }
    )


def _donor_tables(
    config: ClusterConfig, donor: Connection, donor_name: str
) -> tuple[list[Table], dict[tuple[str, str], int]]:
    """The donor's replicated tables and their ids there; every table of the replicated
    schemas must be set up (its changes captured), or the copy could not be kept current."""
    replication = config.replication
    registered = catalog.registered_tables(donor)
    found = catalog.discover_tables(donor, replication.schemas, set(replication.exclude))
    for table in found:
        if (table.schema, table.name) not in registered:
            raise SchemaError(
                f"table {table.qualified_name} on {donor_name} is not replicated yet:"
                " run pgconcord setup first"
            )
    return found, registered


def _present_tables(cluster: _Cluster, joiner: Connection) -> set[str]:
    schemas = cluster.config.replication.schemas
    return {t.qualified_name for t in catalog.discover_tables(joiner, schemas, set())}


def _has_rows(connection: Connection, qualified_name: str) -> bool:
    schema, _, name = qualified_name.partition(".")
    row = connection.execute(
        sql.SQL("SELECT EXISTS (SELECT 1 FROM {})").format(sql.Identifier(schema, name))
    ).fetchone()
    return bool(row and row[0])


def _create_tables(
    cluster: _Cluster,
    donor: NodeConfig,
    present: set[str],
    missing: list[Table],
    report: JoinReport,
    observer: JoinObserver,
) -> None:
    observer.note(f"creating {len(missing)} tables from {donor.name}'s definitions")
    skipped = sorted(present | set(cluster.config.replication.exclude))
    definitions = tablecopy.dump_definitions(
        donor, cluster.joiner, cluster.config.replication.schemas, skipped
    )
    created = [t.qualified_name for t in missing]
    with connect(cluster.joiner) as session:
        membership.quiet_schema_changes(session)
        try:
            session.execute(definitions.pre_data.encode())
        except psycopg.Error as error:
            raise SchemaError(
                f"node {cluster.joiner.name}: creating the missing tables failed:"
                f" {_first_line(error)}"
            ) from None
        session.execute(
            "UPDATE pgconcord.join_state SET created_tables = created_tables || %s::text[],"
            " post_data = concat_ws(E'\\n', post_data, %s::text)",
            (created, definitions.post_data),
        )
        session.commit()
    report.created = created


# -- 2. copy ---------------------------------------------------------------------------------


def _copy(
    cluster: _Cluster, donor_node: NodeConfig, report: JoinReport, observer: JoinObserver
) -> None:
    name = cluster.joiner.name
    joiner_admin = cluster.admin[name]
    done = {
        f"{schema}.{table}"
        for schema, table in joiner_admin.execute(
            "SELECT schema_name, table_name FROM pgconcord.join_table"
        )
    }
    donor = reader.open_origin(donor_node)
    joiner = open_target(cluster.joiner)
    try:
        donor.execute(tablecopy.SESSION_SETTINGS)
        joiner.execute(tablecopy.SESSION_SETTINGS)
        donor.commit()
        joiner.commit()
        with _writes_fenced(donor_node):
            snapshot = reader.begin_snapshot(donor)
        source = tablecopy.Donor(donor_node, donor)
        positions = _positions(cluster, donor, donor_node.name, snapshot)
        with connect(donor_node, autocommit=True) as flusher:
            reader.flush_wal(flusher)  # what the snapshot calls committed stays so
        tables, registered = _donor_tables(cluster.config, donor, donor_node.name)
        report.tables = len(tables)
        attempt = _start_attempt(joiner, source, name, snapshot, positions)
        for number, table in enumerate(tables, start=1):
            if table.qualified_name in done:
                report.kept.append(table.qualified_name)
                continue
            observer.table_started(
                table.qualified_name, number, len(tables), _estimate(donor, table)
            )
            rows = _copy_table(
                source,
                joiner,
                table,
                registered[(table.schema, table.name)],
                attempt,
                positions,
                observer,
            )
            report.copied[table.qualified_name] = rows
            observer.table_done(table.qualified_name, rows)
        donor.rollback()
    finally:
        donor.close()
        joiner.close()


# The fence waits this long for the donor's tables at a time (writers queue behind it while it
# waits; a deadlock with one of them ends as the fence giving up, not as the writer failing),
# this many times.
FENCE_LOCK_TIMEOUT = "200ms"
FENCE_ATTEMPTS = 50


@contextlib.contextmanager
def _writes_fenced(donor_node: NodeConfig) -> Iterator[None]:
    """While the copy's snapshot is taken, no write to a replicated table of the donor's is
    left captured but not stamped (stamp_captured.sql): the copy holds a row's version with
    its value, and the changes after the snapshot come with their own. Writers are held back
    (SHARE locks, which wait for those in flight) only for as long as the stamping and the
    snapshot take.

    The stamp lock is taken before the tables': an apply here takes it before it writes and
    keeps it to its end, so one that already writes finishes first, and none waits on the
    fence while holding what the stamping needs."""
    for attempt in range(FENCE_ATTEMPTS):
        with connect(donor_node) as stamper, connect(donor_node) as fence:
            if _fence(stamper, fence):
                yield
                fence.rollback()
                return
        time.sleep(min(1.0, 0.05 * (attempt + 1)))
    raise PgconcordError(
        f"node {donor_node.name}: its replicated tables stayed busy while the copy's snapshot"
        " was to be taken (writes are held back for a moment then); run the join again"
    )


def _fence(stamper: Connection, fence: Connection) -> bool:
    """Hold back writes to the donor's replicated tables and stamp what was captured there
    (both transactions stay open for the snapshot); False when the tables are busy."""
    stamper.execute("SET LOCAL lock_timeout = '30s'")
    stamper.execute(f"SELECT pg_advisory_xact_lock({STAMP_LOCK})")
    tables = [
        sql.Identifier(str(schema_name), str(table_name))
        for schema_name, table_name in fence.execute(
            "SELECT t.schema_name, t.table_name FROM pgconcord.replicated_table t"
            " JOIN pg_class c ON c.oid = t.relation"
            " JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = t.schema_name AND c.relname = t.table_name ORDER BY 1, 2"
        )
    ]
    fence.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(FENCE_LOCK_TIMEOUT)))
    if tables:
        try:
            fence.execute(sql.SQL("LOCK TABLE {} IN SHARE MODE").format(sql.SQL(", ").join(tables)))
        except (psycopg.errors.LockNotAvailable, psycopg.errors.DeadlockDetected):
            fence.rollback()
            stamper.rollback()
            return False
    stamper.execute("SELECT pgconcord.stamp_captured(true)")
    stamper.commit()
    return True


def _positions(
    cluster: _Cluster, donor: Connection, donor_name: str, snapshot: str
) -> dict[str, Position]:
    """Where the copy stands for each origin: the donor's snapshot for its own changes, the
    donor's position (in the same snapshot) for every other member's."""
    rows = donor.execute(
        "SELECT origin, applied_snapshot::text, window_snapshot::text, window_done"
        " FROM pgconcord.position"
    ).fetchall()
    at_donor = {
        str(origin): (str(applied), None if window is None else str(window), done)
        for origin, applied, window, done in rows
    }
    positions: dict[str, Position] = {donor_name: (snapshot, None, None)}
    for peer in cluster.peers:
        if peer.name != donor_name:
            found = at_donor.get(peer.name)
            positions[peer.name] = (
                EMPTY_POSITION
                if found is None
                else (found[0], found[1], None if found[2] is None else int(str(found[2])))
            )
    return positions


def _start_attempt(
    joiner: Connection,
    donor: tablecopy.Donor,
    name: str,
    snapshot: str,
    positions: dict[str, Position],
) -> int:
    with joiner.transaction():
        row = joiner.execute(
            "INSERT INTO pgconcord.join_attempt (donor_snapshot) VALUES (%s) RETURNING attempt",
            (snapshot,),
        ).fetchone()
        assert row is not None
        attempt = int(str(row[0]))
        for origin, (applied, window, done) in positions.items():
            joiner.execute(
                "INSERT INTO pgconcord.join_position VALUES (%s, %s, %s, %s, %s)",
                (attempt, origin, applied, window, done),
            )
        first = joiner.execute("SELECT min(attempt) FROM pgconcord.join_attempt").fetchone()
        if first is not None and first[0] == attempt:
            # Changes the donor could not apply stay parked on the joining node too, with the
            # positions of this first run, so that `conflicts retry` finds them there as well.
            tablecopy.catalog_rows(
                donor,
                joiner,
                "pgconcord.parked_change",
                sql.SQL("state = 'parked' AND origin <> {}").format(sql.Literal(name)),
                skipped=["id"],
            )
    return attempt


def _estimate(donor: Connection, table: Table) -> int:
    row = donor.execute(
        "SELECT sum(greatest(c.reltuples, 0))::bigint FROM pg_partition_tree(%s::regclass) p"
        " JOIN pg_class c ON c.oid = p.relid WHERE p.isleaf",
        (table.identifier.as_string(donor),),
    ).fetchone()
    return int(str(row[0])) if row and row[0] is not None else 0


def _copy_table(
    donor: tablecopy.Donor,
    joiner: Connection,
    table: Table,
    donor_table_id: int,
    attempt: int,
    positions: dict[str, Position],
    observer: JoinObserver,
) -> int:
    """One table, its row versions and its horizons, in one transaction of the joiner."""
    with joiner.transaction():
        row = joiner.execute(
            "INSERT INTO pgconcord.replicated_table (schema_name, table_name, key_columns)"
            " VALUES (%s, %s, %s) ON CONFLICT (schema_name, table_name)"
            " DO UPDATE SET key_columns = excluded.key_columns RETURNING id",
            (table.schema, table.name, list(table.key_columns)),
        ).fetchone()
        assert row is not None
        table_id = int(str(row[0]))
        _empty(joiner, table)
        joiner.execute("DELETE FROM pgconcord.row_version WHERE table_id = %s", (table_id,))
        rows = tablecopy.table_rows(donor, joiner, table, observer.rows_copied)
        _copy_row_versions(donor, joiner, donor_table_id, table_id)
        for origin, (applied, window, done) in positions.items():
            joiner.execute(
                "INSERT INTO pgconcord.copy_horizon VALUES (%s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (origin, schema_name, table_name) DO UPDATE"
                " SET applied_snapshot = excluded.applied_snapshot,"
                " window_snapshot = excluded.window_snapshot, window_done = excluded.window_done",
                (origin, table.schema, table.name, applied, window, done),
            )
        joiner.execute(
            "INSERT INTO pgconcord.join_table (schema_name, table_name, attempt, copied_rows)"
            " VALUES (%s, %s, %s, %s)",
            (table.schema, table.name, attempt, rows),
        )
    return rows


BULK_VERSIONS = 100_000


def _copy_row_versions(
    donor: tablecopy.Donor, joiner: Connection, donor_table_id: int, table_id: int
) -> None:
    """The table's rows of pgconcord.row_version, under the joiner's id of the table. Many of
    them go in faster without the key's index, built again afterwards (it is the joiner's own
    table, unused until the join has finished); fewer go in the order of that index."""
    count = donor.connection.execute(
        "SELECT count(*) FROM pgconcord.row_version WHERE table_id = %s", (donor_table_id,)
    ).fetchone()
    incoming = int(str(count[0])) if count else 0
    key = None
    if incoming > BULK_VERSIONS:
        present = joiner.execute("SELECT count(*) FROM pgconcord.row_version").fetchone()
        if present is not None and int(str(present[0])) < incoming:
            key = joiner.execute(
                "SELECT conname::text, pg_get_constraintdef(oid) FROM pg_constraint"
                " WHERE conrelid = 'pgconcord.row_version'::regclass AND contype = 'p'"
            ).fetchone()
    if key is not None:
        joiner.execute(
            sql.SQL("ALTER TABLE pgconcord.row_version DROP CONSTRAINT {}").format(
                sql.Identifier(str(key[0]))
            )
        )
    tablecopy.catalog_rows(
        donor,
        joiner,
        "pgconcord.row_version",
        sql.SQL("table_id = {}").format(sql.Literal(donor_table_id)),
        replaced={"table_id": sql.Literal(table_id)},
        order=None if key is not None else sql.SQL("row_key"),
    )
    if key is not None:
        # The definition comes from pg_get_constraintdef: PostgreSQL's own, quoted text.
        joiner.execute(
            sql.SQL("ALTER TABLE pgconcord.row_version ADD CONSTRAINT {} {}").format(
                sql.Identifier(str(key[0])),
                sql.SQL(str(key[1])),
            )
        )


def _empty(joiner: Connection, table: Table) -> None:
    if not _has_rows(joiner, table.qualified_name):
        return
    try:
        with joiner.transaction():
            joiner.execute(sql.SQL("TRUNCATE {}").format(table.identifier))
    except psycopg.errors.FeatureNotSupported:
        # Referenced by a foreign key: delete instead (replica role: no cascade, no checks).
        joiner.execute(sql.SQL("DELETE FROM {}").format(table.identifier))


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
