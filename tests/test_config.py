"""Unit tests of loading and validating the cluster file; no database is involved."""

import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from pgconcord.config import (
    ClusterConfig,
    NodeConfig,
    load_config,
    parse_config,
    redacted_dsn,
)
from pgconcord.errors import ConfigError

# The example of DESIGN.md, "The interface", verbatim: it is the contract.
DESIGN_EXAMPLE = """\
[cluster]
name = "shops"

[[node]]
name = "north"
dsn  = "host=10.0.0.5 dbname=shop user=pgconcord"   # password from ~/.pgpass or PGPASSWORD

[[node]]
name = "south"
dsn  = "host=10.0.0.6 dbname=shop user=pgconcord"

[replication]
schemas = ["public"]          # every table in these schemas, now and later
exclude = ["public.scratch"]

[conflict]                    # optional; per-table overrides under [conflict.table."schema.t"]
default = "last-writer-wins"
"""

MINIMAL = """\
[cluster]
name = "shops"

[[node]]
name = "north"
dsn = "host=10.0.0.5 dbname=shop"
"""


def config_error(text: str, source: str = "shops.toml") -> str:
    with pytest.raises(ConfigError) as raised:
        parse_config(text, source)
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(f"{source}: ")
    return message


def with_replaced(old: str, new: str, text: str = DESIGN_EXAMPLE) -> str:
    assert old in text
    return text.replace(old, new, 1)


# --- the valid example and defaults -----------------------------------------------------------


def test_design_example_is_valid() -> None:
    config = parse_config(DESIGN_EXAMPLE)

    assert config.cluster.name == "shops"
    assert config.node_names == ["north", "south"]
    assert config.nodes == config.node
    assert config.node_by_name("south").dsn == "host=10.0.0.6 dbname=shop user=pgconcord"
    assert config.replication.schemas == ["public"]
    assert config.replication.exclude == ["public.scratch"]
    assert config.conflict.default == "last-writer-wins"
    assert config.conflict.table == {}
    assert config.source_path is None


def test_defaults() -> None:
    config = parse_config(MINIMAL)

    assert config.replication.schemas == ["public"]
    assert config.replication.exclude == []
    assert config.conflict.default == "last-writer-wins"
    assert config.conflict.table == {}


def test_defaults_are_not_shared_between_configs() -> None:
    first = parse_config(MINIMAL)
    second = parse_config(MINIMAL)

    assert first.replication.schemas is not second.replication.schemas


def test_last_writer_wins_is_the_default_policy() -> None:
    assert parse_config(MINIMAL).conflict.default == "last-writer-wins"
    text = MINIMAL + '[conflict]\ndefault = "last-writer-wins"\n'
    assert parse_config(text).conflict.default == "last-writer-wins"


def test_keep_existing_may_be_the_default() -> None:
    text = MINIMAL + '[conflict]\ndefault = "keep-existing"\n'
    config = parse_config(text)
    assert config.table_policy("public", "anything") == ("keep-existing", ())


def test_node_priority_needs_a_list() -> None:
    with pytest.raises(ConfigError, match=r"conflict\.default: node-priority needs a list"):
        parse_config(MINIMAL + '[conflict]\ndefault = "node-priority"\n')
    text = DESIGN_EXAMPLE + '\n[conflict.table."public.accounts"]\npolicy = "node-priority"\n'
    with pytest.raises(ConfigError, match=r'"public\.accounts"\.policy: node-priority needs'):
        parse_config(text)


def test_per_table_policies() -> None:
    text = (
        DESIGN_EXAMPLE
        + '\n[conflict.table."public.accounts"]\npriority = ["south", "north"]\n'
        + '[conflict.table."public.orders"]\npolicy = "keep-existing"\n'
    )
    config = parse_config(text)
    assert config.table_policy("public", "accounts") == ("node-priority", ("south", "north"))
    assert config.table_policy("public", "orders") == ("keep-existing", ())
    assert config.table_policy("public", "other") == ("last-writer-wins", ())


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ('policy = "first-wins"', "unknown policy 'first-wins'"),
        ('resolver = "shop resolve_order"', "is not of the form 'package.module:function'"),
        (
            'resolver = "shop:resolve"\npriority = ["north"]',
            "either a resolver or a node priority list",
        ),
        ('policy = "keep-existing"\npriority = ["north"]', "priority only applies"),
    ],
)
def test_table_policy_mistakes_are_refused(setting: str, message: str) -> None:
    text = DESIGN_EXAMPLE + f'\n[conflict.table."public.accounts"]\n{setting}\n'
    with pytest.raises(ConfigError, match=message):
        parse_config(text)


