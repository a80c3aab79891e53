"""The shipped alert rules and Grafana dashboard work against the metrics backupd exposes."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.test_metrics import populated

CONFIG = Path(__file__).resolve().parent.parent / "config"
RULES = CONFIG / "prometheus-rules.yml"
RULE_TESTS = CONFIG / "prometheus-rules.test.yml"
DASHBOARD = CONFIG / "grafana-dashboard.json"
METRIC_NAME = re.compile(r"\b(?:backupd|process)_[a-z0-9_]+")

needs_promtool = pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool (from the Prometheus distribution) is not installed",
)


def exposed_names() -> set[str]:
    """Every sample name a scrape of a fully used Metrics object returns."""
    return {
        line.split("{")[0].split(" ")[0]
        for line in populated().exposition().decode().splitlines()
        if line and not line.startswith("#")
    }


def promtool(*args: str) -> str:
    proc = subprocess.run(
        ["promtool", *args], cwd=CONFIG, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@needs_promtool
def test_rules_are_valid() -> None:
    assert "SUCCESS: 7 rules found" in promtool("check", "rules", RULES.name)


@needs_promtool
def test_rules_fire_and_stay_quiet_as_their_unit_tests_expect() -> None:
    assert "SUCCESS" in promtool("test", "rules", RULE_TESTS.name)


def test_every_alert_has_unit_tests_for_firing_and_not_firing() -> None:
    alerts = set(re.findall(r"- alert: (\w+)", RULES.read_text()))
    tests = RULE_TESTS.read_text()
    for alert in alerts:
        blocks = re.findall(
            rf"alertname: {alert}\n\s+exp_alerts:(.*?)(?=\n\s+- eval_time|\Z)", tests, re.S
        )
        assert any(b.strip().startswith("[]") for b in blocks), f"{alert}: no not-firing test"
        assert any("exp_labels" in b for b in blocks), f"{alert}: no firing test"


def test_rules_use_only_exposed_metrics() -> None:
    used = set(METRIC_NAME.findall(RULES.read_text()))
    assert used, "no metric found in the rules"
    assert used <= exposed_names(), used - exposed_names()


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def test_dashboard_queries_use_only_exposed_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exposed = exposed_names()
    for panel in panels(dashboard):
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            used = set(METRIC_NAME.findall(target["expr"]))
            assert used, f"panel {panel['title']!r} queries no backupd metric"
            assert used <= exposed, f"panel {panel['title']!r}: {used - exposed}"


def test_dashboard_has_the_panels_and_variables_operators_need() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert 36 <= dashboard["schemaVersion"] <= 41
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    job = variables["job"]
    assert job["query"]["query"] == "label_values(backupd_job_runs_total, job)"
    assert job["includeAll"] and job["multi"]

    titles = {p["title"] for p in panels(dashboard)}
    assert {
        "Time since last success",
        "Last backup size",
        "Run duration",
        "Failed runs",
        "Retries",
        "Bytes written per storage",
        "Next run",
        "Running",
    } <= titles
    for panel in panels(dashboard):
        assert panel["datasource"]["uid"] == "${datasource}"
        per_job = METRIC_NAME.findall(" ".join(t["expr"] for t in panel["targets"]))
        if any(name.startswith("backupd_job_") for name in per_job):
            assert all('job=~"$job"' in t["expr"] for t in panel["targets"]), panel["title"]


def test_dashboard_panels_do_not_overlap() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    cells: dict[tuple[int, int], str] = {}
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24, panel["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{panel['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = panel["title"]
