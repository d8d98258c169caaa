"""`verify` against real PostgreSQL servers: what it finds, what it must not find."""

from __future__ import annotations

import itertools
import json
import random
import socket
from collections.abc import Iterator, Mapping
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from pgconcord.config import ClusterConfig, parse_config
from pgconcord.sandbox import PostgresBinaries, Server
from pgconcord.verify import EXAMPLE_KEY_LIMIT, TableDifference, VerifyReport, verify
from pgconcord.verify import compare as verify_module

_database_numbers = itertools.count(1)


@pytest.fixture(scope="module")
def servers(server_versions: list[PostgresBinaries]) -> Iterator[dict[str, Server]]:
    """North and south, on different PostgreSQL versions when two are installed: equal rows must
    compare equal across versions too."""
    if not server_versions:
        pytest.fail("no PostgreSQL server binaries: install PostgreSQL or pgconcord[embedded]")
    north = Server(server_versions[0], name="verify-north")
    south = Server(server_versions[-1], name="verify-south")
    try:
        north.start()
        south.start()
        yield {"north": north, "south": south}
    finally:
        north.cleanup()
        south.cleanup()


class Nodes:
    """One fresh database on each server, and the cluster config naming them."""

    def __init__(self, servers: Mapping[str, Server]) -> None:
        self.servers = dict(servers)
        self.database = f"verify_{next(_database_numbers)}"
        self.dsns = {
            name: server.create_database(self.database) for name, server in servers.items()
        }

    def execute(self, node: str, statement: str, parameters: Any = None) -> None:
        with psycopg.connect(self.dsns[node], autocommit=True) as connection:
            connection.execute(statement.encode(), parameters)

    def execute_everywhere(self, statement: str) -> None:
        for node in self.dsns:
            self.execute(node, statement)

    def config(
        self, extra: Mapping[str, str] | None = None, replication: str = ""
    ) -> ClusterConfig:
        dsns = {**self.dsns, **(extra or {})}
        nodes = "".join(
            f"[[node]]\nname = {json.dumps(name)}\ndsn = {json.dumps(dsn)}\n"
            for name, dsn in dsns.items()
        )
        return parse_config(f'[cluster]\nname = "t"\n{nodes}{replication}')

    def drop(self) -> None:
        for server in self.servers.values():
            if server.is_running:
                server.drop_database(self.database)


@pytest.fixture
def nodes(servers: dict[str, Server]) -> Iterator[Nodes]:
    created = Nodes(servers)
    yield created
    created.drop()


def dead_dsn(dbname: str) -> str:
    """A DSN for a port where nothing listens (bound and released just now)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return make_conninfo(host="127.0.0.1", port=port, dbname=dbname, user="postgres")


def differences_of(
    report: VerifyReport,
) -> list[tuple[str, str, tuple[str, ...], int, tuple[str, ...]]]:
    return [
        (
            difference.table,
            difference.reason,
            difference.keys,
            difference.key_count,
            difference.nodes,
        )
        for difference in report.differences
    ]


ITEMS = """
CREATE TABLE items (
    id integer PRIMARY KEY,
    name text,
    price numeric(10, 2),
    ratio double precision,
    seen timestamptz,
    span interval,
    during tstzrange,
    payload jsonb,
    tags text[],
    blob bytea
);
"""
ITEM_ROWS = """
INSERT INTO items VALUES
    (1, 'kettle', 19.90, 0.1::float8 + 0.2, '2024-03-01 12:00:00+01', '1 day 02:03:04',
     '[2024-01-01 00:00+00, 2024-02-01 00:00+00)', '{"b": 1, "a": [1, 2]}', '{x,y}', '\\x00ff'),
    (2, 'mug', NULL, 'NaN', NULL, NULL, NULL, NULL, NULL, NULL),
    (3, 'täpötin ☕', 0, -0.0, 'infinity', '-3 months', 'empty', 'null', '{}', '');
