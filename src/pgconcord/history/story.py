"""One row's whole story across the nodes (`pgconcord history TABLE KEY`): each node's audit
rows of the key (its own writes, and what it did with the changes of the others), matched by
the change they are about (origin, clock) and told in the order of the clock."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql

from pgconcord.config import ClusterConfig, NodeConfig
from pgconcord.errors import NodeUnavailable, PgconcordError
from pgconcord.transport import connect

Connection = psycopg.Connection[tuple[object, ...]]

_TABLE = (
    "SELECT id, key_columns, (to_jsonb(t) ->> 'audited')::boolean FROM pgconcord.replicated_table t"
    " WHERE schema_name = %s AND table_name = %s"
)

# The key as the capture writes it: each key column's value read by the column's type (the
# user may give 7 or "7" for an integer key), as to_jsonb prints it.
_NORMALIZED_KEY = (
    "SELECT (SELECT jsonb_object_agg(k, to_jsonb(r) -> k) FROM unnest(%s::text[]) AS k)"
    " FROM jsonb_populate_record(NULL::{table}, %s::jsonb) AS r"
)

_ROWS = """
SELECT a.recorded_at, a.event, a.operation::text, a.clock, a.origin, a.db_user, a.acting_role,
       a.application_name, host(a.client_addr), a.xid::text, a.old_row, a.new_row, a.columns,
       a.conflict_id, c.conflict_type, c.resolution, a.parked_id, p.state, a.detail
  FROM pgconcord.audit a
  LEFT JOIN pgconcord.conflict c ON c.id = a.conflict_id
  LEFT JOIN pgconcord.parked_change p ON p.id = a.parked_id
 WHERE a.table_id = %s AND a.row_key = %s::jsonb
 ORDER BY a.recorded_at
"""

_OPERATIONS = {"I": "insert", "U": "update", "D": "delete"}


@dataclass
class Story:
    """A row's story: its changes (oldest first), and the nodes that could not be read."""

    table: str
    key: dict[str, Any]
    changes: list[dict[str, Any]] = field(default_factory=list)
    nodes: list[str] = field(default_factory=list)
    unreachable: list[str] = field(default_factory=list)
    audited_on: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "table": self.table,
            "key": self.key,
            "nodes": self.nodes,
            "audited_on": self.audited_on,
            "unreachable": self.unreachable,
            "changes": self.changes,
        }


