"""Cost of row history ([audit]) per write on the origin: the same writes on a table captured by
pgconcord without audit, and on one that is audited too, against a bare one.

One sandbox server (fsync on). Three databases from one template (pgbench -i --scale, plus a
table `items (id bigint PRIMARY KEY, label text, amount int)`):

  bare      no pgconcord at all;
  captured  pgconcord set up (a two-node config whose second node is an idle database of the
            same server: capture triggers installed, no agent running);
  audited   the same, with `[audit] tables = [pgbench_accounts, items]`.

Workloads:
  loop    a server-side loop (DO) of --loop-writes single-row UPDATEs, each its own statement,
          in one transaction: the trigger's cost per write without round trips or commits
          (best of three runs per round: the least disturbed by other work on the machine);
  update  pgbench with a script of one `UPDATE pgbench_accounts SET abalance = abalance + :d
          WHERE aid = :aid` per transaction (random aid): the per-write cost with a commit each;
  bulk    `INSERT INTO items SELECT ... FROM generate_series(...)` of --bulk-rows rows in one
          statement: the per-row cost of the trigger with the commit amortized.

Each round runs every workload on every database, in an order rotating from round to round,
after a VACUUM and a checkpoint. Reported: TPS or rows/s per round, their medians, the ratio
audited/captured (what auditing adds on top of replication) and audited/bare, the extra time per
write in microseconds, and the trail's size per audited write.

    python bench/audit_cost.py [--quick] [--rounds N] [--seconds S] [--clients C]
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common
from common import progress

from pgconcord.sandbox import Server

BARE, CAPTURED, AUDITED = "bare", "captured", "audited"
SYSTEMS = (BARE, CAPTURED, AUDITED)
UPDATE_SCRIPT = """\\set aid random(1, 100000 * :scale)
\\set delta random(-5000, 5000)
UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :aid;
"""
ITEMS = "CREATE TABLE items (id bigint PRIMARY KEY, label text, amount int)"


def make_databases(server: Server, scale: int) -> None:
    common.pgbench_database(server, "audit_template", scale)
    common.execute(server.dsn("audit_template"), ITEMS)
    for system in SYSTEMS:
        server.create_database(system, template="audit_template")
        if system != BARE:
            server.create_database(f"{system}_peer", template="audit_template")
    for system in (CAPTURED, AUDITED):
        config = common.concord_config_text(
            [("a", server.dsn(system)), ("b", server.dsn(f"{system}_peer"))]
        )
        if system == AUDITED:
            config += '[audit]\ntables = ["public.pgbench_accounts", "public.items"]\n'
        common.concord_setup(config)


def run_updates(server: Server, system: str, script: Path, clients: int, seconds: float) -> float:
    command = common.pgbench_command(
        server, system, clients=clients, seconds=seconds, extra=["-f", str(script)]
    )
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=common._client_environment(),
    )
    return common.pgbench_finish(process).tps


def run_bulk(server: Server, system: str, start: int, rows: int) -> float:
    """Rows per second of one INSERT ... SELECT of `rows` rows (its own transaction)."""
    with common.connect(server.dsn(system)) as connection:
        started = time.perf_counter()
        connection.execute(
            "INSERT INTO items SELECT g, 'item ' || g, (g %% 1000)::int"
            " FROM generate_series(%s::bigint, %s::bigint) AS g",
            (start, start + rows - 1),
        )
        return rows / (time.perf_counter() - started)


LOOP = """
DO $loop$
BEGIN
    FOR i IN 1..{writes} LOOP
        UPDATE pgbench_accounts SET abalance = abalance + 1
         WHERE aid = (i::bigint * 7919) % ({scale} * 100000) + 1;
    END LOOP;
END
$loop$
"""


def run_loop(server: Server, system: str, writes: int, scale: int) -> float:
    """Microseconds per single-row UPDATE statement, run by the server in one transaction: the
    trigger's own cost, without a client round trip or a commit per write."""
    with common.connect(server.dsn(system)) as connection:
        started = time.perf_counter()
        connection.execute(LOOP.format(writes=writes, scale=scale).encode())
        return (time.perf_counter() - started) / writes * 1e6


def trail_bytes_per_row(server: Server) -> tuple[int, float]:
    rows = int(common.scalar(server.dsn(AUDITED), "SELECT count(*) FROM pgconcord.audit"))
    size = int(
        common.scalar(server.dsn(AUDITED), "SELECT pg_total_relation_size('pgconcord.audit')")
    )
    return rows, size / rows if rows else float("nan")


