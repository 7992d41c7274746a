"""The snapshot follower's full load against a real redis-server: every record loaded, and the event loop kept
free for checks while it runs (a reload after a reconnect happens while the process is serving)."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis as sync_redis

from controlplane.admin.state import AdminState
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


async def test_a_full_load_slower_than_the_store_timeout_is_not_started_again(redis_url: str) -> None:
    """The next page is read while this one is decoded: with the machine busy that took longer than the store's
    timeout (250 ms), the page timed out and the load began again from its first key (~10 s for a million keys,
    twice). Here decoding a page takes ~1 s against a 50 ms store timeout: the load ends in one pass."""
    _seed(redis_url, COUNT)
    store = RedisStore(redis_url, timeout=0.05)
    follower = SnapshotFollower(store, metrics=AuthzMetrics(max_keys=10))
    decode = follower._decode_key

    def slow(ident: str, raw: bytes | str) -> object:
        time.sleep(1.0 / 5000)  # a busy machine: a page of 5,000 records takes ~1 s to decode
        return decode(ident, raw)

    follower._decode_key = slow  # type: ignore[method-assign,assignment]
    try:
        await follower.reload(reason="start")
    finally:
        await store.close()
    assert len(follower.snapshot.keys) == COUNT and follower.snapshot.loaded


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


def _records(prefix: str, count: int) -> list[KeyRecord]:
    out = []
    for i in range(count):
        digest = hmac.digest(PEPPER, f"sk-{prefix}-{i}".encode(), "sha256").hex()
        out.append(KeyRecord(key_id=contract.key_id_of(digest), digest=digest, user=f"{prefix}{i}"))
    return out


@contextlib.asynccontextmanager
async def _following(store: RedisStore) -> AsyncIterator[SnapshotFollower]:
    follower = SnapshotFollower(store, metrics=AuthzMetrics(max_keys=10))
    task = asyncio.create_task(follower.run())
    try:
        yield follower
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await store.close()


async def test_a_store_that_lost_its_data_is_reloaded_by_a_follower_that_followed_it_from_empty(
    redis_url: str,
) -> None:
    """A follower that loaded an empty store (it started before the control plane) and then applied events took the
    events of a store counting again from 1 for ones published during its load: revocations and new keys after a
    FLUSHALL were ignored until the generation passed its old value."""
    store = RedisStore(redis_url, timeout=5.0)
    old, new = _records("before", 1)[0], _records("after", 1)[0]
    async with _following(store) as follower:
        await eventually(lambda: follower.connected and follower.snapshot.loaded)
        for _ in range(4):
            await store.apply([contract.put(old)])  # generation 4, applied as events
        await eventually(lambda: follower.snapshot.generation == 4)
        await store._client.flushall()
        await store.apply([contract.put(new)])  # generation 1 of a store that lost its data
        await eventually(
            lambda: (
                bytes.fromhex(new.digest) in follower.snapshot.keys
                and bytes.fromhex(old.digest) not in follower.snapshot.keys
            )
        )


async def test_a_store_found_empty_after_a_restart_keeps_the_snapshot_until_it_is_written_again(
    redis_url: str,
) -> None:
    """Reloading an empty store (Redis restarted without its data) refused every key with a 401 until the control
    plane wrote it again; the snapshot now keeps serving meanwhile, and the control plane's write replaces it."""
    store = RedisStore(redis_url, timeout=5.0)
    kept, written = _records("kept", 2), _records("written", 1)[0]
    for record in kept:
        await store.apply([contract.put(record)])  # generation 2
    async with _following(store) as follower:
        await eventually(lambda: follower.connected and follower.snapshot.generation == 2)
        reloads = []
        reload = follower.reload

        async def counted(**options: Any) -> None:
            await reload(**options)
            reloads.append(options)

        follower.reload = counted  # type: ignore[method-assign]
        await store._client.flushall()
        await store._client.client_kill_filter(_type="pubsub")  # as a restart would: the subscription is lost
        await eventually(lambda: bool(reloads) and follower.connected)
        assert {bytes.fromhex(r.digest) for r in kept} <= set(follower.snapshot.keys)
        await store.apply([contract.put(written)])  # the control plane writes again: generation 1
        await eventually(lambda: set(follower.snapshot.keys) == {bytes.fromhex(written.digest)})


async def test_the_admin_view_reloads_a_store_that_lost_its_data_right_after_its_load(redis_url: str) -> None:
    """The control plane's admin view, fresh from its load, took every event at or below its generation for one
    published during the load: after a FLUSHALL the store's new records stayed out of the view (and the old ones in)
    until its generation passed the old one."""
    store = RedisStore(redis_url, timeout=5.0)
    old, new = _records("view-old", 1)[0], _records("view-new", 1)[0]
    for _ in range(5):
        await store.apply([contract.put(old)])  # generation 5
    view = AdminState(store, default_tier="free")
    task = asyncio.create_task(view.run())
    try:
        await eventually(lambda: view.generation == 5 and old.key_id in view.keys)
        await store._client.flushall()
        await store.apply([contract.put(new)])  # generation 1
        await eventually(lambda: new.key_id in view.keys and old.key_id not in view.keys)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await store.close()
