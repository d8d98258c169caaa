"""The conflict rules (pgconcord.conflict.rules) are the reference of the SQL that applies them.

Plain tests of the rules first, without a database; then properties that generate versions,
column maps, order keys and changes and check that the SQL gives the rule's answer, evaluated on
one database where setup installed the catalog: its functions called directly, and the decision
and recording fragments of conflict/decision.py (the very text the apply runs) over rows made
from the generated values.
"""

from __future__ import annotations

import ast
import itertools
import json
from collections.abc import Iterator
from dataclasses import replace
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import _shared, available_postgres_binaries
from harness import Cluster
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg import sql
from psycopg.types.json import Jsonb

from pgconcord.conflict import decision, rules, statements
from pgconcord.conflict.rules import Change, Decision, RowVersion, Version

# -- the rules alone ---------------------------------------------------------------------------


def test_the_rules_need_no_database() -> None:
    tree = ast.parse(Path(rules.__file__).read_text())
    imported = {
        name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for name in (
            [alias.name for alias in node.names]
            if isinstance(node, ast.Import)
            else [node.module or ""]
        )
    }
    assert imported <= {"__future__", "collections", "dataclasses", "decimal", "typing"}


def test_the_greater_version_wins_by_order_key_then_clock_then_node_bytes() -> None:
    assert rules.incoming_wins(Version(2, "a"), Version(1, "z"))
    assert rules.incoming_wins(Version(1, "b"), Version(1, "a"))
    assert not rules.incoming_wins(Version(1, "a"), Version(1, "a"))
    assert rules.incoming_wins(Version(1, "a", (1,)), Version(9, "z", (0, 5)))
    assert rules.incoming_wins(Version(1, "a"), None)
    # Bytes, not a locale: "Z" (0x5a) < "a" (0x61) < "ä" (0xc3 0xa4).
    assert rules.incoming_wins(Version(1, "a"), Version(1, "Z"))
    assert rules.incoming_wins(Version(1, "ä"), Version(1, "b"))


def test_a_conflict_is_a_version_the_writer_had_not_seen() -> None:
    assert not rules.is_conflict(Version(5, "a"), Version(5, "a"))
    assert not rules.is_conflict(Version(5, "a"), Version(4, "b"))
    assert not rules.is_conflict(None, None)
    assert rules.is_conflict(Version(5, "a"), Version(6, "b"))
    assert rules.is_conflict(None, Version(1, "b"))


def test_conflict_types() -> None:
    assert [
        rules.conflict_type(operation, deleted)
        for operation, deleted in itertools.product("IUD", (False, True))
    ] == [
        "insert_exists",
        "insert_deleted",
        "update_origin_differs",
        "update_deleted",
        "delete_origin_differs",
        "delete_missing",
    ]


def test_order_keys() -> None:
    assert rules.next_order_key("last-writer-wins", 1, 2, (3, 4), False, "U", 9) == ()
    # node-priority: the writer's entry takes the clock, the others are kept (or padded).
    assert rules.next_order_key("node-priority", 2, 3, (7,), False, "U", 9) == (7, 9, 0)
    assert rules.next_order_key("node-priority", 0, 2, None, None, "I", 9) == (0, 0)
    # keep-existing: the first insert ranks by its clock, an insert after a delete starts a
    # new generation, anything else inherits.
    assert rules.next_order_key("keep-existing", 0, 0, None, None, "I", 9) == (0, -9)
    assert rules.next_order_key("keep-existing", 0, 0, None, None, "U", 9) == (0, 0)
    assert rules.next_order_key("keep-existing", 0, 0, (0, -9), True, "I", 12) == (1, -12)
    assert rules.next_order_key("keep-existing", 0, 0, (0, -9), False, "U", 12) == (0, -9)


def test_version_text_sorts_like_the_version() -> None:
    assert rules.version_text(255, "north") == "00000000000000ffnorth"
    assert rules.version_text(-1, "") == "f" * 16
    assert rules.version_text(16, "a") > rules.version_text(15, "z")


def test_column_maps_merge_by_the_greater_version() -> None:
    old, new = rules.version_text(1, "a"), rules.version_text(2, "a")
    assert rules.merge_versions({"x": old, "y": new}, {"x": new, "z": old}) == {
        "x": new,
        "y": new,
        "z": old,
    }
    assert rules.merge_versions(None, {"x": old}) == {"x": old}
    assert rules.merge_versions({"x": old}, None) == {"x": old}
    assert rules.merge_versions(None, None) is None


