"""The conflict rules as pure functions, without a database: versions and their order, order
keys, column maps and their merge, the decision of an incoming change against the row's version
here, whether it is recorded as a conflict and how it was resolved, and counters.

The SQL does the same set-wise: 004_conflict_policies.sql (next_order_key),
008_column_versions.sql (version_text, merge_versions) and decision.py (DECIDE_MODE,
DECISION_COLUMNS, RESOLUTION, RECORDED). These functions are its reference:
tests/test_conflict_rules.py checks that both give the same answers.

Text that SQL compares COLLATE "C" (node names, version texts) compares here as UTF-8 bytes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal, NamedTuple

Mode = Literal["delete", "full", "merge", "lose"]
ColumnVersions = Mapping[str, str]


class Version(NamedTuple):
    clock: int
    origin: str
    order_key: tuple[int, ...] = ()  # empty under last-writer-wins; see 004_conflict_policies

    def sort_key(self) -> tuple[tuple[int, ...], int, bytes]:
        # Node names compare as bytes (COLLATE "C" in SQL) so no locale can disagree.
        return (self.order_key, self.clock, self.origin.encode())


def order_key_of(value: object) -> tuple[int, ...]:
    """An order key as psycopg reads a bigint[] (a list), or empty."""
    return tuple(int(str(part)) for part in value) if isinstance(value, list) else ()


def incoming_wins(incoming: Version, local: Version | None) -> bool:
    """The greater version wins: the reference of the rule the apply SQL implements."""
    return local is None or incoming.sort_key() > local.sort_key()


def is_conflict(previous: Version | None, local: Version | None) -> bool:
    """Did the target hold a version the incoming change's writer had not seen?"""
    if local is None or local == previous:
        return False
    return previous is None or local.sort_key() > previous.sort_key()


def conflict_type(operation: str, local_deleted: bool) -> str:
    """PostgreSQL's vocabulary where it has a word; insert_deleted is ours (an insert meeting
    a tombstone), and a delete meeting a tombstone is delete_missing."""
    match operation, local_deleted:
        case "I", False:
            return "insert_exists"
        case "I", True:
            return "insert_deleted"
        case "U", False:
            return "update_origin_differs"
        case "U", True:
            return "update_deleted"
        case "D", False:
            return "delete_origin_differs"
        case _:
            return "delete_missing"


# -- order keys (004_conflict_policies.sql) ---------------------------------------------------


def next_order_key(
    policy: str,
    node_level: int,
    levels: int,
    previous_key: tuple[int, ...] | None,
    previous_deleted: bool | None,
    operation: str,
    clock: int,
) -> tuple[int, ...]:
    """The order key of a new write, from the version it replaces (None: the row has none):
    pgconcord.next_order_key. node_level is the writer's place in the priority list (1 is the
    highest; 0: not listed), levels the list's length (catalog._order_keys)."""
    if policy == "node-priority":
        result = list(previous_key or ())
        result += [0] * (levels - len(result))
        if node_level > 0:
            result[node_level - 1] = clock
        return tuple(result)
    if policy == "keep-existing":
        if previous_key is None or len(previous_key) < 2:
            return (0, -clock) if operation == "I" else (0, 0)
        if operation == "I" and previous_deleted:
            return (previous_key[0] + 1, -clock)
        return previous_key
    return ()


# -- column versions (008_column_versions.sql) ------------------------------------------------


def version_text(clock: int, origin: str) -> str:
    """A version as text that sorts (COLLATE "C") like (clock, origin): the clock in 16 hex
    digits, then the node name. (Clocks are positive; a negative one is written as PostgreSQL's
    to_hex writes it, in two's complement.)"""
    return format(clock & 0xFFFF_FFFF_FFFF_FFFF, "016x") + origin


def _c(text: str) -> bytes:
    return text.encode()


