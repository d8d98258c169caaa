"""The comparison: each node read in one transaction of its own, each table compared by hash on
every node holding it and row by row where the hashes differ; a node that drops out, or refuses
a table, is left out and the table compared again without it."""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterable, Iterator
from contextlib import ExitStack, closing, contextmanager
from dataclasses import dataclass, field

import psycopg
from psycopg import sql

from pgconcord import catalog
from pgconcord.catalog import Table
from pgconcord.config import ClusterConfig
from pgconcord.errors import FatalError, NodeUnavailable
from pgconcord.transport import connect
from pgconcord.verify.report import TableDifference, VerifyReport, _KeySample
from pgconcord.verify.statements import (
    _ROW,
    _SESSION_SETTINGS,
    _hash_statement,
    _rows_statement,
)

_FETCH_SIZE = 5000

_CURSOR_NAME = "pgconcord_verify_rows"
_SAVEPOINT = sql.Identifier("pgconcord_verify_table")

_PARTITIONED_TABLES = """
SELECT n.nspname, c.relname
  FROM pg_class c
  JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = ANY (%s) AND c.relkind = 'p'
"""

_TableName = tuple[str, str]


class _NodeLost(Exception):
    """The connection to a node broke while it was being read."""

    def __init__(self, node: str, reason: str) -> None:
        super().__init__(f"node {node}: {reason}")
        self.node = node
        self.reason = reason


class _TableUnreadable(Exception):
    """A node refused to read one table (permissions, a type without output); others go on."""

    def __init__(self, node: str, reason: str) -> None:
        super().__init__(f"node {node}: {reason}")
        self.node = node
        self.reason = reason


@dataclass
class _Node:
    name: str
    connection: psycopg.Connection[tuple[object, ...]]
    tables: dict[_TableName, Table] = field(default_factory=dict)
    partitioned: set[_TableName] = field(default_factory=set)


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


@contextmanager
def _reading(node: _Node) -> Iterator[None]:
    """Tell a lost connection (the node drops out) from a refused query (one table fails)."""
    try:
        yield
    except psycopg.Error as error:
        if node.connection.closed:
            raise _NodeLost(node.name, f"connection lost: {_first_line(error)}") from error
        raise _TableUnreadable(node.name, _first_line(error)) from error


def _source(node: _Node, name: _TableName) -> sql.Composable:
    table = node.tables[name]
    # ONLY: an inheritance child is a table of its own (discovered and captured separately), so
    # its rows must not also count as the parent's. A partitioned table has no rows but its
    # partitions', which are reached only through it.
    only = sql.SQL("") if name in node.partitioned else sql.SQL("ONLY ")
    return sql.SQL("{}{} AS {}").format(only, table.identifier, _ROW)


def _stream_rows(node: _Node, statement: sql.Composed) -> Generator[tuple[str, str], None, None]:
    """(key, row hash) pairs through a server-side cursor, so no table is held in memory."""
    previous: str | None = None
    with _reading(node), node.connection.cursor(name=_CURSOR_NAME) as cursor:
        cursor.itersize = _FETCH_SIZE
        cursor.execute(statement)
        for key, row_hash in cursor:
            key_text = str(key)
            if previous is not None and key_text <= previous:
                # A silent misorder would report equal rows as missing; better to stop.
                raise FatalError(
                    f"node {node.name}: keys arrive out of order ({previous} before {key_text})"
                )
            previous = key_text
            yield key_text, str(row_hash)


def _merge(
    streams: dict[str, Iterator[tuple[str, str]]],
) -> Iterator[tuple[str, dict[str, str]]]:
    """Every key found on any node, in key order, with each node's row hash for it."""
    heads: dict[str, tuple[str, str]] = {}
    for node, stream in streams.items():
        first = next(stream, None)
        if first is not None:
            heads[node] = first
    while heads:
        key = min(head_key for head_key, _ in heads.values())
        versions: dict[str, str] = {}
        for node in list(heads):
            head_key, row_hash = heads[node]
            if head_key != key:
                continue
            versions[node] = row_hash
            following = next(streams[node], None)
            if following is None:
                del heads[node]
            else:
                heads[node] = following
        yield key, versions


def _joined(names: Iterable[str]) -> str:
    return ", ".join(names)


