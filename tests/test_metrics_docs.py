"""The metric tables of docs/authz.md, docs/meter.md and docs/controlplane.md against what each process exposes on
its ops port (the registry it serves, scraped): every metric exposed is documented with its type and label names,
every documented metric exists, and every metric (and label) the README, the docs and deploy/ refer to exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from controlplane.metrics import Metrics
from gateway.authz.metrics import AuthzMetrics
from gateway.meter.metrics import MeterMetrics
from gateway.sim.server import SimMetrics

ROOT = Path(__file__).resolve().parent.parent
DOCS = {"authz": ROOT / "docs/authz.md", "meter": ROOT / "docs/meter.md", "controlplane": ROOT / "docs/controlplane.md"}
SUFFIXES = ("_bucket", "_count", "_sum", "_created")


def registry(process: str) -> CollectorRegistry:
    """The registry each process serves on its ops port (gateway/authz/main.py, gateway/meter/app.py,
    controlplane/runner.py)."""
    if process == "authz":
        return AuthzMetrics(max_keys=10).registry
    if process == "meter":
        return MeterMetrics(max_keys=10).registry
    if process == "sim":
        return SimMetrics(("m",)).registry  # maas sim: vLLM's names (docs/meter.md lists them in prose)
    return Metrics().registry


def exposed(process: str) -> dict[str, tuple[str, tuple[str, ...]]]:
    """name (as queried: counters with ``_total``) -> (type, label names), from a scrape of the registry, the label
    names from its collectors (a labelled metric without children yet shows no sample to read them from)."""
    reg = registry(process)
    labels: dict[str, tuple[str, ...]] = {}
    for collector in reg._collector_to_names:  # the label names: a scrape shows none without samples
        for name in reg._collector_to_names[collector]:
            labels[name] = tuple(getattr(collector, "_labelnames", ()))
    out: dict[str, tuple[str, tuple[str, ...]]] = {}
    names = set(labels)
    for family in text_string_to_metric_families(generate_latest(reg).decode()):
        if family.name.endswith("_created") and family.name.removesuffix("_created") in {
            n.removesuffix("_total") for n in names
        }:
            continue  # prometheus_client's creation timestamps of counters and histograms
        name = family.name + "_total" if family.type == "counter" else family.name
        out[name] = (family.type, labels.get(name, labels.get(family.name, ())))
    return out


def documented(process: str) -> dict[str, tuple[str, tuple[str, ...]]]:
    """name -> (type, label names) from the ``| metric | type | labels | meaning |`` table: label names are the
    backticked words of the labels cell outside parentheses (values are listed in parentheses)."""
    text = DOCS[process].read_text()
    header = "| metric | type | labels | meaning |"
    assert header in text, f"{DOCS[process].name} has no metric table"
    out: dict[str, tuple[str, tuple[str, ...]]] = {}
    for line in text.split(header, 1)[1].splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split(" | ")]
        name = cells[0].strip("`")
        cell = cells[2]
        while re.search(r"\([^()]*\)", cell):
            cell = re.sub(r"\([^()]*\)", "", cell)
        assert name not in out, f"{name} is in {DOCS[process].name} twice"
        out[name] = (cells[1], tuple(re.findall(r"`([a-z_]+)`", cell)))
    return out


@pytest.mark.parametrize("process", sorted(DOCS))
def test_every_exposed_metric_is_documented_and_every_documented_one_exists(process: str) -> None:
    live, docs = exposed(process), documented(process)
    assert sorted(set(live) - set(docs)) == [], f"exposed by {process} but not in {DOCS[process].name}"
    assert sorted(set(docs) - set(live)) == [], f"in {DOCS[process].name} but not exposed by {process}"
    for name, (kind, labels) in live.items():
        assert docs[name][0] == kind, f"{name}: documented as {docs[name][0]}, exposed as {kind}"
        assert sorted(docs[name][1]) == sorted(labels), f"{name}: documented labels {docs[name][1]}, exposed {labels}"


def _all_exposed() -> dict[str, tuple[str, ...]]:
    """Every series name any process exposes (histograms with their suffixes) -> its label names."""
    names: dict[str, tuple[str, ...]] = {}
    for process in [*DOCS, "sim"]:
        for name, (kind, labels) in exposed(process).items():
            names[name] = labels
            if kind == "histogram":
                for suffix in ("_bucket", "_count", "_sum"):
                    names[name + suffix] = (*labels, "le") if suffix == "_bucket" else labels
    return names


def _texts() -> dict[str, str]:
    files = [ROOT / "README.md", *DOCS.values(), *sorted((ROOT / "deploy").rglob("*.yaml")), ROOT / "deploy/README.md"]
    return {str(f.relative_to(ROOT)): f.read_text() for f in files}


def test_every_metric_and_label_referred_to_exists() -> None:
    """The names in the README's metric table, the troubleshooting tables and any query in deploy/: a typo or a
    renamed metric there sends an operator (or an alert) to a series that never comes."""
    names = _all_exposed()
    label_names = {label for labels in names.values() for label in labels}
    prefixes = {"maas_controlplane_", "maas_meter_"}
    missing: list[str] = []
    for path, text in _texts().items():
        for match in re.finditer(r"\b((?:maas|gen_ai)_[a-z0-9_]*)(\*)?(\{[^}]*\})?", text):
            name, star, selector = match.groups()
            if name in label_names and not selector:
                continue  # a label name (gen_ai_request_model), not a metric
            if star:
                if name not in prefixes:
                    missing.append(f"{path}: {name}*")
                continue
            if name not in names:
                missing.append(f"{path}: {name}")
                continue
            for label in re.findall(r"([a-z_]+)\s*(?:=~|!~|!=|=)", selector or ""):
                if label not in names[name]:
                    missing.append(f"{path}: {name} has no label {label}")
    assert missing == []


def test_controlplane_failure_counters_exist_at_zero_from_the_start() -> None:
    """``increase(maas_controlplane_warning_events_total{result="dropped"}[5m])`` and the watch restarts of a
    stream: a series that appears only with its first increment is never seen to increase by that one."""
    import asyncio

    from controlplane.kinds import SECRET
    from controlplane.reflector import Reflector

    metrics = Metrics()

    async def make() -> None:
        stream = type("S", (), {"kind": SECRET})()
        Reflector(source=None, stream=stream, on_change=lambda *a: None, metrics=metrics)  # type: ignore[arg-type]

    asyncio.run(make())
    text = generate_latest(metrics.registry).decode()
    for result in ("sent", "failed", "dropped"):
        assert f'maas_controlplane_warning_events_total{{result="{result}"}} 0.0' in text
    for reason in ("timeout", "gone", "error", "not_found"):
        assert f'maas_controlplane_watch_restarts_total{{kind="Secret",reason="{reason}"}} 0.0' in text


def test_the_meters_alerted_refusals_exist_at_zero_from_the_start() -> None:
    """``increase(maas_meter_rejected_total{reason="stale_identity"}[5m])``: the series appeared with the first
    refusal, so the alert never saw that one."""
    text = generate_latest(MeterMetrics(max_keys=10).registry).decode()
    for reason in ("stale_identity", "upstream_busy", "store_unavailable"):
        assert f'maas_meter_rejected_total{{reason="{reason}"}} 0.0' in text
