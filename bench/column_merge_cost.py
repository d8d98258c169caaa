"""Cost of capture on the origin, two pgconcord versions side by side: pgbench TPS on databases
with capture installed by version BEFORE and by version AFTER, relative to a bare database.

Made to measure commit a145b7e (column-level merge: the capture trigger compares every column
of an updated row and stamps the changed ones in row_version.column_versions) against its parent
9286fbf, but any two source trees work (--before-src, --after-src: directories holding the
`pgconcord` package, e.g. a git worktree's src/ or `git archive REV src/pgconcord | tar -x`).

One sandbox server (fsync on). Each version's `install.setup` runs in a child process with that
version's directory first on PYTHONPATH (the child prints which package it loaded, and the script
checks the catalog version each one installed), on a two-node config whose second node is an
idle database of the same server: capture triggers installed, no agent running (as
overhead.py's `capture_only`). Workloads:

  tpcb  pgbench tpcb-like, --scale, pgbench_history with a primary key `hid bigserial`;
  wide  a table of 20 non-key columns of mixed types (integer, bigint, numeric, text,
        timestamptz, boolean, date, jsonb) and --wide-rows rows; each transaction is one
        `UPDATE wide SET i1 = i1 + 1 WHERE id = :id` (random id): the case where comparing every
        column of the row costs the most relative to the work of the statement;
  widebatch  (not run by default) the same table, each transaction one UPDATE of i1 on
        --batch-rows consecutive rows (each client in its own slice of the table, so they never
        wait for each other's locks): the per-row cost of the trigger with the commit amortized.

Every round and workload gets fresh databases (bare, before, after, from one template; so every
system starts with an empty row_version and change_log), a checkpoint before each run, and runs
the three systems in an order rotating from round to round. Reported: TPS per round, median,
ratio to bare (median and min-max of the per-round ratios), after/before likewise.

    python bench/column_merge_cost.py --before-src DIR [--after-src DIR] [--rounds 6]
        [--seconds 20] [--clients 4] [--scale 10] [--wide-rows 100000] [--workloads tpcb,wide]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common
from common import progress

from pgconcord.sandbox import Server

BARE, BEFORE, AFTER = "bare", "before", "after"
SYSTEMS = (BARE, BEFORE, AFTER)
WORKLOADS = ("tpcb", "wide", "widebatch")
DEFAULT_WORKLOADS = ("tpcb", "wide")
TEMPLATE = {"tpcb": "tpcb", "wide": "wide", "widebatch": "wide"}

WIDE_COLUMNS = (
    [f"i{n} integer NOT NULL DEFAULT 0" for n in range(1, 7)]
    + [f"b{n} bigint NOT NULL DEFAULT 0" for n in range(1, 3)]
    + [f"n{n} numeric(12,2) NOT NULL DEFAULT 0" for n in range(1, 4)]
    + [f"t{n} text" for n in range(1, 5)]
    + [f"ts{n} timestamptz" for n in range(1, 3)]
    + ["flag boolean", "d1 date", "j jsonb"]
)
assert len(WIDE_COLUMNS) == 20

WIDE_SCRIPT = "\\set id random(1, {rows})\nUPDATE wide SET i1 = i1 + 1 WHERE id = :id;\n"
BATCH_SCRIPT = (
    "\\set start :client_id * {slice} + random(1, {slice} - {batch} + 1)\n"
    "UPDATE wide SET i1 = i1 + 1 WHERE id BETWEEN :start AND :start + {batch} - 1;\n"
)

# Run in a child with one version's source first on PYTHONPATH: install capture as for a
# cluster of the two nodes, then say which package did it.
SETUP_CHILD = """
import sys
import pgconcord
from pgconcord import install
from pgconcord.config import parse_config
install.setup(parse_config(sys.stdin.read(), "bench"))
print(pgconcord.__file__)
"""


def run_setup(source: Path, config_text: str) -> str:
    environment = dict(os.environ)
    environment["PYTHONPATH"] = str(source)
    result = subprocess.run(
        [sys.executable, "-c", SETUP_CHILD],
        input=config_text,
        capture_output=True,
        text=True,
        env=environment,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"setup from {source} failed:\n{result.stderr.strip()}")
    loaded = Path(result.stdout.strip().splitlines()[-1]).resolve()
    if not loaded.is_relative_to(source.resolve()):
        raise RuntimeError(f"setup from {source} loaded pgconcord from {loaded}")
    return str(loaded.parent)


def source_catalog_version(source: Path) -> int:
    return max(
        int(path.name[:3]) for path in (source / "pgconcord" / "sql").glob("[0-9][0-9][0-9]_*.sql")
    )


def make_templates(server: Server, workloads: list[str], scale: int, wide_rows: int) -> None:
    for workload in sorted({TEMPLATE[w] for w in workloads}):
        if workload == "tpcb":
            progress(f"template tpcb: pgbench -i -s {scale}, + pgbench_history.hid")
            common.pgbench_database(server, "tpcb_template", scale)
            peer = common.pgbench_database(server, "tpcb_peer_template", 1)
            common.execute(peer, "VACUUM ANALYZE")
        else:
            progress(f"template wide: 20 columns, {wide_rows:,} rows")
            for name, rows in (("wide_template", wide_rows), ("wide_peer_template", 10)):
                dsn = server.create_database(name)
                common.execute(
                    dsn,
                    "CREATE TABLE wide (id integer PRIMARY KEY, " + ", ".join(WIDE_COLUMNS) + ")",
                    f"""INSERT INTO wide
                        SELECT g, g % 7, g % 11, g % 13, g % 17, g % 19, g % 23, g * 3, g * 5,
                               g / 7.0, g / 11.0, g / 13.0,
                               md5(g::text), 'customer ' || g, repeat('x', 40), NULL,
                               now() - g * interval '1 minute', NULL, g % 2 = 0,
                               date '2020-01-01' + g % 1000,
                               jsonb_build_object('tag', g % 5, 'note', 'row ' || g)
                        FROM generate_series(1, {rows}) AS g""",
                    "VACUUM ANALYZE wide",
                )
    for workload in {TEMPLATE[w] for w in workloads}:
        for name in (f"{workload}_template", f"{workload}_peer_template"):
            # No connection (autovacuum included) may hold a template while it is copied.
            common.execute(server.dsn(), f"ALTER DATABASE {name} ALLOW_CONNECTIONS false")


def create_database(server: Server, name: str, template: str) -> str:
    for attempt in range(20):
        try:
            return server.create_database(name, template=template)
        except Exception as error:  # a template briefly held by someone else
            if "being accessed by other users" not in str(error) or attempt == 19:
                raise
            time.sleep(0.5)
    raise AssertionError


def installed_state(dsn: str) -> tuple[int, bool]:
    """(catalog version, whether the trigger functions stamp column_versions)."""
    with common.connect(dsn) as connection:
        version = connection.execute("SELECT version FROM pgconcord.catalog_version").fetchone()
        stamps = connection.execute(
            "SELECT bool_or(prosrc LIKE '%column_versions%') FROM pg_proc p"
            " JOIN pg_namespace n ON n.oid = p.pronamespace"
            " WHERE n.nspname = 'pgconcord' AND p.prorettype = 'trigger'::regtype"
        ).fetchone()
    assert version is not None and stamps is not None
    return int(str(version[0])), bool(stamps[0])


def count(dsn: str, query: str) -> int:
    return int(common.scalar(dsn, query))


def main() -> int:
    parser = common.base_arguments(__doc__.splitlines()[0])
    parser.add_argument("--before-src", type=Path, required=True)
    parser.add_argument(
        "--after-src",
        type=Path,
        default=Path(__file__).resolve().parent.parent / "src",
        help="default: this checkout's src/ (uncommitted edits included)",
    )
    parser.add_argument("--rounds", type=int, help="rounds (default 6; quick 1)")
    parser.add_argument("--seconds", type=float, help="pgbench seconds per run (20; quick 5)")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--scale", type=int, default=10)
    parser.add_argument("--wide-rows", type=int, default=100_000)
    parser.add_argument("--batch-rows", type=int, default=100, help="rows per widebatch UPDATE")
    parser.add_argument(
        "--workloads",
        default=",".join(DEFAULT_WORKLOADS),
        help=f"comma-separated, of {', '.join(WORKLOADS)}",
    )
    arguments = parser.parse_args()
    rounds = arguments.rounds or (1 if arguments.quick else 6)
    seconds = arguments.seconds or (5 if arguments.quick else 20)
    workloads = [w for w in arguments.workloads.split(",") if w]
    for workload in workloads:
        if workload not in WORKLOADS:
            parser.error(f"unknown workload {workload!r} (known: {', '.join(WORKLOADS)})")
    sources = {BEFORE: arguments.before_src.resolve(), AFTER: arguments.after_src.resolve()}
    expected_version = {s: source_catalog_version(path) for s, path in sources.items()}

    load_at_start = common.load_note()
    progress("starting server (fsync on)")
    (server,) = common.start_servers(["colcost"], fsync=True)
    offsets = {server.name: common.log_size(server)}
    script_directory = Path(tempfile.mkdtemp(prefix="pgconcord-colcost-"))
    wide_script = script_directory / "wide_update.sql"
    wide_script.write_text(WIDE_SCRIPT.format(rows=arguments.wide_rows))
    batch_script = script_directory / "wide_batch_update.sql"
    batch_script.write_text(
        BATCH_SCRIPT.format(
            slice=arguments.wide_rows // arguments.clients, batch=arguments.batch_rows
        )
    )
    scripts = {"wide": ["-f", str(wide_script)], "widebatch": ["-f", str(batch_script)]}
    tps: dict[str, dict[str, list[float]]] = {w: {s: [] for s in SYSTEMS} for w in workloads}
    loads: list[str] = []
    loaded_from: dict[str, str] = {}
    notes: list[str] = []
    try:
        make_templates(server, workloads, arguments.scale, arguments.wide_rows)
        for round_number in range(rounds):
            loads.append(common.load_note())
            for workload in workloads:
                names = {s: f"{workload}_{s}_r{round_number + 1}" for s in SYSTEMS}
                for system in SYSTEMS:
                    create_database(server, names[system], f"{TEMPLATE[workload]}_template")
                for system in (BEFORE, AFTER):
                    peer = names[system] + "_peer"
                    create_database(server, peer, f"{TEMPLATE[workload]}_peer_template")
                    config = common.concord_config_text(
                        [("a", server.dsn(names[system])), ("b", server.dsn(peer))]
                    )
                    loaded_from[system] = run_setup(sources[system], config)
                    version, stamps = installed_state(server.dsn(names[system]))
                    if version != expected_version[system]:
                        raise RuntimeError(
                            f"{system}: catalog version {version} installed,"
                            f" {expected_version[system]} expected from {sources[system]}"
                        )
                    if round_number == 0:
                        notes.append(
                            f"{workload}/{system}: catalog version {version}, trigger stamps"
                            f" column_versions: {stamps}"
                        )
                shift = round_number % len(SYSTEMS)
                order = list(SYSTEMS[shift:] + SYSTEMS[:shift])
                for system in order:
                    dsn = server.dsn(names[system])
                    common.checkpoint(server)
                    extra = scripts.get(workload, [])
                    command = common.pgbench_command(
                        server,
                        names[system],
                        clients=arguments.clients,
                        seconds=seconds,
                        extra=extra,
                    )
                    process = subprocess.Popen(
                        command,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE,
                        text=True,
                        env=common._client_environment(),
                    )
                    result = common.pgbench_finish(process)
                    tps[workload][system].append(result.tps)
                    line = (
                        f"round {round_number + 1} {workload:4s} {system:6s} {result.tps:8.1f} TPS"
                    )
                    if system != BARE:
                        changes = count(dsn, "SELECT count(*) FROM pgconcord.change_log")
                        versions = count(dsn, "SELECT count(*) FROM pgconcord.row_version")
                        line += f" (change_log {changes:,}, row_version {versions:,})"
                    progress(line)
                for system in SYSTEMS:
                    server.drop_database(names[system])
                    if system != BARE:
                        server.drop_database(names[system] + "_peer")
        report(arguments, rounds, seconds, workloads, tps, loads)
        print()
        for system in (BEFORE, AFTER):
            print(f"{system}: setup ran pgconcord from {loaded_from.get(system)}")
        for note in notes:
            print(f"  {note}")
        common.report_server_logs([server], offsets)
        print(f"\nat the end: {common.load_note()} (at the start: {load_at_start})")
    finally:
        server.cleanup()
    return 0


def report(
    arguments: argparse.Namespace,
    rounds: int,
    seconds: float,
    workloads: list[str],
    tps: dict[str, dict[str, list[float]]],
    loads: list[str],
) -> None:
    med = common.median
    print(
        f"\n=== capture cost, before vs after: {arguments.clients} clients, {rounds} round(s)"
        f" x {seconds:.0f} s, fsync on, capture installed without an agent ==="
    )
    for workload in workloads:
        title = {
            "tpcb": f"pgbench tpcb-like, scale {arguments.scale}",
            "wide": f"wide: UPDATE of 1 of 20 columns by key, {arguments.wide_rows:,} rows",
            "widebatch": f"widebatch: UPDATE of 1 of 20 columns on {arguments.batch_rows} rows"
            " per transaction (TPS x rows = rows/s)",
        }[workload]
        headers = [
            "system",
            *[f"r{i + 1}" for i in range(rounds)],
            "median TPS",
            "ratio",
            "ratio min",
            "ratio max",
        ]
        rows = []
        runs = tps[workload]
        for system in SYSTEMS:
            ratios = [x / y for x, y in zip(runs[system], runs[BARE], strict=True)]
            rows.append(
                [system, *runs[system], med(runs[system]), med(ratios), min(ratios), max(ratios)]
            )
        ratios = [x / y for x, y in zip(runs[AFTER], runs[BEFORE], strict=True)]
        rows.append(["after/before", *ratios, "", med(ratios), min(ratios), max(ratios)])
        common.print_table(
            f"{title} (ratio = per-round TPS / bare TPS of the same round; median, min, max)",
            headers,
            rows,
        )
    print("\nload at the start of each round:")
    for index, load in enumerate(loads):
        print(f"  r{index + 1}: {load}")
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