def parse_key(text: str) -> object:
    """KEY as given: a JSON object, or a single value (JSON, or else the text itself)."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _key_object(given: object, key_columns: list[str], table: str) -> dict[str, Any]:
    if isinstance(given, dict):
        missing = [c for c in key_columns if c not in given]
        extra = sorted(set(given) - set(key_columns))
        if missing or extra:
            raise PgconcordError(
                f"table {table}: the key is ({', '.join(key_columns)});"
                f" {'missing ' + ', '.join(missing) if missing else 'unknown ' + ', '.join(extra)}"
            )
        return given
    if len(key_columns) != 1:
        raise PgconcordError(
            f"table {table}: the key has columns {', '.join(key_columns)}: give KEY as a JSON"
            " object, e.g. '{\"" + '": ..., "'.join(key_columns) + "\": ...}'"
        )
    value = given if isinstance(given, str) else json.dumps(given)
    return {key_columns[0]: value}


def _read_node(
    connection: Connection, schema: str, name: str, given: object
) -> tuple[dict[str, Any], bool, list[tuple[Any, ...]]] | None:
    """The node's normalized key, whether the table is audited there, and its audit rows of
    the key; None if the table is not replicated there."""
    found = connection.execute(_TABLE, (schema, name)).fetchone()
    if found is None:
        return None
    table_id, key_columns, audited = found
    columns = [str(c) for c in key_columns] if isinstance(key_columns, list) else []
    qualified = f"{schema}.{name}"
    if not columns:
        raise PgconcordError(f"table {qualified} has no key: its row history is not kept")
    given_key = _key_object(given, columns, qualified)
    try:
        row = connection.execute(
            sql.SQL(_NORMALIZED_KEY).format(table=sql.Identifier(schema, name)),
            (columns, json.dumps(given_key)),
        ).fetchone()
    except psycopg.errors.DataError as error:
        raise PgconcordError(
            f"table {qualified}: not a key of it: {json.dumps(given_key)} ({error})"
        ) from None
    key = row[0] if row and isinstance(row[0], dict) else given_key
    rows = connection.execute(_ROWS, (table_id, json.dumps(key))).fetchall()
    return key, bool(audited), rows


def _time(value: object) -> str | None:
    return value.isoformat() if isinstance(value, datetime) else None


def read_story(config: ClusterConfig, table: str, key_text: str) -> Story:
    """Every reachable node's audit rows of the key, told as one story."""
    schema, _, name = table.rpartition(".")
    schema = schema or "public"
    qualified = f"{schema}.{name}"
    given = parse_key(key_text)
    story = Story(qualified, {})
    changes: dict[tuple[str, int | None, str], dict[str, Any]] = {}
    known = False
    for node in config.nodes:
        try:
            read = _read(node, schema, name, given)
        except NodeUnavailable as error:
            story.unreachable.append(str(error))
            continue
        story.nodes.append(node.name)
        if read is None:
            continue
        known = True
        key, audited, rows = read
        story.key = key
        if audited:
            story.audited_on.append(node.name)
        for row in rows:
            _add_row(changes, node.name, row)
    if not known and not story.unreachable:
        raise PgconcordError(f"table {qualified} is not replicated (run pgconcord setup)")
    story.changes = sorted(
        changes.values(),
        key=lambda change: (change["clock"] is None, change["clock"] or 0, change["at"] or ""),
    )
    for change in story.changes:
        # Audited nodes that say nothing of a change: not received yet (or audited since).
        told = {change["origin"]} | {outcome["node"] for outcome in change["outcomes"]}
        change["not_recorded_on"] = [node for node in story.audited_on if node not in told]
    return story


def _read(
    node: NodeConfig, schema: str, name: str, given: object
) -> tuple[dict[str, Any], bool, list[tuple[Any, ...]]] | None:
    try:
        with connect(node, autocommit=True) as connection:
            return _read_node(connection, schema, name, given)
    except psycopg.errors.UndefinedTable:
        raise NodeUnavailable(
            node.name,
            "pgconcord is not set up there, or set up before row history existed"
            " (run pgconcord setup)",
        ) from None
    except psycopg.OperationalError as error:
        raise NodeUnavailable(node.name, str(error).strip().splitlines()[0]) from None


def _add_row(
    changes: dict[tuple[str, int | None, str], dict[str, Any]], node: str, row: tuple[Any, ...]
) -> None:
    (
        recorded_at,
        event,
        operation,
        clock,
        origin,
        db_user,
        acting_role,
        application,
        client,
        xid,
        old_row,
        new_row,
        columns,
        conflict_id,
        conflict_type,
        resolution,
        parked_id,
        parked_state,
        detail,
    ) = row
    # A change is its origin's and clock's; a write whose clock is unknown stands alone.
    identity = (str(origin), clock, "" if clock is not None else f"{node}:{recorded_at}")
    change = changes.setdefault(
        identity,
        {
            "origin": str(origin),
            "clock": clock,
            "operation": _OPERATIONS.get(str(operation), str(operation)),
            "at": None,
            "by": None,
            "xid": None,
            "old": None,
            "new": None,
            "changed": [],
            "outcomes": [],
        },
    )
    if event == "write":
        change["at"] = _time(recorded_at)
        change["operation"] = _OPERATIONS.get(str(operation), str(operation))
        change["by"] = {
            "user": db_user,
            "role": acting_role,
            "application": application or None,
            "client_addr": client,
        }
        change["xid"] = xid
        change["old"], change["new"] = old_row, new_row
        change["changed"] = _changed(old_row, new_row)
        return
    change["outcomes"].append(
        {
            "node": node,
            "event": str(event),
            "at": _time(recorded_at),
            "columns": list(columns) if isinstance(columns, list) else None,
            "conflict": None
            if conflict_id is None
            else {
                "ref": f"{node}:{conflict_id}",
                "type": conflict_type,
                "resolution": resolution,
                "purged": conflict_type is None,
            },
            "parked": None
            if parked_id is None
            else {"ref": f"{node}:{parked_id}", "state": parked_state, "reason": detail},
        }
    )
    if change["at"] is None:
        change["at"] = _time(recorded_at)