class _Verification:
    def __init__(self, config: ClusterConfig, progress: Callable[[str], None]) -> None:
        self.config = config
        self.progress = progress
        self.order = {name: index for index, name in enumerate(config.node_names)}
        self.nodes: dict[str, _Node] = {}
        self.unreachable: dict[str, str] = {}
        self.tables: list[str] = []
        self.rows: dict[str, int] = {}
        self.differences: list[TableDifference] = []

    def run(self) -> VerifyReport:
        try:
            self._connect()
            for node in list(self.nodes.values()):
                self._begin(node)
            names = sorted({name for node in self.nodes.values() for name in node.tables})
            for name in names:
                self._compare_table(name)
        finally:
            for node in self.nodes.values():
                node.connection.close()
        return VerifyReport(
            tables=tuple(self.tables),
            rows=self.rows,
            differences=tuple(self.differences),
            unreachable={
                name: self.unreachable[name]
                for name in sorted(self.unreachable, key=self.order.__getitem__)
            },
        )

    def _connect(self) -> None:
        # Every node is connected before any transaction starts, so the snapshots taken next
        # are as close in time as the network allows.
        for node_config in self.config.nodes:
            try:
                connection = connect(node_config)
            except NodeUnavailable as error:
                self._mark_unreachable(error.node, error.reason)
                continue
            self.nodes[node_config.name] = _Node(node_config.name, connection)

    def _begin(self, node: _Node) -> None:
        connection = node.connection
        connection.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        connection.read_only = True
        # pgconcord's own tables hold each node's private bookkeeping, which rightly differs.
        schemas = [schema for schema in self.config.replication.schemas if schema != catalog.SCHEMA]
        try:
            for setting, value in _SESSION_SETTINGS:
                connection.execute("SELECT set_config(%s, %s, false)", (setting, value))
            found = catalog.discover_tables(
                connection, schemas, set(self.config.replication.exclude)
            )
            partitioned = connection.execute(_PARTITIONED_TABLES, (schemas,)).fetchall()
        except psycopg.Error as error:
            reason = "connection lost" if connection.closed else "cannot read the catalog"
            self._lose(node.name, f"{reason}: {_first_line(error)}")
            return
        node.tables = {(table.schema, table.name): table for table in found}
        node.partitioned = {(str(schema), str(table)) for schema, table in partitioned}

    def _mark_unreachable(self, node: str, reason: str) -> None:
        self.unreachable[node] = reason
        self.progress(f"{node}: unreachable: {reason}")

    def _lose(self, node: str, reason: str) -> None:
        self._mark_unreachable(node, reason)
        lost = self.nodes.pop(node, None)
        if lost is not None:
            lost.connection.close()

    def _compare_table(self, name: _TableName) -> None:
        """Compare one table, again from the start if a node drops out or refuses it."""
        qualified_name = f"{name[0]}.{name[1]}"
        refused: dict[str, str] = {}
        while True:
            try:
                outcome = self._attempt(name, qualified_name, refused)
            except _NodeLost as lost:
                self._lose(lost.node, lost.reason)
                continue
            except _TableUnreadable as failure:
                refused[failure.node] = failure.reason
                self._recover(failure.node)
                continue
            break
        if outcome is None:
            return
        row_count, differences = outcome
        differences[:0] = [
            TableDifference(qualified_name, f"cannot read on {node}: {reason}", (), 0, (node,))
            for node, reason in refused.items()
        ]
        self.tables.append(qualified_name)
        self.differences.extend(differences)
        if row_count is not None:
            self.rows[qualified_name] = row_count
        count = len(differences)
        summary = f"{count} difference{'' if count == 1 else 's'}" if count else "identical"
        rows = "" if row_count is None else f", {row_count} row{'' if row_count == 1 else 's'}"
        self.progress(f"{qualified_name}: {summary}{rows}")

    def _recover(self, node_name: str) -> None:
        node = self.nodes.get(node_name)
        if node is None:
            return
        try:
            # Back to before the failed query: the transaction, and its snapshot, go on.
            node.connection.execute(sql.SQL("ROLLBACK TO SAVEPOINT {}").format(_SAVEPOINT))
        except psycopg.Error as error:
            self._lose(node_name, f"connection lost: {_first_line(error)}")

    def _attempt(
        self, name: _TableName, qualified_name: str, refused: dict[str, str]
    ) -> tuple[int | None, list[TableDifference]] | None:
        """The table's row count on the first node holding it, and its differences; None when
        no node still in the comparison holds it."""
        holders = [
            node for node in self.nodes.values() if name in node.tables and node.name not in refused
        ]
        lacking = [
            node.name
            for node in self.nodes.values()
            if name not in node.tables and node.name not in refused
        ]
        if not holders and not refused:
            return None
        differences: list[TableDifference] = []
        if lacking:
            differences.append(
                TableDifference(
                    qualified_name, f"missing on {_joined(lacking)}", (), 0, tuple(lacking)
                )
            )
        if not holders:
            return None, differences
        definitions = {node.name: node.tables[name] for node in holders}
        differences += _shape_differences(qualified_name, definitions)
        column_sets = [{column.name for column in table.columns} for table in definitions.values()]
        excluded = sorted(
            column_sets[0].union(*column_sets) - column_sets[0].intersection(*column_sets)
        )

        text_columns = sorted(
            {c.name for table in definitions.values() for c in table.columns if c.as_text}
            - set(excluded)
        )
        for node in holders:
            with _reading(node):
                node.connection.execute(sql.SQL("SAVEPOINT {}").format(_SAVEPOINT))
        hashes: dict[str, tuple[object, ...]] = {}
        for node in holders:
            with _reading(node):
                row = node.connection.execute(
                    _hash_statement(_source(node, name), excluded, text_columns)
                ).fetchone()
            assert row is not None, "an aggregate returns one row"
            hashes[node.name] = row
        row_count = int(str(hashes[holders[0].name][0]))

        if len(set(hashes.values())) > 1:
            key_columns = {table.key_columns for table in definitions.values()}
            if len(key_columns) == 1 and () not in key_columns:
                differences += self._row_differences(
                    qualified_name, name, holders, key_columns.pop(), excluded, text_columns
                )
            else:
                counts = _joined(f"{hashes[node.name][0]} on {node.name}" for node in holders)
                why = "no primary key" if key_columns == {()} else "the primary keys differ"
                differences.append(
                    TableDifference(
                        qualified_name,
                        f"rows differ ({counts}; rows cannot be named: {why})",
                        (),
                        0,
                        tuple(definitions),
                    )
                )
        for node in holders:
            with _reading(node):
                node.connection.execute(sql.SQL("RELEASE SAVEPOINT {}").format(_SAVEPOINT))
        return row_count, differences

    def _row_differences(
        self,
        qualified_name: str,
        name: _TableName,
        holders: list[_Node],
        key_columns: tuple[str, ...],
        excluded: list[str],
        text_columns: list[str],
    ) -> list[TableDifference]:
        differing = _KeySample()
        missing = {node.name: _KeySample() for node in holders}
        with ExitStack() as streams:
            # closing(): a stream abandoned by an error elsewhere closes its cursor now, before
            # the savepoint is rolled back, not whenever the generator is collected.
            merged = _merge(
                {
                    node.name: streams.enter_context(
                        closing(
                            _stream_rows(
                                node,
                                _rows_statement(
                                    _source(node, name), key_columns, excluded, text_columns
                                ),
                            )
                        )
                    )
                    for node in holders
                }
            )
            for key, versions in merged:
                for node in holders:
                    if node.name not in versions:
                        missing[node.name].add(key, [node.name])
                if len(set(versions.values())) > 1:
                    differing.add(key, versions)
        differences = []
        if differing.count:
            differences.append(
                TableDifference(
                    qualified_name,
                    "rows differ",
                    tuple(differing.keys),
                    differing.count,
                    tuple(sorted(differing.nodes, key=self.order.__getitem__)),
                )
            )
        for node_name, sample in missing.items():
            if sample.count:
                differences.append(
                    TableDifference(
                        qualified_name,
                        f"rows missing on {node_name}",
                        tuple(sample.keys),
                        sample.count,
                        (node_name,),
                    )
                )
        return differences


