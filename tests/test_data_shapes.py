"""Values of every shape travel byte-identical: written on one node, read back the same on all.

Each test writes on north (often from a session whose settings differ from the server's: a
TimeZone, an IntervalStyle, a DateStyle), syncs, and compares the rows' text on every node,
read with the same fixed session settings everywhere. Text, not values: PostgreSQL calls some
different values equal ('1 day' = '24 hours', -0 = 0, '[0:2]={1,2,3}' differs only in bounds),
and `pgconcord verify` compares to_jsonb(), which cannot see some differences either (json
whitespace, -0), so both are checked.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pytest
from harness import Cluster

# Every node is read with these, so the text of equal values is equal.
READER_SETTINGS = {
    "TimeZone": "UTC",
    "DateStyle": "ISO, YMD",
    "IntervalStyle": "postgres",
    "extra_float_digits": "3",
    "bytea_output": "hex",
}
KOLKATA = {"TimeZone": "Asia/Kolkata"}

Statement = str | tuple[str, Sequence[Any]]


def prepare(cluster: Cluster, schema_sql: str, extra_config: str = "") -> None:
    """Create the same tables on every node, then install capture."""
    if extra_config:
        cluster.write_config(extra_config)
    for name in cluster.names:
        cluster.execute(name, schema_sql)
    cluster.setup()


def write(
    cluster: Cluster, node: str, *statements: Statement, settings: Mapping[str, str] = {}
) -> None:
    """Run statements on one node in a session with the given settings, one transaction each."""
    with cluster.connect(node) as connection:
        for setting, value in settings.items():
            connection.execute("SELECT set_config(%s, %s, false)", (setting, value))
        for statement in statements:
            text, parameters = statement if isinstance(statement, tuple) else (statement, None)
            connection.execute(text.encode(), parameters)


def read(cluster: Cluster, node: str, query: str) -> list[tuple[Any, ...]]:
    with cluster.connect(node) as connection:
        for setting, value in READER_SETTINGS.items():
            connection.execute("SELECT set_config(%s, %s, false)", (setting, value))
        return connection.execute(query.encode()).fetchall()


def server_version(cluster: Cluster) -> int:
    return int(cluster.value(cluster.names[0], "SHOW server_version_num"))


def same_everywhere(cluster: Cluster, query: str) -> list[tuple[Any, ...]]:
    """The query's rows on the writer (north), asserted equal on every other node."""
    writer = cluster.names[0]
    expected = read(cluster, writer, query)
    for node in cluster.names[1:]:
        assert read(cluster, node, query) == expected, f"{node} differs from {writer}: {query}"
    return expected


def synced_rows(cluster: Cluster, query: str) -> list[tuple[Any, ...]]:
    """Sync, then the query's rows, the same on every node; `pgconcord verify` must agree."""
    cluster.sync()
    rows = same_everywhere(cluster, query)
    cluster.assert_identical()
    return rows


def row_texts(
    cluster: Cluster, table: str, order_by: str = "id", *, sync: bool = True
) -> list[str]:
    """Every row of the table as text, (synced and) asserted equal on every node."""
    # An alias no test table has as a column name (a column would win over the whole row).
    query = f"SELECT whole_row::text FROM {table} AS whole_row ORDER BY {order_by}"
    rows = synced_rows(cluster, query) if sync else same_everywhere(cluster, query)
    return [str(row[0]) for row in rows]


# -- numbers ---------------------------------------------------------------------------------


def test_numeric_keeps_every_digit_scale_and_special_value(cluster: Cluster) -> None:
    prepare(
        cluster,
        "CREATE TABLE numbers (id int PRIMARY KEY, free numeric, fixed numeric(30, 10),"
        " small numeric(5, 2))",
    )
    forty_digits = "1234567890123456789012345678901234567890"
    write(
        cluster,
        "north",
        "INSERT INTO numbers VALUES"
        " (1, 1e-40, 12345678901234567890.1234567890, 999.99),"
        f" (2, {forty_digits}, -0.0000000001, -999.99),"
        f" (3, -{forty_digits}.{'0' * 39}1, 1.5, 0),"
        " (4, 'NaN', 0, NULL),"
        " (5, 'Infinity', NULL, 1),"
        " (6, '-Infinity', 99999999999999999999.9999999999, 2.5),"
        " (7, 1.000, 0.0000000000, 0.10),"
        " (8, 1e-400, NULL, NULL),"
        " (9, 1e400, NULL, NULL)",
    )
    rows = row_texts(cluster, "numbers")
    assert rows[:7] == [
        "(1,0.0000000000000000000000000000000000000001,12345678901234567890.1234567890,999.99)",
        f"(2,{forty_digits},-0.0000000001,-999.99)",
        f"(3,-{forty_digits}.{'0' * 39}1,1.5000000000,0.00)",
        "(4,NaN,0.0000000000,)",
        "(5,Infinity,,1.00)",
        "(6,-Infinity,99999999999999999999.9999999999,2.50)",
        "(7,1.000,0.0000000000,0.10)",
    ]
    write(
        cluster,
        "north",
        "UPDATE numbers SET free = -1e-40, fixed = -12345678901234567890.0000000001 WHERE id = 1",
        "UPDATE numbers SET free = 'NaN', small = -0.01 WHERE id = 5",
        "UPDATE numbers SET free = 0.1 WHERE id = 4",
        "DELETE FROM numbers WHERE id = 2",
    )
    rows = row_texts(cluster, "numbers")
    assert len(rows) == 8
    assert rows[0] == (
        "(1,-0.0000000000000000000000000000000000000001,-12345678901234567890.0000000001,999.99)"
    )


