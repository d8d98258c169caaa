"""Round trips per window, counted against a budget (a count, not a time).

Every round trip to a node costs a scheduling delay on a busy machine, whatever the work: the
agent's lag under load is mostly made of them. libpq's protocol trace of the puller's two
sessions counts ReadyForQuery messages, one per round trip (a pipeline's statements share one).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
from harness import Cluster, wait_for
from psycopg import pq

from pgconcord.agent import Agent
from pgconcord.agent.runner import transaction_ended
from pgconcord.apply import Puller

# The budgets: an idle poll asks the origin once and the target never; a window of ordinary
# changes takes the origin's poll, which stamps what capture appended, and the poll that sees
# what it stamped, the COPY (plus, where the origin's commits are asynchronous, as on these
# test servers, a flush check and a flush) and, on the target, the turn, the COPY, the staged
# window's summary, the pipelined apply and its commit (and the BEGIN psycopg syncs on its own).
IDLE_ORIGIN, IDLE_TARGET = 1, 0
WINDOW_ORIGIN, WINDOW_TARGET = 6, 6


@contextmanager
def counted(
    connections: dict[str, psycopg.Connection[tuple[object, ...]]], directory: Path
) -> Iterator[dict[str, int]]:
    counts: dict[str, int] = {}
    files = {}
    for role, connection in connections.items():
        files[role] = (directory / f"{role}.trace").open("w")
        connection.pgconn.trace(files[role].fileno())
        connection.pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS)
    try:
        yield counts
    finally:
        for role, connection in connections.items():
            connection.pgconn.untrace()
            files[role].close()
            text = (directory / f"{role}.trace").read_text()
            counts[role] = sum(
                1 for line in text.splitlines() if line.startswith("B") and "ReadyForQuery" in line
            )


def round_trips(puller: Puller, directory: Path, action: Callable[[], object]) -> dict[str, int]:
    # The puller's own sessions, open since its first pull.
    origin_session, target_session = puller._source.session, puller._target_connection
    assert origin_session is not None and target_session is not None
    sessions = {"origin": origin_session, "target": target_session}
    with counted(sessions, directory) as counts:
        action()
    return counts


def test_an_idle_poll_and_a_window_stay_within_their_round_trips(
    system_cluster: Cluster, tmp_path: Path
) -> None:
    cluster = system_cluster
    for name in cluster.names:
        cluster.execute(name, "CREATE TABLE items (id bigint PRIMARY KEY, stock integer)")
    cluster.setup()
    origin, target = cluster.names[0], cluster.names[1]
    config = cluster.config
    # As the agent's pairs pull (a settled pull, sync's, stamps first: one round trip more).
    puller = Puller(config.node_by_name(origin), config.node_by_name(target), settled=False)
    try:
        # The first window reads the position and makes the plans.
        cluster.execute(origin, "INSERT INTO items VALUES (-1, 0)")
        puller.pull()
        for _ in range(3):
            idle = round_trips(puller, tmp_path, puller.pull)
            assert idle == {"origin": IDLE_ORIGIN, "target": IDLE_TARGET}
        for attempt in range(3):
            for number in range(10):
                cluster.execute(
                    origin,
                    "INSERT INTO items VALUES (%s, 1)"
                    " ON CONFLICT (id) DO UPDATE SET stock = items.stock + 1",
                    (number,),
                )
            window = round_trips(puller, tmp_path, lambda: puller.pull(until_current=True))
            assert window["origin"] <= WINDOW_ORIGIN, (attempt, window)
            assert window["target"] <= WINDOW_TARGET, (attempt, window)
        assert cluster.table_rows(target, "items") == cluster.table_rows(origin, "items")
        assert cluster.table_rows(target, "items") == [(-1, 0)] + [
            (number, 3) for number in range(10)
        ]
    finally:
        puller.close()


def test_a_write_pays_for_one_row_trigger_and_no_notification(system_cluster: Cluster) -> None:
    """Capture adds nothing per statement (016_watch_not_notify.sql); the agent still wakes at
    once for a single write."""
    cluster = system_cluster
    for name in cluster.names:
        cluster.execute(name, "CREATE TABLE items (id bigint PRIMARY KEY, stock integer)")
    cluster.setup()
    triggers = cluster.admin_query(
        cluster.names[0],
        "SELECT tgname, (tgtype & 1) = 1 FROM pg_trigger"
        " WHERE tgrelid = 'items'::regclass AND NOT tgisinternal ORDER BY tgname",
    )
    # pgconcord_truncate is a statement trigger on TRUNCATE only, which is refused anyway.
    assert triggers == [("pgconcord_capture", True), ("pgconcord_truncate", False)]
    running = Agent(cluster.config).start()
    try:
        cluster.execute(cluster.names[0], "INSERT INTO items VALUES (1, 5)")
        wait_for(
            lambda: cluster.table_rows(cluster.names[1], "items") == [(1, 5)],
            timeout=10,
            message="a single write reaches the peer",
        )
    finally:
        running.stop()


def test_the_watch_wakes_for_ended_transactions_only() -> None:
    """A snapshot pair says whether a transaction that could have made changes visible ended."""
    assert not transaction_ended((10, 12, {10, 11}), (10, 12, {10, 11}))  # still running
    assert transaction_ended((10, 12, {10, 11}), (11, 12, {11}))  # 10 ended
    assert not transaction_ended((10, 12, {10, 11}), (10, 14, {10, 11, 12, 13}))  # 2 began
    assert transaction_ended((10, 12, {10, 11}), (10, 14, {10, 11, 13}))  # 12 began and ended
    assert transaction_ended((12, 12, set()), (20, 20, set()))  # eight began and ended
