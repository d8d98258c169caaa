"""A change that cannot be applied is parked with its reason; the stream goes on; an operator
retries it after fixing the cause, or discards it, and the record stays."""

from __future__ import annotations

import json

from harness import Cluster

# A constraint only one node has: made there alone, not replicated (see test_schema_changes).
BY_HAND = "SET session_replication_role = replica; "


def parked(cluster: Cluster) -> list[dict[str, object]]:
    return [r for r in cluster.conflicts() if r["kind"] == "parked"]


def test_a_change_that_cannot_be_applied_is_parked_and_retried(system_cluster: Cluster) -> None:
    cluster = system_cluster
    for name in cluster.names:
        cluster.execute(name, "CREATE TABLE stock (id int PRIMARY KEY, item text, quantity int)")
    cluster.setup()
    # Only south refuses negative quantities: north's change cannot be applied there.
    cluster.admin_execute(
        "south", BY_HAND + "ALTER TABLE stock ADD CONSTRAINT no_negative CHECK (quantity >= 0)"
    )
    cluster.execute("north", "INSERT INTO stock VALUES (1, 'pen', -5)")
    cluster.execute("north", "UPDATE stock SET item = 'red pen' WHERE id = 1")  # waits behind
    cluster.execute("north", "INSERT INTO stock VALUES (2, 'cup', 3)")  # goes on
    cluster.execute("east", "INSERT INTO stock VALUES (3, 'mug', 1)")
    result = cluster.cli("sync")
    assert result.returncode == 0, result.stderr
    assert cluster.query("south", "SELECT id FROM stock ORDER BY id") == [(2,), (3,)]
    assert cluster.query("east", "SELECT id, item FROM stock ORDER BY id") == [
        (1, "red pen"),
        (2, "cup"),
        (3, "mug"),
    ]
    waiting = [r for r in parked(cluster) if r["state"] == "parked"]
    assert [(r["node"], r["table"], r["key"]) for r in waiting] == [
        ("south", "public.stock", {"id": 1}),
        ("south", "public.stock", {"id": 1}),
    ]
    assert "no_negative" in str(waiting[0]["reason"])
    assert "earlier parked change" in str(waiting[1]["reason"])
    # Retrying before the cause is fixed keeps them parked, and says why.
    result = cluster.cli("conflicts", "retry")
    assert result.returncode != 0 and "still parked" in result.stderr + result.stdout
    cluster.admin_execute("south", BY_HAND + "ALTER TABLE stock DROP CONSTRAINT no_negative")
    result = cluster.cli("conflicts", "retry")
    assert result.returncode == 0, result.stderr + result.stdout
    assert cluster.query("south", "SELECT id, item, quantity FROM stock WHERE id = 1") == [
        (1, "red pen", -5)
    ]
    assert {r["state"] for r in parked(cluster)} == {"retried"}
    cluster.assert_identical()


def test_a_parked_change_can_be_discarded_and_stays_recorded(system_cluster: Cluster) -> None:
    cluster = system_cluster
    for name in cluster.names:
        cluster.execute(name, "CREATE TABLE notes (id int PRIMARY KEY, body text)")
    cluster.setup()
    cluster.admin_execute(
        "east", BY_HAND + "ALTER TABLE notes ADD CONSTRAINT short CHECK (length(body) < 10)"
    )
    cluster.execute("north", "INSERT INTO notes VALUES (1, 'far too long for east')")
    cluster.sync()
    [waiting] = [r for r in parked(cluster) if r["state"] == "parked"]
    result = cluster.cli("conflicts", "discard", str(waiting["ref"]))
    assert result.returncode == 0, result.stderr
    records = json.loads(cluster.cli("conflicts", "--json").stdout)
    [record] = [r for r in records if r["kind"] == "parked"]
    assert record["state"] == "discarded" and record["resolved_at"]
    result = cluster.cli("conflicts", "discard", str(waiting["ref"]))
    assert result.returncode != 0 and "not a parked change" in result.stderr
    result = cluster.cli("conflicts", "retry", "nowhere:1")
    assert result.returncode != 0 and "nowhere" in result.stderr


def test_a_burst_of_failures_is_parked_in_order_and_retried(system_cluster: Cluster) -> None:
    cluster = system_cluster
    for name in cluster.names:
        cluster.execute(name, "CREATE TABLE readings (id int PRIMARY KEY, value int)")
    cluster.setup()
    cluster.admin_execute(
        "south", BY_HAND + "ALTER TABLE readings ADD CONSTRAINT positive CHECK (value > 0)"
    )
    # 300 changes that south refuses, in one transaction, then an update of the first row.
    cluster.execute("north", "INSERT INTO readings SELECT g, -g FROM generate_series(1, 300) g")
    cluster.execute("north", "UPDATE readings SET value = -1000 WHERE id = 1")
    result = cluster.cli("sync")
    assert result.returncode == 0, result.stderr
    waiting = [r for r in parked(cluster) if r["state"] == "parked"]
    assert len(waiting) == 301
    assert cluster.value("south", "SELECT count(*) FROM readings") == 0
    cluster.admin_execute("south", BY_HAND + "ALTER TABLE readings DROP CONSTRAINT positive")
    result = cluster.cli("conflicts", "retry")
    assert result.returncode == 0, result.stderr + result.stdout
    assert cluster.value("south", "SELECT value FROM readings WHERE id = 1") == -1000
    cluster.assert_identical()


def test_a_source_transaction_is_parked_and_retried_whole(system_cluster: Cluster) -> None:
    cluster = system_cluster
    for name in cluster.names:
        cluster.execute(name, "CREATE TABLE ledger (id int PRIMARY KEY, amount int)")
    cluster.setup()
    cluster.admin_execute(
        "east", BY_HAND + "ALTER TABLE ledger ADD CONSTRAINT small CHECK (amount < 100)"
    )
    with cluster.connect("north", autocommit=False) as connection:
        # A transfer: both rows or neither, on every node.
        connection.execute("INSERT INTO ledger VALUES (1, -500), (2, 500)")
        connection.commit()
    cluster.execute("north", "INSERT INTO ledger VALUES (3, 7)")
    assert cluster.cli("sync").returncode == 0
    assert cluster.query("east", "SELECT id FROM ledger ORDER BY id") == [(3,)]
    assert cluster.query("south", "SELECT id FROM ledger ORDER BY id") == [(1,), (2,), (3,)]
    waiting = [r for r in parked(cluster) if r["state"] == "parked"]
    assert sorted(r["key"]["id"] for r in waiting) == [1, 2]
    # Retrying one of them retries its whole transaction.
    cluster.admin_execute("east", BY_HAND + "ALTER TABLE ledger DROP CONSTRAINT small")
    result = cluster.cli("conflicts", "retry", str(waiting[0]["ref"]))
    assert result.returncode == 0, result.stderr + result.stdout
    assert cluster.query("east", "SELECT id FROM ledger ORDER BY id") == [(1,), (2,), (3,)]
    cluster.assert_identical()