GENERATION = Version(10, "north")


def update(clock: int, origin: str, seen: int, **columns: int) -> Change:
    """An update of GENERATION by origin at clock, having seen the row at (seen, north)."""
    return Change(
        "U",
        clock,
        origin,
        generation=(GENERATION.clock, GENERATION.origin),
        column_versions={c: rules.version_text(v, origin) for c, v in columns.items()},
        previous=(seen, "north"),
    )


def test_decision_modes() -> None:
    here = RowVersion(GENERATION, column_versions={}, last=(10, "north"))
    assert rules.decide_mode(Change("I", 11, "south"), here) == "full"
    assert rules.decide_mode(Change("I", 9, "south"), here) == "lose"
    assert rules.decide_mode(Change("D", 11, "south"), here) == "delete"
    assert rules.decide_mode(Change("D", 10, "a"), here) == "lose"  # "a" < "north"
    assert rules.decide_mode(update(12, "south", 10, x=12), here) == "merge"
    assert rules.decide_mode(update(12, "south", 10, x=12), None) == "full"
    tombstone = RowVersion(Version(11, "north"), deleted=True)
    assert rules.decide_mode(update(12, "south", 10, x=12), tombstone) == "lose"
    assert rules.decide_mode(Change("D", 12, "south"), tombstone) == "delete"
    pre_existing = Change("U", 3, "south", generation=(0, ""), column_versions={})
    assert rules.decide_mode(pre_existing, None) == "merge"


def test_a_merge_takes_newer_columns_and_records_what_both_changed() -> None:
    here = RowVersion(
        GENERATION,
        column_versions={"x": rules.version_text(11, "north"), "y": rules.version_text(13, "a")},
        last=(13, "a"),
    )
    made = rules.decide(update(12, "south", 10, x=12, y=12, z=12), here)
    assert made.mode == "merge"
    assert made.taken == {"x", "z"}
    assert made.overlap == {"x", "y"}
    assert made.last_write == (13, "a")
    assert rules.is_recorded(made, here.last_write, (10, "north"))
    assert rules.resolution(made, won=True) == "merged"
    # A writer that had seen the local change: no conflict on x, and y is left alone.
    later = rules.decide(update(14, "south", 13, x=14), here)
    assert later.taken == {"x"} and later.overlap == frozenset()
    assert not rules.is_recorded(later, here.last_write, (13, "north"))


def test_counters_add_the_sum_of_differences() -> None:
    changes = [("U", {"n": 5, "m": 1}, {"n": 3, "m": 1}), ("U", {"n": 4, "m": None}, {"n": 5})]
    assert rules.piece_delta(changes, ["n", "m"]) == {"n": Decimal(1), "m": Decimal(0)}
    assert rules.piece_delta([*changes, ("D", None, None)], ["n"]) is None
    assert rules.piece_delta([("U", {"n": 1}, None)], ["n"]) is None
    assert rules.add_counter(Decimal(10), Decimal(-3)) == Decimal(7)
    assert rules.add_counter(Decimal(10), None) == Decimal(10)
    alive = RowVersion(GENERATION)
    assert rules.is_counted({"n": 1}, alive)
    assert not rules.is_counted({"n": 1}, RowVersion(GENERATION, deleted=True))
    assert not rules.is_counted(None, alive)
    assert rules.only_counters_differ({"n": 1}, {"id": 1, "n": 4}, {"id": 1, "n": 9}, ["n"])
    assert not rules.only_counters_differ({"n": 1}, {"id": 1, "n": 4, "s": "x"}, {"id": 1}, ["n"])


# -- strategies --------------------------------------------------------------------------------

# Few values, so that equal versions (and ties broken by node name) are frequent. Node names
# whose bytes and a locale order differently ("Z" < "a" < "ä").
origins = st.sampled_from(["north", "south", "a", "Z", "ä", "ab"])
clocks = st.integers(min_value=1, max_value=6) | st.integers(min_value=1, max_value=2**62)
order_keys = st.lists(st.integers(min_value=-3, max_value=3), max_size=3).map(tuple)
versions = st.builds(Version, clocks, origins, order_keys)
columns = st.sampled_from(["a", "b", "c", "ä"])
version_texts = st.builds(rules.version_text, clocks, origins)
column_maps = st.dictionaries(columns, version_texts, max_size=4)
filled_maps = st.dictionaries(columns, version_texts, min_size=1, max_size=4)
writes = st.tuples(clocks, origins)


