"""One contract suite for every store: memory and real redis-server."""

from __future__ import annotations

import asyncio
import re

import pytest

from gateway import contract
from gateway.contract import KeyRecord, RecordKind
from gateway.errors import ConfigError
from gateway.limits import BucketMode, BucketOp
from gateway.store import open_store
from gateway.store.base import UsageDelta

pytestmark = pytest.mark.redis

DIGEST = "ab" * 32


def _key(digest: str = DIGEST, **kw: object) -> KeyRecord:
    return KeyRecord(key_id=contract.key_id_of(digest), digest=digest, user="alice", **kw)  # type: ignore[arg-type]


async def test_apply_then_scan_and_get(store) -> None:
    gen0 = await store.generation()
    gen = await store.apply([contract.put(_key()), contract.put(contract.DEFAULT_TIERS[0])])
    assert gen == gen0 + 1
    assert await store.generation() == gen
    keys = [item async for batch in store.scan_records(RecordKind.KEY) for item in batch]
    assert [k for k, _ in keys] == [DIGEST]
    raw = await store.get_record(RecordKind.TIER, "free")
    assert contract.decode_record(RecordKind.TIER, raw).name == "free"
    await store.apply([contract.delete(RecordKind.KEY, DIGEST)])
    assert await store.get_record(RecordKind.KEY, DIGEST) is None


async def test_scan_many_records_in_batches(store) -> None:
    records = [_key(f"{i:064x}") for i in range(1200)]
    await store.apply([contract.put(r) for r in records])
    batches = [batch async for batch in store.scan_records(RecordKind.KEY, batch=100)]
    assert len({k for b in batches for k, _ in b}) == 1200


async def test_a_scan_left_early_leaves_nothing_running(store) -> None:
    """The Redis store asks for the next page before handing over the current one; a caller that stops reading
    must not leave that request running (or its connection busy)."""
    await store.apply([contract.put(_key(f"{i:064x}")) for i in range(300)])
    before = asyncio.all_tasks()
    scan = store.scan_records(RecordKind.KEY, batch=50)
    first = await anext(scan)
    assert first
    await scan.aclose()
    await asyncio.sleep(0)
    assert not [t for t in asyncio.all_tasks() - before if not t.done()]
    assert len([item async for batch in store.scan_records(RecordKind.KEY) for item in batch]) == 300


async def test_subscription_sees_changes_in_order(store) -> None:
    async with store.subscribe() as sub:
        gen_a = await store.apply([contract.put(_key())])
        gen_b = await store.apply([contract.delete(RecordKind.KEY, DIGEST)])
        events = []
        it = aiter(sub)
        for _ in range(2):
            events.append(await asyncio.wait_for(anext(it), 5))
    assert [e.gen for e in events] == [gen_a, gen_b]
    assert events[0].changes[0].kind is RecordKind.KEY
    assert contract.decode_record(RecordKind.KEY, events[0].changes[0].value).user == "alice"
    assert events[1].changes[0].value is None


async def test_take_admits_exactly_limit(store) -> None:
    op = BucketOp(key_id="k1", dimension="requests", limit=5, window_ms=120_000, cost=1)
    results = [r[0] for r in await store.check_buckets([[op]] * 8)]
    assert [r.allowed for r in results] == [True] * 5 + [False] * 3
    assert [r.remaining for r in results[:5]] == [4, 3, 2, 1, 0]
    denied = results[-1]
    assert 23_000 <= denied.retry_ms <= 24_000
    assert 119_000 <= denied.reset_ms <= 120_000


async def test_group_is_all_or_nothing(store) -> None:
    req = BucketOp(key_id="k2", dimension="requests", limit=10, window_ms=60_000, cost=1)
    spend = BucketOp(key_id="k2", dimension="tokens", limit=100, window_ms=60_000, cost=150, mode=BucketMode.FORCE)
    gate = BucketOp(key_id="k2", dimension="tokens", limit=100, window_ms=60_000, cost=1, mode=BucketMode.GATE)
    (forced,) = await store.check_buckets([[spend]])
    assert forced[0].allowed and forced[0].debited == 150 and forced[0].remaining == 0
    (res,) = await store.check_buckets([[req, gate]])
    assert not res[0].allowed and not res[1].allowed
    assert res[0].remaining == 10 and res[0].debited == 0
    assert res[1].retry_ms > 0


