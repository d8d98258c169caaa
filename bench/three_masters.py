"""pgbench's tpcb-like workload on three masters at once, balances as counter columns.

Prints the cluster's total TPS, the seconds from the end of the load until verify finds the
nodes identical, and checks sum(balance) == sum(delta of history) on every node.

    python bench/three_masters.py [--seconds 20] [--clients 2] [--scale 1]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from harness import Cluster

from pgconcord.agent import Agent
from pgconcord.sandbox import Server
from pgconcord.verify import verify

COUNTERS = (
    ("pgbench_accounts", "abalance"),
    ("pgbench_tellers", "tbalance"),
    ("pgbench_branches", "bbalance"),
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--scale", type=int, default=1)
    arguments = parser.parse_args()
    servers = [Server(name=f"three-{index}", fsync=True).start() for index in range(3)]
    try:
        cluster = Cluster(servers, Path(tempfile.mkdtemp(prefix="pgconcord-three-")))
        for name in cluster.names:
            server = cluster.server_of[name]
            subprocess.run(
                [
                    "pgbench",
                    "-i",
                    "-s",
                    str(arguments.scale),
                    "-q",
                    "-h",
                    server.host,
                    "-p",
                    str(server.port),
                    "-U",
                    server.superuser,
                    cluster.database,
                ],
                check=True,
                capture_output=True,
            )
            cluster.execute(
                name,
                "ALTER TABLE pgbench_history ADD COLUMN id uuid"
                " DEFAULT gen_random_uuid() PRIMARY KEY;"
                # pgbench leaves its balances nullable; counters must not be.
                " ALTER TABLE pgbench_accounts ALTER abalance SET NOT NULL;"
                " ALTER TABLE pgbench_tellers ALTER tbalance SET NOT NULL;"
                " ALTER TABLE pgbench_branches ALTER bbalance SET NOT NULL",
            )
        cluster.write_config(
            "".join(
                f'[conflict.table."public.{table}"]\ndelta_columns = ["{column}"]\n'
                for table, column in COUNTERS
            )
        )
        cluster.setup()
        agent = Agent(cluster.config, poll_seconds=0.2).start()
        rates: dict[str, float] = {}

        def load(name: str) -> None:
            server = cluster.server_of[name]
            output = subprocess.run(
                [
                    "pgbench",
                    "-n",
                    "-c",
                    str(arguments.clients),
                    "-T",
                    str(arguments.seconds),
                    "-h",
                    server.host,
                    "-p",
                    str(server.port),
                    "-U",
                    server.superuser,
                    cluster.database,
                ],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            match = re.search(r"tps = ([0-9.]+)", output)
            rates[name] = float(match.group(1)) if match else 0.0

        workers = [threading.Thread(target=load, args=(name,)) for name in cluster.names]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        ended = time.perf_counter()
        while not verify(cluster.config).identical:
            time.sleep(0.2)
        converged = time.perf_counter() - ended
        agent.stop()
        print(
            f"pgbench tpcb-like on 3 masters, {arguments.clients} clients each,"
            f" {arguments.seconds} s, scale {arguments.scale}, fsync on"
        )
        for name, rate in rates.items():
            print(f"  {name}: {rate:,.0f} TPS")
        print(f"  cluster: {sum(rates.values()):,.0f} TPS")
        print(f"  end of load -> verified identical: {converged:.1f} s")
        for name in cluster.names:
            history = cluster.value(name, "SELECT sum(delta) FROM pgbench_history")
            sums = [cluster.value(name, f"SELECT sum({c}) FROM {t}") for t, c in COUNTERS]
            status = "ok" if all(value == history for value in sums) else "MISMATCH"
            print(f"  {name}: sum(delta) {history}, balances {sums}: {status}")
        return 0
    finally:
        for server in servers:
            server.cleanup()


if __name__ == "__main__":
    sys.exit(main())
