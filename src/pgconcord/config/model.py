"""The cluster file's sections as pydantic models: every key typed, every value checked, and the
cluster as a whole checked for consistency (distinct nodes, conflict settings that apply)."""

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from pgconcord.config.dsn import _database_identity, _dsn_problem
from pgconcord.errors import ConfigError

ConflictPolicy = Literal["last-writer-wins", "node-priority", "keep-existing"]

# Node and cluster names end up inside PostgreSQL identifiers, NOTIFY channels and file names on
# every platform, so they are limited to what needs no quoting anywhere; 63 is PostgreSQL's
# identifier length limit (NAMEDATALEN - 1).
_NAME_PATTERN = re.compile(r"[a-z][a-z0-9_-]{0,62}")
_NAME_RULE = "1 to 63 lowercase letters, digits, '_' or '-', starting with a letter"

# Error types of our own, so that the one-line formatter knows how to place the key path.
_INVALID = "pgconcord_invalid"  # message relative to the error's location (plus a sub-path)
_SELF_LOCATED = "pgconcord_self_located"  # message already says where, e.g. "node north: ..."
_UNKNOWN_KEY = "pgconcord_unknown_key"


def _invalid(message: str, *subpath: str | int) -> PydanticCustomError:
    # The message travels in the context rather than as the template, because a template is
    # run through str.format-like substitution and a message may contain braces.
    return PydanticCustomError(_INVALID, "{message}", {"message": message, "subpath": subpath})


def _check_name(name: str) -> str:
    if not name:
        raise _invalid(f"must not be empty; a name is {_NAME_RULE}")
    if not _NAME_PATTERN.fullmatch(name):
        raise _invalid(f"{name!r} is not a valid name; a name is {_NAME_RULE}")
    return name


def _check_text(text: str) -> str:
    if not text.strip():
        raise _invalid("must not be empty")
    return text


def _split_table_name(qualified_name: str) -> tuple[str, str] | None:
    schema, dot, table = qualified_name.partition(".")
    # Exactly one dot: quoted identifiers containing dots are not supported (yet).
    if not dot or not schema.strip() or not table.strip() or "." in table:
        return None
    return schema, table


def _check_table_name(qualified_name: str) -> str:
    if _split_table_name(qualified_name) is None:
        raise _invalid(f"{qualified_name!r} is not a table name of the form 'schema.table'")
    return qualified_name


def _check_duration(value: str) -> str:
    try:
        parse_duration(value)
    except ValueError as error:
        raise _invalid(str(error)) from None
    return value


Name = Annotated[str, AfterValidator(_check_name)]
Duration = Annotated[str, AfterValidator(_check_duration)]  # "7d", "12h", "30m", ...
Text = Annotated[str, AfterValidator(_check_text)]
TableName = Annotated[str, AfterValidator(_check_table_name)]


class _Section(BaseModel):
    """A table of the TOML file: immutable, strictly typed, and with no key left unchecked."""

    # Strict: TOML values are already typed, so a coercion would only hide a mistake.
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _reject_unknown_keys(cls, data: Any) -> Any:
        # Done here rather than by extra="forbid" alone so the message can list the keys that
        # are allowed, which is what someone fixing a typo needs.
        if isinstance(data, dict):
            allowed = [name for name, field in cls.model_fields.items() if not field.exclude]
            for key in data:
                if key not in allowed:
                    raise PydanticCustomError(
                        _UNKNOWN_KEY,
                        "unknown key {key} (expected one of: {allowed})",
                        {"key": str(key), "allowed": ", ".join(allowed)},
                    )
        return data


class NodeConfig(_Section):
    """One PostgreSQL database of the cluster: `[[node]]`."""

    name: Name
    dsn: str

    @field_validator("dsn")
    @classmethod
    def _check_dsn(cls, dsn: str, info: ValidationInfo) -> str:
        problem = _dsn_problem(dsn)
        if problem is None:
            return dsn
        node_name = info.data.get("name")
        if isinstance(node_name, str):
            raise PydanticCustomError(
                _SELF_LOCATED, "{message}", {"message": f"node {node_name}: {problem}"}
            )
        raise _invalid(problem)