async def test_reserve_clamps_to_what_is_left(store) -> None:
    def reserve(cost: int, min_cost: int) -> BucketOp:
        return BucketOp(
            key_id="k3",
            dimension="tokens",
            limit=100,
            window_ms=86_400_000,
            cost=cost,
            mode=BucketMode.RESERVE,
            min_cost=min_cost,
        )

    ((a,),) = await store.check_buckets([[reserve(70, 10)]])
    assert a.allowed and a.debited == 70
    ((b,),) = await store.check_buckets([[reserve(70, 10)]])
    assert b.allowed and b.debited == 30 and b.remaining == 0
    ((c,),) = await store.check_buckets([[reserve(70, 10)]])
    assert not c.allowed and c.debited == 0
    refund = BucketOp(key_id="k3", dimension="tokens", limit=100, window_ms=86_400_000, cost=-20, mode=BucketMode.FORCE)
    ((d,),) = await store.check_buckets([[refund]])
    assert d.remaining == 20


async def test_zero_limit_denies(store) -> None:
    op = BucketOp(key_id="k4", dimension="requests", limit=0, window_ms=60_000, cost=1)
    ((r,),) = await store.check_buckets([[op]])
    assert not r.allowed and r.retry_ms == 60_000


async def test_reset_buckets(store) -> None:
    op = BucketOp(key_id="k5", dimension="requests", limit=1, window_ms=60_000, cost=1)
    await store.check_buckets([[op]])
    ((denied,),) = await store.check_buckets([[op]])
    assert not denied.allowed
    await store.reset_buckets("k5", ["requests"])
    ((again,),) = await store.check_buckets([[op]])
    assert again.allowed


async def test_usage_ledger_adds_up(store) -> None:
    await store.add_usage(
        [
            UsageDelta(key_id="k6", model="m", day="20261128", requests=1, prompt_tokens=3, completion_tokens=4)
            for _ in range(3)
        ]
    )
    await store.add_usage([UsageDelta(key_id="k6", model="n", day="20261129", requests=1)])
    rows = await store.read_usage("k6", ["20261128", "20261129", "20261130"])
    assert [(r.model, r.day, r.requests, r.prompt_tokens, r.completion_tokens) for r in rows] == [
        ("m", "20261128", 3, 9, 12),
        ("n", "20261129", 1, 0, 0),
    ]


async def test_usage_index_lists_the_keys_of_a_day(store) -> None:
    await store.add_usage(
        [
            UsageDelta(key_id="kb", model="m", day="20261201", requests=1),
            UsageDelta(key_id="ka", model="m", day="20261201", prompt_tokens=3),
            UsageDelta(key_id="kc", model="m", day="20261202", requests=1),
        ]
    )
    assert await store.usage_key_ids("20261201") == ["ka", "kb"]
    assert await store.usage_key_ids("20261202") == ["kc"]
    assert await store.usage_key_ids("20261203") == []


async def test_an_unsupported_store_url_names_every_scheme_that_works() -> None:
    with pytest.raises(ConfigError) as raised:
        open_store("foo://x")
    schemes = re.findall(r"([a-z+]+)://", str(raised.value).split(": use ", 1)[1])
    assert set(schemes) == {"memory", "redis", "rediss", "unix", "redis+cluster", "rediss+cluster"}
    for scheme in schemes:  # each one named is accepted (nothing connects before the first call)
        where = "/tmp/maas-none.sock" if scheme == "unix" else "127.0.0.1:1/0"
        store = open_store(f"{scheme}://{where}" if scheme != "memory" else "memory://")
        await store.close()


async def test_a_ledger_row_written_again_with_its_id_counts_once(store) -> None:
    """A write whose outcome was unknown is made again with its write id: it must not count twice."""
    row = UsageDelta(key_id="k7", model="m", day="20261128", requests=1, prompt_tokens=3, completion_tokens=4)
    other = UsageDelta(key_id="k7", model="m", day="20261128", requests=1, prompt_tokens=5)
    await store.add_usage([row])
    await store.add_usage([row, other])
    await store.add_usage([row])
    (landed,) = await store.read_usage("k7", ["20261128"])
    assert (landed.requests, landed.prompt_tokens, landed.completion_tokens) == (2, 8, 4)
    assert await store.usage_key_ids("20261128") == ["k7"]


