"""The Origin port: what a target asks of an origin, whatever carries it (see __init__.py).

A window is every transaction visible in a newer snapshot of the origin but not in the snapshot
the target last applied (the PgQ/Londiste scheme): a long transaction that commits after a later
short one is simply not visible yet, and lands in the window that first sees it. Uncommitted and
rolled-back transactions are never visible. The snapshots are the origin's business: the target
keeps them, as text, in its position.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from pgconcord.catalog import Table


@dataclass(frozen=True)
class Horizon:
    """What a copied table already holds of one origin's changes (see 007_copy_horizon)."""

    schema_name: str
    table_name: str
    applied_snapshot: str
    window_snapshot: str | None
    window_done: int | None


@dataclass(frozen=True)
class Window:
    applied_snapshot: str
    window_snapshot: str
    done: int  # transactions with an ordering id up to this one are applied already


@dataclass(frozen=True)
class Poll:
    """What one look at an origin found (poll)."""

    applied_snapshot: str  # the target's position it was compared with
    snapshot: str  # where a new window would end
    has_changes: bool  # whether it holds changes the target has not applied
    fingerprint: int | None  # the origin's catalog then (catalog.fingerprint), with changes
    wal_written: str  # the origin's WAL insert position then (an LSN)
    durable: bool  # everything written then was flushed already
    # Its log holds changes from the position's oldest transaction on, applied or not: only a
    # position moved past them lets the purge delete them.
    holds_applied: bool = True


class Origin(Protocol):
    """One origin, as a target's puller sees it. Its calls may raise NodeUnavailable (or the
    transport's own errors, which transport.lost_session classifies)."""

    name: str

    def poll(self, applied_snapshot: str, *, settled: bool = True) -> Poll:
        """Whether the origin holds changes the position applied_snapshot has not applied, and
        the snapshot a new window would end at: settled, one that holds every change the
        origin had captured when the call began; else any that holds changes."""
        ...

    def stream_window(self, window: Window, horizons: Sequence[Horizon] = ()) -> Iterator[bytes]:
        """The window's changes as COPY text rows (postgres.STAGE_COLUMNS), less those the
        target's copied tables already hold (horizons)."""
        ...

    def make_durable(self, polled: Poll | None) -> None:
        """Make sure nothing a window read after this poll can vanish in a crash of the origin
        (None: whatever the origin has written so far)."""
        ...

    def fingerprint(self) -> int:
        """A number that changes whenever a replicated table's definition does."""
        ...

    def tables(self, names: set[tuple[str, str]]) -> dict[tuple[str, str], Table]:
        """The origin's definition of the named (schema, table) pairs."""
        ...

    def close(self) -> None: ...
