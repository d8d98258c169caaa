"""The agent's loops beside its pairs': now and then the purge of each node's change log, and
on its own node the regeneration of the capture a schema change left generic, the vacuum of
what stamping left behind, and the stream of a node in WAL mode."""

from __future__ import annotations

import logging
import threading
from typing import Protocol

import psycopg

from pgconcord import catalog
from pgconcord.agent.heartbeat import tick
from pgconcord.agent.purging import (
    clear_purge_failure,
    purge_failure_reason,
    purge_node,
    record_purge_failure,
)
from pgconcord.capture import stream
from pgconcord.config import ClusterConfig, NodeConfig
from pgconcord.errors import ConfigError, NodeUnavailable, PgconcordError
from pgconcord.transport import connect

log = logging.getLogger(__name__)

PURGE_SECONDS = 15.0
# How often each node's own agent looks for capture to regenerate, and at captured_change.
CAPTURE_SECONDS = 2.0
# How often the stream loop of a node in trigger mode looks whether setup moved it to the WAL.
STREAM_LOOK_SECONDS = 5.0


class Host(Protocol):
    """What these loops read of the agent that runs them (a reload replaces the config and
    the nodes)."""

    config: ClusterConfig
    nodes: list[str]
    stopping: threading.Event


def purge_loop(agent: Host) -> None:
    """Purge each node's log now and then; membership news and evictions are logged loudly,
    a disagreement between the config and the membership once. A failed purge is logged
    (once until it changes) and kept on the node for `status`: its log only grows."""
    said: set[str] = set()
    failing: dict[str, str] = {}
    cleared: set[str] = set()  # nodes whose recorded failure this process has removed
    while True:
        config = agent.config
        for name in list(agent.nodes):
            tick()  # a round's purges may each wait for a node's connection timeout
            if agent.stopping.is_set():
                return
            try:
                node = config.node_by_name(name)
            except ConfigError:  # a reload is under way; the next round has it
                continue
            try:
                report = purge_node(config, node)
            except NodeUnavailable as error:
                log.debug("purge of %s skipped: %s", name, error)
                continue
            except (PgconcordError, psycopg.Error) as error:
                reason = purge_failure_reason(config, node, error)
                if reason is None:
                    log.debug("purge of %s waits for a setup: %s", name, error)
                    continue
                if failing.get(name) != reason:
                    log.warning("%s: purge failed, its change log keeps growing: %s", name, reason)
                failing[name] = reason
                cleared.discard(name)
                record_purge_failure(node, reason)
                continue
            if failing.pop(name, None) is not None:
                log.info("%s: purge works again", name)
            if name not in cleared:
                clear_purge_failure(node)
                cleared.add(name)
            if report.deleted:
                log.info("%s: purged %d changes every peer has", name, report.deleted)
            for sentence in report.evicted:
                log.error("pgconcord: %s", sentence)
            for sentence in report.learned:
                log.warning("%s: membership: %s", name, sentence)
            for problem in report.problems:
                if problem not in said:
                    said.add(problem)
                    log.warning("pgconcord: %s", problem)
        if agent.stopping.wait(PURGE_SECONDS):
            return


# Dead rows in captured_change (every stamp deletes what it stamped) above which the node's
# own agent vacuums it: autovacuum looks at most once a minute, and until then every stamp
# and poll reads the dead rows of thousands of writes a second.
CAPTURED_DEAD_ROWS = 5_000
# Pages of captured_change above which that vacuum also gives back the empty pages at its
# end. A big transaction leaves the table as large as it was (a million rows: some 30,000
# pages), and every stamp, a few times a second on an idle node, reads every page of it.
# Truncating takes a lock the writers' capture waits for, but VACUUM only takes it when no
# one holds the table and gives it up within about 20 ms when a writer asks for it; below
# this size the pages are kept for the next rows.
CAPTURED_TRUNCATE_PAGES = 1_280  # 10 MB
# Pages of captured_change from which the agent also vacuums it whenever it has grown since the
# last look. Counting dead rows is not enough: every scan of a page prunes most of its dead
# rows (they leave the statistics' count) but leaves their line pointers, and the space comes
# back only with a vacuum. Until then new rows go to new pages, and under pgbench the table
# grew to some 1,000 pages while its dead rows stayed under CAPTURED_DEAD_ROWS: each stamp's
# two scans of them were half of the stamps' CPU (bench/statement_costs.py).
CAPTURED_VACUUM_PAGES = 16


