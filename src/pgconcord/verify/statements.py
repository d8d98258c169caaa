"""The SQL verify runs on every node: settings that make each node render values alike, and the
statements that hash a table or stream its (primary key, row hash) pairs in one agreed order."""

from __future__ import annotations

from collections.abc import Sequence

from psycopg import sql

# Values are compared as their to_jsonb() text, and some types render according to the session:
# timestamptz follows TimeZone, floats extra_float_digits, bytea bytea_output, money lc_monetary,
# intervals and ranges DateStyle and IntervalStyle, reg* types and format_type() search_path.
# Nodes configured differently must still agree on equal values, so every node renders alike.
_SESSION_SETTINGS = (
    # While one node computes a large table's hash the others wait, idle in their transaction;
    # a server-side limit on that would cut them off halfway through the comparison.
    ("idle_in_transaction_session_timeout", "0"),
    ("TimeZone", "UTC"),
    ("DateStyle", "ISO, YMD"),
    ("IntervalStyle", "postgres"),
    ("extra_float_digits", "3"),
    ("bytea_output", "hex"),
    ("lc_monetary", "C"),
    ("search_path", "pg_catalog"),
)

_ROW = sql.Identifier("verified_row")
_ROW_KEY = sql.Identifier("row_key")
_ROW_HASH = sql.Identifier("row_hash")
_DERIVED = sql.Identifier("derived")


def _row_hash(excluded_columns: Sequence[str], text_columns: Sequence[str] = ()) -> sql.Composable:
    """md5 of the row's jsonb text: jsonb orders keys itself, so column order does not matter.

    Columns absent on some node are left out, so that the shared columns can still be compared.
    Columns whose jsonb form would hide a difference (json text, -0, array bounds, a JSON null)
    are compared by their own text as well. convert_to makes the hashed bytes independent of
    each database's encoding.
    """
    document: sql.Composable = sql.SQL("to_jsonb({}.*)").format(_ROW)
    if text_columns:
        document = sql.SQL("({} || jsonb_object(ARRAY[{}]::text[]))").format(
            document,
            sql.SQL(", ").join(
                sql.SQL("{}, {}.{}::text").format(
                    sql.Literal(f"{column} as text"), _ROW, sql.Identifier(column)
                )
                for column in text_columns
            ),
        )
    if excluded_columns:
        document = sql.SQL("({} - ARRAY[{}]::text[])").format(
            document, sql.SQL(", ").join(sql.Literal(column) for column in excluded_columns)
        )
    return sql.SQL("md5(convert_to(({})::text, 'UTF8'))").format(document)


def _hash_statement(
    source: sql.Composable, excluded_columns: Sequence[str], text_columns: Sequence[str] = ()
) -> sql.Composed:
    # A sum of row hashes rather than a hash of the rows in key order: it needs no sort, has no
    # 1 GB limit on an aggregated string, and cannot depend on a collation. Summing is sound
    # because each row's text contains its primary key, so the rows form a set; the two halves
    # of md5 are summed separately as signed 64-bit values, in numeric so nothing overflows.
    return sql.SQL(
        "SELECT count(*),"
        " coalesce(sum(('x' || left({hash}, 16))::bit(64)::bigint::numeric), 0),"
        " coalesce(sum(('x' || right({hash}, 16))::bit(64)::bigint::numeric), 0)"
        " FROM (SELECT {row_hash} AS {hash} FROM {source}) AS {derived}"
    ).format(
        hash=_ROW_HASH,
        row_hash=_row_hash(excluded_columns, text_columns),
        source=source,
        derived=_DERIVED,
    )


def _rows_statement(
    source: sql.Composable,
    key_columns: Sequence[str],
    excluded_columns: Sequence[str],
    text_columns: Sequence[str] = (),
) -> sql.Composed:
    pairs = sql.SQL(", ").join(
        sql.SQL("{}, {}.{}").format(sql.Literal(column), _ROW, sql.Identifier(column))
        for column in key_columns
    )
    # Ordered by the UTF-8 bytes of the key's JSON text: every server sorts bytea alike, whatever
    # its collation, version or encoding, and Python orders str by code point, which is the
    # same order. The merge below relies on both sides agreeing.
    return sql.SQL(
        "SELECT {key}, {hash} FROM"
        " (SELECT jsonb_build_object({pairs})::text AS {key}, {row_hash} AS {hash}"
        " FROM {source}) AS {derived}"
        " ORDER BY convert_to({key}, 'UTF8')"
    ).format(
        key=_ROW_KEY,
        hash=_ROW_HASH,
        pairs=pairs,
        row_hash=_row_hash(excluded_columns, text_columns),
        source=source,
        derived=_DERIVED,
    )
