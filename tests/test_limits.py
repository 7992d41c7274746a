"""Token-bucket arithmetic with an injected clock (no I/O), and the same rules in Redis with its own clock."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway import contract
from gateway.limits import BucketMode, BucketOp, evaluate, refill
from gateway.store.memory import MemoryStore
from gateway.store.redis import RedisStore

REQ = BucketOp(key_id="k", dimension="requests", limit=5, window_ms=120_000, cost=1)


class Clock:
    def __init__(self) -> None:
        self.ms = 1_000_000.0

    def __call__(self) -> float:
        return self.ms


async def test_refill_is_continuous_with_injected_clock() -> None:
    clock = Clock()
    store = MemoryStore(clock_ms=clock)
    for _ in range(5):
        ((r,),) = await store.check_buckets([[REQ]])
        assert r.allowed
    ((r,),) = await store.check_buckets([[REQ]])
    assert not r.allowed and r.retry_ms == 24_000
    clock.ms += 23_999
    ((r,),) = await store.check_buckets([[REQ]])
    assert not r.allowed and r.retry_ms == 1
    clock.ms += 1
    ((r,),) = await store.check_buckets([[REQ]])
    assert r.allowed and r.remaining == 0
    clock.ms += 10 * 120_000
    ((r,),) = await store.check_buckets([[REQ]])
    assert r.allowed and r.remaining == 4  # refilled to capacity, never beyond


@pytest.mark.parametrize(
    ("level_ms", "cost", "allowed", "remaining"),
    [
        pytest.param(0, 1, True, 4, id="fresh-bucket"),
        pytest.param(0, 5, True, 0, id="whole-bucket"),
        pytest.param(0, 6, False, 5, id="more-than-capacity"),
    ],
)
def test_take(level_ms: int, cost: int, allowed: bool, remaining: int) -> None:
    op = BucketOp(key_id="k", dimension="requests", limit=5, window_ms=60_000, cost=cost)
    (res,), _ = evaluate([op], [None], now_ms=level_ms)
    assert (res.allowed, res.remaining) == (allowed, remaining)


def test_gate_denies_while_in_debt_and_debits_nothing() -> None:
    force = BucketOp(key_id="k", dimension="tokens", limit=100, window_ms=60_000, cost=160, mode=BucketMode.FORCE)
    (forced,), states = evaluate([force], [None], now_ms=0)
    assert forced.remaining == 0 and states[0] is not None and states[0].tokens == -60
    gate = BucketOp(key_id="k", dimension="tokens", limit=100, window_ms=60_000, cost=1, mode=BucketMode.GATE)
    (res,), _ = evaluate([gate], states, now_ms=30_000)  # refilled 50: still in debt (-10)
    assert not res.allowed and res.retry_ms == 6_600
    (res,), after = evaluate([gate], states, now_ms=37_000)  # -60 + 61.67
    assert res.allowed and res.debited == 0
    assert after[0] is states[0]  # nothing taken: the stored state is kept, it refills to the same level
    assert refill(after[0], limit=100, window_ms=60_000, now_ms=37_000) > 1


def test_refund_is_capped_at_capacity() -> None:
    refund = BucketOp(key_id="k", dimension="tokens", limit=100, window_ms=60_000, cost=-500, mode=BucketMode.FORCE)
    (res,), states = evaluate([refund], [None], now_ms=0)
    assert res.remaining == 100 and states == [None]


@pytest.mark.redis
async def test_redis_refills_on_its_own_clock(redis_url: str) -> None:
    store = RedisStore(redis_url, timeout=2.0)
    fast = BucketOp(key_id="clock", dimension="requests", limit=10, window_ms=1_000, cost=10)
    ((a,),) = await store.check_buckets([[fast]])
    ((b,),) = await store.check_buckets([[fast]])
    assert a.allowed and not b.allowed and 0 < b.retry_ms <= 1_000
    await asyncio.sleep(b.retry_ms / 1000 + 0.05)
    ((c,),) = await store.check_buckets([[fast]])
    assert c.allowed
    await store.close()


@pytest.mark.redis
async def test_lua_and_python_agree(redis_url: str) -> None:
    """Same operations, same answers (windows long enough that the clocks' drift does not show)."""
    store = RedisStore(redis_url, timeout=2.0)
    memory = MemoryStore()
    ops = [
        [
            BucketOp(key_id="a", dimension="requests", limit=3, window_ms=3_600_000, cost=1),
            BucketOp(key_id="a", dimension="tokens", limit=50, window_ms=3_600_000, cost=1, mode=BucketMode.GATE),
        ],
        [
            BucketOp(
                key_id="a",
                dimension="tokens",
                limit=50,
                window_ms=3_600_000,
                cost=40,
                mode=BucketMode.RESERVE,
                min_cost=5,
            )
        ],
        [BucketOp(key_id="a", dimension="tokens", limit=50, window_ms=3_600_000, cost=30, mode=BucketMode.FORCE)],
    ] * 3
    for group in ops:
        (r,) = await store.check_buckets([group])
        (m,) = await memory.check_buckets([group])
        assert [(x.allowed, x.remaining, x.debited) for x in r] == [(x.allowed, x.remaining, x.debited) for x in m]
    await store.close()


@pytest.mark.redis
async def test_a_check_that_takes_nothing_writes_nothing(redis_url: str) -> None:
    """Gates and denied groups leave the stored buckets as they were (the state refills to the same level), so
    the authz token gate costs Redis a read, not a write."""
    store = RedisStore(redis_url, timeout=2.0)
    raw = aioredis.Redis.from_url(redis_url)
    gate = BucketOp(key_id="quiet", dimension="tokens", limit=50, window_ms=60_000, cost=1, mode=BucketMode.GATE)
    ((g,),) = await store.check_buckets([[gate]])
    assert g.allowed and g.remaining == 50
    assert not await raw.exists(contract.bucket_key("quiet", "tokens"))
    take = BucketOp(key_id="quiet", dimension="requests", limit=1, window_ms=60_000, cost=1)
    ((t1,),) = await store.check_buckets([[take]])
    stored = await raw.get(contract.bucket_key("quiet", "requests"))
    ttl = await raw.pttl(contract.bucket_key("quiet", "requests"))
    ((t2,),) = await store.check_buckets([[take]])  # denied: nothing taken, nothing written
    assert t1.allowed and not t2.allowed and stored
    assert await raw.get(contract.bucket_key("quiet", "requests")) == stored
    assert await raw.pttl(contract.bucket_key("quiet", "requests")) <= ttl
    await raw.aclose()
    await store.close()


@pytest.mark.redis
async def test_a_bucket_stored_as_a_hash_by_an_earlier_version_is_still_read(redis_url: str) -> None:
    """Before the one-string state, a bucket was a hash {t, ts}: such a bucket keeps its level after an upgrade,
    and the next take rewrites it in the new form."""
    store = RedisStore(redis_url, timeout=2.0)
    raw = aioredis.Redis.from_url(redis_url)
    name = contract.bucket_key("upgraded", "requests")
    await raw.delete(name)
    (seconds, micros) = await raw.time()
    await raw.hset(name, mapping={"t": "2", "ts": str(seconds * 1000 + micros // 1000)})
    take = BucketOp(key_id="upgraded", dimension="requests", limit=10, window_ms=3_600_000, cost=1)
    gate = BucketOp(
        key_id="upgraded", dimension="requests", limit=10, window_ms=3_600_000, cost=1, mode=BucketMode.GATE
    )
    ((g,),) = await store.check_buckets([[gate]])
    assert g.allowed and g.remaining == 2 and await raw.type(name) == b"hash"  # read, not rewritten
    ((t,),) = await store.check_buckets([[take]])
    assert t.allowed and t.remaining == 1
    assert await raw.type(name) == b"string"
    ((t2,),) = await store.check_buckets([[take]])
    assert t2.allowed and t2.remaining == 0
    await raw.aclose()
    await store.close()


_OP = st.tuples(
    st.integers(min_value=0, max_value=40),  # limit
    st.sampled_from([3_600_000, 86_400_000]),  # window: long, so the two clocks' drift cannot move a whole token
    st.integers(min_value=0, max_value=50),  # cost
    st.sampled_from(list(BucketMode)),
    st.integers(min_value=0, max_value=8),  # min_cost
)
_GROUP = st.lists(st.tuples(st.sampled_from(["a", "b"]), _OP), min_size=1, max_size=3)


@pytest.mark.redis
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(calls=st.lists(st.lists(_GROUP, min_size=1, max_size=3), min_size=1, max_size=6))
def test_lua_and_python_agree_on_any_sequence(redis_url: str, calls: list[list[list[tuple[str, tuple]]]]) -> None:
    """Every field of every result, for any mix of modes, limits (zero included) and groups per call; waits
    (reset, retry) to within the milliseconds that pass between the two stores' clocks."""
    prefix = uuid.uuid4().hex[:12]

    def group(spec: list[tuple[str, tuple]]) -> list[BucketOp]:
        dims = ("requests", "tokens", "extra")
        return [
            BucketOp(
                key_id=prefix + key, dimension=dims[i], limit=lim, window_ms=win, cost=cost, mode=mode, min_cost=mc
            )
            for i, (key, (lim, win, cost, mode, mc)) in enumerate(spec)
        ]

    async def compare() -> None:
        store, memory = RedisStore(redis_url, timeout=2.0), MemoryStore()
        try:
            for call in calls:
                groups = [group(spec) for spec in call]
                for r, m in zip(await store.check_buckets(groups), await memory.check_buckets(groups), strict=True):
                    assert [(x.allowed, x.limit, x.remaining, x.debited) for x in r] == [
                        (x.allowed, x.limit, x.remaining, x.debited) for x in m
                    ]
                    for x, y in zip(r, m, strict=True):
                        assert abs(x.reset_ms - y.reset_ms) <= 1_000 and abs(x.retry_ms - y.retry_ms) <= 1_000, (x, y)
        finally:
            await store.close()

    asyncio.run(compare())
