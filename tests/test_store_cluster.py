"""The Redis store against a real Redis Cluster losing a node: change events, bucket checks and the usage ledger
keep working on what is left. Each test has a cluster of its own (it kills a node of it)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import pytest
import redis as sync_redis
from redis.crc import key_slot

from gateway import contract
from gateway.authz.follower import SnapshotFollower
from gateway.authz.metrics import AuthzMetrics
from gateway.authz.server import Checker, Pending, Reply
from gateway.contract import Limit, Limits, RecordKind
from gateway.decision import Policy
from gateway.errors import StoreError
from gateway.meter import accounting
from gateway.meter.accounting import UsageBacklog
from gateway.meter.metrics import MeterMetrics
from gateway.store.base import UsageDelta
from gateway.store.redis import RedisStore
from tests.conftest import PEPPER
from tests.support import platform
from tests.support.procs import RedisCluster, RedisServer, redis_cluster

pytestmark = pytest.mark.redis

T = TypeVar("T")
PATH = "/qwen3/v1/chat/completions"


async def _eventually(make: Callable[[], Awaitable[T]], *, within: float = 10.0) -> T:
    """``make()`` once it stops raising StoreError (a failover in progress), within ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        try:
            return await make()
        except StoreError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


async def test_change_events_survive_the_loss_of_the_urls_node() -> None:
    with redis_cluster(replica_of_first=True, node_timeout_ms=1000) as cluster:
        store = RedisStore(cluster.url, timeout=0.5)
        try:
            await store.apply([])  # the client learns the cluster's nodes
            async with store.subscribe() as sub:
                events: AsyncIterator[contract.ChangeEvent] = aiter(sub)
                cluster.nodes[0].kill()
                with pytest.raises(StoreError):  # the loss surfaces, so the consumer reloads
                    await asyncio.wait_for(anext(events), 10)

            async def subscribed_event() -> contract.ChangeEvent:
                # as the snapshot follower does after a lost subscription: subscribe again, then read
                async with store.subscribe() as again:
                    gen = await _eventually(lambda: store.apply([contract.delete(RecordKind.TIER, "gone")]))
                    event = await asyncio.wait_for(anext(aiter(again)), 5)
                    assert event.gen == gen
                    return event

            event = await _eventually(subscribed_event)
            assert event.changes[0].id == "gone"
        finally:
            await store.close()


DAY = "20250101"


def _serving(cluster: RedisCluster, key: str) -> RedisServer:
    """The node whose slots hold ``key``."""
    slot = key_slot(key.encode())
    client = sync_redis.Redis(port=cluster.nodes[0].port)
    try:
        ranges = client.execute_command("CLUSTER", "SLOTS")
    finally:
        client.close()
    port = next(int(r[2][1]) for r in ranges if int(r[0]) <= slot <= int(r[1]))
    return next(n for n in cluster.nodes if n.port == port)


def _key_apart_from_index(cluster: RedisCluster) -> str:
    """A key id whose ledger row sits on another node than the day's key index."""
    index = _serving(cluster, contract.ledger_index_key(DAY))
    return next(
        k for k in (f"key{i}" for i in range(100)) if _serving(cluster, contract.ledger_key(k, DAY)) is not index
    )


def _row(key_id: str) -> UsageDelta:
    return UsageDelta(key_id=key_id, model="m", day=DAY, requests=1, prompt_tokens=3, completion_tokens=4)


def _ledger_failures(metrics: MeterMetrics) -> float | None:
    return metrics.registry.get_sample_value("maas_meter_store_errors_total", {"operation": "ledger"})


async def test_ledger_rows_for_a_dead_shard_are_held_and_written_when_it_returns() -> None:
    """A refused connection to one master was a failed write: every row of its keys was dropped."""
    with redis_cluster() as cluster:
        store = RedisStore(cluster.url, timeout=0.5)
        metrics = MeterMetrics(max_keys=10)
        backlog = UsageBacklog(metrics)
        key_id = _key_apart_from_index(cluster)
        shard = _serving(cluster, contract.ledger_key(key_id, DAY))
        try:
            await store.generation()
            shard.kill()
            await accounting._ledger(store, metrics, _row(key_id), backlog)
            assert len(backlog) == 1
            assert _ledger_failures(metrics) == 0
            assert not await backlog.flush(store)  # still down: still held
            shard.restart()
            await _eventually(lambda: _flushed(backlog, store))
            (row,) = await store.read_usage(key_id, [DAY])
            assert (row.requests, row.prompt_tokens, row.completion_tokens) == (1, 3, 4)
            assert await store.usage_key_ids(DAY) == [key_id]
        finally:
            await store.close()


