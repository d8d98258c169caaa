"""Capture by logical decoding: the node's slot and publication, the rights they need, and the
replication origin that marks what pgconcord applies so that it is never captured again.

The reading: the node's agent streams the slot (capture.stream). Without a streaming agent,
whoever stamps drains the slot first, in SQL (drain_wal.sql), in its own transaction and under
the stamp lock, with pg_logical_slot_peek_binary_changes and the built-in pgoutput plugin; so
every caller of the stamper (a poll, an apply, sync, part) sees what the WAL holds, with an
agent or without one, and what is drained commits with the caller or is read again. A slot
nobody reads keeps WAL: the server's max_slot_wal_keep_size bounds that, and status shows it."""

from __future__ import annotations

import time

import psycopg
from psycopg import errors as pg_errors
from psycopg import sql

from pgconcord.errors import PgconcordError

PUBLICATION = "pgconcord"
# Replication origins are per server, not per database: one name space per database, and a
# few per database, since each applying session needs one of its own.
_ORIGINS_PER_DATABASE = 64
_ORIGIN_LOCK_CLASS = 0x70676F72  # advisory lock class of "this session has origin number n"
ORIGIN_FUNCTIONS = (
    "pg_replication_origin_create(text)",
    "pg_replication_origin_session_setup(text)",
    "pg_replication_origin_session_reset()",
    "pg_replication_origin_drop(text)",
)

Connection = psycopg.Connection[tuple[object, ...]]


def missing_rights(connection: Connection, role: str | None = None) -> list[str]:
    """What pgconcord's role (this session's, or `role`, which may not exist yet) lacks for
    WAL capture, as the statements that would grant it."""
    if role is None:
        current = connection.execute("SELECT current_user").fetchone()
        assert current is not None
        role = str(current[0])
    row = connection.execute(
        "SELECT rolsuper, rolreplication FROM pg_roles WHERE rolname = %s", (role,)
    ).fetchone()
    if row is not None and row[0]:
        return []
    missing = []
    quoted = sql.Identifier(role).as_string(connection)
    if row is None or not row[1]:
        missing.append(f"ALTER ROLE {quoted} REPLICATION")
    for function in ORIGIN_FUNCTIONS:
        allowed = row is not None and connection.execute(
            "SELECT has_function_privilege(%s, %s::regprocedure, 'EXECUTE')", (role, function)
        ).fetchone() == (True,)
        if not allowed:
            missing.append(f"GRANT EXECUTE ON FUNCTION {function} TO {quoted}")
    return missing


def slot_name(connection: Connection) -> str | None:
    """The slot a node in WAL mode captures from; None for a node in trigger mode."""
    found = connection.execute(
        "SELECT to_regclass('pgconcord.capture_state') IS NOT NULL"
    ).fetchone()
    if not found or not found[0]:
        return None
    row = connection.execute("SELECT slot_name FROM pgconcord.capture_state").fetchone()
    return None if row is None or row[0] is None else str(row[0])


def slot_retention(connection: Connection) -> tuple[int, float] | None:
    """For a node in WAL mode: the bytes of WAL its slot keeps, and for how many seconds
    what it holds has waited to be drained (0 when it holds nothing to drain)."""
    slot = slot_name(connection)
    if slot is None:
        return None
    row = connection.execute(
        "SELECT coalesce(pg_current_wal_lsn() - r.restart_lsn, 0)::bigint,"
        " CASE WHEN r.confirmed_flush_lsn IS NULL"
        "        OR r.confirmed_flush_lsn >= pg_current_wal_flush_lsn() THEN 0"
        "      ELSE extract(epoch FROM clock_timestamp() - coalesce(s.captured_at, now())) END"
        " FROM pgconcord.capture_state s"
        " LEFT JOIN pg_replication_slots r ON r.slot_name = s.slot_name"
    ).fetchone()
    if row is None:
        return None
    return int(str(row[0])), float(str(row[1]))


def _own_slot_name(connection: Connection) -> str:
    row = connection.execute(
        "SELECT oid FROM pg_database WHERE datname = current_database()"
    ).fetchone()
    assert row is not None
    return f"pgconcord_{row[0]}"


