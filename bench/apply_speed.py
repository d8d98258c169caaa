"""Apply speed: how long a big write at node A takes to be all visible at node B.

pgconcord (capture triggers + the agent, in a child process) against PostgreSQL's own logical
replication (publication on A, subscription on B), each on fresh databases of the same two
servers (fsync on), alternating which goes first in each repetition. Variants:

  one      --rows rows in one INSERT ... SELECT transaction into a narrow table
           (id bigint primary key, v int, t text);
  update   then one UPDATE of all those rows in one transaction;
  batches  the same rows as transactions of --batch rows each, one after the other
           (fresh databases), and how far behind the peer is when the writer finishes.

Times: "origin write" is from the start of the statement(s) to the commit returning at A;
"commit -> peer" from that commit until the peer shows every row; "start -> peer" both.
Ratios are pgconcord / logical replication (1.0 = as fast; higher = slower).

    python bench/apply_speed.py [--quick] [--rows N] [--repeat N]
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

import common
import psycopg
from common import AgentProcess, Server, progress

TABLE_DDL = "CREATE TABLE narrow (id bigint PRIMARY KEY, v int, {text_column} text)"
INSERT_RANGE = (
    "INSERT INTO narrow SELECT g, g, md5(g::text) FROM generate_series(%s::bigint, %s::bigint) g"
)
CONCORD = "pgconcord"
LOGICAL = "logical"


@dataclass
class Measure:
    write: float  # origin statement(s) up to commit returned
    to_peer: float  # commit returned -> all rows visible at the peer
    behind_rows: int = 0  # rows not yet at the peer when the origin's last commit returned

    @property
    def total(self) -> float:
        return self.write + self.to_peer


@dataclass
class Results:
    by_key: dict[tuple[str, str], list[Measure]] = field(default_factory=dict)
    storage: list[tuple[str, int, int, int]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def add(self, system: str, variant: str, measure: Measure) -> None:
        self.by_key.setdefault((system, variant), []).append(measure)

    def get(self, system: str, variant: str) -> list[Measure]:
        return self.by_key.get((system, variant), [])


class Pair:
    """Fresh databases on A and B with narrow, replicated by one system."""

    def __init__(
        self,
        a: Server,
        b: Server,
        system: str,
        label: str,
        text_column: str,
        capture: str = "trigger",
    ) -> None:
        self.capture = capture
        self.a, self.b, self.system = a, b, system
        self.ddl = TABLE_DDL.format(text_column=psycopg.sql.Identifier(text_column).as_string())
        self.dbname = f"{system}_{label}"
        self.agent: AgentProcess | None = None

    def __enter__(self) -> Pair:
        for server in (self.a, self.b):
            server.drop_database(self.dbname)
            common.execute(server.create_database(self.dbname), self.ddl)
        if self.system == CONCORD:
            config = common.concord_config_text(
                [("a", self.a.dsn(self.dbname)), ("b", self.b.dsn(self.dbname))],
                capture=self.capture,
            )
            common.concord_setup(config)
            self.agent = AgentProcess(config, label=self.dbname).start(
                ready_dsns=[self.a.dsn(self.dbname), self.b.dsn(self.dbname)]
            )
        else:
            common.create_logical_replication(
                self.a, self.dbname, self.b, self.dbname, name="bench", tables=["narrow"]
            )
        return self

    def __exit__(self, *_: object) -> None:
        if self.agent is not None:
            self.agent.stop()
        else:
            common.drop_logical_replication(self.a, self.dbname, self.b, self.dbname, name="bench")
        for server in (self.a, self.b):
            server.drop_database(self.dbname)

    def check(self) -> None:
        if self.agent is not None:
            self.agent.check()

    @property
    def dsn_a(self) -> str:
        return self.a.dsn(self.dbname)

    @property
    def dsn_b(self) -> str:
        return self.b.dsn(self.dbname)


def wait_at_peer(
    pair: Pair,
    peer: psycopg.Connection[tuple[object, ...]],
    probe: str,
    probe_parameters: tuple[object, ...],
    verify: str,
    verify_parameters: tuple[object, ...],
    expected: int,
    timeout: float,
) -> float:
    """perf_counter time at which the peer shows everything: a cheap probe of the last row
    written (every system applies transactions in commit order and atomically), then a full
    count to confirm; if the count is short, keep counting until it matches."""

    def probe_ok() -> bool:
        pair.check()
        row = peer.execute(probe, probe_parameters).fetchone()
        return bool(row and row[0])

    def verified() -> bool:
        pair.check()
        row = peer.execute(verify, verify_parameters).fetchone()
        return bool(row and int(str(row[0])) == expected)

    common.wait_until(probe_ok, timeout, "last row at the peer", interval=0.01)
    seen = time.perf_counter()
    if not verified():
        progress("  probe row arrived before the rest; counting until complete")
        common.wait_until(verified, timeout, "all rows at the peer", interval=0.05)
        seen = time.perf_counter()
    return seen


def measure_one_transaction(pair: Pair, rows: int, timeout: float) -> Measure:
    common.checkpoint(pair.a, pair.b)
    with common.connect(pair.dsn_a, autocommit=False) as origin, common.connect(pair.dsn_b) as peer:
        started = time.perf_counter()
        origin.execute(INSERT_RANGE, (1, rows))
        origin.commit()
        committed = time.perf_counter()
        seen = wait_at_peer(
            pair,
            peer,
            "SELECT EXISTS (SELECT 1 FROM narrow WHERE id = %s)",
            (rows,),
            "SELECT count(*) FROM narrow",
            (),
            rows,
            timeout,
        )
    return Measure(write=committed - started, to_peer=seen - committed)


def measure_update(pair: Pair, rows: int, timeout: float) -> Measure:
    common.checkpoint(pair.a, pair.b)
    with common.connect(pair.dsn_a, autocommit=False) as origin, common.connect(pair.dsn_b) as peer:
        started = time.perf_counter()
        origin.execute("UPDATE narrow SET v = v + 1")
        origin.commit()
        committed = time.perf_counter()
        seen = wait_at_peer(
            pair,
            peer,
            "SELECT EXISTS (SELECT 1 FROM narrow WHERE id = %s AND v = %s)",
            (rows, rows + 1),
            "SELECT count(*) FROM narrow WHERE v = id + 1",
            (),
            rows,
            timeout,
        )
    return Measure(write=committed - started, to_peer=seen - committed)


def measure_batches(pair: Pair, rows: int, batch: int, timeout: float) -> Measure:
    common.checkpoint(pair.a, pair.b)
    with common.connect(pair.dsn_a) as origin, common.connect(pair.dsn_b) as peer:
        started = time.perf_counter()
        for first in range(1, rows + 1, batch):
            origin.execute(INSERT_RANGE, (first, min(rows, first + batch - 1)))  # autocommit
        committed = time.perf_counter()
        row = peer.execute("SELECT count(*) FROM narrow").fetchone()
        behind = rows - int(str(row[0])) if row else rows
        seen = wait_at_peer(
            pair,
            peer,
            "SELECT EXISTS (SELECT 1 FROM narrow WHERE id = %s)",
            (rows,),
            "SELECT count(*) FROM narrow",
            (),
            rows,
            timeout,
        )
    return Measure(write=committed - started, to_peer=seen - committed, behind_rows=behind)


def storage_after_insert(pair: Pair) -> tuple[int, int, int]:
    query = (
        "SELECT pg_total_relation_size('narrow'),"
        " coalesce(pg_total_relation_size(to_regclass('pgconcord.change_log')), 0),"
        " coalesce(pg_total_relation_size(to_regclass('pgconcord.row_version')), 0)"
    )
    with common.connect(pair.dsn_a) as connection:
        row = connection.execute(query).fetchone()
    assert row is not None
    return int(row[0]), int(row[1]), int(row[2])


def main() -> int:
    parser = common.base_arguments(__doc__.splitlines()[0])
    parser.add_argument(
        "--rows", type=int, help="rows per variant (default 1,000,000; quick 100,000)"
    )
    parser.add_argument("--batch", type=int, default=100, help="rows per transaction in 'batches'")
    parser.add_argument(
        "--repeat", type=int, help="repetitions, median reported (default 3; quick 1)"
    )
    parser.add_argument(
        "--variants",
        default="one,update,batches",
        help="comma-separated subset of one,update,batches",
    )
    parser.add_argument("--timeout", type=float, default=600, help="per-measurement deadline, s")
    parser.add_argument(
        "--text-column",
        default="t",
        help="name of the narrow table's text column (default t)",
    )
    arguments = parser.parse_args()
    rows = arguments.rows or (100_000 if arguments.quick else 1_000_000)
    repeat = arguments.repeat or (1 if arguments.quick else 3)
    variants = [v.strip() for v in arguments.variants.split(",") if v.strip()]
    systems = [CONCORD] if arguments.no_logical else [CONCORD, LOGICAL]

    load_at_start = common.load_note()
    source_at_start = common.source_note()
    progress(f"starting two servers (fsync on); {rows:,} rows, {repeat} repetition(s)")
    a, b = common.start_servers(["apply-a", "apply-b"], fsync=True)
    log_offsets = {server.name: common.log_size(server) for server in (a, b)}
    results = Results()
    try:
        for repetition in range(repeat):
            order = systems[repetition % len(systems) :] + systems[: repetition % len(systems)]
            for system in order:
                if "one" in variants or "update" in variants:
                    with Pair(a, b, system, f"one_{repetition}", arguments.text_column) as pair:
                        progress(f"rep {repetition + 1}: {system}: {rows:,} rows in 1 transaction")
                        measure = measure_one_transaction(pair, rows, arguments.timeout)
                        results.add(system, "one", measure)
                        progress(
                            f"  write {measure.write:.2f} s, commit->peer {measure.to_peer:.2f} s"
                        )
                        results.storage.append((system, *storage_after_insert(pair)))
                        if "update" in variants:
                            progress(f"rep {repetition + 1}: {system}: UPDATE of {rows:,} rows")
                            measure = measure_update(pair, rows, arguments.timeout)
                            results.add(system, "update", measure)
                            progress(
                                f"  write {measure.write:.2f} s,"
                                f" commit->peer {measure.to_peer:.2f} s"
                            )
                        if pair.agent is not None:
                            pair.agent.stop()
                            results.warnings += common.report_agent(pair.agent, limit=5)
                if "batches" in variants:
                    with Pair(a, b, system, f"batches_{repetition}", arguments.text_column) as pair:
                        progress(
                            f"rep {repetition + 1}: {system}: {rows:,} rows as"
                            f" {rows // arguments.batch:,} transactions of {arguments.batch}"
                        )
                        measure = measure_batches(pair, rows, arguments.batch, arguments.timeout)
                        results.add(system, "batches", measure)
                        progress(
                            f"  write {measure.write:.2f} s, {measure.behind_rows:,} rows behind,"
                            f" commit->peer {measure.to_peer:.2f} s"
                        )
                        if pair.agent is not None:
                            pair.agent.stop()
                            results.warnings += common.report_agent(pair.agent, limit=5)
    except common.AgentStalled as error:
        print(f"\nFAILED: the pgconcord agent cannot replicate this workload:\n  {error}")
        if arguments.text_column == "t" and "ambiguous" in str(error):
            print(
                "  (a pgconcord bug with a column named t; rerun with --text-column txt"
                " to measure around it)"
            )
        return 1
    else:
        report(results, rows, arguments.batch, repeat, systems, variants)
        common.report_server_logs([a, b], log_offsets)
        print(f"\nat the end: {common.load_note()} (at the start: {load_at_start})")
        print(f"measured {source_at_start}")
    finally:
        for server in (a, b):
            server.cleanup()
    return 0


def report(
    results: Results,
    rows: int,
    batch: int,
    repeat: int,
    systems: list[str],
    variants: list[str],
) -> None:
    med = common.median
    titles = {
        "one": f"{rows:,} rows INSERTed in one transaction",
        "update": f"UPDATE of all {rows:,} rows in one transaction",
        "batches": f"{rows:,} rows as {rows // batch:,} transactions of {batch} rows",
    }
    print(f"\n=== apply speed, median of {repeat} (seconds; ratio = pgconcord / logical) ===")
    for variant in variants:
        concord = results.get(CONCORD, variant)
        logical = results.get(LOGICAL, variant)
        lines: list[tuple[str, float, float]] = [
            (
                "origin write (start -> commit)",
                med(m.write for m in concord),
                med(m.write for m in logical),
            ),
            (
                "commit -> all rows at peer",
                med(m.to_peer for m in concord),
                med(m.to_peer for m in logical),
            ),
            (
                "start -> all rows at peer",
                med(m.total for m in concord),
                med(m.total for m in logical),
            ),
        ]
        if variant == "batches":
            lines.insert(
                1,
                (
                    "rows not yet at peer at last commit",
                    med(m.behind_rows for m in concord),
                    med(m.behind_rows for m in logical),
                ),
            )
        table_rows = []
        for name, x, y in lines:
            table_rows.append(
                [name, x, y if LOGICAL in systems else float("nan"), x / y if y else float("nan")]
            )
        common.print_table(titles[variant], ["", CONCORD, LOGICAL, "ratio"], table_rows)
        if repeat > 1:
            print(
                "  per repetition, start -> peer: "
                + "; ".join(
                    f"{system}: "
                    + ", ".join(f"{m.total:.2f}" for m in results.get(system, variant))
                    for system in systems
                )
            )
    if results.storage:
        mb = 1024 * 1024
        print()
        print("origin storage after the one-transaction INSERT (MB):")
        for system, table, change_log, row_version in results.storage[: len(systems)]:
            print(
                f"  {system}: narrow {table / mb:.0f}, pgconcord.change_log {change_log / mb:.0f},"
                f" pgconcord.row_version {row_version / mb:.0f}"
            )
    print(f"\nagent warning/error lines over all runs: {len(results.warnings)}")
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
