"""The speed goals of issue 9, measured in one run, each as a ratio against a reference run in
the same script, with where the CPU went per replicated row and the agent's peak memory.

Measures (--only takes a comma-separated subset; all by default):

  pgbench      pgbench TPS on A (pgconcord replicating A -> B) / TPS of a bare third server C
               (identically configured, taking no part); reference: the same ratio for
               PostgreSQL logical replication between its own pair D -> E. Goal >= 0.75.
  bulk-insert  --rows rows in one transaction, start until all are on the peer, pgconcord /
               logical replication. Goal <= 2.0. Also the agent's peak memory: goal < 300 MB.
  bulk-update  an UPDATE of those rows in one transaction, the same ratio. Goal <= 2.0.
  batches      the rows as transactions of --batch rows: seconds from the origin's last commit
               until the peer has everything. Goal < 1 s (native about 0.1 s).
  lag          p95 of the lag of marker rows under pgbench (lag.py's method). Goal < 50 ms.
  idle         5 nodes set up with pgconcord, the agent running, nothing written: transactions
               per second over all nodes (pg_stat_database) and the agent's CPU. Goals <= 40 tps,
               <= 5 % of a core.

All servers are sandbox servers with fsync on; the agent runs as common.AgentProcess.

    python bench/goals.py [--quick] [--only pgbench,bulk-insert,bulk-update,batches,lag,idle]
"""

from __future__ import annotations

import argparse
import itertools
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import apply_speed
import common
import lag
from common import AgentProcess, CpuSampler, CpuSnapshot, Server, progress

MEASURES = ("pgbench", "bulk-insert", "bulk-update", "batches", "lag", "idle")
BARE, CONCORD, LOGICAL = "bare", "pgconcord", "logical"
MB = common.MB
# The figures issue 9 gives for today's code (its "today" column), shown as the idle reference.
IDLE_TODAY_TPS, IDLE_TODAY_CPU = 106.0, 2.9
# Rows one pgbench tpcb-like transaction writes: 3 UPDATEs and 1 INSERT.
ROWS_PER_TPCB = 4


# -- goals -----------------------------------------------------------------------------------


@dataclass
class Goal:
    """One line of the goal table. The goal applies to the value or to value / reference."""

    key: str  # the measure (MEASURES) it belongs to
    measure: str
    value: float
    unit: str
    reference: float | None
    reference_text: str
    on: str  # "value" or "ratio"
    compare: str  # ">=", "<=" or "<"
    threshold: float
    failure: str = ""  # the measurement could not be made (and why)

    @property
    def ratio(self) -> float:
        if self.reference is None or not self.reference or self.value != self.value:
            return float("nan")
        return self.value / self.reference

    @property
    def goal_text(self) -> str:
        unit = "" if self.on == "ratio" or self.unit in ("", "x") else f" {self.unit}"
        return f"{self.on} {self.compare} {self.threshold:g}{unit}"

    @property
    def passed(self) -> bool | None:
        if self.failure:
            return None
        measured = self.ratio if self.on == "ratio" else self.value
        if measured != measured:
            return None
        if self.compare == ">=":
            return measured >= self.threshold
        if self.compare == "<=":
            return measured <= self.threshold
        return measured < self.threshold

    def row(self) -> list[object]:
        verdict = {True: "pass", False: "FAIL", None: "-"}[self.passed]
        if self.failure:
            verdict = f"not measured: {self.failure[:60]}"
        ratio = self.ratio
        return [
            self.measure,
            _with_unit(self.value, self.unit),
            self.reference_text
            or ("-" if self.reference is None else _with_unit(self.reference, self.unit)),
            "-" if ratio != ratio else f"{ratio:.2f}",
            self.goal_text,
            verdict,
        ]

    def print_line(self) -> None:
        measure, value, reference, ratio, goal, verdict = (str(cell) for cell in self.row())
        print(
            f"  {measure}: {value} | reference {reference} | ratio {ratio}"
            f" | goal {goal} | {verdict}"
        )
        sys.stdout.flush()


