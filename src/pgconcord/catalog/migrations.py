"""The catalog's versioned migrations (sql/NNN_*.sql), applied in order by every setup, and
the version a database is at."""

from __future__ import annotations

import re
from importlib import resources

import psycopg

SCHEMA = "pgconcord"
_MIGRATION_FILE = re.compile(r"^(\d{3})_[a-z0-9_]+\.sql$")
# Serializes concurrent setups of one database (two operators, or setup racing an agent).
_SETUP_LOCK = 0x70676363  # "pgcc"
_FUNCTIONS = ("drain_wal.sql", "stamp_captured.sql", "log_schema_change.sql")  # see migrate


def read_sql(name: str) -> str:
    return resources.files("pgconcord").joinpath("sql", name).read_text(encoding="utf-8")


def migrations() -> list[tuple[int, str]]:
    found = []
    for entry in resources.files("pgconcord").joinpath("sql").iterdir():
        match = _MIGRATION_FILE.match(entry.name)
        if match:
            found.append((int(match.group(1)), entry.name))
    return sorted(found)


def latest_version() -> int:
    return migrations()[-1][0]


def installed_version(connection: psycopg.Connection[tuple[object, ...]]) -> int:
    row = connection.execute(
        "SELECT to_regclass('pgconcord.catalog_version') IS NOT NULL"
    ).fetchone()
    if not row or not row[0]:
        return 0
    version = connection.execute("SELECT version FROM pgconcord.catalog_version").fetchone()
    return int(str(version[0])) if version else 0


def migrate(connection: psycopg.Connection[tuple[object, ...]]) -> int:
    """Bring the catalog to the newest version inside the caller's transaction."""
    connection.execute("SELECT pg_advisory_xact_lock(%s)", (_SETUP_LOCK,))
    current = installed_version(connection)
    for version, file_name in migrations():
        if version <= current:
            continue
        connection.execute(read_sql(file_name).encode())
        connection.execute(
            "INSERT INTO pgconcord.catalog_version (version) VALUES (%s)"
            " ON CONFLICT (singleton) DO UPDATE SET version = excluded.version",
            (version,),
        )
        current = version
    # Functions kept in one file each, whatever the version they came in, made anew by every
    # migration: their bodies live once, not in every migration that changes them.
    for file_name in _FUNCTIONS:
        connection.execute(read_sql(file_name).encode())
    return current
