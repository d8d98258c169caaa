"""Replication lag under load: how long a small row committed at A takes to be visible at B
while pgbench (tpcb-like) keeps A busy.

Servers A and B (fsync on) each hold identical pgbench databases (scale --scale, with
pgbench_history.hid as primary key) plus a table markers(id bigint primary key, written_at
timestamptz):

  pgconcord  capture on A and B, the agent (a child process) replicating;
  logical    a publication FOR ALL TABLES on A, subscribed to from B (the reference).

At B, markers carries an extra row trigger, ENABLE ALWAYS so that it fires for replicated rows
too (pgconcord applies with session_replication_role = replica, as the logical replication
apply worker does), which NOTIFYs the marker id: notifications are delivered only once the
applying transaction has committed, so the moment a LISTENing session at B receives one is the
moment the row is visible at B, without any polling.

While pgbench runs on A (--clients clients), a writer commits one marker row at A every
--interval ms; lag = time B's listener received the marker - time A's commit returned.
Rounds alternate between the systems; per round p50/p95/max, and all rounds pooled.

    python bench/lag.py [--quick] [--rounds N] [--seconds S]
"""

from __future__ import annotations

import argparse
import itertools
import sys
import threading
import time
from dataclasses import dataclass, field

import common
from common import AgentProcess, Server, progress

CONCORD, LOGICAL = "pgconcord", "logical"

MARKERS_DDL = "CREATE TABLE markers (id bigint PRIMARY KEY, written_at timestamptz NOT NULL)"
SEEN_TRIGGER = [
    """
    CREATE FUNCTION bench_marker_seen() RETURNS trigger LANGUAGE plpgsql AS $body$
    BEGIN
        PERFORM pg_notify('bench_marker', NEW.id::text);
        RETURN NULL;
    END
    $body$
    """,
    "CREATE TRIGGER bench_marker_seen AFTER INSERT OR UPDATE ON markers"
    " FOR EACH ROW EXECUTE FUNCTION bench_marker_seen()",
    "ALTER TABLE markers ENABLE ALWAYS TRIGGER bench_marker_seen",
]


@dataclass
class RoundResult:
    system: str
    lags_ms: list[float] = field(default_factory=list)
    written: int = 0
    unseen: int = 0
    tps: float = float("nan")
    catch_up: float = float("nan")


class Listener(threading.Thread):
    """LISTENs at B and records when each marker id's notification arrives."""

    def __init__(self, dsn: str) -> None:
        super().__init__(daemon=True, name="listener")
        self.connection = common.connect(dsn)
        self.connection.execute("LISTEN bench_marker")
        self.seen: dict[int, float] = {}
        self.stopping = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stopping.is_set():
                for notification in self.connection.notifies(timeout=0.2):
                    self.seen.setdefault(int(notification.payload), time.perf_counter())
        except BaseException as error:  # reported by the main thread
            self.error = error

    def stop(self) -> None:
        self.stopping.set()
        self.join(5)
        self.connection.close()


def history_count(dsn: str) -> int:
    return int(common.scalar(dsn, "SELECT count(*) FROM pgbench_history"))


def run_round(
    a: Server,
    b: Server,
    system: str,
    *,
    seconds: float,
    interval: float,
    clients: int,
    ids: itertools.count[int],
    agent: AgentProcess | None,
) -> RoundResult:
    result = RoundResult(system)
    dsn_a, dsn_b = a.dsn(system), b.dsn(system)
    common.execute(dsn_a, "VACUUM pgbench_branches, pgbench_tellers")
    common.checkpoint(a, b)
    listener = Listener(dsn_b)
    listener.start()
    committed: dict[int, float] = {}
    # pgbench runs a little longer than the markers, so every marker sees full load.
    pgbench = common.pgbench_popen(a, system, clients=clients, seconds=seconds + 2)
    try:
        common.wait_pgbench_connected(a, system, clients)
        with common.connect(dsn_a) as writer:
            started = time.perf_counter()
            for tick in itertools.count(1):
                due = started + tick * interval
                if due - started > seconds:
                    break
                pause = due - time.perf_counter()
                if pause > 0:
                    time.sleep(pause)
                marker = next(ids)
                writer.execute(
                    "INSERT INTO markers (id, written_at) VALUES (%s, clock_timestamp())",
                    (marker,),
                )
                committed[marker] = time.perf_counter()
        result.tps = common.pgbench_finish(pgbench).tps
        expected = history_count(dsn_a)

        def everything_there() -> bool:
            if agent is not None:
                agent.check()
            if listener.error is not None:
                raise listener.error
            return all(m in listener.seen for m in committed) and history_count(dsn_b) >= expected

        ended = time.perf_counter()
        try:
            common.wait_until(everything_there, 300, f"{system}: markers at B", 0.02)
            result.catch_up = time.perf_counter() - ended
        except common.DeadlineExceeded:
            progress(f"  {system}: not everything reached B within 300 s")
    finally:
        if pgbench.poll() is None:
            pgbench.kill()
            pgbench.wait()
        listener.stop()
    result.written = len(committed)
    result.unseen = sum(1 for m in committed if m not in listener.seen)
    result.lags_ms = [
        1000 * (listener.seen[m] - committed[m]) for m in committed if m in listener.seen
    ]
    return result


