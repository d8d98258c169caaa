"""A source transaction is applied whole or parked whole, also when only one of its rows waits
behind an earlier parked change: a transfer between two accounts never lands half on a node."""

from __future__ import annotations

from typing import Any

from harness import Cluster

# A constraint only one node has: made there alone by an administrator, not replicated.
BY_HAND = "SET session_replication_role = replica; "
TOTAL = 700  # seven accounts of 100


def transfer(cluster: Cluster, node: str, source: int, destination: int, amount: int) -> None:
    """Move money between two accounts in one transaction, as a bank's application would."""
    with cluster.connect(node, autocommit=False) as connection:
        connection.execute(
            "UPDATE accounts SET balance = balance - %s WHERE id = %s", (amount, source)
        )
        connection.execute(
            "UPDATE accounts SET balance = balance + %s WHERE id = %s", (amount, destination)
        )
        connection.commit()


def balances(cluster: Cluster, node: str) -> dict[int, int]:
    return dict(cluster.query(node, "SELECT id, balance FROM accounts ORDER BY id"))


def waiting(cluster: Cluster, node: str) -> list[dict[str, Any]]:
    return [
        r
        for r in cluster.conflicts()
        if r["kind"] == "parked" and r["state"] == "parked" and r["node"] == node
    ]


def test_a_transfer_waits_whole_behind_a_parked_change_of_one_of_its_rows(
    system_cluster: Cluster,
) -> None:
    cluster = system_cluster
    for name in cluster.names:
        cluster.execute(
            name, "CREATE TABLE accounts (id int PRIMARY KEY, balance int NOT NULL, note text)"
        )
    cluster.setup()
    cluster.execute(
        "north", "INSERT INTO accounts SELECT g, 100, 'open' FROM generate_series(1, 7) g"
    )
    cluster.sync()
    # Only south refuses frozen accounts: north's freeze of account 1 cannot be applied there.
    cluster.admin_execute(
        "south",
        BY_HAND + "ALTER TABLE accounts ADD CONSTRAINT not_frozen CHECK (note <> 'frozen')",
    )
    # One window of several source transactions, in this order on north:
    cluster.execute("north", "UPDATE accounts SET note = 'checked' WHERE id = 2")  # before: goes
    cluster.execute("north", "UPDATE accounts SET note = 'frozen' WHERE id = 1")  # parked
    transfer(cluster, "north", 1, 2, 10)  # touches parked account 1: waits whole
    transfer(cluster, "north", 2, 3, 5)  # touches account 2 of the waiting transfer: waits too
    transfer(cluster, "north", 4, 5, 1)  # unrelated: goes on
    result = cluster.cli("sync")
    assert result.returncode == 0, result.stderr

    assert balances(cluster, "east") == {1: 90, 2: 105, 3: 105, 4: 99, 5: 101, 6: 100, 7: 100}
    # On south not one of the waiting transfers is half applied: the sum holds.
    assert balances(cluster, "south") == {1: 100, 2: 100, 3: 100, 4: 99, 5: 101, 6: 100, 7: 100}
    assert sum(balances(cluster, "south").values()) == TOTAL
    assert cluster.value("south", "SELECT note FROM accounts WHERE id = 2") == "checked"
    parked = waiting(cluster, "south")
    assert [r["key"] for r in parked] == [{"id": 1}, {"id": 1}, {"id": 2}, {"id": 2}, {"id": 3}]
    assert "not_frozen" in str(parked[0]["reason"])
    assert all("earlier parked change" in str(r["reason"]) for r in parked[1:])

    # A later window: the set-wise apply holds transactions that follow parked rows, whole.
    transfer(cluster, "north", 3, 4, 7)  # account 3 waits (behind the transfer 2 -> 3)
    transfer(cluster, "north", 6, 7, 2)  # unrelated: goes on
    transfer(cluster, "north", 4, 6, 3)  # account 4 is held by the transfer 3 -> 4: waits
    cluster.execute("north", "UPDATE accounts SET note = 'audited' WHERE id = 6")  # so does 6
    result = cluster.cli("sync")
    assert result.returncode == 0, result.stderr
    south = balances(cluster, "south")
    assert south == {1: 100, 2: 100, 3: 100, 4: 99, 5: 101, 6: 98, 7: 102}, south
    assert sum(south.values()) == TOTAL
    assert cluster.value("south", "SELECT note FROM accounts WHERE id = 6") == "open"
    assert len(waiting(cluster, "south")) == 5 + 2 + 2 + 1
    for name in ("north", "east"):
        assert sum(balances(cluster, name).values()) == TOTAL

    # Retrying before the cause is fixed keeps everything parked, and the sum still holds.
    assert cluster.cli("conflicts", "retry").returncode != 0
    assert sum(balances(cluster, "south").values()) == TOTAL
    cluster.admin_execute("south", BY_HAND + "ALTER TABLE accounts DROP CONSTRAINT not_frozen")
    result = cluster.cli("conflicts", "retry")
    assert result.returncode == 0, result.stderr + result.stdout
    assert waiting(cluster, "south") == []
    assert balances(cluster, "south") == balances(cluster, "north")
    cluster.sync()
    cluster.assert_identical()
