"""Tier ConfigMaps -> TierRecords, table-tested."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from controlplane import kinds
from controlplane.errors import TranslateError
from controlplane.translate.tiers import merge, parse_limits, parse_mapping
from gateway.contract import DEFAULT_TIERS, Limit, parse_window
from tests.support.desired import desired_over

SEED = Path(__file__).parent / "fixtures" / "seed"
MAPPING: dict[str, Any] = yaml.safe_load((SEED / "tier-to-group-mapping.yaml").read_text())
LIMITS: dict[str, Any] = yaml.safe_load((SEED / "maas-tier-limits.yaml").read_text())


def _cm(key: str, text: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x", "namespace": "llm"}, "data": {key: text}}


def test_seed_mapping_and_limits_equal_the_builtin_limits() -> None:
    tiers = merge(parse_mapping(MAPPING), parse_limits(LIMITS))
    assert [(t.name, t.level, t.groups) for t in tiers] == [
        ("free", 0, ("free", "system:authenticated")),
        ("premium", 1, ("premium",)),
        ("enterprise", 2, ("enterprise", "admin")),
    ]
    assert [t.limits for t in tiers] == [t.limits for t in DEFAULT_TIERS]
    assert tiers[2].display_name == "Enterprise Tier"


@pytest.mark.parametrize(
    ("mapping", "limits", "expected"),
    [
        pytest.param(None, None, [(t.name, t.limits.requests) for t in DEFAULT_TIERS], id="builtin-defaults"),
        pytest.param(
            None,
            "free: {requests: {limit: 1, window: 10s}}",
            [
                ("free", Limit(limit=1, window="10s")),
                ("premium", DEFAULT_TIERS[1].limits.requests),
                ("enterprise", DEFAULT_TIERS[2].limits.requests),
            ],
            id="limits-override-builtin",
        ),
        pytest.param(
            "- {name: gold, level: 5, groups: [vip]}\n- {name: free, level: 0, groups: [free]}",
            "gold: {requests: {limit: 99, window: 1m}, models: [qwen3]}",
            [("free", DEFAULT_TIERS[0].limits.requests), ("gold", Limit(limit=99, window="1m"))],
            id="custom-tier",
        ),
        pytest.param("- {name: silver, level: 1}", None, [("silver", None)], id="custom-tier-without-limits"),
    ],
)
def test_merge(mapping: str | None, limits: str | None, expected: list[tuple[str, Limit | None]]) -> None:
    tiers = merge(
        parse_mapping(_cm("tiers", mapping)) if mapping is not None else None,
        parse_limits(_cm("limits", limits)) if limits is not None else None,
    )
    assert [(t.name, t.limits.requests) for t in tiers] == expected


@pytest.mark.parametrize(
    ("key", "text", "reason"),
    [
        pytest.param("tiers", "- name: free\n  groups: [a\n", "invalid_yaml", id="broken-yaml"),
        # a scalar that looks like a timestamp but is no date: PyYAML raises ValueError, not YAMLError
        pytest.param("tiers", "- {name: free, description: 2025-02-30}", "invalid_yaml", id="impossible-date"),
        pytest.param("tiers", "name: free", "invalid_tiers", id="not-a-list"),
        pytest.param("tiers", "- {level: 1}", "invalid_tiers", id="no-name"),
        pytest.param("tiers", "- {name: a, level: high}", "invalid_tiers", id="bad-level"),
        pytest.param("tiers", "- {name: a, level: 2.9}", "invalid_tiers", id="fractional-level"),
        pytest.param("other", "[]", "missing_data", id="missing-key"),
    ],
)
def test_bad_mapping(key: str, text: str, reason: str) -> None:
    with pytest.raises(TranslateError) as info:
        parse_mapping(_cm(key, text))
    assert info.value.reason == reason


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("[1, 2]", id="not-a-mapping"),
        pytest.param("free: {requests: {limit: 5, window: forever}}", id="bad-window"),
        pytest.param("free: {requests: {limit: -1, window: 1m}}", id="negative-limit"),
        pytest.param("free: {tokens: {limit: 100000000000000000000000, window: 1m}}", id="above-10**15"),
        # these had left the tier without limits, without a word
        pytest.param("free:\npremium: {requests: {limit: 5, window: 1m}}", id="empty-entry"),
        pytest.param("enterprise: {request: {limit: 5, window: 1m}}", id="misspelt-field"),
        pytest.param("free: {requests: {limit: [", id="broken-yaml"),
    ],
)
def test_bad_limits(text: str) -> None:
    with pytest.raises(TranslateError):
        parse_limits(_cm("limits", text))


def test_the_admin_api_reads_a_tier_configmap_with_an_impossible_date_as_empty() -> None:
    """The admin API's own reader of the tier ConfigMaps (it rewrites them on PUT/DELETE) takes the ValueError
    PyYAML raises for 2025-02-30 like any unreadable YAML: the default, not a 500."""
    from controlplane.admin.tiers import _load

    assert _load(_cm("tiers", "- {name: free, description: 2025-02-30}"), "tiers", []) == []


def test_groups_written_as_a_string_are_the_list_they_mean() -> None:
    [tier] = parse_mapping(_cm("tiers", "- {name: free, groups: 'free, system:authenticated'}"))
    assert tier.groups == ("free", "system:authenticated")


@pytest.mark.parametrize(
    ("window", "ms"),
    [
        ("2m", 120_000),
        ("1m30s", 90_000),
        ("1h30m", 5_400_000),
        ("1m 30s", 90_000),
        ("2 m", 120_000),
        ("5m1ms", 300_001),
    ],
)
def test_windows_are_read_as_kuadrant_writes_them_parts_in_a_row_included(window: str, ms: int) -> None:
    limits = parse_limits(_cm("limits", f"free:\n  requests: {{limit: 5, window: '{window}'}}\n"))
    assert limits["free"][0].requests == Limit(limit=5, window=window)
    assert parse_window(window) == ms


@pytest.mark.parametrize("window", ["m", "1x", "1ms5", "30", "0s", "367d", "1s" * 40])
def test_windows_that_are_not_windows_refuse_the_limits(window: str) -> None:
    with pytest.raises(TranslateError) as caught:
        parse_limits(_cm("limits", f"free:\n  requests: {{limit: 5, window: '{window}'}}\n"))
    assert caught.value.reason == "invalid_limits"


def test_a_mapping_without_the_default_tier_or_a_catch_all_is_reported() -> None:
    mapping = _cm("tiers", "- {name: basic, level: 0, groups: [basic]}\n- {name: pro, level: 1, groups: [pro]}\n")
    mapping["metadata"]["name"] = "tier-to-group-mapping"
    reported: list[str] = []
    objects = {kinds.CONFIGMAP: {("llm", "tier-to-group-mapping"): mapping}}
    desired = desired_over(objects, lambda kind, obj, exc: reported.append(exc.reason))
    desired.update_tiers()
    assert reported == ["unknown_default_tier"]
    mapping["data"]["tiers"] = "- {name: basic, level: 0, groups: [basic, system:authenticated]}\n"
    desired.update_tiers()
    assert reported == ["unknown_default_tier"]  # a catch-all tier takes those keys


def test_tiers_defined_in_two_namespaces_use_the_tier_namespace_and_report_the_other() -> None:
    """The seed guide's copy in llm had silently won over the deployed one in maas-system (first by name)."""

    def mapping(namespace: str, tiers: str) -> dict[str, Any]:
        obj = _cm("tiers", tiers)
        obj["metadata"] = {"name": "tier-to-group-mapping", "namespace": namespace}
        return obj

    objects = {
        ("llm", "tier-to-group-mapping"): mapping("llm", "- {name: free, level: 0, groups: [free]}\n"),
        ("maas-system", "tier-to-group-mapping"): mapping(
            "maas-system", "- {name: free, level: 0, groups: [free]}\n- {name: gold, level: 5, groups: [gold]}\n"
        ),
    }
    for preferred, used, names in (("maas-system", "maas-system", ["free", "gold"]), ("", "llm", ["free"])):
        reported: list[tuple[str, str]] = []
        desired = desired_over(
            {kinds.CONFIGMAP: objects},
            lambda kind, obj, exc, into=reported: into.append((obj["metadata"]["namespace"], exc.reason)),
            tier_namespace=preferred,
        )
        desired.update_tiers()
        assert [t.name for t in desired.tiers] == names
        assert desired.tier_namespace() == used
        assert reported == [(({"llm", "maas-system"} - {used}).pop(), "duplicate")]