def merge_versions(
    local: ColumnVersions | None, incoming: ColumnVersions | None
) -> dict[str, str] | None:
    """Two column maps of one generation merged: each column's greater version. A column
    missing from a map has the generation's version, below every entry; so None (no column
    written since the generation) and {} mean the same."""
    if local is None:
        return None if incoming is None else dict(incoming)
    if incoming is None:
        return dict(local)
    merged = dict(local)
    for column, version in incoming.items():
        if column not in merged or _c(version) > _c(merged[column]):
            merged[column] = version
    return merged


# -- the decision (decision.py) ---------------------------------------------------------------


@dataclass(frozen=True)
class Change:
    """The last change of a row in a piece, as staged from the origin's change log.
    generation: an update's generation (clock, origin), None for a change that starts one (an
    insert, a delete, any write under node-priority). previous: the latest version of the row
    the writer had seen (of the row's earliest change in the piece), None if none."""

    operation: str
    clock: int
    origin: str
    order_key: tuple[int, ...] = ()
    generation: tuple[int, str] | None = None
    column_versions: ColumnVersions | None = None
    previous: tuple[int, str] | None = None

    @property
    def version(self) -> Version:
        return Version(self.clock, self.origin, self.order_key)

    @property
    def generation_version(self) -> Version:
        clock, origin = self.generation or (self.clock, self.origin)
        return Version(clock, origin, self.order_key)


@dataclass(frozen=True)
class RowVersion:
    """A row's version here (pgconcord.row_version): its generation, or for a tombstone the
    delete's version; the column map; the latest write (None: the generation itself)."""

    version: Version
    deleted: bool = False
    column_versions: ColumnVersions | None = None
    last: tuple[int, str] | None = None

    @property
    def last_write(self) -> tuple[int, str]:
        return self.last or (self.version.clock, self.version.origin)


@dataclass(frozen=True)
class Decision:
    """What the apply does with one row (pgconcord_decision): the mode, and for a merge the
    columns taken, the merged column map and the columns both sides changed (overlap)."""

    mode: Mode
    taken: frozenset[str] | None = None
    merged_versions: dict[str, str] | None = None
    last_write: tuple[int, str] | None = None
    overlap: frozenset[str] | None = None


def decide_mode(change: Change, local: RowVersion | None) -> Mode:
    """'delete': a delete newer than the row's generation (or tombstone) here; 'full': an
    insert or update of a newer generation than the one here, the whole row; 'merge': an
    update of the generation here, the columns whose version is newer; 'lose': older than
    what is here."""
    if change.operation == "D":
        newer = local is None or local.version.sort_key() < change.version.sort_key()
        return "delete" if newer else "lose"
    generation = change.generation_version
    # A row that was there before replication began, never written here since.
    if local is None and change.operation == "U" and generation[:2] == (0, ""):
        return "merge"
    if local is None or local.version.sort_key() < generation.sort_key():
        return "full"
    if not local.deleted and local.version == generation:
        return "merge"
    return "lose"


def _newer(a: tuple[int, str], b: tuple[int, str]) -> bool:
    return (a[0], _c(a[1])) > (b[0], _c(b[1]))


def decide(change: Change, local: RowVersion | None) -> Decision:
    """The decision of one row, as the set-wise apply makes it."""
    mode = decide_mode(change, local)
    incoming_write = (change.clock, change.origin)
    if mode != "merge":
        return Decision(mode, last_write=incoming_write)
    local_map: ColumnVersions = (local.column_versions if local else None) or {}
    incoming_map: ColumnVersions = change.column_versions or {}
    taken = frozenset(
        column
        for column, version in incoming_map.items()
        if _c(version) > _c(local_map.get(column, ""))
    )
    last_write = incoming_write
    if local is not None and _newer(local.last_write, incoming_write):
        last_write = local.last_write
    # Columns both sides changed since the incoming writer's last sight of the row.
    seen = _c(version_text(*change.previous)) if change.previous else b""
    overlap = frozenset(
        column
        for column, version in incoming_map.items()
        if _c(version) > seen
        and column in local_map
        and _c(local_map[column]) > seen
        and local_map[column] != version
    )
    return Decision(
        mode,
        taken=taken,
        merged_versions=merge_versions(
            local.column_versions if local else None, change.column_versions
        ),
        last_write=last_write,
        overlap=overlap,
    )