FLOATS_SCHEMA = "CREATE TABLE floats (id int PRIMARY KEY, d float8, r float4)"


def test_float_values_arrive_bit_for_bit(cluster: Cluster) -> None:
    prepare(cluster, FLOATS_SCHEMA)
    write(
        cluster,
        "north",
        "INSERT INTO floats VALUES"
        " (1, 0.1, 0.1),"
        " (2, 1e308, 3.4028235e38),"
        " (3, -1e308, -3.4028235e38),"
        " (4, 5e-324, 1e-45),"
        " (5, 'NaN', 'NaN'),"
        " (6, 'Infinity', 'Infinity'),"
        " (7, '-Infinity', '-Infinity'),"
        " (8, 0.1::float8 + 0.2::float8, 1.2345678),"
        " (9, 1.7976931348623157e308, 16777217),"
        " (10, 2.2250738585072014e-308, 1.17549435e-38),"
        " (11, 123456789.12345678, 3.14159265),"
        " (12, 0, 0),"
        " (13, NULL, NULL)",
    )
    rows = row_texts(cluster, "floats")
    assert rows[0] == "(1,0.1,0.1)"
    assert rows[7] == "(8,0.30000000000000004,1.2345678)"
    write(
        cluster,
        "north",
        "UPDATE floats SET d = 1e-300, r = 'NaN' WHERE id = 1",
        "UPDATE floats SET d = 'Infinity' WHERE id = 5",
        "DELETE FROM floats WHERE id = 2",
    )
    rows = row_texts(cluster, "floats")
    assert rows[0] == "(1,1e-300,NaN)"
    assert len(rows) == 12


def test_negative_zero_floats_stay_negative(cluster: Cluster) -> None:
    prepare(cluster, FLOATS_SCHEMA)
    write(cluster, "north", "INSERT INTO floats VALUES (1, '-0', '-0'), (2, 0, 0)")
    assert row_texts(cluster, "floats") == ["(1,-0,-0)", "(2,0,0)"]


def test_floats_written_by_a_session_with_extra_float_digits_0_keep_every_bit(
    cluster: Cluster,
) -> None:
    # extra_float_digits = 0 was the default before PostgreSQL 12 and still sits in old
    # configurations and client libraries; it changes how floats print, not what is stored.
    prepare(cluster, FLOATS_SCHEMA)
    write(
        cluster,
        "north",
        "INSERT INTO floats VALUES (1, 0.30000000000000004, 1.2345678),"
        " (2, 3.141592653589793, 0.33333334), (3, 1e-300, 16777216)",
        settings={"extra_float_digits": "0"},
    )
    assert row_texts(cluster, "floats") == [
        "(1,0.30000000000000004,1.2345678)",
        "(2,3.141592653589793,0.33333334)",
        "(3,1e-300,1.6777216e+07)",
    ]


# -- dates and times -------------------------------------------------------------------------


def test_dates_and_times_written_in_a_non_utc_session(cluster: Cluster) -> None:
    prepare(
        cluster,
        "CREATE TABLE moments (id int PRIMARY KEY, stamp_tz timestamptz, stamp timestamp,"
        " day date, clock time, clock_tz timetz)",
    )
    write(
        cluster,
        "north",
        "INSERT INTO moments VALUES"
        " (1, '2024-03-15 10:00:00.123456+00', '2024-03-15 10:00:00.123456', '2024-03-15',"
        "  '10:00:00.123456', '10:00:00.123456+05:30'),"
        " (2, 'infinity', 'infinity', 'infinity', '24:00:00', '24:00:00-15:59'),"
        " (3, '-infinity', '-infinity', '-infinity', '00:00:00', '00:00:00+15:59'),"
        # Kolkata had a local mean time offset with seconds in 1900 (+05:21:10).
        " (4, '1900-01-01 00:00:00+00', '0044-03-15 12:00:00 BC', '4713-01-01 BC',"
        "  '23:59:59.999999', '23:59:59.999999+00'),"
        " (5, '294276-12-31 23:59:59.999999+00', '294276-12-31 23:59:59.999999',"
        "  '5874897-12-31', '00:00:00.000001', '12:00:00-03:30'),"
        " (6, '4714-11-24 00:00:00+00 BC', '4714-11-24 00:00:00 BC', '4714-11-24 BC',"
        "  NULL, NULL),"
        # Written as local time: 2024-10-27 02:30 in Kolkata is 21:00 UTC the day before.
        " (7, '2024-10-27 02:30:00', '2024-10-27 02:30:00', '2024-10-27', '02:30', '02:30'),"
        " (8, NULL, NULL, NULL, NULL, NULL)",
        settings=KOLKATA,
    )
    rows = row_texts(cluster, "moments")
    assert rows[0] == (
        '(1,"2024-03-15 10:00:00.123456+00","2024-03-15 10:00:00.123456",2024-03-15,'
        "10:00:00.123456,10:00:00.123456+05:30)"
    )
    assert rows[3].startswith('(4,"1900-01-01 00:00:00+00",')
    assert rows[6].startswith('(7,"2024-10-26 21:00:00+00",')
    write(
        cluster,
        "north",
        "UPDATE moments SET stamp_tz = '2000-01-01 00:00:00', clock = '13:14:15.161718',"
        " clock_tz = '13:14:15.161718-07' WHERE id = 1",
        "UPDATE moments SET stamp = '2024-02-29 23:59:59.999999', day = '2024-02-29' WHERE id = 8",
        "DELETE FROM moments WHERE id = 3",
        settings=KOLKATA,
    )
    rows = row_texts(cluster, "moments")
    assert len(rows) == 7
    assert rows[0].startswith('(1,"1999-12-31 18:30:00+00",')


