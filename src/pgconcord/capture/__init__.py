"""How a node captures its local changes: the mode `[replication] capture` asks for, resolved
per node. Every mode hands the rest of the engine the same change records: captured_change,
which the stamper turns into pgconcord.change_log with row versions (stamp_captured.sql). So
nodes of one cluster may capture differently.

- "trigger": a row trigger generated per table appends each change (catalog.capture).
- "wal": the tables are published, and the node's agent streams its logical slot (pgoutput)
  into captured_change (capture.stream); without a streaming agent, whoever stamps first
  drains the slot (capture.wal, drain_wal.sql).
- "auto": "wal" where the node runs wal_level = logical and pgconcord's role has the rights
  WAL capture needs (capture.wal.missing_rights), "trigger" elsewhere."""

from __future__ import annotations

from typing import Literal

import psycopg

from pgconcord.capture import wal
from pgconcord.errors import PgconcordError

CaptureMode = Literal["trigger", "wal"]
RequestedCapture = Literal["auto", "trigger", "wal"]


def wal_level(connection: psycopg.Connection[tuple[object, ...]]) -> str:
    row = connection.execute("SELECT current_setting('wal_level')").fetchone()
    assert row is not None
    return str(row[0])


def resolve(
    connection: psycopg.Connection[tuple[object, ...]], node_name: str, requested: RequestedCapture
) -> CaptureMode:
    """The mode a node captures in; PgconcordError for a mode it cannot have."""
    if requested == "trigger":
        return "trigger"
    level = wal_level(connection)
    missing = wal.missing_rights(connection)
    if requested == "auto":
        return "wal" if level == "logical" and not missing else "trigger"
    if level != "logical":
        raise PgconcordError(
            f'node {node_name}: capture = "wal" needs wal_level = logical there (it is {level};'
            ' changing it needs a restart), or use capture = "auto" or "trigger"'
        )
    if missing:
        raise PgconcordError(
            f'node {node_name}: capture = "wal" needs, for pgconcord\'s role: '
            + "; ".join(missing)
            + " (a superuser runs these in the node's database; pgconcord grant ROLE prints"
            " them with the rest)"
        )
    return "wal"


def installed_mode(connection: psycopg.Connection[tuple[object, ...]]) -> CaptureMode:
    """The mode a set-up node captures in, for `status`."""
    return "wal" if wal.slot_name(connection) is not None else "trigger"