async def test_a_ledger_row_is_kept_and_indexed_later_when_only_the_index_node_is_down() -> None:
    """The day index sits on a node of its own: its failure had failed the key's row too (counted, logged), and the
    key was missing from usage reports over all keys for good."""
    with redis_cluster() as cluster:
        store = RedisStore(cluster.url, timeout=0.5)
        metrics = MeterMetrics(max_keys=10)
        backlog = UsageBacklog(metrics)
        key_id = _key_apart_from_index(cluster)
        index_node = _serving(cluster, contract.ledger_index_key(DAY))
        try:
            await store.generation()
            index_node.kill()
            await accounting._ledger(store, metrics, _row(key_id), backlog)
            assert _ledger_failures(metrics) == 0
            (row,) = await store.read_usage(key_id, [DAY])  # the row landed
            assert row.requests == 1
            assert len(backlog) == 1  # its index entry is held
            index_node.restart()
            await _eventually(lambda: _flushed(backlog, store))
            assert await store.usage_key_ids(DAY) == [key_id]
            (row,) = await store.read_usage(key_id, [DAY])
            assert (row.requests, row.prompt_tokens, row.completion_tokens) == (1, 3, 4)  # counted once
        finally:
            await store.close()


async def _flushed(backlog: UsageBacklog, store: RedisStore) -> None:
    if not await backlog.flush(store):
        raise StoreError("backlog not written yet")


async def test_a_dead_master_fails_only_the_checks_of_its_keys() -> None:
    """One failed shard had denied every key: its failure failed the whole batch, and the store-failure skip window
    was process-wide, so keys on healthy masters got 503 rate_limit_unavailable too."""
    with redis_cluster() as cluster:
        store = RedisStore(cluster.url, timeout=0.5)
        keys = [
            platform.Key(
                f"sk-shard-{i:04d}", f"u{i}", tier="enterprise", limits=Limits(requests=Limit(limit=1000, window="1m"))
            )
            for i in range(40)
        ]
        home = {k: _serving(cluster, contract.bucket_key(k.key_id(PEPPER), "")) for k in keys}
        dead_node = cluster.nodes[1]
        dead = next(k for k in keys if home[k] is dead_node)
        alive = next(k for k in keys if home[k] is not dead_node)
        checker, follower = denying_checker(store)
        try:
            await platform.seed(store, PEPPER, keys=(dead, alive))
            await follower.reload(reason="start")
            assert await _statuses(checker, [dead, alive]) == [200, 200]
            dead_node.kill()
            # the first alone (an idle batcher sends at once), the next two in one batch: the dead key fails its
            # own group only
            assert await _statuses(checker, [dead, alive, dead]) == [503, 200, 503]
            # within the dead node's skip window, the healthy node's keys are still checked
            assert await _statuses(checker, [alive, dead]) == [200, 503]
        finally:
            await store.close()


def denying_checker(store: RedisStore) -> tuple[Checker, SnapshotFollower]:
    """authz's checker on ``store`` (``--on-store-error deny``: a 200 means the bucket check ran) and its snapshot."""
    metrics = AuthzMetrics(max_keys=100)
    follower = SnapshotFollower(store, metrics=metrics)
    policy = Policy(pepper=PEPPER, identity_secret=b"s" * 32)
    checker = Checker(follower=follower, store=store, policy=policy, metrics=metrics, on_store_error="deny")
    return checker, follower


async def _statuses(checker: Checker, keys: list[platform.Key]) -> list[int]:
    """Begin every check in one loop turn, then the answers in order."""
    loop = asyncio.get_running_loop()
    steps: list[Reply | asyncio.Future[Pending]] = []
    for key in keys:
        arrived: asyncio.Future[Pending] = loop.create_future()
        headers = {"authorization": f"APIKEY {key.plaintext}"}
        step = checker.begin(host="gw", path=PATH, get=headers.get, count=lambda name: 1, then=arrived.set_result)
        steps.append(step if isinstance(step, Reply) else arrived)
    replies = [s if isinstance(s, Reply) else checker.finish(await asyncio.wait_for(s, 5)) for s in steps]
    return [r.status for r in replies]
