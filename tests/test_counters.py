"""Counter columns (delta_columns): concurrent changes add up on every node."""

from __future__ import annotations

import shutil
import subprocess
import threading

import pytest
from harness import APPLICATION_ROLE, Cluster

COUNTERS = '[conflict.table."public.accounts"]\ndelta_columns = ["balance", "operations"]\n'


def test_concurrent_increments_add_up_instead_of_overwriting(cluster: Cluster) -> None:
    for name in cluster.names:
        cluster.execute(
            name,
            "CREATE TABLE accounts (id int PRIMARY KEY, owner text,"
            " balance numeric(12, 2) NOT NULL, operations bigint NOT NULL)",
        )
    cluster.write_config(COUNTERS)
    cluster.setup()
    cluster.execute("north", "INSERT INTO accounts VALUES (1, 'ann', 100, 0), (2, 'bob', 0, 0)")
    cluster.sync()
    cluster.execute(
        "north",
        "UPDATE accounts SET balance = balance + 10, operations = operations + 1 WHERE id = 1",
    )
    cluster.execute(
        "south",
        "UPDATE accounts SET balance = balance - 2.5, operations = operations + 1 WHERE id = 1",
    )
    cluster.execute(
        "east",
        "UPDATE accounts SET balance = balance + 1, operations = operations + 1 WHERE id = 1",
    )
    cluster.execute("south", "UPDATE accounts SET balance = balance + 5 WHERE id = 2")
    cluster.sync()
    # Counters alone are no conflict.
    assert not [r for r in cluster.conflicts() if r["kind"] == "conflict"]
    cluster.execute("east", "UPDATE accounts SET balance = balance + 1, owner = 'Ann' WHERE id = 1")
    cluster.sync()
    for name in cluster.names:
        assert cluster.query(
            name, "SELECT id, owner, balance, operations FROM accounts ORDER BY id"
        ) == [(1, "Ann", 109.5, 3), (2, "bob", 5, 0)]
    cluster.assert_identical()


@pytest.mark.slow
def test_pgbench_on_three_masters_keeps_the_balances(system_cluster: Cluster) -> None:
    """pgbench's tpcb-like workload at the same time on three masters: every node ends with
    the same rows, and the balances equal the sum of the deltas recorded in history."""
    cluster = system_cluster
    server = cluster.server_of["north"]
    pgbench = shutil.which("pgbench") or str(server.binaries.bindir / "pgbench")
    for name in cluster.names:
        node_server = cluster.server_of[name]
        subprocess.run(
            [
                pgbench,
                "-i",
                "-s",
                "1",
                "-q",
                "-h",
                node_server.host,
                "-p",
                str(node_server.port),
                "-U",
                APPLICATION_ROLE,
                cluster.database,
            ],
            check=True,
            capture_output=True,
        )
        # History rows need keys that cannot collide between masters.
        cluster.execute(
            name,
            "ALTER TABLE pgbench_history ADD COLUMN id uuid DEFAULT gen_random_uuid() PRIMARY KEY;"
            # pgbench leaves its balances nullable; counters must not be (setup says so).
            " ALTER TABLE pgbench_accounts ALTER abalance SET NOT NULL;"
            " ALTER TABLE pgbench_tellers ALTER tbalance SET NOT NULL;"
            " ALTER TABLE pgbench_branches ALTER bbalance SET NOT NULL",
        )
    cluster.write_config(
        "".join(
            f'[conflict.table."public.{table}"]\ndelta_columns = ["{column}"]\n'
            for table, column in (
                ("pgbench_accounts", "abalance"),
                ("pgbench_tellers", "tbalance"),
                ("pgbench_branches", "bbalance"),
            )
        )
    )
    cluster.setup()

    def run_pgbench(name: str) -> None:
        node_server = cluster.server_of[name]
        subprocess.run(
            [
                pgbench,
                "-n",
                "-c",
                "2",
                "-T",
                "5",
                "-h",
                node_server.host,
                "-p",
                str(node_server.port),
                "-U",
                APPLICATION_ROLE,
                cluster.database,
            ],
            check=True,
            capture_output=True,
        )

    workers = [threading.Thread(target=run_pgbench, args=(name,)) for name in cluster.names]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    cluster.sync()
    for name in cluster.names:
        history = cluster.value(name, "SELECT sum(delta) FROM pgbench_history")
        assert history != 0
        for table, column in (
            ("pgbench_accounts", "abalance"),
            ("pgbench_tellers", "tbalance"),
            ("pgbench_branches", "bbalance"),
        ):
            assert cluster.value(name, f"SELECT sum({column}) FROM {table}") == history
    cluster.assert_identical()


def test_a_counter_that_may_be_null_is_refused_by_name(cluster: Cluster) -> None:
    """Going to or from NULL a counter has no difference to add: the nodes would end with
    different values, so setup refuses the column until it is NOT NULL."""
    for name in cluster.names:
        cluster.execute(name, "CREATE TABLE accounts (id int PRIMARY KEY, balance numeric)")
    cluster.write_config('[conflict.table."public.accounts"]\ndelta_columns = ["balance"]\n')
    result = cluster.cli("setup")
    assert result.returncode != 0
    assert "delta column balance may be NULL" in result.stderr
    assert "SET NOT NULL" in result.stderr
    for name in cluster.names:
        cluster.execute(name, "ALTER TABLE accounts ALTER balance SET NOT NULL")
    cluster.setup()
    cluster.execute("north", "INSERT INTO accounts VALUES (1, 10)")
    cluster.sync()
    cluster.assert_identical()