INTERVALS = (
    "1 year 2 months 3 days 04:05:06.789",
    "-1 year +2 months -3 days +04:05:06",
    "1 day -1 hour",
    "-00:00:00.000001",
    "100000 hours",
    "1.5 months",
    "0",
    "-1 mon +1 day -1 sec",
    "1000000 years 1000000 days 1000000:00:00.000001",
    "-1000000 years -1000000 days -1000000:00:00.000001",
)


def test_intervals_written_with_iso_8601_and_postgres_verbose_styles(cluster: Cluster) -> None:
    prepare(
        cluster, "CREATE TABLE spans (style text, id int, span interval, PRIMARY KEY (style, id))"
    )
    values = list(INTERVALS)
    if server_version(cluster) >= 170000:
        values += ["infinity", "-infinity"]
    styles = ("iso_8601", "postgres_verbose", "sql_standard")
    for style in styles:
        write(
            cluster,
            "north",
            *[
                ("INSERT INTO spans VALUES (%s, %s, %s::interval)", (style, index, value))
                for index, value in enumerate(values)
            ],
            settings={"IntervalStyle": style},
        )
    rows = synced_rows(cluster, "SELECT style, span::text FROM spans ORDER BY style, id")
    # Every style wrote the same values, and they arrived as they were written.
    by_style = {style: [span for written, span in rows if written == style] for style in styles}
    assert by_style["iso_8601"] == by_style["postgres_verbose"] == by_style["sql_standard"]
    assert by_style["iso_8601"][:4] == [
        "1 year 2 mons 3 days 04:05:06.789",
        "-10 mons -3 days +04:05:06",
        "1 day -01:00:00",
        "-00:00:00.000001",
    ]
    for style in styles:
        write(
            cluster,
            "north",
            (
                "UPDATE spans SET span = span * 2 - interval '1 microsecond'"
                " WHERE style = %s AND id < 3",
                (style,),
            ),
            ("DELETE FROM spans WHERE style = %s AND id = 3", (style,)),
            settings={"IntervalStyle": style},
        )
    assert len(row_texts(cluster, "spans", "style, id")) == len(styles) * (len(values) - 1)


# -- json ------------------------------------------------------------------------------------


def test_jsonb_documents_round_trip(cluster: Cluster) -> None:
    prepare(cluster, "CREATE TABLE documents (id int PRIMARY KEY, body jsonb)")
    documents = [
        '{"b": 1, "a": [1, 2.50, {"deep": [null, true, false]}], "c": {}}',
        '[1, "two", 3.000000000000000000001, -1e-40, 1e+400, [], {}]',
        '"a string with \\"quotes\\", \\\\ backslashes, \\n newline, \\u00e9 and \U0001f600"',
        "12345678901234567890.123456789012345678901234567890",
        "true",
        '{"k\\u0001ey with control": "\\t", "": "empty key", "ü": "Größe"}',
    ]
    write(
        cluster,
        "north",
        *[
            ("INSERT INTO documents VALUES (%s, %s::jsonb)", (index, document))
            for index, document in enumerate(documents)
        ],
        "INSERT INTO documents VALUES (100, NULL)",
    )
    rows = synced_rows(cluster, "SELECT id, body::text FROM documents ORDER BY id")
    expected = [
        (index, str(cluster.value("north", "SELECT %s::jsonb::text", (document,))))
        for index, document in enumerate(documents)
    ]
    assert rows == [*expected, (100, None)]
    write(
        cluster,
        "north",
        "UPDATE documents SET body = jsonb_set(body, '{a,2,deep,0}', '\"was null\"') WHERE id = 0",
        "UPDATE documents SET body = '[]' WHERE id = 100",
        "DELETE FROM documents WHERE id = 4",
    )
    rows = synced_rows(cluster, "SELECT id, body::text FROM documents ORDER BY id")
    assert rows[0] == (0, '{"a": [1, 2.50, {"deep": ["was null", true, false]}], "b": 1, "c": {}}')
    assert rows[-1] == (100, "[]")


def test_a_json_null_stays_distinct_from_sql_null(cluster: Cluster) -> None:
    prepare(cluster, "CREATE TABLE nullish (id int PRIMARY KEY, b jsonb, j json)")
    write(
        cluster,
        "north",
        "INSERT INTO nullish VALUES (1, 'null', 'null'), (2, NULL, NULL)",
    )
    rows = synced_rows(
        cluster,
        "SELECT id, b IS NULL, b::text, j IS NULL, j::text FROM nullish ORDER BY id",
    )
    assert rows == [(1, False, "null", False, "null"), (2, True, None, True, None)]


def test_json_text_is_kept_byte_for_byte(cluster: Cluster) -> None:
    # json (unlike jsonb) keeps its input text: whitespace, key order and duplicate keys.
    prepare(cluster, "CREATE TABLE raw_documents (id int PRIMARY KEY, body json)")
    documents = [
        '{"b": 1,  "a": 2, "a": 3}',
        "[1, 2 ,3]",
        ' {"nested" : {"x":1.50, "x": 1.5}}\n',
        '{"z": "\\u00e9 stays escaped", "a": "é raw"}',
        "1e1000",
    ]
    write(
        cluster,
        "north",
        *[
            ("INSERT INTO raw_documents VALUES (%s, %s::json)", (index, document))
            for index, document in enumerate(documents)
        ],
    )
    rows = synced_rows(cluster, "SELECT id, body::text FROM raw_documents ORDER BY id")
    assert rows == list(enumerate(documents))


