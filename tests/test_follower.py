"""The snapshot follower's full load against a real redis-server: every record loaded, and the event loop kept
free for checks while it runs (a reload after a reconnect happens while the process is serving)."""

from __future__ import annotations

import asyncio
import contextlib
import hmac

import pytest
import redis as sync_redis

from gateway import contract
from gateway.authz.follower import RELOAD_SLICE, SnapshotFollower
from gateway.authz.metrics import AuthzMetrics
from gateway.contract import KeyRecord
from gateway.store.redis import RedisStore
from tests.support.k8s_emulator import eventually

pytestmark = pytest.mark.redis

PEPPER = b"follower-test-pepper"
COUNT = 12_000


def _seed(url: str, count: int) -> None:
    client = sync_redis.Redis.from_url(url)
    pipe = client.pipeline(transaction=False)
    for i in range(count):
        digest = hmac.digest(PEPPER, f"sk-follower-{i}".encode(), "sha256").hex()
        record = KeyRecord(key_id=contract.key_id_of(digest), digest=digest, user=f"user{i}")
        pipe.hset(contract.KEYS_HASH, digest, contract.encode_record(record))
    pipe.hset(contract.KEYS_HASH, "ff" * 32, b"{not json")  # a malformed record is skipped, not fatal
    pipe.execute()
    client.close()


async def test_a_full_load_reads_every_key_and_never_holds_the_loop_for_a_whole_page(redis_url: str) -> None:
    _seed(redis_url, COUNT)
    store = RedisStore(redis_url, timeout=5.0)
    follower = SnapshotFollower(store, metrics=AuthzMetrics(max_keys=10))
    decoded = 0
    decode = follower._decode_key

    def counting(ident: str, raw: bytes | str) -> object:
        nonlocal decoded
        decoded += 1
        return decode(ident, raw)

    follower._decode_key = counting  # type: ignore[method-assign,assignment]
    longest = 0
    stop = asyncio.Event()

    async def ticker() -> None:  # stands for the checks the loop keeps answering during a reload
        nonlocal longest
        seen = decoded
        while not stop.is_set():
            longest = max(longest, decoded - seen)
            seen = decoded
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    try:
        await follower.reload(reason="reconnect")
    finally:
        stop.set()
        await task
        await store.close()
    assert len(follower.snapshot.keys) == COUNT and follower.snapshot.loaded
    assert decoded == COUNT + 1  # the malformed record too
    # records decoded between two turns of the loop: a page of HSCAN is 5,000
    assert 0 < longest <= RELOAD_SLICE


async def test_a_store_that_lost_its_data_is_reloaded_even_by_a_follower_that_applied_no_event(
    redis_url: str,
) -> None:
    """A follower fresh from its load took every event at or below its generation for one published during the
    load: after Redis lost its data and counted again from 1, a revoked key stayed admitted."""
    store = RedisStore(redis_url, timeout=5.0)
    records = []
    for i in range(2):
        digest = hmac.digest(PEPPER, f"sk-reset-{i}".encode(), "sha256").hex()
        records.append(KeyRecord(key_id=contract.key_id_of(digest), digest=digest, user=f"user{i}"))
    for record in records:
        await store.apply([contract.put(record)])
    for _ in range(3):
        await store.apply([contract.put(records[0])])  # generation 5
    follower = SnapshotFollower(store, metrics=AuthzMetrics(max_keys=10))
    task = asyncio.create_task(follower.run())
    try:
        await eventually(lambda: follower.connected and follower.snapshot.generation == 5)
        await store._client.flushall()
        await store.apply([contract.put(records[1])])  # generation 1: records[0] is gone with the data
        gone = bytes.fromhex(records[0].digest)
        await eventually(lambda: gone not in follower.snapshot.keys and follower.snapshot.generation == 1)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await store.close()