class ClusterSection(_Section):
    """`[cluster]`."""

    name: Name


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION_PART = re.compile(r"(\d+)\s*([smhdw])")
_DURATION = re.compile(r"\s*(?:\d+\s*[smhdw]\s*)+")
_DURATION_RULE = 'a duration such as "7d", "12h", "90m" or "1d12h" (units s, m, h, d, w)'


def parse_duration(text: str) -> float:
    """Seconds in a duration such as "7d" or "1d12h"; ValueError naming the expected form."""
    if not _DURATION.fullmatch(text):
        raise ValueError(f"{text!r} is not {_DURATION_RULE}")
    seconds = sum(
        int(number) * _DURATION_UNITS[unit] for number, unit in _DURATION_PART.findall(text)
    )
    if seconds <= 0:
        raise ValueError(f"{text!r} must be longer than zero")
    return float(seconds)


class ReplicationConfig(_Section):
    """`[replication]`: which tables are replicated."""

    schemas: list[Text] = Field(default_factory=lambda: ["public"])
    exclude: list[TableName] = Field(default_factory=list)
    # `[replication.keys]` "schema.table" = ["column", ...]: the key of a table that has no
    # primary key (a unique index on those columns must exist). Tables without either are
    # replicated insert-only.
    keys: dict[TableName, list[Text]] = Field(default_factory=dict)
    # A node that has not applied a node's changes for this long is evicted from its backlog
    # (it no longer holds back the purge) and must join again; None: never.
    evict_after: Duration | None = None
    # How each node captures its changes (pgconcord.capture): "wal" by logical decoding,
    # "trigger" by row triggers, "auto" the best the node allows.
    capture: Literal["auto", "trigger", "wal"] = "auto"

    @property
    def evict_after_seconds(self) -> float | None:
        return None if self.evict_after is None else parse_duration(self.evict_after)

    @field_validator("schemas")
    @classmethod
    def _require_a_schema(cls, schemas: list[str]) -> list[str]:
        if not schemas:
            raise _invalid("must name at least one schema")
        return schemas

    @model_validator(mode="after")
    def _check_excluded_tables_are_replicated(self) -> "ReplicationConfig":
        # Excluding a table of a schema that is not replicated has no effect, so it is almost
        # surely a misspelt schema, and the table it meant would then be replicated.
        for index, entry in enumerate(self.exclude):
            schema, _table = _split_table_name(entry) or ("", "")
            if schema not in self.schemas:
                raise _invalid(
                    f"{entry!r} is not in a replicated schema "
                    f"(replication.schemas: {', '.join(self.schemas)})",
                    "exclude",
                    index,
                )
        return self

    @model_validator(mode="after")
    def _check_declared_keys(self) -> "ReplicationConfig":
        for entry, columns in self.keys.items():
            schema, _table = _split_table_name(entry) or ("", "")
            if schema not in self.schemas:
                raise _invalid(
                    f"{entry!r} is not in a replicated schema "
                    f"(replication.schemas: {', '.join(self.schemas)})",
                    "keys",
                    entry,
                )
            if not columns or len(set(columns)) != len(columns):
                raise _invalid("must list the key's columns, each once", "keys", entry)
        return self

    def declared_key(self, schema: str, table: str) -> tuple[str, ...]:
        return tuple(self.keys.get(f"{schema}.{table}", ()))

    def is_excluded(self, schema: str, table: str) -> bool:
        """Whether `schema.table` is listed in `exclude` (names compared exactly)."""
        return f"{schema}.{table}" in self.exclude


_POLICIES = ("last-writer-wins", "keep-existing", "node-priority")
_IDENTIFIER = r"[A-Za-z_][A-Za-z0-9_]*"
_RESOLVER = re.compile(rf"^{_IDENTIFIER}(\.{_IDENTIFIER})*:{_IDENTIFIER}$")


class TableConflictConfig(_Section):
    """`[conflict.table."schema.table"]`: how conflicts on one table are resolved."""

    policy: Text | None = None
    delta_columns: list[Text] = Field(default_factory=list)
    priority: list[Name] = Field(default_factory=list)
    resolver: Text | None = None


class ConflictConfig(_Section):
    """`[conflict]`: the default policy, how long conflict records are kept, and per-table
    overrides."""

    default: ConflictPolicy = "last-writer-wins"
    # Conflict records older than this are deleted by the agent's purge (parked changes are
    # not: they wait for an operator).
    keep: Duration = "30d"
    table: dict[TableName, TableConflictConfig] = Field(default_factory=dict)

    @property
    def keep_seconds(self) -> float:
        return parse_duration(self.keep)


