"""The Warning Event queue's rate limit and overflow, with injected time and a fake source (no I/O)."""

from __future__ import annotations

import asyncio
from collections.abc import Hashable

import pytest

from controlplane import events
from controlplane.events import EventQueue, TokenBucket
from controlplane.kinds import Obj
from controlplane.metrics import Metrics
from tests.support.k8s_emulator import eventually


def test_the_token_bucket_allows_a_burst_then_its_rate() -> None:
    now = [0.0]
    bucket = TokenBucket(burst=3, rate=2.0, clock=lambda: now[0])
    assert [bucket.reserve() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.reserve() == 0.5  # borrowed: usable after 1 / rate
    assert bucket.reserve() == 1.0
    now[0] = 10.0  # refilled, up to the burst
    assert [bucket.reserve() for _ in range(4)] == [0.0, 0.0, 0.0, 0.5]


class Recorder:
    def __init__(self) -> None:
        self.sent: list[str] = []

    async def report(self, obj: Obj, *, reason: str, message: str) -> None:
        self.sent.append(obj["metadata"]["name"])


async def test_a_full_queue_drops_counts_and_hands_the_event_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(events, "QUEUE_SIZE", 2)
    source, metrics, lost = Recorder(), Metrics(), list[Hashable]()
    queue = EventQueue(source=source, metrics=metrics, lost=lost.append)  # type: ignore[arg-type]
    objs = [{"metadata": {"name": f"o{i}", "namespace": "n"}} for i in range(4)]
    assert [queue.submit(i, o, reason="R", message="m") for i, o in enumerate(objs)] == [True, True, False, False]
    assert lost == [2, 3]
    assert metrics.warning_events.labels(result="dropped")._value.get() == 2
    task = asyncio.create_task(queue.run())
    try:
        await eventually(lambda: len(source.sent) == 2)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert sorted(source.sent) == ["o0", "o1"]
