"""What capture costs the writer, for the capture designs of issue 9: pgbench (tpcb-like) on one
server, in databases that differ only in what runs inside the user's transaction:

  bare              nothing (the reference);
  today             pgconcord's capture as `setup` installs it (row triggers that upsert
                    pgconcord.row_version and append to pgconcord.change_log);
  today_wall_clock  the same with a clock_now() that reads no table (the wall clock alone);
  append_row        a prototype: a row trigger per table that only appends the raw change (key,
                    row, changed columns, a node-wide hybrid clock) to one log table, no read
                    of any other table and no upsert: row versions would be derived later,
                    off the user's transaction;
  append_row_stamped  append_row, plus what it defers: a session (as an agent would)
                    that every 20 ms (--stamp-interval) derives, set-wise for the changes
                    committed since its last round, each change's clock and the version it
                    replaced, and upserts the rows' versions (clock, deleted, column map); its
                    CPU is added to the writer's, since on one machine it is paid all the same;
  append_statement  the same append, once per statement, from transition tables.

No agent runs: this is the writer's side alone (no apply; the deferred stamping only in
append_row_stamped). Reported per database: TPS (median of rounds, the order rotating) and
the CPU seconds the client backends (and the stamper) spent per 1,000 transactions, each as a
ratio to bare.

    python bench/capture_options.py [--rounds N] [--seconds S] [--clients C]
"""

from __future__ import annotations

import sys
import threading

import common
import psycopg
from common import APP_BACKENDS, PGCONCORD_SESSIONS, CpuSampler, progress

BARE, TODAY, APPEND_ROW, APPEND_STATEMENT = "bare", "today", "append_row", "append_statement"
TODAY_WALL_CLOCK, STAMPED = "today_wall_clock", "append_row_stamped"
SYSTEMS = (BARE, TODAY, TODAY_WALL_CLOCK, APPEND_ROW, STAMPED, APPEND_STATEMENT)
# pgbench's tables with their keys; pgbench_history's key is the hid added by pgbench_database.
TABLES = {
    "pgbench_accounts": "aid",
    "pgbench_tellers": "tid",
    "pgbench_branches": "bid",
    "pgbench_history": "hid",
}

_LOG = """
CREATE SCHEMA proto;
CREATE TABLE proto.raw_change (
    id bigserial NOT NULL,
    txid xid8 NOT NULL DEFAULT pg_current_xact_id(),
    table_id integer NOT NULL,
    operation "char" NOT NULL,
    row_key jsonb NOT NULL,
    clock bigint NOT NULL,
    new_row jsonb,
    changed text[]
);
CREATE INDEX raw_change_txid ON proto.raw_change (txid);
-- The node-wide hybrid clock: applying a peer's change would push it past that change's clock.
CREATE SEQUENCE proto.hybrid_clock;
CREATE FUNCTION proto.clock_now() RETURNS bigint LANGUAGE sql VOLATILE AS $$
    SELECT greatest((extract(epoch FROM clock_timestamp()) * 1000000)::bigint,
                    pg_sequence_last_value('proto.hybrid_clock'::regclass) + 1)
$$;
"""