@st.composite
def local_versions(draw: st.DrawFn) -> RowVersion | None:
    if draw(st.booleans()) and draw(st.booleans()):
        return None
    version = draw(versions)
    deleted = draw(st.booleans()) and draw(st.booleans())
    return RowVersion(
        version,
        deleted=deleted,
        column_versions=None if deleted else draw(st.none() | filled_maps | filled_maps),
        last=None if deleted else draw(st.none() | writes),
    )


@st.composite
def changes_against(draw: st.DrawFn, local: RowVersion | None) -> Change:
    operation = draw(st.sampled_from("IUUUUD"))
    clock, origin = draw(writes)
    order_key = draw(order_keys)
    generation = None
    if operation == "U":
        choice = draw(st.sampled_from(["here", "here", "here", "here", "other", "zero", "own"]))
        if choice == "here" and local is not None:
            generation = (local.version.clock, local.version.origin)
            order_key = local.version.order_key
        elif choice == "zero":
            generation = (0, "")
        elif choice == "other":
            generation = draw(writes)
    column_versions = None
    if operation == "U" and draw(st.integers(0, 3)) > 0:
        # Often some of the columns the row here has, at the same version as here.
        here = (local.column_versions if local else None) or {}
        kept = draw(st.sets(st.sampled_from(sorted(here)))) if here else set()
        column_versions = {c: here[c] for c in kept} | draw(column_maps | filled_maps)
    return Change(
        operation,
        clock,
        origin,
        order_key,
        generation=generation,
        column_versions=column_versions,
        previous=draw(st.none() | writes | st.just(local.last_write if local else (1, "a"))),
    )


@st.composite
def decision_cases(draw: st.DrawFn) -> tuple[Change, RowVersion | None]:
    local = draw(local_versions())
    return draw(changes_against(local)), local


@st.composite
def merge_cases(draw: st.DrawFn) -> tuple[Change, RowVersion | None]:
    """An update of the generation here, both sides having written columns at nearby clocks:
    columns taken or not, overlapping or not, seen or not."""
    generation = draw(versions)
    near = st.integers(generation.clock, generation.clock + 6)
    near_texts = st.builds(rules.version_text, near, origins)
    local = RowVersion(
        generation,
        column_versions=draw(st.dictionaries(columns, near_texts, min_size=1)),
        last=draw(st.none() | st.tuples(near, origins)),
    )
    change = Change(
        "U",
        draw(near),
        draw(origins),
        generation.order_key,
        generation=(generation.clock, generation.origin),
        column_versions=draw(st.dictionaries(columns, near_texts, min_size=1)),
        previous=draw(st.none() | st.tuples(near, origins)),
    )
    return change, local


# -- the SQL agrees ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def catalog(
    server_pool: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[psycopg.Connection[Any]]:
    """One database where setup installed pgconcord's catalog, for the whole module."""
    cluster = Cluster(
        _shared(server_pool, available_postgres_binaries()[0]),
        Path(tmp_path_factory.mktemp("conflict_rules")),
    )
    try:
        cluster.setup()
        with psycopg.connect(cluster.dsns["north"], autocommit=True) as connection:
            yield connection
    finally:
        cluster.drop()


PROPERTY = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def jsonb(values: dict[str, Any]) -> Jsonb:
    """A record for jsonb_to_record: a None is left out (a missing key is SQL NULL)."""
    return Jsonb({key: value for key, value in values.items() if value is not None})


def same_map(found: dict[str, str] | None, expected: dict[str, str] | None) -> bool:
    """Column maps agree: None and {} mean the same (no column written since the generation)."""
    return (found or {}) == (expected or {})


@PROPERTY
@given(st.integers(min_value=0, max_value=2**63 - 1), origins, writes)
def test_version_text_agrees(
    catalog: psycopg.Connection[Any], clock: int, origin: str, other: tuple[int, str]
) -> None:
    found, ordered = catalog.execute(
        "SELECT pgconcord.version_text(%s, %s),"
        ' pgconcord.version_text(%s, %s) COLLATE "C" > pgconcord.version_text(%s, %s)',
        (clock, origin, clock, origin, *other),
    ).fetchone() or (None, None)
    assert found == rules.version_text(clock, origin)
    assert ordered == ((clock, origin.encode()) > (other[0], other[1].encode()))


