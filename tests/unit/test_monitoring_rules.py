"""monitoring/: promtool checks of the config and rules, the rules' own unit tests, and the
Grafana dashboard, all held against the metric names medattn.serving.metrics really defines.

promtool comes from Debian's ``prometheus`` package. Without it these tests skip locally and
fail under CI=true, so CI cannot pass without running them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from medattn.serving import metrics

REPO = Path(__file__).resolve().parents[2]
MONITORING = REPO / "monitoring"
CONFIG = MONITORING / "prometheus.yml"
RULES = MONITORING / "rules" / "medattn.rules.yml"
RULE_TESTS = MONITORING / "tests" / "medattn.rules.test.yml"
DASHBOARD = MONITORING / "grafana" / "medattn-dashboard.json"

PROMQL_KEYWORDS = {"and", "or", "unless", "offset", "bool", "by", "without", "on", "ignoring",
                   "group_left", "group_right", "inf", "nan"}
PROMETHEUS_BUILTINS = {"up", "ALERTS"}


def _promtool() -> str:
    found = shutil.which("promtool")
    if found:
        return found
    if os.environ.get("CI", "").lower() in {"true", "1", "yes"}:
        pytest.fail("promtool not found: install Debian's `prometheus` package (apt-get install prometheus)")
    pytest.skip("promtool not installed (Debian package `prometheus`); under CI=true this fails")


def _run_promtool(*args: str) -> None:
    done = subprocess.run([_promtool(), *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"promtool {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"


def test_prometheus_config_is_valid():
    _run_promtool("check", "config", str(CONFIG))


def test_rules_are_valid():
    _run_promtool("check", "rules", str(RULES))


def test_rule_unit_tests_pass():
    _run_promtool("test", "rules", str(RULE_TESTS))


# --- static checks (no promtool needed) --------------------------------------------------------

def _rules() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def _alerts() -> list[dict]:
    return [rule for rule in _rules() if "alert" in rule]


def test_config_scrapes_the_service_and_loads_the_rules():
    config = yaml.safe_load(CONFIG.read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "medattn"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job["static_configs"][0]["targets"] == ["localhost:3000"]
    assert [(CONFIG.parent / f).resolve() for f in config["rule_files"]] == [RULES.resolve()]


def test_every_alert_has_a_severity_and_summary_and_description():
    alerts = _alerts()
    assert len(alerts) >= 6
    for alert in alerts:
        assert alert["labels"]["severity"] in {"critical", "warning"}, alert["alert"]
        assert alert["annotations"]["summary"] and alert["annotations"]["description"], alert["alert"]


def test_every_alert_has_a_firing_and_a_silent_promtool_test():
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    checks = [c for t in tests for c in t.get("alert_rule_test", [])]
    for name in (a["alert"] for a in _alerts()):
        outcomes = {bool(c.get("exp_alerts")) for c in checks if c["alertname"] == name}
        assert outcomes == {True, False}, f"{name}: needs a test where it fires and one where it does not"


def promql_metric_names(expr: str) -> set[str]:
    """Metric (and recording-rule) names a PromQL expression selects."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # label values
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    names = set()
    for match in re.finditer(r"(?<![\w.$])[A-Za-z_:][\w:]*", expr):
        following = expr[match.end():].lstrip()
        if match.group() not in PROMQL_KEYWORDS and not following.startswith("("):
            names.add(match.group())
    return names


def test_promql_metric_names_parses_selectors_functions_and_clauses():
    expr = ('histogram_quantile(0.99, sum by (job, le) (rate(a_bucket{job="x", e=~"/(b|c)"}[5m])))'
            " / on (job) group_left b:rule:ratio offset 1h > 1e-3 and c")
    assert promql_metric_names(expr) == {"a_bucket", "b:rule:ratio", "c"}


def _defined_names() -> set[str]:
    """Every series name medattn, BentoML, Prometheus and our recording rules export."""
    names = set(PROMETHEUS_BUILTINS)
    registry = CollectorRegistry()
    metrics.ServingMetrics(registry=registry)
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}
    for family in registry.collect():
        names.update(family.name + s for s in suffixes[family.type])
    duration = metrics.BENTOML_REQUEST_DURATION
    names.update({metrics.BENTOML_REQUEST_TOTAL, metrics.BENTOML_REQUEST_IN_PROGRESS,
                  duration + "_bucket", duration + "_sum", duration + "_count"})
    names.update(rule["record"] for rule in _rules() if "record" in rule)
    return names


def test_rules_select_only_metrics_that_exist():
    defined = _defined_names()
    for rule in _rules():
        unknown = promql_metric_names(rule["expr"]) - defined
        assert not unknown, f"{rule.get('alert') or rule.get('record')}: unknown metrics {unknown}"


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def test_dashboard_is_a_well_formed_grafana_dashboard():
    dash = _dashboard()
    assert dash["uid"] and dash["title"] and isinstance(dash["schemaVersion"], int)
    assert any(v["type"] == "datasource" and v["query"] == "prometheus" for v in dash["templating"]["list"])
    panels = dash["panels"]
    assert len({p["id"] for p in panels}) == len(panels), "panel ids must be unique"
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["w"] > 0 and grid["h"] > 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        area = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"])
                for y in range(grid["y"], grid["y"] + grid["h"])}
        assert not cells & area, f"panel {panel['title']!r} overlaps another"
        cells |= area
        if panel["type"] == "row":
            continue
        assert panel["title"] and panel["targets"], panel
        for target in panel["targets"]:
            assert target["expr"].strip() and target["refId"]
            assert target["datasource"]["uid"] == "${datasource}"


def test_dashboard_shows_only_metrics_that_exist_and_every_medattn_metric():
    defined = _defined_names()
    exprs = [t["expr"] for p in _dashboard()["panels"] for t in p.get("targets", [])]
    used = set().union(*(promql_metric_names(e) for e in exprs))
    assert not used - defined, f"dashboard selects unknown metrics {used - defined}"
    registry = CollectorRegistry()
    metrics.ServingMetrics(registry=registry)
    for family in registry.collect():
        shown = any(name.startswith(family.name) for name in used) or any(family.name in e for e in exprs)
        assert shown, f"{family.name} is not on the dashboard"