# The deferred half of a cheap capture, set-wise: for the changes committed since the last
# round (a snapshot window, as the reader's), each change's final clock (one past the row's
# latest version, as the trigger's hybrid clock does today: c_i = max(raw_i, c_(i-1) + 1),
# which is i + max over j <= i of (raw_j - j)), the version it replaced, and the rows' new
# versions with their column maps. What it leaves out: per-change column maps inside a batch
# (only each row's last change gets one) and order keys.
_STAMPER = """
CREATE TABLE proto.row_version (
    table_id integer NOT NULL, row_key jsonb NOT NULL, clock bigint NOT NULL,
    deleted boolean NOT NULL, column_versions jsonb, last_clock bigint,
    PRIMARY KEY (table_id, row_key));
CREATE TABLE proto.stamp (change_id bigint PRIMARY KEY, clock bigint NOT NULL,
                          previous_clock bigint);
CREATE TABLE proto.stamped (singleton boolean PRIMARY KEY, through pg_snapshot NOT NULL);
INSERT INTO proto.stamped VALUES (true, pg_current_snapshot());
CREATE FUNCTION proto.stamp() RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    previous pg_snapshot;
    now_snapshot pg_snapshot := pg_current_snapshot();
    stamped bigint;
BEGIN
    SELECT through INTO previous FROM proto.stamped FOR UPDATE;
    WITH batch AS MATERIALIZED (
        SELECT c.id, c.table_id, c.row_key, c.operation, c.clock, c.changed,
               row_number() OVER w AS n
          FROM proto.raw_change c
         WHERE c.txid >= pg_snapshot_xmin(previous) AND c.txid < pg_snapshot_xmax(now_snapshot)
           AND pg_visible_in_snapshot(c.txid, now_snapshot)
           AND NOT pg_visible_in_snapshot(c.txid, previous)
        WINDOW w AS (PARTITION BY c.table_id, c.row_key ORDER BY c.id)),
    versioned AS MATERIALIZED (
        SELECT b.*, coalesce(v.last_clock, v.clock) AS version_clock,
               greatest(max(b.clock - b.n) OVER w + b.n,
                        coalesce(v.last_clock, v.clock, 0) + b.n) AS final_clock
          FROM batch b
          LEFT JOIN proto.row_version v ON v.table_id = b.table_id AND v.row_key = b.row_key
        WINDOW w AS (PARTITION BY b.table_id, b.row_key ORDER BY b.id
                     ROWS UNBOUNDED PRECEDING)),
    stamps AS (
        INSERT INTO proto.stamp
        SELECT id, final_clock, coalesce(lag(final_clock) OVER w, version_clock)
          FROM versioned WINDOW w AS (PARTITION BY table_id, row_key ORDER BY id)
        RETURNING 1),
    column_maps AS (
        SELECT table_id, row_key, jsonb_object_agg(name, version) AS column_versions
          FROM (SELECT x.table_id, x.row_key, changed.name,
                       max(lpad(to_hex(x.final_clock), 16, '0') || 'a') AS version
                  FROM versioned x, unnest(x.changed) AS changed(name)
                 GROUP BY x.table_id, x.row_key, changed.name) AS columns
         GROUP BY table_id, row_key),
    last AS (
        SELECT DISTINCT ON (l.table_id, l.row_key) l.table_id, l.row_key, l.operation,
               l.final_clock, m.column_versions
          FROM versioned l
          LEFT JOIN column_maps m ON m.table_id = l.table_id AND m.row_key = l.row_key
         ORDER BY l.table_id, l.row_key, l.id DESC),
    upserted AS (
        INSERT INTO proto.row_version AS v
            (table_id, row_key, clock, deleted, column_versions, last_clock)
        SELECT table_id, row_key, final_clock, operation = 'D', column_versions, final_clock
          FROM last
        ON CONFLICT (table_id, row_key) DO UPDATE
           SET clock = CASE WHEN v.deleted OR excluded.deleted THEN excluded.clock
                            ELSE v.clock END,
               deleted = excluded.deleted, last_clock = excluded.last_clock,
               column_versions = CASE WHEN excluded.deleted THEN NULL
                                      ELSE coalesce(v.column_versions, '{}')
                                           || coalesce(excluded.column_versions, '{}') END
        RETURNING 1)
    SELECT (SELECT count(*) FROM stamps) + 0 * (SELECT count(*) FROM upserted) INTO stamped;
    UPDATE proto.stamped SET through = now_snapshot;
    RETURN stamped;
END $$;
"""


def _stamp_until(dsn: str, stop: threading.Event, interval: float) -> None:
    """The deferred half beside pgbench, as an agent's session (application_name pgconcord,
    so the CPU sampler counts it apart), then once more for what the last round left."""
    with psycopg.connect(dsn, autocommit=True, application_name="pgconcord") as connection:
        while not stop.wait(interval):
            connection.execute("SELECT proto.stamp()")
        connection.execute("SELECT proto.stamp()")


