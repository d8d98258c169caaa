"""Row history, the audit trail of the tables under `[audit]`: every local write of them with
who made it, and on every node what replication did with each change (trail.py, and the
apply's conflict/outcomes.py), told as one story per row across the nodes (story.py,
`pgconcord history`)."""

from __future__ import annotations

from pgconcord.catalog import Table
from pgconcord.config import ClusterConfig
from pgconcord.errors import SchemaError
from pgconcord.history.trail import (
    TRIGGER,
    audited_tables,
    install_audit,
    purge_audit,
    remove_audit,
)

# The catalog version that has the trail (017_audit.sql).
AUDIT_VERSION = 17

__all__ = [
    "AUDIT_VERSION",
    "TRIGGER",
    "audited_tables",
    "check_audited",
    "install_audit",
    "purge_audit",
    "remove_audit",
]


def check_audited(config: ClusterConfig, tables: list[Table]) -> None:
    """Refuse, before setup installs anything, an audited table that is not replicated (it
    does not exist, or is left out) or has no key (its history could not be told by row)."""
    by_name = {table.qualified_name: table for table in tables}
    for name in config.audit.tables:
        table = by_name.get(name)
        if table is None:
            raise SchemaError(f"table {name} (audit.tables) is not replicated: it does not exist")
        if not table.key_columns:
            raise SchemaError(
                f"table {name} (audit.tables) has no primary key: its row history needs one"
                " (declare one under [replication.keys])"
            )
