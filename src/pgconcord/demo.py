"""`pgconcord demo`: the embedded default. Starts throwaway local PostgreSQL nodes, replicates a
live shop workload between them (with rows deliberately edited on several nodes at once), shows
it as it happens, proves the nodes converged with `verify`, and removes everything it started.

Every node writes all the time, so keys must never collide between nodes: orders get random
UUIDs, customers created during the run get keys prefixed with their node's name, and the
reference data every node starts with is identical on all of them.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from functools import partial
from pathlib import Path
from typing import Any, LiteralString

import psycopg
from psycopg import errors as pg_errors
from psycopg import sql
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from pgconcord.agent import Agent, sync
from pgconcord.config import ClusterConfig, load_config
from pgconcord.conflict import recorded_conflicts
from pgconcord.errors import NodeUnavailable, PgconcordError
from pgconcord.install import setup
from pgconcord.sandbox import Server, find_binaries
from pgconcord.status import ClusterStatus, cluster_status
from pgconcord.transport import connect
from pgconcord.verify import VerifyReport, verify

NODE_NAMES = (
    "north",
    "south",
    "east",
    "west",
    "central",
    "harbor",
    "valley",
    "summit",
    "river",
    "forest",
)
CLUSTER_NAME = "demo"
DATABASE = "shop"
TABLES = ("customers", "products", "orders")

TRANSACTIONS_PER_SECOND = 12  # per node: enough to keep every pair busy, little enough for a laptop
FIRST_CONFLICT_SECONDS = 1.0
CONFLICT_INTERVAL_SECONDS = 3.0
STATUS_INTERVAL_SECONDS = 1.0  # cluster_status queries every node: once a second is plenty
REFRESH_PER_SECOND = 4
DRAIN_TIMEOUT_SECONDS = 30.0
THREAD_JOIN_SECONDS = 10.0
EXAMPLE_CONFLICTS = 3

_SCHEMA: tuple[LiteralString, ...] = (
    """CREATE TABLE customers (
        id text PRIMARY KEY,
        name text NOT NULL,
        email text NOT NULL,
        city text NOT NULL,
        updated_at timestamptz NOT NULL DEFAULT now())""",
    """CREATE TABLE products (
        id text PRIMARY KEY,
        name text NOT NULL,
        price numeric(10, 2) NOT NULL,
        stock integer NOT NULL)""",
    """CREATE TABLE orders (
        id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
        customer_id text NOT NULL REFERENCES customers,
        product_id text NOT NULL REFERENCES products,
        quantity integer NOT NULL,
        created_at timestamptz NOT NULL DEFAULT now())""",
)

_FIRST_NAMES = ("Ada", "Bruno", "Chiara", "Dmitri", "Elena", "Farid", "Grace", "Hiro", "Ines")
_LAST_NAMES = ("Keller", "Moreau", "Novak", "Okafor", "Petrov", "Rossi", "Silva", "Tanaka")
_CITIES = ("Lisbon", "Porto", "Lyon", "Turin", "Ghent", "Graz", "Krakow", "Aarhus", "Bergen")
_PRODUCT_KINDS = ("Espresso beans", "Green tea", "Dark chocolate", "Olive oil", "Sea salt")
_PRODUCT_SIZES = ("250 g", "500 g", "1 kg", "gift box", "family pack", "sampler", "refill", "tin")
_CUSTOMER_COUNT = 30


@dataclass(frozen=True)
class ReferenceData:
    customers: list[tuple[str, str, str, str, datetime]]  # id, name, email, city, updated_at
    products: list[tuple[str, str, Decimal, int]]  # id, name, price, stock


def reference_data(updated_at: datetime) -> ReferenceData:
    """The rows every node starts with; seeded so that each node gets exactly the same ones.

    updated_at is given rather than left to its column default: each node would otherwise
    stamp its copy with the moment it was seeded, and the nodes would differ from the start.
    """
    generator = random.Random(2024)
    customers = []
    for number in range(1, _CUSTOMER_COUNT + 1):
        first, last = generator.choice(_FIRST_NAMES), generator.choice(_LAST_NAMES)
        email = f"{first}.{last}{number}@example.com".lower()
        city = generator.choice(_CITIES)
        customers.append((f"cust-{number:03d}", f"{first} {last}", email, city, updated_at))
    products = []
    for number, (kind, size) in enumerate(
        ((kind, size) for kind in _PRODUCT_KINDS for size in _PRODUCT_SIZES), start=1
    ):
        price = Decimal(generator.randrange(199, 4999)) / 100
        products.append(
            (f"sku-{number:03d}", f"{kind}, {size}", price, generator.randrange(50, 200))
        )
    return ReferenceData(customers=customers, products=products)


def prepare_node(server: Server, data: ReferenceData) -> str:
    """Start the server, create the shop database with its schema and reference data; its DSN."""
    server.start()
    dsn = server.create_database(DATABASE)
    with psycopg.connect(dsn) as connection, connection.cursor() as cursor:
        for statement in _SCHEMA:
            cursor.execute(statement)
        cursor.executemany(
            "INSERT INTO customers (id, name, email, city, updated_at) VALUES (%s, %s, %s, %s, %s)",
            data.customers,
        )
        cursor.executemany(
            "INSERT INTO products (id, name, price, stock) VALUES (%s, %s, %s, %s)", data.products
        )
    return dsn


def write_config(path: Path, dsns: dict[str, str]) -> ClusterConfig:
    # json.dumps quotes as a TOML basic string: same escapes, so any DSN survives.
    nodes = "".join(
        f"[[node]]\nname = {json.dumps(name)}\ndsn = {json.dumps(dsn)}\n\n"
        for name, dsn in dsns.items()
    )
    path.write_text(
        f"[cluster]\nname = {json.dumps(CLUSTER_NAME)}\n\n{nodes}"
        '[replication]\nschemas = ["public"]\n\n'
        # Sales and restocks on several nodes add up instead of overwriting each other.
        '[conflict.table."public.products"]\ndelta_columns = ["stock"]\n'
    )
    return load_config(path)


# -- deliberate conflicts ----------------------------------------------------------------------


@dataclass(frozen=True)
class ConflictRound:
    """One row that two or three nodes update at the same instant, each to its own value."""

    number: int
    offset_seconds: float  # after the workload starts
    table: str  # "customers" (the city changes) or "products" (the price changes)
    key: str
    values: dict[str, str | Decimal]  # node -> the value it writes

    def describe(self) -> str:
        column = _round_column(self.table)
        writes = ", ".join(f"{value} on {node}" for node, value in self.values.items())
        return f"{self.table} {self.key}: {column} set to {writes}"


def plan_conflict_rounds(
    seconds: int, node_names: Sequence[str], data: ReferenceData
) -> list[ConflictRound]:
    generator = random.Random(7)
    rounds: list[ConflictRound] = []
    offset = FIRST_CONFLICT_SECONDS
    while offset < seconds:
        number = len(rounds) + 1
        writers = generator.sample(
            list(node_names), k=min(len(node_names), generator.choice((2, 3)))
        )
        values: dict[str, str | Decimal]
        if number % 2:
            key, *_customer = generator.choice(data.customers)
            cities = generator.sample(_CITIES, k=len(writers))
            values = dict(zip(writers, cities, strict=True))
            table = "customers"
        else:
            key, _name, price, _stock = generator.choice(data.products)
            # Distinct prices, so the summary can show which node's value survived.
            values = {
                writer: (price + Decimal(index + 1) * Decimal("0.25")).quantize(Decimal("0.01"))
                for index, writer in enumerate(writers)
            }
            table = "products"
        rounds.append(ConflictRound(number, offset, table, key, values))
        offset += CONFLICT_INTERVAL_SECONDS
    return rounds


@dataclass
class ConflictLog:
    """When each node committed its write of each round, to show how close together they were."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    committed_at: dict[int, dict[str, float]] = field(default_factory=dict)

    def record(self, round_number: int, node: str, moment: float) -> None:
        with self.lock:
            self.committed_at.setdefault(round_number, {})[node] = moment

    def latest(self, rounds: Sequence[ConflictRound]) -> tuple[ConflictRound, float] | None:
        """The newest round all its writers committed, and the spread of their commits."""
        with self.lock:
            for conflict_round in reversed(rounds):
                moments = self.committed_at.get(conflict_round.number, {})
                if moments and len(moments) == len(conflict_round.values):
                    return conflict_round, max(moments.values()) - min(moments.values())
        return None


# -- workload --------------------------------------------------------------------------------


@dataclass
class ShopActivity:
    transactions: int = 0
    rows_written: int = 0
    retries: int = 0
    failure: str | None = None


class Shop:
    """One node's application: a thread placing, changing and cancelling orders on its node."""

    def __init__(
        self,
        name: str,
        dsn: str,
        data: ReferenceData,
        rounds: Sequence[ConflictRound],
        conflict_log: ConflictLog,
        stopping: threading.Event,
    ) -> None:
        self.name = name
        self.dsn = dsn
        self.rounds = [each for each in rounds if name in each.values]
        self.conflict_log = conflict_log
        self.stopping = stopping
        self.activity = ShopActivity()
        self.customer_ids = [customer[0] for customer in data.customers]
        self.product_ids = [product[0] for product in data.products]
        self.random = random.Random(name)
        self._new_customers = 0
        self.started_at = 0.0
        self._thread = threading.Thread(target=self._run, name=f"shop {name}", daemon=True)

    def start(self, started_at: float) -> None:
        self.started_at = started_at
        self._thread.start()

    def join(self, timeout: float) -> None:
        if self._thread.ident is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        try:
            with psycopg.connect(self.dsn, autocommit=True) as connection:
                self._loop(connection)
        except Exception as error:  # shown in the summary: a silent dead shop would look idle
            self.activity.failure = f"{type(error).__name__}: {error}"

    def _loop(self, connection: psycopg.Connection[tuple[Any, ...]]) -> None:
        pending_rounds = list(self.rounds)
        next_transaction = self.started_at
        while not self.stopping.is_set():
            now = time.monotonic()
            if pending_rounds and now >= self.started_at + pending_rounds[0].offset_seconds:
                conflict_round = pending_rounds.pop(0)
                self._attempt(partial(self._conflicting_write, connection, conflict_round))
            elif now >= next_transaction:
                self._attempt(partial(self._transaction, connection))
                # After a stall (a lock wait), carry on at the usual pace rather than sending
                # the missed transactions in a burst.
                interval = self.random.expovariate(TRANSACTIONS_PER_SECOND)
                next_transaction = max(next_transaction + interval, time.monotonic())
            wake = next_transaction
            if pending_rounds:
                wake = min(wake, self.started_at + pending_rounds[0].offset_seconds)
            self.stopping.wait(max(0.0, wake - time.monotonic()))

    def _attempt(self, work: Callable[[], int]) -> None:
        try:
            rows = work()
        except (pg_errors.DeadlockDetected, pg_errors.SerializationFailure):
            # The replication agent applying into this node may pick our transaction as the
            # deadlock victim; an application would retry, and the next transaction does.
            self.activity.retries += 1
            return
        self.activity.transactions += 1
        self.activity.rows_written += rows

    def _conflicting_write(
        self, connection: psycopg.Connection[tuple[Any, ...]], conflict_round: ConflictRound
    ) -> int:
        value = conflict_round.values[self.name]
        if conflict_round.table == "customers":
            cursor = connection.execute(
                "UPDATE customers SET city = %s, updated_at = now() WHERE id = %s",
                (value, conflict_round.key),
            )
        else:
            cursor = connection.execute(
                "UPDATE products SET price = %s WHERE id = %s", (value, conflict_round.key)
            )
        self.conflict_log.record(conflict_round.number, self.name, time.monotonic())
        return cursor.rowcount

    def _transaction(self, connection: psycopg.Connection[tuple[Any, ...]]) -> int:
        """One small business transaction, chosen at random; the number of rows it wrote."""
        choice = self.random.random()
        product = self.random.choice(self.product_ids)
        with connection.transaction():
            if choice < 0.45:
                quantity = self.random.randint(1, 3)
                placed = connection.execute(
                    "INSERT INTO orders (customer_id, product_id, quantity) VALUES (%s, %s, %s)",
                    (self.random.choice(self.customer_ids), product, quantity),
                ).rowcount
                taken = connection.execute(
                    "UPDATE products SET stock = stock - %s WHERE id = %s", (quantity, product)
                ).rowcount
                return placed + taken
            if choice < 0.57:
                return connection.execute(
                    "DELETE FROM orders"
                    " WHERE id = (SELECT id FROM orders ORDER BY random() LIMIT 1)"
                ).rowcount
            if choice < 0.67:
                return connection.execute(
                    "UPDATE products SET stock = stock + %s WHERE id = %s",
                    (self.random.randint(20, 100), product),
                ).rowcount
            if choice < 0.75:
                factor = Decimal(self.random.randint(95, 105)) / 100
                return connection.execute(
                    "UPDATE products SET price = round(price * %s, 2) WHERE id = %s",
                    (factor, product),
                ).rowcount
            if choice < 0.95:
                customer = self.random.choice(self.customer_ids)
                if self.random.random() < 0.5:
                    return connection.execute(
                        "UPDATE customers SET city = %s, updated_at = now() WHERE id = %s",
                        (self.random.choice(_CITIES), customer),
                    ).rowcount
                return connection.execute(
                    "UPDATE customers SET email = %s, updated_at = now() WHERE id = %s",
                    (f"{customer}.{self.random.randint(1, 999)}@example.com", customer),
                ).rowcount
            return self._new_customer(connection)

    def _new_customer(self, connection: psycopg.Connection[tuple[Any, ...]]) -> int:
        # Prefixed with the node's name: another node creating its next customer at the same
        # moment picks a different key, which a shared counter would not.
        self._new_customers += 1
        customer = f"{self.name}-{self._new_customers:04d}"
        first, last = self.random.choice(_FIRST_NAMES), self.random.choice(_LAST_NAMES)
        rows = connection.execute(
            "INSERT INTO customers (id, name, email, city) VALUES (%s, %s, %s, %s)",
            (customer, f"{first} {last}", f"{customer}@example.com", self.random.choice(_CITIES)),
        ).rowcount
        self.customer_ids.append(customer)
        return rows