def main() -> int:
    parser = common.base_arguments(__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, help="rounds (default 3; quick 1)")
    parser.add_argument("--seconds", type=float, help="pgbench seconds per run (15; quick 5)")
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--scale", type=int, default=1)
    parser.add_argument("--bulk-rows", type=int, default=50_000)
    parser.add_argument("--loop-writes", type=int, default=5_000)
    arguments = parser.parse_args()
    rounds = arguments.rounds or (1 if arguments.quick else 3)
    seconds = arguments.seconds or (5 if arguments.quick else 15)

    load_at_start = common.load_note()
    progress("starting one server (fsync on)")
    (server,) = common.start_servers(["audit-cost"], fsync=True)
    try:
        progress(f"databases bare, captured, audited (pgbench -i -s {arguments.scale}, items)")
        make_databases(server, arguments.scale)
        script = Path(tempfile.mkdtemp()) / "update.sql"
        script.write_text(UPDATE_SCRIPT.replace(":scale", str(arguments.scale)))
        tps: dict[str, list[float]] = {system: [] for system in SYSTEMS}
        bulk: dict[str, list[float]] = {system: [] for system in SYSTEMS}
        loop: dict[str, list[float]] = {system: [] for system in SYSTEMS}
        for round_number in range(rounds):
            shift = round_number % len(SYSTEMS)
            for system in SYSTEMS[shift:] + SYSTEMS[:shift]:
                common.execute(server.dsn(system), "VACUUM pgbench_accounts, items")
                common.checkpoint(server)
                result = run_updates(server, system, script, arguments.clients, seconds)
                tps[system].append(result)
                common.checkpoint(server)
                rate = run_bulk(
                    server, system, 1 + round_number * arguments.bulk_rows, arguments.bulk_rows
                )
                bulk[system].append(rate)
                # Short and repeated, the best of each: the least disturbed by other work.
                each = min(
                    run_loop(server, system, arguments.loop_writes, arguments.scale)
                    for _ in range(3)
                )
                loop[system].append(each)
                progress(
                    f"round {round_number + 1}: {system:8s} update {result:8.1f} TPS,"
                    f" bulk insert {rate:9.0f} rows/s, {each:6.1f} us per update in a loop"
                )
        report(arguments, rounds, seconds, tps, bulk)
        best = {system: min(loop[system]) for system in SYSTEMS}
        print(
            f"\nsingle-row UPDATE in a server-side loop ({arguments.loop_writes} per run, best"
            f" of {3 * rounds}): bare {best[BARE]:.1f} us, captured {best[CAPTURED]:.1f} us,"
            f" audited {best[AUDITED]:.1f} us: auditing adds {best[AUDITED] - best[CAPTURED]:.1f}"
            f" us per write ({best[AUDITED] / best[CAPTURED]:.2f}x captured's time)"
        )
        rows, per_row = trail_bytes_per_row(server)
        print(f"\ntrail on the audited database: {rows:,} rows, {per_row:.0f} bytes per row")
        print(f"\nat the end: {common.load_note()} (at the start: {load_at_start})")
        print(f"measured {common.source_note()}")
    finally:
        server.cleanup()
    return 0


def report(
    arguments: object,
    rounds: int,
    seconds: float,
    tps: dict[str, list[float]],
    bulk: dict[str, list[float]],
) -> None:
    rows = []
    for name, results, unit in (("update (pgbench)", tps, "TPS"), ("bulk insert", bulk, "rows/s")):
        medians = {system: common.median(results[system]) for system in SYSTEMS}
        ratios = [a / c for a, c in zip(results[AUDITED], results[CAPTURED], strict=True)]
        ratios_bare = [a / b for a, b in zip(results[AUDITED], results[BARE], strict=True)]
        # Extra time per write of auditing, from the medians' rates.
        extra_us = (1 / medians[AUDITED] - 1 / medians[CAPTURED]) * 1e6
        rows.append(
            (
                f"{name} ({unit})",
                medians[BARE],
                medians[CAPTURED],
                medians[AUDITED],
                common.median(ratios),
                common.median(ratios_bare),
                extra_us,
            )
        )
    common.print_table(
        f"row history cost: {rounds} rounds, pgbench {seconds:.0f} s per run, medians",
        (
            "workload",
            "bare",
            "captured",
            "audited",
            "audited/captured",
            "audited/bare",
            "+us/write",
        ),
        rows,
    )


if __name__ == "__main__":
    sys.exit(main())
