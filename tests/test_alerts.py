"""What deploy/ ships for operators is usable as it is: the Prometheus rule file has the
structure Prometheus loads, every expression (rules and dashboard) parses as PromQL with a
maintained parser (promql-parser, the Rust parser of GreptimeDB's, from PyPI), and names only
metrics that exist: those a real agent's /metrics serves (read from a scrape), and
Prometheus' own `up`; the systemd unit passes `systemd-analyze verify` where systemd is."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import yaml
from harness import Cluster, wait_for

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
# The names DESIGN.md promises (HTTP section): a scrape must have them all.
PROMISED = {
    "pgconcord_lag_seconds",
    "pgconcord_pending_changes",
    "pgconcord_applied_changes_total",
    "pgconcord_conflicts_total",
    "pgconcord_parked_changes",
    "pgconcord_node_up",
}
PROMETHEUS_OWN = {"up"}  # made by Prometheus for every scrape target
RULE_KEYS = {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"}
DURATION = re.compile(r"^(\d+(ms|s|m|h|d|w|y))+$")
# Grafana's variables, replaced as Grafana would before the query reaches Prometheus.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$job": "pgconcord"}


def metric_names(expression: str) -> set[str]:
    """Every metric an expression selects, from its syntax tree (not from a regex over the
    text, which would take label names and functions for metrics)."""
    names: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            if node.name:
                names.add(node.name)
            alternatives = [node.matchers.matchers, *(node.matchers.or_matchers or [])]
            for matchers in alternatives:
                names.update(m.value for m in matchers if m.name == "__name__")
            return
        if isinstance(node, promql_parser.MatrixSelector):
            visit(node.vector_selector)
            return
        for attribute in ("expr", "lhs", "rhs", "param"):
            child = getattr(node, attribute, None)
            if child is not None:
                visit(child)
        for child in getattr(node, "args", None) or []:
            visit(child)

    visit(promql_parser.parse(expression))
    return names


def test_metric_names_come_from_the_syntax_tree() -> None:
    expression = (
        'max by (origin) (rate(a_total{job="x"}[5m])) > on (origin) group_left'
        ' sum(b) * -c or label_replace(d, "x", "$1", "y", "(.*)") unless {__name__="e"}'
        " and max_over_time(f[10m:1m] offset 5m) / abs(g)"
    )
    assert metric_names(expression) == {"a_total", "b", "c", "d", "e", "f", "g"}
    with pytest.raises(ValueError):
        promql_parser.parse("max by (origin) (rate(a_total[5m])")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _scraped_names(text: str) -> set[str]:
    """Metric names in Prometheus' text format: every sample's, and for each counter family
    also its `_total` (a family without samples yet still names its metric)."""
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            names.add(name)
            if kind.strip() == "counter":
                names.add(f"{name}_total")
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


@pytest.fixture(scope="module")
def existing_metrics(
    server_pool: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[set[str]]:
    """The names a real agent serves at /metrics, read from a scrape."""
    from conftest import _shared, available_postgres_binaries

    cluster = Cluster(
        _shared(server_pool, available_postgres_binaries()[0]), tmp_path_factory.mktemp("m")
    )
    try:
        for name in cluster.names:
            cluster.execute(name, "CREATE TABLE items (id int PRIMARY KEY)")
        cluster.setup()
        cluster.execute("north", "INSERT INTO items VALUES (1)")
        port = _free_port()
        log_path = tmp_path_factory.mktemp("agent") / "agent.log"
        with log_path.open("ab") as log_file:
            agent = subprocess.Popen(
                [
                    *(sys.executable, "-m", "pgconcord", "run"),
                    *("--http", f"127.0.0.1:{port}", "--config", str(cluster.config_path)),
                ],
                stdout=subprocess.DEVNULL,
                stderr=log_file,
            )
        try:

            def scrape() -> str | None:
                assert agent.poll() is None, log_path.read_text()[-3000:]
                try:
                    with urllib.request.urlopen(
                        f"http://127.0.0.1:{port}/metrics", timeout=5
                    ) as response:
                        text: str = response.read().decode()
                except OSError:
                    return None
                # Wait for a reading of the cluster, not just the process's own metrics.
                return text if "pgconcord_lag_seconds{" in text else None

            text = wait_for(scrape, timeout=60, message="a scrape with the cluster's metrics")
        finally:
            agent.terminate()
            agent.wait(timeout=30)
        names = _scraped_names(text)
        assert names >= PROMISED, PROMISED - names  # the promise of DESIGN.md holds
        yield names | PROMETHEUS_OWN
    finally:
        cluster.drop()


def _rules() -> list[dict[str, Any]]:
    document = yaml.safe_load((DEPLOY / "alerts.yml").read_text())
    assert isinstance(document, dict) and set(document) == {"groups"}
    rules: list[dict[str, Any]] = []
    group_names = set()
    for group in document["groups"]:
        assert set(group) <= {"name", "interval", "rules", "limit"}, group
        assert group["name"] not in group_names
        group_names.add(group["name"])
        assert isinstance(group["rules"], list) and group["rules"]
        rules.extend(group["rules"])
    return rules


def test_the_alert_rules_are_a_rule_file_prometheus_loads(existing_metrics: set[str]) -> None:
    rules = _rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names)), names
    used: set[str] = set()
    for rule in rules:
        assert set(rule) <= RULE_KEYS and {"alert", "expr"} <= set(rule), rule
        assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", rule["alert"]), rule["alert"]
        assert DURATION.match(str(rule.get("for", "0m"))), rule
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), rule
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule
        expression = rule["expr"]
        assert isinstance(expression, str)
        found = metric_names(expression)
        assert found, rule["alert"]
        unknown = found - existing_metrics
        assert not unknown, f"{rule['alert']} names metrics no agent serves: {unknown}"
        used |= found
    # What the issue asks for, each by its metric: agent down, lag, parked changes, backlog
    # growing, a node evicted.
    assert used >= {
        "up",
        "pgconcord_lag_seconds",
        "pgconcord_parked_changes",
        "pgconcord_pending_changes",
        "pgconcord_node_evicted",
    }
    backlog = next(rule for rule in rules if rule["alert"] == "PgconcordBacklogGrowing")
    assert "deriv(" in backlog["expr"] and "[30m]" in backlog["expr"]


def _dashboard_queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"]
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        text = query.get("query") if isinstance(query, dict) else query
        match = re.fullmatch(r"label_values\((\w+),\s*\w+\)", str(text))
        if match:  # Grafana's own function: the metric it reads must exist
            yield variable["name"], match.group(1)


def test_the_dashboard_loads_and_queries_existing_metrics(existing_metrics: set[str]) -> None:
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    assert dashboard["title"] and dashboard["panels"]
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    used: set[str] = set()
    for title, expression in _dashboard_queries(dashboard):
        for variable, value in GRAFANA_VARIABLES.items():
            expression = expression.replace(variable, value)
        assert "$" not in expression, (title, expression)
        found = metric_names(expression)
        unknown = found - existing_metrics
        assert found and not unknown, f"panel {title!r}: {unknown or 'no metric'}"
        used |= found
    assert used >= PROMISED  # lag, pending, applied, conflicts, parked, node up
    # The lag matrix: origin x target, as a table grouped into a matrix.
    [matrix] = [p for p in dashboard["panels"] if p["title"].startswith("lag seconds")]
    assert matrix["type"] == "table"
    [grouping] = [t for t in matrix["transformations"] if t["id"] == "groupingToMatrix"]
    assert (grouping["options"]["rowField"], grouping["options"]["columnField"]) == (
        "origin",
        "target",
    )
    assert "pgconcord_lag_seconds" in matrix["targets"][0]["expr"]


def test_the_systemd_unit_is_valid(tmp_path: Path) -> None:
    text = (DEPLOY / "pgconcord.service").read_text()
    assert "ExecStart=/usr/local/bin/pgconcord run --config /etc/pgconcord/cluster.toml" in text
    for line in (
        "Restart=on-failure",
        "User=pgconcord",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "EnvironmentFile=-/etc/pgconcord/environment",
    ):
        assert line in text.splitlines(), line
    assert "password=" not in text.lower()
    analyze = shutil.which("systemd-analyze")
    if analyze is None:  # not every machine has systemd: the lines above are the check then
        return
    # Where this machine has the command, so that verify finds ExecStart's program.
    unit = tmp_path / "pgconcord.service"
    unit.write_text(
        text.replace("/usr/local/bin/pgconcord", str(Path(sys.executable).parent / "pgconcord"))
    )
    result = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr
