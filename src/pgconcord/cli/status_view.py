"""What `status` shows a person, once or live (`status --watch`): the nodes, the pairs, and
what needs a person. One rendering for both, so the live view never says less than `status`."""

from __future__ import annotations

import threading
import time

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from pgconcord.config import ClusterConfig
from pgconcord.status import ClusterStatus, cluster_status


def status_view(report: ClusterStatus, *, with_problems: bool = True) -> RenderableType:
    nodes = Table(title=f"cluster {report.cluster}")
    for heading in ("node", "state", "capture", "change log", "conflicts"):
        nodes.add_column(heading)
    for node in report.nodes:
        state = "up" if node.reachable and not node.error else (node.error or "down")
        if node.membership not in (None, "active"):
            state = f"{node.membership.upper()}, {state}"
        log_size = (
            f"{node.change_log_rows} rows, {(node.change_log_bytes or 0) // 1024} kB"
            if node.change_log_rows is not None
            else "-"
        )
        captured = node.capture or "-"
        if node.capture_slot_bytes is not None:
            captured += (
                f", slot keeps {node.capture_slot_bytes // 1024} kB"
                f" ({node.capture_slot_seconds or 0:.1f} s undrained)"
            )
        nodes.add_row(node.name, state, captured, log_size, str(node.conflicts or 0))
    pairs = Table(title="replication")
    for heading in ("from", "to", "pending", "pending size", "lag", "applied"):
        pairs.add_column(heading)
    for pair in report.pairs:
        pairs.add_row(
            pair.origin,
            pair.target,
            pair.state or "?" if pair.pending_changes is None else str(pair.pending_changes),
            "?" if pair.pending_bytes is None else f"{pair.pending_bytes // 1024} kB",
            "?" if pair.lag_seconds is None else f"{pair.lag_seconds:.1f} s",
            "?" if pair.applied_changes is None else str(pair.applied_changes),
        )
    parts: list[RenderableType] = [nodes, pairs]
    if with_problems:
        parts.extend(Text(problem, style="bold red") for problem in report.problems)
        if not report.problems:
            parts.append(Text("healthy", style="green"))
    return Group(*parts)


def watch_status(
    config: ClusterConfig, lag_seconds: float, interval_seconds: float, console: Console
) -> None:
    """Refresh the status every interval until Ctrl-C, which ends it normally. On a terminal
    it is a live view (as the demo's); elsewhere (a pipe, a log) each reading is printed in
    full under a line with its time."""
    stop = threading.Event()
    live_view = console.is_terminal and not console.is_dumb_terminal

    def reading() -> RenderableType:
        began = time.monotonic()
        report = cluster_status(config, lag_threshold_seconds=lag_seconds)
        took = time.monotonic() - began
        header = Text(
            f"{time.strftime('%H:%M:%S')}  every {interval_seconds:g} s (read in {took:.1f} s)"
            "  Ctrl-C to stop",
            style="dim",
        )
        return Group(header, status_view(report))

    try:
        if live_view:
            with Live(console=console, auto_refresh=False, transient=False) as live:
                while not stop.is_set():
                    began = time.monotonic()
                    live.update(reading(), refresh=True)
                    stop.wait(max(0.0, began + interval_seconds - time.monotonic()))
        else:
            while not stop.is_set():
                began = time.monotonic()
                console.print(reading(), highlight=False)
                console.file.flush()
                stop.wait(max(0.0, began + interval_seconds - time.monotonic()))
    except KeyboardInterrupt:
        return