# -- observing the cluster -------------------------------------------------------------------


@dataclass(frozen=True)
class Observation:
    taken_at: float  # time.monotonic() when the queries started
    status: ClusterStatus
    row_counts: dict[str, dict[str, int]]  # node -> table -> rows

    @property
    def pending_changes(self) -> int | None:
        """Changes not yet applied over all pairs; None while a pair cannot be measured."""
        counts = [pair.pending_changes for pair in self.status.pairs]
        if any(count is None for count in counts):
            return None
        return sum(count or 0 for count in counts)

    @property
    def max_lag_seconds(self) -> float:
        return max((pair.lag_seconds or 0.0 for pair in self.status.pairs), default=0.0)


_COUNT_ROWS = sql.SQL(" UNION ALL ").join(
    sql.SQL("SELECT {name}, count(*) FROM {table}").format(
        name=sql.Literal(table), table=sql.Identifier(table)
    )
    for table in TABLES
)


class Observer:
    """Reads status and row counts from every node once a second, in a thread of its own so
    that a slow node never freezes the live view."""

    def __init__(self, config: ClusterConfig) -> None:
        self.config = config
        self.latest: Observation | None = None
        self.max_lag_seconds = 0.0
        self.error: str | None = None
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="observer", daemon=True)

    def start(self) -> Observer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._thread.ident is not None:
            self._thread.join(THREAD_JOIN_SECONDS)

    def _run(self) -> None:
        while not self._stopping.is_set():
            began = time.monotonic()
            try:
                self._observe(began)
                self.error = None
            except (PgconcordError, psycopg.Error) as error:
                self.error = (
                    str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
                )
            self._stopping.wait(max(0.0, began + STATUS_INTERVAL_SECONDS - time.monotonic()))

    def _observe(self, began: float) -> None:
        status = cluster_status(self.config)
        row_counts: dict[str, dict[str, int]] = {}
        for node in self.config.nodes:
            try:
                with connect(node, autocommit=True) as connection:
                    row_counts[node.name] = {
                        str(table): int(str(count))
                        for table, count in connection.execute(_COUNT_ROWS)
                    }
            except NodeUnavailable:
                row_counts[node.name] = {}
        observation = Observation(began, status, row_counts)
        self.max_lag_seconds = max(self.max_lag_seconds, observation.max_lag_seconds)
        self.latest = observation


