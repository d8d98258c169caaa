"""What a join reports: to an observer as it goes, and in a JoinReport when it is done."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


class JoinObserver(Protocol):
    """What a join reports as it goes; the command line draws it, tests may interrupt it."""

    def note(self, text: str) -> None: ...

    def table_started(self, name: str, number: int, count: int, estimated_rows: int) -> None: ...

    def rows_copied(self, rows: int) -> None: ...

    def table_done(self, name: str, rows: int) -> None: ...


class QuietObserver:
    """Reports nothing."""

    def note(self, text: str) -> None:
        pass

    def table_started(self, name: str, number: int, count: int, estimated_rows: int) -> None:
        pass

    def rows_copied(self, rows: int) -> None:
        pass

    def table_done(self, name: str, rows: int) -> None:
        pass


@dataclass
class JoinReport:
    node: str
    donor: str = ""
    tables: int = 0
    copied: dict[str, int] = field(default_factory=dict)  # copied by this run: table -> rows
    kept: list[str] = field(default_factory=list)  # copied by an earlier, interrupted run
    created: list[str] = field(default_factory=list)  # created from the donor's definitions
    discarded: str | None = None  # what of the node's own data was thrown away, and why
    seconds: float = 0.0

    @property
    def rows(self) -> int:
        return sum(self.copied.values())
