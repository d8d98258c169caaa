"""`pgconcord demo`, run for real: it converges, shows conflicts, and leaves nothing behind
(no server, no watchdog, no sandbox directory), also when interrupted with Ctrl-C."""

from __future__ import annotations

import io
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from pgconcord.demo import ConflictRound, _example, _pick_examples, run_demo
from pgconcord.errors import PgconcordError

DEMO_COMMAND = [sys.executable, "-c", "from pgconcord.cli import main; main()", "demo"]
# The demo prints each node's sandbox directory when it starts it.
SANDBOX = re.compile(r"/tmp/pgconcord-demo-[A-Za-z0-9_-]+")


def processes_mentioning(paths: list[str]) -> list[str]:
    """Command lines naming one of the paths: a postmaster (-D <sandbox>/data) or a watchdog.
    Linux only; elsewhere there is no /proc and nothing is found."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # the process exited meanwhile
        if any(path in command for path in paths):
            found.append(f"{entry.name}: {command}")
    return found


def assert_cleaned_up(output: str, node_count: int = 3) -> None:
    sandboxes = sorted(set(SANDBOX.findall(output)))
    assert len(sandboxes) == node_count, output
    assert [path for path in sandboxes if Path(path).exists()] == []
    assert processes_mentioning(sandboxes) == []


def conflicts_recorded(output: str) -> int:
    found = re.search(r"(\d+) conflicts recorded", output)
    assert found, output
    return int(found.group(1))


def test_demo_converges_and_shows_its_conflicts() -> None:
    buffer = io.StringIO()
    assert run_demo(seconds=5, node_count=3, console=Console(file=buffer, width=120)), (
        buffer.getvalue()
    )
    output = buffer.getvalue()
    assert "all 3 nodes identical" in output
    assert conflicts_recorded(output) > 0
    assert_cleaned_up(output)


def test_demo_command_exits_zero_and_cleans_up() -> None:
    result = subprocess.run(
        [*DEMO_COMMAND, "--seconds", "5"], capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all 3 nodes identical" in result.stdout
    assert conflicts_recorded(result.stdout) > 0
    assert_cleaned_up(result.stdout)


def test_demo_interrupted_with_ctrl_c_cleans_up() -> None:
    process = subprocess.Popen(
        [*DEMO_COMMAND, "--seconds", "60"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    lines = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("running a shop workload"):
                break
        assert lines and lines[-1].startswith("running a shop workload"), "".join(lines)
        time.sleep(2)
        process.send_signal(signal.SIGINT)
        rest, errors = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    output = "".join(lines) + rest
    assert process.returncode == 130, output + errors
    assert "interrupted" in errors
    assert_cleaned_up(output)


@pytest.mark.parametrize("node_count", [1, 11])
def test_demo_refuses_a_node_count_it_cannot_run(node_count: int) -> None:
    with pytest.raises(PgconcordError, match="2 to 10 nodes"):
        run_demo(seconds=5, node_count=node_count, console=Console(file=io.StringIO()))


def _record(
    node: str, resolution: str, local: tuple[str, str], incoming: tuple[str, str], key: str
) -> dict[str, Any]:
    """A conflict as pgconcord.conflict.recorded_conflicts returns it (customers table)."""

    def version(origin: str, city: str, clock: int) -> dict[str, Any]:
        row = {"id": key, "city": city, "name": "Ada Keller", "updated_at": f"t{clock}"}
        return {"clock": clock, "origin": origin, "row": row}

    return {
        "node": node,
        "table": "public.customers",
        "key": {"id": key},
        "type": "update_origin_differs",
        "resolution": resolution,
        "local": version(*local, 1_000_000),
        "incoming": {**version(*incoming, 1_000_800), "operation": "update"},
    }


def test_examples_are_the_deliberate_conflicts_with_both_versions() -> None:
    rounds = [
        ConflictRound(1, 1.0, "customers", "cust-003", {"north": "Lyon", "south": "Graz"}),
    ]
    ordinary = _record("north", "incoming", ("north", "Lyon"), ("east", "Porto"), "cust-003")
    other_row = _record("north", "incoming", ("north", "Lyon"), ("south", "Graz"), "cust-004")
    deliberate = _record("north", "incoming", ("north", "Lyon"), ("south", "Graz"), "cust-003")
    same_row_elsewhere = _record("south", "local", ("south", "Graz"), ("north", "Lyon"), "cust-003")

    examples = _pick_examples([ordinary, other_row, deliberate, same_row_elsewhere], rounds)

    assert examples == [deliberate]
    buffer = io.StringIO()
    Console(file=buffer, width=100).print(_example(deliberate))
    shown = buffer.getvalue()
    assert "cust-003" in shown and "0.8 ms apart" in shown
    assert re.search(r"local\s+.\s+north\s+.\s+Lyon\s+.\s+discarded", shown), shown
    assert re.search(r"incoming\s+.\s+south\s+.\s+Graz\s+.\s+kept", shown), shown
    # Only the columns that differ, and not the timestamp every concurrent write changes.
    assert "Ada Keller" not in shown and "updated_at" not in shown
