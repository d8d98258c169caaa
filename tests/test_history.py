"""Row history: every change of an audited table, with who made it where, and on every node
what replication did with it (applied, merged, lost a conflict, parked), told as one story by
`pgconcord history TABLE KEY`; purged after audit.keep; nothing kept for other tables."""

from __future__ import annotations

import json
import time
from typing import Any

import psycopg
import pytest
from harness import Cluster

from pgconcord.agent.purging import purge_node
from pgconcord.config import parse_config
from pgconcord.errors import ConfigError, PgconcordError

ACCOUNTS = "CREATE TABLE accounts (id int PRIMARY KEY, owner text, balance int, city text)"
AUDIT = '[audit]\ntables = ["public.accounts"]\nkeep = "90d"\n'
BY_HAND = "SET session_replication_role = replica; "


def write(cluster: Cluster, node: str, application: str, statement: str) -> None:
    """As the application does it: its own role, its own application_name."""
    dsn = cluster.app_dsns[node] + f" application_name={application}"
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute(statement.encode())


def story(cluster: Cluster, *arguments: str) -> dict[str, Any]:
    result = cluster.cli("history", *arguments, "--json")
    assert result.returncode == 0, result.stderr
    found: dict[str, Any] = json.loads(result.stdout)
    return found


def outcomes(change: dict[str, Any]) -> dict[str, str]:
    return {outcome["node"]: outcome["event"] for outcome in change["outcomes"]}


def audited_cluster(cluster: Cluster, extra: str = "") -> None:
    for name in cluster.names:
        cluster.execute(name, ACCOUNTS)
        cluster.execute(name, "CREATE TABLE notes (id int PRIMARY KEY, body text)")
    cluster.write_config(AUDIT + extra)
    cluster.setup()


def test_a_row_changed_on_two_nodes_with_a_conflict(system_cluster: Cluster) -> None:
    cluster = system_cluster
    audited_cluster(cluster)
    write(cluster, "north", "shop-north", "INSERT INTO accounts VALUES (1, 'ann', 100, 'Oslo')")
    cluster.sync()
    write(cluster, "north", "shop-north", "UPDATE accounts SET balance = 150 WHERE id = 1")
    time.sleep(0.01)
    write(cluster, "south", "shop-south", "UPDATE accounts SET balance = 175 WHERE id = 1")
    cluster.sync()
    for name in cluster.names:
        assert cluster.query(name, "SELECT balance FROM accounts") == [(175,)]

    found = story(cluster, "accounts", "1")
    assert found["key"] == {"id": 1} and found["unreachable"] == []
    insert, north_update, south_update = found["changes"]
    assert (insert["origin"], insert["operation"]) == ("north", "insert")
    assert outcomes(insert) == {"south": "applied", "east": "applied"}
    assert insert["by"]["user"] == "app" and insert["by"]["application"] == "shop-north"
    assert insert["by"]["client_addr"] and insert["xid"]

    assert (north_update["origin"], north_update["operation"]) == ("north", "update")
    assert north_update["by"]["application"] == "shop-north"
    assert north_update["changed"] == ["balance"]
    assert north_update["old"]["balance"] == 100 and north_update["new"]["balance"] == 150
    assert (south_update["origin"], south_update["by"]["application"]) == ("south", "shop-south")
    assert south_update["by"]["user"] == "app"
    assert south_update["clock"] > north_update["clock"]

    # On south, north's older write lost the conflict (recorded, linked); south's won on north.
    lost = next(o for o in north_update["outcomes"] if o["node"] == "south")
    assert lost["event"] == "lost"
    assert lost["conflict"]["type"] == "update_origin_differs"
    assert lost["conflict"]["resolution"] == "local"
    won = next(o for o in south_update["outcomes"] if o["node"] == "north")
    assert won["event"] == "applied"
    assert won["conflict"]["resolution"] == "incoming"
    # East saw both, in whichever order: the later one is what it holds.
    assert outcomes(south_update)["east"] == "applied"
    assert set(outcomes(north_update)) == {"south", "east"}

    text = cluster.cli("history", "public.accounts", '{"id": 1}')
    assert text.returncode == 0, text.stderr
    assert "update on north by app (application shop-north" in text.stdout
    assert "update on south by app (application shop-south" in text.stdout
    assert "balance: 100 -> 150" in text.stdout and "balance: 100 -> 175" in text.stdout
    assert "south: lost a conflict (conflict south:" in text.stdout
    assert "kept north's version" not in text.stdout.split("south: lost")[1].splitlines()[0]

    # Nothing is kept of the table that is not audited, and it has no audit trigger.
    write(cluster, "north", "shop-north", "INSERT INTO notes VALUES (1, 'hello')")
    cluster.sync()
    for name in cluster.names:
        assert (
            cluster.admin_value(
                name,
                "SELECT count(*) FROM pgconcord.audit a JOIN pgconcord.replicated_table t"
                " ON t.id = a.table_id WHERE t.table_name = 'notes'",
            )
            == 0
        )
        assert (
            cluster.admin_value(
                name,
                "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'notes'::regclass"
                " AND tgname LIKE 'pgconcord_history%'",
            )
            == 0
        )
    assert "not under [audit]" in cluster.cli("history", "notes", "1").stdout


