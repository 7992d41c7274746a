"""Capped per-key series: the first ``cap`` key ids get series of their own, every other key shares
``key_id="_other"`` with its identity labels blanked, however often it comes back."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, generate_latest

from gateway import metrics
from gateway.meter.metrics import MeterMetrics
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


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_an_idle_key_gives_its_place_under_the_cap_to_a_new_key() -> None:
    """Revoked, deleted and rotated keys held their places under the cap for ever: after enough churn every new key
    was counted under _other only. A key idle for KEY_IDLE_SECONDS now makes room, once the cap is full."""
    registry = CollectorRegistry()
    counter = metrics.LoopCounter("maas_test_requests_total", "t", ["key_id", "user", "tier"], registry=registry)
    clock = Clock()
    children = CappedChildren(counter, cap=2, identity=1, clock=clock)
    evicted: list[int] = []
    children.on_evict = lambda: evicted.append(1)
    children.get("live", "u", "free").inc()
    children.get("dead", "u", "free").inc()
    for step in range(3):  # the cap is full: new keys go to _other until "dead" has been idle long enough
        clock.now += metrics.KEY_IDLE_SECONDS
        children.get("live", "u", "free").inc()
        children.get(f"new{step}", "u", "free").inc()
    text = generate_latest(registry).decode()
    assert 'key_id="dead"' not in text
    assert 'maas_test_requests_total{key_id="live",tier="free",user="u"} 4.0' in text
    assert 'maas_test_requests_total{key_id="new1",tier="free",user="u"} 1.0' in text
    assert 'maas_test_requests_total{key_id="_other",tier="free",user=""} 2.0' in text  # new0, and new2 (cap full)
    assert evicted == [1]
    assert len(children._keys) == 2


def test_a_busy_key_keeps_its_series_however_long_the_cap_stays_full() -> None:
    registry = CollectorRegistry()
    counter = metrics.LoopCounter("maas_test_requests_total", "t", ["key_id", "user", "tier"], registry=registry)
    clock = Clock()
    children = CappedChildren(counter, cap=1, identity=1, clock=clock)
    for step in range(5):
        children.get("busy", "u", "free").inc()
        clock.now += metrics.KEY_IDLE_SECONDS
        children.get(f"new{step}", "u", "free").inc()
    text = generate_latest(registry).decode()
    assert 'maas_test_requests_total{key_id="busy",tier="free",user="u"} 5.0' in text
    assert 'maas_test_requests_total{key_id="_other",tier="free",user=""} 5.0' in text


def test_the_meter_drops_an_idle_keys_token_series_to_make_room() -> None:
    clock = Clock()
    meter = MeterMetrics(max_keys=1, clock=clock)
    meter.key(key_id="dead", user="u", tier="free", model="m").prompt.inc(5)
    for step in range(3):
        clock.now += metrics.KEY_IDLE_SECONDS
        meter.key(key_id=f"new{step}", user="u", tier="free", model="m").prompt.inc(1)
    text = generate_latest(meter.registry).decode()
    assert 'key_id="dead"' not in text
    assert 'maas_tokens_total{key_id="new1",model="m",tier="free",type="prompt",user="u"} 1.0' in text
    assert 'maas_tokens_total{key_id="_other",model="m",tier="_other",type="prompt",user="_other"} 2.0' in text
