"""What one window costs: the CPU the target's applying session and the origin's reading session
spend per window, for windows of different sizes, and the split into a fixed part per window
and a part per row (a least-squares line through the sizes).

Servers A and B (fsync on) hold identical pgbench databases (scale --scale, pgbench_history.hid
as primary key), set up with pgconcord; no agent runs. Each measurement writes N pgbench
tpcb-like transactions at A (4 rows each), stamps them there as the origin's watch would, and
pulls them to B in one window with a Puller in this process (the agent's, settled=False), reading
utime + stime of the two backends from /proc before and after. The clock ticks every 10 ms, so
each size is repeated until about 1,500 rows have passed (at least --repeat times).

Under pgbench the agent's windows hold a few hundred rows: there the fixed part is most of what
a row costs (see the closing notes of issue 9). Where the fixed part goes: perf record -g -p
on the target backend while this runs (syscalls of TRUNCATE and ON COMMIT DELETE ROWS on the
temporary tables, planning, executor start-up).

    python bench/window_cost.py [--sizes 1,10,50,200] [--repeat 10] [--capture trigger|wal]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import common
from common import progress

from pgconcord.apply import Puller
from pgconcord.config import parse_config


def backend_cpu(pid: int) -> float:
    """CPU seconds (user + system) the process has used."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Intercept and slope of the least-squares line through (x, y) points."""
    count = len(points)
    mean_x = sum(x for x, _ in points) / count
    mean_y = sum(y for _, y in points) / count
    spread = sum((x - mean_x) ** 2 for x, _ in points)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / spread if spread else 0.0
    return mean_y - slope * mean_x, slope


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1,10,50,200", help="pgbench transactions per window")
    parser.add_argument("--repeat", type=int, default=10, help="windows per size, at least")
    parser.add_argument("--scale", type=int, default=10)
    parser.add_argument("--capture", choices=("trigger", "wal"), default="trigger")
    arguments = parser.parse_args()
    sizes = [int(size) for size in arguments.sizes.split(",")]
    settings = {"wal_level": "logical"} if arguments.capture == "wal" else {}
    progress(f"window cost: {arguments.capture} capture, sizes {sizes}")
    servers = common.start_servers(["window-a", "window-b"], fsync=True, **settings)
    origin, target = servers
    try:
        for server in servers:
            common.pgbench_database(server, "bench", arguments.scale)
        text = common.concord_config_text(
            [("a", origin.dsn("bench")), ("b", target.dsn("bench"))], capture=arguments.capture
        )
        common.concord_setup(text)
        config = parse_config(text, "bench")
        puller = Puller(config.node_by_name("a"), config.node_by_name("b"), settled=False)

        def write(transactions: int) -> None:
            common.pgbench_transactions(origin, "bench", transactions)
            common.execute(origin.dsn("bench"), "SELECT pgconcord.stamp_captured()")

        try:
            write(20)
            puller.pull(until_current=True)  # the position, the plans, the sessions
            assert puller._target_connection is not None and puller._source.session is not None
            target_pid = int(puller._target_connection.info.backend_pid)
            origin_pid = int(puller._source.session.info.backend_pid)
            rows: list[list[object]] = []
            target_points: list[tuple[float, float]] = []
            origin_points: list[tuple[float, float]] = []
            for size in sizes:
                repeat = max(arguments.repeat, 1500 // (4 * size))
                target_cpu = origin_cpu = wall = 0.0
                for _ in range(repeat):
                    write(size)
                    target_before, origin_before = backend_cpu(target_pid), backend_cpu(origin_pid)
                    started = time.perf_counter()
                    puller.pull(until_current=True)
                    wall += time.perf_counter() - started
                    target_cpu += backend_cpu(target_pid) - target_before
                    origin_cpu += backend_cpu(origin_pid) - origin_before
                row_count = 4 * size
                target_ms = 1000 * target_cpu / repeat
                origin_ms = 1000 * origin_cpu / repeat
                target_points.append((row_count, target_ms))
                origin_points.append((row_count, origin_ms))
                rows.append(
                    [
                        row_count,
                        repeat,
                        f"{target_ms:.2f}",
                        f"{1000 * target_ms / row_count:.0f}",
                        f"{origin_ms:.2f}",
                        f"{1000 * wall / repeat:.1f}",
                    ]
                )
                progress(f"  {row_count} rows per window: target {target_ms:.2f} ms")
        finally:
            puller.close()
        common.print_table(
            f"CPU per window ({arguments.capture} capture; pgbench tpcb-like rows)",
            ["rows", "windows", "target ms", "target us/row", "origin ms", "wall ms"],
            rows,
        )
        for label, points in (("target", target_points), ("origin", origin_points)):
            fixed, per_row = fit(points)
            print(f"{label}: {fixed:.2f} ms per window + {1000 * per_row:.1f} us per row")
    finally:
        for server in servers:
            server.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