@PROPERTY
@given(st.none() | column_maps, st.none() | column_maps)
def test_merge_versions_agrees(
    catalog: psycopg.Connection[Any],
    local: dict[str, str] | None,
    incoming: dict[str, str] | None,
) -> None:
    maps = {
        "local": None if local is None else Jsonb(local),
        "incoming": None if incoming is None else Jsonb(incoming),
    }
    # The function, and the apply's statements' copy of it (decision.merged_maps).
    row = catalog.execute(
        "SELECT pgconcord.merge_versions(%(local)s, %(incoming)s), "
        + decision.merged_maps("%(local)s::jsonb", "%(incoming)s::jsonb"),
        maps,
    ).fetchone()
    assert row is not None
    assert same_map(row[0], rules.merge_versions(local, incoming))
    assert same_map(row[1], rules.merge_versions(local, incoming))


@st.composite
def order_key_cases(draw: st.DrawFn) -> tuple[Any, ...]:
    policy = draw(st.sampled_from(["last-writer-wins", "node-priority", "keep-existing"]))
    levels = draw(st.integers(min_value=0, max_value=3))
    node_level = draw(st.integers(min_value=0, max_value=levels))
    previous = draw(st.none() | st.lists(st.integers(-(2**40), 2**40), max_size=4).map(tuple))
    deleted = draw(st.none() | st.booleans())
    return policy, node_level, levels, previous, deleted, draw(st.sampled_from("IUD")), draw(clocks)


@PROPERTY
@given(order_key_cases())
def test_next_order_key_agrees(catalog: psycopg.Connection[Any], case: tuple[Any, ...]) -> None:
    policy, node_level, levels, previous, deleted, operation, clock = case
    row = catalog.execute(
        'SELECT pgconcord.next_order_key(%s, %s, %s, %s::bigint[], %s, %s::"char", %s)',
        (
            policy,
            node_level,
            levels,
            None if previous is None else list(previous),
            deleted,
            operation,
            clock,
        ),
    ).fetchone()
    assert row is not None
    assert tuple(row[0]) == rules.next_order_key(*case)


# The decision fragments over one staged change (i, made as the DECIDE statement makes it) and
# the row's version here (l, as its `locked` makes it; absent when it has no row_key).
DECIDE_ONE = (
    "SELECT "
    + decision.DECISION_COLUMNS
    + """
  FROM (SELECT s.row_key, s.operation, s.clock, s.order_key, s.previous_clock,
               s.previous_origin, coalesce(s.generation_clock, s.clock) AS generation_clock,
               coalesce(s.generation_origin, %(origin)s) AS generation_origin,
               s.column_versions
          FROM jsonb_to_record(%(incoming)s) AS s(
               row_key jsonb, operation "char", clock bigint, order_key bigint[],
               previous_clock bigint, previous_origin text, generation_clock bigint,
               generation_origin text, column_versions jsonb)) AS i
  LEFT JOIN (SELECT v.row_key, v.clock, v.origin, v.deleted, v.order_key, v.column_versions,
                    coalesce(v.last_clock, v.clock) AS last_clock,
                    coalesce(v.last_origin, v.origin) AS last_origin
               FROM jsonb_to_record(%(local)s) AS v(
                    row_key jsonb, clock bigint, origin text, deleted boolean,
                    order_key bigint[], column_versions jsonb, last_clock bigint,
                    last_origin text)) AS l ON l.row_key = i.row_key
 CROSS JOIN LATERAL ("""
    + decision.DECIDE_MODE
    + ") AS m"
)