def _changed(old: object, new: object) -> list[str]:
    """The columns a write changed (all of an insert's or a delete's)."""
    old_values = old if isinstance(old, dict) else {}
    new_values = new if isinstance(new, dict) else {}
    names = list(new_values) + [n for n in old_values if n not in new_values]
    return [n for n in names if old_values.get(n) != new_values.get(n) or not old or not new]


def _value(value: object) -> str:
    return "NULL" if value is None else json.dumps(value, ensure_ascii=False)


def _outcome_text(outcome: dict[str, Any], origin: str) -> str:
    event = outcome["event"]
    conflict = outcome["conflict"]
    if event == "lost":
        text = "lost a conflict" if conflict else "lost: older than the version there"
    elif event == "merged":
        text = "merged with a local write" + (
            f", took {', '.join(outcome['columns'])}" if outcome["columns"] else ""
        )
    elif event == "parked":
        parked = outcome["parked"] or {}
        text = f"parked as {parked.get('ref')} ({parked.get('state')}): {parked.get('reason')}"
    else:
        text = "applied"
    if conflict:
        if conflict["purged"]:
            text += f" (conflict {conflict['ref']}, its record purged)"
        else:
            kept = origin if conflict["resolution"] == "incoming" else outcome["node"]
            if conflict["resolution"] == "merged":
                kept = "both, merged"
            text += f" (conflict {conflict['ref']} {conflict['type']}, kept {kept}'s version)"
    return text


def render_text(story: Story) -> str:
    """The story for a person: every change with who made it where, the columns it changed
    (old -> new), and what each other node did with it; nothing cut short."""
    lines = [f"{story.table} {json.dumps(story.key, ensure_ascii=False)}:"]
    if not story.changes:
        lines.append(
            "  no history recorded"
            + ("" if story.audited_on else " (the table is not under [audit] tables)")
        )
    for number, change in enumerate(story.changes, 1):
        by = change["by"]
        if by is None:
            lines.append(
                f"{number}. {change['operation']} on {change['origin']} at clock"
                f" {change['clock']} (its write is not in {change['origin']}'s history)"
            )
        else:
            who = str(by["user"]) + (f" as {by['role']}" if by["role"] else "")
            details = []
            if by["application"]:
                details.append(f"application {by['application']}")
            details.append(f"from {by['client_addr'] or 'local socket'}")
            details.append(f"transaction {change['xid']}")
            lines.append(
                f"{number}. {change['at']}  {change['operation']} on {change['origin']}"
                f" by {who} ({', '.join(details)}), clock {change['clock']}"
            )
            old = change["old"] if isinstance(change["old"], dict) else {}
            new = change["new"] if isinstance(change["new"], dict) else {}
            for column in change["changed"]:
                if change["operation"] == "insert":
                    lines.append(f"     {column}: {_value(new.get(column))}")
                elif change["operation"] == "delete":
                    lines.append(f"     {column}: {_value(old.get(column))} (deleted)")
                else:
                    lines.append(
                        f"     {column}: {_value(old.get(column))} -> {_value(new.get(column))}"
                    )
        for outcome in change["outcomes"]:
            lines.append(f"     {outcome['node']}: {_outcome_text(outcome, change['origin'])}")
        for node in change.get("not_recorded_on", []):
            lines.append(f"     {node}: nothing recorded (not received yet)")
    for problem in story.unreachable:
        lines.append(f"not read: {problem}")
    return "\n".join(lines)
