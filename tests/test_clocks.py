"""Clocks of different machines meeting, and a wall clock that steps: what each part tolerates (README, "Clocks").

Skews between two parts are simulated with the clock seams the code has (``now=`` arguments, injected clocks), a
Redis clock that was ahead by a bucket state stamped in its future, and a wall-clock step by patching ``time.time``.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import redis.asyncio as aioredis

from controlplane.kinds import LEASE, Kind, Obj
from controlplane.leader import LeaseElector
from controlplane.sources.kube import micro_time
from gateway import contract
from gateway.limits import BucketMode, BucketOp
from gateway.store.memory import MemoryStore
from gateway.store.redis import RedisStore


class StepClock:
    def __init__(self) -> None:
        self.ms = 5_000_000.0

    def __call__(self) -> float:
        return self.ms


@pytest.mark.parametrize("mode", [BucketMode.TAKE, BucketMode.GATE], ids=["take", "gate"])
async def test_a_bucket_stamped_by_a_clock_that_was_ahead_refills_from_now(mode: BucketMode) -> None:
    """The clock steps back ten minutes after a bucket was emptied: it refills one window later, not ten minutes
    and a window later."""
    clock = StepClock()
    store = MemoryStore(clock_ms=clock)
    spend = BucketOp(key_id="k", dimension="tokens", limit=10, window_ms=1_000, cost=15, mode=BucketMode.FORCE)
    check = BucketOp(key_id="k", dimension="tokens", limit=10, window_ms=1_000, cost=1, mode=mode)
    await store.check_buckets([[spend]])  # in debt: -5
    clock.ms -= 600_000
    ((denied,),) = await store.check_buckets([[check]])
    assert not denied.allowed and denied.retry_ms == 600
    clock.ms += 600
    ((again,),) = await store.check_buckets([[check]])
    assert again.allowed


@pytest.mark.redis
@pytest.mark.parametrize("mode", [BucketMode.TAKE, BucketMode.GATE], ids=["take", "gate"])
async def test_a_redis_bucket_stamped_in_redis_future_refills_from_now(redis_url: str, mode: BucketMode) -> None:
    """A state written by a Redis primary whose clock was ten minutes ahead, read after a failover (or a step
    back of Redis's clock): the key is refused for what its retry-after says, not for ten minutes more."""
    store = RedisStore(redis_url, timeout=2.0)
    raw = aioredis.Redis.from_url(redis_url)
    seconds, micros = await raw.time()
    now_ms = seconds * 1000 + micros // 1000
    await raw.set(contract.bucket_key("ahead", "tokens"), f"-5 {now_ms + 600_000}", px=700_000)
    check = BucketOp(key_id="ahead", dimension="tokens", limit=10, window_ms=100, cost=1, mode=mode)
    try:
        ((denied,),) = await store.check_buckets([[check]])
        assert not denied.allowed and 0 < denied.retry_ms <= 100
        await asyncio.sleep(denied.retry_ms / 1000 + 0.1)
        ((again,),) = await store.check_buckets([[check]])
        assert again.allowed
    finally:
        await raw.aclose()
        await store.close()


def test_in_process_buckets_ignore_a_wall_clock_step_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    """``memory://`` and the authz ``local`` policy: an hour's step of the wall clock refills no bucket."""
    store = MemoryStore()
    take = BucketOp(key_id="k", dimension="requests", limit=1, window_ms=3_600_000, cost=1)
    ((first,),) = store.check_now([[take]])
    wall = time.time()
    monkeypatch.setattr(time, "time", lambda: wall + 3_600)
    ((second,),) = store.check_now([[take]])
    assert first.allowed and not second.allowed


async def test_in_process_buckets_refill_across_a_wall_clock_step_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """A step back of the wall clock stalls no bucket: it refills as time passes."""
    store = MemoryStore()
    take = BucketOp(key_id="k", dimension="requests", limit=1, window_ms=100, cost=1)
    ((first,),) = store.check_now([[take]])
    wall = time.time()
    monkeypatch.setattr(time, "time", lambda: wall - 600)
    await asyncio.sleep(0.2)
    ((second,),) = store.check_now([[take]])
    assert first.allowed and second.allowed


class Leases:
    """A Lease API of one object, each write bumping its resourceVersion, as the API server does."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.lease: Obj = {"metadata": {"name": "l", "namespace": "ns", "resourceVersion": "1"}, "spec": spec}

    async def get(self, kind: Kind, namespace: str, name: str) -> Obj | None:
        assert kind is LEASE
        return self.lease

    async def create(self, obj: Obj) -> Obj:
        raise AssertionError("the Lease exists")

    async def replace(self, obj: Obj) -> Obj:
        version = int(self.lease["metadata"]["resourceVersion"]) + 1
        self.lease = {**obj, "metadata": {**obj["metadata"], "resourceVersion": str(version)}}
        return self.lease

    def renew(self, renew_time: str) -> None:
        """The holder renews, from a node whose clock is wherever ``renew_time`` says."""
        version = int(self.lease["metadata"]["resourceVersion"]) + 1
        self.lease = {
            "metadata": {**self.lease["metadata"], "resourceVersion": str(version)},
            "spec": {**self.lease["spec"], "renewTime": renew_time},
        }


@pytest.mark.parametrize("remote", [-600.0, 600.0], ids=["holder-10m-behind", "holder-10m-ahead"])
async def test_leader_election_reads_no_remote_clock(remote: float) -> None:
    """The holder's renewTime comes from its node's clock: a follower measures the lease on its own monotonic clock
    from when it saw the Lease change, so a holder's clock far behind does not lose it the lease while it renews,
    and one far ahead does not keep it once it stops."""
    spec = {"holderIdentity": "other", "leaseDurationSeconds": 15, "renewTime": micro_time(time.time() + remote)}
    leases = Leases(spec)
    clock = StepClock()
    elector = LeaseElector(client=leases, name="l", namespace="ns", identity="me", clock=lambda: clock.ms / 1000)
    for second in range(40):  # the holder renews every 2 s
        if second % 2 == 0:
            leases.renew(micro_time(time.time() + remote + second))
        assert not await elector._try()
        clock.ms += 1_000
    stopped = clock.ms - 2_000  # the last renewal, seen at second 38; the lease is 15 s on this clock
    while clock.ms - stopped < 15_000:
        assert not await elector._try()
        clock.ms += 500
    assert await elector._try()
    assert leases.lease["spec"]["holderIdentity"] == "me" and elector.is_leader()
