"""Tables without a primary key: replicated insert-only (logs, history) with a clear error at the
first UPDATE or DELETE, or fully with a key declared in the config."""

from __future__ import annotations

import psycopg
import pytest
from harness import Cluster


def test_a_table_without_a_key_is_replicated_insert_only(cluster: Cluster) -> None:
    for name in cluster.names:
        cluster.execute(name, "CREATE TABLE audit_log (at timestamptz, who text, what text)")
    result = cluster.cli("setup")
    assert result.returncode == 0, result.stderr
    assert "public.audit_log has no primary key: only its inserts are replicated" in result.stdout
    cluster.execute("north", "INSERT INTO audit_log VALUES (now(), 'ann', 'login')")
    cluster.execute("south", "INSERT INTO audit_log VALUES (now(), 'bob', 'login')")
    # Two identical rows are two rows, on every node.
    cluster.execute("south", "INSERT INTO audit_log VALUES ('2024-01-01', 'bob', 'same')")
    cluster.execute("east", "INSERT INTO audit_log VALUES ('2024-01-01', 'bob', 'same')")
    cluster.sync()
    for name in cluster.names:
        assert cluster.value(name, "SELECT count(*) FROM audit_log") == 4
        assert cluster.value(name, "SELECT count(*) FROM audit_log WHERE what = 'same'") == 2
    cluster.assert_identical()
    with pytest.raises(psycopg.errors.FeatureNotSupported, match="no primary key") as raised:
        cluster.execute("north", "UPDATE audit_log SET what = 'edited'")
    assert "public.audit_log" in str(raised.value) and "UPDATE is refused" in str(raised.value)
    with pytest.raises(psycopg.errors.FeatureNotSupported, match="DELETE is refused"):
        cluster.execute("north", "DELETE FROM audit_log")
    # Nothing was changed, and replication goes on.
    cluster.execute("north", "INSERT INTO audit_log VALUES (now(), 'cy', 'logout')")
    cluster.sync()
    for name in cluster.names:
        assert cluster.value(name, "SELECT count(*) FROM audit_log") == 5
    cluster.assert_identical()


def test_a_key_declared_in_the_config_makes_updates_and_deletes_replicate(
    cluster: Cluster,
) -> None:
    for name in cluster.names:
        cluster.execute(
            name,
            "CREATE TABLE readings (device text NOT NULL, seq int NOT NULL, value numeric,"
            " note text, UNIQUE (device, seq))",
        )
    cluster.write_config('[replication.keys]\n"public.readings" = ["device", "seq"]\n')
    cluster.setup()
    cluster.execute("north", "INSERT INTO readings VALUES ('a', 1, 10, ''), ('a', 2, 20, '')")
    cluster.sync()
    cluster.execute("north", "UPDATE readings SET value = 11 WHERE seq = 1")
    cluster.execute("south", "UPDATE readings SET note = 'checked' WHERE seq = 1")
    cluster.execute("east", "DELETE FROM readings WHERE seq = 2")
    cluster.sync()
    for name in cluster.names:
        assert cluster.query(name, "SELECT device, seq, value, note FROM readings") == [
            ("a", 1, 11, "checked")
        ]
    cluster.assert_identical()