def test_exclusion_and_replicated_tables() -> None:
    config = parse_config(DESIGN_EXAMPLE)

    assert config.is_excluded("public", "scratch")
    assert not config.is_excluded("public", "accounts")
    assert config.is_replicated("public", "accounts")
    assert not config.is_replicated("public", "scratch")
    assert not config.is_replicated("audit", "log")


def test_node_by_name_unknown() -> None:
    config = parse_config(DESIGN_EXAMPLE)

    with pytest.raises(
        ConfigError, match=r"^unknown node 'east' \(the config names: north, south\)$"
    ):
        config.node_by_name("east")


def test_config_is_immutable() -> None:
    config = parse_config(DESIGN_EXAMPLE)

    with pytest.raises(ValidationError):
        config.node[0].name = "east"


def test_node_config_validates_on_its_own() -> None:
    assert NodeConfig(name="north", dsn="dbname=shop").name == "north"
    with pytest.raises(ValidationError, match="password"):
        NodeConfig(name="north", dsn="dbname=shop password=secret")


def test_source_path_is_not_dumped() -> None:
    assert "source_path" not in parse_config(DESIGN_EXAMPLE).model_dump()


# --- syntax and unknown keys --------------------------------------------------------------------


def test_toml_syntax_error_names_the_line() -> None:
    text = with_replaced('schemas = ["public"]', 'schemas = ["public"')

    message = config_error(text)

    assert re.match(r"shops\.toml: line 1[0-9]: TOML syntax error: ", message)


def test_unknown_top_level_key_lists_the_allowed_keys() -> None:
    message = config_error(with_replaced("[replication]", "[replicaton]"))

    assert message == (
        "shops.toml: unknown key 'replicaton' "
        "(expected one of: cluster, node, replication, conflict, http, audit)"
    )


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ('name = "shops"', 'name = "shops"\nnmae = "x"', "unknown key 'cluster.nmae' (expected"),
        ('name = "south"', 'name = "south"\ndns = "x"', "unknown key 'node[1].dns' (expected"),
        ("exclude", "exclud", "unknown key 'replication.exclud' (expected one of: schemas,"),
        ("default =", "defualt =", "unknown key 'conflict.defualt' (expected one of: default,"),
    ],
)
def test_unknown_nested_keys(old: str, new: str, expected: str) -> None:
    assert expected in config_error(with_replaced(old, new))


def test_unknown_key_in_a_table_override() -> None:
    text = DESIGN_EXAMPLE + '[conflict.table."public.accounts"]\npolcy = "x"\n'

    message = config_error(text)

    assert "unknown key 'conflict.table.\"public.accounts\".polcy'" in message
    assert "(expected one of: policy, delta_columns, priority, resolver)" in message


def test_source_path_cannot_be_set_from_the_file() -> None:
    message = config_error('source_path = "elsewhere.toml"\n' + DESIGN_EXAMPLE)

    assert "unknown key 'source_path'" in message


def test_wrong_type_names_the_key_and_the_toml_type() -> None:
    message = config_error(with_replaced('name = "shops"', "name = 5"))

    assert message == "shops.toml: cluster.name: expected a string, got an integer"


def test_several_errors_are_reported_as_the_first_and_a_count() -> None:
    text = with_replaced('name = "north"\n', "").replace('name = "south"\n', "")

    message = config_error(text)

    assert message == "shops.toml: node[0].name: field required (and 1 more)"


# --- nodes --------------------------------------------------------------------------------------


def test_node_without_dsn() -> None:
    text = with_replaced('dsn  = "host=10.0.0.6 dbname=shop user=pgconcord"', "")

    assert config_error(text) == "shops.toml: node[1].dsn: field required"


def test_missing_cluster_table() -> None:
    text = with_replaced('[cluster]\nname = "shops"\n', "")

    assert config_error(text) == "shops.toml: cluster: field required"