# -- arrays ----------------------------------------------------------------------------------


def test_arrays_with_nulls_quotes_and_several_dimensions(cluster: Cluster) -> None:
    prepare(
        cluster,
        "CREATE TABLE arrays (id int PRIMARY KEY, ints int[], texts text[], grid int[][],"
        " nums numeric[], days date[], stamps timestamptz[], spans interval[], flags bool[])",
    )
    texts = [
        "plain",
        None,
        'with "quotes"',
        "back\\slash",
        "",
        "NULL",
        "{braces}",
        "comma,here",
        " spaced ",
        "emoji 😀 Größe",
        "new\nline",
    ]
    write(
        cluster,
        "north",
        (
            "INSERT INTO arrays VALUES (1, '{1,2,3}', %s, '{{1,2},{3,4}}', '{1.50,NaN,-1e-40}',"
            " '{2024-03-15,infinity}', '{\"2024-03-15 10:00:00+00\",-infinity}',"
            " '{\"1 day -1 hour\",\"-00:00:00.000001\"}', '{t,f,NULL}')",
            (texts,),
        ),
        "INSERT INTO arrays VALUES (2, '{}', '{}', '{{{1},{2}},{{3},{4}}}', '{}', '{}', '{}',"
        " '{}', '{}')",
        "INSERT INTO arrays VALUES (3, '{NULL}', '{NULL,NULL}', '{{NULL,1},{2,NULL}}',"
        " '{NULL}', '{NULL}', '{NULL}', '{NULL}', '{NULL}')",
        "INSERT INTO arrays (id) VALUES (4)",
        settings={**KOLKATA, "IntervalStyle": "iso_8601"},
    )
    rows = row_texts(cluster, "arrays")
    assert cluster.value("south", "SELECT texts FROM arrays WHERE id = 1") == texts
    assert rows[3] == "(4,,,,,,,,)"
    write(
        cluster,
        "north",
        (
            "UPDATE arrays SET grid = '{{5,6,7},{8,9,10}}', texts = texts || %s WHERE id = 1",
            (['a\\"b'],),
        ),
        "UPDATE arrays SET ints = NULL, texts = '{}' WHERE id = 3",
        "DELETE FROM arrays WHERE id = 2",
    )
    rows = row_texts(cluster, "arrays")
    assert len(rows) == 3
    assert cluster.value("east", "SELECT texts[12] FROM arrays WHERE id = 1") == 'a\\"b'


def test_arrays_keep_their_lower_bounds(cluster: Cluster) -> None:
    prepare(cluster, "CREATE TABLE bounded (id int PRIMARY KEY, ints int[], grid text[])")
    write(
        cluster,
        "north",
        "INSERT INTO bounded VALUES (1, '[0:2]={1,2,3}', '[-3:-2][5:6]={{a,b},{c,d}}')",
    )
    assert row_texts(cluster, "bounded") == ['(1,"[0:2]={1,2,3}","[-3:-2][5:6]={{a,b},{c,d}}")']


# -- other scalar types ----------------------------------------------------------------------


def test_bytea_uuid_network_enum_domain_composite_and_text(cluster: Cluster) -> None:
    prepare(
        cluster,
        """
        CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy', 'it''s "complicated"', 'Größe 😀');
        CREATE DOMAIN percent AS numeric(5, 2) CHECK (VALUE BETWEEN 0 AND 100);
        CREATE TYPE address AS (street text, number int, tags text[], located_at timestamptz);
        CREATE TABLE things (
            id int PRIMARY KEY, b bytea, u uuid, ip inet, net cidr, mac macaddr,
            mac8 macaddr8, m mood, p percent, a address, flag boolean, note text,
            fixed char(5), short varchar(10), bits bit(8), some_bits varbit);
        """,
    )
    text = "unicode é ñ 漢字 😀, back\\slashes \\\\ \\x00, \"quotes\", 'apostrophes', tab\t, \r\n"
    write(
        cluster,
        "north",
        (
            "INSERT INTO things VALUES (1, '\\x00ff105c22', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',"
            " '192.168.1.5/24', '10.0.0.0/8', '08:00:2b:01:02:03', '08:00:2b:01:02:03:04:05',"
            " 'happy', 99.5, ROW('Main \"St\"', 5, '{a,NULL}', '2024-03-15 10:00+00'), true,"
            " %s, 'ab', 'x', B'10101010', B'101')",
            (text,),
        ),
        "INSERT INTO things VALUES (2, '\\x', '00000000-0000-0000-0000-000000000000', '::1',"
        " '2001:db8::/32', 'ff:ff:ff:ff:ff:ff', '00:00:00:00:00:00:00:00',"
        " 'it''s \"complicated\"', 0, ROW(NULL, NULL, NULL, NULL), false, '', '', '',"
        " B'00000000', B'')",
        "INSERT INTO things VALUES (3, NULL, NULL, '::ffff:1.2.3.4/128', NULL, NULL, NULL,"
        " 'Größe 😀', 100, ROW('', 0, '{}', 'infinity'), NULL, 'NULL', NULL, NULL, NULL, NULL)",
        "INSERT INTO things (id) VALUES (4)",
        settings={**KOLKATA, "bytea_output": "escape"},
    )
    rows = row_texts(cluster, "things")
    assert rows[3] == "(4,,,,,,,,,,,,,,,)"
    assert cluster.value("east", "SELECT note FROM things WHERE id = 1") == text
    assert cluster.value("east", "SELECT b FROM things WHERE id = 1") == b'\x00\xff\x10\\"'
    assert rows[1].startswith('(2,"\\\\x",')
    assert ',"(,,,)",f,"","     ","",' in rows[1]
    write(
        cluster,
        "north",
        "UPDATE things SET note = NULL, a.number = 6 WHERE id = 2",
        "UPDATE things SET note = '', m = 'sad', p = 12.34 WHERE id = 3",
        "DELETE FROM things WHERE id = 4",
    )
    rows = row_texts(cluster, "things")
    assert len(rows) == 3
    notes = same_everywhere(cluster, "SELECT id, note, note IS NULL FROM things ORDER BY id")
    assert notes == [(1, text, False), (2, None, True), (3, "", False)]