"""


def test_identical_tables_are_identical_however_each_server_renders_values(nodes: Nodes) -> None:
    nodes.execute_everywhere(ITEMS + ITEM_ROWS + "CREATE TABLE empty (id bigint PRIMARY KEY);")
    # Session defaults that change how values print: verify must not mistake them for data.
    for setting, value in [
        ("timezone", "America/New_York"),
        ("extra_float_digits", "0"),
        ("bytea_output", "escape"),
        ("datestyle", "SQL, DMY"),
        ("intervalstyle", "sql_standard"),
    ]:
        nodes.execute("south", f"ALTER DATABASE {nodes.database} SET {setting} = '{value}'")

    report = verify(nodes.config())

    assert report.identical, report.to_json()
    assert report.tables == ("public.empty", "public.items")
    assert report.rows == {"public.empty": 0, "public.items": 3}
    assert report.differences == ()
    assert report.unreachable == {}
    assert json.loads(json.dumps(report.to_json())) == {
        "identical": True,
        "tables": ["public.empty", "public.items"],
        "rows": {"public.empty": 0, "public.items": 3},
        "differences": [],
        "unreachable": {},
    }


def test_a_changed_value_names_the_table_and_the_key(nodes: Nodes) -> None:
    nodes.execute_everywhere(ITEMS + ITEM_ROWS)
    nodes.execute("south", "UPDATE items SET name = 'teapot' WHERE id = 1")

    report = verify(nodes.config())

    assert not report.identical
    assert differences_of(report) == [
        ("public.items", "rows differ", ('{"id": 1}',), 1, ("north", "south"))
    ]
    assert report.to_json()["differences"] == [
        {
            "table": "public.items",
            "reason": "rows differ",
            "keys": ['{"id": 1}'],
            "key_count": 1,
            "nodes": ["north", "south"],
        }
    ]


def test_an_extra_row_and_a_missing_row_name_the_node_that_lacks_them(nodes: Nodes) -> None:
    nodes.execute_everywhere(ITEMS + ITEM_ROWS)
    nodes.execute("north", "INSERT INTO items (id, name) VALUES (7, 'only north')")
    nodes.execute("north", "DELETE FROM items WHERE id = 2")

    report = verify(nodes.config())

    assert report.rows == {"public.items": 3}
    assert differences_of(report) == [
        ("public.items", "rows missing on north", ('{"id": 2}',), 1, ("north",)),
        ("public.items", "rows missing on south", ('{"id": 7}',), 1, ("south",)),
    ]


def test_rows_missing_on_one_node_are_counted_together(nodes: Nodes) -> None:
    nodes.execute_everywhere(ITEMS + ITEM_ROWS)
    nodes.execute("south", "DELETE FROM items WHERE id IN (1, 3)")

    report = verify(nodes.config())

    assert differences_of(report) == [
        ("public.items", "rows missing on south", ('{"id": 1}', '{"id": 3}'), 2, ("south",))
    ]


def test_a_table_missing_on_one_node(nodes: Nodes) -> None:
    nodes.execute_everywhere("CREATE TABLE kept (id int PRIMARY KEY)")
    nodes.execute("north", "CREATE TABLE lost (id int PRIMARY KEY); INSERT INTO lost VALUES (1)")

    report = verify(nodes.config())

    assert not report.identical
    assert report.tables == ("public.kept", "public.lost")
    assert report.rows == {"public.kept": 0, "public.lost": 1}
    assert differences_of(report) == [("public.lost", "missing on south", (), 0, ("south",))]


def test_an_unreachable_node_is_reported_and_the_others_are_compared(nodes: Nodes) -> None:
    nodes.execute_everywhere(ITEMS + ITEM_ROWS)
    messages: list[str] = []

    report = verify(nodes.config({"east": dead_dsn(nodes.database)}), messages.append)

    assert not report.identical
    assert list(report.unreachable) == ["east"]
    assert report.unreachable["east"].startswith("cannot connect")
    assert report.differences == ()
    assert report.tables == ("public.items",)
    assert any(message.startswith("east: unreachable") for message in messages)
    assert report.to_json()["unreachable"] == {"east": report.unreachable["east"]}


def test_with_every_other_node_unreachable_nothing_is_proven(nodes: Nodes) -> None:
    nodes.execute_everywhere(ITEMS)
    config = nodes.config({"south": dead_dsn(nodes.database)})

    report = verify(config)

    assert not report.identical
    assert list(report.unreachable) == ["south"]
    assert report.tables == ("public.items",)


def test_a_node_lost_during_verify_drops_out_and_the_rest_is_compared(
    servers: dict[str, Server],
) -> None:
    with Server(servers["south"].binaries, name="verify-lost") as lost:
        nodes = Nodes({"north": servers["north"], "south": lost})
        try:
            for table in ("first", "second", "third"):
                nodes.execute_everywhere(f"CREATE TABLE {table} (id int PRIMARY KEY, v text)")
                nodes.execute_everywhere(f"INSERT INTO {table} VALUES (1, 'x')")

            def stop_after_the_first_table(message: str) -> None:
                if message.startswith("public.first:"):
                    lost.stop()

            report = verify(nodes.config(), stop_after_the_first_table)
        finally:
            nodes.drop()

    assert list(report.unreachable) == ["south"]
    assert "connection lost" in report.unreachable["south"]
    assert report.tables == ("public.first", "public.second", "public.third")
    assert report.differences == ()
    assert not report.identical


def test_a_table_one_node_refuses_to_read_is_reported_and_the_others_compared(
    nodes: Nodes,
) -> None:
    reader = f"reader_{nodes.database}"
    nodes.execute_everywhere(
        "CREATE TABLE hidden (id int PRIMARY KEY); CREATE TABLE open (id int PRIMARY KEY);"
        "INSERT INTO hidden VALUES (1); INSERT INTO open VALUES (1)"
    )
    nodes.execute("south", "INSERT INTO open VALUES (2)")
    nodes.execute("south", f"CREATE ROLE {reader} LOGIN; GRANT SELECT ON open TO {reader}")
    try:
        south = nodes.servers["south"].dsn(nodes.database, user=reader)
        report = verify(nodes.config({"south": south}))
    finally:
        nodes.execute("south", f"DROP OWNED BY {reader}; DROP ROLE {reader}")

    # hidden fails first on south; south's transaction must go on to compare open.
    assert report.unreachable == {}
    assert report.tables == ("public.hidden", "public.open")
    assert report.rows == {"public.hidden": 1, "public.open": 1}
    hidden, open_rows = report.differences
    assert (hidden.table, hidden.nodes) == ("public.hidden", ("south",))
    assert hidden.reason.startswith("cannot read on south: permission denied")
    assert (open_rows.table, open_rows.reason, open_rows.keys) == (
        "public.open",
        "rows missing on north",
        ('{"id": 2}',),
    )


def test_composite_primary_key(nodes: Nodes) -> None:
    nodes.execute_everywhere(
        "CREATE TABLE stock (region text, sku integer, quantity integer,"
        " PRIMARY KEY (region, sku));"
        "INSERT INTO stock VALUES ('eu', 1, 5), ('eu', 2, 6), ('us', 1, 7)"
    )
    nodes.execute("south", "UPDATE stock SET quantity = 0 WHERE region = 'eu' AND sku = 2")

    report = verify(nodes.config())

    # jsonb orders keys by length first, then bytes.
    assert differences_of(report) == [
        ("public.stock", "rows differ", ('{"sku": 2, "region": "eu"}',), 1, ("north", "south"))
    ]


def test_quoted_identifiers_and_names_like_verifys_own(nodes: Nodes) -> None:
    nodes.execute_everywhere(
        'CREATE SCHEMA "Sales Dept";'
        'CREATE TABLE "Sales Dept"."Order Items" ('
        ' "Order Id" integer, "Line No" integer, "Item ""Name""" text,'
        " verified_row text, row_key text, row_hash text, derived text,"
        ' PRIMARY KEY ("Order Id", "Line No"));'
        """INSERT INTO "Sales Dept"."Order Items" VALUES"""
        " (7, 1, 'tea', 'a', 'b', 'c', 'd'), (7, 2, 'cake', 'a', 'b', 'c', 'd')"
    )
    config = nodes.config(replication='[replication]\nschemas = ["Sales Dept"]\n')
    assert verify(config).identical

    nodes.execute(
        "north", """UPDATE "Sales Dept"."Order Items" SET row_key = 'z' WHERE "Line No" = 2"""
    )
    report = verify(config)

    assert report.tables == ("Sales Dept.Order Items",)
    assert differences_of(report) == [
        (
            "Sales Dept.Order Items",
            "rows differ",
            ('{"Line No": 2, "Order Id": 7}',),
            1,
            ("north", "south"),
        )
    ]