_LISTEN_RULE = 'HOST:PORT, such as "127.0.0.1:8585" or "[::1]:8585" (an IPv6 address in brackets)'


def parse_listen(text: str) -> tuple[str, int]:
    """The (host, port) of a listen address "HOST:PORT" or "[IPV6]:PORT"; ValueError saying
    what is expected."""
    host, colon, port = text.strip().rpartition(":")
    if not colon or not host or not port:
        raise ValueError(f"{text!r} is not {_LISTEN_RULE}")
    if host.startswith("["):
        if not host.endswith("]") or len(host) < 3:
            raise ValueError(f"{text!r} is not {_LISTEN_RULE}")
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"{text!r}: write an IPv6 address in brackets, as in [::1]:8585")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{text!r}: the port must be a number from 1 to 65535")
    if any(character.isspace() for character in host):
        raise ValueError(f"{text!r} is not {_LISTEN_RULE}")
    return host, int(port)


def _check_listen(text: str) -> str:
    try:
        parse_listen(text)
    except ValueError as error:
        raise _invalid(str(error)) from None
    return text


Listen = Annotated[str, AfterValidator(_check_listen)]


class HttpConfig(_Section):
    """`[http]`: the agent's HTTP server (health, readiness, metrics, JSON API, console); off
    while `listen` is not set (`pgconcord run --http HOST:PORT` sets it too)."""

    listen: Listen | None = None
    # A file holding the token the console and every POST need (PGCONCORD_TOKEN wins); a
    # relative path is read from the config file's directory.
    token_file: Text | None = None

    @property
    def address(self) -> tuple[str, int] | None:
        return None if self.listen is None else parse_listen(self.listen)


class AuditConfig(_Section):
    """`[audit]`: the tables whose row history is kept (pgconcord history), and how long."""

    tables: list[TableName] = Field(default_factory=list)
    keep: Duration = "90d"

    @property
    def keep_seconds(self) -> float:
        return parse_duration(self.keep)