def test_a_column_merge_is_recorded_as_merged(system_cluster: Cluster) -> None:
    cluster = system_cluster
    audited_cluster(cluster)
    write(cluster, "north", "a", "INSERT INTO accounts VALUES (2, 'bob', 10, 'Rome')")
    cluster.sync()
    # An upsert's update is an update (its statement's update trigger sees it).
    write(
        cluster,
        "north",
        "a",
        "INSERT INTO accounts VALUES (2, 'robert', 10, 'Rome')"
        " ON CONFLICT (id) DO UPDATE SET owner = excluded.owner",
    )
    # An administrator acting as the application's role: both are named.
    cluster.admin_execute(
        "south",
        "SET application_name = 'b'; SET ROLE app; UPDATE accounts SET city = 'Milan' WHERE id = 2",
    )
    cluster.sync()
    for name in cluster.names:
        assert cluster.query(name, "SELECT owner, city FROM accounts") == [("robert", "Milan")]
    _, *updates = story(cluster, "accounts", '{"id": 2}')["changes"]
    by_origin = {change["origin"]: change for change in updates}
    merged = next(o for o in by_origin["north"]["outcomes"] if o["node"] == "south")
    assert merged["event"] == "merged" and merged["columns"] == ["owner"]
    administrator = cluster.admin_value("south", "SELECT session_user")
    assert by_origin["south"]["by"]["user"] == administrator != "app"
    assert by_origin["south"]["by"]["role"] == "app"
    assert by_origin["north"]["by"]["role"] is None
    merged = next(o for o in by_origin["south"]["outcomes"] if o["node"] == "north")
    assert merged["event"] == "merged" and merged["columns"] == ["city"]
    assert by_origin["north"]["operation"] == "update"
    assert by_origin["north"]["changed"] == ["owner"]
    assert "merged with a local write, took owner" in cluster.cli("history", "accounts", "2").stdout
    # A row moved to another key: the old key's story ends, the new key's begins.
    write(cluster, "north", "a", "UPDATE accounts SET id = 20 WHERE id = 2")
    cluster.sync()
    assert story(cluster, "accounts", "2")["changes"][-1]["operation"] == "delete"
    moved = story(cluster, "accounts", "20")["changes"]
    assert [(c["origin"], c["operation"]) for c in moved] == [("north", "insert")]
    assert moved[0]["new"]["owner"] == "robert" and outcomes(moved[0]) == {
        "south": "applied",
        "east": "applied",
    }


def test_a_parked_change_is_recorded_as_parked_then_applied(system_cluster: Cluster) -> None:
    cluster = system_cluster
    audited_cluster(cluster)
    cluster.admin_execute(
        "south", BY_HAND + "ALTER TABLE accounts ADD CONSTRAINT rich CHECK (balance >= 0)"
    )
    write(cluster, "north", "a", "INSERT INTO accounts VALUES (3, 'cy', -5, 'Bern')")
    assert cluster.cli("sync").returncode == 0
    change = story(cluster, "accounts", "3")["changes"][0]
    parked = next(o for o in change["outcomes"] if o["node"] == "south")
    assert parked["event"] == "parked" and parked["parked"]["state"] == "parked"
    assert "rich" in parked["parked"]["reason"]
    assert outcomes(change)["east"] == "applied"
    cluster.admin_execute("south", BY_HAND + "ALTER TABLE accounts DROP CONSTRAINT rich")
    assert cluster.cli("conflicts", "retry").returncode == 0
    change = story(cluster, "accounts", "3")["changes"][0]
    south = [o for o in change["outcomes"] if o["node"] == "south"]
    assert [o["event"] for o in south] == ["parked", "applied"]
    assert south[0]["parked"]["state"] == "retried"
    # A node that cannot be read is named; the others' story is told, and the exit is 1.
    with cluster.config_path.open("a") as config:
        config.write('[[node]]\nname = "west"\ndsn = "host=127.0.0.1 port=1 dbname=shop"\n')
    result = cluster.cli("history", "accounts", "3")
    assert result.returncode == 1
    assert "node west" in result.stderr and "node west" in result.stdout
    assert "insert on north by app" in result.stdout and "south: parked as south:" in result.stdout


def test_history_is_purged_after_keep_and_removed_from_tables_no_longer_listed(
    system_cluster: Cluster,
) -> None:
    cluster = system_cluster
    audited_cluster(cluster)
    write(cluster, "north", "a", "INSERT INTO accounts VALUES (4, 'di', 1, 'Oslo')")
    write(cluster, "north", "a", "UPDATE accounts SET balance = 2 WHERE id = 4")
    cluster.sync()
    # The insert's rows were made 100 days ago: older than keep.
    for name in cluster.names:
        cluster.admin_execute(
            name,
            "UPDATE pgconcord.audit SET recorded_at = recorded_at - interval '100 days'"
            " WHERE operation = 'I'",
        )
    for node in cluster.config.nodes:
        assert purge_node(cluster.config, node).audit_deleted == 1
    changes = story(cluster, "accounts", "4")["changes"]
    assert [(c["operation"], len(c["outcomes"])) for c in changes] == [("update", 2)]

    # No longer listed: setup drops the trigger; what was recorded stays until the purge.
    cluster.write_config("")
    cluster.setup()
    write(cluster, "north", "a", "UPDATE accounts SET balance = 3 WHERE id = 4")
    cluster.sync()
    assert len(story(cluster, "accounts", "4")["changes"]) == 1


def test_audited_tables_must_be_replicated(system_cluster: Cluster) -> None:
    cluster = system_cluster
    base = '[cluster]\nname = "x"\n[[node]]\nname = "a"\ndsn = "host=h dbname=d"\n'
    with pytest.raises(ConfigError, match="not replicated"):
        parse_config(base + '[audit]\ntables = ["other.accounts"]\n')
    with pytest.raises(ConfigError, match="keep"):
        parse_config(base + '[audit]\ntables = ["public.accounts"]\nkeep = "soon"\n')
    cluster.write_config('[audit]\ntables = ["public.missing"]\n')
    with pytest.raises(PgconcordError, match=r"public\.missing"):
        cluster.setup()