def test_column_order_differing_between_nodes_with_the_same_data_is_identical(
    nodes: Nodes,
) -> None:
    nodes.execute("north", "CREATE TABLE t (id int PRIMARY KEY, a text, b numeric)")
    nodes.execute("south", "CREATE TABLE t (b numeric, a text, id int PRIMARY KEY)")
    nodes.execute_everywhere("INSERT INTO t (id, a, b) VALUES (1, 'one', 1.5), (2, NULL, 2)")

    assert verify(nodes.config()).identical


def test_a_dropped_column_leaves_no_trace(nodes: Nodes) -> None:
    nodes.execute("north", "CREATE TABLE t (id int PRIMARY KEY, gone text, a text)")
    nodes.execute("north", "ALTER TABLE t DROP COLUMN gone")
    nodes.execute("south", "CREATE TABLE t (id int PRIMARY KEY, a text)")
    nodes.execute_everywhere("INSERT INTO t VALUES (1, 'one')")

    assert verify(nodes.config()).identical


def test_more_differing_keys_than_examples(nodes: Nodes) -> None:
    nodes.execute_everywhere(
        "CREATE TABLE t (id int PRIMARY KEY, v int);"
        "INSERT INTO t SELECT i, i FROM generate_series(1, 1000) i"
    )
    nodes.execute("south", "UPDATE t SET v = -v WHERE id % 10 = 0")

    report = verify(nodes.config())

    [difference] = report.differences
    assert difference.key_count == 100
    assert len(difference.keys) == EXAMPLE_KEY_LIMIT
    assert all(json.loads(key)["id"] % 10 == 0 for key in difference.keys)