def _changed(columns: list[str], key: str) -> str:
    """The array of the names of columns an update changed (OLD/NEW of a row trigger)."""
    tests = [f"CASE WHEN o.{c} IS DISTINCT FROM n.{c} THEN '{c}' END" for c in columns if c != key]
    return f"array_remove(ARRAY[{', '.join(tests)}]::text[], NULL)"


def _append_row(table_id: int, table: str, key: str, columns: list[str]) -> str:
    changed = _changed(columns, key).replace("o.", "OLD.").replace("n.", "NEW.")
    return f"""
CREATE FUNCTION proto.capture_{table}() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        INSERT INTO proto.raw_change (table_id, operation, row_key, clock)
        VALUES ({table_id}, 'D', jsonb_build_object('{key}', OLD.{key}), proto.clock_now());
    ELSIF TG_OP = 'UPDATE' THEN
        INSERT INTO proto.raw_change (table_id, operation, row_key, clock, new_row, changed)
        VALUES ({table_id}, 'U', jsonb_build_object('{key}', NEW.{key}), proto.clock_now(),
                to_jsonb(NEW), {changed});
    ELSE
        INSERT INTO proto.raw_change (table_id, operation, row_key, clock, new_row)
        VALUES ({table_id}, 'I', jsonb_build_object('{key}', NEW.{key}), proto.clock_now(),
                to_jsonb(NEW));
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER capture AFTER INSERT OR UPDATE OR DELETE ON {table}
    FOR EACH ROW EXECUTE FUNCTION proto.capture_{table}();
"""


def _append_statement(table_id: int, table: str, key: str, columns: list[str]) -> str:
    def function(operation: str, body: str) -> str:
        return f"""
CREATE FUNCTION proto.capture_{operation}_{table}() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    {body};
    RETURN NULL;
END $$;
"""

    insert = (
        "INSERT INTO proto.raw_change (table_id, operation, row_key, clock, new_row)"
        f" SELECT {table_id}, 'I', jsonb_build_object('{key}', n.{key}), proto.clock_now(),"
        " to_jsonb(n) FROM new_rows n"
    )
    update = (
        "INSERT INTO proto.raw_change (table_id, operation, row_key, clock, new_row, changed)"
        f" SELECT {table_id}, 'U', jsonb_build_object('{key}', n.{key}), proto.clock_now(),"
        f" to_jsonb(n), {_changed(columns, key)} FROM new_rows n JOIN old_rows o USING ({key})"
    )
    delete = (
        "INSERT INTO proto.raw_change (table_id, operation, row_key, clock)"
        f" SELECT {table_id}, 'D', jsonb_build_object('{key}', o.{key}), proto.clock_now()"
        " FROM old_rows o"
    )
    return (
        function("insert", insert)
        + function("update", update)
        + function("delete", delete)
        + f"""
CREATE TRIGGER capture_insert AFTER INSERT ON {table} REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION proto.capture_insert_{table}();
CREATE TRIGGER capture_update AFTER UPDATE ON {table}
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION proto.capture_update_{table}();
CREATE TRIGGER capture_delete AFTER DELETE ON {table} REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION proto.capture_delete_{table}();
"""
    )


def _install_prototype(dsn: str, make: object) -> None:
    assert callable(make)
    statements = [_LOG]
    for table_id, (table, key) in enumerate(TABLES.items(), start=1):
        columns = [
            str(row[0])
            for row in common.connect(dsn)
            .execute(
                "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0"
                " AND NOT attisdropped ORDER BY attnum",
                (table,),
            )
            .fetchall()
        ]
        statements.append(make(table_id, table, key, columns))
    common.execute(dsn, *statements)