# -- the run ---------------------------------------------------------------------------------


class DemoRun:
    """What the live view and the summary read while the demo runs."""

    def __init__(
        self,
        config: ClusterConfig,
        servers: dict[str, Server],
        shops: list[Shop],
        agent: Agent,
        observer: Observer,
        rounds: list[ConflictRound],
        conflict_log: ConflictLog,
        seconds: int,
    ) -> None:
        self.config = config
        self.servers = servers
        self.shops = shops
        self.agent = agent
        self.observer = observer
        self.rounds = rounds
        self.conflict_log = conflict_log
        self.seconds = seconds
        self.started_at = time.monotonic()
        self.phase = "running the workload"

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started_at

    @property
    def conflicts_resolved(self) -> int:
        return sum(state.conflicts for state in self.agent.states.values())

    @property
    def transactions(self) -> int:
        return sum(shop.activity.transactions for shop in self.shops)

    def dashboard(self) -> RenderableType:
        observation = self.observer.latest
        header = Table.grid(padding=(0, 2))
        header.add_row(
            Text(f"pgconcord demo: {len(self.shops)} nodes, {self.phase}", style="bold"),
            ProgressBar(total=self.seconds, completed=min(self.elapsed, self.seconds), width=30),
            Text(f"{min(self.elapsed, self.seconds):4.0f} s / {self.seconds} s"),
            Text(f"conflicts resolved: {self.conflicts_resolved}", style="magenta"),
        )
        parts: list[RenderableType] = [header, self._node_table(observation)]
        parts.append(self._pair_table(observation))
        latest = self.conflict_log.latest(self.rounds)
        if latest is not None:
            conflict_round, spread = latest
            parts.append(
                Text(
                    f"latest deliberate conflict #{conflict_round.number}: "
                    f"{conflict_round.describe()}, committed within {spread * 1000:.1f} ms",
                    style="magenta",
                )
            )
        if self.observer.error:
            parts.append(Text(f"status: {self.observer.error}", style="yellow"))
        parts.extend(
            Text(f"{shop.name}: workload stopped: {shop.activity.failure}", style="red")
            for shop in self.shops
            if shop.activity.failure
        )
        return Group(*parts)

    def _node_table(self, observation: Observation | None) -> Table:
        table = Table(title="nodes", title_justify="left", expand=False)
        for heading in ("node", "port", "transactions", "rows written here", *TABLES, "change log"):
            table.add_column(heading, justify="left" if heading == "node" else "right")
        table.add_column("conflicts", justify="right")
        statuses = {node.name: node for node in observation.status.nodes} if observation else {}
        for shop in self.shops:
            counts = observation.row_counts.get(shop.name, {}) if observation else {}
            node_status = statuses.get(shop.name)
            table.add_row(
                shop.name,
                str(self.servers[shop.name].port),
                str(shop.activity.transactions),
                str(shop.activity.rows_written),
                *(_number(counts.get(name)) for name in TABLES),
                _number(node_status.change_log_rows if node_status else None),
                _number(node_status.conflicts if node_status else None),
            )
        return table

    def _pair_table(self, observation: Observation | None) -> Table:
        table = Table(title="replication", title_justify="left", expand=False)
        table.add_column("origin -> target")
        table.add_column("pending", justify="right")
        table.add_column("lag", justify="right")
        table.add_column("applied", justify="right")
        table.add_column("agent")
        pairs = (
            {(pair.origin, pair.target): pair for pair in observation.status.pairs}
            if observation
            else {}
        )
        for (origin, target), state in self.agent.states.items():
            pair = pairs.get((origin, target))
            lag = pair.lag_seconds if pair else None
            table.add_row(
                f"{origin} -> {target}",
                _number(pair.pending_changes if pair else None),
                "-" if lag is None else f"{lag:.1f} s",
                str(state.applied_changes),
                Text(state.sentence, style="default" if state.healthy else "yellow"),
            )
        return table

    def progress_line(self) -> str:
        observation = self.observer.latest
        pending = "?" if observation is None else _number(observation.pending_changes)
        lag = 0.0 if observation is None else observation.max_lag_seconds
        return (
            f"{self.elapsed:5.1f} s  {self.transactions} transactions on {len(self.shops)} nodes,"
            f" {self.conflicts_resolved} conflicts resolved, pending changes: {pending},"
            f" lag {lag:.1f} s"
        )


