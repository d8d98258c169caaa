"""The user's own conflict resolver: a Python function named in the config that chooses the row
to keep when two live versions of a row conflict (README: "Your own resolver").

The function receives the two versions ordered by pgconcord's own rule (the one the table's
policy would keep first), so every node calls it with the same arguments and, if the function
depends on nothing else, keeps the same row without asking the others.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

import psycopg
import psycopg.types.json
from psycopg import sql

from pgconcord.catalog import Table
from pgconcord.errors import ConfigError, PgconcordError


@dataclass(frozen=True)
class ConflictVersion:
    """One side of a conflict: the whole row as that side had it, and who wrote it when."""

    row: dict[str, Any]
    clock: int  # hybrid logical clock of the write, microseconds since the epoch
    origin: str  # the node that wrote it


class Park:
    """Returned by a resolver to leave the conflict to a person: the incoming change is parked
    (`pgconcord conflicts`, then `retry` or `discard`) and the row stays as it is here."""

    def __repr__(self) -> str:
        return "PARK"


PARK = Park()


class Parked(PgconcordError):
    """The resolver asked to park a change (or failed): its source transaction is parked."""


Resolver = Callable[[ConflictVersion, ConflictVersion], "dict[str, Any] | Park"]


@cache
def load(spec: str) -> Resolver:
    """Import 'package.module:function'; a ConfigError that says what went wrong."""
    module_name, _, function_name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as error:
        raise ConfigError(f"resolver {spec!r}: cannot import {module_name}: {error}") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ConfigError(f"resolver {spec!r}: {module_name} has no function {function_name}")
    resolver: Resolver = function
    return resolver


# Rows of the piece where two live versions meet that neither writer had seen: an insert of a
# key that exists here, or an update whose columns overlap an update made here.
_CONTESTED = """
SELECT d.row_key, d.new_row, d.clock, to_jsonb(t.*), d.local_last_clock, d.local_last_origin
  FROM pgconcord_decision d
 CROSS JOIN LATERAL jsonb_populate_record(NULL::{table}, d.row_key) k
  JOIN {table} t ON {key_match}
 WHERE d.operation <> 'D' AND d.local_clock IS NOT NULL AND NOT d.local_deleted
   AND CASE WHEN d.mode = 'merge' THEN cardinality(d.overlap) > 0
       ELSE (d.local_last_clock, d.local_last_origin)
                IS DISTINCT FROM (d.previous_clock, d.previous_origin)
            AND (d.previous_clock IS NULL
                 OR (d.local_last_clock, d.local_last_origin COLLATE "C")
                    > (d.previous_clock, d.previous_origin COLLATE "C"))
       END
"""


@dataclass(frozen=True)
class Verdicts:
    """What the resolver said about the contested rows of one piece."""

    keep: dict[str, dict[str, Any]]  # row key (JSON text) -> the row to write after the apply
    park: list[Any]  # row keys whose incoming change is parked
    reasons: dict[str, str]  # row key (JSON text) -> why it is parked


def _key_text(key: Any) -> str:
    return json.dumps(key, sort_keys=True)


def judge(
    target: psycopg.Connection[tuple[object, ...]], table: Table, origin: str, spec: str
) -> Verdicts:
    """Ask the resolver about each contested row of the decided piece (pgconcord_decision)."""
    function = load(spec)
    key_match = sql.SQL(" AND ").join(
        sql.SQL("t.{column} = k.{column}").format(column=sql.Identifier(column))
        for column in table.key_columns
    )
    verdicts = Verdicts({}, [], {})
    rows = target.execute(
        sql.SQL(_CONTESTED).format(table=table.identifier, key_match=key_match)
    ).fetchall()
    for key, new_row, clock, local_row, local_clock, local_origin in rows:
        incoming = ConflictVersion(_as_dict(new_row), int(str(clock)), origin)
        local = ConflictVersion(_as_dict(local_row), int(str(local_clock)), str(local_origin))
        # The greater version first: the same order on every node.
        first, second = sorted(
            (incoming, local), key=lambda v: (v.clock, v.origin.encode()), reverse=True
        )
        try:
            verdict = function(first, second)
        except Exception as error:
            verdicts.park.append(key)
            verdicts.reasons[_key_text(key)] = f"resolver {spec} failed: {error!r}"
            continue
        if isinstance(verdict, Park):
            verdicts.park.append(key)
            verdicts.reasons[_key_text(key)] = f"resolver {spec} asked to park it"
        elif isinstance(verdict, dict) and all(
            verdict.get(column) == incoming.row.get(column) for column in table.key_columns
        ):
            verdicts.keep[_key_text(key)] = verdict
        else:
            verdicts.park.append(key)
            verdicts.reasons[_key_text(key)] = (
                f"resolver {spec} returned {type(verdict).__name__}, not the row (a dict"
                " with the same key) or PARK"
            )
    return verdicts


def write_kept_rows(
    target: psycopg.Connection[tuple[object, ...]],
    table: Table,
    columns: tuple[str, ...],
    verdicts: Verdicts,
) -> None:
    """Overwrite the applied rows with the ones the resolver chose."""
    updatable = [c for c in columns if c not in table.key_columns]
    if not updatable:
        return
    statement = sql.SQL(
        "UPDATE {table} AS t SET ({columns}) = (SELECT {values}"
        " FROM jsonb_populate_record(NULL::{table}, %s) r) WHERE {key} = %s"
    ).format(
        table=table.identifier,
        columns=sql.SQL(", ").join(sql.Identifier(c) for c in updatable),
        values=sql.SQL(", ").join(sql.SQL("r.{}").format(sql.Identifier(c)) for c in updatable),
        key=sql.SQL("jsonb_build_object({})").format(
            sql.SQL(", ").join(
                sql.SQL("{}, t.{}").format(sql.Literal(c), sql.Identifier(c))
                for c in table.key_columns
            )
        ),
    )
    for key_text, row in verdicts.keep.items():
        target.execute(
            statement,
            (psycopg.types.json.Jsonb(row), psycopg.types.json.Jsonb(json.loads(key_text))),
        )


def _as_dict(value: object) -> dict[str, Any]:
    return dict(value) if isinstance(value, dict) else {}


def mark_resolved(
    target: psycopg.Connection[tuple[object, ...]], table: Table, verdicts: Verdicts
) -> None:
    """The conflicts just recorded for these rows were settled by the resolver."""
    target.execute(
        "UPDATE pgconcord.conflict SET resolution = 'resolver'"
        " WHERE schema_name = %s AND table_name = %s AND detected_at = now()"
        " AND row_key = ANY (%s::jsonb[])",
        (table.schema, table.name, list(verdicts.keep)),
    )
