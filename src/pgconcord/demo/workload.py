"""The demo's shop workload: the schema and reference data every node starts with, the
application writing on each node, and the rows deliberately edited on several nodes at once.

Every node writes all the time, so keys must never collide between nodes: orders get random
UUIDs, customers created during the run get keys prefixed with their node's name, and the
reference data every node starts with is identical on all of them.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from functools import partial
from typing import Any, LiteralString

import psycopg
from psycopg import errors as pg_errors

from pgconcord.sandbox import Server

DATABASE = "shop"
TABLES = ("customers", "products", "orders")

TRANSACTIONS_PER_SECOND = 12  # per node: enough to keep every pair busy, little enough for a laptop
FIRST_CONFLICT_SECONDS = 1.0
CONFLICT_INTERVAL_SECONDS = 3.0
THREAD_JOIN_SECONDS = 10.0

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


def _round_column(table: str) -> str:
    return "city" if table == "customers" else "price"


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