def _number(value: int | None) -> str:
    return "-" if value is None else str(value)


@contextmanager
def _display(run: DemoRun, console: Console) -> Iterator[Callable[[], None]]:
    """A live view on a terminal; elsewhere (CI, a pipe) a plain line every few seconds."""
    if console.is_terminal and not console.is_dumb_terminal:
        with Live(run.dashboard(), console=console, auto_refresh=False, transient=False) as live:
            yield lambda: live.update(run.dashboard(), refresh=True)
        return
    every = max(5.0, run.seconds / 4)
    printed_at = time.monotonic()

    def maybe_print() -> None:
        nonlocal printed_at
        if time.monotonic() - printed_at >= every:
            printed_at = time.monotonic()
            console.print(run.progress_line(), highlight=False)

    yield maybe_print


def _wait_until_drained(run: DemoRun, refresh: Callable[[], None]) -> bool:
    """Wait until a status taken after the workload stopped shows nothing pending anywhere."""
    stopped_at = time.monotonic()
    deadline = stopped_at + DRAIN_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        observation = run.observer.latest
        if (
            observation is not None
            and observation.taken_at >= stopped_at
            and observation.pending_changes == 0
        ):
            return True
        refresh()
        time.sleep(1 / REFRESH_PER_SECOND)
    return False


