"""Request credits (gateway/authz/credits.py) on real redis-server: a busy key's requests skip the round trip, and
the key's bucket stays exact: what is admitted never passes the limit, the rate-limit headers read as without
credits, and every token taken ahead is spent or given back."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway import contract
from gateway.authz import credits as credits_module
from gateway.authz.follower import SnapshotFollower
from gateway.authz.metrics import AuthzMetrics
from gateway.authz.server import Checker, Pending, Reply
from gateway.contract import Limit, Limits
from gateway.decision import Policy
from gateway.limits import BucketMode, BucketOp, BucketResult
from gateway.store.base import BucketsDone
from gateway.store.redis import RedisStore
from tests.conftest import PEPPER
from tests.support import platform
from tests.support.k8s_emulator import eventually
from tests.support.procs import redis_server

pytestmark = pytest.mark.redis

PATH = "/qwen3/v1/chat/completions"
REMAINING = "x-ratelimit-remaining-requests"


class CountingStore(RedisStore):
    """The Redis store, counting the bucket checks of request tokens sent to it (one per group)."""

    checks = 0

    def submit_buckets(self, groups: Sequence[Sequence[BucketOp]], done: BucketsDone) -> bool:
        self.checks += len(groups)
        return super().submit_buckets(groups, done)

    async def check_buckets(self, groups: Sequence[Sequence[BucketOp]]) -> list[list[BucketResult]]:
        self.checks += len(groups)
        return await super().check_buckets(groups)


@dataclass
class Replica:
    checker: Checker
    follower: SnapshotFollower
    metrics: AuthzMetrics

    def credits(self, outcome: str) -> float:
        value = self.metrics.registry.get_sample_value("maas_authz_request_credits_total", {"outcome": outcome})
        return value or 0.0


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[CountingStore]:
    store = CountingStore(redis_url, timeout=2.0)
    yield store
    await store.close()


async def replica(store: RedisStore, *, credits: int = 4, ttl: float = 30.0) -> Replica:
    metrics = AuthzMetrics(max_keys=100)
    follower = SnapshotFollower(store, metrics=metrics)
    await follower.reload(reason="start")
    policy = Policy(pepper=PEPPER, identity_secret=b"s" * 32)
    checker = Checker(
        follower=follower, store=store, policy=policy, metrics=metrics, credits=credits, credit_seconds=ttl
    )
    return Replica(checker, follower, metrics)


async def ask(r: Replica, key: platform.Key, times: int = 1) -> list[tuple[int, int | None]]:
    """``times`` requests one after the other, a millisecond apart (as a client's arrive, each in a loop turn of its
    own): (status, x-ratelimit-remaining-requests) of each."""
    out = []
    for _ in range(times):
        (reply,) = await burst(r, key, 1)
        out.append(_seen(reply))
        await asyncio.sleep(0.001)
    return out


async def burst(r: Replica, key: platform.Key, size: int) -> list[Reply]:
    """``size`` checks begun in one loop turn, then their answers."""
    loop = asyncio.get_running_loop()
    steps: list[Reply | asyncio.Future[Pending]] = []
    headers = {"authorization": f"APIKEY {key.plaintext}"}
    for _ in range(size):
        arrived: asyncio.Future[Pending] = loop.create_future()
        step = r.checker.begin(host="gw", path=PATH, get=headers.get, count=lambda name: 1, then=arrived.set_result)
        steps.append(step if isinstance(step, Reply) else arrived)
    return [s if isinstance(s, Reply) else r.checker.finish(await asyncio.wait_for(s, 5)) for s in steps]


def _seen(reply: Reply) -> tuple[int, int | None]:
    remaining = dict(reply.header_list()).get(REMAINING)
    return reply.status, int(remaining) if remaining is not None else None


async def bucket_left(store: RedisStore, key: platform.Key, limit: int) -> int:
    """The tokens left in the key's request bucket, read with a check that takes nothing (a gate)."""
    op = BucketOp(key.key_id(PEPPER), contract.REQUESTS, limit, 3_600_000_000, 1, BucketMode.GATE)
    ((result,),) = await RedisStore.check_buckets(store, [[op]])
    return result.remaining


