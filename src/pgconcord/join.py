"""`pgconcord join NAME`: add a node to a running cluster with a copy of a live node.

1. Register: the node is recorded as joining on every member (each one's membership lock waits
   for a purge in progress there), so from then on every node keeps its whole change log for it.
   The joining node's old data, log and positions are discarded (an evicted or parted node
   coming back, or --discard).
2. Create the tables it lacks from the donor's definitions (pg_dump), without their indexes
   and constraints, which are built after the rows are in, as pg_dump | psql does.
3. Copy on one REPEATABLE READ snapshot of the donor, a transaction per table on the joining
   node: the rows (COPY), their versions (pgconcord.row_version, which decide later conflicts)
   and a copy horizon per origin: what the table holds of each origin's changes, which is the
   donor's position for that origin read in the same snapshot (positions commit with the rows
   they applied) and, for the donor's own changes, the snapshot itself. A run that is
   interrupted keeps the tables it committed; the next run copies the others on a new
   snapshot, and the horizons make each table skip the changes it already holds.
4. Finish: the joining node starts from the positions of its first run (the earliest), the
   same install as `setup` runs (capture, key slot, positions of the peers for it), and every
   member records it as active.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

import psycopg
from psycopg import sql

from pgconcord import catalog, install, membership, reader, tablecopy
from pgconcord.apply import open_target
from pgconcord.catalog import Table
from pgconcord.config import ClusterConfig, NodeConfig
from pgconcord.errors import ConfigError, NodeUnavailable, PgconcordError, SchemaError
from pgconcord.membership import ACTIVE, EVICTED, JOINING, PARTED, Member
from pgconcord.transport import connect

Connection = psycopg.Connection[tuple[object, ...]]
Position = tuple[str, str | None, int | None]  # applied_snapshot, window_snapshot, window_done
EMPTY_POSITION: Position = ("1:1:", None, None)


class JoinObserver(Protocol):
    """What a join reports as it goes; the command line draws it, tests may interrupt it."""

    def note(self, text: str) -> None: ...

    def table_started(self, name: str, number: int, count: int, estimated_rows: int) -> None: ...

    def rows_copied(self, rows: int) -> None: ...

    def table_done(self, name: str, rows: int) -> None: ...


class QuietObserver:
    """Reports nothing."""

    def note(self, text: str) -> None:
        pass

    def table_started(self, name: str, number: int, count: int, estimated_rows: int) -> None:
        pass

    def rows_copied(self, rows: int) -> None:
        pass

    def table_done(self, name: str, rows: int) -> None:
        pass


@dataclass
class JoinReport:
    node: str
    donor: str = ""
    tables: int = 0
    copied: dict[str, int] = field(default_factory=dict)  # copied by this run: table -> rows
    kept: list[str] = field(default_factory=list)  # copied by an earlier, interrupted run
    created: list[str] = field(default_factory=list)  # created from the donor's definitions
    discarded: str | None = None  # what of the node's own data was thrown away, and why
    seconds: float = 0.0

    @property
    def rows(self) -> int:
        return sum(self.copied.values())


@dataclass
class _Cluster:
    """The nodes a join works with, and what they record."""

    config: ClusterConfig
    joiner: NodeConfig
    admin: dict[str, Connection]  # autocommit sessions to the joiner and every member
    members: dict[str, Member]  # merged over the members
    peers: list[NodeConfig]  # active members other than the joiner

    def close(self) -> None:
        for connection in self.admin.values():
            connection.close()


def join(
    config: ClusterConfig,
    name: str,
    *,
    donor: str | None = None,
    discard: bool = False,
    observer: JoinObserver | None = None,
) -> JoinReport:
    observer = observer or QuietObserver()
    started = time.monotonic()
    report = JoinReport(node=name)
    cluster = _open(config, name)
    try:
        joiner = cluster.admin[name]
        state = _joiner_state(joiner)
        own = state.get("own")
        join_state = state.get("join_state")
        peer_views = [
            membership.read_members(cluster.admin[p.name])
            for p in config.nodes
            if p.name != name and p.name in cluster.admin
        ]
        still_joining = any(
            view.get(name) is not None and view[name].state == JOINING for view in peer_views
        )
        if own == ACTIVE and join_state is None and still_joining:
            observer.note(f"{name} was copied already; recording it as active everywhere")
            _record_active(cluster, membership.now())
            report.seconds = time.monotonic() - started
            return report
        if own == ACTIVE and join_state is not None:
            report.donor = str(join_state["donor"])
            observer.note(f"{name} was copied already; finishing the install")
            _finish(cluster, report, observer)
            report.seconds = time.monotonic() - started
            return report
        donor_node = _choose_donor(cluster, donor, join_state)
        report.donor = donor_node.name
        merged_state = membership.state_of(cluster.members, name)
        if merged_state == JOINING and join_state is not None:
            if join_state["donor"] != donor_node.name:
                observer.note(
                    f"the earlier run copied from {join_state['donor']}: starting over from"
                    f" {donor_node.name}"
                )
                _register(cluster, donor_node, report, observer, discard=True)
        else:
            if merged_state == ACTIVE and (
                name in cluster.members or catalog.local_node_name(joiner) == name
            ):
                raise PgconcordError(
                    f"node {name} is already an active member of the cluster;"
                    f" to copy it afresh, `pgconcord part {name}` first"
                )
            if merged_state in (EVICTED, PARTED):
                member = cluster.members[name]
                report.discarded = (
                    f"{name} was {merged_state} on {member.changed_at:%Y-%m-%d %H:%M}:"
                    " its data, and the changes it had not sent, are discarded"
                )
                observer.note(report.discarded)
            _register(cluster, donor_node, report, observer, discard=discard)
        _copy(cluster, donor_node, report, observer)
        _finish(cluster, report, observer)
        report.seconds = time.monotonic() - started
        return report
    finally:
        cluster.close()


# -- who is who ------------------------------------------------------------------------------


def _open(config: ClusterConfig, name: str) -> _Cluster:
    joiner = config.node_by_name(name)
    if len(config.nodes) < 2:
        raise ConfigError(f"node {name} is the only node in the config: nothing to join")
    admin: dict[str, Connection] = {}
    unreachable: dict[str, str] = {}
    try:
        admin[name] = connect(joiner, autocommit=True)
        for node in config.nodes:
            if node.name == name:
                continue
            try:
                admin[node.name] = connect(node, autocommit=True)
            except NodeUnavailable as error:
                unreachable[node.name] = error.reason
        views = []
        outside = set()  # listed but never set up: nodes waiting to join themselves
        for node_name, connection in list(admin.items()):
            if node_name == name:
                continue
            if catalog.installed_version(connection) == 0:
                outside.add(node_name)
                admin.pop(node_name).close()
                continue
            with connection.transaction():
                catalog.migrate(connection)
            views.append(membership.read_members(connection))
        if membership.installed(admin[name]):
            views.append(membership.read_members(admin[name]))
        members = membership.merge(views)
        _check_members(config, name, members, unreachable)
        peers = [
            node
            for node in config.nodes
            if node.name not in outside
            and node.name != name
            and node.name not in unreachable
            and membership.state_of(members, node.name) == ACTIVE
        ]
        if not peers:
            raise PgconcordError(
                f"no node to copy {name} from: run pgconcord setup for the cluster without"
                f" {name} first"
            )
        return _Cluster(config, joiner, admin, members, peers)
    except BaseException:
        for connection in admin.values():
            connection.close()
        raise


def _check_members(
    config: ClusterConfig, name: str, members: dict[str, Member], unreachable: dict[str, str]
) -> None:
    for node in config.nodes:
        state = membership.state_of(members, node.name)
        if node.name == name:
            continue
        if state == PARTED:
            raise ConfigError(
                f"node {node.name} was parted from the cluster: remove it from the config"
            )
        if state == JOINING:
            raise PgconcordError(f"node {node.name} is joining: finish that join first")
        if node.name in unreachable and state != EVICTED:
            raise NodeUnavailable(
                node.name,
                f"{unreachable[node.name]}; a join needs every member reachable, so that none"
                f" purges changes {name} will need",
            )
    for member_name, member in members.items():
        if member_name not in config.node_names and member.state in (ACTIVE, JOINING):
            raise ConfigError(
                f"node {member_name} is a member of the cluster but not in this config"
            )


def _joiner_state(joiner: Connection) -> dict[str, Any]:
    """The joining node's own record of itself and of a join in progress."""
    found: dict[str, Any] = {}
    if not membership.installed(joiner):
        return found
    own = catalog.local_node_name(joiner)
    if own is not None:
        found["own"] = membership.state_of(membership.read_members(joiner), own)
    row = joiner.execute(
        "SELECT donor, created_tables, post_data FROM pgconcord.join_state"
    ).fetchone()
    if row is not None:
        found["join_state"] = {"donor": str(row[0]), "created": row[1], "post_data": row[2]}
    return found