def _all_conflicts(config: ClusterConfig, console: Console) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    for node in config.nodes:
        try:
            with connect(node, autocommit=True) as connection:
                records.extend(recorded_conflicts(connection, node.name))
        except NodeUnavailable as error:
            console.print(f"conflicts of {error}", style="red", highlight=False)
    return records


def _round_column(table: str) -> str:
    return "city" if table == "customers" else "price"


def _pick_examples(
    records: list[dict[str, Any]], rounds: Sequence[ConflictRound]
) -> list[dict[str, Any]]:
    """A few conflicts between the writes of deliberate rounds (not ordinary writes that hit
    the same row), from both tables and with both outcomes when there are some."""
    candidates = []
    for record in records:
        local, incoming = record["local"]["row"], record["incoming"]["row"]
        if record["type"] != "update_origin_differs" or not local or not incoming:
            continue
        for conflict_round in rounds:
            column = _round_column(conflict_round.table)
            written = {str(value) for value in conflict_round.values.values()}
            if (
                record["table"] == f"public.{conflict_round.table}"
                and (record["key"] or {}).get("id") == conflict_round.key
                and _as_text(local.get(column)) in written
                and _as_text(incoming.get(column)) in written
            ):
                candidates.append(record)
                break
    examples: list[dict[str, Any]] = []
    seen: set[str] = set()
    wishes = [("customers", "incoming"), ("products", "local"), ("", "")]
    for table, resolution in wishes:
        for record in candidates:
            identity = f"{record['table']} {record['key']}"
            if identity in seen or (table and record["table"] != f"public.{table}"):
                continue
            if resolution and record["resolution"] != resolution:
                continue
            examples.append(record)
            seen.add(identity)
            break
    return examples[:EXAMPLE_CONFLICTS]


