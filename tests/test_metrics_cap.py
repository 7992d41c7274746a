"""Capped per-key series: the first ``cap`` key ids get series of their own, every other key shares
``key_id="_other"`` with its identity labels blanked, however often it comes back."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, generate_latest

from gateway import metrics
from gateway.metrics import CappedChildren


def test_keys_past_the_cap_share_the_other_series_and_their_memo_stays_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "OVERFLOW_MEMO", 3)
    registry = CollectorRegistry()
    counter = Counter("maas_test_requests_total", "t", ["key_id", "user", "tier"], registry=registry)
    children = CappedChildren(counter, cap=2, identity=1)
    for _ in range(3):  # repeated visits take the memoised paths
        for i in range(10):
            children.get(f"k{i}", f"user{i}", "free").inc()
        assert children.get("k9", "user9", "free") is children.get("k5", "user5", "free")
        assert children.get("k0", "user0", "free") is not children.get("k1", "user1", "free")
        assert len(children._overflow) <= 3
    text = generate_latest(registry).decode()
    assert 'maas_test_requests_total{key_id="k0",tier="free",user="user0"} 3.0' in text
    assert 'maas_test_requests_total{key_id="k1",tier="free",user="user1"} 3.0' in text
    assert 'maas_test_requests_total{key_id="_other",tier="free",user=""} 24.0' in text
    assert "k2" not in text
