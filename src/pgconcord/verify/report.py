"""What verify found: a VerifyReport with one TableDifference per thing that differs, naming up to
EXAMPLE_KEY_LIMIT of the keys concerned and counting all of them."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

EXAMPLE_KEY_LIMIT = 20


@dataclass(frozen=True)
class TableDifference:
    table: str
    """The table as "schema.table"."""
    reason: str
    """What differs, e.g. "rows differ", "rows missing on south", "missing on south"."""
    keys: tuple[str, ...]
    """Up to EXAMPLE_KEY_LIMIT differing primary keys as JSON text, e.g. '{"id": 5}'."""
    key_count: int
    """How many keys differ in all; 0 when the difference is not about rows that can be named."""
    nodes: tuple[str, ...]
    """The nodes the difference is about: those lacking something, or those that disagree."""

    def to_json(self) -> dict[str, Any]:
        return {
            "table": self.table,
            "reason": self.reason,
            "keys": list(self.keys),
            "key_count": self.key_count,
            "nodes": list(self.nodes),
        }


@dataclass(frozen=True)
class VerifyReport:
    tables: tuple[str, ...]
    """The tables compared, as "schema.table"."""
    rows: dict[str, int]
    """Row count per table, from the first node (in config order) that has it."""
    differences: tuple[TableDifference, ...]
    unreachable: dict[str, str]
    """Node name -> why it could not be read; its tables were not compared."""

    @property
    def identical(self) -> bool:
        # A node that could not be read may hold anything, so it leaves nothing proven.
        return not self.differences and not self.unreachable

    def to_json(self) -> dict[str, Any]:
        return {
            "identical": self.identical,
            "tables": list(self.tables),
            "rows": dict(self.rows),
            "differences": [difference.to_json() for difference in self.differences],
            "unreachable": dict(self.unreachable),
        }


@dataclass
class _KeySample:
    """The first differing keys of one kind, and how many there are in all."""

    keys: list[str] = field(default_factory=list)
    count: int = 0
    nodes: set[str] = field(default_factory=set)

    def add(self, key: str, nodes: Iterable[str]) -> None:
        self.count += 1
        if len(self.keys) < EXAMPLE_KEY_LIMIT:
            self.keys.append(key)
        self.nodes.update(nodes)