def _as_text(value: object) -> str:
    # jsonb numbers arrive as floats; the planned prices are Decimals with two places.
    if isinstance(value, float):
        return str(Decimal(str(value)).quantize(Decimal("0.01")))
    return str(value)


def _example(record: dict[str, Any]) -> RenderableType:
    local, incoming = record["local"], record["incoming"]
    # updated_at differs in every pair of concurrent writes and says nothing about the outcome.
    columns = [
        column
        for column in incoming["row"]
        if column != "updated_at" and local["row"].get(column) != incoming["row"].get(column)
    ]
    gap = abs(int(incoming["clock"]) - int(local["clock"])) / 1000
    title = Text(
        f"{record['table']} {json.dumps(record['key'])}: {record['type']} seen on"
        f" {record['node']}, the writes {gap:.1f} ms apart"
    )
    table = Table()
    table.add_column("version")
    table.add_column("written by")
    for column in columns:
        table.add_column(column)
    table.add_column("outcome")
    for role, version in (("local", local), ("incoming", incoming)):
        kept = record["resolution"] == role
        table.add_row(
            role,
            str(version["origin"]),
            *(_as_text(version["row"].get(column)) for column in columns),
            Text("kept (later write)" if kept else "discarded", style="green" if kept else "dim"),
        )
    return Group(title, table)


def _print_summary(
    run: DemoRun,
    report: VerifyReport,
    console: Console,
) -> None:
    console.rule("summary")
    rows = Table(title="rows per table", title_justify="left")
    rows.add_column("table")
    rows.add_column("rows", justify="right")
    for table_name in report.tables:
        rows.add_row(table_name, _number(report.rows.get(table_name)))
    console.print(rows)
    written = sum(shop.activity.rows_written for shop in run.shops)
    applied = sum(state.applied_changes for state in run.agent.states.values())
    console.print(
        f"workload: {run.transactions} transactions writing {written} rows on"
        f" {len(run.shops)} nodes in {run.seconds} s; replication applied {applied} changes,"
        f" highest lag seen {run.observer.max_lag_seconds:.1f} s",
        highlight=False,
    )
    retries = sum(shop.activity.retries for shop in run.shops)
    if retries:
        console.print(
            f"{retries} workload transactions were deadlock victims and skipped", highlight=False
        )
    records = _all_conflicts(run.config, console)
    per_node = Counter(record["node"] for record in records)
    per_type = Counter(record["type"] for record in records)
    by_type = ", ".join(f"{kind} {count}" for kind, count in per_type.most_common())
    console.print(
        f"{len(records)} conflicts recorded"
        f" ({', '.join(f'{node} {per_node[node]}' for node in run.config.node_names)})"
        + (f"; by type: {by_type}" if by_type else ""),
        style="magenta",
        highlight=False,
    )
    for record in _pick_examples(records, run.rounds):
        console.print(_example(record))
    for shop in run.shops:
        if shop.activity.failure:
            console.print(
                f"{shop.name}: workload failed: {shop.activity.failure}",
                style="red",
                highlight=False,
            )
    for name, reason in report.unreachable.items():
        console.print(f"node {name} unreachable: {reason}", style="red", highlight=False)
    for difference in report.differences:
        keys = ", ".join(str(key) for key in difference.keys)
        console.print(
            f"{difference.table}: {difference.reason}"
            + (f" ({difference.key_count} keys: {keys})" if difference.keys else ""),
            style="red",
            highlight=False,
        )
    if report.identical:
        total = sum(report.rows.values())
        console.print(
            f"all {len(run.shops)} nodes identical ({len(report.tables)} tables, {total} rows):"
            " every node resolved every conflict the same way, without asking the others",
            style="bold green",
            highlight=False,
        )
    else:
        console.print(f"the {len(run.shops)} nodes differ", style="bold red", highlight=False)