@pytest.mark.parametrize(
    "text",
    ['[cluster]\nname = "shops"\n', 'node = []\n[cluster]\nname = "shops"\n'],
    ids=["absent", "empty"],
)
def test_at_least_one_node(text: str) -> None:
    assert config_error(text) == "shops.toml: node: at least one [[node]] table is required"


def test_single_brackets_for_node_get_a_hint() -> None:
    text = '[cluster]\nname = "shops"\n[node]\nname = "north"\ndsn = "dbname=shop"\n'

    assert "node: expected an array, got a table; write [[node]]" in config_error(text)


@pytest.mark.parametrize("name", ["North", "1north", "no rth", "north.east", "a" * 64, "é"])
def test_invalid_node_name(name: str) -> None:
    message = config_error(with_replaced('name = "south"', f'name = "{name}"'))

    assert message.startswith(f"shops.toml: node[1].name: {name!r} is not a valid name")
    assert "lowercase letters, digits, '_' or '-', starting with a letter" in message


@pytest.mark.parametrize("name", ["a", "north-1", "north_east", "a" * 63])
def test_valid_node_names(name: str) -> None:
    config = parse_config(with_replaced('name = "south"', f'name = "{name}"'))

    assert config.node_names == ["north", name]


def test_empty_node_name() -> None:
    message = config_error(with_replaced('name = "south"', 'name = ""'))

    assert message.startswith("shops.toml: node[1].name: must not be empty")


def test_duplicate_node_names() -> None:
    message = config_error(with_replaced('name = "south"', 'name = "north"'))

    assert message.startswith("shops.toml: node[1].name: duplicate node name 'north'")
    assert "node[0]" in message


def test_malformed_dsn_names_the_node() -> None:
    message = config_error(with_replaced("host=10.0.0.6", "host 10.0.0.6"))

    assert message.startswith("shops.toml: node south: dsn is malformed: ")


def test_unknown_dsn_option_names_the_node() -> None:
    message = config_error(with_replaced("host=10.0.0.6", "hots=10.0.0.6"))

    assert message.startswith("shops.toml: node south: dsn is malformed: ")
    assert "hots" in message


@pytest.mark.parametrize("dsn", ["", "   "])
def test_empty_dsn(dsn: str) -> None:
    message = config_error(with_replaced('"host=10.0.0.6 dbname=shop user=pgconcord"', f'"{dsn}"'))

    assert message.startswith("shops.toml: node south: dsn is empty")


@pytest.mark.parametrize(
    "dsn",
    [
        "host=10.0.0.6 dbname=shop user=pgconcord password=secret",
        "host=10.0.0.6 dbname=shop password = 'secret'",
        "postgresql://pgconcord:secret@10.0.0.6/shop",
        "postgresql://pgconcord@10.0.0.6/shop?password=secret",
    ],
)
def test_password_in_dsn_is_refused(dsn: str) -> None:
    text = with_replaced('"host=10.0.0.6 dbname=shop user=pgconcord"', f'"{dsn}"')

    message = config_error(text)

    assert message == (
        "shops.toml: node south: dsn contains a password; put it in ~/.pgpass or PGPASSWORD instead"
    )


@pytest.mark.parametrize(
    "dsn",
    [
        # libpq's own messages about these would quote the password.
        "postgresql://pgconcord:secret@[10.0.0.6/shop",
        "postgresql://pgconcord:sec ret@10.0.0.6/shop",
        "host=10.0.0.6 password=secret bogus=1",
    ],
)
def test_password_in_malformed_dsn_is_refused_without_echoing_it(dsn: str) -> None:
    text = with_replaced('"host=10.0.0.6 dbname=shop user=pgconcord"', f'"{dsn}"')

    message = config_error(text)

    assert "secret" not in message
    assert "sec ret" not in message
    assert "node south: dsn contains a password" in message


def test_sslpassword_in_dsn_is_refused() -> None:
    text = with_replaced("user=pgconcord", "user=pgconcord sslpassword=secret")

    message = config_error(text)

    assert message.startswith("shops.toml: node north: dsn contains an sslpassword")
    assert "secret" not in message


def test_empty_password_is_allowed() -> None:
    # libpq treats an empty password as none and reads ~/.pgpass.
    parse_config(with_replaced("user=pgconcord", "user=pgconcord password=''"))


