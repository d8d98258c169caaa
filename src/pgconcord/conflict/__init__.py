"""Conflict resolution: every node picks the same winner alone, and records what it saw.

A version is (order key, clock, origin): the hybrid logical clock of a write, in microseconds,
and the node that wrote it (the order key is empty under last-writer-wins; see
004_conflict_policies.sql). Capture makes a write's clock one past the row's latest version,
so a write that follows another in causal order always has the greater version, even from a
node whose wall clock lags. Concurrent writes are ordered by clock, then node name (bytes).

A row's life is a generation (008_column_versions.sql): its insert, then updates that stamp the
columns they change. Two versions of one generation merge column by column, each column taking
its greatest version; of two generations the greater one is kept whole; a delete newer than
the generation ends it, and no update of that generation brings it back. The merge is
commutative, associative and idempotent, so every node ends with the same rows whatever the
order of arrival.

A conflict is recorded when the target held a version the incoming change's writer had not
seen (for a merge: when both changed the same column).

rules: these rules as pure functions, the reference the SQL is tested against; decision: the
SQL that decides each row, chooses the winners and records conflicts; statements: the set-wise
statements that apply a piece to a table; unique: collisions on other unique constraints;
records: the conflicts recorded, as JSON.
"""

from pgconcord.conflict.records import PARKED_TYPE, RecordFilter, change_object, recorded_conflicts
from pgconcord.conflict.rules import (
    Change,
    Decision,
    RowVersion,
    Version,
    apply_decision,
    conflict_type,
    decide,
    decide_mode,
    incoming_wins,
    is_conflict,
    is_recorded,
    merge_versions,
    next_order_key,
    order_key_of,
    resolution,
    version_text,
)
from pgconcord.conflict.statements import (
    CHILD_CANDIDATES,
    TableStatements,
    insert_only_statement,
    parent_missing_statement,
    row_value,
    table_statements,
)
from pgconcord.conflict.unique import LocalHolder, resolve_unique_collision

__all__ = [
    "CHILD_CANDIDATES",
    "PARKED_TYPE",
    "Change",
    "Decision",
    "LocalHolder",
    "RecordFilter",
    "RowVersion",
    "TableStatements",
    "Version",
    "apply_decision",
    "change_object",
    "conflict_type",
    "decide",
    "decide_mode",
    "incoming_wins",
    "insert_only_statement",
    "is_conflict",
    "is_recorded",
    "merge_versions",
    "next_order_key",
    "order_key_of",
    "parent_missing_statement",
    "recorded_conflicts",
    "resolution",
    "resolve_unique_collision",
    "row_value",
    "table_statements",
    "version_text",
]
