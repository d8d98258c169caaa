"""Stamping inside an applying transaction on a node in WAL mode, without waiting on itself.

The stamp drains the node's slot first (drain_wal.sql) up to the WAL flushed now. An applying
transaction has usually written WAL before it stamps (the position's row lock, the rows it
locks, an earlier stamp), and nothing flushes that WAL while it runs: if its last record
straddles a WAL page, the WAL writer flushes the full page and stops inside the record, and
decoding up to there waits for the rest of it. Only a commit elsewhere would flush it (on an
idle node the background writer's running-transactions record, every 15 s). So a statement
that may drain and has not returned after STUCK_SECONDS gets the node's WAL flushed from a
short session of its own: an aside, taken only when it is needed."""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg

from pgconcord.catalog import STAMP_LOCK
from pgconcord.config import NodeConfig
from pgconcord.errors import NodeUnavailable
from pgconcord.transport import connect
from pgconcord.transport.postgres import flush_wal

log = logging.getLogger(__name__)

Connection = psycopg.Connection[tuple[object, ...]]

# The stamp of this node's own changes in an applying transaction (see apply.setwise).
STAMP_LOCAL_CHANGES = f"SELECT pg_advisory_xact_lock({STAMP_LOCK}), pgconcord.stamp_captured(true)"
# Only the lock, where the rows are locked and stamped after it (lock_rows).
TAKE_STAMP_LOCK = f"SELECT pg_advisory_xact_lock({STAMP_LOCK})"
# Past drain_wal's own wait for a flush at the end of a record (20 ms, flushed_boundary), and
# short next to the seconds a stuck drain would wait.
STUCK_SECONDS = 0.05

# The node of each applying session into a node in WAL mode, for the aside; sessions into a
# node in trigger mode never drain, and are not watched.
_nodes: weakref.WeakKeyDictionary[Connection, NodeConfig] = weakref.WeakKeyDictionary()


def drains_on(target: Connection, node: NodeConfig | None) -> None:
    """Note that the applying session target is on node, a node in WAL mode; None: a node in
    trigger mode (stage.open_target, then each turn of a Puller, as setup may move the node
    between the modes)."""
    if node is None:
        _nodes.pop(target, None)
    else:
        _nodes[target] = node


def stamp_local_changes(target: Connection) -> None:
    """Take the stamp lock and stamp what this node captured (STAMP_LOCAL_CHANGES)."""
    with flushing_when_stuck(target):
        target.execute(STAMP_LOCAL_CHANGES)


@contextmanager
def flushing_when_stuck(target: Connection) -> Iterator[None]:
    """Around a blocking call on target that may drain the slot: if it is still running after
    STUCK_SECONDS, the node's WAL is flushed from another session (harmless when the call was
    slow for another reason: one look, and a flush only if the WAL is not flushed)."""
    node = _nodes.get(target)
    if node is None:
        yield
        return
    timer = threading.Timer(STUCK_SECONDS, _flush_aside, (node,))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def _flush_aside(node: NodeConfig) -> None:
    try:
        with connect(node, autocommit=True) as aside:
            flush_wal(aside)
    except (psycopg.Error, NodeUnavailable) as error:
        # The applying session meets the same trouble itself, and says so.
        log.debug("node %s: could not flush its WAL aside: %s", node.name, error)
