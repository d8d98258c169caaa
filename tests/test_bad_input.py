"""Bad input gets one clear line naming the node, table or column, no traceback, and loses
nothing that was queued."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from harness import Cluster


def run_cli(
    *arguments: str, environment: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run(
        [sys.executable, "-m", "pgconcord", *arguments],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, **(environment or {})},
    )


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_unreadable_config(tmp_path: Path) -> None:
    line = one_line_error(run_cli("status", "--config", str(tmp_path / "missing.toml")))
    assert "missing.toml" in line and "cannot read" in line


def test_malformed_config(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[cluster]\nname = "x"\n[[node]\nname = "a"\n')
    line = one_line_error(run_cli("setup", "--config", str(path)))
    assert "bad.toml" in line and "line" in line


def test_config_with_a_misspelt_key(tmp_path: Path) -> None:
    path = tmp_path / "typo.toml"
    path.write_text(
        '[cluster]\nname = "x"\n[[node]]\nname = "a"\ndsn = "host=127.0.0.1"\n'
        '[replicaton]\nschemas = ["public"]\n'
    )
    line = one_line_error(run_cli("sync", "--config", str(path)))
    assert "replicaton" in line


def test_no_config_at_all() -> None:
    line = one_line_error(run_cli("status", environment={"PGCONCORD_CONFIG": ""}))
    assert "--config" in line


def test_unknown_node(system_cluster: Cluster) -> None:
    line = one_line_error(system_cluster.cli("run", "--node", "atlantis"))
    assert "atlantis" in line and "north" in line


def test_unreachable_host(system_cluster: Cluster, tmp_path: Path) -> None:
    path = tmp_path / "unreachable.toml"
    path.write_text(
        '[cluster]\nname = "x"\n[[node]]\nname = "north"\n'
        f'dsn = "{system_cluster.dsns["north"]}"\n'
        '[[node]]\nname = "far"\ndsn = "host=127.0.0.1 port=1 dbname=shop user=postgres"\n'
    )
    line = one_line_error(run_cli("setup", "--config", str(path)))
    assert "node far" in line and "connect" in line


def test_wrong_password(system_cluster: Cluster, tmp_path: Path) -> None:
    cluster = system_cluster
    cluster.admin_execute("north", "DROP ROLE IF EXISTS shopkeeper")
    cluster.admin_execute(
        "north", "CREATE ROLE shopkeeper LOGIN PASSWORD 'right' IN ROLE password_login"
    )
    server = cluster.server_of["north"]
    path = tmp_path / "password.toml"
    path.write_text(
        '[cluster]\nname = "x"\n[[node]]\nname = "north"\n'
        f'dsn = "host=127.0.0.1 port={server.port} dbname={cluster.database} user=shopkeeper"\n'
    )
    result = run_cli("setup", "--config", str(path), environment={"PGPASSWORD": "s3cret-guess"})
    line = one_line_error(result)
    assert "node north" in line and "password" in line
    assert "s3cret-guess" not in result.stderr + result.stdout  # never shown


def test_a_declared_key_without_a_unique_index_is_refused_by_name(
    system_cluster: Cluster,
) -> None:
    cluster = system_cluster
    for name in cluster.names:
        cluster.execute(
            name, "CREATE TABLE logbook (line text NOT NULL); CREATE TABLE ok (id int PRIMARY KEY)"
        )
    cluster.write_config('[replication.keys]\n"public.logbook" = ["line"]\n')
    line = one_line_error(cluster.cli("setup"))
    assert "public.logbook" in line and "unique index" in line
    # Nothing was installed anywhere.
    for name in cluster.names:
        assert cluster.admin_value(name, "SELECT to_regclass('pgconcord.change_log')") is None


def test_a_table_missing_on_one_node_is_named(system_cluster: Cluster) -> None:
    cluster = system_cluster
    for name in ("north", "south"):
        cluster.execute(name, "CREATE TABLE items (id int PRIMARY KEY)")
    line = one_line_error(cluster.cli("setup"))
    assert "public.items" in line and "east" in line


@pytest.mark.parametrize(
    ("east_definition", "words"),
    [
        ("CREATE TABLE items (id int PRIMARY KEY)", ["column price", "east"]),
        ("CREATE TABLE items (id int PRIMARY KEY, price text)", ["price", "numeric", "text"]),
    ],
)
def test_a_column_missing_or_different_on_one_node_is_named(
    system_cluster: Cluster, east_definition: str, words: list[str]
) -> None:
    cluster = system_cluster
    for name in ("north", "south"):
        cluster.execute(name, "CREATE TABLE items (id int PRIMARY KEY, price numeric)")
    cluster.execute("east", east_definition)
    line = one_line_error(cluster.cli("setup"))
    for word in ["public.items", *words]:
        assert word in line


def test_a_column_added_on_one_node_later_keeps_changes_queued(system_cluster: Cluster) -> None:
    cluster = system_cluster
    for name in cluster.names:
        cluster.execute(name, "CREATE TABLE items (id int PRIMARY KEY, name text)")
    cluster.setup()
    # Made by hand on one node only (replicated schema changes are in test_schema_changes).
    by_hand = "SET session_replication_role = replica; ALTER TABLE items ADD COLUMN colour text"
    cluster.admin_execute("north", by_hand)
    cluster.execute("north", "INSERT INTO items VALUES (1, 'pen', 'blue')")
    cluster.execute("south", "INSERT INTO items VALUES (2, 'cup')")
    line = one_line_error(cluster.cli("sync"))
    assert "public.items" in line and "colour" in line and "north" in line
    # south's change still travelled; north's stays queued.
    assert cluster.query("east", "SELECT id FROM items") == [(2,)]
    for name in ("south", "east"):
        cluster.admin_execute(name, by_hand)
    result = cluster.cli("sync")
    assert result.returncode == 0, result.stderr
    for name in cluster.names:
        assert cluster.query(name, "SELECT id, colour FROM items ORDER BY id") == [
            (1, "blue"),
            (2, None),
        ]


def test_two_config_entries_for_one_database_are_refused(
    system_cluster: Cluster, tmp_path: Path
) -> None:
    cluster = system_cluster
    cluster.setup()
    server = cluster.server_of["north"]
    path = tmp_path / "twice.toml"
    # The same database reached through another spelling of its address.
    path.write_text(
        '[cluster]\nname = "x"\n[[node]]\nname = "south"\n'
        f'dsn = "host=localhost port={server.port} dbname={cluster.database} user=postgres"\n'
        '[[node]]\nname = "other"\n'
        f'dsn = "{cluster.dsns["south"]}"\n'
    )
    line = one_line_error(run_cli("setup", "--config", str(path)))
    assert "north" in line and "south" in line


def test_capture_modes_setup_cannot_honour_are_refused_by_name(system_cluster: Cluster) -> None:
    cluster = system_cluster
    for name in cluster.names:
        cluster.execute(name, "CREATE TABLE items (id int PRIMARY KEY)")
    cluster.write_config('[replication]\ncapture = "wal"\n')
    line = one_line_error(cluster.cli("setup"))
    assert 'capture = "wal"' in line and "north" in line
    for name in cluster.names:
        assert cluster.admin_value(name, "SELECT to_regclass('pgconcord.change_log')") is None
    cluster.write_config('[replication]\ncapture = "logical"\n')
    line = one_line_error(cluster.cli("setup"))
    assert "capture" in line and "'auto'" in line
    # "auto" captures with triggers where WAL capture is not to be had, and says so.
    cluster.write_config('[replication]\ncapture = "auto"\n')
    assert cluster.cli("setup").returncode == 0
    status = cluster.cli("status", "--json")
    assert {node["capture"] for node in json.loads(status.stdout)["nodes"]} == {"trigger"}