# -- ranges ----------------------------------------------------------------------------------


def test_ranges_and_multiranges(cluster: Cluster) -> None:
    prepare(
        cluster,
        "CREATE TABLE ranges (id int PRIMARY KEY, i int4range, big int8range, n numrange,"
        " stamps tstzrange, local tsrange, days daterange, im int4multirange,"
        " stampsm tstzmultirange)",
    )
    write(
        cluster,
        "north",
        "INSERT INTO ranges VALUES (1, '[1,10)', '[-9223372036854775808,9223372036854775807)',"
        " '(1.5,2.50]', '[2024-03-15 10:00:00.5+00,2024-03-16 10:00+00)',"
        " '[2024-01-01 00:00,infinity)', '[2024-03-01,2024-04-01)', '{[1,3),[5,8)}',"
        " '{[2024-01-01 00:00+00,2024-01-02 00:00+00), [2024-02-01 00:00+00,)}')",
        "INSERT INTO ranges VALUES (2, 'empty', 'empty', 'empty', 'empty', 'empty', 'empty',"
        " '{}', '{}')",
        "INSERT INTO ranges VALUES (3, '(,)', '(,5]', '[-1e-40,)', '(,)', '(,)',"
        " '[,2024-03-01)', '{(,5),[10,)}', '{(,)}')",
        "INSERT INTO ranges (id) VALUES (4)",
        settings=KOLKATA,
    )
    rows = row_texts(cluster, "ranges")
    assert rows[1] == "(2,empty,empty,empty,empty,empty,empty,{},{})"
    assert '"[""2024-03-15 10:00:00.5+00"",""2024-03-16 10:00:00+00"")"' in rows[0]
    write(
        cluster,
        "north",
        "UPDATE ranges SET i = '[5,6]', stamps = 'empty', im = '{}' WHERE id = 1",
        "UPDATE ranges SET i = 'empty', n = '[0,0]' WHERE id = 3",
        "DELETE FROM ranges WHERE id = 2",
        settings=KOLKATA,
    )
    rows = row_texts(cluster, "ranges")
    assert len(rows) == 3
    assert rows[0].startswith('(1,"[5,7)",')


def test_ranges_written_by_a_session_with_a_non_iso_datestyle(cluster: Cluster) -> None:
    # DateStyle 'SQL, DMY' is a common European client setting; it changes how dates print.
    prepare(
        cluster,
        "CREATE TABLE bookings (id int PRIMARY KEY, day date, days daterange, stay tstzrange)",
    )
    write(
        cluster,
        "north",
        "INSERT INTO bookings VALUES (1, '2024-03-02', '[2024-03-02,2024-03-12)',"
        " '[2024-03-02 10:00+00,2024-03-12 10:00+00)')",
        settings={**KOLKATA, "DateStyle": "SQL, DMY"},
    )
    assert row_texts(cluster, "bookings") == [
        '(1,2024-03-02,"[2024-03-02,2024-03-12)",'
        '"[""2024-03-02 10:00:00+00"",""2024-03-12 10:00:00+00"")")'
    ]


# -- table shapes ----------------------------------------------------------------------------


def test_a_table_with_100_columns(cluster: Cluster) -> None:
    kinds = ["int", "text", "numeric(12, 3)", "timestamptz", "boolean"]
    columns = [(f"c{index:03}", kinds[index % len(kinds)]) for index in range(1, 100)]
    prepare(
        cluster,
        "CREATE TABLE wide (id int PRIMARY KEY, "
        + ", ".join(f"{name} {kind}" for name, kind in columns)
        + ")",
    )
    samples = {
        "int": "{n}",
        "text": "'text {n} ''q'' é'",
        "numeric(12, 3)": "{n}.125",
        "timestamptz": "'2024-03-15 10:00:00+00'::timestamptz + interval '{n} seconds'",
        "boolean": "{n} % 2 = 0",
    }
    for row in (1, 2, 3):
        values = [
            samples[kind].format(n=row * 1000 + index) for index, (_, kind) in enumerate(columns)
        ]
        write(cluster, "north", f"INSERT INTO wide VALUES ({row}, {', '.join(values)})")
    rows = row_texts(cluster, "wide")
    assert len(rows) == 3
    assert rows[0].count(",") >= 99
    write(
        cluster,
        "north",
        "UPDATE wide SET c001 = NULL, c051 = 'changed', c099 = NULL WHERE id = 1",
        "DELETE FROM wide WHERE id = 2",
    )
    rows = row_texts(cluster, "wide")
    assert len(rows) == 2
    assert same_everywhere(cluster, "SELECT c001, c051, c099 FROM wide WHERE id = 1") == [
        (None, "changed", None)
    ]


