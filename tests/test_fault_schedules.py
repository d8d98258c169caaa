"""Randomized fault schedules on three nodes whose PostgreSQL servers are their own.

A schedule (a Hypothesis state machine) mixes, on random nodes: transactions of conflicting
writes on a few shared keys, of rows only their own node writes (a journal row per
transaction, "private" rows, ledger entries), and of increments of a counter column
(delta_columns); transactions rolled back or failing; syncs of one origin into one target over
links that go down and up; purges; agents run for a moment and killed with SIGKILL, sometimes
while a server crashes; PostgreSQL crashes and restarts. At the end everything heals, a sync
of every pair and then `pgconcord sync` run, and then every node must hold the same data,
every journal row, private row and ledger entry as its origin has it, and balances equal to
the initial ones plus every increment that survived at its origin.

The servers run with the sandbox's synchronous_commit = off and with wal_writer_delay = 10s,
so that a crash loses the asynchronous commits of the last seconds, and the record of recently
rolled-back transactions. After each crash the model reads what survived at the crashed node
(a prefix of its unconfirmed commits, in WAL order; a commit made with synchronous_commit = on
is durable, and so is everything its node committed before it) and holds every node to that:
a commit its origin lost must not live on elsewhere, as PostgreSQL's own replication only ever
sends what its origin has flushed.

For a long run by hand: PGCONCORD_SOAK_EXAMPLES=200 PGCONCORD_SOAK_STEPS=40 python -m pytest
-s tests/test_fault_schedules.py -k converge (PGCONCORD_SOAK_SHRINK=1 to shrink a failure).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import NODES_PER_CLUSTER, available_postgres_binaries
from harness import Cluster
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    precondition,
    rule,
    run_state_machine_as_test,
)
from psycopg import errors as pg_errors

from pgconcord.agent import purge as purge_changes
from pgconcord.agent import sync as sync_every_pair
from pgconcord.sandbox import Server

CAPTURE_MODES = ("trigger", "wal")

NODES = ("north", "south", "east")
LINKS = (("north", "south"), ("east", "north"), ("east", "south"))  # sorted pairs
ORDERED_PAIRS = tuple((origin, target) for origin in NODES for target in NODES if origin != target)
ACCOUNTS = (1, 2, 3)
INITIAL_BALANCE = Decimal("1000.00")

SCHEMA = """
CREATE TABLE shared (id int PRIMARY KEY, value int, writer text);
CREATE TABLE journal (node text, n int, PRIMARY KEY (node, n));
CREATE TABLE private (node text, n int, value int NOT NULL, PRIMARY KEY (node, n));
CREATE TABLE ledger (node text, n int, account int NOT NULL, amount numeric(12, 2) NOT NULL,
                     PRIMARY KEY (node, n));
