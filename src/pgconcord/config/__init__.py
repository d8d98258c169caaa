"""Load and validate the cluster TOML file.

The file format is a contract other tools and scripts rely on (DESIGN.md, "The interface"), so
every key is checked here, once, and every problem becomes a single-line ConfigError that names
the file and the key: the commands built on top can then trust the config without re-checking.
"""

from pgconcord.config.dsn import redacted_dsn
from pgconcord.config.loading import CONFIG_ENVIRONMENT_VARIABLE, load_config, parse_config
from pgconcord.config.model import (
    ClusterConfig,
    ClusterSection,
    ConflictConfig,
    ConflictPolicy,
    HttpConfig,
    NodeConfig,
    ReplicationConfig,
    TableConflictConfig,
    parse_duration,
    parse_listen,
)

__all__ = [
    "CONFIG_ENVIRONMENT_VARIABLE",
    "ClusterConfig",
    "ClusterSection",
    "ConflictConfig",
    "ConflictPolicy",
    "HttpConfig",
    "NodeConfig",
    "ReplicationConfig",
    "TableConflictConfig",
    "load_config",
    "parse_config",
    "parse_duration",
    "parse_listen",
    "redacted_dsn",
]