@pytest.mark.parametrize(
    "south_dsn",
    [
        "host=10.0.0.5 dbname=shop user=pgconcord",
        "host=10.0.0.5 port=5432 dbname=shop user=other",
        "postgresql://other@10.0.0.5:5432/shop",
    ],
)
def test_two_nodes_on_the_same_database(south_dsn: str) -> None:
    text = with_replaced('"host=10.0.0.6 dbname=shop user=pgconcord"', f'"{south_dsn}"')

    message = config_error(text)

    assert "nodes north and south have the same database" in message
    assert "host=10.0.0.5 port=5432 dbname=shop" in message


@pytest.mark.parametrize(
    "south_dsn",
    [
        "host=10.0.0.5 port=5433 dbname=shop user=pgconcord",
        "host=10.0.0.5 dbname=shop2 user=pgconcord",
    ],
)
def test_same_host_with_another_port_or_database_is_fine(south_dsn: str) -> None:
    text = with_replaced('"host=10.0.0.6 dbname=shop user=pgconcord"', f'"{south_dsn}"')

    assert parse_config(text).node_names == ["north", "south"]


def test_database_defaults_to_the_user_name() -> None:
    text = with_replaced('"host=10.0.0.6 dbname=shop user=pgconcord"', '"host=10.0.0.5 user=shop"')

    assert "nodes north and south have the same database" in config_error(text)


# --- cluster ------------------------------------------------------------------------------------


def test_empty_cluster_name() -> None:
    message = config_error(with_replaced('name = "shops"', 'name = ""'))

    assert message.startswith("shops.toml: cluster.name: must not be empty")


def test_invalid_cluster_name() -> None:
    message = config_error(with_replaced('name = "shops"', 'name = "Shops!"'))

    assert message.startswith("shops.toml: cluster.name: 'Shops!' is not a valid name")


# --- replication --------------------------------------------------------------------------------


def test_empty_schema_list() -> None:
    message = config_error(with_replaced('schemas = ["public"]', "schemas = []"))

    assert message == "shops.toml: replication.schemas: must name at least one schema"


def test_empty_schema_name() -> None:
    message = config_error(with_replaced('schemas = ["public"]', 'schemas = ["public", " "]'))

    assert message == "shops.toml: replication.schemas[1]: must not be empty"


def test_schema_that_is_not_a_string() -> None:
    message = config_error(with_replaced('schemas = ["public"]', 'schemas = ["public", 1]'))

    assert message == "shops.toml: replication.schemas[1]: expected a string, got an integer"


def test_schemas_that_is_not_an_array() -> None:
    message = config_error(with_replaced('schemas = ["public"]', 'schemas = "public"'))

    assert message == "shops.toml: replication.schemas: expected an array, got a string"


@pytest.mark.parametrize("entry", ["scratch", "public.", ".scratch", "public.scratch.x"])
def test_exclude_entry_must_be_schema_dot_table(entry: str) -> None:
    message = config_error(with_replaced('"public.scratch"', f'"{entry}"'))

    assert message == (
        f"shops.toml: replication.exclude[0]: {entry!r} is not a table name "
        "of the form 'schema.table'"
    )


def test_exclude_entry_outside_the_replicated_schemas() -> None:
    message = config_error(with_replaced('"public.scratch"', '"pubilc.scratch"'))

    assert message.startswith("shops.toml: replication.exclude[0]: 'pubilc.scratch' is not in")


# --- conflict -----------------------------------------------------------------------------------


def test_unknown_conflict_policy() -> None:
    message = config_error(with_replaced('"last-writer-wins"', '"latest-wins"'))

    assert message.startswith("shops.toml: conflict.default: 'latest-wins' is not allowed")
    assert "'last-writer-wins', 'node-priority' or 'keep-existing'" in message


def test_conflict_table_key_must_be_schema_dot_table() -> None:
    text = DESIGN_EXAMPLE + '[conflict.table.accounts]\npolicy = "keep-existing"\n'

    message = config_error(text)

    assert message == (
        "shops.toml: conflict.table.accounts: 'accounts' is not a table name "
        "of the form 'schema.table'"
    )


def test_conflict_table_outside_the_replicated_schemas() -> None:
    text = DESIGN_EXAMPLE + '[conflict.table."sales.accounts"]\npolicy = "keep-existing"\n'

    message = config_error(text)

    assert message.startswith('shops.toml: conflict.table."sales.accounts": ')
    assert "not in a replicated schema" in message


