"""deploy/base/alerts.yaml: the PrometheusRule renders with the monitors, each alert carries what an operator needs,
``promtool check rules`` passes on its groups, the cases of ``fixtures/alerts/alert-tests.yaml`` pass under
``promtool test rules`` (each alert fires where it should and stays silent on healthy series), and every metric an
expression reads is one the docs tables list, so renaming a metric breaks this test rather than the alert.

promtool is Debian's ``prometheus`` package; without it the promtool tests skip, unless ``MAAS_REQUIRE_PROMTOOL``
is set (CI), where they fail.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.tools import promtool
from tests.test_deploy_manifests import _missing, crd_errors, crds_dir, render
from tests.test_metrics_docs import DOCS, SUFFIXES, documented

CASES = Path(__file__).parent / "fixtures" / "alerts" / "alert-tests.yaml"
SEVERITIES = {"critical", "warning"}
TARGET_LABELS = {"namespace", "pod"}
"""What prometheus-operator puts on every scraped series; the alerts join and group on them."""

# PromQL words that are not metric names: keywords and the label lists of grouping and matching modifiers.
KEYWORDS = {"and", "or", "unless", "offset", "bool", "inf", "nan"}
MODIFIERS = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")


def prometheus_rule(path: str = "base") -> dict[str, Any]:
    (rule,) = [o for o in render(path) if o["kind"] == "PrometheusRule"]
    return rule


def alerting_rules() -> list[dict[str, Any]]:
    return [r for group in prometheus_rule()["spec"]["groups"] for r in group["rules"]]


def write_rules(directory: Path, *, annotations: bool) -> Path:
    """The rule groups of the rendered PrometheusRule as a Prometheus rules file."""
    groups = prometheus_rule()["spec"]["groups"]
    if not annotations:
        groups = [
            {**g, "rules": [{k: v for k, v in r.items() if k != "annotations"} for r in g["rules"]]} for g in groups
        ]
    path = directory / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    return path


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: identifiers outside strings, selectors, ranges and modifier label
    lists that are neither keywords nor called as functions."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    text = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", text)
    text = MODIFIERS.sub("", text)
    names = set()
    for match in re.finditer(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?", text):
        name, call = match.groups()
        if not call and name.lower() not in KEYWORDS and not re.fullmatch(r"\d+[smhdwy]", name):
            names.add(name)
    return names


def documented_metrics() -> dict[str, tuple[str, ...]]:
    """Every documented series name (histograms with their suffixes) -> its label names."""
    out: dict[str, tuple[str, ...]] = {}
    for process in DOCS:
        for name, (kind, labels) in documented(process).items():
            out[name] = labels
            if kind == "histogram":
                out.update({name + s: (*labels, "le") if s == "_bucket" else labels for s in SUFFIXES[:3]})
    return out


# --- the object ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["base", "overlays/sidecar", "overlays/external-redis"])
def test_the_rule_is_built_with_the_monitors(path: str) -> None:
    objs = render(path)
    assert [o["metadata"]["name"] for o in objs if o["kind"] == "PrometheusRule"] == ["maas-gateway"]
    assert any(o["kind"] == "ServiceMonitor" for o in objs)


def test_the_rule_schema_catches_a_typo() -> None:
    """``../shared/crds`` has no PrometheusRule: tests/test_deploy_manifests.py validates it against our own schema
    (``fixtures/schemas``), written from the Prometheus Operator's CRD."""
    if crds_dir() is None:
        _missing("../shared/crds not found (set MAAS_CRDS_DIR): custom kinds not validated")
    rule = copy.deepcopy(prometheus_rule())
    assert not crd_errors(rule)
    first = rule["spec"]["groups"][0]["rules"][0]
    first["annotation"] = first.pop("annotations")
    assert any("annotation" in e for e in crd_errors(rule))


def test_every_alert_says_what_is_wrong_and_what_to_do() -> None:
    rules = alerting_rules()
    names = [r.get("alert") for r in rules]
    assert len(rules) >= 15 and all(names) and len(set(names)) == len(names), names
    for rule in rules:
        name = rule["alert"]
        assert re.fullmatch(r"Maas[A-Z][A-Za-z]+", name), name
        assert set(rule) == {"alert", "expr", "for", "labels", "annotations"}, name
        assert rule["labels"].get("severity") in SEVERITIES, name
        assert set(rule["annotations"]) == {"summary", "description"}, name
        assert "\n" not in rule["annotations"]["summary"], name
        assert len(rule["annotations"]["description"]) > 100, name