def limited(name: str, limit: int) -> platform.Key:
    # a window of ~41 days: the bucket refills one token per ~2 minutes at most, never within a test
    return platform.Key(f"sk-credit-{name}", name, limits=Limits(requests=Limit(limit=limit, window="1000h")))


async def test_a_busy_key_skips_the_store_and_reads_as_without_credits(store: CountingStore) -> None:
    key_on, key_off = limited("on", 300), limited("off", 300)
    await platform.seed(store, PEPPER, keys=(key_on, key_off))
    with_credits, without = await replica(store), await replica(store, credits=0)
    store.checks = 0
    seen_on = await ask(with_credits, key_on, 305)
    calls_on = store.checks
    store.checks = 0
    seen_off = await ask(without, key_off, 305)
    # the same answers, remaining counts included: exactly the limit admitted, then 429 with 0 left
    bad = [i for i, (on, off) in enumerate(zip(seen_on, seen_off, strict=True)) if on != off]
    assert not bad, (bad, seen_on[max(0, bad[0] - 8) : bad[0] + 4])
    assert [s for s, _ in seen_on] == [200] * 300 + [429] * 5
    assert [r for _, r in seen_on[:300]] == list(range(299, -1, -1))
    assert store.checks == 305  # without credits: one check per request
    # with them: one store call per three requests (3 credits at once, a hundredth of 300), and a few at the ends
    assert calls_on <= 305 // 3 + 12, calls_on
    assert with_credits.credits("used") >= 200
    assert with_credits.credits("refunded") == 0  # all spent, none left over: the bucket is exactly empty
    assert await bucket_left(store, key_on, 300) == 0


async def holding(
    store: CountingStore, name: str, limit: int, asked: int, ttl: float = 30.0
) -> tuple[platform.Key, Replica, int]:
    """A replica that admitted ``asked`` requests of a new key one after another, and the credits it holds then."""
    key = limited(name, limit)
    await platform.seed(store, PEPPER, keys=(key,))
    r = await replica(store, ttl=ttl)
    assert [s for s, _ in await ask(r, key, asked)] == [200] * asked
    assert r.checker._credits is not None
    held = r.checker._credits.held
    assert held > 0  # the key was busy: its next requests' tokens are taken
    assert await bucket_left(store, key, limit) == limit - asked - held
    return key, r, held


async def test_unspent_credits_are_given_back_after_their_time(store: CountingStore) -> None:
    key, r, held = await holding(store, "back", 50, 6, ttl=0.2)
    await eventually(lambda: r.credits("refunded") >= held, within=5)
    assert r.checker._credits.held == 0
    assert await bucket_left(store, key, 50) == 50 - 6  # exactly what was admitted is spent
    assert r.credits("used") + r.credits("refunded") == r.credits("taken")


async def test_a_limit_change_leaves_the_credits_unspent(store: CountingStore) -> None:
    key, r, _ = await holding(store, "change", 50, 6)
    # the key's limit drops to 0: the very next request is refused, not admitted on a credit taken under the old one
    stopped = platform.Key(key.plaintext, key.user, limits=Limits(requests=Limit(limit=0, window="1m")))
    await store.apply([contract.put(stopped.record(PEPPER))])
    await r.follower.reload(reason="test")
    assert [s for s, _ in await ask(r, stopped, 2)] == [429, 429]
    await eventually(lambda: r.credits("refunded") >= r.credits("taken") - r.credits("used"), within=5)
    assert await bucket_left(store, key, 50) == 50 - 6


async def test_a_stopping_replica_gives_its_credits_back(store: CountingStore) -> None:
    key, r, _ = await holding(store, "stop", 40, 7)
    await r.checker.close()
    assert r.checker._credits is not None and r.checker._credits.held == 0
    assert await bucket_left(store, key, 40) == 40 - 7
    assert [s for s, _ in await ask(r, key, 1)] == [200]  # a late check is still answered, with no credit taken
    assert await bucket_left(store, key, 40) == 40 - 8