def test_a_composite_key_of_text_and_timestamptz_and_a_key_update(cluster: Cluster) -> None:
    prepare(
        cluster,
        "CREATE TABLE readings (sensor text, taken_at timestamptz, value numeric,"
        " PRIMARY KEY (sensor, taken_at))",
    )
    write(
        cluster,
        "north",
        "INSERT INTO readings VALUES ('a', '2024-03-15 10:00:00.000001+00', 1.5),"
        " ('b \"quoted\" \\ é', '2024-03-15 10:00:00+00', 2), ('a', 'infinity', 3),"
        " ('', '1900-01-01 00:00:00+00', 4)",
        settings=KOLKATA,
    )
    order = 'sensor COLLATE "C", taken_at'
    rows = row_texts(cluster, "readings", order)
    assert rows[1] == '(a,"2024-03-15 10:00:00.000001+00",1.5)'
    # A key update, an update and a delete, from a session in the same zone, then from UTC.
    write(
        cluster,
        "north",
        "UPDATE readings SET taken_at = taken_at + interval '1 hour', value = 10"
        " WHERE sensor = 'a' AND taken_at < 'infinity'",
        "UPDATE readings SET value = value + 1 WHERE sensor LIKE 'b%'",
        "DELETE FROM readings WHERE sensor = ''",
        settings=KOLKATA,
    )
    rows = row_texts(cluster, "readings", order)
    assert rows == [
        '(a,"2024-03-15 11:00:00.000001+00",10)',
        "(a,infinity,3)",
        '("b ""quoted"" \\\\ é","2024-03-15 10:00:00+00",3)',
    ]
    write(
        cluster,
        "north",
        "UPDATE readings SET value = 20 WHERE sensor = 'a' AND taken_at < 'infinity'",
        "UPDATE readings SET sensor = 'c' WHERE sensor = 'a' AND taken_at = 'infinity'",
        settings={"TimeZone": "UTC"},
    )
    assert row_texts(cluster, "readings", order) == [
        '(a,"2024-03-15 11:00:00.000001+00",20)',
        '("b ""quoted"" \\\\ é","2024-03-15 10:00:00+00",3)',
        "(c,infinity,3)",
    ]


def test_a_timestamptz_key_is_one_row_whatever_the_writers_time_zone(cluster: Cluster) -> None:
    """A delete and a later update of the same row on two nodes, from sessions in different
    time zones: both name one row, so the delete wins on every node (an update that had not
    seen the delete never brings the row back). Keys written differently would leave it."""
    prepare(
        cluster,
        "CREATE TABLE slots (room text, starts_at timestamptz, booked_by text,"
        " PRIMARY KEY (room, starts_at))",
    )
    write(
        cluster,
        "north",
        "INSERT INTO slots VALUES ('blue', '2024-03-15 10:00:00+00', 'ann')",
        settings=KOLKATA,
    )
    row_texts(cluster, "slots", "room")
    # Concurrently (no sync in between): south deletes the row from a UTC session, then north
    # updates it from a Kolkata session. The update is the later write.
    write(cluster, "south", "DELETE FROM slots WHERE room = 'blue'", settings={"TimeZone": "UTC"})
    write(
        cluster, "north", "UPDATE slots SET booked_by = 'bob' WHERE room = 'blue'", settings=KOLKATA
    )
    cluster.sync()
    present = {
        node: [row[0] for row in read(cluster, node, "SELECT s::text FROM slots s")]
        for node in cluster.names
    }
    assert present == {node: [] for node in cluster.names}
    cluster.assert_identical()


def test_generated_columns_are_recomputed_on_each_node(cluster: Cluster) -> None:
    virtual = (
        ", doubled numeric GENERATED ALWAYS AS (net * 2) VIRTUAL"
        if server_version(cluster) >= 180000
        else ""
    )
    prepare(
        cluster,
        "CREATE TABLE priced (id int PRIMARY KEY, name text, net numeric(12, 2),"
        " rate numeric(4, 3) NOT NULL DEFAULT 0.2,"
        " gross numeric(14, 2) GENERATED ALWAYS AS (round(net * (1 + rate), 2)) STORED,"
        " label text GENERATED ALWAYS AS (upper(name) || ' #' || id) STORED" + virtual + ")",
    )
    write(
        cluster,
        "north",
        "INSERT INTO priced (id, name, net) VALUES (1, 'tea', 10), (2, 'cake', 3.33),"
        " (3, NULL, NULL)",
    )
    rows = row_texts(cluster, "priced")
    assert rows[0].startswith('(1,tea,10.00,0.200,12.00,"TEA #1"')
    write(
        cluster,
        "north",
        "UPDATE priced SET net = 20, name = 'green tea' WHERE id = 1",
        "UPDATE priced SET rate = 0 WHERE id = 2",
        "DELETE FROM priced WHERE id = 3",
    )
    rows = row_texts(cluster, "priced")
    assert rows[0].startswith('(1,"green tea",20.00,0.200,24.00,"GREEN TEA #1"')
    assert len(rows) == 2


def test_an_identity_column_as_the_key(cluster: Cluster) -> None:
    prepare(
        cluster,
        "CREATE TABLE tickets (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, title text,"
        " seq int GENERATED BY DEFAULT AS IDENTITY)",
    )
    # setup may step each node's sequences apart; the values are whatever the writer drew.
    write(cluster, "north", "INSERT INTO tickets (title) VALUES ('one'), ('two'), ('three')")
    write(cluster, "south", "INSERT INTO tickets (title) VALUES ('from south')")
    rows = row_texts(cluster, "tickets")
    assert len(rows) == 4
    titles = "SELECT title FROM tickets ORDER BY title"
    assert same_everywhere(cluster, titles) == [("from south",), ("one",), ("three",), ("two",)]
    write(
        cluster,
        "north",
        "UPDATE tickets SET title = 'TWO', seq = 7 WHERE title = 'two'",
        "DELETE FROM tickets WHERE title = 'three'",
        "INSERT INTO tickets (title) VALUES ('four')",
    )
    assert len(row_texts(cluster, "tickets")) == 4
    assert same_everywhere(cluster, "SELECT title, seq FROM tickets WHERE seq = 7") == [("TWO", 7)]