def prepare(a: Server, b: Server, systems: list[str], scale: int) -> AgentProcess | None:
    for server in (a, b):
        dsn = common.pgbench_database(server, "template_bench", scale)
        common.execute(dsn, MARKERS_DDL)
        for system in systems:
            server.create_database(system, template="template_bench")
    for system in systems:
        common.execute(b.dsn(system), *SEEN_TRIGGER)
    agent = None
    if CONCORD in systems:
        progress("installing pgconcord capture, starting the agent")
        config = common.concord_config_text([("a", a.dsn(CONCORD)), ("b", b.dsn(CONCORD))])
        common.concord_setup(config)
        agent = AgentProcess(config, label="lag").start(ready_dsns=[a.dsn(CONCORD), b.dsn(CONCORD)])
    if LOGICAL in systems:
        progress("publication on A, subscription on B")
        common.create_logical_replication(a, LOGICAL, b, LOGICAL, name="bench")
    return agent


def main() -> int:
    parser = common.base_arguments(__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, help="rounds per system (default 3; quick 1)")
    parser.add_argument("--seconds", type=float, help="markers per round, s (default 20; quick 5)")
    parser.add_argument("--interval", type=float, default=50, help="ms between markers")
    parser.add_argument("--scale", type=int, default=10)
    parser.add_argument("--clients", type=int, default=4)
    arguments = parser.parse_args()
    rounds = arguments.rounds or (1 if arguments.quick else 3)
    seconds = arguments.seconds or (5 if arguments.quick else 20)
    systems = [CONCORD] if arguments.no_logical else [CONCORD, LOGICAL]

    load_at_start = common.load_note()
    source_at_start = common.source_note()
    progress("starting servers A and B (fsync on)")
    a, b = common.start_servers(["lag-a", "lag-b"], fsync=True)
    offsets = {server.name: common.log_size(server) for server in (a, b)}
    agent: AgentProcess | None = None
    results: list[RoundResult] = []
    try:
        progress(f"pgbench -i -s {arguments.scale} on A and B, markers table")
        agent = prepare(a, b, systems, arguments.scale)
        ids = itertools.count(1)
        for round_number in range(rounds):
            shift = round_number % len(systems)
            for system in systems[shift:] + systems[:shift]:
                result = run_round(
                    a,
                    b,
                    system,
                    seconds=seconds,
                    interval=arguments.interval / 1000,
                    clients=arguments.clients,
                    ids=ids,
                    agent=agent if system == CONCORD else None,
                )
                results.append(result)
                progress(
                    f"round {round_number + 1}: {system:9s} {result.written} markers,"
                    f" p50 {common.percentile(result.lags_ms, 0.5):.1f} ms,"
                    f" p95 {common.percentile(result.lags_ms, 0.95):.1f} ms,"
                    f" max {max(result.lags_ms, default=float('nan')):.1f} ms,"
                    f" pgbench {result.tps:.0f} TPS, caught up {result.catch_up:.2f} s after"
                )
        if agent is not None:
            agent.stop()
        report(results, systems, rounds, seconds, arguments)
        if agent is not None:
            common.report_agent(agent)
        common.report_server_logs([a, b], offsets)
        print(f"\nat the end: {common.load_note()} (at the start: {load_at_start})")
        print(f"measured {source_at_start}")
    except common.AgentStalled as error:
        print(f"\nFAILED: the pgconcord agent cannot replicate this workload:\n  {error}")
        return 1
    finally:
        if agent is not None:
            agent.stop()
        for server in (a, b):
            server.cleanup()
    return 0


def report(
    results: list[RoundResult],
    systems: list[str],
    rounds: int,
    seconds: float,
    arguments: argparse.Namespace,
) -> None:
    pct = common.percentile
    print(
        f"\n=== lag under load: pgbench tpcb-like, scale {arguments.scale},"
        f" {arguments.clients} clients on A; a marker every"
        f" {arguments.interval:.0f} ms for {seconds:.0f} s; {rounds} round(s) ==="
    )
    rows = []
    pooled: dict[str, list[float]] = {system: [] for system in systems}
    for index, result in enumerate(results):
        pooled[result.system] += result.lags_ms
        lags = result.lags_ms
        rows.append(
            [
                f"{result.system} r{index // len(systems) + 1}",
                result.written,
                result.unseen,
                pct(lags, 0.5),
                pct(lags, 0.95),
                pct(lags, 0.99),
                max(lags, default=float("nan")),
                result.tps,
                result.catch_up,
            ]
        )
    for system in systems:
        lags = pooled[system]
        mine = [r for r in results if r.system == system]
        rows.append(
            [
                f"{system} all",
                sum(r.written for r in mine),
                sum(r.unseen for r in mine),
                pct(lags, 0.5),
                pct(lags, 0.95),
                pct(lags, 0.99),
                max(lags, default=float("nan")),
                common.median(r.tps for r in mine),
                common.median(r.catch_up for r in mine),
            ]
        )
    common.print_table(
        "marker lag, A commit returned -> visible at B (ms); TPS and catch-up: median for 'all'",
        ["run", "markers", "unseen", "p50", "p95", "p99", "max", "pgbench TPS", "catch-up s"],
        rows,
    )
    if CONCORD in systems and LOGICAL in systems and pooled[LOGICAL]:
        c, lg = pooled[CONCORD], pooled[LOGICAL]
        print(
            f"\nratios pgconcord / logical (pooled): p50 {pct(c, 0.5) / pct(lg, 0.5):.1f}x,"
            f" p95 {pct(c, 0.95) / pct(lg, 0.95):.1f}x, max {max(c) / max(lg):.1f}x"
        )
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