def _start_servers(
    names: Sequence[str], servers: dict[str, Server], data: ReferenceData
) -> dict[str, str]:
    binaries = find_binaries()
    for name in names:
        servers[name] = Server(binaries, name=f"demo-{name}", fsync=False)
    # Leaving the executor waits for every start, so cleanup never races a server coming up.
    with ThreadPoolExecutor(max_workers=len(names), thread_name_prefix="start") as executor:
        futures = {name: executor.submit(prepare_node, servers[name], data) for name in names}
    return {name: future.result() for name, future in futures.items()}


def run_demo(*, seconds: int, node_count: int, console: Console) -> bool:
    """Run the demo; True if verify found every node identical at the end."""
    if not 2 <= node_count <= len(NODE_NAMES):
        raise PgconcordError(f"the demo runs 2 to {len(NODE_NAMES)} nodes, not {node_count}")
    if seconds < 1:
        raise PgconcordError(f"the demo needs at least 1 second of workload, not {seconds}")
    names = NODE_NAMES[:node_count]
    data = reference_data(datetime.now(UTC).replace(microsecond=0))
    servers: dict[str, Server] = {}
    stopping = threading.Event()
    shops: list[Shop] = []
    agent: Agent | None = None
    observer: Observer | None = None
    try:
        console.print(f"starting {node_count} throwaway PostgreSQL servers...", highlight=False)
        dsns = _start_servers(names, servers, data)
        for name in names:
            server = servers[name]
            console.print(
                f"  {name:<8} PostgreSQL {server.binaries.major_version} on"
                f" {server.host}:{server.port}  {server.sandbox_directory}",
                highlight=False,
            )
        config = write_config(servers[names[0]].sandbox_directory / "cluster.toml", dsns)
        report = setup(config)
        console.print(
            f"set up replication of {', '.join(report.tables)} on every node", highlight=False
        )
        rounds = plan_conflict_rounds(seconds, names, data)
        conflict_log = ConflictLog()
        shops = [Shop(name, dsns[name], data, rounds, conflict_log, stopping) for name in names]
        agent = Agent(config).start()
        observer = Observer(config).start()
        run = DemoRun(config, servers, shops, agent, observer, rounds, conflict_log, seconds)
        console.print(
            f"running a shop workload on every node for {seconds} s, with {len(rounds)}"
            " rows deliberately updated on several nodes at the same instant",
            highlight=False,
        )
        drained = False
        with _display(run, console) as refresh:
            for shop in shops:
                shop.start(run.started_at)
            while run.elapsed < seconds:
                refresh()
                time.sleep(min(1 / REFRESH_PER_SECOND, max(0.0, seconds - run.elapsed)))
            stopping.set()
            for shop in shops:
                shop.join(THREAD_JOIN_SECONDS)
            run.phase = "waiting for every node to catch up"
            refresh()
            stopped_at = time.monotonic()
            drained = _wait_until_drained(run, refresh)
            run.phase = "caught up" if drained else "still catching up"
            refresh()
        if drained:
            console.print(
                f"workload stopped; {time.monotonic() - stopped_at:.1f} s later no change was"
                " pending between any two nodes",
                highlight=False,
            )
        else:
            console.print(
                f"changes still pending after {DRAIN_TIMEOUT_SECONDS:.0f} s; syncing once more",
                style="yellow",
                highlight=False,
            )
        final_sync = sync(config)
        for failure in final_sync.failures:
            console.print(f"sync: {failure}", style="red", highlight=False)
        agent.stop()
        observer.stop()
        result = verify(config)
        _print_summary(run, result, console)
        return result.identical and not any(shop.activity.failure for shop in shops)
    finally:
        stopping.set()
        for shop in shops:
            shop.join(THREAD_JOIN_SECONDS)
        if observer is not None:
            observer.stop()
        if agent is not None:
            agent.stop()
        for server in servers.values():
            try:
                server.cleanup()
            except PgconcordError as error:
                console.print(f"cleanup: {error}", style="red", highlight=False)
