"""Sessions with a node's PostgreSQL: opening them with pinned settings and one readable reason
when that fails, and telling a lost session from a failed statement."""

from __future__ import annotations

import os
from collections.abc import Mapping

import psycopg
from psycopg import errors as pg_errors
from psycopg import pq, sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgconcord import catalog
from pgconcord.config import NodeConfig
from pgconcord.errors import NodeUnavailable, NotSetUp, PgconcordError

CONNECT_TIMEOUT_SECONDS = 5
# What agents LISTEN to on each origin: a commit there (capture's NOTIFY) or membership news.
CHANNEL = "pgconcord_change"
OLDEST_SERVER_VERSION = 130000  # server_version_num of the oldest PostgreSQL pgconcord supports

Connection = psycopg.Connection[tuple[object, ...]]

# Limits a role or database may set (ALTER ROLE ... SET) that would cut pgconcord's work off
# halfway: a window is staged and applied in transactions whose length grows with the backlog,
# the origin's session sits idle in its transaction while the target applies, and a join copies
# whole tables in one statement. All of them are user-settable, so the startup packet sets them
# for any role, at no extra round trip.
# jit: the planner's guess of how many rows a stamp or an apply reads comes from statistics
# that a burst leaves far too high (captured_change has held a million rows, and keeps their
# pages), and above jit_above_cost every such statement compiles its expressions first: about
# 300 ms of CPU, measured, for a stamp of 60 rows. pgconcord's statements are short; none
# gains from it.
PINNED_SETTINGS = (
    ("statement_timeout", "0"),
    ("lock_timeout", "0"),
    ("idle_in_transaction_session_timeout", "0"),
    ("jit", "off"),
)
# Limits of the same kind newer servers have (idle_session_timeout would end the agent's
# listening session, transaction_timeout a long window). A startup option naming a setting the
# server does not know is refused, so these are SET after connecting, where the server has them.
_NEWER_PINNED_SETTINGS = ((140000, "idle_session_timeout"), (170000, "transaction_timeout"))

# Authentication and authorization failures are reported by class, not by message text.
_ACCESS_ERRORS: dict[type[Exception], str] = {
    pg_errors.InvalidPassword: "authentication failed (wrong password?)",
    pg_errors.InvalidAuthorizationSpecification: "authentication refused",
    pg_errors.InvalidCatalogName: "database does not exist",
}

# SQLSTATEs that end the session, as opposed to failing one statement of a session that goes
# on: the server shutting down or restarting, or a server-side timeout terminating it.
_SESSION_ENDED = {"57P01", "57P02", "57P03", "57P05", "25P03", "25P04"}


def session_dsn(dsn: str, settings: tuple[tuple[str, str], ...] = PINNED_SETTINGS) -> str:
    """The DSN with PINNED_SETTINGS (or `settings`) added to its startup options (after the
    DSN's own, or PGOPTIONS', which they would otherwise replace), for pgconcord's sessions and
    the client programs it runs (psql)."""
    parameters = conninfo_to_dict(dsn)
    ours = " ".join(f"-c {name}={value}" for name, value in settings)
    theirs = str(parameters.get("options") or os.environ.get("PGOPTIONS") or "").strip()
    parameters["options"] = f"{theirs} {ours}" if theirs else ours
    return make_conninfo("", **parameters)


# The server version each DSN last connected to: the newer settings it has then go into the
# startup options of the next session, instead of a SET, which costs a round trip and a
# transaction (the agent opens short sessions to every peer for its purges).
_server_versions: dict[str, int] = {}


def _newer_settings(version: int) -> tuple[tuple[str, str], ...]:
    return tuple((name, "0") for since, name in _NEWER_PINNED_SETTINGS if version >= since)


def connect(node: NodeConfig, *, autocommit: bool = False) -> Connection:
    """Open a connection to a node, or raise NodeUnavailable with one readable reason."""
    try:
        dsn = session_dsn(node.dsn)
    except psycopg.ProgrammingError as error:  # config.py checks DSNs; this is belt and braces
        raise NodeUnavailable(node.name, f"invalid dsn: {error}") from None
    known = _server_versions.get(node.dsn)
    pinned: tuple[tuple[str, str], ...] = ()
    connection = None
    if known is not None:
        pinned = _newer_settings(known)
        try:
            connection = _connect(session_dsn(node.dsn, PINNED_SETTINGS + pinned), autocommit)
        except psycopg.Error as error:
            if not _unknown_setting(error):
                raise NodeUnavailable(node.name, describe_connection_error(error)) from None
            # A server older than the last one at this address: as for one never seen.
            _server_versions.pop(node.dsn, None)
            pinned = ()
    if connection is None:
        try:
            connection = _connect(dsn, autocommit)
        except psycopg.Error as error:
            raise NodeUnavailable(node.name, describe_connection_error(error)) from None
    version = connection.info.server_version
    # What the startup options did not pin: all of them for a server never seen, those it
    # has gained for one upgraded at the same address.
    newer = [
        sql.SQL("SET {} = 0").format(sql.Identifier(name))
        for name, _ in _newer_settings(version)
        if (name, "0") not in pinned
    ]
    try:
        if newer:
            connection.execute(sql.SQL("; ").join(newer))
            if not autocommit:
                connection.commit()
    except psycopg.Error as error:
        connection.close()
        raise NodeUnavailable(node.name, describe_connection_error(error)) from None
    _server_versions[node.dsn] = version
    return connection


