"""Join copy speed: `pgconcord join` of a node with one big table, against pg_dump | psql of
that table between the same two servers.

Server A holds a one-node cluster with the table `narrow (id bigint primary key, v int, t text)`
of --rows rows; server B gets a fresh database each time. Each round times, in alternating
order:

  dump     pg_dump -t narrow A | psql B (the pg_dump and psql of A's major version);
  join     pgconcord join of a new node on B (pgconcord.join.join in this process): its
           registration, the table's definition (pg_dump --schema-only), the COPY, the
           primary key built afterwards, and the install of capture on B.

Variants: `plain`, the rows were there before setup (no row versions, the common case of an
existing database); `versions`, the rows were written after setup, so that pgconcord's row
version of each row (pgconcord.row_version) is copied too. Ratio = join / dump (1.0 = as
fast). The joined node is parted again after each round.

    python bench/join_copy.py [--quick] [--rows N] [--rounds N] [--variants plain,versions]
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import common
from common import Server, progress

from pgconcord import tablecopy
from pgconcord.config import parse_config
from pgconcord.join import QuietObserver, join
from pgconcord.membership import part

TABLE_DDL = "CREATE TABLE narrow (id bigint PRIMARY KEY, v int, t text)"
FILL = "INSERT INTO narrow SELECT g, g % 1000, md5(g::text) FROM generate_series(1, %s) g"


class CopyTimer(QuietObserver):
    def __init__(self) -> None:
        self.started = 0.0
        self.seconds = 0.0

    def table_started(self, name: str, number: int, count: int, estimated_rows: int) -> None:
        self.started = time.perf_counter()

    def table_done(self, name: str, rows: int) -> None:
        self.seconds += time.perf_counter() - self.started


def config_text(nodes: list[tuple[str, str]]) -> str:
    return common.concord_config_text(nodes)


def dump_into(a: Server, b: Server, source: str, target: str) -> float:
    tools = tablecopy.dump_tools(int(common.scalar(a.dsn(source), "SHOW server_version_num")))
    common.execute(b.dsn(), f'CREATE DATABASE "{target}"')
    started = time.perf_counter()
    dump = subprocess.Popen(
        [tools / "pg_dump", "--no-owner", "-t", "narrow", f"--dbname={a.dsn(source)}"],
        stdout=subprocess.PIPE,
        env=common._client_environment(),
    )
    # The table's pgconcord triggers come along and fail (no pgconcord schema on B): psql
    # goes on, as it does by default; the rows and the key are checked below.
    restore = subprocess.run(
        [tools / "psql", "-q", "-X", f"--dbname={b.dsn(target)}"],
        stdin=dump.stdout,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=common._client_environment(),
        check=False,
    )
    if dump.stdout is not None:
        dump.stdout.close()
    seconds = time.perf_counter() - started
    copied = common.scalar(b.dsn(target), "SELECT count(*) FROM narrow")
    keyed = common.scalar(
        b.dsn(target),
        "SELECT count(*) FROM pg_index WHERE indisprimary AND indrelid = 'narrow'::regclass",
    )
    expected = common.scalar(a.dsn(source), "SELECT count(*) FROM narrow")
    if dump.wait() != 0 or restore.returncode != 0 or copied != expected or keyed != 1:
        raise SystemExit("pg_dump | psql failed")
    return seconds


def join_into(
    a: Server, b: Server, source: str, target: str, node: str, directory: Path
) -> tuple[float, float]:
    common.execute(b.dsn(), f'CREATE DATABASE "{target}"')
    config = parse_config(
        config_text([("a", a.dsn(source)), (node, b.dsn(target))]), str(directory / node)
    )
    timer = CopyTimer()
    started = time.perf_counter()
    join(config, node, observer=timer)
    seconds = time.perf_counter() - started
    part(config, node)
    return seconds, timer.seconds


def main() -> int:
    parser = common.base_arguments(__doc__ or "")
    parser.add_argument("--rows", type=int, default=None, help="rows in the table (1,000,000)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per variant (3)")
    parser.add_argument("--variants", default="plain,versions", help="plain,versions")
    arguments = parser.parse_args()
    rows = arguments.rows or (100_000 if arguments.quick else 1_000_000)
    rounds = arguments.rounds or (1 if arguments.quick else 3)
    variants = [v for v in arguments.variants.split(",") if v]
    progress(common.load_note())
    a, b = common.start_servers(["join-a", "join-b"])
    directory = Path(a.sandbox_directory)
    results: list[list[object]] = []
    serial = 0
    for variant in variants:
        source = f"donor_{variant}"
        dsn = a.create_database(source)
        common.execute(dsn, TABLE_DDL)
        setup_config = config_text([("a", dsn)])
        if variant == "plain":
            common.execute(dsn, FILL.replace("%s", str(rows)), "VACUUM ANALYZE narrow")
            common.concord_setup(setup_config)
        else:
            common.concord_setup(setup_config)
            progress(f"{variant}: writing {rows} rows through capture")
            common.execute(dsn, FILL.replace("%s", str(rows)), "VACUUM ANALYZE narrow")
            common.execute(dsn, "DELETE FROM pgconcord.change_log", "VACUUM pgconcord.change_log")
        versions = common.scalar(dsn, "SELECT count(*) FROM pgconcord.row_version")
        common.checkpoint(a)
        dumps, joins, copies = [], [], []
        for round_number in range(rounds):
            order = ("dump", "join") if round_number % 2 == 0 else ("join", "dump")
            for system in order:
                serial += 1
                target = f"{system}_{variant}_{serial}"
                if system == "dump":
                    seconds = dump_into(a, b, source, target)
                    dumps.append(seconds)
                    progress(f"{variant} round {round_number + 1}: pg_dump | psql {seconds:.2f} s")
                else:
                    seconds, copy = join_into(a, b, source, target, f"b{serial}", directory)
                    joins.append(seconds)
                    copies.append(copy)
                    progress(
                        f"{variant} round {round_number + 1}: join {seconds:.2f} s"
                        f" (copy {copy:.2f} s)"
                    )
                common.checkpoint(b)
        dump_median, join_median = common.median(dumps), common.median(joins)
        results.append(
            [
                variant,
                rows,
                versions,
                f"{dump_median:.2f}",
                f"{join_median:.2f}",
                f"{common.median(copies):.2f}",
                f"{join_median / dump_median:.2f}",
            ]
        )
    common.print_table(
        f"join copy vs pg_dump | psql, median of {rounds} rounds",
        ["variant", "rows", "row versions", "dump|psql s", "join s", "of which copy s", "ratio"],
        results,
    )
    progress(common.load_note())
    for server in (a, b):
        server.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
