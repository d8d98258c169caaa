"""How changes travel between nodes. Today: direct PostgreSQL connections (libpq DSNs).

Other transports (HTTP for sites that cannot reach each other's database, NATS JetStream for
large fleets) would offer the same two things: a connection to read an origin's change log,
and one to apply into a target.
"""

from __future__ import annotations

import psycopg
from psycopg import errors as pg_errors

from pgconcord.config import NodeConfig
from pgconcord.errors import NodeUnavailable

CONNECT_TIMEOUT_SECONDS = 5

# Authentication and authorization failures are reported by class, not by message text.
_ACCESS_ERRORS: dict[type[Exception], str] = {
    pg_errors.InvalidPassword: "authentication failed (wrong password?)",
    pg_errors.InvalidAuthorizationSpecification: "authentication refused",
    pg_errors.InvalidCatalogName: "database does not exist",
}


def connect(
    node: NodeConfig, *, autocommit: bool = False
) -> psycopg.Connection[tuple[object, ...]]:
    """Open a connection to a node, or raise NodeUnavailable with one readable reason."""
    try:
        return psycopg.connect(
            node.dsn,
            autocommit=autocommit,
            connect_timeout=CONNECT_TIMEOUT_SECONDS,
            application_name="pgconcord",
        )
    except psycopg.Error as error:
        raise NodeUnavailable(node.name, describe_connection_error(error)) from None


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
