"""pgconcord's own schema in each node's database: versioned migrations, node identity, the
registry of replicated tables and the capture triggers on them.

The package: migrations (the numbered SQL files and the installed version), node (identity,
key slots, starting positions), tables (introspection and the table registry), capture (each
table's capture function, generated from its Table, and the generic capture) and
schema_changes (event triggers, scope, the regeneration of capture after a schema change).
"""

from pgconcord.catalog.capture import STAMP_LOCK, install_capture, install_generic_capture
from pgconcord.catalog.migrations import (
    SCHEMA,
    installed_version,
    latest_version,
    migrate,
    read_sql,
)
from pgconcord.catalog.node import (
    KEY_CAPACITY,
    check_identity,
    claim_identity,
    ensure_positions,
    key_slot,
    local_node_name,
    set_key_slot,
)
from pgconcord.catalog.schema_changes import (
    EVENT_TRIGGERS,
    REGENERATE_LOCK_TIMEOUT,
    capture_changed_tables,
    event_trigger_statements,
    install_event_triggers,
    installing,
    regenerate_capture,
    store_scope,
    table_definitions,
)
from pgconcord.catalog.tables import (
    FINGERPRINT_QUERY,
    Column,
    ForeignKey,
    Table,
    check_declared_key,
    delta_columns_of,
    discover_tables,
    fingerprint,
    foreign_keys,
    nullable_columns,
    registered_tables,
    resolvers_of,
)

__all__ = [
    "EVENT_TRIGGERS",
    "FINGERPRINT_QUERY",
    "KEY_CAPACITY",
    "REGENERATE_LOCK_TIMEOUT",
    "SCHEMA",
    "STAMP_LOCK",
    "Column",
    "ForeignKey",
    "Table",
    "capture_changed_tables",
    "check_declared_key",
    "check_identity",
    "claim_identity",
    "delta_columns_of",
    "discover_tables",
    "ensure_positions",
    "event_trigger_statements",
    "fingerprint",
    "foreign_keys",
    "install_capture",
    "install_event_triggers",
    "install_generic_capture",
    "installed_version",
    "installing",
    "key_slot",
    "latest_version",
    "local_node_name",
    "migrate",
    "nullable_columns",
    "read_sql",
    "regenerate_capture",
    "registered_tables",
    "resolvers_of",
    "set_key_slot",
    "store_scope",
    "table_definitions",
]