def test_a_column_missing_on_one_node_and_the_shared_columns_still_compared(
    nodes: Nodes,
) -> None:
    nodes.execute("north", "CREATE TABLE t (id int PRIMARY KEY, a text, note text)")
    nodes.execute("south", "CREATE TABLE t (id int PRIMARY KEY, a bigint)")
    nodes.execute("north", "INSERT INTO t VALUES (1, '1', 'only here'), (2, '2', NULL)")
    nodes.execute("south", "INSERT INTO t VALUES (1, 1), (2, 2)")

    report = verify(nodes.config())

    # '1' as text and 1 as bigint render differently in JSON: the rows do differ.
    assert differences_of(report) == [
        (
            "public.t",
            "column a differs in type: text on north, bigint on south",
            (),
            0,
            ("north", "south"),
        ),
        ("public.t", "column note missing on south", (), 0, ("south",)),
        ("public.t", "rows differ", ('{"id": 1}', '{"id": 2}'), 2, ("north", "south")),
    ]


def test_a_different_primary_key_is_reported(nodes: Nodes) -> None:
    nodes.execute("north", "CREATE TABLE t (id int, part int, PRIMARY KEY (id))")
    nodes.execute("south", "CREATE TABLE t (id int, part int, PRIMARY KEY (id, part))")
    nodes.execute("north", "INSERT INTO t VALUES (1, 1)")
    nodes.execute("south", "INSERT INTO t VALUES (1, 2)")

    report = verify(nodes.config())

    assert differences_of(report) == [
        (
            "public.t",
            "primary key differs: (id) on north, (id, part) on south",
            (),
            0,
            ("north", "south"),
        ),
        (
            "public.t",
            "rows differ (1 on north, 1 on south; rows cannot be named: the primary keys differ)",
            (),
            0,
            ("north", "south"),
        ),
    ]


def test_a_table_without_primary_key_is_compared_by_hash(nodes: Nodes) -> None:
    nodes.execute_everywhere("CREATE TABLE log (line text); INSERT INTO log VALUES ('a'), ('a')")
    assert verify(nodes.config()).identical

    nodes.execute("south", "INSERT INTO log VALUES ('a')")
    report = verify(nodes.config())

    assert differences_of(report) == [
        (
            "public.log",
            "rows differ (2 on north, 3 on south; rows cannot be named: no primary key)",
            (),
            0,
            ("north", "south"),
        ),
    ]


def test_partitions_are_compared_through_their_parent_and_children_on_their_own(
    nodes: Nodes,
) -> None:
    nodes.execute_everywhere(
        "CREATE TABLE measurement (day date, sensor int, value int, PRIMARY KEY (day, sensor))"
        " PARTITION BY RANGE (day);"
        "CREATE TABLE measurement_2024 PARTITION OF measurement"
        " FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');"
        "CREATE TABLE measurement_2025 PARTITION OF measurement"
        " FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');"
        "INSERT INTO measurement VALUES ('2024-05-01', 1, 10), ('2025-05-01', 1, 20);"
        "CREATE TABLE animal (id int PRIMARY KEY, name text);"
        "CREATE TABLE dog (good boolean) INHERITS (animal);"
        "ALTER TABLE dog ADD PRIMARY KEY (id);"
        "INSERT INTO animal VALUES (1, 'cat'); INSERT INTO dog VALUES (2, 'rex', true)"
    )
    nodes.execute("south", "UPDATE measurement SET value = 21 WHERE sensor = 1 AND value = 20")
    nodes.execute("south", "UPDATE dog SET good = false")

    report = verify(nodes.config())

    assert report.tables == ("public.animal", "public.dog", "public.measurement")
    assert report.rows == {"public.animal": 1, "public.dog": 1, "public.measurement": 2}
    assert differences_of(report) == [
        ("public.dog", "rows differ", ('{"id": 2}',), 1, ("north", "south")),
        (
            "public.measurement",
            "rows differ",
            ('{"day": "2025-05-01", "sensor": 1}',),
            1,
            ("north", "south"),
        ),
    ]