def test_an_always_identity_column_outside_the_key(cluster: Cluster) -> None:
    prepare(
        cluster,
        "CREATE TABLE invoices (code text PRIMARY KEY,"
        " number int GENERATED ALWAYS AS IDENTITY, amount numeric)",
    )
    write(cluster, "north", "INSERT INTO invoices (code, amount) VALUES ('A', 1), ('B', 2)")
    numbers = "SELECT code, number FROM invoices ORDER BY code"
    drawn = read(cluster, "north", numbers)
    assert row_texts(cluster, "invoices", "code") == [
        f"(A,{drawn[0][1]},1)",
        f"(B,{drawn[1][1]},2)",
    ]
    write(cluster, "north", "UPDATE invoices SET amount = 5 WHERE code = 'A'")
    assert row_texts(cluster, "invoices", "code") == [
        f"(A,{drawn[0][1]},5)",
        f"(B,{drawn[1][1]},2)",
    ]


def test_the_applications_triggers_fire_only_where_the_change_was_made(cluster: Cluster) -> None:
    prepare(
        cluster,
        """
        CREATE TABLE audit (table_name text, operation text, row_id int);
        CREATE TABLE notes (id int PRIMARY KEY, body text, edits int NOT NULL DEFAULT 0);
        CREATE FUNCTION notes_stamp() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            NEW.body := NEW.body || ' [stamped]';
            NEW.edits := CASE WHEN TG_OP = 'UPDATE' THEN OLD.edits + 1 ELSE 1 END;
            RETURN NEW;
        END $$;
        CREATE FUNCTION notes_audit() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO audit VALUES (TG_TABLE_NAME, TG_OP,
                                      CASE WHEN TG_OP = 'DELETE' THEN OLD.id ELSE NEW.id END);
            RETURN NULL;
        END $$;
        CREATE TRIGGER notes_stamp BEFORE INSERT OR UPDATE ON notes
            FOR EACH ROW EXECUTE FUNCTION notes_stamp();
        CREATE TRIGGER notes_audit AFTER INSERT OR UPDATE OR DELETE ON notes
            FOR EACH ROW EXECUTE FUNCTION notes_audit();
        """,
        extra_config='[replication]\nschemas = ["public"]\nexclude = ["public.audit"]\n',
    )
    write(
        cluster,
        "north",
        "INSERT INTO notes (id, body) VALUES (1, 'first'), (2, 'second')",
        "UPDATE notes SET body = 'edited' WHERE id = 1",
        "DELETE FROM notes WHERE id = 2",
    )
    assert row_texts(cluster, "notes") == ['(1,"edited [stamped]",2)']
    audits = {node: cluster.value(node, "SELECT count(*) FROM audit") for node in cluster.names}
    assert audits == {"north": 4, "south": 0, "east": 0}


def test_a_partitioned_table_routes_rows_and_moves_them_between_partitions(
    cluster: Cluster,
) -> None:
    prepare(
        cluster,
        """
        CREATE TABLE events (region text, id int, happened date NOT NULL, payload text,
                             PRIMARY KEY (region, id)) PARTITION BY LIST (region);
        CREATE TABLE events_eu PARTITION OF events FOR VALUES IN ('eu');
        CREATE TABLE events_us PARTITION OF events FOR VALUES IN ('us')
            PARTITION BY RANGE (id);
        CREATE TABLE events_us_low PARTITION OF events_us FOR VALUES FROM (MINVALUE) TO (100);
        CREATE TABLE events_us_high PARTITION OF events_us FOR VALUES FROM (100) TO (MAXVALUE);
        CREATE TABLE events_other PARTITION OF events DEFAULT;
        """,
    )
    write(
        cluster,
        "north",
        "INSERT INTO events VALUES ('eu', 1, '2024-01-01', 'a'), ('us', 2, '2024-01-02', 'b'),"
        " ('us', 200, '2024-01-03', 'c'), ('apac', 3, '2024-01-04', 'd'),"
        " ('eu', 4, '2024-01-05', 'e')",
    )
    query = "SELECT tableoid::regclass::text, t::text FROM events t ORDER BY region, id"
    assert synced_rows(cluster, query) == [
        ("events_other", "(apac,3,2024-01-04,d)"),
        ("events_eu", "(eu,1,2024-01-01,a)"),
        ("events_eu", "(eu,4,2024-01-05,e)"),
        ("events_us_low", "(us,2,2024-01-02,b)"),
        ("events_us_high", "(us,200,2024-01-03,c)"),
    ]
    write(
        cluster,
        "north",
        "UPDATE events SET region = 'us', payload = 'moved' WHERE region = 'eu' AND id = 1",
        "UPDATE events SET id = 150 WHERE region = 'us' AND id = 2",
        "UPDATE events SET payload = 'stays' WHERE region = 'apac'",
        "DELETE FROM events WHERE region = 'eu' AND id = 4",
    )
    assert synced_rows(cluster, query) == [
        ("events_other", "(apac,3,2024-01-04,stays)"),
        ("events_us_low", "(us,1,2024-01-01,moved)"),
        ("events_us_high", "(us,150,2024-01-02,b)"),
        ("events_us_high", "(us,200,2024-01-03,c)"),
    ]