def _choose_donor(
    cluster: _Cluster, wanted: str | None, join_state: dict[str, Any] | None
) -> NodeConfig:
    active = {node.name: node for node in cluster.peers}
    if wanted is not None:
        cluster.config.node_by_name(wanted)
        if wanted == cluster.joiner.name:
            raise ConfigError(f"node {wanted} cannot copy from itself")
        if wanted not in active:
            state = membership.state_of(cluster.members, wanted)
            raise PgconcordError(f"node {wanted} cannot be the donor: it is {state}")
        return active[wanted]
    if join_state is not None and join_state["donor"] in active:
        return active[str(join_state["donor"])]
    return cluster.peers[0]


# -- 1. register -----------------------------------------------------------------------------


def _register(
    cluster: _Cluster,
    donor: NodeConfig,
    report: JoinReport,
    observer: JoinObserver,
    *,
    discard: bool,
) -> None:
    name = cluster.joiner.name
    joiner = cluster.admin[name]
    tables, _ = _donor_tables(cluster.config, cluster.admin[donor.name], donor.name)
    present = _present_tables(cluster, joiner)
    if report.discarded is None and not discard:
        holding = [t.qualified_name for t in tables if t.qualified_name in present]
        holding = [t for t in holding if _has_rows(joiner, t)]
        if holding:
            raise SchemaError(
                f"node {name}: table {holding[0]} already holds rows; a joining node gets its"
                " rows from the donor (empty it, or add --discard to replace them)"
            )
    # Tables an earlier run created keep their pending indexes and constraints.
    earlier = (
        joiner.execute("SELECT created_tables, post_data FROM pgconcord.join_state").fetchone()
        if membership.installed(joiner)
        else None
    )
    when = membership.now()
    membership.quiet_schema_changes(joiner)
    with joiner.transaction():
        catalog.migrate(joiner)
        catalog.claim_identity(joiner, name, cluster.config.cluster.name)
        membership.lock(joiner)
        membership.adopt(joiner, cluster.members.values())
        membership.record(joiner, name, JOINING, when, f"joining from {donor.name}")
        membership.drop_capture(joiner)
        for statement in (
            "DELETE FROM pgconcord.change_log",
            "DELETE FROM pgconcord.position",
            "DELETE FROM pgconcord.copy_horizon",
            "DELETE FROM pgconcord.join_table",
            "DELETE FROM pgconcord.join_attempt",
            "DELETE FROM pgconcord.join_state",
            "UPDATE pgconcord.parked_change SET state = 'discarded', resolved_at = now()"
            " WHERE state = 'parked'",
        ):
            joiner.execute(statement)
        joiner.execute(
            "INSERT INTO pgconcord.join_state (donor, created_tables, post_data)"
            " VALUES (%s, %s, %s)",
            (donor.name, earlier[0] if earlier else [], earlier[1] if earlier else None),
        )
    for peer in cluster.peers:
        connection = cluster.admin[peer.name]
        with connection.transaction():
            membership.lock(connection)
            membership.record(connection, name, JOINING, when, f"joining from {donor.name}")
            catalog.ensure_positions(connection, [name])
    observer.note(f"{name} registered as joining on {len(cluster.peers)} nodes")
    earlier_created = set(earlier[0]) if earlier and isinstance(earlier[0], list) else set()
    _check_shapes(cluster, donor, tables, joiner, earlier_created)
    missing = [t for t in tables if t.qualified_name not in present]
    if missing:
        _create_tables(cluster, donor, present, missing, report, observer)


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
        snapshot = reader.begin_snapshot(donor)
        source = tablecopy.Donor(donor_node, donor)
        positions = _positions(cluster, donor, donor_node.name, snapshot)
        with connect(donor_node) as flusher:
            reader.make_durable(flusher)  # what the snapshot calls committed stays so
            flusher.commit()
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