def _shape_differences(qualified_name: str, definitions: dict[str, Table]) -> list[TableDifference]:
    """Columns missing on some nodes, column types and primary keys that are not alike."""
    differences = []
    nodes = list(definitions)
    column_names: list[str] = []
    for table in definitions.values():
        column_names += [column.name for column in table.columns if column.name not in column_names]
    for column_name in column_names:
        types = {
            node: next(
                (column.type_name for column in table.columns if column.name == column_name), None
            )
            for node, table in definitions.items()
        }
        lacking = tuple(node for node in nodes if types[node] is None)
        if lacking:
            differences.append(
                TableDifference(
                    qualified_name,
                    f"column {column_name} missing on {_joined(lacking)}",
                    (),
                    0,
                    lacking,
                )
            )
            continue
        if len(set(types.values())) > 1:
            differences.append(
                TableDifference(
                    qualified_name,
                    f"column {column_name} differs in type: "
                    + _joined(f"{types[node]} on {node}" for node in nodes),
                    (),
                    0,
                    tuple(nodes),
                )
            )
    if len({table.key_columns for table in definitions.values()}) > 1:
        differences.append(
            TableDifference(
                qualified_name,
                "primary key differs: "
                + _joined(
                    f"({', '.join(table.key_columns)}) on {node}"
                    for node, table in definitions.items()
                ),
                (),
                0,
                tuple(nodes),
            )
        )
    return differences


def verify(config: ClusterConfig, progress: Callable[[str], None] | None = None) -> VerifyReport:
    """Compare every replicated table across all nodes; unreachable nodes are reported and the
    others compared. `progress` receives one line per node problem and per table compared."""
    return _Verification(config, progress or (lambda _message: None)).run()