def _connect(dsn: str, autocommit: bool) -> Connection:
    return psycopg.connect(
        dsn,
        autocommit=autocommit,
        connect_timeout=CONNECT_TIMEOUT_SECONDS,
        application_name="pgconcord",
    )


def _unknown_setting(error: psycopg.Error) -> bool:
    """Whether a connection was refused for a startup option the server does not know (the
    message may be translated; the setting's name in it is not)."""
    text = str(error)
    return error.sqlstate == "42704" or any(
        f'"{name}"' in text for _, name in _NEWER_PINNED_SETTINGS
    )


def describe_connection_error(error: psycopg.Error) -> str:
    for error_class, reason in _ACCESS_ERRORS.items():
        if isinstance(error, error_class):
            return reason
    # libpq reports network failures without an SQLSTATE; its first line is the useful part
    # and never contains the password.
    text = str(error).strip().splitlines()
    first = text[0] if text else type(error).__name__
    if first.startswith("connection failed: "):
        first = first.removeprefix("connection failed: ")
    return f"cannot connect: {first}"


def describe_lost_session(error: psycopg.Error) -> str:
    """One line for a session that ended under us (lost_session), never with the password."""
    first = first_line(error)
    for prefix in ("consuming input failed: ", "sending query failed: ", "connection failed: "):
        first = first.removeprefix(prefix)
    return f"connection lost: {first}"


def lost_session(error: BaseException, sessions: Mapping[str, Connection | None]) -> str | None:
    """The node whose session the error ended, or None when the error is something else.

    Only a lost session makes a node "unavailable": a new connection later overcomes it by
    itself. A statement cancelled, a lock not granted, a full disk or a missing right leave the
    session working, and the same work would fail the same way again: that is a stall of the
    pair with the server's reason, never "waiting for the node"."""
    for name, connection in sessions.items():
        if connection is not None and connection.broken:
            return name
    if not isinstance(error, psycopg.Error):
        return None
    sqlstate = error.sqlstate
    # No SQLSTATE: libpq's own report of a connection that failed (closed by the server, a
    # network timeout), psycopg's of one already closed.
    if (sqlstate is None and isinstance(error, psycopg.OperationalError)) or (
        sqlstate is not None and (sqlstate.startswith("08") or sqlstate in _SESSION_ENDED)
    ):
        return erring_node(sessions) or next(iter(sessions), None)
    return None


def erring_node(sessions: Mapping[str, Connection | None]) -> str | None:
    """The node whose session holds the failed transaction, if one does."""
    for name, connection in sessions.items():
        if (
            connection is not None
            and not connection.closed
            and connection.info.transaction_status == pq.TransactionStatus.INERROR
        ):
            return name
    return None


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def server_version_problem(node: str, server_version: int) -> str | None:
    """Why a server of this version (server_version_num) cannot be a node, or None."""
    if server_version >= OLDEST_SERVER_VERSION:
        return None
    if server_version >= 100000:
        release = str(server_version // 10000)
    else:  # before 10 a major version had two parts: 90624 is 9.6
        release = f"{server_version // 10000}.{server_version // 100 % 100}"
    return (
        f"node {node} runs PostgreSQL {release}: pgconcord needs PostgreSQL 13 or newer"
        " (it reads change logs with pg_snapshot and pg_visible_in_snapshot)"
    )


def check_server_version(connection: Connection, node: str) -> None:
    """Refuse, in one line naming the node, a server older than PostgreSQL 13."""
    problem = server_version_problem(node, connection.info.server_version)
    if problem is not None:
        raise PgconcordError(problem)


def require_setup(connection: Connection, node: str) -> int:
    """The node's catalog version; NotSetUp when setup never ran there."""
    version = catalog.installed_version(connection)
    if not connection.autocommit:
        connection.rollback()
    if version == 0:
        raise NotSetUp(node)
    return version
