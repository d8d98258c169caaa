"""The pair's position in the target database: how far the origin's changes are applied here.
It moves in the transaction that applies each piece, so a crash at any instant repeats nothing
and loses nothing; every applying transaction reads it, locked, and checks it is still the one
its work began from (another process that moved it makes the work start over: Superseded)."""

from __future__ import annotations

from dataclasses import dataclass

import psycopg

from pgconcord.apply.errors import ApplyError
from pgconcord.transport import Window

Connection = psycopg.Connection[tuple[object, ...]]

# How often an idle pair moves its position forward, so the origin can purge its log.
IDLE_ADVANCE_SECONDS = 10


class Superseded(Exception):
    """Another process moved this pair's position while we worked; start over from it."""


@dataclass(frozen=True)
class Position:
    applied_snapshot: str
    window_snapshot: str | None
    window_done: int | None


def require_replica_mode(mode: object, node_name: str) -> None:
    """Refuse to apply in a session whose session_replication_role (mode) is not replica."""
    if mode != "replica":
        raise ApplyError(
            f"node {node_name}: the applying session is not in replica mode"
            f" (session_replication_role = {mode}); nothing is applied"
        )


# Every applying transaction reads its position here, and with it the mode it runs in: nothing
# may have undone replica mode unseen.
POSITION_QUERY = (
    "SELECT applied_snapshot::text, window_snapshot::text, window_done,"
    " current_setting('session_replication_role')"
    " FROM pgconcord.position WHERE origin = %s"
)


def position_of(row: tuple[object, ...] | None, origin: str, target_name: str) -> Position:
    """The Position a POSITION_QUERY row gives (the origin is named origin, the target
    target_name), checking the session's mode on the way."""
    if row is None:
        raise ApplyError(
            f"node {target_name} has no position for origin {origin}; run pgconcord setup"
        )
    require_replica_mode(row[3], target_name)
    done = row[2]
    return Position(
        str(row[0]),
        None if row[1] is None else str(row[1]),
        None if done is None else int(str(done)),
    )


def read_position(target: Connection, origin: str, target_name: str, *, lock: bool) -> Position:
    """The target's position for the origin (named origin; the target is named target_name)."""
    query = POSITION_QUERY + (" FOR UPDATE" if lock else "")
    return position_of(target.execute(query, (origin,)).fetchone(), origin, target_name)


def check_position(target: Connection, origin: str, target_name: str, expected: Position) -> None:
    """Lock the position; Superseded unless it is still the expected one."""
    if read_position(target, origin, target_name, lock=True) != expected:
        raise Superseded


def advance_idle(target: Connection, origin: str, position: Position, snapshot: str) -> bool:
    """Move an idle pair's position to the origin's snapshot (an empty window), at most every
    IDLE_ADVANCE_SECONDS; whether it moved. The caller made what the snapshot calls committed
    or rolled back durable at the origin first."""
    moved = target.execute(
        "UPDATE pgconcord.position SET applied_snapshot = %s, updated_at = now()"
        " WHERE origin = %s AND applied_snapshot::text = %s AND window_snapshot IS NULL"
        " AND updated_at < now() - make_interval(secs => %s)",
        (snapshot, origin, position.applied_snapshot, IDLE_ADVANCE_SECONDS),
    ).rowcount
    target.commit()
    return moved == 1


def finish_empty_window(
    target: Connection,
    origin: str,
    target_name: str,
    position: Position,
    window: Window,
) -> None:
    with target.transaction():
        if read_position(target, origin, target_name, lock=True) != position:
            raise Superseded
        target.execute(
            "UPDATE pgconcord.position SET applied_snapshot = %s, window_snapshot = NULL,"
            " window_done = NULL, updated_at = now() WHERE origin = %s",
            (window.window_snapshot, origin),
        )


# The position moved past a piece, counting its changes, in one statement with the piece's
# bounds as parameters (the same text every time, so the session prepares it).
_ADVANCE = """
UPDATE pgconcord.position p
   SET applied_snapshot = %(applied)s, window_snapshot = %(window)s, window_done = %(done)s,
       applied_changes = p.applied_changes + piece.changes,
       last_applied_clock = greatest(p.last_applied_clock, piece.clock), updated_at = now()
  FROM (SELECT count(*) AS changes, max(s.clock) AS clock FROM pgconcord_stage s
         WHERE s.transaction_order > %(after)s AND s.transaction_order <= %(last)s) AS piece
 WHERE p.origin = %(origin)s
"""


def advance(
    target: Connection,
    origin: str,
    window: Window,
    after: int,
    last_order: int,
    final: bool,
) -> Position:
    """Move the position past the piece (after, last_order], in the transaction that applied
    it (in a pipeline, without waiting for the answer); the position it writes."""
    moved = (
        Position(window.window_snapshot, None, None)
        if final
        else Position(window.applied_snapshot, window.window_snapshot, last_order)
    )
    target.execute(
        _ADVANCE,
        {
            "applied": moved.applied_snapshot,
            "window": moved.window_snapshot,
            "done": moved.window_done,
            "after": after,
            "last": last_order,
            "origin": origin,
        },
    )
    return moved
