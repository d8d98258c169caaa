"""A cluster of throwaway nodes for tests, and the checks every scenario ends with."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import psycopg
from pgconcord.verify import verify
from psycopg import sql

from pgconcord import agent, install
from pgconcord.apply import Puller
from pgconcord.config import ClusterConfig, load_config
from pgconcord.sandbox import Server

NODE_NAMES = ("north", "south", "east", "west", "central")
_database_numbers = itertools.count(1)


def wait_for(condition: Callable[[], Any], *, timeout: float = 30.0, message: str = "") -> Any:
    """Poll until the condition returns something truthy; fail with the message after timeout."""
    deadline = time.monotonic() + timeout
    delay = 0.02
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {message or condition}")
        time.sleep(delay)
        delay = min(0.5, delay * 1.5)


class Cluster:
    """Nodes = one fresh database on each server; a config file describing them."""

    def __init__(self, servers: Sequence[Server], directory: Path, schema_sql: str = "") -> None:
        self.servers = list(servers)
        self.names = list(NODE_NAMES[: len(servers)])
        database = f"test_{os.getpid()}_{next(_database_numbers)}"
        self.database = database
        self.dsns = {
            name: server.create_database(database)
            for name, server in zip(self.names, self.servers, strict=True)
        }
        self.server_of = dict(zip(self.names, self.servers, strict=True))
        self.config_path = directory / f"{database}.toml"
        self.write_config()
        if schema_sql:
            for name in self.names:
                self.execute(name, schema_sql)

    def write_config(self, extra: str = "") -> None:
        nodes = "".join(
            f'[[node]]\nname = "{name}"\ndsn = "{dsn}"\n\n' for name, dsn in self.dsns.items()
        )
        self.config_path.write_text(f'[cluster]\nname = "test"\n\n{nodes}{extra}')

    @property
    def config(self) -> ClusterConfig:
        return load_config(self.config_path)

    def connect(self, name: str, autocommit: bool = True) -> psycopg.Connection[Any]:
        return psycopg.connect(self.dsns[name], autocommit=autocommit)

    def execute(self, name: str, statement: str | sql.Composable, parameters: Any = None) -> None:
        with self.connect(name) as connection:
            connection.execute(
                statement if not isinstance(statement, str) else statement.encode(), parameters
            )

    def query(self, name: str, statement: str, parameters: Any = None) -> list[tuple[Any, ...]]:
        with self.connect(name) as connection:
            return connection.execute(statement.encode(), parameters).fetchall()

    def value(self, name: str, statement: str, parameters: Any = None) -> Any:
        rows = self.query(name, statement, parameters)
        return rows[0][0] if rows else None

    def setup(self) -> None:
        install.setup(self.config)

    def sync(self) -> agent.SyncReport:
        report = agent.sync(self.config)
        assert report.ok, report
        return report

    def pull(self, origin: str, target: str) -> None:
        config = self.config
        puller = Puller(config.node_by_name(origin), config.node_by_name(target))
        try:
            puller.pull()
        finally:
            puller.close()

    def assert_identical(self) -> None:
        report = verify(self.config)
        assert report.identical, report.to_json()

    def table_rows(self, name: str, table: str) -> list[tuple[Any, ...]]:
        return self.query(name, f"SELECT * FROM {table} ORDER BY 1")

    def applied_changes(self, target: str, origin: str) -> int:
        return int(
            self.value(
                target,
                "SELECT applied_changes FROM pgconcord.position WHERE origin = %s",
                (origin,),
            )
        )

    def cli(self, *arguments: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run the real command line against this cluster's config."""
        return subprocess.run(
            [sys.executable, "-m", "pgconcord", *arguments, "--config", str(self.config_path)],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def conflicts(self) -> list[dict[str, Any]]:
        result = self.cli("conflicts", "--json")
        assert result.returncode == 0, result.stderr
        records: list[dict[str, Any]] = json.loads(result.stdout)
        return records

    def drop(self) -> None:
        for server in self.servers:
            if server.is_running:
                server.drop_database(self.database)