def create_slot(connection: Connection) -> str:
    """Make this database's slot if it has none (outside any transaction: PostgreSQL makes a
    slot only in a session that has written nothing, after waiting for running transactions);
    its name. Nothing is captured from it until tables join the publication (start)."""
    name = _own_slot_name(connection)
    # Before the slot: pgoutput looks its publication up as of each change it decodes.
    exists = connection.execute(
        "SELECT 1 FROM pg_publication WHERE pubname = %s", (PUBLICATION,)
    ).fetchone()
    options = "publish = 'insert, update, delete'"
    if connection.info.server_version >= 180000:
        # From 18 on, PostgreSQL refuses to update a table whose replica identity (FULL) holds
        # a generated column the publication leaves out.
        options += ", publish_generated_columns = stored"
    if exists is None:
        connection.execute(
            sql.SQL("CREATE PUBLICATION {} WITH ({})").format(
                sql.Identifier(PUBLICATION), sql.SQL(options)
            )
        )
    else:
        connection.execute(
            sql.SQL("ALTER PUBLICATION {} SET ({})").format(
                sql.Identifier(PUBLICATION), sql.SQL(options)
            )
        )
    if not connection.autocommit:
        connection.commit()
    exists = connection.execute(
        "SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", (name,)
    ).fetchone()
    if exists is None:
        connection.execute(
            "SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (name,)
        ).fetchone()
    return name


def start(connection: Connection, slot: str) -> None:
    """In the setup's transaction: the node's capture state names its slot and publication
    (create_slot made both)."""
    previous = connection.execute("SELECT slot_name FROM pgconcord.capture_state").fetchone()
    if previous is None or previous[0] != slot:
        connection.execute(
            "UPDATE pgconcord.capture_state SET slot_name = %s, publication_name = %s,"
            " captured_lsn = (SELECT confirmed_flush_lsn FROM pg_replication_slots"
            " WHERE slot_name = %s)",
            (slot, PUBLICATION, slot),
        )


def stop(connection: Connection) -> None:
    """After every table left the publication (committed), and what the slot held up to then
    was drained (stamped, committed): drop the slot and the publication. Autocommit."""
    slot = slot_name(connection)
    if slot is None:
        return
    # The node's agent may be streaming it (capture.stream): its session ends, and the agent
    # finds the node in trigger mode when it looks again.
    deadline = time.monotonic() + 10
    while True:
        try:
            with connection.transaction():  # a savepoint when in a transaction: tried again
                _end_stream_and_drop(connection, slot)
            break
        except pg_errors.ObjectInUse:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)  # the stream's session is ending, or began again
    connection.execute(sql.SQL("DROP PUBLICATION IF EXISTS {}").format(sql.Identifier(PUBLICATION)))
    connection.execute(
        "UPDATE pgconcord.capture_state SET slot_name = NULL, publication_name = NULL,"
        " captured_lsn = '0/0'"
    )


def _end_stream(connection: Connection, slot: str) -> None:
    """End the session of the agent's stream of the slot, if one streams it (the session
    ends soon after, not at once)."""
    connection.execute(
        "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots"
        " WHERE slot_name = %s AND active_pid <> pg_backend_pid()",
        (slot,),
    )


def _end_stream_and_drop(connection: Connection, slot: str) -> None:
    """ObjectInUse while the stream's session has not ended yet."""
    _end_stream(connection, slot)
    connection.execute(
        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = %s",
        (slot,),
    )


def drain_for_good(connection: Connection, node_name: str) -> None:
    """Before the slot goes (stop): drain what it holds from SQL, the node's agent's stream
    ended for as long as that takes (a drain_wal that found the slot streamed gives -1), and
    stamp it. In transactions of its own."""
    deadline = time.monotonic() + STREAM_CATCH_UP_SECONDS
    slot = slot_name(connection)
    _finish(connection)
    while slot is not None:
        with connection.transaction():
            row = connection.execute("SELECT pgconcord.drain_wal(false)").fetchone()
            if row is not None and int(str(row[0])) >= 0:
                connection.execute("SELECT pgconcord.stamp_captured(true)")
                return
        if time.monotonic() > deadline:
            raise PgconcordError(
                f"node {node_name}: its slot could not be drained before it is dropped (the"
                f" agent's stream kept it for {STREAM_CATCH_UP_SECONDS:.0f} s); the slot is"
                " kept: run setup again"
            )
        with connection.transaction():
            _end_stream(connection, slot)
        time.sleep(0.05)


# How long setup keeps ending an agent's stream of a node's slot that it must drain before it
# drops the slot (the agent starts its stream again half a second after it ends).
STREAM_CATCH_UP_SECONDS = 60.0


