"""The web console, as a person sees it in a real browser (Debian's chromium, driven by
Playwright) served by a real `pgconcord run --http` agent over a real two-node cluster: the
node names, an applied count that moves as the application writes, a conflict with both
versions of its row, a parked change that goes away after "Discard", the 401 page without
the token, and a plain message once the agent is gone. A screenshot is kept in
test-artifacts/."""

from __future__ import annotations

import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import _shared, available_postgres_binaries
from harness import Cluster, wait_for
from playwright.sync_api import BrowserContext, Page, expect, sync_playwright

from pgconcord.sandbox import Server

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
# Headless as root, with nothing that reaches beyond this machine (Chromium otherwise calls
# home for updates, sync and field trials).
CHROMIUM_ARGUMENTS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCHEMA = """
CREATE TABLE items (id int PRIMARY KEY, note text);
CREATE TABLE stock (id int PRIMARY KEY, item text, quantity int);
"""
# A constraint only south has: made there alone, not replicated (as in test_parking).
BY_HAND = "SET session_replication_role = replica; "
WRITES = 120


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def answers(url: str) -> int | None:
    """The HTTP status of a GET, or None while nothing listens."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            status: int = response.status
            return status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return None


class Agent:
    """`pgconcord run --http` as a subprocess with the token in its environment; its log in a
    file, read when something goes wrong."""

    def __init__(self, cluster: Cluster, port: int, token: str, log: Path) -> None:
        self.log = log
        self.base = f"http://127.0.0.1:{port}"
        with log.open("ab") as output:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "pgconcord",
                    "run",
                    "--http",
                    f"127.0.0.1:{port}",
                    "--config",
                    str(cluster.config_path),
                ],
                env={**os.environ, "PGCONCORD_TOKEN": token},
                stdout=subprocess.DEVNULL,
                stderr=output,
            )

    def wait_until_serving(self) -> None:
        def healthy() -> bool:
            assert self.process.poll() is None, f"the agent exited:\n{self.log.read_text()[-3000:]}"
            return answers(f"{self.base}/health") == 200

        wait_for(healthy, timeout=30, message="the agent's /health")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture
def cluster(server_pool: dict[str, list[Server]], tmp_path: Path) -> Iterator[Cluster]:
    """Two nodes on the shared servers of the first available PostgreSQL."""
    servers = _shared(server_pool, available_postgres_binaries()[0])[:2]
    created = Cluster(servers, tmp_path, SCHEMA)
    yield created
    created.drop()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[BrowserContext]:
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),  # a fresh profile for every run
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGUMENTS,
            viewport={"width": 1280, "height": 900},
        )
        try:
            yield context
        finally:
            context.close()


def figure(page: Page, selector: str, *, seconds: bool = False) -> float:
    """The figure the page shows there: a count (thousands separators and all), or with
    seconds=True a duration in seconds ("0.4 s", "75 s", "2 min"); -1 when it shows none."""
    locator = page.locator(selector)
    if locator.count() != 1:
        return -1
    text = locator.inner_text().replace(",", "").strip()
    if seconds:
        match = re.fullmatch(r"([\d.]+) (s|min|h)", text)
        if match is None:
            return -1
        return float(match.group(1)) * {"s": 1, "min": 60, "h": 3600}[match.group(2)]
    return float(text) if re.fullmatch(r"\d+", text) else -1


def screenshot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    # The folder keeps itself out of git: artifacts are for looking at, not for committing.
    (ARTIFACTS / ".gitignore").write_text("*\n")
    page.screenshot(path=str(ARTIFACTS / name), full_page=True)


def test_the_console_shows_the_cluster_live_and_discards_a_parked_change(
    cluster: Cluster, browser: BrowserContext, tmp_path: Path
) -> None:
    cluster.setup()
    # A conflict: the same key inserted on both nodes before they ever exchanged changes.
    cluster.execute("north", "INSERT INTO items VALUES (1, 'written at north')")
    cluster.execute("south", "INSERT INTO items VALUES (1, 'written at south')")
    # A parked change: south alone refuses negative quantities.
    cluster.admin_execute(
        "south", BY_HAND + "ALTER TABLE stock ADD CONSTRAINT no_negative CHECK (quantity >= 0)"
    )
    cluster.execute("north", "INSERT INTO stock VALUES (7, 'pen', -5)")
    cluster.execute("north", "INSERT INTO stock VALUES (8, 'cup', -1)")
    token = secrets.token_urlsafe(24)
    port = free_port()
    agent = Agent(cluster, port, token, tmp_path / "agent.log")
    try:
        agent.wait_until_serving()
        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))

        # Without the token: the agent's 401 page, which says what to do.
        refused = page.goto(f"{agent.base}/")
        assert refused is not None and refused.status == 401
        expect(page.locator("body")).to_contain_text(re.compile("token", re.I))

        # With it once: the console, and from then on the cookie.
        page.goto(f"{agent.base}/?token={token}")
        expect(page.get_by_role("heading", level=1)).to_contain_text("pgconcord")
        for name in cluster.names:
            expect(page.get_by_role("columnheader", name=name, exact=True)).to_be_visible(
                timeout=15_000
            )
            expect(page.locator(f'#nodes tr[data-node="{name}"]')).to_contain_text("yes")
        assert token not in page.url

        # The matrix's figures for north -> south move as the application writes at north:
        # held back at south (a lock the apply waits for), the changes show as pending and
        # their lag grows; let go, they are applied and the pair is "ok" again.
        cell = 'td[data-origin="north"][data-target="south"]'
        expect(page.locator(f"{cell} .word")).to_have_text("ok", timeout=15_000)
        before = figure(page, f"{cell} .applied")
        assert before >= 0
        with cluster.admin_connect("south", autocommit=False) as blocker:
            blocker.execute("LOCK TABLE items IN ACCESS EXCLUSIVE MODE")
            with cluster.connect("north") as connection:
                for number in range(WRITES):
                    connection.execute(
                        "INSERT INTO items VALUES (%s, %s)", (100 + number, f"row {number}")
                    )
            wait_for(
                lambda: figure(page, f"{cell} .pending") == WRITES,
                timeout=15,
                message=f"the matrix to show {WRITES} changes pending for south",
            )
            held = figure(page, f"{cell} .lag", seconds=True)
            wait_for(
                lambda: figure(page, f"{cell} .lag", seconds=True) > held,
                timeout=15,
                message="the lag shown to grow while south is held back",
            )
            screenshot(page, "console-held-back.png")
            blocker.rollback()
        wait_for(
            lambda: (
                figure(page, f"{cell} .applied") >= before + WRITES
                and figure(page, f"{cell} .pending") == 0
            ),
            timeout=20,
            message=f"the matrix to show {WRITES} more changes applied to south, none pending",
        )
        expect(page.locator(f"{cell} .word")).to_have_text("ok", timeout=15_000)
        assert cluster.value("south", "SELECT count(*) FROM items") == WRITES + 1

        # The conflict, with both versions of the row side by side (each node records it).
        recorded = [r for r in cluster.conflicts() if r["kind"] == "conflict"]
        assert recorded
        conflicts = page.locator("article.conflict")
        expect(conflicts).to_have_count(len(recorded), timeout=15_000)
        expect(conflicts.first).to_contain_text("public.items")
        expect(conflicts.first).to_contain_text("written at north")
        expect(conflicts.first).to_contain_text("written at south")
        expect(conflicts.first.locator("table.versions thead th")).to_have_count(3)

        # The last hour: a chart of each pair, drawn once the agent has samples.
        lag_chart = page.locator("figure.chart-box", has_text="Lag")
        expect(lag_chart).to_contain_text("north → south", timeout=20_000)
        expect(lag_chart.locator("svg polyline, svg circle").first).to_be_attached()
        expect(
            page.locator("figure.chart-box", has_text="Applied changes per second")
        ).to_be_visible()

        # The parked changes, with their reason; "Discard" asks once more, then it is gone.
        pen = page.locator("article.parked", has_text='{"id":7}')
        cup = page.locator("article.parked", has_text='{"id":8}')
        expect(pen).to_contain_text("no_negative", timeout=15_000)
        expect(pen).to_contain_text("-5")
        expect(cup).to_contain_text("no_negative")
        screenshot(page, "console.png")
        pen.get_by_role("button", name="Discard", exact=True).click()
        pen.get_by_role("button", name="Yes, discard").click()
        expect(page.locator("#action-result")).to_contain_text("discarded", timeout=15_000)
        expect(pen).to_have_count(0, timeout=15_000)
        expect(page.locator("article.parked")).to_have_count(1)
        # "Retry" once the cause is fixed: applied, and gone from the list.
        cluster.admin_execute("south", BY_HAND + "ALTER TABLE stock DROP CONSTRAINT no_negative")
        cup.get_by_role("button", name="Retry", exact=True).click()
        expect(page.locator("#action-result")).to_contain_text("retried", timeout=15_000)
        expect(page.locator("article.parked")).to_have_count(0, timeout=15_000)
        expect(page.locator("#parked")).to_contain_text("None: every change was applied")
        assert cluster.admin_query(
            "south", "SELECT row_key->>'id', state FROM pgconcord.parked_change ORDER BY id"
        ) == [("7", "discarded"), ("8", "retried")]
        assert cluster.query("south", "SELECT id, quantity FROM stock") == [(8, -1)]
        expect(conflicts).to_have_count(len(recorded))
        expect(page.locator('#nodes tr[data-node="south"] .parked-count')).to_have_text("0")
        screenshot(page, "console-after-discard.png")

        # The agent gone: a plain message instead of figures that no longer move.
        agent.stop()
        expect(page.get_by_role("alert")).to_contain_text("does not answer", timeout=15_000)
        expect(page.locator("#matrix")).to_be_hidden()
        screenshot(page, "console-agent-gone.png")
        # Back again at the same address: the figures return in the same page, no reload.
        agent = Agent(cluster, port, token, tmp_path / "agent.log")
        agent.wait_until_serving()
        expect(page.get_by_role("alert")).to_be_hidden(timeout=15_000)
        expect(page.locator("#verdict")).to_contain_text("Healthy", timeout=15_000)
        expect(page.locator(f"{cell} .word")).to_have_text("ok")
        assert not errors, errors
    finally:
        agent.stop()
