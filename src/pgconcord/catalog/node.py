"""This node's own records in its database: its identity (node and cluster name), the slot
its keys are handed out in, and where it starts from each origin."""

from __future__ import annotations

import psycopg
from psycopg import sql

from pgconcord.catalog.migrations import installed_version
from pgconcord.catalog.tables import Table
from pgconcord.errors import ConfigError


def local_node_name(connection: psycopg.Connection[tuple[object, ...]]) -> str | None:
    if installed_version(connection) == 0:
        return None
    row = connection.execute("SELECT name FROM pgconcord.local_node").fetchone()
    return str(row[0]) if row else None


def check_identity(connection: psycopg.Connection[tuple[object, ...]], node_name: str) -> None:
    """Refuse a database that already belongs to another node name."""
    existing = local_node_name(connection)
    if existing is not None and existing != node_name:
        raise ConfigError(
            f"node {node_name}: its database is already set up as node '{existing}'"
            " (two config entries for one database, or a renamed node)"
        )


def claim_identity(
    connection: psycopg.Connection[tuple[object, ...]], node_name: str, cluster_name: str
) -> None:
    check_identity(connection, node_name)
    connection.execute(
        "INSERT INTO pgconcord.local_node (name, cluster_name) VALUES (%s, %s)"
        " ON CONFLICT (singleton) DO UPDATE SET cluster_name = excluded.cluster_name",
        (node_name, cluster_name),
    )


KEY_CAPACITY = 100  # slots, so at most this many nodes; every node steps its sequences by it

_OWNED_SEQUENCES = """
SELECT s.oid::regclass::text, a.attname::text
  FROM pg_class s
  JOIN pg_depend d ON d.classid = 'pg_class'::regclass AND d.objid = s.oid
                  AND d.refclassid = 'pg_class'::regclass AND d.deptype IN ('a', 'i')
  JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
 WHERE s.relkind = 'S' AND d.refobjid = %s::regclass
"""


def key_slot(connection: psycopg.Connection[tuple[object, ...]]) -> int | None:
    if installed_version(connection) < 5:
        return None
    row = connection.execute("SELECT key_slot FROM pgconcord.local_node").fetchone()
    return None if row is None or row[0] is None else int(str(row[0]))


def set_key_slot(
    connection: psycopg.Connection[tuple[object, ...]],
    slot: int,
    tables: list[Table],
    *,
    only_new: bool = False,
) -> None:
    """Make the sequences behind the tables' columns (serial, identity) and pgconcord's own
    unique_id() hand out values congruent to the slot, above every value already used; with
    only_new, just the tables' sequences that do not step by the cluster's capacity yet."""
    sequences: list[tuple[str, sql.Composable]] = []
    if not only_new:
        connection.execute("UPDATE pgconcord.local_node SET key_slot = %s", (slot,))
        sequences.append(("pgconcord.unique_id_sequence", sql.SQL("0")))
    for table in tables:
        for sequence, column in connection.execute(
            _OWNED_SEQUENCES, (table.identifier.as_string(connection),)
        ).fetchall():
            if only_new:
                step = connection.execute(
                    "SELECT seqincrement FROM pg_sequence WHERE seqrelid = %s::regclass",
                    (str(sequence),),
                ).fetchone()
                if step is not None and int(str(step[0])) == KEY_CAPACITY:
                    continue
            used = sql.SQL("(SELECT max({}) FROM {})").format(
                sql.Identifier(str(column)), table.identifier
            )
            sequences.append((str(sequence), used))
    # Sequence names come from regclass output, which PostgreSQL quotes where needed.
    for sequence, used_expression in sequences:
        connection.execute(
            sql.SQL("ALTER SEQUENCE {} INCREMENT BY {}").format(
                sql.SQL(sequence), sql.Literal(KEY_CAPACITY)
            )
        )
        highest = sql.SQL("greatest(s.last_value, {})").format(used_expression)
        # The first value above everything used that falls in this node's slot.
        connection.execute(
            sql.SQL(
                "SELECT setval({name}, (h / {capacity} + 1) * {capacity} + {slot}, false)"
                " FROM (SELECT {highest} AS h FROM {sequence} s) AS used"
            ).format(
                name=sql.Literal(sequence),
                capacity=sql.Literal(KEY_CAPACITY),
                slot=sql.Literal(slot),
                highest=highest,
                sequence=sql.SQL(sequence),
            )
        )


def ensure_positions(
    connection: psycopg.Connection[tuple[object, ...]], origins: list[str]
) -> None:
    """A new peer starts from the beginning of each origin's change log."""
    for origin in origins:
        connection.execute(
            "INSERT INTO pgconcord.position (origin, applied_snapshot)"
            " VALUES (%s, '1:1:') ON CONFLICT (origin) DO NOTHING",
            (origin,),
        )