CREATE TABLE accounts (id int PRIMARY KEY, owner text, balance numeric(12, 2) NOT NULL);
INSERT INTO accounts SELECT g, 'owner ' || g, 1000 FROM generate_series(1, 3) g;
"""
COUNTERS = '[conflict.table."public.accounts"]\ndelta_columns = ["balance"]\n'
SERVER_SETTINGS = {"wal_writer_delay": "10s"}

CI_EXAMPLES = 12
CI_STEPS = 16
AGENTS_PER_SCHEDULE = 3  # each costs seconds
EXAMPLES = int(os.environ.get("PGCONCORD_SOAK_EXAMPLES", CI_EXAMPLES))
# WAL mode's schedules are slower (a drain waits while the flushed WAL ends inside a record:
# README "Limits today"): fewer of them in CI.
WAL_EXAMPLES = int(os.environ.get("PGCONCORD_SOAK_EXAMPLES", CI_EXAMPLES // 2))
STEPS = int(os.environ.get("PGCONCORD_SOAK_STEPS", CI_STEPS))
SHRINK = os.environ.get("PGCONCORD_SOAK_SHRINK") == "1"

# What the schedules did, over the whole run: printed at the end of the test.
TALLY: Counter[str] = Counter()


# -- operations -----------------------------------------------------------------------------

SHARED_KEYS = st.integers(1, 6)
operation = st.one_of(
    st.tuples(st.just("upsert"), SHARED_KEYS, st.integers(0, 999)),
    st.tuples(st.just("update"), SHARED_KEYS, st.integers(0, 999)),
    # One column only: concurrent ones on other columns of the row merge (column-level).
    st.tuples(st.just("update_value"), SHARED_KEYS, st.integers(0, 999)),
    st.tuples(st.just("sign"), SHARED_KEYS),
    st.tuples(st.just("delete"), SHARED_KEYS),
    st.tuples(st.just("move"), SHARED_KEYS, SHARED_KEYS),
    st.tuples(st.just("insert_private"), st.integers(0, 999)),
    st.tuples(st.just("update_private"), st.integers(0, 99), st.integers(0, 999)),
    st.tuples(st.just("delete_private"), st.integers(0, 99)),
    st.tuples(st.just("increment"), st.sampled_from(ACCOUNTS), st.integers(-5000, 5000)),
    st.tuples(st.just("increment_and_rename"), st.sampled_from(ACCOUNTS), st.integers(-999, 999)),
)
operations = st.lists(operation, min_size=1, max_size=4)
# commit: durable (synchronous_commit = on) or not; rollback; error: a statement fails.
OUTCOMES = st.sampled_from(
    ("commit", "commit", "async_commit", "async_commit", "rollback", "error")
)
transaction = st.tuples(st.sampled_from(NODES), operations, OUTCOMES)


@dataclass(frozen=True)
class Owned:
    """The rows one node alone writes: one journal row per transaction, private rows
    (n, value) and ledger entries (n, account, amount)."""

    journal: tuple[int, ...] = ()
    private: tuple[tuple[int, int], ...] = ()
    ledger: tuple[tuple[int, int, Decimal], ...] = ()  # (n, account, amount)


@dataclass
class Unconfirmed:
    state: Owned  # the node's own rows after this commit
    seen_by_peers: bool = False  # a pull or an agent read the node after this commit


@dataclass
class NodeModel:
    confirmed: Owned = field(default_factory=Owned)  # survives any crash
    unconfirmed: list[Unconfirmed] = field(default_factory=list)  # in commit order
    counter: int = 0  # keys of private rows and ledger entries, never reused

    @property
    def current(self) -> Owned:
        return self.unconfirmed[-1].state if self.unconfirmed else self.confirmed


def read_owned(connection: psycopg.Connection[Any], node: str) -> Owned:
    journal = connection.execute(
        "SELECT n FROM journal WHERE node = %s ORDER BY n", (node,)
    ).fetchall()
    private = connection.execute(
        "SELECT n, value FROM private WHERE node = %s ORDER BY n", (node,)
    ).fetchall()
    ledger = connection.execute(
        "SELECT n, account, amount FROM ledger WHERE node = %s ORDER BY n", (node,)
    ).fetchall()
    return Owned(
        tuple(int(n) for (n,) in journal),
        tuple((int(n), int(value)) for n, value in private),
        tuple((int(n), int(account), Decimal(amount)) for n, account, amount in ledger),
    )


# -- the state machine ----------------------------------------------------------------------


class FaultSchedule(RuleBasedStateMachine):
    """One schedule: a fresh database on each of the three servers, random steps, final checks."""

    servers: list[Server]
    directory: Path
    capture = "trigger"

    def __init__(self) -> None:
        super().__init__()
        self.broken = False
        self.events: list[str] = []
        self.hazards: list[str] = []
        self.down: set[tuple[str, str]] = set()
        self.model = {name: NodeModel() for name in NODES}
        TALLY["schedules started"] += 1
        self.cluster = Cluster(self.servers, self.directory, SCHEMA, capture=self.capture)
        assert tuple(self.cluster.names) == NODES
        self.cluster.write_config(COUNTERS)
        self.cluster.setup()
        self.agent_log = self.directory / f"{self.cluster.database}-agent.log"
        self.agents = 0
        self.full_syncs = 0

    # -- bookkeeping ---------------------------------------------------------------------

    def note(self, event: str) -> None:
        self.events.append(event)
        TALLY["steps"] += 1

    def seen(self, origins: list[str]) -> None:
        """Peers may have read everything these origins committed so far."""
        for origin in origins:
            for entry in self.model[origin].unconfirmed:
                entry.seen_by_peers = True

    def after_restart(self, node: str) -> None:
        """What survived at a crashed node is a prefix of its unconfirmed commits."""
        model = self.model[node]
        with self.cluster.connect(node) as connection:
            survived = read_owned(connection, node)
        candidates = [model.confirmed] + [entry.state for entry in model.unconfirmed]
        kept = max((i for i, state in enumerate(candidates) if state == survived), default=None)
        assert kept is not None, (
            f"after the crash of {node} its own rows are no state it ever committed: "
            f"{survived} (durable: {model.confirmed}, then {len(model.unconfirmed)} more)"
        )
        lost = model.unconfirmed[kept:]
        if lost:
            TALLY["commits lost in crashes"] += len(lost)
            self.events.append(f"  {node} lost its last {len(lost)} unconfirmed commits")
        if any(entry.seen_by_peers for entry in lost):
            TALLY["lost commits peers may have read"] += 1
            self.hazards.append(
                f"{node} lost commits in a crash after a peer may have read them"
                f" (event {len(self.events)})"
            )
        model.confirmed, model.unconfirmed = survived, []

    # -- writes --------------------------------------------------------------------------

    def write(self, node: str, ops: list[tuple[Any, ...]], outcome: str) -> None:
        if self.capture == "wal" and outcome == "async_commit":
            # WAL capture reads only flushed WAL, and a local write committed asynchronously
            # just before an apply of its row is overwritten unjudged (README "Limits today").
            outcome = "commit"
        model = self.model[node]
        journal = list(model.current.journal)
        private = dict(model.current.private)
        ledger = {n: (account, amount) for n, account, amount in model.current.ledger}
        counter = model.counter
        try:
            with self.cluster.connect(node, autocommit=False) as connection:
                connection.execute(
                    "SET LOCAL synchronous_commit = "
                    + ("off" if outcome == "async_commit" else "on")
                )
                # Every transaction writes a row of its own, so that it has a transaction id
                # and the model can tell after a crash whether it survived.
                counter += 1
                connection.execute("INSERT INTO journal VALUES (%s, %s)", (node, counter))
                journal.append(counter)
                for op in ops:
                    counter = self.execute_op(connection, node, op, private, ledger, counter)
                if outcome == "error":
                    connection.execute("SELECT 1 / 0")
                if outcome == "rollback":
                    connection.rollback()
                else:
                    connection.commit()
        except pg_errors.DivisionByZero:
            assert outcome == "error"
        except (
            pg_errors.DeadlockDetected,
            pg_errors.UniqueViolation,
            pg_errors.SerializationFailure,
        ) as error:  # only while an agent applies at the same time
            self.events.append(f"  failed: {type(error).__name__}")
            TALLY["transactions failed"] += 1
            model.counter = counter
            return
        model.counter = counter  # keys are never reused, even those rolled back
        TALLY[f"transactions {outcome}"] += 1
        if outcome not in ("commit", "async_commit"):
            return
        state = Owned(
            tuple(journal),
            tuple(sorted(private.items())),
            tuple(sorted((n, account, amount) for n, (account, amount) in ledger.items())),
        )
        if outcome == "commit":
            model.confirmed, model.unconfirmed = state, []
        else:
            model.unconfirmed.append(Unconfirmed(state))

    @staticmethod
    def execute_op(
        connection: psycopg.Connection[Any],
        node: str,
        op: tuple[Any, ...],
        private: dict[int, int],
        ledger: dict[int, tuple[int, Decimal]],
        counter: int,
    ) -> int:
        kind = op[0]
        if kind == "upsert":
            connection.execute(
                "INSERT INTO shared VALUES (%s, %s, %s) ON CONFLICT (id)"
                " DO UPDATE SET value = excluded.value, writer = excluded.writer",
                (op[1], op[2], node),
            )
        elif kind == "update":
            connection.execute(
                "UPDATE shared SET value = %s, writer = %s WHERE id = %s", (op[2], node, op[1])
            )
        elif kind == "update_value":
            connection.execute("UPDATE shared SET value = %s WHERE id = %s", (op[2], op[1]))
        elif kind == "sign":
            connection.execute("UPDATE shared SET writer = %s WHERE id = %s", (node, op[1]))
        elif kind == "delete":
            connection.execute("DELETE FROM shared WHERE id = %s", (op[1],))
        elif kind == "move":
            connection.execute(
                "UPDATE shared SET id = %s, writer = %s WHERE id = %s"
                " AND NOT EXISTS (SELECT 1 FROM shared WHERE id = %s)",
                (op[2] + 10, node, op[1], op[2] + 10),
            )
        elif kind == "insert_private":
            counter += 1
            connection.execute("INSERT INTO private VALUES (%s, %s, %s)", (node, counter, op[1]))
            private[counter] = op[1]
        elif kind in ("update_private", "delete_private") and private:
            n = sorted(private)[op[1] % len(private)]
            if kind == "update_private":
                cursor = connection.execute(
                    "UPDATE private SET value = %s WHERE node = %s AND n = %s", (op[2], node, n)
                )
                private[n] = op[2]
            else:
                cursor = connection.execute(
                    "DELETE FROM private WHERE node = %s AND n = %s", (node, n)
                )
                del private[n]
            # Nobody else writes these rows: the node always has its own rows as it left them.
            assert cursor.rowcount == 1, f"{node}'s private row {n} is missing on {node}"
        elif kind in ("increment", "increment_and_rename"):
            counter += 1
            amount = Decimal(op[2]) / 100
            connection.execute(
                "INSERT INTO ledger VALUES (%s, %s, %s, %s)", (node, counter, op[1], amount)
            )
            if kind == "increment":
                connection.execute(
                    "UPDATE accounts SET balance = balance + %s WHERE id = %s", (amount, op[1])
                )
            else:  # the owner column follows last-writer-wins, the balance adds up
                connection.execute(
                    "UPDATE accounts SET balance = balance + %s, owner = %s WHERE id = %s",
                    (amount, f"{node} {counter}", op[1]),
                )
            ledger[counter] = (op[1], amount)
        return counter

    # -- rules ---------------------------------------------------------------------------

    @rule(writes=st.lists(transaction, min_size=1, max_size=3))
    def transact(self, writes: list[tuple[str, list[tuple[Any, ...]], str]]) -> None:
        self.broken = True
        for node, ops, outcome in writes:
            self.note(f"{node}: {outcome} {ops}")
            self.write(node, ops, outcome)
        self.broken = False

    @rule(pairs=st.lists(st.sampled_from(ORDERED_PAIRS), min_size=1, max_size=4))
    def pull(self, pairs: list[tuple[str, str]]) -> None:
        self.broken = True
        for origin, target in pairs:
            if (min(origin, target), max(origin, target)) in self.down:
                self.note(f"pull {origin} -> {target}: link down, skipped")
                TALLY["pulls skipped (link down)"] += 1
                continue
            self.note(f"pull {origin} -> {target}")
            self.seen([origin])
            self.cluster.pull(origin, target)
            TALLY["pulls"] += 1
        self.broken = False

    @rule(link=st.sampled_from(LINKS))
    def link_down(self, link: tuple[str, str]) -> None:
        self.note(f"link {link[0]} - {link[1]} down")
        self.down.add(link)

    @rule(link=st.sampled_from(LINKS))
    def link_up(self, link: tuple[str, str]) -> None:
        self.note(f"link {link[0]} - {link[1]} up")
        self.down.discard(link)

    @rule(node=st.sampled_from(NODES), how=st.sampled_from(("crash", "crash", "crash", "stop")))
    def restart_server(self, node: str, how: str) -> None:
        self.note(f"{how} {node} and start it again")
        self.broken = True
        server = self.cluster.server_of[node]
        if how == "crash":
            server.crash()
        else:
            server.stop()
        server.start()
        TALLY[f"servers {'crashed' if how == 'crash' else 'stopped'}"] += 1
        self.after_restart(node)
        self.broken = False

    @rule(node=st.sampled_from(NODES))
    def purge(self, node: str) -> None:
        """What the agent does every few seconds: drop the changes every peer has."""
        self.note(f"purge {node}")
        self.broken = True
        config = self.cluster.config
        TALLY["changes purged"] += purge_changes(config, config.node_by_name(node))
        self.broken = False

    @precondition(lambda self: self.full_syncs < 1)
    @rule()
    def sync_everything(self) -> None:
        """A sync of every pair (and purge), as if every link came back for a moment."""
        self.note("sync of every pair")
        self.broken = True
        self.full_syncs += 1
        self.seen(list(NODES))
        report = sync_every_pair(self.cluster.config)
        assert report.ok, report
        TALLY["syncs of every pair"] += 1
        self.broken = False

    @precondition(lambda self: self.agents < AGENTS_PER_SCHEDULE)
    @rule(
        into=st.none() | st.sampled_from(NODES),
        first=st.floats(0.1, 1.2),
        then=st.floats(0.1, 1.2),
        writes=st.lists(transaction, max_size=3),
        crash=st.none() | st.sampled_from(NODES),
    )
    def agent(
        self,
        into: str | None,
        first: float,
        then: float,
        writes: list[tuple[str, list[tuple[Any, ...]], str]],
        crash: str | None,
    ) -> None:
        """An agent replicates every pair (or every pair into one node) for a moment, while
        the application writes and perhaps a server crashes, and is killed with SIGKILL."""
        self.note(
            f"agent {'--node ' + into if into else '(all nodes)'} for {first:.2f}+{then:.2f} s"
            f" with {len(writes)} transactions{f', {crash} crashing' if crash else ''}"
        )
        self.broken = True
        self.agents += 1
        arguments = ["run", "--config", str(self.cluster.config_path)]
        if into is not None:
            arguments += ["--node", into]
        origins = [name for name in NODES if name != into]
        with self.agent_log.open("ab") as log:
            log.write(f"-- agent run {self.agents}\n".encode())
            log.flush()
            process = subprocess.Popen(
                [sys.executable, "-m", "pgconcord", *arguments],
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        try:
            self.seen(origins)
            time.sleep(first)
            for node, ops, outcome in writes:
                self.events.append(f"  {node}: {outcome} {ops}")
                self.write(node, ops, outcome)
                self.seen(origins)
            if crash is not None:
                self.cluster.server_of[crash].crash()
                time.sleep(0.2)
                self.cluster.server_of[crash].start()
                TALLY["servers crashed under a running agent"] += 1
                self.after_restart(crash)
            time.sleep(then)
            exited = process.poll()
            assert exited is None, self.explain(
                f"the agent exited by itself with {exited}:\n{self.agent_log.read_text()[-3000:]}"
            )
        finally:
            if process.poll() is None:
                os.kill(process.pid, signal.SIGKILL)
            process.wait()
        self.seen(origins)
        TALLY["agents killed"] += 1
        output = self.agent_log.read_text().split(f"-- agent run {self.agents}\n")[-1]
        assert "unexpected error" not in output and "Traceback" not in output, self.explain(
            f"the agent failed:\n{output[-3000:]}"
        )
        self.broken = False

    # -- the end -------------------------------------------------------------------------

    def teardown(self) -> None:
        try:
            if not self.broken:
                self.heal_and_check()
                TALLY["schedules checked"] += 1
        finally:
            self.cluster.drop()

    def heal_and_check(self) -> None:
        self.down.clear()
        # The first sync in this process (what `pgconcord sync` runs, without the second of
        # a new interpreter and its imports), the second by the command itself.
        report = sync_every_pair(self.cluster.config)
        assert report.ok, self.explain(f"sync failed: {report}")
        result = self.cluster.cli("sync")
        assert result.returncode == 0, self.explain(f"sync failed: {result.stderr}")
        cluster = self.cluster
        expected_balances = {account: INITIAL_BALANCE for account in ACCOUNTS}
        for name in NODES:
            for _, account, amount in self.model[name].current.ledger:
                expected_balances[account] += amount
        for name in NODES:
            parked = cluster.admin_value(
                name, "SELECT count(*) FROM pgconcord.parked_change WHERE state = 'parked'"
            )
            assert parked == 0, self.explain(f"{name} has {parked} parked changes")
            with cluster.connect(name) as connection:
                for owner in NODES:
                    held = read_owned(connection, owner)
                    wanted = self.model[owner].current
                    assert held == wanted, self.explain(
                        f"{name} holds {owner}'s own rows as {held}, expected {wanted}"
                    )
                balances = dict(
                    connection.execute("SELECT id, balance FROM accounts ORDER BY id").fetchall()
                )
            assert balances == expected_balances, self.explain(
                f"balances on {name}: {balances}, expected {expected_balances}"
            )
        try:
            cluster.assert_identical()
        except AssertionError as error:
            raise AssertionError(self.explain(f"nodes differ: {error}")) from None

    def explain(self, problem: str) -> str:
        lines = [problem, "schedule:", *self.events]
        if self.hazards:
            lines += ["hazards:", *self.hazards]
        return "\n".join(lines)


# -- fixtures and tests ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def fault_servers() -> Iterator[list[Server]]:
    """Three servers of their own (the schedules crash them), started once for the module."""
    binaries = available_postgres_binaries()[0]
    servers = [
        Server(binaries, name=f"faults{index}", settings=SERVER_SETTINGS)
        for index in range(NODES_PER_CLUSTER)
    ]
    try:
        with ThreadPoolExecutor(max_workers=len(servers)) as pool:
            list(pool.map(Server.start, servers))
        yield servers
    finally:
        for server in servers:
            server.cleanup()


@pytest.fixture
def running_servers(fault_servers: list[Server]) -> list[Server]:
    for server in fault_servers:
        server.start()  # a failed test may have left one down
    return fault_servers


@pytest.mark.timeout(max(300, EXAMPLES * 60))
@pytest.mark.slow(seconds=100)
def test_fault_schedules_converge(
    running_servers: list[Server],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    capture_mode: str,
) -> None:
    TALLY.clear()
    FaultSchedule.capture = capture_mode

    def new_schedule() -> FaultSchedule:
        FaultSchedule.servers = running_servers
        FaultSchedule.directory = tmp_path
        return FaultSchedule()

    started = time.monotonic()
    try:
        run_state_machine_as_test(
            new_schedule,
            settings=settings(
                max_examples=WAL_EXAMPLES if capture_mode == "wal" else EXAMPLES,
                stateful_step_count=STEPS,
                deadline=None,
                suppress_health_check=list(HealthCheck),
                phases=[Phase.explicit, Phase.reuse, Phase.generate]
                + ([Phase.shrink] if SHRINK else []),
                print_blob=True,
            ),
        )
    finally:
        with capsys.disabled():
            print(
                f"\nfault schedules: {TALLY['schedules checked']} checked of"
                f" {TALLY['schedules started']} run in {time.monotonic() - started:.0f} s; "
                + ", ".join(
                    f"{count} {what}"
                    for what, count in sorted(TALLY.items())
                    if not what.startswith("schedules")
                )
            )
    assert TALLY["schedules checked"] == TALLY["schedules started"] >= 1


# -- the shortest schedules that failed -----------------------------------------------------


def commit(cluster: Cluster, node: str, statement: str, *, durable: bool = True) -> None:
    with cluster.connect(node, autocommit=False) as connection:
        connection.execute(f"SET LOCAL synchronous_commit = {'on' if durable else 'off'}")
        connection.execute(statement)


def private_rows(cluster: Cluster, node: str) -> list[tuple[Any, ...]]:
    return cluster.query(node, "SELECT node, n FROM private ORDER BY node, n")


def test_a_rolled_back_transaction_before_an_origin_crash_hides_no_later_change(
    running_servers: list[Server], tmp_path: Path, capture_mode: str
) -> None:
    """Every commit here is durable (synchronous_commit = on). A rolled-back transaction's
    transaction id is not made durable, so after a crash the origin hands it out again; a
    target that had read a snapshot past it must not take the new transaction as applied."""
    cluster = Cluster(running_servers, tmp_path, SCHEMA, capture=capture_mode)
    try:
        cluster.setup()
        commit(cluster, "north", "INSERT INTO private VALUES ('north', 1, 0)")
        with cluster.connect("north", autocommit=False) as connection:
            connection.execute("INSERT INTO private VALUES ('north', 2, 0)")
            connection.rollback()
        cluster.pull("north", "south")
        cluster.server_of["north"].crash()
        cluster.server_of["north"].start()
        commit(cluster, "north", "INSERT INTO private VALUES ('north', 3, 0)")
        cluster.sync()
        assert private_rows(cluster, "south") == [("north", 1), ("north", 3)]
        cluster.assert_identical()
    finally:
        cluster.drop()


def test_a_change_applied_elsewhere_survives_its_origin_crash(
    running_servers: list[Server], tmp_path: Path, capture_mode: str
) -> None:
    """An asynchronous commit that another node applied must not be lost by its origin in a
    crash (PostgreSQL's own replication only sends WAL its origin has flushed); otherwise the
    nodes differ for good, and the lost transaction id is handed out again as above."""
    cluster = Cluster(running_servers, tmp_path, SCHEMA, capture=capture_mode)
    try:
        cluster.setup()
        commit(cluster, "north", "INSERT INTO private VALUES ('north', 1, 0)", durable=False)
        cluster.pull("north", "south")
        cluster.server_of["north"].crash()
        cluster.server_of["north"].start()
        commit(cluster, "north", "INSERT INTO private VALUES ('north', 2, 0)")
        cluster.sync()
        assert private_rows(cluster, "south") == [("north", 1), ("north", 2)]
        assert private_rows(cluster, "north") == [("north", 1), ("north", 2)]
        cluster.assert_identical()
    finally:
        cluster.drop()
