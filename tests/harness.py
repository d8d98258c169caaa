"""A cluster of throwaway nodes for tests, and the checks every scenario ends with."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import psycopg
from psycopg import sql

from pgconcord import agent, install, rights
from pgconcord.apply import Puller
from pgconcord.capture import wal as wal_capture
from pgconcord.config import ClusterConfig, load_config
from pgconcord.sandbox import Server
from pgconcord.verify import verify

NODE_NAMES = ("north", "south", "east", "west", "central")
_database_numbers = itertools.count(1)
_Result = TypeVar("_Result")


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


def _each_node(
    work: Callable[[str, Server], _Result], nodes: Iterable[tuple[str, Server]]
) -> list[_Result]:
    """work(name, server) for every node, at once when each is on a server of its own (a
    cluster's databases are made and its schema created in the time of one node); results in
    the nodes' order."""
    nodes = list(nodes)
    if len({str(server.data_directory) for _, server in nodes}) < len(nodes):
        return [work(name, server) for name, server in nodes]
    with ThreadPoolExecutor(max_workers=len(nodes) or 1) as pool:
        return list(pool.map(lambda node: work(*node), nodes))


APPLICATION_ROLE = "app"
AGENT_ROLE = "pgconcord_agent"
# The agent's role on clusters that capture from the WAL: the README's rights, and those WAL
# capture needs (so that "auto" leaves every other cluster on triggers).
WAL_AGENT_ROLE = "pgconcord_wal_agent"
_roles_made: set[str] = set()


def ensure_roles(server: Server) -> None:
    """The roles of a deployment, made once per server: `app`, an ordinary role that owns the
    application's tables and writes them, and `pgconcord_agent`, the agent's role with the
    rights the README's "production roles" recipe gives it (no superuser)."""
    # By data directory, not address: a server started later for another test may get the
    # port of one that is gone.
    made = str(server.data_directory)
    if made in _roles_made:
        return
    with psycopg.connect(server.dsn(), autocommit=True) as connection:
        for role in (APPLICATION_ROLE, AGENT_ROLE, WAL_AGENT_ROLE):
            exists = connection.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,))
            if exists.fetchone() is None:
                connection.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
        for agent_role in (AGENT_ROLE, WAL_AGENT_ROLE):
            connection.execute(
                sql.SQL("GRANT {} TO {}").format(
                    sql.Identifier(APPLICATION_ROLE), sql.Identifier(agent_role)
                )
            )
            connection.execute(
                sql.SQL(
                    "GRANT SET ON PARAMETER session_replication_role, deadlock_timeout TO {}"
                ).format(sql.Identifier(agent_role))
            )
        connection.execute(
            sql.SQL("ALTER ROLE {} REPLICATION").format(sql.Identifier(WAL_AGENT_ROLE))
        )
    _roles_made.add(made)