def decide_in_sql(
    connection: psycopg.Connection[Any], change: Change, local: RowVersion | None
) -> Decision:
    key = {"id": 1}
    incoming = {
        "row_key": key,
        "operation": change.operation,
        "clock": change.clock,
        "order_key": list(change.order_key),
        "previous_clock": change.previous[0] if change.previous else None,
        "previous_origin": change.previous[1] if change.previous else None,
        "generation_clock": change.generation[0] if change.generation else None,
        "generation_origin": change.generation[1] if change.generation else None,
        "column_versions": change.column_versions,
    }
    here: dict[str, Any] = {}
    if local is not None:
        here = {
            "row_key": key,
            "clock": local.version.clock,
            "origin": local.version.origin,
            "deleted": local.deleted,
            "order_key": list(local.version.order_key),
            "column_versions": local.column_versions,
            "last_clock": local.last[0] if local.last else None,
            "last_origin": local.last[1] if local.last else None,
        }
    row = connection.execute(
        DECIDE_ONE, {"origin": change.origin, "incoming": jsonb(incoming), "local": jsonb(here)}
    ).fetchone()
    assert row is not None
    mode, taken, merged, last_clock, last_origin, overlap = row
    return Decision(
        mode,
        taken=None if taken is None else frozenset(taken),
        merged_versions=merged,
        last_write=(last_clock, last_origin),
        overlap=None if overlap is None else frozenset(overlap),
    )


@PROPERTY
@given(decision_cases() | merge_cases())
def test_the_decision_agrees(
    catalog: psycopg.Connection[Any], case: tuple[Change, RowVersion | None]
) -> None:
    change, local = case
    found, expected = decide_in_sql(catalog, change, local), rules.decide(change, local)
    assert same_map(found.merged_versions, expected.merged_versions)
    assert replace(found, merged_versions=None) == replace(expected, merged_versions=None)


COUNTERS = ("n", "m")

# The recording fragments over one decided row (d), its winner (w: present if it won) and the
# row here (l).
RECORD_ONE = sql.SQL(
    "SELECT "
    + decision.RESOLUTION
    + ", "
    + decision.RECORDED
    + ", "
    + decision.RECORDED_WITHOUT_THE_ROW
    + """
  FROM jsonb_to_record(%(decided)s) AS d(
       mode text, taken text[], overlap text[], local_clock bigint, local_last_clock bigint,
       local_last_origin text, previous_clock bigint, previous_origin text, delta jsonb,
       new_row jsonb)
  LEFT JOIN (SELECT 1 AS row_key WHERE %(won)s) AS w ON true
 CROSS JOIN (SELECT %(local_row)s::jsonb AS local_row) AS l"""
).format(
    delta_names=sql.SQL("ARRAY[{}]::text[]").format(sql.SQL(", ").join(map(sql.Literal, COUNTERS)))
)

rows = st.none() | st.fixed_dictionaries(
    {"id": st.just(1), "n": st.integers(0, 3)}, optional={"s": st.sampled_from(["x", "y"])}
)


@PROPERTY
@given(
    mode=st.sampled_from(["delete", "full", "merge", "lose"]),
    taken=st.frozensets(columns),
    overlap=st.frozensets(columns),
    won=st.booleans(),
    local_last=st.none() | writes,
    previous=st.none() | writes,
    delta=st.none() | st.just({"n": 1}),
    new_row=rows,
    local_row=rows,
)
def test_recording_agrees(
    catalog: psycopg.Connection[Any],
    mode: rules.Mode,
    taken: frozenset[str],
    overlap: frozenset[str],
    won: bool,
    local_last: tuple[int, str] | None,
    previous: tuple[int, str] | None,
    delta: dict[str, int] | None,
    new_row: dict[str, Any] | None,
    local_row: dict[str, Any] | None,
) -> None:
    made = Decision(
        mode,
        taken=taken if mode == "merge" else None,
        overlap=overlap if mode == "merge" else None,
    )
    decided = {
        "mode": mode,
        "taken": sorted(made.taken) if made.taken is not None else None,
        "overlap": sorted(made.overlap) if made.overlap is not None else None,
        "local_clock": local_last[0] if local_last else None,
        "local_last_clock": local_last[0] if local_last else None,
        "local_last_origin": local_last[1] if local_last else None,
        "previous_clock": previous[0] if previous else None,
        "previous_origin": previous[1] if previous else None,
        "delta": delta,
        "new_row": new_row,
    }
    row = catalog.execute(
        RECORD_ONE,
        {
            "decided": jsonb(decided),
            "won": won,
            "local_row": None if local_row is None else json.dumps(local_row),
        },
    ).fetchone()
    assert row is not None
    counters_only = rules.only_counters_differ(delta, new_row, local_row, COUNTERS)
    assert row[0] == rules.resolution(made, won)
    assert row[1] == rules.is_recorded(made, local_last, previous, counters_only)
    # The statement asks the cheaper condition first: it never leaves out a record.
    assert row[2] or not row[1]