def test_alerts_cover_what_a_platform_team_runs_into() -> None:
    """The failures of the brief each have their alert, on the metric that shows them."""
    exprs = {r["alert"]: r["expr"] for r in alerting_rules()}
    wanted = {
        "MaasAuthzStoreDown": "maas_store_up",
        "MaasAuthzChecksFailingOnStore": "maas_authz_store_policy_total",
        "MaasAuthzSnapshotNotLoaded": "maas_snapshot_records",
        "MaasMeterLedgerBacklogNotDraining": "maas_meter_ledger_backlog_rows",
        "MaasMeterLedgerRowsDropped": 'maas_meter_store_errors_total{operation="ledger"}',
        "MaasClockOffsetToRedis": "maas_meter_clock_offset_seconds",
        "MaasMeterStaleIdentity": 'maas_meter_rejected_total{reason="stale_identity"}',
        "MaasAuthzConnectionsRefused": "maas_authz_client_connections_refused_total",
        "MaasMeterConnectionsRefused": "maas_meter_client_connections_refused_total",
        "MaasMeterUpstreamBusy": 'maas_meter_rejected_total{reason="upstream_busy"}',
        "MaasMeterUpstreamQueueing": "maas_meter_upstream_queued_requests",
        "MaasControlPlaneNoLeader": "maas_controlplane_leader",
        "MaasControlPlaneNotSyncing": "maas_controlplane_last_full_sync_timestamp_seconds",
        "MaasControlPlaneWarningEventsLost": "maas_controlplane_warning_events_total",
    }
    for alert, metric in wanted.items():
        assert metric in exprs.get(alert, ""), alert
    for gauge in ("authz", "meter", "controlplane"):
        assert f"abs(maas_{gauge}_clock_offset_seconds) > 10" in exprs["MaasClockOffsetToRedis"]


# --- metric names ----------------------------------------------------------------------------------------------


def test_metric_names_reads_only_metrics() -> None:
    expr = (
        'sum by (namespace, pod) (rate(maas_meter_rejected_total{reason="upstream_busy"}[5m])) > 0 or '
        "time() - maas_x offset 5m > 900 and on (namespace) group_left () absent(maas_y) < bool 1e3"
    )
    assert metric_names(expr) == {"maas_meter_rejected_total", "maas_x", "maas_y"}


def test_every_metric_an_alert_reads_is_documented() -> None:
    """A metric renamed in the code fails tests/test_metrics_docs.py until its docs row follows; this holds the
    alerts to the same rows."""
    docs = documented_metrics()
    for rule in alerting_rules():
        names = metric_names(rule["expr"])
        assert names, rule["alert"]
        for name in names:
            assert name in docs, f"{rule['alert']}: {name} is in no docs metrics table"
        for name, selector in re.findall(r"([a-z_:][a-z0-9_:]*)\{([^}]*)\}", rule["expr"]):
            for label in re.findall(r"([a-z_]+)\s*(?:=~|!~|!=|=)", selector):
                assert label in docs[name], f"{rule['alert']}: {name} has no label {label}"
        for labels in re.findall(MODIFIERS, rule["expr"]):
            for label in re.findall(r"[a-z_]+", labels.split("(", 1)[1]):
                assert label in TARGET_LABELS, f"{rule['alert']}: groups or joins on {label}"


# --- promtool --------------------------------------------------------------------------------------------------


def test_promtool_check_rules(tmp_path: Path) -> None:
    binary = promtool()
    rules = write_rules(tmp_path, annotations=True)
    result = subprocess.run([binary, "check", "rules", str(rules)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alerting_rules())} rules found" in result.stdout


def test_every_alert_has_a_firing_and_a_silent_case() -> None:
    cases: dict[str, set[bool]] = {}
    for test in yaml.safe_load(CASES.read_text())["tests"]:
        for case in test["alert_rule_test"]:
            cases.setdefault(case["alertname"], set()).add(bool(case.get("exp_alerts")))
    for rule in alerting_rules():
        assert cases.get(rule["alert"]) == {True, False}, rule["alert"]
    assert set(cases) == {r["alert"] for r in alerting_rules()}


def test_promtool_test_rules(tmp_path: Path) -> None:
    binary = promtool()
    write_rules(tmp_path, annotations=False)
    shutil.copy(CASES, tmp_path / CASES.name)
    result = subprocess.run(
        [binary, "test", "rules", CASES.name], capture_output=True, text=True, cwd=tmp_path, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
