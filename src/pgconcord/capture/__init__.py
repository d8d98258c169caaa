"""How a node captures its local changes: the mode `[replication] capture` asks for, resolved
per node. Every mode hands the rest of the engine the same change records (pgconcord.change_log
with row versions), so nodes of one cluster may capture differently.

Built today: "trigger" (row triggers generated per table, catalog.capture). "wal" (logical
decoding with pgoutput) is not built yet, so "auto" resolves to "trigger" on every node, and a
config that insists on "wal" is refused by setup rather than silently captured another way."""

from __future__ import annotations

from typing import Literal

import psycopg

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
    if requested != "wal":
        return "trigger"
    level = wal_level(connection)
    if level != "logical":
        raise PgconcordError(
            f'node {node_name}: capture = "wal" needs wal_level = logical there (it is {level};'
            ' changing it needs a restart), or use capture = "auto" or "trigger"'
        )
    raise PgconcordError(
        f'node {node_name}: capture = "wal" is not available in this version of pgconcord;'
        ' use capture = "auto" or "trigger" (both capture with triggers)'
    )


def installed_mode(connection: psycopg.Connection[tuple[object, ...]]) -> CaptureMode:
    """The mode a set-up node captures in, for `status`."""
    del connection  # one mode exists; the node will record its own once there are two
    return "trigger"