def test_conflict_types_agree(catalog: psycopg.Connection[Any]) -> None:
    for operation, deleted in itertools.product("IUD", (False, True)):
        found = catalog.execute(
            "SELECT "
            + decision._CONFLICT_TYPE_SQL
            + ' FROM (SELECT %s::"char" AS operation, %s AS local_deleted) AS d',
            (operation, deleted),
        ).fetchone()
        assert found == (rules.conflict_type(operation, deleted),)


counter_values = st.none() | st.integers(-5, 5) | st.sampled_from([0.5, -1.5, 2.5])
counter_rows = st.fixed_dictionaries({}, optional={"n": counter_values, "m": counter_values})
staged_changes = st.lists(
    st.tuples(st.sampled_from("UUUID"), counter_rows, st.none() | counter_rows),
    min_size=1,
    max_size=4,
)

DELTA_OF_ONE_ROW = """
SELECT DISTINCT ON (s.row_key) {delta}
  FROM jsonb_to_recordset(%s) AS s(id bigint, row_key jsonb, operation "char", new_row jsonb,
                                   old_values jsonb)
WINDOW every_change AS (PARTITION BY s.row_key)
 ORDER BY s.row_key, s.id DESC
"""


@PROPERTY
@given(staged_changes)
def test_counter_deltas_agree(
    catalog: psycopg.Connection[Any],
    changes: list[tuple[str, dict[str, Any], dict[str, Any] | None]],
) -> None:
    steps = [
        (operation, None if operation == "D" else new, old if operation == "U" else None)
        for operation, new, old in changes
    ]
    staged = [
        {
            key: value
            for key, value in {
                "id": index,
                "row_key": {"id": 1},
                "operation": operation,
                "new_row": new,
                "old_values": old,
            }.items()
            if value is not None
        }
        for index, (operation, new, old) in enumerate(steps)
    ]
    query = sql.SQL(DELTA_OF_ONE_ROW).format(delta=statements._delta_expression(COUNTERS))
    row = catalog.execute(query, (Jsonb(staged),)).fetchone()
    assert row is not None
    found = (
        None
        if row[0] is None
        else {k: None if v is None else Decimal(str(v)) for k, v in row[0].items()}
    )
    assert found == rules.piece_delta(steps, COUNTERS)


# -- properties of the rules alone -------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.none() | column_maps, st.none() | column_maps, st.none() | column_maps)
def test_the_merge_is_commutative_associative_and_idempotent(
    a: dict[str, str] | None, b: dict[str, str] | None, c: dict[str, str] | None
) -> None:
    merge = rules.merge_versions
    assert merge(a, b) == merge(b, a)
    assert merge(merge(a, b), c) == merge(a, merge(b, c))
    assert merge(a, a) == (None if a is None else dict(a))


@st.composite
def concurrent_updates(draw: st.DrawFn) -> list[Change]:
    """Updates of GENERATION from different nodes, each having seen only the generation, and
    perhaps a delete."""
    nodes = draw(st.lists(origins, min_size=1, max_size=4, unique=True))
    found = []
    for node in nodes:
        clock = draw(st.integers(min_value=GENERATION.clock + 1, max_value=GENERATION.clock + 4))
        changed = draw(st.frozensets(columns, min_size=1))
        found.append(
            Change(
                "U",
                clock,
                node,
                generation=(GENERATION.clock, GENERATION.origin),
                column_versions={c: rules.version_text(clock, node) for c in changed},
                previous=(GENERATION.clock, GENERATION.origin),
            )
        )
    if draw(st.booleans()):
        found.append(Change("D", draw(st.integers(11, 14)), draw(origins)))
    return draw(st.permutations(found))


@settings(max_examples=200, deadline=None)
@given(concurrent_updates())
def test_concurrent_updates_converge_whatever_the_order(changes: list[Change]) -> None:
    def arrive(order: list[Change]) -> RowVersion | None:
        here: RowVersion | None = RowVersion(GENERATION)
        for change in order:
            here = rules.apply_decision(change, here, rules.decide(change, here))
        return here

    final = arrive(changes)
    assert final is not None
    assert arrive(list(reversed(changes))) == final
    assert arrive(sorted(changes, key=lambda c: c.origin)) == final