async def test_a_burst_takes_no_credits(store: CountingStore) -> None:
    """Checks of a key that are out together take none: the burst could end before they came back, leaving them
    unspent (another replica would be refused while this one holds them)."""
    key = limited("burst", 30)
    await platform.seed(store, PEPPER, keys=(key,))
    r = await replica(store)
    replies = await burst(r, key, 40)
    assert [x.status for x in replies].count(200) == 30
    assert r.credits("taken") == 0
    assert await bucket_left(store, key, 30) == 0


async def test_credits_held_by_one_replica_delay_another_and_are_never_extra(store: CountingStore) -> None:
    """Two replicas: one holds credits when the other runs the bucket dry. The other is refused until they come
    back (after their time), then admitted again; the two together admit exactly the limit, never more."""
    key = limited("two", 12)
    await platform.seed(store, PEPPER, keys=(key,))
    first, second = await replica(store, ttl=0.3), await replica(store, ttl=0.3)
    assert all(s == 200 for s, _ in await ask(first, key, 4))
    assert first.checker._credits is not None
    held = first.checker._credits.held
    assert held > 0
    admitted = 4
    seen = await ask(second, key, 20)
    admitted += [s for s, _ in seen].count(200)
    assert seen[-1][0] == 429
    assert admitted == 12 - held  # the first replica's credits are not the second's to spend
    await eventually(lambda: first.credits("refunded") >= held, within=5)
    later = [s for s, _ in await ask(second, key, held + 3)]
    assert later == [200] * held + [429] * 3
    assert admitted + held == 12


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    steps=st.lists(st.tuples(st.integers(0, 1), st.integers(1, 4), st.booleans()), min_size=1, max_size=30),
    limit=st.integers(1, 25),
)
async def test_tokens_are_neither_made_nor_lost(
    store: CountingStore, steps: list[tuple[int, int, bool]], limit: int
) -> None:
    """Any mix of lone requests and bursts on two replicas: never more admitted than the limit, and once both have
    given their credits back, the bucket holds exactly the limit less what was admitted."""
    key = platform.Key(
        f"sk-credit-prop-{limit}-{len(steps)}", "prop", limits=Limits(requests=Limit(limit=limit, window="1000h"))
    )
    await store.reset_buckets(key.key_id(PEPPER), [contract.REQUESTS])
    await platform.seed(store, PEPPER, keys=(key,))
    replicas = [await replica(store, credits=3), await replica(store, credits=3)]
    admitted = 0
    for which, size, lone in steps:
        if lone:
            answers = [s for s, _ in await ask(replicas[which], key, size)]
        else:
            answers = [x.status for x in await burst(replicas[which], key, size)]
        assert set(answers) <= {200, 429}
        admitted += answers.count(200)
        assert admitted <= limit
    for r in replicas:
        await r.checker.close()
    assert await bucket_left(store, key, limit) == limit - admitted


async def test_keys_idle_for_their_time_are_forgotten(store: CountingStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a replica remembers per key goes once the key is idle (a replica sees millions of keys over a day)."""
    monkeypatch.setattr(credits_module, "FORGET_SECONDS", 0.0)
    keys = [limited(f"idle{i}", 100) for i in range(30)]
    await platform.seed(store, PEPPER, keys=tuple(keys))
    r = await replica(store, ttl=0.05)
    for key in keys:
        await ask(r, key, 3)
    credits = r.checker._credits
    assert credits is not None and credits._holders
    await eventually(lambda: not credits._holders, within=5)
    assert credits.held == 0
    await eventually(lambda: r.credits("used") + r.credits("refunded") == r.credits("taken"), within=5)


async def test_credits_whose_give_back_fails_are_counted_lost() -> None:
    """Redis gone when credits expire: their give-back fails, is counted, and nothing else breaks (the tokens stay
    spent: the key is refused early, never admitted more)."""
    with redis_server() as server:
        store = CountingStore(server.url, timeout=0.3)
        try:
            _, r, held = await holding(store, "lost", 50, 6, ttl=0.2)
            server.kill()
            await eventually(lambda: r.credits("lost") >= held, within=5)
            assert r.credits("refunded") == 0
            assert r.checker._credits is not None and r.checker._credits.held == 0
        finally:
            await store.close()
