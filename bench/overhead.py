"""Replication overhead on the origin: pgbench TPS with replication / TPS without.

One server A (fsync on) holds three identical pgbench databases (tpcb-like, --scale, and a
primary key `hid bigserial` added to pgbench_history on every one of them):

  bare       no replication at all (the reference);
  pgconcord  pgconcord capture installed, the agent (a child process) replicating it to the
             database of the same name on server B;
  logical    a publication FOR ALL TABLES, subscribed to from server B (PostgreSQL's own
             logical replication, the second reference).

Each round runs pgbench (--clients clients, --seconds s, -n) on each database in turn, the order
rotating from round to round; before each run the same tables are vacuumed and both servers
checkpoint, after each run the script waits until the peer has every pgbench_history row (the
"catch-up" time), so that one system's backlog never runs into another's measurement.

With --decompose, one more database separates the costs: `capture_only` (pgconcord capture
installed, no agent: what the capture triggers cost the writers by themselves).

Reported: TPS per round, median, and the ratio to bare (median of the per-round ratios);
catch-up times; pgconcord.change_log growth and purge; the agent's CPU use and warnings.

    python bench/overhead.py [--quick] [--rounds N] [--seconds S]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import common
from common import AgentProcess, progress

BARE, CONCORD, LOGICAL = "bare", "pgconcord", "logical"
# --decompose: where pgconcord's cost comes from (no agent runs for it)
CAPTURE = "capture_only"
REPLICATED = (CONCORD, LOGICAL)
MB = 1024 * 1024


def history_count(dsn: str) -> int:
    return int(common.scalar(dsn, "SELECT count(*) FROM pgbench_history"))


def agent_cpu_seconds(agent: AgentProcess) -> float:
    """User + system CPU of the agent process so far, from /proc."""
    if agent.process is None:
        return float("nan")
    try:
        stat = Path(f"/proc/{agent.process.pid}/stat").read_text()
        fields = stat.rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return ticks / 100.0  # os.sysconf("SC_CLK_TCK") is 100 on Linux


def main() -> int:
    parser = common.base_arguments(__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, help="rounds (default 3; quick 1)")
    parser.add_argument(
        "--seconds", type=float, help="pgbench duration per run (default 20; quick 5)"
    )
    parser.add_argument("--scale", type=int, default=10)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument(
        "--decompose",
        action="store_true",
        help="also run pgconcord's capture with no agent, and without its NOTIFY trigger",
    )
    parser.add_argument(
        "--purge-wait",
        type=float,
        help="seconds to wait at the end for the change log to be purged (default 60; quick 0)",
    )
    arguments = parser.parse_args()
    rounds = arguments.rounds or (1 if arguments.quick else 3)
    seconds = arguments.seconds or (5 if arguments.quick else 20)
    purge_wait = (
        arguments.purge_wait if arguments.purge_wait is not None else (0 if arguments.quick else 60)
    )
    systems = [BARE, CONCORD] if arguments.no_logical else [BARE, CONCORD, LOGICAL]
    if arguments.decompose:
        systems += [CAPTURE]

    load_at_start = common.load_note()
    source_at_start = common.source_note()
    progress("starting servers A and B (fsync on)")
    a, b = common.start_servers(["overhead-a", "overhead-b"], fsync=True)
    offsets = {server.name: common.log_size(server) for server in (a, b)}
    agent: AgentProcess | None = None
    try:
        progress(f"pgbench -i -s {arguments.scale} on A and B, + pgbench_history.hid")
        for server in (a, b):
            common.pgbench_database(server, "template_bench", arguments.scale)
        for system in systems:
            a.create_database(system, template="template_bench")
            if system != BARE:
                b.create_database(system, template="template_bench")

        progress("installing pgconcord capture on A/pgconcord and B/pgconcord, starting agent")
        config = common.concord_config_text([("a", a.dsn(CONCORD)), ("b", b.dsn(CONCORD))])
        common.concord_setup(config)
        agent = AgentProcess(config, label="overhead").start(
            ready_dsns=[a.dsn(CONCORD), b.dsn(CONCORD)]
        )
        if CAPTURE in systems:
            # Capture installed as for a cluster of A and B, but no agent ever runs.
            common.concord_setup(
                common.concord_config_text([("a", a.dsn(CAPTURE)), ("b", b.dsn(CAPTURE))])
            )
        if LOGICAL in systems:
            progress("publication on A/logical, subscription on B/logical")
            common.create_logical_replication(a, LOGICAL, b, LOGICAL, name="bench")

        tps: dict[str, list[float]] = {system: [] for system in systems}
        catch_up: dict[str, list[float]] = {s: [] for s in systems if s in REPLICATED}
        change_log_rows: list[tuple[int, int, int, int]] = []
        agent_cpu: list[tuple[float, float]] = []
        for round_number in range(rounds):
            shift = round_number % len(systems)
            for system in systems[shift:] + systems[:shift]:
                dsn = a.dsn(system)
                common.execute(dsn, "VACUUM pgbench_branches, pgbench_tellers")
                common.checkpoint(a, b)
                cpu_before = agent_cpu_seconds(agent)
                started = time.perf_counter()
                result = common.pgbench_run(a, system, clients=arguments.clients, seconds=seconds)
                elapsed = time.perf_counter() - started
                tps[system].append(result.tps)
                line = f"round {round_number + 1}: {system:9s} {result.tps:8.1f} TPS"
                if system in REPLICATED:
                    expected = history_count(dsn)
                    peer = b.dsn(system)

                    def caught_up(peer: str = peer, expected: int = expected) -> bool:
                        agent.check()  # type: ignore[union-attr]
                        return history_count(peer) >= expected

                    waited = common.wait_until(caught_up, 600, f"{system} peer catch-up", 0.05)
                    catch_up[system].append(waited)
                    line += f", peer caught up {waited:.2f} s after pgbench ended"
                if system == CONCORD:
                    cpu = agent_cpu_seconds(agent) - cpu_before
                    agent_cpu.append((cpu, elapsed))
                    captured, present, size = common.change_log_state(dsn)
                    change_log_rows.append((round_number + 1, captured, present, size))
                    line += (
                        f"; agent CPU {cpu:.1f} s; change_log {present:,} rows"
                        f" ({captured:,} captured so far), {size / MB:.0f} MB"
                    )
                progress(line)

        purge_line = ""
        if purge_wait > 0:
            progress(f"waiting up to {purge_wait:.0f} s for the agent to purge the change log")
            try:
                waited = common.wait_until(
                    lambda: common.change_log_state(a.dsn(CONCORD))[1] == 0,
                    purge_wait,
                    "change log purged",
                    0.25,
                )
                purge_line = f"change_log emptied {waited:.1f} s after the last run"
            except common.DeadlineExceeded:
                purge_line = f"change_log NOT emptied within {purge_wait:.0f} s of the last run"
            captured, present, size = common.change_log_state(a.dsn(CONCORD))
            purge_line += f": {present:,} rows left of {captured:,} captured, {size / MB:.0f} MB"
        agent.stop()
        report(arguments, rounds, seconds, systems, tps, catch_up, change_log_rows, agent_cpu)
        if purge_line:
            print(purge_line)
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
    arguments: argparse.Namespace,
    rounds: int,
    seconds: float,
    systems: list[str],
    tps: dict[str, list[float]],
    catch_up: dict[str, list[float]],
    change_log_rows: list[tuple[int, int, int, int]],
    agent_cpu: list[tuple[float, float]],
) -> None:
    med = common.median
    scale = arguments.scale
    clients = arguments.clients
    print(
        f"\n=== replication overhead: pgbench tpcb-like, scale {scale}, {clients} clients,"
        f" {rounds} round(s) x {seconds:.0f} s, fsync on ==="
    )
    headers = ["system", *[f"round {i + 1}" for i in range(rounds)], "median TPS", "ratio"]
    rows = []
    for system in systems:
        ratios = [x / y for x, y in zip(tps[system], tps[BARE], strict=True)]
        rows.append([system, *tps[system], med(tps[system]), med(ratios)])
    common.print_table(
        "TPS (ratio = median over rounds of TPS / bare TPS in the same round)", headers, rows
    )
    if CAPTURE in systems:
        print(f"  {CAPTURE}: pgconcord capture installed, no agent running")
    if catch_up:
        common.print_table(
            "peer catch-up after pgbench ended (s)",
            ["system", *[f"round {i + 1}" for i in range(rounds)], "median"],
            [[system, *values, med(values)] for system, values in catch_up.items()],
        )
    if agent_cpu:
        total_cpu = sum(cpu for cpu, _ in agent_cpu)
        total_time = sum(elapsed for _, elapsed in agent_cpu)
        print(
            f"\nagent CPU during the pgconcord runs: {total_cpu:.1f} s over {total_time:.0f} s"
            f" = {100 * total_cpu / total_time:.0f}% of one core (of 2)"
        )
    if change_log_rows:
        print(
            "pgconcord.change_log on A after each pgconcord run (rows present / captured so far):"
        )
        for round_number, captured, present, size in change_log_rows:
            print(
                f"  round {round_number}: {present:,} / {captured:,} rows, {size / MB:.0f} MB"
                f" ({captured - present:,} purged)"
            )
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