def publish_table(connection: Connection, identifier: sql.Identifier, keyless: bool) -> None:
    """Capture a table from the WAL from this transaction's commit on: published, with its old
    rows logged whole, and no row trigger (the trigger's drop waits out its writers)."""
    connection.execute(sql.SQL("DROP TRIGGER IF EXISTS pgconcord_capture ON {}").format(identifier))
    connection.execute(sql.SQL("DROP TRIGGER IF EXISTS pgconcord_keyless ON {}").format(identifier))
    identity = connection.execute(
        "SELECT relreplident FROM pg_class WHERE oid = %s::regclass",
        (identifier.as_string(connection),),
    ).fetchone()
    if identity is None or identity[0] != "f":
        connection.execute(sql.SQL("ALTER TABLE {} REPLICA IDENTITY FULL").format(identifier))
    if not is_published(connection, identifier):
        connection.execute(
            sql.SQL("ALTER PUBLICATION {} ADD TABLE {}").format(
                sql.Identifier(PUBLICATION), identifier
            )
        )
    if keyless:
        connection.execute(
            sql.SQL(
                "CREATE TRIGGER pgconcord_keyless BEFORE UPDATE OR DELETE ON {}"
                " FOR EACH STATEMENT EXECUTE FUNCTION pgconcord.refuse_keyless_change()"
            ).format(identifier)
        )


def unpublish_table(connection: Connection, identifier: sql.Identifier) -> None:
    """The reverse of publish_table, in the transaction that puts the table's trigger back."""
    connection.execute(sql.SQL("DROP TRIGGER IF EXISTS pgconcord_keyless ON {}").format(identifier))
    if is_published(connection, identifier):
        connection.execute(
            sql.SQL("ALTER PUBLICATION {} DROP TABLE {}").format(
                sql.Identifier(PUBLICATION), identifier
            )
        )


def is_published(connection: Connection, identifier: sql.Identifier) -> bool:
    row = connection.execute(
        "SELECT EXISTS (SELECT 1 FROM pg_publication p"
        " JOIN pg_publication_rel r ON r.prpubid = p.oid"
        " WHERE p.pubname = %s AND r.prrelid = %s::regclass)",
        (PUBLICATION, identifier.as_string(connection)),
    ).fetchone()
    return bool(row and row[0])


def mark_applying_session(connection: Connection) -> bool:
    """Give an applying session a replication origin of its own, so that what it commits is
    not drained as a local change; whether it has one. A role without the right gets none
    (then this node must capture with triggers). Autocommit or not; leaves no transaction.

    The applying sessions of a database share out the origins by a session lock on each
    number (_ORIGIN_LOCK_CLASS): a session sets up only an origin whose lock it took, and
    makes only one the catalog lacks. Trying them instead logged an error on the server for
    every origin found missing or in use, several at every sync."""
    row = connection.execute(
        "SELECT has_function_privilege('pg_replication_origin_session_setup(text)', 'EXECUTE')"
        " AND has_function_privilege('pg_replication_origin_create(text)', 'EXECUTE'),"
        " (SELECT oid FROM pg_database WHERE datname = current_database()),"
        " ARRAY(SELECT roname FROM pg_replication_origin)"
    ).fetchone()
    _finish(connection)
    if not row or not row[0]:
        return False
    existing = set(row[2])  # type: ignore[call-overload]
    for number in range(1, _ORIGINS_PER_DATABASE + 1):
        name = f"pgconcord_{row[1]}_{number}"
        taken = connection.execute(
            "SELECT pg_try_advisory_lock(%s, %s)", (_ORIGIN_LOCK_CLASS, number)
        ).fetchone()
        _finish(connection)
        if not (taken and taken[0]):
            continue
        try:
            if name not in existing:
                connection.execute("SELECT pg_replication_origin_create(%s)", (name,))
            connection.execute("SELECT pg_replication_origin_session_setup(%s)", (name,))
            _finish(connection)
            return True
        except (pg_errors.UndefinedObject, pg_errors.UniqueViolation, pg_errors.ObjectInUse):
            # Dropped, made or set up meanwhile by someone who does not take the locks (an
            # older agent, an operator): the next number.
            _abandon(connection)
        except pg_errors.ConfigurationLimitExceeded:
            _abandon(connection)
            _unlock_origin(connection, number)
            return False
        _unlock_origin(connection, number)
    return False


def _unlock_origin(connection: Connection, number: int) -> None:
    connection.execute("SELECT pg_advisory_unlock(%s, %s)", (_ORIGIN_LOCK_CLASS, number))
    _finish(connection)


def _finish(connection: Connection) -> None:
    if not connection.autocommit:
        connection.commit()


def _abandon(connection: Connection) -> None:
    if not connection.autocommit:
        connection.rollback()
