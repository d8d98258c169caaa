"""The join itself: register the node, have its tables created and copied, finish the install,
and resume where an interrupted run stopped."""

from __future__ import annotations

import time
from datetime import datetime

import psycopg
from psycopg import sql

from pgconcord import catalog, install, membership
from pgconcord.config import ClusterConfig, NodeConfig
from pgconcord.errors import PgconcordError, SchemaError
from pgconcord.join.cluster import _choose_donor, _Cluster, _joiner_state, _open
from pgconcord.join.report import JoinObserver, JoinReport, QuietObserver
from pgconcord.join.tables import (
    _check_shapes,
    _copy,
    _create_tables,
    _donor_tables,
    _first_line,
    _has_rows,
    _present_tables,
)
from pgconcord.membership import ACTIVE, EVICTED, JOINING, PARTED
from pgconcord.transport import connect


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
            "DELETE FROM pgconcord.captured_change",
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
