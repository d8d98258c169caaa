"""Where the servers' time goes while the agent replicates pgbench: per statement, on the origin
and on the target, the time PostgreSQL spent planning and executing it (pg_stat_statements,
nested statements of pgconcord's functions included), per replicated row.

Servers A and B (fsync on, pg_stat_statements loaded with track = all and track_planning on)
hold identical pgbench databases (scale --scale, pgbench_history.hid as primary key), set up
with pgconcord; the agent replicates A -> B in its own process while pgbench runs --seconds at
A with --clients clients. The statistics are reset once the agent is connected and read once B
has caught up, so they cover the run and the catch-up. Statements of functions show under
their own text (and again inside the function that calls them: a function's time includes
its statements'), so the table names the hot statement, not only the function around it.

    python bench/statement_costs.py [--seconds 10] [--clients 4] [--top 15] [--capture trigger|wal]
"""

from __future__ import annotations

import argparse
import sys

import common
import lag
from common import AgentProcess, progress

ROWS_PER_TPCB = 4  # three updates and an insert

STATEMENTS = """
SELECT s.toplevel, s.calls, s.rows, s.total_plan_time, s.total_exec_time,
       regexp_replace(s.query, '\\s+', ' ', 'g')
  FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid
 WHERE d.datname = %s
 ORDER BY s.total_plan_time + s.total_exec_time DESC
"""


def report(label: str, dsn: str, rows: int, top: int, width: int) -> None:
    with common.connect(dsn) as connection:
        found = connection.execute(STATEMENTS, ("bench",)).fetchall()
    top_level = sum(plan + run for level, _, _, plan, run, _ in found if level)
    pgbench_time = sum(
        plan + run for level, _, _, plan, run, text in found if level and "pgbench_" in text[:60]
    )
    print(
        f"\n== {label}: top-level statements {top_level / 1000:.2f} s"
        f" ({1000 * top_level / rows:.1f} us per replicated row), of which pgbench's own"
        f" {pgbench_time / 1000:.2f} s =="
    )
    table = []
    for level, calls, returned, plan, run, text in found[:top]:
        total = plan + run
        table.append(
            [
                "top" if level else "nested",
                f"{calls:,}",
                f"{returned:,}",
                f"{plan / 1000:.2f}",
                f"{run / 1000:.2f}",
                f"{1000 * total / rows:.1f}",
                f"{1000 * total / calls:.0f}" if calls else "-",
                text[:width],
            ]
        )
    common.print_table(
        f"{label}: statements by time (plan + execute)",
        ["level", "calls", "rows", "plan s", "exec s", "us/row", "us/call", "statement"],
        table,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--scale", type=int, default=10)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--width", type=int, default=110, help="characters of each statement")
    parser.add_argument("--capture", choices=("trigger", "wal"), default="trigger")
    arguments = parser.parse_args()
    settings = {
        "shared_preload_libraries": "pg_stat_statements",
        "pg_stat_statements.track": "all",
        "pg_stat_statements.track_planning": "on",
        "pg_stat_statements.max": "5000",
    }
    if arguments.capture == "wal":
        settings["wal_level"] = "logical"
    progress(f"statement costs: {arguments.capture} capture, pgbench {arguments.seconds:.0f} s")
    servers = common.start_servers(["statements-a", "statements-b"], fsync=True, **settings)
    a, b = servers
    agent: AgentProcess | None = None
    try:
        for server in servers:
            common.pgbench_database(server, "bench", arguments.scale)
            common.execute(server.dsn("bench"), "CREATE EXTENSION pg_stat_statements")
        config = common.concord_config_text(
            [("a", a.dsn("bench")), ("b", b.dsn("bench"))], capture=arguments.capture
        )
        common.concord_setup(config)
        agent = AgentProcess(config, label="statements").start(
            ready_dsns=[a.dsn("bench"), b.dsn("bench")]
        )
        for server in servers:
            common.execute(server.dsn("bench"), "SELECT pg_stat_statements_reset()")
        result = common.pgbench_run(
            a, "bench", clients=arguments.clients, seconds=arguments.seconds
        )
        expected = lag.history_count(a.dsn("bench"))

        def caught_up() -> bool:
            assert agent is not None
            agent.check()
            return lag.history_count(b.dsn("bench")) >= expected

        common.wait_until(caught_up, 600, "peer catch-up", 0.05)
        rows = ROWS_PER_TPCB * result.transactions
        print(f"pgbench: {result.tps:,.0f} TPS, {rows:,} rows replicated")
        for label, server in (("origin A", a), ("target B", b)):
            report(label, server.dsn("bench"), rows, arguments.top, arguments.width)
        agent.stop()
    finally:
        if agent is not None:
            agent.stop()
        for server in servers:
            server.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