class ClusterConfig(_Section):
    """The whole cluster file."""

    cluster: ClusterSection
    node: list[NodeConfig]
    replication: ReplicationConfig = Field(default_factory=ReplicationConfig)
    conflict: ConflictConfig = Field(default_factory=ConflictConfig)
    http: HttpConfig = Field(default_factory=HttpConfig)
    audit: AuditConfig = Field(default_factory=AuditConfig)
    # Set by load_config, never read from the file: excluded fields are not accepted as keys.
    source_path: Path | None = Field(default=None, exclude=True)

    @field_validator("node")
    @classmethod
    def _require_a_node(cls, nodes: list[NodeConfig]) -> list[NodeConfig]:
        if not nodes:
            raise _invalid("at least one [[node]] table is required")
        return nodes

    @model_validator(mode="after")
    def _check_consistency(self) -> "ClusterConfig":
        self._check_nodes_are_distinct()
        self._check_conflict_tables()
        self._check_policies_available()
        self._check_audited_tables()
        return self

    def _check_audited_tables(self) -> None:
        # A table that is not replicated has no history to keep: a typo, most likely.
        for index, qualified_name in enumerate(self.audit.tables):
            schema, table = _split_table_name(qualified_name) or ("", "")
            if not self.is_replicated(schema, table):
                raise _invalid(
                    f"{qualified_name!r} is not replicated (replication.schemas:"
                    f" {', '.join(self.replication.schemas)}; see also replication.exclude)",
                    "audit",
                    "tables",
                    index,
                )

    def _check_policies_available(self) -> None:
        if self.conflict.default == "node-priority":
            raise _invalid(
                "node-priority needs a list of nodes: set `priority = [...]` per table under"
                ' [conflict.table."schema.table"]',
                "conflict",
                "default",
            )
        for qualified_name, table_config in self.conflict.table.items():
            location = ("conflict", "table", qualified_name)
            if table_config.resolver and not _RESOLVER.match(table_config.resolver):
                raise _invalid(
                    f"resolver {table_config.resolver!r} is not of the form"
                    " 'package.module:function'",
                    *location,
                    "resolver",
                )
            if table_config.resolver and table_config.priority:
                raise _invalid(
                    "a table has either a resolver or a node priority list, not both",
                    *location,
                    "resolver",
                )
            policy = table_config.policy
            if policy is not None and policy not in _POLICIES:
                raise _invalid(
                    f"unknown policy {policy!r} (expected one of: {', '.join(_POLICIES)})",
                    *location,
                    "policy",
                )
            if policy == "node-priority" and not table_config.priority:
                raise _invalid("node-priority needs `priority = [...]`", *location, "policy")
            if table_config.priority and policy not in (None, "node-priority"):
                raise _invalid(
                    f"priority only applies to policy 'node-priority', not {policy!r}",
                    *location,
                    "priority",
                )

    def table_resolver(self, schema: str, table: str) -> str | None:
        """The user's function ('module:function') that resolves the table's conflicts."""
        table_config = self.conflict.table.get(f"{schema}.{table}")
        return table_config.resolver if table_config is not None else None

    def table_policy(self, schema: str, table: str) -> tuple[str, tuple[str, ...]]:
        """The conflict policy of one table and its node priority list (highest first)."""
        table_config = self.conflict.table.get(f"{schema}.{table}")
        if table_config is None:
            return self.conflict.default, ()
        if table_config.priority:
            return "node-priority", tuple(table_config.priority)
        return table_config.policy or self.conflict.default, ()

    def _check_nodes_are_distinct(self) -> None:
        index_by_name: dict[str, int] = {}
        name_by_identity: dict[tuple[str, str, str], str] = {}
        for index, node in enumerate(self.node):
            if node.name in index_by_name:
                raise _invalid(
                    f"duplicate node name {node.name!r} (node[{index_by_name[node.name]}] "
                    "has it too); node names must be unique",
                    "node",
                    index,
                    "name",
                )
            index_by_name[node.name] = index
            # Two entries for one database would make it replicate into itself.
            identity = _database_identity(node.dsn)
            if identity in name_by_identity:
                host, port, dbname = identity
                raise _invalid(
                    f"nodes {name_by_identity[identity]} and {node.name} have the same database "
                    f"(host={host or '<default>'} port={port} dbname={dbname or '<default>'}); "
                    "each node must be a different database"
                )
            name_by_identity[identity] = node.name

    def _check_conflict_tables(self) -> None:
        names = self.node_names
        for qualified_name, table_config in self.conflict.table.items():
            schema, table = _split_table_name(qualified_name) or ("", "")
            # A per-table setting for a table that is not replicated is a typo that would
            # silently leave the real table on the default policy.
            if schema not in self.replication.schemas:
                raise _invalid(
                    f"{qualified_name!r} is not in a replicated schema "
                    f"(replication.schemas: {', '.join(self.replication.schemas)})",
                    "conflict",
                    "table",
                    qualified_name,
                )
            if self.replication.is_excluded(schema, table):
                raise _invalid(
                    f"{qualified_name!r} is excluded from replication (replication.exclude)",
                    "conflict",
                    "table",
                    qualified_name,
                )
            seen: set[str] = set()
            for index, name in enumerate(table_config.priority):
                problem = None
                if name not in names:
                    problem = f"unknown node {name!r} (the config names: {', '.join(names)})"
                elif name in seen:
                    problem = f"node {name!r} is listed twice"
                if problem:
                    raise _invalid(problem, "conflict", "table", qualified_name, "priority", index)
                seen.add(name)

    @property
    def nodes(self) -> list[NodeConfig]:
        return self.node

    @property
    def node_names(self) -> list[str]:
        return [node.name for node in self.node]

    def node_by_name(self, name: str) -> NodeConfig:
        for node in self.node:
            if node.name == name:
                return node
        raise ConfigError(f"unknown node {name!r} (the config names: {', '.join(self.node_names)})")

    def is_excluded(self, schema: str, table: str) -> bool:
        """Whether `schema.table` is listed in replication.exclude (names compared exactly)."""
        return self.replication.is_excluded(schema, table)

    def is_replicated(self, schema: str, table: str) -> bool:
        """Whether `schema.table` is in a replicated schema and not excluded."""
        return schema in self.replication.schemas and not self.is_excluded(schema, table)
