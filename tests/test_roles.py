"""Real deployments: the application writes through its own ordinary role, the agent runs as a
role with only the rights the README lists, and neither can use pgconcord to do more than it
may. (Every other test runs this way too, through tests/harness.py; these are the scenarios
about the rights themselves.)"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest
from harness import APPLICATION_ROLE, Cluster, wait_for
from psycopg import sql

from pgconcord.agent import Agent
from pgconcord.sandbox import Server

SCHEMA = "CREATE TABLE accounts (id int PRIMARY KEY, owner text, balance int NOT NULL)"
README = Path(__file__).resolve().parent.parent / "README.md"


def prepared(cluster: Cluster) -> Cluster:
    for name in cluster.names:
        cluster.execute(name, SCHEMA)
    cluster.setup()
    return cluster


def test_the_application_role_writes_and_its_writes_replicate(system_cluster: Cluster) -> None:
    cluster = prepared(system_cluster)
    assert not cluster.value("north", "SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
    cluster.execute("north", "INSERT INTO accounts VALUES (1, 'ann', 10)")
    cluster.execute("south", "INSERT INTO accounts VALUES (2, 'bob', 20)")
    cluster.execute("east", "UPDATE accounts SET balance = 11 WHERE id = 1")  # not there yet
    cluster.sync()
    cluster.execute("east", "UPDATE accounts SET balance = 12 WHERE id = 1")
    cluster.execute("north", "ALTER TABLE accounts ADD COLUMN note text")
    cluster.execute("south", "DELETE FROM accounts WHERE id = 2")
    cluster.sync()
    cluster.sync()
    for name in cluster.names:
        assert cluster.query(name, "SELECT id, balance FROM accounts ORDER BY id") == [(1, 12)]
    cluster.assert_identical()


@pytest.mark.parametrize(
    "statement",
    [
        "INSERT INTO pgconcord.change_log (table_id, operation, row_key, clock, new_row)"
        " VALUES (0, 'S', '{}', 1, '{\"statement\": \"DROP TABLE accounts\"}')",
        "UPDATE pgconcord.position SET applied_snapshot = '1:1:'",
        "DELETE FROM pgconcord.member",
        "SELECT count(*) FROM pgconcord.conflict",
        "SELECT pgconcord.log_schema_change('DROP TABLE', 'DROP TABLE accounts', 'public',"
        " 'postgres')",
        "SELECT pgconcord.capture_generically('accounts'::regclass)",
    ],
)
def test_the_application_role_cannot_touch_what_peers_act_on(
    system_cluster: Cluster, statement: str
) -> None:
    cluster = prepared(system_cluster)
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        cluster.execute("north", statement)


def test_a_writer_search_path_does_not_choose_what_capture_runs(system_cluster: Cluster) -> None:
    """Capture runs with pgconcord's rights: an operator the writer plants ahead of
    pg_catalog in its search_path must not be called by it (it would run with those rights)."""
    cluster = prepared(system_cluster)
    cluster.execute("north", "INSERT INTO accounts VALUES (7, 'eve', 1)")
    cluster.execute("north", "CREATE TABLE spied (who text)")
    cluster.execute(
        "north",
        "CREATE FUNCTION public.spy(text, text) RETURNS boolean LANGUAGE sql"
        " AS 'INSERT INTO public.spied VALUES (current_user); SELECT pg_catalog.texteq($1, $2)'",
    )
    cluster.execute(
        "north",
        "CREATE OPERATOR public.= (LEFTARG = text, RIGHTARG = text, FUNCTION = public.spy)",
    )
    with cluster.connect("north") as connection:
        connection.execute("SET search_path = public, pg_catalog")
        connection.execute("UPDATE accounts SET owner = 'mallory' WHERE id = 7")
        connection.execute("CREATE TABLE more (id int PRIMARY KEY)")
    cluster.sync()
    cluster.sync()
    assert cluster.value("north", "SELECT count(*) FROM spied WHERE who <> 'app'") == 0
    assert cluster.value("south", "SELECT owner FROM accounts WHERE id = 7") == "mallory"
    assert cluster.value("south", "SELECT count(*) FROM more") == 0
    cluster.assert_identical()


def test_a_replayed_definer_function_is_owned_by_its_creator_everywhere(
    system_cluster: Cluster,
) -> None:
    cluster = prepared(system_cluster)
    cluster.execute(
        "north",
        "CREATE FUNCTION public.total() RETURNS bigint LANGUAGE sql SECURITY DEFINER"
        " AS 'SELECT sum(balance) FROM public.accounts'",
    )
    cluster.execute("north", "CREATE TABLE notes (id int PRIMARY KEY, body text)")
    cluster.sync()
    for name in cluster.names:
        owners = cluster.query(
            name,
            "SELECT p.proowner::regrole::text FROM pg_proc p WHERE p.proname = 'total'"
            " UNION ALL SELECT c.relowner::regrole::text FROM pg_class c"
            " WHERE c.relname = 'notes'",
        )
        assert owners == [(APPLICATION_ROLE,), (APPLICATION_ROLE,)], name
    cluster.execute("south", "INSERT INTO notes VALUES (1, 'written by app on south')")
    cluster.sync()
    assert cluster.value("north", "SELECT body FROM notes") == "written by app on south"


def test_a_schema_change_by_a_role_a_node_lacks_is_parked_naming_it(
    system_cluster: Cluster,
) -> None:
    cluster = prepared(system_cluster)
    role = f"clerk_{cluster.database}"
    # The role exists on north only (roles belong to a server, not to a database).
    cluster.admin_execute(
        "north",
        sql.SQL(
            "CREATE ROLE {role} LOGIN; GRANT CREATE ON SCHEMA public TO {role};"
            " GRANT {role} TO pgconcord_agent"
        ).format(role=sql.Identifier(role)),
    )
    with cluster.admin_connect("north") as connection:
        connection.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(role)))
        connection.execute("CREATE TABLE ledger (id int PRIMARY KEY, amount int)")
    cluster.execute("north", "INSERT INTO accounts VALUES (1, 'ann', 10)")
    cluster.sync()
    parked = [record for record in cluster.conflicts() if record.get("kind") == "parked"]
    assert parked, "the schema change was not parked"
    assert all(role in str(record) for record in parked)
    # The stream went on: the next change arrived.
    assert cluster.value("south", "SELECT balance FROM accounts WHERE id = 1") == 10
    for name in ("south", "east"):
        cluster.admin_execute(
            name,
            sql.SQL(
                "CREATE ROLE {role} LOGIN; GRANT CREATE ON SCHEMA public TO {role};"
                " GRANT {role} TO pgconcord_agent"
            ).format(role=sql.Identifier(role)),
        )
    retried = cluster.cli("conflicts", "retry")
    assert retried.returncode == 0, retried.stderr
    for name in cluster.names:
        assert (
            cluster.value(
                name, "SELECT relowner::regrole::text FROM pg_class WHERE relname = 'ledger'"
            )
            == role
        )
    for name in cluster.names:
        cluster.admin_execute(
            name,
            f'SET session_replication_role = replica; DROP TABLE ledger; DROP OWNED BY "{role}"',
        )


def test_an_agent_without_superuser_replicates_with_no_echo(system_cluster: Cluster) -> None:
    cluster = prepared(system_cluster)
    assert not cluster.admin_value(
        "north", "SELECT rolsuper FROM pg_roles WHERE rolname = 'pgconcord_agent'"
    )
    running = Agent(cluster.config, poll_seconds=0.2).start()
    try:
        for index, name in enumerate(cluster.names):
            cluster.execute(name, "INSERT INTO accounts VALUES (%s, %s, 1)", (index, name))
        cluster.execute("north", "UPDATE accounts SET balance = 5 WHERE id = 0")
        wait_for(
            lambda: all(
                cluster.value(name, "SELECT count(*) FROM accounts WHERE balance IN (1, 5)") == 3
                and cluster.value(name, "SELECT balance FROM accounts WHERE id = 0") == 5
                for name in cluster.names
            ),
            message="every row on every node",
        )

        def applied() -> list[int]:
            return [
                cluster.applied_changes(target, origin)
                for target in cluster.names
                for origin in cluster.names
                if origin != target
            ]

        settled = wait_for(
            lambda: (first := applied()) == (time.sleep(1.5) or applied()) and first,
            message="applied counters to settle",
        )
        # Nobody writes: nothing is applied any more (an echo would keep them moving).
        time.sleep(3)
        assert applied() == settled
        assert sum(settled) == 8  # three inserts and an update, each applied on two peers
    finally:
        running.stop()
    cluster.assert_identical()


def test_setup_names_each_right_the_agent_role_lacks(system_cluster: Cluster) -> None:
    cluster = system_cluster
    for name in cluster.names:
        cluster.execute(name, SCHEMA)
    cluster.use_weak_agent("weak_agent")
    result = cluster.cli("setup")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for needed in (
        "node north",
        "node south",
        "session_replication_role",
        "deadlock_timeout",
        "pgconcord grant",
    ):
        assert needed in lines[0], lines[0]
    assert "Traceback" not in result.stderr
    # Nothing was installed anywhere.
    for name in cluster.names:
        assert cluster.admin_value(name, "SELECT to_regnamespace('pgconcord')") is None
    # `pgconcord grant` prints what a superuser runs; run as printed, setup then works.
    for name in cluster.names:
        printed = cluster.cli("grant", "weak_agent", "--node", name)
        assert printed.returncode == 0, printed.stderr
        cluster.admin_execute(name, printed.stdout)
    assert cluster.cli("setup").returncode == 0


def test_an_agent_that_may_not_enter_replica_mode_applies_nothing(
    system_cluster: Cluster,
) -> None:
    cluster = prepared(system_cluster)
    cluster.execute("north", "INSERT INTO accounts VALUES (1, 'ann', 10)")
    # The right taken away after setup (roles belong to the server: given back below).
    cluster.admin_execute(
        "south", "REVOKE SET ON PARAMETER session_replication_role FROM pgconcord_agent"
    )
    try:
        result = cluster.cli("sync")
    finally:
        cluster.admin_execute(
            "south", "GRANT SET ON PARAMETER session_replication_role TO pgconcord_agent"
        )
    assert result.returncode != 0
    assert "node south" in result.stderr and "session_replication_role" in result.stderr
    assert "Traceback" not in result.stderr
    assert cluster.value("south", "SELECT count(*) FROM accounts") == 0
    assert cluster.value("east", "SELECT count(*) FROM accounts") == 1
    assert cluster.admin_value("south", "SELECT sum(applied_changes) FROM pgconcord.position") == 0
    # Given back, the change arrives, once.
    cluster.sync()
    cluster.assert_identical()
    assert cluster.admin_value("south", "SELECT sum(applied_changes) FROM pgconcord.position") == 1


def _readme_roles_block() -> str:
    text = README.read_text(encoding="utf-8")
    match = re.search(r"<!-- production-roles:[^\n]*-->\n```sql\n(.*?)```", text, re.S)
    assert match, "README lost its production roles recipe"
    return match.group(1)


def test_the_readme_production_roles_recipe_works_as_written(tmp_path: Path) -> None:
    from conftest import NODES_PER_CLUSTER, _start_servers, available_postgres_binaries

    servers: list[Server] = _start_servers(
        available_postgres_binaries()[0], NODES_PER_CLUSTER, "recipe"
    )
    try:
        cluster = Cluster(servers[:2], tmp_path)
        recipe = _readme_roles_block().replace(" shop ", f" {cluster.database} ")
        for name in cluster.names:
            cluster.execute(name, SCHEMA)
            cluster.admin_execute(name, recipe)
            cluster.dsns[name] = cluster.server_of[name].dsn(cluster.database, user="pgconcord")
        cluster.write_config()
        set_up = cluster_cli_without_event_triggers(cluster, "setup")
        assert set_up.returncode == 0, set_up.stderr
        assert "pgconcord grant" in set_up.stdout + set_up.stderr
        for name in cluster.names:
            printed = cluster_cli_without_event_triggers(
                cluster, "grant", "pgconcord", "--node", name
            )
            assert printed.returncode == 0, printed.stderr
            assert "CREATE EVENT TRIGGER" in printed.stdout
            cluster.admin_execute(name, printed.stdout)
        cluster.execute("north", "INSERT INTO accounts VALUES (1, 'ann', 10)")
        cluster.execute("north", "ALTER TABLE accounts ADD COLUMN note text")
        cluster.execute("south", "INSERT INTO accounts VALUES (2, 'bob', 20)")
        cluster.sync()
        cluster.sync()
        for name in cluster.names:
            assert cluster.query(name, "SELECT id, note FROM accounts ORDER BY id") == [
                (1, None),
                (2, None),
            ]
        cluster.assert_identical()
        status = cluster_cli_without_event_triggers(cluster, "status")
        assert "pgconcord" not in status.stderr or status.returncode == 0, status.stderr
    finally:
        for server in servers:
            server.cleanup()


def cluster_cli_without_event_triggers(
    cluster: Cluster, *arguments: str
) -> subprocess.CompletedProcess[str]:
    """The command line as the user runs it, without the harness's administrator step."""
    return subprocess.run(
        [sys.executable, "-m", "pgconcord", *arguments, "--config", str(cluster.config_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_setup_refuses_forced_row_level_security_the_agent_cannot_bypass(
    system_cluster: Cluster,
) -> None:
    cluster = system_cluster
    for name in cluster.names:
        cluster.execute(name, SCHEMA)
        cluster.execute(name, "ALTER TABLE accounts ENABLE ROW LEVEL SECURITY")
        cluster.execute(name, "ALTER TABLE accounts FORCE ROW LEVEL SECURITY")
    result = cluster.cli("setup")
    assert result.returncode != 0
    assert "BYPASSRLS" in result.stderr and "public.accounts" in result.stderr, result.stderr


def test_a_superuser_agent_installs_the_event_triggers_itself(superuser_cluster: Cluster) -> None:
    cluster = superuser_cluster
    for name in cluster.names:
        cluster.execute(name, SCHEMA)
    result = cluster_cli_without_event_triggers(cluster, "setup")
    assert result.returncode == 0, result.stderr
    assert "event triggers" not in result.stdout + result.stderr
    cluster.execute("north", "ALTER TABLE accounts ADD COLUMN note text")
    cluster.execute("south", "INSERT INTO accounts VALUES (1, 'ann', 10)")
    cluster.sync()
    cluster.sync()
    for name in cluster.names:
        assert cluster.query(name, "SELECT id, note FROM accounts") == [(1, None)]
        # Applied schema changes still run as their author, not as the superuser.
        assert (
            cluster.value(
                name, "SELECT relowner::regrole::text FROM pg_class WHERE relname = 'accounts'"
            )
            == APPLICATION_ROLE
        )
    cluster.assert_identical()