def apply_decision(
    change: Change, local: RowVersion | None, decision: Decision
) -> RowVersion | None:
    """The row's version here after the decision is carried out (decision._CHOOSE_WINNERS,
    when no local write comes between the decision and the upsert)."""
    if decision.mode == "lose":
        return local
    if decision.mode == "delete":
        return RowVersion(change.version, deleted=True)
    if decision.mode == "full":
        return RowVersion(
            change.generation_version,
            column_versions=change.column_versions,
            last=decision.last_write,
        )
    version = local.version if local is not None else change.generation_version
    return RowVersion(version, column_versions=decision.merged_versions, last=decision.last_write)


# -- what is recorded (decision.RESOLUTION, decision.RECORDED) --------------------------------


def only_counters_differ(
    delta: Mapping[str, Any] | None,
    new_row: Mapping[str, Any] | None,
    local_row: Mapping[str, Any] | None,
    counters: Iterable[str],
) -> bool:
    """A change that only moved counters (delta) of a row otherwise as it is here: counters
    changed on both sides add up, which is no conflict."""
    if delta is None:
        return False
    names = set(counters)

    def rest(row: Mapping[str, Any] | None) -> dict[str, Any] | None:
        return None if row is None else {k: v for k, v in row.items() if k not in names}

    return rest(new_row) == rest(local_row)


def is_recorded(
    decision: Decision,
    local_last: tuple[int, str] | None,
    previous: tuple[int, str] | None,
    counters_only: bool = False,
) -> bool:
    """Is the decided row recorded as a conflict? local_last: the latest write of the row here
    (None: no version here). A merge is one when both sides changed a column; anything else
    when the row here has a version the writer had not seen (is_conflict), unless only
    counters moved (only_counters_differ)."""
    if local_last is None:
        return False
    if decision.mode == "merge":
        return bool(decision.overlap)
    return not counters_only and is_conflict(
        Version(*previous) if previous else None, Version(*local_last)
    )


def resolution(decision: Decision, won: bool) -> str:
    """How a recorded conflict ended: 'incoming' (the change won, or took every column both
    changed), 'merged' (it took some of them), 'local' (the row here stayed)."""
    if not won:
        return "local"
    overlap = decision.overlap or frozenset()
    taken = decision.taken or frozenset()
    if decision.mode != "merge" or overlap <= taken:
        return "incoming"
    return "merged" if overlap & taken else "local"


# -- counters (statements._delta_expression, _ADD_DELTAS, _MERGE_ROWS) -------------------------


def piece_delta(
    changes: Iterable[tuple[str, Mapping[str, Any] | None, Mapping[str, Any] | None]],
    counters: Iterable[str],
) -> dict[str, Decimal | None] | None:
    """The sum of each counter's differences over a row's changes in a piece (operation, new
    row, old values), when every one is a plain update with its old values; else None (an
    insert or delete carries whole values instead). A difference with a null side counts for
    nothing; a counter without any difference has None."""
    names = list(counters)
    steps = list(changes)
    if not names or not all(op == "U" and old is not None for op, _, old in steps):
        return None
    delta: dict[str, Decimal | None] = {}
    for name in names:
        differences = [
            Decimal(str(new[name])) - Decimal(str(old[name]))
            for _, new, old in steps
            if new is not None
            and old is not None
            and new.get(name) is not None
            and old.get(name) is not None
        ]
        delta[name] = sum(differences, Decimal(0)) if differences else None
    return delta


def is_counted(delta: Mapping[str, Any] | None, local: RowVersion | None) -> bool:
    """Counters are added, not written, for a row updated only, that is here alive
    (statements._COUNTED): the origin's differences are added whoever wins the row."""
    return delta is not None and local is not None and not local.deleted


def add_counter(value: Decimal | None, difference: Decimal | None) -> Decimal | None:
    """A counter here plus the origin's difference (none counts as zero)."""
    return None if value is None else value + (difference or Decimal(0))