def _reserve_op(key_id: str, cost: int) -> BucketOp:
    return BucketOp(
        key_id=key_id,
        dimension="tokens",
        limit=100,
        window_ms=86_400_000,
        cost=cost,
        mode=BucketMode.RESERVE,
        min_cost=1,
    )


async def _level(store, key_id: str) -> int:
    gate = BucketOp(key_id=key_id, dimension="tokens", limit=100, window_ms=86_400_000, cost=0, mode=BucketMode.GATE)
    ((result,),) = await store.check_buckets([[gate]])
    return result.remaining


async def test_a_release_gives_back_what_the_reservation_took_once(store) -> None:
    op = _reserve_op("k8", 70)
    taken = await store.reserve(op, "r1")
    assert taken.allowed and taken.debited == 70 and taken.remaining == 30
    await store.reserve(_reserve_op("k8", 10), "r2")  # another reservation of the key stays taken
    assert await _level(store, "k8") == 20
    await store.release(op, "r1")
    assert await _level(store, "k8") == 90
    await store.release(op, "r1")  # made again: its answer was lost too
    assert await _level(store, "k8") == 90
    again = await store.reserve(op, "r1")  # a released reservation never takes again
    assert not again.allowed and again.debited == 0
    assert await _level(store, "k8") == 90


async def test_a_reservation_released_before_it_ran_takes_nothing(store) -> None:
    """The reservation still waited in Redis's input when its release (on another connection) ran."""
    op = _reserve_op("k9", 70)
    await store.release(op, "r1")
    assert await _level(store, "k9") == 100
    late = await store.reserve(op, "r1")
    assert not late.allowed and late.debited == 0
    assert await _level(store, "k9") == 100
    fresh = await store.reserve(op, "r2")
    assert fresh.allowed and fresh.debited == 70


async def test_a_commit_made_again_under_its_reservation_id_counts_once(store) -> None:
    """A commit whose answer was lost is made again; released or not, the reservation's commit counts once."""
    op = _reserve_op("k10", 50)
    await store.reserve(op, "r1")
    spent = BucketOp(key_id="k10", dimension="tokens", limit=100, window_ms=86_400_000, cost=-20, mode=BucketMode.FORCE)
    await store.commit(spent, "r1")
    await store.commit(spent, "r1")
    assert await _level(store, "k10") == 70
    await store.release(op, "r2")  # another reservation's answer lost: released, then served and committed in full
    whole = BucketOp(key_id="k10", dimension="tokens", limit=100, window_ms=86_400_000, cost=30, mode=BucketMode.FORCE)
    await store.commit(whole, "r2")
    await store.release(op, "r2")
    await store.commit(whole, "r2")
    late = await store.reserve(op, "r2")
    assert not late.allowed
    assert await _level(store, "k10") == 40


async def test_a_reservation_made_again_answers_as_it_did_the_first_time(store) -> None:
    """A client that sends the reservation again after its connection broke (redis-py's retry on Redis Cluster,
    during a failover) gets what the first run took, not a denial: the request goes on with those tokens, which its
    commit settles."""
    op = _reserve_op("k11", 70)
    await store.reserve(op, "r1")
    again = await store.reserve(op, "r1")
    assert again.allowed and again.debited == 70 and again.remaining == 30
    assert await _level(store, "k11") == 30
    await store.reserve(_reserve_op("k11", 30), "r2")
    starved = _reserve_op("k11", 10)
    assert not (await store.reserve(starved, "r3")).allowed
    assert not (await store.reserve(starved, "r3")).allowed  # denied the first time: denied again, nothing taken
    await store.commit(
        BucketOp(key_id="k11", dimension="tokens", limit=100, window_ms=86_400_000, cost=-20, mode=BucketMode.FORCE),
        "r1",
    )
    assert not (await store.reserve(op, "r1")).allowed  # committed: the request has settled
    assert await _level(store, "k11") == 20
