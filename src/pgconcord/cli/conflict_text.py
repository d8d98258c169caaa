"""`pgconcord conflicts` for a person: each record as plain lines, both versions of the row
column by column with the differences marked, never cut to a terminal's width (a pipe into
`less` or a ticket gets every value). Pure functions of the records `conflicts --json` prints."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

DIFFERENT = "*"  # marks a column whose two versions differ
WIDE_VALUE = 40  # characters: a longer value is shown on lines of its own


def value_text(value: object) -> str:
    """A column's value as JSON shows it, so that NULL, "" and "null" stay apart.

    >>> value_text(None), value_text("a b"), value_text(3), value_text({"k": [1]})
    ('null', '"a b"', '3', '{"k": [1]}')
    """
    return json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)


def key_text(key: object) -> str:
    """A row key as `column=value, ...`.

    >>> key_text({"id": 7, "shop": "north"})
    'id=7, shop="north"'
    """
    if isinstance(key, Mapping):
        return ", ".join(f"{column}={value_text(value)}" for column, value in key.items())
    return value_text(key)


def column_lines(
    local: Mapping[str, Any] | None,
    incoming: Mapping[str, Any] | None,
    local_heading: str,
    incoming_heading: str,
) -> list[str]:
    """Both versions side by side, one column a line, a `*` where they differ; a side that has
    no row (a delete, a row missing) says so instead of showing nulls.

    >>> for line in column_lines({"id": 1, "n": 2}, {"id": 1, "n": 3}, "local", "incoming"):
    ...     print(line.rstrip())
      column  local  incoming
      id      1      1
    * n       2      3
    """
    columns: list[str] = []
    for row in (local, incoming):
        columns.extend(column for column in (row or {}) if column not in columns)
    absent = "(no row)"
    rows = [
        (
            column,
            value_text(local.get(column)) if local is not None else absent,
            value_text(incoming.get(column)) if incoming is not None else absent,
        )
        for column in columns
    ]
    # A long value (a document, a note) goes on lines of its own rather than pushing the
    # other side off every screen.
    wide = {column for column, a, b in rows if max(len(a), len(b)) > WIDE_VALUE}
    width_column = max([len("column"), *(len(c) for c, _, _ in rows)])
    width_local = max([len(local_heading), *(len(v) for c, v, _ in rows if c not in wide)])
    lines = [f"  {'column':<{width_column}}  {local_heading:<{width_local}}  {incoming_heading}"]
    for column, local_value, incoming_value in rows:
        differs = (
            local is not None
            and incoming is not None
            and (column not in local or column not in incoming or local_value != incoming_value)
        )
        marker = DIFFERENT if differs else " "
        if column in wide:
            lines.append(f"{marker} {column}")
            lines.append(f"      {local_heading}: {local_value}")
            lines.append(f"      {incoming_heading}: {incoming_value}")
            continue
        lines.append(
            f"{marker} {column:<{width_column}}  {local_value:<{width_local}}  {incoming_value}"
        )
    if local is None and incoming is None:
        lines.append(f"  {absent}")
    return lines


def colliding_value(
    record: Mapping[str, Any], unique_indexes: Iterable[Sequence[str]]
) -> str | None:
    """For a collision on a unique constraint besides the key (two shops registering one
    e-mail): the value both rows claimed, as `column=value`; None for any other conflict.

    >>> record = {"type": "insert_exists", "local": {"row": {"id": 1, "mail": "a@x"}},
    ...           "incoming": {"row": {"id": 2, "mail": "a@x"}}}
    >>> colliding_value(record, [["mail"]])
    'mail="a@x"'
    """
    local = (record.get("local") or {}).get("row")
    incoming = (record.get("incoming") or {}).get("row")
    if not isinstance(local, Mapping) or not isinstance(incoming, Mapping):
        return None
    found = [
        ", ".join(f"{column}={value_text(incoming[column])}" for column in columns)
        for columns in unique_indexes
        if columns
        and all(column in local and column in incoming for column in columns)
        and all(
            incoming[column] is not None and local[column] == incoming[column] for column in columns
        )
    ]
    return "; ".join(found) if found else None


def conflict_lines(record: Mapping[str, Any], unique_value: str | None = None) -> list[str]:
    """One recorded conflict: what, where, who won, the colliding value, both versions."""
    local, incoming = record.get("local") or {}, record.get("incoming") or {}
    kept = (
        f"{incoming.get('origin')}'s version (incoming)"
        if record.get("resolution") == "incoming"
        else f"{local.get('origin') or record['node']}'s version (local)"
        if record.get("resolution") == "local"
        else str(record.get("resolution"))
    )
    lines = [
        f"{record['ref']}  {record.get('detected_at')}  {record['table']}"
        f"  key {key_text(record.get('key'))}  {record['type']}",
        f"  on {record['node']}: {incoming.get('operation')} from {incoming.get('origin')}"
        f" met the row {local.get('origin') or '?'} wrote; kept {kept}",
    ]
    if unique_value:
        lines.append(f"  colliding unique value: {unique_value}")
    lines += column_lines(
        local.get("row"),
        incoming.get("row"),
        f"local ({local.get('origin') or record['node']})",
        f"incoming ({incoming.get('origin')}, {incoming.get('operation')})",
    )
    return lines


def parked_lines(record: Mapping[str, Any]) -> list[str]:
    """One parked change: why, and the row it would write."""
    incoming = record.get("incoming") or {}
    lines = [
        f"{record['ref']}  {record.get('detected_at')}  {record['table']}"
        f"  key {key_text(record.get('key'))}  {record['state']}",
        f"  {incoming.get('operation')} from {incoming.get('origin')}: {record.get('reason')}",
    ]
    row = incoming.get("row")
    if isinstance(row, Mapping):
        width = max((len(column) for column in row), default=0)
        lines += [f"  {column:<{width}}  {value_text(value)}" for column, value in row.items()]
    return lines