def test_conflict_table_that_is_excluded() -> None:
    text = DESIGN_EXAMPLE + '[conflict.table."public.scratch"]\npolicy = "keep-existing"\n'

    message = config_error(text)

    assert message.startswith('shops.toml: conflict.table."public.scratch": ')
    assert "excluded" in message


def test_priority_must_name_nodes_of_the_config() -> None:
    text = DESIGN_EXAMPLE + '[conflict.table."public.accounts"]\npriority = ["north", "east"]\n'

    message = config_error(text)

    assert message == (
        'shops.toml: conflict.table."public.accounts".priority[1]: '
        "unknown node 'east' (the config names: north, south)"
    )


def test_priority_must_not_repeat_a_node() -> None:
    text = DESIGN_EXAMPLE + '[conflict.table."public.accounts"]\npriority = ["north", "north"]\n'

    message = config_error(text)

    assert message.startswith('shops.toml: conflict.table."public.accounts".priority[1]: ')
    assert "twice" in message


def test_delta_columns_must_be_non_empty_strings() -> None:
    text = DESIGN_EXAMPLE + '[conflict.table."public.accounts"]\ndelta_columns = ["balance", ""]\n'

    message = config_error(text)

    assert message == (
        'shops.toml: conflict.table."public.accounts".delta_columns[1]: must not be empty'
    )


# --- loading files ------------------------------------------------------------------------------


def test_load_config_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "shops.toml"
    path.write_text(DESIGN_EXAMPLE, encoding="utf-8")

    config = load_config(path)

    assert config.node_names == ["north", "south"]
    assert config.source_path == path.absolute()


def test_load_config_accepts_a_byte_order_mark(tmp_path: Path) -> None:
    path = tmp_path / "shops.toml"
    path.write_text(DESIGN_EXAMPLE, encoding="utf-8-sig")

    assert load_config(str(path)).cluster.name == "shops"


def test_load_config_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "shops.toml"
    path.write_text(DESIGN_EXAMPLE, encoding="utf-8")
    monkeypatch.setenv("PGCONCORD_CONFIG", str(path))

    config = load_config()

    assert config.source_path == path.absolute()


def test_explicit_path_wins_over_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "shops.toml"
    path.write_text(DESIGN_EXAMPLE, encoding="utf-8")
    monkeypatch.setenv("PGCONCORD_CONFIG", str(tmp_path / "other.toml"))

    assert load_config(path).source_path == path.absolute()


@pytest.mark.parametrize("value", [None, ""])
def test_no_config_at_all(monkeypatch: pytest.MonkeyPatch, value: str | None) -> None:
    if value is None:
        monkeypatch.delenv("PGCONCORD_CONFIG", raising=False)
    else:
        monkeypatch.setenv("PGCONCORD_CONFIG", value)

    with pytest.raises(ConfigError) as raised:
        load_config()

    assert str(raised.value) == "no config: pass --config FILE or set PGCONCORD_CONFIG"


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "shops.toml"

    with pytest.raises(ConfigError) as raised:
        load_config(path)

    assert str(raised.value) == f"{path}: cannot read: No such file or directory"


def test_missing_file_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "shops.toml"
    monkeypatch.setenv("PGCONCORD_CONFIG", str(path))

    with pytest.raises(ConfigError, match="cannot read"):
        load_config()


def test_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "shops.toml"
    path.write_bytes(DESIGN_EXAMPLE.encode("utf-8") + b"# \xff\n")

    with pytest.raises(ConfigError) as raised:
        load_config(path)

    assert str(raised.value).startswith(f"{path}: cannot read: not UTF-8 text")


def test_errors_from_a_file_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "shops.toml"
    path.write_text(with_replaced("[replication]", "[replicaton]"), encoding="utf-8")

    with pytest.raises(ConfigError) as raised:
        load_config(path)

    assert str(raised.value).startswith(f"{path}: unknown key 'replicaton'")


def test_config_error_does_not_chain_the_pydantic_error() -> None:
    # Pydantic's message quotes input values; a chained traceback could print a dsn.
    with pytest.raises(ConfigError) as raised:
        parse_config(with_replaced("user=pgconcord", "user=pgconcord password=secret"))

    assert raised.value.__suppress_context__
    assert raised.value.__cause__ is None


