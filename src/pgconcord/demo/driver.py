"""The demo run: start the nodes, set up replication, run the workload under the live view, wait
until every node has caught up, verify, print the summary, and remove everything it started."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console

from pgconcord.agent import Agent, sync
from pgconcord.config import ClusterConfig, load_config
from pgconcord.demo.summary import _print_summary
from pgconcord.demo.view import DemoRun, Observer, _display
from pgconcord.demo.workload import (
    THREAD_JOIN_SECONDS,
    ConflictLog,
    ReferenceData,
    Shop,
    plan_conflict_rounds,
    prepare_node,
    reference_data,
)
from pgconcord.errors import PgconcordError
from pgconcord.install import setup
from pgconcord.sandbox import Server, find_binaries
from pgconcord.verify import verify

NODE_NAMES = (
    "north",
    "south",
    "east",
    "west",
    "central",
    "harbor",
    "valley",
    "summit",
    "river",
    "forest",
)
CLUSTER_NAME = "demo"

REFRESH_PER_SECOND = 4
DRAIN_TIMEOUT_SECONDS = 30.0


def write_config(path: Path, dsns: dict[str, str]) -> ClusterConfig:
    # json.dumps quotes as a TOML basic string: same escapes, so any DSN survives.
    nodes = "".join(
        f"[[node]]\nname = {json.dumps(name)}\ndsn = {json.dumps(dsn)}\n\n"
        for name, dsn in dsns.items()
    )
    path.write_text(
        f"[cluster]\nname = {json.dumps(CLUSTER_NAME)}\n\n{nodes}"
        '[replication]\nschemas = ["public"]\n\n'
        # Sales and restocks on several nodes add up instead of overwriting each other.
        '[conflict.table."public.products"]\ndelta_columns = ["stock"]\n'
    )
    return load_config(path)


def _wait_until_drained(run: DemoRun, refresh: Callable[[], None]) -> bool:
    """Wait until a status taken after the workload stopped shows nothing pending anywhere."""
    stopped_at = time.monotonic()
    deadline = stopped_at + DRAIN_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        observation = run.observer.latest
        if (
            observation is not None
            and observation.taken_at >= stopped_at
            and observation.pending_changes == 0
        ):
            return True
        refresh()
        time.sleep(1 / REFRESH_PER_SECOND)
    return False


def _start_servers(
    names: Sequence[str], servers: dict[str, Server], data: ReferenceData
) -> dict[str, str]:
    binaries = find_binaries()
    for name in names:
        servers[name] = Server(binaries, name=f"demo-{name}", fsync=False)
    # Leaving the executor waits for every start, so cleanup never races a server coming up.
    with ThreadPoolExecutor(max_workers=len(names), thread_name_prefix="start") as executor:
        futures = {name: executor.submit(prepare_node, servers[name], data) for name in names}
    return {name: future.result() for name, future in futures.items()}


def run_demo(*, seconds: int, node_count: int, console: Console) -> bool:
    """Run the demo; True if verify found every node identical at the end."""
    if not 2 <= node_count <= len(NODE_NAMES):
        raise PgconcordError(f"the demo runs 2 to {len(NODE_NAMES)} nodes, not {node_count}")
    if seconds < 1:
        raise PgconcordError(f"the demo needs at least 1 second of workload, not {seconds}")
    names = NODE_NAMES[:node_count]
    data = reference_data(datetime.now(UTC).replace(microsecond=0))
    servers: dict[str, Server] = {}
    stopping = threading.Event()
    shops: list[Shop] = []
    agent: Agent | None = None
    observer: Observer | None = None
    try:
        console.print(f"starting {node_count} throwaway PostgreSQL servers...", highlight=False)
        dsns = _start_servers(names, servers, data)
        for name in names:
            server = servers[name]
            console.print(
                f"  {name:<8} PostgreSQL {server.binaries.major_version} on"
                f" {server.host}:{server.port}  {server.sandbox_directory}",
                highlight=False,
            )
        config = write_config(servers[names[0]].sandbox_directory / "cluster.toml", dsns)
        report = setup(config)
        console.print(
            f"set up replication of {', '.join(report.tables)} on every node", highlight=False
        )
        rounds = plan_conflict_rounds(seconds, names, data)
        conflict_log = ConflictLog()
        shops = [Shop(name, dsns[name], data, rounds, conflict_log, stopping) for name in names]
        agent = Agent(config).start()
        observer = Observer(config).start()
        run = DemoRun(config, servers, shops, agent, observer, rounds, conflict_log, seconds)
        console.print(
            f"running a shop workload on every node for {seconds} s, with {len(rounds)}"
            " rows deliberately updated on several nodes at the same instant",
            highlight=False,
        )
        drained = False
        with _display(run, console) as refresh:
            for shop in shops:
                shop.start(run.started_at)
            while run.elapsed < seconds:
                refresh()
                time.sleep(min(1 / REFRESH_PER_SECOND, max(0.0, seconds - run.elapsed)))
            stopping.set()
            for shop in shops:
                shop.join(THREAD_JOIN_SECONDS)
            run.phase = "waiting for every node to catch up"
            refresh()
            stopped_at = time.monotonic()
            drained = _wait_until_drained(run, refresh)
            run.phase = "caught up" if drained else "still catching up"
            refresh()
        if drained:
            console.print(
                f"workload stopped; {time.monotonic() - stopped_at:.1f} s later no change was"
                " pending between any two nodes",
                highlight=False,
            )
        else:
            console.print(
                f"changes still pending after {DRAIN_TIMEOUT_SECONDS:.0f} s; syncing once more",
                style="yellow",
                highlight=False,
            )
        final_sync = sync(config)
        for failure in final_sync.failures:
            console.print(f"sync: {failure}", style="red", highlight=False)
        agent.stop()
        observer.stop()
        result = verify(config)
        _print_summary(run, result, console)
        return result.identical and not any(shop.activity.failure for shop in shops)
    finally:
        stopping.set()
        for shop in shops:
            shop.join(THREAD_JOIN_SECONDS)
        if observer is not None:
            observer.stop()
        if agent is not None:
            agent.stop()
        for server in servers.values():
            try:
                server.cleanup()
            except PgconcordError as error:
                console.print(f"cleanup: {error}", style="red", highlight=False)
