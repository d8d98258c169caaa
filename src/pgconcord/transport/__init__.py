"""How changes travel between nodes.

A target asks an origin for four things, the Origin port (origin.py): look for changes newer
than its position (poll), stream a window of them, make what the window read durable, and
describe the origin's tables. Today one implementation reads the origin's PostgreSQL directly
(postgres.py, over libpq sessions: connections.py); others (HTTP for sites that cannot reach
each other's database, a message bus for large fleets) can follow without touching apply, which
keeps its position in the target database, committed with the rows, so that exactly-once never
depends on the transport.
"""

from pgconcord.transport.connections import (
    CHANNEL,
    CONNECT_TIMEOUT_SECONDS,
    OLDEST_SERVER_VERSION,
    PINNED_SETTINGS,
    Connection,
    check_server_version,
    connect,
    describe_connection_error,
    describe_lost_session,
    erring_node,
    first_line,
    lost_session,
    require_setup,
    server_version_problem,
    session_dsn,
)
from pgconcord.transport.origin import Horizon, Origin, Poll, Window

__all__ = [
    "CHANNEL",
    "CONNECT_TIMEOUT_SECONDS",
    "OLDEST_SERVER_VERSION",
    "PINNED_SETTINGS",
    "Connection",
    "Horizon",
    "Origin",
    "Poll",
    "Window",
    "check_server_version",
    "connect",
    "describe_connection_error",
    "describe_lost_session",
    "erring_node",
    "first_line",
    "lost_session",
    "require_setup",
    "server_version_problem",
    "session_dsn",
]