# --- redaction ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dsn",
    [
        "host=h dbname=shop password=secret",
        "host=h dbname=shop password='sec ret'",
        "postgresql://u:secret@h:5433/shop?sslmode=require",
        "postgresql://u@h/shop?password=secret",
        "host=h sslpassword=secret",
    ],
)
def test_redacted_dsn_removes_the_password(dsn: str) -> None:
    redacted = redacted_dsn(dsn)

    assert "secret" not in redacted
    assert "sec ret" not in redacted
    assert "host=h" in redacted


def test_redacted_dsn_keeps_the_other_parameters() -> None:
    redacted = redacted_dsn("postgresql://u:secret@h:5433/shop?sslmode=require")

    assert set(redacted.split()) == {
        "user=u",
        "host=h",
        "port=5433",
        "dbname=shop",
        "sslmode=require",
    }


def test_redacted_dsn_leaves_a_dsn_without_password_as_it_is() -> None:
    assert redacted_dsn("postgresql://u@h/shop") == "postgresql://u@h/shop"


def test_redacted_dsn_hides_a_malformed_dsn() -> None:
    assert redacted_dsn("postgresql://u:secret@[h/shop") == "<malformed dsn>"


def test_cluster_config_round_trips_through_model_validate() -> None:
    config = parse_config(DESIGN_EXAMPLE)

    assert ClusterConfig.model_validate(config.model_dump()) == config


# --- eviction -----------------------------------------------------------------------------------


def with_evict_after(value: str) -> str:
    return with_replaced(
        'exclude = ["public.scratch"]', f'exclude = ["public.scratch"]\nevict_after = {value}'
    )


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("7d", 604800.0), ("12h", 43200.0), ("90m", 5400.0), ("1d12h", 129600.0), ("2w", 1209600.0)],
)
def test_evict_after_durations(text: str, seconds: float) -> None:
    config = parse_config(with_evict_after(f'"{text}"'))

    assert config.replication.evict_after == text
    assert config.replication.evict_after_seconds == seconds


def test_evict_after_is_off_by_default() -> None:
    assert parse_config(DESIGN_EXAMPLE).replication.evict_after_seconds is None


@pytest.mark.parametrize("text", ["7 days", "7", "1.5d", "d", "12H", ""])
def test_evict_after_malformed(text: str) -> None:
    message = config_error(with_evict_after(f'"{text}"'))

    assert message == (
        f"shops.toml: replication.evict_after: {text!r} is not a duration such as"
        ' "7d", "12h", "90m" or "1d12h" (units s, m, h, d, w)'
    )


def test_evict_after_zero() -> None:
    message = config_error(with_evict_after('"0h"'))

    assert message == "shops.toml: replication.evict_after: '0h' must be longer than zero"


def test_evict_after_not_a_string() -> None:
    message = config_error(with_evict_after("7"))

    assert message == "shops.toml: replication.evict_after: expected a string, got an integer"


def with_conflict_keep(value: str) -> str:
    return with_replaced(
        'default = "last-writer-wins"', f'default = "last-writer-wins"\nkeep = {value}'
    )


@pytest.mark.parametrize(
    ("text", "seconds"), [("30d", 2592000.0), ("12h", 43200.0), ("1w", 604800.0)]
)
def test_conflict_keep_durations(text: str, seconds: float) -> None:
    config = parse_config(with_conflict_keep(f'"{text}"'))

    assert config.conflict.keep == text
    assert config.conflict.keep_seconds == seconds


def test_conflict_records_are_kept_30_days_by_default() -> None:
    assert parse_config(MINIMAL).conflict.keep_seconds == 30 * 86400


@pytest.mark.parametrize("text", ["30 days", "30", "forever", ""])
def test_conflict_keep_malformed(text: str) -> None:
    message = config_error(with_conflict_keep(f'"{text}"'))

    assert message == (
        f"shops.toml: conflict.keep: {text!r} is not a duration such as"
        ' "7d", "12h", "90m" or "1d12h" (units s, m, h, d, w)'
    )


def test_conflict_keep_zero_and_wrong_type() -> None:
    assert config_error(with_conflict_keep('"0d"')) == (
        "shops.toml: conflict.keep: '0d' must be longer than zero"
    )
    assert config_error(with_conflict_keep("30")) == (
        "shops.toml: conflict.keep: expected a string, got an integer"
    )