class Cluster:
    """Nodes = one fresh database on each server; a config file describing them.

    As deployed: the application (execute, query, value, connect) is the ordinary role `app`,
    which owns the database and its tables; the config's DSNs name the agent's role
    `pgconcord_agent` (not a superuser; superuser=True makes it the superuser, for scenarios
    about what needs one); admin_* methods are the superuser, for what an administrator does.
    """

    def __init__(
        self,
        servers: Sequence[Server],
        directory: Path,
        schema_sql: str = "",
        *,
        superuser: bool = False,
        capture: str = "trigger",
    ) -> None:
        self.capture = capture
        self.servers = list(servers)
        self.names = list(NODE_NAMES[: len(servers)])
        database = f"test_{os.getpid()}_{next(_database_numbers)}"
        self.database = database
        self.admin_dsns = dict(
            _each_node(
                lambda name, server: (name, self._create_database(server)),
                zip(self.names, self.servers, strict=True),
            )
        )
        self.app_dsns = {
            name: server.dsn(database, user=APPLICATION_ROLE)
            for name, server in zip(self.names, self.servers, strict=True)
        }
        # What the config names: the agent's role.
        self.dsns = (
            dict(self.admin_dsns)
            if superuser
            else {
                name: server.dsn(database, user=WAL_AGENT_ROLE if capture == "wal" else AGENT_ROLE)
                for name, server in zip(self.names, self.servers, strict=True)
            }
        )
        self.superuser = superuser
        self.server_of = dict(zip(self.names, self.servers, strict=True))
        self.config_path = directory / f"{database}.toml"
        self.write_config()
        if schema_sql:
            _each_node(lambda name, _server: self.execute(name, schema_sql), self.server_of.items())

    def _create_database(self, server: Server) -> str:
        """This cluster's database on one server, owned by the application, with what the
        agent's roles need in it; its superuser DSN."""
        ensure_roles(server)
        dsn = server.create_database(self.database)
        with psycopg.connect(dsn, autocommit=True) as connection:
            connection.execute(
                sql.SQL("ALTER DATABASE {} OWNER TO {}").format(
                    sql.Identifier(self.database), sql.Identifier(APPLICATION_ROLE)
                )
            )
            for agent_role in (AGENT_ROLE, WAL_AGENT_ROLE):
                connection.execute(
                    sql.SQL("GRANT CREATE ON DATABASE {} TO {}").format(
                        sql.Identifier(self.database), sql.Identifier(agent_role)
                    )
                )
            # Functions are granted per database.
            for function in wal_capture.ORIGIN_FUNCTIONS:
                connection.execute(
                    sql.SQL("GRANT EXECUTE ON FUNCTION {} TO {}").format(
                        sql.SQL(function), sql.Identifier(WAL_AGENT_ROLE)
                    )
                )
        return dsn

    def write_config(self, extra: str = "") -> None:
        nodes = "".join(
            f'[[node]]\nname = "{name}"\ndsn = "{dsn}"\n\n' for name, dsn in self.dsns.items()
        )
        if self.capture != "trigger":
            line = f'capture = "{self.capture}"\n'
            if "[replication]\n" in extra:
                extra = extra.replace("[replication]\n", "[replication]\n" + line, 1)
            else:
                extra += f"\n[replication]\n{line}"
        self.config_path.write_text(f'[cluster]\nname = "test"\n\n{nodes}{extra}')

    @property
    def config(self) -> ClusterConfig:
        return load_config(self.config_path)

    def use_weak_agent(self, role: str) -> None:
        """Point the config at `role`, made if need be: a member of the tables' owner, with
        none of pgconcord's rights (a test then grants what `pgconcord grant` prints)."""
        for name in self.names:
            self.admin_execute(
                name,
                sql.SQL(
                    "DO $$ BEGIN CREATE ROLE {role} LOGIN; EXCEPTION WHEN duplicate_object"
                    " THEN NULL; END $$; GRANT {app} TO {role}"
                ).format(role=sql.Identifier(role), app=sql.Identifier(APPLICATION_ROLE)),
            )
            self.dsns[name] = self.server_of[name].dsn(self.database, user=role)
        self.write_config()

    def connect(self, name: str, autocommit: bool = True) -> psycopg.Connection[Any]:
        return psycopg.connect(self.app_dsns[name], autocommit=autocommit)

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

    # Superuser access, for what only an administrator does: reading or changing pgconcord's
    # own tables, session_replication_role, ALTER DATABASE/SYSTEM. The methods above act as the
    # application would.
    def admin_connect(self, name: str, autocommit: bool = True) -> psycopg.Connection[Any]:
        return psycopg.connect(self.admin_dsns[name], autocommit=autocommit)

    def admin_execute(
        self, name: str, statement: str | sql.Composable, parameters: Any = None
    ) -> None:
        with self.admin_connect(name) as connection:
            connection.execute(
                statement if not isinstance(statement, str) else statement.encode(), parameters
            )

    def admin_query(
        self, name: str, statement: str, parameters: Any = None
    ) -> list[tuple[Any, ...]]:
        with self.admin_connect(name) as connection:
            return connection.execute(statement.encode(), parameters).fetchall()

    def admin_value(self, name: str, statement: str, parameters: Any = None) -> Any:
        rows = self.admin_query(name, statement, parameters)
        return rows[0][0] if rows else None

    def setup(self) -> None:
        install.setup(self.config)
        self.add_event_triggers()

    def add_event_triggers(self) -> None:
        """What the README has a superuser do after setup by a non-superuser agent, so that
        schema changes replicate: create pgconcord's event triggers."""
        for name in self.names:
            with self.admin_connect(name, autocommit=False) as connection:
                row = connection.execute(
                    "SELECT to_regprocedure('pgconcord.capture_schema_change()')"
                ).fetchone()
                if row is None or row[0] is None:
                    continue  # not set up (yet): a node that joins later, a refused setup
                for statement in rights.event_trigger_script(connection):
                    connection.execute(statement)
                connection.commit()

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

    def logged_changes(self, name: str) -> int:
        """The changes a node has captured and not purged: in its change log, or captured and
        not stamped yet (stamp_captured.sql), or still in its WAL (drain_wal.sql)."""
        with self.admin_connect(name, autocommit=False) as connection:
            connection.execute("SELECT pgconcord.stamp_captured(true)")
            connection.commit()
            row = connection.execute(
                "SELECT (SELECT count(*) FROM pgconcord.change_log)"
                " + (SELECT count(*) FROM pgconcord.captured_change)",
            ).fetchone()
        assert row is not None
        return int(row[0])

    def applied_changes(self, target: str, origin: str) -> int:
        return int(
            self.admin_value(
                target,
                "SELECT applied_changes FROM pgconcord.position WHERE origin = %s",
                (origin,),
            )
        )

    def cli(self, *arguments: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run the real command line against this cluster's config (after a `setup` or `join`
        that succeeds, the administrator's step of add_event_triggers follows, as in the
        README)."""
        result = subprocess.run(
            [sys.executable, "-m", "pgconcord", *arguments, "--config", str(self.config_path)],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if arguments[:1] in (("setup",), ("join",)) and result.returncode == 0:
            self.add_event_triggers()
        return result

    def conflicts(self) -> list[dict[str, Any]]:
        result = self.cli("conflicts", "--json")
        assert result.returncode == 0, result.stderr
        records: list[dict[str, Any]] = json.loads(result.stdout)
        return records

    def drop(self) -> None:
        def drop_here(_name: str, server: Server) -> None:
            if server.is_running:
                server.drop_database(self.database)

        _each_node(drop_here, self.server_of.items())