# -- 3. finish -------------------------------------------------------------------------------


def _finish(cluster: _Cluster, report: JoinReport, observer: JoinObserver) -> None:
    name = cluster.joiner.name
    joiner = cluster.admin[name]
    row = joiner.execute("SELECT created_tables, post_data FROM pgconcord.join_state").fetchone()
    if row is not None and row[1]:
        observer.note("building the indexes and constraints of the tables created")
        with connect(cluster.joiner) as session:
            membership.quiet_schema_changes(session)
            try:
                session.execute(str(row[1]).encode())
            except psycopg.Error as error:
                raise SchemaError(
                    f"node {name}: building indexes and constraints failed: {_first_line(error)}"
                ) from None
            session.execute("UPDATE pgconcord.join_state SET post_data = NULL")
            session.commit()
    slots = {peer.name: catalog.key_slot(cluster.admin[peer.name]) for peer in cluster.peers}
    slots[name] = catalog.key_slot(joiner)
    slot = install.assign_key_slots(slots)[name]
    when = membership.now()
    with joiner.transaction():
        membership.lock(joiner)
        membership.record(joiner, name, ACTIVE, when, f"joined from {report.donor}")
        joiner.execute("UPDATE pgconcord.local_node SET key_slot = %s", (slot,))
        first = joiner.execute("SELECT min(attempt) FROM pgconcord.join_attempt").fetchone()
        if first is not None and first[0] is not None:
            joiner.execute("DELETE FROM pgconcord.position")
            joiner.execute(
                "INSERT INTO pgconcord.position (origin, applied_snapshot, window_snapshot,"
                " window_done) SELECT origin, applied_snapshot, window_snapshot, window_done"
                " FROM pgconcord.join_position WHERE attempt = %s",
                (first[0],),
            )
    # The same install as setup, on the new node alone (the live members keep their triggers:
    # recreating them would lock their tables under load): capture, event triggers, and the
    # key slot chosen above, which setup keeps.
    install.setup(
        cluster.config.model_copy(update={"node": [cluster.joiner]}), progress=observer.note
    )
    with joiner.transaction():
        for table in ("join_state", "join_table", "join_attempt"):
            joiner.execute(sql.SQL("DELETE FROM pgconcord.{}").format(sql.Identifier(table)))
    _record_active(cluster, when)


def _record_active(cluster: _Cluster, when: datetime) -> None:
    name = cluster.joiner.name
    for peer in cluster.peers:
        connection = cluster.admin[peer.name]
        with connection.transaction():
            membership.lock(connection)
            catalog.ensure_positions(connection, [name])
            membership.record(connection, name, ACTIVE, when, "joined")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