def _with_unit(value: float, unit: str) -> str:
    if value != value:
        return "-"
    if unit == "ms":
        return f"{value:.1f} ms"
    if unit == "s":
        return f"{value:.2f} s"
    if unit == "MB":
        return f"{value:.0f} MB"
    if unit == "tps":
        return f"{value:.1f} tps"
    if unit == "%":
        return f"{value:.1f} %"
    return f"{value:.2f}"


@dataclass
class Run:
    arguments: argparse.Namespace
    sampler_interval: float
    goals: list[Goal] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    durations: dict[str, float] = field(default_factory=dict)

    def add(self, goal: Goal) -> None:
        self.goals.append(goal)
        goal.print_line()


def median_ratio(values: Sequence[float], references: Sequence[float]) -> float:
    return common.median(x / y for x, y in zip(values, references, strict=True) if y)


def in_parallel(calls: Sequence[Callable[[], object]]) -> None:
    errors: list[BaseException] = []

    def run(call: Callable[[], object]) -> None:
        try:
            call()
        except BaseException as error:  # re-raised below
            errors.append(error)

    threads = [threading.Thread(target=run, args=(call,)) for call in calls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def sleep_watching(agent: AgentProcess, seconds: float) -> None:
    """Sleep, raising AgentStalled if the agent process dies. Not agent.check(): its look for
    parked changes opens a session on every node twice a second, which the idle measure would
    count as the agent's transactions (it is called once the window is over)."""
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        if not agent.alive():
            agent.check()
        time.sleep(min(0.25, max(0.0, deadline - time.perf_counter())))


def agent_lines(agent: AgentProcess, label: str) -> None:
    """The agent's warnings (common.report_agent) when it had any, else one line."""
    warnings = agent.warnings()
    if warnings:
        common.report_agent(agent, limit=5)
    else:
        print(f"  agent ({label}): no warnings, CPU {agent.cpu_seconds:.1f} s in all")


# -- pgbench and lag: servers A, B (pgconcord), C (bare), D, E (logical replication) ------------


@dataclass
class PgbenchRound:
    system: str
    tps: float
    rows: int
    catch_up: float
    cpu: CpuSnapshot


def pgbench_and_lag(run: Run, selected: list[str]) -> None:
    arguments = run.arguments
    quick = arguments.quick
    rounds = arguments.rounds or (1 if quick else 3)
    seconds = arguments.seconds or (5 if quick else 20)
    lag_seconds = arguments.lag_seconds or (5 if quick else 20)
    names = {CONCORD: ("a", "b"), BARE: ("c", None), LOGICAL: ("d", "e")}
    labels = ["a", "b", "d", "e"] + (["c"] if "pgbench" in selected else [])
    progress(f"pgbench/lag: starting servers {', '.join(sorted(labels))} (fsync on)")
    started = common.start_servers([f"goals-{label}" for label in labels], fsync=True)
    servers = dict(zip(labels, started, strict=True))
    offsets = {server.name: common.log_size(server) for server in started}
    agent: AgentProcess | None = None
    try:
        database = {"a": CONCORD, "b": CONCORD, "c": BARE, "d": LOGICAL, "e": LOGICAL}
        progress(f"pgbench -i -s {arguments.scale} on every server, + pgbench_history.hid, markers")

        def prepare(label: str) -> None:
            server = servers[label]
            dsn = common.pgbench_database(server, database[label], arguments.scale)
            common.execute(dsn, lag.MARKERS_DDL)
            if label in ("b", "e"):  # the lag measure's listener (lag.py's trigger)
                common.execute(dsn, *lag.SEEN_TRIGGER)

        in_parallel([lambda label=label: prepare(label) for label in labels])
        a, b, d, e = servers["a"], servers["b"], servers["d"], servers["e"]
        progress("pgconcord on A/pgconcord and B/pgconcord; logical replication D -> E")
        config = common.concord_config_text(
            [("a", a.dsn(CONCORD)), ("b", b.dsn(CONCORD))], capture=arguments.capture
        )
        common.concord_setup(config)
        common.create_logical_replication(d, LOGICAL, e, LOGICAL, name="bench")
        agent = AgentProcess(config, label="goals-pgbench").start(
            ready_dsns=[a.dsn(CONCORD), b.dsn(CONCORD)]
        )
        with CpuSampler(run.sampler_interval) as sampler:
            for label, server in servers.items():
                sampler.add_server(label, server)
            sampler.add_agent(agent)
            if "pgbench" in selected:
                pgbench_measure(run, servers, names, sampler, agent, rounds, seconds)
            if "lag" in selected:
                lag_measure(run, servers, sampler, agent, rounds, lag_seconds)
        agent.stop()
        agent_lines(agent, "pgbench/lag")
        common.report_server_logs(started, offsets)
    finally:
        if agent is not None:
            agent.stop()
        for server in started:
            server.cleanup()


def pgbench_measure(
    run: Run,
    servers: dict[str, Server],
    names: dict[str, tuple[str, str | None]],
    sampler: CpuSampler,
    agent: AgentProcess,
    rounds: int,
    seconds: float,
) -> None:
    arguments = run.arguments
    systems = [BARE, CONCORD, LOGICAL]
    results: list[PgbenchRound] = []
    sampler.reset_agent_peak()
    for round_number in range(rounds):
        shift = round_number % len(systems)
        for system in systems[shift:] + systems[:shift]:
            origin_label, target_label = names[system]
            origin = servers[origin_label]
            dsn = origin.dsn(system)
            common.execute(dsn, "VACUUM pgbench_branches, pgbench_tellers")
            common.checkpoint(*servers.values())
            before = sampler.snapshot()
            result = common.pgbench_run(origin, system, clients=arguments.clients, seconds=seconds)
            catch_up = float("nan")
            if target_label is not None:
                expected = lag.history_count(dsn)
                peer = servers[target_label].dsn(system)

                def caught_up(peer: str = peer, expected: int = expected) -> bool:
                    agent.check()
                    return lag.history_count(peer) >= expected

                catch_up = common.wait_until(caught_up, 600, f"{system} peer catch-up", 0.05)
            cpu = sampler.snapshot() - before
            results.append(
                PgbenchRound(system, result.tps, ROWS_PER_TPCB * result.transactions, catch_up, cpu)
            )
            progress(
                f"pgbench round {round_number + 1}: {system:9s} {result.tps:8.1f} TPS"
                + (f", peer caught up {catch_up:.2f} s after" if target_label else "")
            )
    tps = {s: [r.tps for r in results if r.system == s] for s in systems}
    concord_ratio = median_ratio(tps[CONCORD], tps[BARE])
    logical_ratio = median_ratio(tps[LOGICAL], tps[BARE])
    peak = sampler.agent_peak_rss() / MB
    print(
        f"\n== pgbench: tpcb-like, scale {arguments.scale}, {arguments.clients} clients,"
        f" {rounds} round(s) x {seconds:.0f} s; TPS of A (pgconcord -> B), C (bare),"
        f" D (logical -> E) =="
    )
    for system in systems:
        print(
            f"  {system:9s} TPS per round: {', '.join(f'{t:,.0f}' for t in tps[system])};"
            f" median {common.median(tps[system]):,.0f}"
            + (
                f"; peer caught up (median) "
                f"{common.median(r.catch_up for r in results if r.system == system):.2f} s"
                f" after pgbench ended"
                if system != BARE
                else ""
            )
        )
    run.add(
        Goal(
            "pgbench",
            "pgbench TPS, pgconcord / bare third server",
            concord_ratio,
            "x",
            logical_ratio,
            f"{logical_ratio:.2f} (logical replication / bare)",
            "value",
            ">=",
            0.75,
        )
    )
    for system in systems:
        mine = [r for r in results if r.system == system]
        delta = _sum_snapshots([r.cpu for r in mine])
        rows = sum(r.rows for r in mine)
        origin_label, target_label = names[system]
        what = {
            CONCORD: "pgconcord (A -> B)",
            LOGICAL: "logical replication (D -> E; walsender and apply worker are 'other')",
            BARE: "bare (C; rows written, nothing replicated)",
        }[system]
        print(f"  {what}, pgbench start until the peer had caught up:")
        common.report_cpu_per_rows(
            delta,
            rows,
            origin=origin_label,
            target=target_label,
            agent=common.AGENT if system == CONCORD else None,
            prefix="    ",
        )
    print(f"  agent peak memory (VmHWM) during the pgbench rounds: {peak:.0f} MB")
    sys.stdout.flush()


def _sum_snapshots(deltas: Sequence[CpuSnapshot]) -> CpuSnapshot:
    total = CpuSnapshot({}, 0.0)
    for delta in deltas:
        keys = set(total.seconds) | set(delta.seconds)
        total = CpuSnapshot(
            {k: total.seconds.get(k, 0.0) + delta.seconds.get(k, 0.0) for k in keys},
            total.at + delta.at,
        )
    return total


def lag_measure(
    run: Run,
    servers: dict[str, Server],
    sampler: CpuSampler,
    agent: AgentProcess,
    rounds: int,
    seconds: float,
) -> None:
    arguments = run.arguments
    pairs = {CONCORD: ("a", "b"), LOGICAL: ("d", "e")}
    systems = [CONCORD, LOGICAL]
    ids = itertools.count(1)
    results: list[tuple[lag.RoundResult, CpuSnapshot, int]] = []
    sampler.reset_agent_peak()
    for round_number in range(rounds):
        shift = round_number % len(systems)
        for system in systems[shift:] + systems[:shift]:
            origin, target = (servers[label] for label in pairs[system])
            history_before = lag.history_count(origin.dsn(system))
            before = sampler.snapshot()
            result = lag.run_round(
                origin,
                target,
                system,
                seconds=seconds,
                interval=arguments.interval / 1000,
                clients=arguments.clients,
                ids=ids,
                agent=agent if system == CONCORD else None,
            )
            cpu = sampler.snapshot() - before
            rows = (
                ROWS_PER_TPCB * (lag.history_count(origin.dsn(system)) - history_before)
                + result.written
            )
            results.append((result, cpu, rows))
            pct = common.percentile
            progress(
                f"lag round {round_number + 1}: {system:9s} {result.written} markers,"
                f" p50 {pct(result.lags_ms, 0.5):.1f} ms, p95 {pct(result.lags_ms, 0.95):.1f} ms,"
                f" pgbench {result.tps:.0f} TPS"
            )
    pooled = {s: [x for r, _, _ in results if r.system == s for x in r.lags_ms] for s in systems}
    pct = common.percentile
    print(
        f"\n== lag: a marker row every {arguments.interval:.0f} ms under pgbench"
        f" ({arguments.clients} clients), {rounds} round(s) x {seconds:.0f} s,"
        f" A -> B (pgconcord) and D -> E (logical) =="
    )
    for system in systems:
        mine = [r for r, _, _ in results if r.system == system]
        lags = pooled[system]
        print(
            f"  {system:9s} markers {sum(r.written for r in mine)}"
            f" (unseen {sum(r.unseen for r in mine)}): p50 {pct(lags, 0.5):.1f},"
            f" p95 {pct(lags, 0.95):.1f}, p99 {pct(lags, 0.99):.1f},"
            f" max {max(lags, default=float('nan')):.1f} ms;"
            f" pgbench {common.median(r.tps for r in mine):,.0f} TPS;"
            f" catch-up {common.median(r.catch_up for r in mine):.2f} s"
        )
    native = pct(pooled[LOGICAL], 0.95)
    run.add(
        Goal(
            "lag",
            "lag p95 of marker rows under pgbench",
            pct(pooled[CONCORD], 0.95),
            "ms",
            native,
            f"{native:.1f} ms (logical replication)",
            "value",
            "<",
            50,
        )
    )
    for system in systems:
        spent = [(cpu, rows) for r, cpu, rows in results if r.system == system]
        origin_label, target_label = pairs[system]
        print(f"  {system}, pgbench + markers until everything had arrived:")
        common.report_cpu_per_rows(
            _sum_snapshots([cpu for cpu, _ in spent]),
            sum(rows for _, rows in spent),
            origin=origin_label,
            target=target_label,
            agent=common.AGENT if system == CONCORD else None,
            prefix="    ",
        )
    print(
        f"  agent peak memory (VmHWM) during the lag rounds: {sampler.agent_peak_rss() / MB:.0f} MB"
    )
    sys.stdout.flush()


# -- bulk-insert, bulk-update, batches: apply_speed.py's measures on two servers ---------------


@dataclass
class BulkResult:
    measure: apply_speed.Measure
    cpu: CpuSnapshot
    peak: float  # MB, the agent's (nan without one)


def bulk(run: Run, selected: list[str]) -> None:
    arguments = run.arguments
    rows = arguments.rows or (100_000 if arguments.quick else 1_000_000)
    repeat = arguments.repeat or 1
    timeout = arguments.timeout
    progress(f"bulk: starting servers A and B (fsync on); {rows:,} rows, {repeat} repetition(s)")
    a, b = common.start_servers(["goals-bulk-a", "goals-bulk-b"], fsync=True)
    offsets = {server.name: common.log_size(server) for server in (a, b)}
    results: dict[tuple[str, str], list[BulkResult]] = {}
    systems = [CONCORD, LOGICAL]
    try:
        with CpuSampler(run.sampler_interval) as sampler:
            sampler.add_server("a", a).add_server("b", b)

            def measured(
                system: str,
                variant: str,
                pair: apply_speed.Pair,
                measure: Callable[[], apply_speed.Measure],
            ) -> None:
                if pair.agent is not None:
                    sampler.reset_agent_peak()
                before = sampler.snapshot()
                result = measure()
                cpu = sampler.snapshot() - before
                peak = sampler.agent_peak_rss() / MB if pair.agent is not None else float("nan")
                results.setdefault((system, variant), []).append(BulkResult(result, cpu, peak))
                progress(
                    f"  {system} {variant}: write {result.write:.2f} s,"
                    f" commit -> peer {result.to_peer:.2f} s"
                    + (f", agent peak {peak:.0f} MB" if peak == peak else "")
                )

            for repetition in range(repeat):
                order = systems[repetition % 2 :] + systems[: repetition % 2]
                for system in order:
                    if "bulk-insert" in selected or "bulk-update" in selected:
                        with apply_speed.Pair(
                            a, b, system, f"one_{repetition}", "t", arguments.capture
                        ) as pair:
                            if pair.agent is not None:
                                sampler.add_agent(pair.agent)
                            progress(f"rep {repetition + 1}: {system}: {rows:,} rows in 1 txn")
                            measured(
                                system,
                                "bulk-insert",
                                pair,
                                lambda pair=pair: apply_speed.measure_one_transaction(
                                    pair, rows, timeout
                                ),
                            )
                            if "bulk-update" in selected:
                                progress(f"rep {repetition + 1}: {system}: UPDATE of {rows:,}")
                                measured(
                                    system,
                                    "bulk-update",
                                    pair,
                                    lambda pair=pair: apply_speed.measure_update(
                                        pair, rows, timeout
                                    ),
                                )
                            if pair.agent is not None:
                                pair.agent.stop()
                                agent_lines(pair.agent, f"{system} one_{repetition}")
                    if "batches" in selected:
                        with apply_speed.Pair(
                            a, b, system, f"batches_{repetition}", "t", arguments.capture
                        ) as pair:
                            if pair.agent is not None:
                                sampler.add_agent(pair.agent)
                            progress(
                                f"rep {repetition + 1}: {system}: {rows:,} rows as"
                                f" {rows // arguments.batch:,} transactions of {arguments.batch}"
                            )
                            measured(
                                system,
                                "batches",
                                pair,
                                lambda pair=pair: apply_speed.measure_batches(
                                    pair, rows, arguments.batch, timeout
                                ),
                            )
                            if pair.agent is not None:
                                pair.agent.stop()
                                agent_lines(pair.agent, f"{system} batches_{repetition}")
        report_bulk(run, selected, results, rows, repeat)
        common.report_server_logs([a, b], offsets)
    finally:
        for server in (a, b):
            server.cleanup()


def report_bulk(
    run: Run,
    selected: list[str],
    results: dict[tuple[str, str], list[BulkResult]],
    rows: int,
    repeat: int,
) -> None:
    med = common.median
    batch = run.arguments.batch
    titles = {
        "bulk-insert": f"{rows:,} rows INSERTed in one transaction",
        "bulk-update": f"UPDATE of {rows:,} rows in one transaction",
        "batches": f"{rows:,} rows as {rows // batch:,} transactions of {batch} rows",
    }
    for variant in ("bulk-insert", "bulk-update", "batches"):
        if variant not in selected:
            continue
        concord = results.get((CONCORD, variant), [])
        logical = results.get((LOGICAL, variant), [])
        print(f"\n== {variant}: {titles[variant]}, median of {repeat}, A -> B ==")
        for system, found in ((CONCORD, concord), (LOGICAL, logical)):
            line = (
                f"  {system:9s} origin write {med(r.measure.write for r in found):.2f} s,"
                f" commit -> all at peer {med(r.measure.to_peer for r in found):.2f} s,"
                f" start -> all at peer {med(r.measure.total for r in found):.2f} s"
            )
            if variant == "batches":
                behind = med(r.measure.behind_rows for r in found)
                line += f"; rows not at peer at last commit {behind:,.0f}"
            print(line)
        if variant == "batches":
            value = med(r.measure.to_peer for r in concord)
            native = med(r.measure.to_peer for r in logical)
            run.add(
                Goal(
                    "batches",
                    f"batches: s behind at last commit ({rows // batch:,} x {batch} rows)",
                    value,
                    "s",
                    native,
                    f"{native:.2f} s (logical replication)",
                    "value",
                    "<",
                    1.0,
                )
            )
        else:
            value = med(r.measure.total for r in concord)
            native = med(r.measure.total for r in logical)
            run.add(
                Goal(
                    variant,
                    f"{variant}: {rows:,} rows, start -> all at peer",
                    value,
                    "s",
                    native,
                    "",
                    "ratio",
                    "<=",
                    2.0,
                )
            )
        for system, found in ((CONCORD, concord), (LOGICAL, logical)):
            if not found:
                continue
            print(f"  {system}, statement start until all rows at the peer:")
            common.report_cpu_per_rows(
                _sum_snapshots([r.cpu for r in found]),
                rows * len(found),
                origin="a",
                target="b",
                agent=common.AGENT if system == CONCORD else None,
                prefix="    ",
            )
        peak = max((r.peak for r in concord), default=float("nan"))
        print(
            f"  agent peak memory (VmHWM, reset before the statement): {peak:.0f} MB"
            " (a fresh agent per database)"
        )
        if variant == "bulk-insert":
            run.add(
                Goal(
                    "bulk-insert",
                    f"agent peak memory, {rows:,}-row transaction",
                    peak,
                    "MB",
                    None,
                    "",
                    "value",
                    "<",
                    300,
                )
            )
    sys.stdout.flush()


# -- idle: 5 nodes, nothing written ----------------------------------------------------------


def idle(run: Run) -> None:
    arguments = run.arguments
    nodes = arguments.idle_nodes
    window = arguments.idle_seconds or (10 if arguments.quick else 30)
    # Past the agent's first 30 s of a quiet node (agent.runner.QUIET_AFTER_SECONDS): the
    # measure is of a cluster that has been idle for a while.
    warm_up = arguments.idle_warm_up if arguments.idle_warm_up is not None else 35
    progress(f"idle: starting {nodes} servers (fsync on)")
    servers = common.start_servers([f"goals-idle-{i + 1}" for i in range(nodes)], fsync=True)
    offsets = {server.name: common.log_size(server) for server in servers}
    labels = [f"n{i + 1}" for i in range(nodes)]
    agent: AgentProcess | None = None
    ddl = apply_speed.TABLE_DDL.format(text_column="t")
    try:
        for server in servers:
            common.execute(server.create_database("idle"), ddl)
        config = common.concord_config_text(
            [(label, server.dsn("idle")) for label, server in zip(labels, servers, strict=True)],
            capture=arguments.capture,
        )
        progress(f"idle: pgconcord setup of {nodes} nodes, starting the agent")
        common.concord_setup(config)
        agent = AgentProcess(config, label="goals-idle").start(
            ready_dsns=[server.dsn("idle") for server in servers]
        )
        with CpuSampler(run.sampler_interval) as sampler:
            for label, server in zip(labels, servers, strict=True):
                sampler.add_server(label, server)
            sampler.add_agent(agent)
            progress(f"idle: warm-up {warm_up:.0f} s, then {window:.0f} s measured")
            sleep_watching(agent, warm_up)
            agent.check()
            # One session per server, in database postgres (not counted: only the node
            # database 'idle' is), open before the window so that no connection start lands in it.
            counters = [common.connect(server.dsn()) for server in servers]

            def transactions() -> list[int]:
                found = []
                for connection in counters:
                    row = connection.execute(
                        "SELECT xact_commit + xact_rollback FROM pg_stat_database"
                        " WHERE datname = 'idle'"
                    ).fetchone()
                    found.append(int(str(row[0])) if row else 0)
                return found

            counts_before, before = transactions(), sampler.snapshot()
            sleep_watching(agent, window)
            counts_after, cpu = transactions(), sampler.snapshot() - before
            peak = sampler.agent_peak_rss() / MB
            for connection in counters:
                connection.close()
            agent.check()
        agent.stop()
        seconds = cpu.at
        rates = [(y - x) / seconds for x, y in zip(counts_before, counts_after, strict=True)]
        agent_percent = 100 * cpu.get(common.AGENT, common.AGENT) / seconds
        print(
            f"\n== idle: {nodes} nodes set up with pgconcord, one agent replicating all"
            f" {nodes * (nodes - 1)} pairs, nothing written; {window:.0f} s after {warm_up:.0f} s"
            " warm-up =="
        )
        print(
            "  transactions/s per node (pg_stat_database xact_commit + xact_rollback of the"
            " node's database): "
            + ", ".join(f"{label} {rate:.1f}" for label, rate in zip(labels, rates, strict=True))
            + f"; total {sum(rates):.1f}"
        )
        run.add(
            Goal(
                "idle",
                f"idle {nodes} nodes: transactions/s over all nodes",
                sum(rates),
                "tps",
                IDLE_TODAY_TPS,
                f"{IDLE_TODAY_TPS:.0f} tps (issue 9: today)",
                "value",
                "<=",
                40,
            )
        )
        run.add(
            Goal(
                "idle",
                f"idle {nodes} nodes: agent CPU, % of a core",
                agent_percent,
                "%",
                IDLE_TODAY_CPU,
                f"{IDLE_TODAY_CPU:.1f} % (issue 9: today)",
                "value",
                "<=",
                5,
            )
        )

        def percent(category: str) -> float:
            return 100 * sum(cpu.get(label, category) for label in labels) / seconds

        print(
            f"  CPU, % of a core: agent {agent_percent:.1f}, pgconcord sessions on all nodes"
            f" {percent(common.PGCONCORD_SESSIONS):.1f}"
            f" (per node: "
            + ", ".join(
                f"{label} {100 * cpu.get(label, common.PGCONCORD_SESSIONS) / seconds:.1f}"
                for label in labels
            )
            + f"), other server processes {percent(common.OTHER_PROCESSES):.1f},"
            f" exited unsampled {percent(common.EXITED):.1f},"
            f" other client backends {percent(common.APP_BACKENDS):.1f}"
        )
        spent = cpu.get(common.AGENT, common.AGENT) + sum(
            cpu.get(label, common.PGCONCORD_SESSIONS) for label in labels
        )
        committed = sum(rates) * seconds
        print(
            "  CPU per agent transaction (agent + its sessions): "
            + (f"{1000 * spent / committed:.2f} ms" if committed else "-")
            + f"; agent peak memory (VmHWM) {peak:.0f} MB"
        )
        agent_lines(agent, "idle")
        common.report_server_logs(servers, offsets)
    finally:
        if agent is not None:
            agent.stop()
        for server in servers:
            server.cleanup()


# -- main --------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run (a few minutes)")
    parser.add_argument(
        "--capture", choices=("trigger", "wal"), default="trigger", help="the nodes' capture"
    )
    parser.add_argument(
        "--only",
        default=",".join(MEASURES),
        help=f"comma-separated subset of {','.join(MEASURES)} (default: all)",
    )
    parser.add_argument("--rounds", type=int, help="pgbench and lag rounds (default 3; quick 1)")
    parser.add_argument("--seconds", type=float, help="pgbench s per run (default 20; quick 5)")
    parser.add_argument(
        "--lag-seconds", type=float, help="marker s per lag round (default 20; quick 5)"
    )
    parser.add_argument("--interval", type=float, default=50, help="ms between markers")
    parser.add_argument("--scale", type=int, default=10)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rows", type=int, help="bulk rows (default 1,000,000; quick 100,000)")
    parser.add_argument("--batch", type=int, default=100, help="rows per transaction, batches")
    parser.add_argument("--repeat", type=int, help="bulk repetitions, median (default 1)")
    parser.add_argument("--timeout", type=float, default=900, help="per bulk measurement, s")
    parser.add_argument("--idle-nodes", type=int, default=5)
    parser.add_argument("--idle-seconds", type=float, help="measured idle s (default 30; quick 10)")
    parser.add_argument("--idle-warm-up", type=float, help="idle warm-up s (default 35)")
    parser.add_argument(
        "--sample-interval", type=float, default=0.2, help="CPU sampling interval, s"
    )
    arguments = parser.parse_args()
    selected = [name.strip() for name in arguments.only.split(",") if name.strip()]
    unknown = [name for name in selected if name not in MEASURES]
    if unknown:
        parser.error(f"unknown measure(s) {', '.join(unknown)}; choose from {', '.join(MEASURES)}")

    run = Run(arguments, arguments.sample_interval)
    load_at_start = common.load_note()
    source_at_start = common.source_note()
    print(f"goals of issue 9 ({'quick' if arguments.quick else 'full'} run: {', '.join(selected)})")
    print(f"at the start: {load_at_start}")
    print(f"measuring {source_at_start}")
    sys.stdout.flush()
    groups: list[tuple[str, list[str], Callable[[], None]]] = [
        ("pgbench/lag", ["pgbench", "lag"], lambda: pgbench_and_lag(run, selected)),
        (
            "bulk",
            ["bulk-insert", "bulk-update", "batches"],
            lambda: bulk(run, selected),
        ),
        ("idle", ["idle"], lambda: idle(run)),
    ]
    started = time.perf_counter()
    for name, members, call in groups:
        if not any(member in selected for member in members):
            continue
        group_started = time.perf_counter()
        try:
            call()
        except (common.AgentStalled, common.DeadlineExceeded) as error:
            message = str(error).splitlines()[0] if str(error) else type(error).__name__
            print(f"\nFAILED ({name}): {error}")
            run.failures.append(f"{name}: {message}")
            measured = {goal.key for goal in run.goals}
            for member in members:
                if member in selected and member not in measured:
                    run.goals.append(
                        Goal(member, member, float("nan"), "", None, "", "value", ">=", 0, message)
                    )
        run.durations[name] = time.perf_counter() - group_started
        progress(f"{name} took {run.durations[name]:.0f} s")

    common.print_table(
        "=== goals of issue 9"
        + (" (quick run: short rounds, 100,000 rows; indicative only)" if arguments.quick else "")
        + " ===",
        ["measure", "pgconcord", "reference", "ratio", "goal", "result"],
        [goal.row() for goal in run.goals],
    )
    passed = sum(1 for goal in run.goals if goal.passed)
    print(f"\n{passed} of {len(run.goals)} goals met")
    print(
        "run time: "
        + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in run.durations.items())
        + f"; total {time.perf_counter() - started:.0f} s"
    )
    print(f"at the end: {common.load_note()} (at the start: {load_at_start})")
    print(f"measured {source_at_start}")
    return 1 if run.failures else 0


if __name__ == "__main__":
    sys.exit(main())