def test_identifiers_that_need_quoting(cluster: Cluster) -> None:
    prepare(
        cluster,
        """
        CREATE TABLE "Order Items" ("order id" text, "a""b" int, "Größe" numeric,
                                    "select" text, "UPPER" text, "line 😀" int,
                                    PRIMARY KEY ("order id", "a""b", "select"));
        CREATE TABLE "we""ird.table" (id int PRIMARY KEY, "from" text);
        """,
    )
    write(
        cluster,
        "north",
        """INSERT INTO "Order Items" VALUES ('o 1', 1, 42.5, 'sel"ect', 'Up', 7),"""
        """ ('o 2', 2, NULL, '', 'x', NULL)""",
        """INSERT INTO "we""ird.table" VALUES (1, 'where')""",
    )
    items = '"Order Items"'
    assert row_texts(cluster, items, '"order id"') == [
        '("o 1",1,42.5,"sel""ect",Up,7)',
        '("o 2",2,,"",x,)',
    ]
    assert row_texts(cluster, '"we""ird.table"', sync=False) == ["(1,where)"]
    write(
        cluster,
        "north",
        """UPDATE "Order Items" SET "Größe" = 1, "UPPER" = NULL WHERE "a""b" = 1""",
        """UPDATE "Order Items" SET "select" = 'moved', "a""b" = 3 WHERE "a""b" = 2""",
        """DELETE FROM "we""ird.table" WHERE "from" = 'where'""",
    )
    assert row_texts(cluster, items, '"order id"') == [
        '("o 1",1,1,"sel""ect",,7)',
        '("o 2",3,,moved,x,)',
    ]
    assert row_texts(cluster, '"we""ird.table"', sync=False) == []


def test_columns_named_like_the_aliases_of_the_apply_statements(cluster: Cluster) -> None:
    # Short names are common (t for a time, d for a date, k for a key, v for a value), and
    # pgconcord's own statements alias their tables with such letters.
    prepare(
        cluster,
        "CREATE TABLE samples (k int PRIMARY KEY, t timestamptz, d date, r real, v text,"
        " w int, s text, l text, i int, excluded text)",
    )
    write(
        cluster,
        "north",
        "INSERT INTO samples VALUES (1, '2024-03-15 10:00+00', '2024-03-15', 1.5, 'v', 2, 's',"
        " 'l', 3, 'x'), (2, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL)",
    )
    assert row_texts(cluster, "samples", "k") == [
        '(1,"2024-03-15 10:00:00+00",2024-03-15,1.5,v,2,s,l,3,x)',
        "(2,,,,,,,,,)",
    ]
    write(
        cluster,
        "north",
        "UPDATE samples SET t = NULL, v = 'changed' WHERE k = 1",
        "DELETE FROM samples WHERE k = 2",
    )
    assert row_texts(cluster, "samples", "k") == ["(1,,2024-03-15,1.5,changed,2,s,l,3,x)"]


def test_a_table_in_a_second_schema(cluster: Cluster) -> None:
    prepare(
        cluster,
        """
        CREATE SCHEMA sales;
        CREATE TABLE orders (id int PRIMARY KEY, note text);
        CREATE TABLE sales.orders (id int PRIMARY KEY, amount numeric, placed_at timestamptz);
        """,
        extra_config='[replication]\nschemas = ["public", "sales"]\n',
    )
    write(
        cluster,
        "north",
        "INSERT INTO orders VALUES (1, 'public one')",
        "INSERT INTO sales.orders VALUES (1, 9.99, '2024-03-15 10:00+00'), (2, 5, NULL)",
    )
    assert row_texts(cluster, "orders") == ['(1,"public one")']
    assert row_texts(cluster, "sales.orders", sync=False) == [
        '(1,9.99,"2024-03-15 10:00:00+00")',
        "(2,5,)",
    ]
    write(
        cluster,
        "north",
        "UPDATE sales.orders SET amount = 10 WHERE id = 1",
        "DELETE FROM sales.orders WHERE id = 2",
    )
    assert row_texts(cluster, "sales.orders") == ['(1,10,"2024-03-15 10:00:00+00")']
    assert row_texts(cluster, "orders", sync=False) == ['(1,"public one")']


# -- size ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_20_mb_bytea_value(system_cluster: Cluster) -> None:
    cluster = system_cluster
    prepare(cluster, "CREATE TABLE blobs (id int PRIMARY KEY, data bytea)")
    # 655360 sha256 digests: 20 MiB that do not compress.
    write(
        cluster,
        "north",
        "INSERT INTO blobs SELECT 1, string_agg(sha256(int4send(i)), ''::bytea ORDER BY i)"
        " FROM generate_series(1, 655360) AS i",
        "INSERT INTO blobs VALUES (2, '\\x00')",
    )
    query = "SELECT id, length(data), md5(data) FROM blobs ORDER BY id"
    rows = synced_rows(cluster, query)
    assert rows[0][1] == 20 * 1024 * 1024
    write(
        cluster,
        "north",
        "UPDATE blobs SET data = overlay(data placing '\\xff00ff'::bytea from 10000000)"
        " WHERE id = 1",
        "DELETE FROM blobs WHERE id = 2",
    )
    cluster.sync()  # verify already read the 20 MB once: md5 and length are the check now
    changed = same_everywhere(cluster, query)
    assert len(changed) == 1
    assert changed[0][1] == 20 * 1024 * 1024
    assert changed[0][2] != rows[0][2]