def captured_state(connection: psycopg.Connection[tuple[object, ...]]) -> tuple[int, int]:
    """The dead rows stamping has left in captured_change (statistics, a second or so old),
    and the pages the table has."""
    row = connection.execute(
        "SELECT coalesce((SELECT n_dead_tup FROM pg_stat_user_tables"
        " WHERE relid = to_regclass('pgconcord.captured_change')), 0),"
        " coalesce(pg_relation_size(to_regclass('pgconcord.captured_change')), 0)"
        " / current_setting('block_size')::bigint"
    ).fetchone()
    return (int(str(row[0])), int(str(row[1]))) if row else (0, 0)


def vacuum_captured(
    connection: psycopg.Connection[tuple[object, ...]], *, truncate: bool = False
) -> None:
    """Vacuum captured_change (the connection is idle, not in a transaction)."""
    connection.autocommit = True
    try:
        connection.execute(
            "VACUUM (SKIP_LOCKED, TRUNCATE true) pgconcord.captured_change"
            if truncate
            else "VACUUM (SKIP_LOCKED, TRUNCATE false) pgconcord.captured_change"
        )
    finally:
        connection.autocommit = False


def capture_loop(agent: Host, node: NodeConfig, stop: threading.Event) -> None:
    """Regenerate, on this agent's own node only, the capture of tables a schema change
    left on the generic capture (see catalog.regenerate_capture); never on a peer's."""
    connection: psycopg.Connection[tuple[object, ...]] | None = None
    pages_seen = 0
    while not (stop.wait(CAPTURE_SECONDS) or agent.stopping.is_set()):
        tick()
        try:
            if connection is None or connection.closed:
                connection = connect(node)
            # Read in the transaction regenerate_capture's first look commits: no extra one.
            dead, pages = captured_state(connection)
            for name in catalog.regenerate_capture(connection):
                log.info("%s: capture of %s regenerated after a schema change", node.name, name)
            large = pages >= CAPTURED_TRUNCATE_PAGES
            grown = pages >= CAPTURED_VACUUM_PAGES and pages > pages_seen
            pages_seen = pages
            if dead >= CAPTURED_DEAD_ROWS or grown or (large and dead > 0):
                vacuum_captured(connection, truncate=large)
                if large:
                    pages_seen = 0  # smaller now: the next look compares with what it finds
        except (NodeUnavailable, psycopg.Error) as error:
            log.debug("%s: capture regeneration skipped: %s", node.name, error)
            if connection is not None:
                connection.close()
            connection = None
    if connection is not None:
        connection.close()


def stream_loop(agent: Host, node: NodeConfig, stop: threading.Event) -> None:
    """On this agent's own node, while it captures from the WAL: stream its slot into
    captured_change (capture.stream). A node in trigger mode is looked at again every
    STREAM_LOOK_SECONDS, in the same session (setup may move it; until the stream starts,
    stamps drain the slot from SQL); a stream that fails starts again."""

    def stopped() -> bool:
        return stop.is_set() or agent.stopping.is_set()

    reported: str | None = None
    writer: psycopg.Connection[tuple[object, ...]] | None = None
    try:
        while not stopped():
            tick()
            streamed = False
            try:
                if writer is None or writer.closed:
                    writer = connect(node)
                streamed = stream.stream(node, writer, stopped, tick)
            except stream.stream_errors() as error:
                text = str(error).strip()
                reason = text.splitlines()[0] if text else repr(error)
                # A drain from SQL holds the slot for a moment: the stream waits for it.
                if reason != reported and "is active for PID" not in reason:
                    log.warning(
                        "%s: streaming the WAL stopped, starting again: %s", node.name, reason
                    )
                    reported = reason
                streamed = True
                if writer is not None:
                    writer.close()
                writer = None
            stop.wait(0.5 if streamed else STREAM_LOOK_SECONDS)
    finally:
        if writer is not None:
            writer.close()