def test_excluded_tables_and_other_schemas_are_not_compared(nodes: Nodes) -> None:
    nodes.execute_everywhere(
        "CREATE TABLE kept (id int PRIMARY KEY); CREATE TABLE scratch (id int PRIMARY KEY);"
        "CREATE SCHEMA private; CREATE TABLE private.notes (id int PRIMARY KEY)"
    )
    nodes.execute("north", "INSERT INTO scratch VALUES (1); INSERT INTO private.notes VALUES (1)")

    report = verify(nodes.config(replication='[replication]\nexclude = ["public.scratch"]\n'))

    assert report.identical, report.to_json()
    assert report.tables == ("public.kept",)


def test_randomized_differences_are_all_found(
    nodes: Nodes, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Small fetches, so that the merge crosses many cursor batches on both sides.
    monkeypatch.setattr(verify_module, "_FETCH_SIZE", 17)
    chooser = random.Random(20240601)
    alphabet = "aAzZ09 _-é€😀\"\\'"
    keys = sorted(
        {"".join(chooser.choices(alphabet, k=chooser.randint(1, 6))) for _ in range(3000)}
    )
    rows = {key: chooser.randint(0, 9) for key in keys}
    nodes.execute_everywhere("CREATE TABLE t (k text PRIMARY KEY, v int)")
    for node in ("north", "south"):
        with psycopg.connect(nodes.dsns[node]) as connection, connection.cursor() as cursor:
            cursor.executemany("INSERT INTO t VALUES (%s, %s)", list(rows.items()))

    only_north, only_south, changed = set(), set(), set()
    for key in keys:
        fate = chooser.random()
        if fate < 0.03:
            only_north.add(key)
        elif fate < 0.06:
            only_south.add(key)
        elif fate < 0.09:
            changed.add(key)
    with psycopg.connect(nodes.dsns["south"]) as connection, connection.cursor() as cursor:
        cursor.executemany("DELETE FROM t WHERE k = %s", [(key,) for key in only_north])
        cursor.executemany("UPDATE t SET v = v + 100 WHERE k = %s", [(key,) for key in changed])
    with psycopg.connect(nodes.dsns["north"]) as connection, connection.cursor() as cursor:
        cursor.executemany("DELETE FROM t WHERE k = %s", [(key,) for key in only_south])

    report = verify(nodes.config())

    found = {difference.reason: difference for difference in report.differences}
    assert set(found) == {"rows differ", "rows missing on north", "rows missing on south"}
    for reason, expected in [
        ("rows differ", changed),
        ("rows missing on north", only_south),
        ("rows missing on south", only_north),
    ]:
        difference = found[reason]
        assert difference.key_count == len(expected)
        named = [json.loads(key)["k"] for key in difference.keys]
        assert len(named) == min(EXAMPLE_KEY_LIMIT, len(expected))
        assert set(named) <= expected


def test_progress_reports_each_table(nodes: Nodes) -> None:
    nodes.execute_everywhere(
        "CREATE TABLE a (id int PRIMARY KEY); CREATE TABLE b (id int PRIMARY KEY)"
    )
    nodes.execute("south", "INSERT INTO b VALUES (1)")
    messages: list[str] = []

    verify(nodes.config(), messages.append)

    assert messages == ["public.a: identical, 0 rows", "public.b: 1 difference, 0 rows"]


def test_a_table_difference_is_a_plain_value() -> None:
    difference = TableDifference("public.t", "rows differ", ('{"id": 1}',), 1, ("north", "south"))
    report = VerifyReport(("public.t",), {"public.t": 1}, (difference,), {})
    assert not report.identical
    assert VerifyReport(("public.t",), {"public.t": 1}, (), {}).identical
    assert not VerifyReport((), {}, (), {"south": "cannot connect"}).identical


def test_differences_that_jsonb_would_hide_are_found(nodes: Nodes) -> None:
    """-0 against 0, json text, array bounds: to_jsonb() alone would call them equal."""
    nodes.execute_everywhere("CREATE TABLE shapes (id int PRIMARY KEY, f float8, j json, a int[])")
    names = list(nodes.dsns)
    nodes.execute(names[0], """INSERT INTO shapes VALUES (1, 0, '{"a": 1}', '{1,2}')""")
    nodes.execute(names[1], """INSERT INTO shapes VALUES (1, '-0', '{"a":1}', '[0:1]={1,2}')""")
    report = verify(nodes.config())
    assert not report.identical
    assert [d.table for d in report.differences] == ["public.shapes"]
    nodes.execute(names[1], """UPDATE shapes SET f = 0, j = '{"a": 1}', a = '{1,2}'""")
    assert verify(nodes.config()).identical