def main() -> int:
    parser = common.base_arguments(__doc__ or "")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--scale", type=int, default=10)
    parser.add_argument(
        "--stamp-interval",
        type=float,
        default=0.02,
        help="seconds between the stamper's rounds in append_row_stamped (default 0.02)",
    )
    arguments = parser.parse_args()
    load_at_start = common.load_note()
    progress("starting a server (fsync on)")
    (server,) = common.start_servers(["capture-options"], fsync=True)
    try:
        common.pgbench_database(server, "template_bench", arguments.scale)
        for system in (*SYSTEMS, f"{TODAY}_peer", f"{TODAY_WALL_CLOCK}_peer"):
            server.create_database(system, template="template_bench")
        # pgconcord's capture as for a cluster of two databases; no agent ever runs.
        for system in (TODAY, TODAY_WALL_CLOCK):
            common.concord_setup(
                common.concord_config_text(
                    [("a", server.dsn(system)), ("b", server.dsn(f"{system}_peer"))]
                )
            )
        common.execute(
            server.dsn(TODAY_WALL_CLOCK),
            "CREATE OR REPLACE FUNCTION pgconcord.clock_now() RETURNS bigint LANGUAGE sql"
            " VOLATILE AS $$ SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::bigint $$",
        )
        _install_prototype(server.dsn(APPEND_ROW), _append_row)
        _install_prototype(server.dsn(APPEND_STATEMENT), _append_statement)
        _install_prototype(server.dsn(STAMPED), _append_row)
        common.execute(server.dsn(STAMPED), _STAMPER)
        tps: dict[str, list[float]] = {system: [] for system in SYSTEMS}
        cpu: dict[str, list[float]] = {system: [] for system in SYSTEMS}
        with CpuSampler() as sampler:
            sampler.add_server("server", server)
            for round_number in range(arguments.rounds):
                shift = round_number % len(SYSTEMS)
                order = SYSTEMS[shift:] + SYSTEMS[:shift]
                for system in order:
                    common.execute(server.dsn(system), *[f"VACUUM {table}" for table in TABLES])
                    common.checkpoint(server)
                    before = sampler.snapshot()
                    stop = threading.Event()
                    stamper = threading.Thread(
                        target=_stamp_until,
                        args=(server.dsn(system), stop, arguments.stamp_interval),
                        daemon=True,
                    )
                    if system == STAMPED:
                        stamper.start()
                    result = common.pgbench_run(
                        server, system, clients=arguments.clients, seconds=arguments.seconds
                    )
                    stop.set()
                    if system == STAMPED:
                        stamper.join()
                    delta = sampler.snapshot() - before
                    spent = delta.get("server", APP_BACKENDS) + delta.get(
                        "server", PGCONCORD_SESSIONS
                    )
                    tps[system].append(result.tps)
                    cpu[system].append(1000 * spent / max(1, result.transactions))
                    progress(
                        f"round {round_number + 1} {system}: {result.tps:.0f} tps,"
                        f" {cpu[system][-1]:.3f} CPU s per 1,000 transactions"
                    )
        bare_tps, bare_cpu = common.median(tps[BARE]), common.median(cpu[BARE])
        common.print_table(
            f"Capture cost on the writer (pgbench -c {arguments.clients}, scale {arguments.scale},"
            f" {arguments.rounds} x {arguments.seconds:g} s; {load_at_start})",
            ["database", "TPS", "/ bare", "backend CPU s per 1,000 tx", "/ bare"],
            [
                [
                    system,
                    f"{common.median(tps[system]):.0f}",
                    f"{common.median(tps[system]) / bare_tps:.2f}",
                    f"{common.median(cpu[system]):.3f}",
                    f"{common.median(cpu[system]) / bare_cpu:.2f}",
                ]
                for system in SYSTEMS
            ],
        )
        stamps, changes = (
            common.scalar(server.dsn(STAMPED), f"SELECT count(*) FROM proto.{name}")
            for name in ("stamp", "raw_change")
        )
        print(
            f"{STAMPED}: {stamps:,} of {changes:,} changes stamped (stamper every"
            f" {arguments.stamp_interval:g} s)"
        )
        print(f"load at the end: {common.load_note()}")
    finally:
        server.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
