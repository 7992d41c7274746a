"""A rolling upgrade: processes of two versions share one Redis. The other version is stood for by writing what it
would write (records, change events, bucket states, ledger rows) into a real redis-server directly."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
from collections.abc import AsyncIterator, Coroutine
from typing import Any

import pytest
import redis.asyncio as aioredis

from controlplane.admin.state import AdminState
from gateway import contract
from gateway.authz.follower import SnapshotFollower
from gateway.authz.metrics import AuthzMetrics
from gateway.contract import KeyRecord
from gateway.errors import StoreError
from gateway.limits import BucketOp
from gateway.store.redis import RedisStore
from tests.support.k8s_emulator import eventually

pytestmark = pytest.mark.redis

PEPPER = b"version-skew-pepper"


def _key(name: str) -> KeyRecord:
    digest = hmac.digest(PEPPER, name.encode(), "sha256").hex()
    return KeyRecord(key_id=contract.key_id_of(digest), digest=digest, user=name)


def _as_written(record: KeyRecord, **changes: Any) -> str:
    """``record`` as another version would write it: fields changed, added, or (value None) left out."""
    data = json.loads(contract.encode_record(record))
    for name, value in changes.items():
        if value is None:
            data.pop(name, None)
        else:
            data[name] = value
    return json.dumps(data)


def _skipped(metrics: AuthzMetrics, kind: str, reason: str) -> float:
    labels = {"kind": kind, "reason": reason}
    return metrics.registry.get_sample_value("maas_snapshot_skipped_records_total", labels) or 0


def _reloads(metrics: AuthzMetrics, reason: str) -> float:
    return metrics.registry.get_sample_value("maas_snapshot_reloads_total", {"reason": reason}) or 0


@contextlib.asynccontextmanager
async def _following(redis_url: str) -> AsyncIterator[tuple[SnapshotFollower, AuthzMetrics, aioredis.Redis]]:
    store = RedisStore(redis_url, timeout=5.0)
    metrics = AuthzMetrics(max_keys=10)
    follower = SnapshotFollower(store, metrics=metrics)
    async with _running(redis_url, store, follower.run()) as raw:
        yield follower, metrics, raw


@contextlib.asynccontextmanager
async def _running(redis_url: str, store: RedisStore, loop: Coroutine[Any, Any, None]) -> AsyncIterator[aioredis.Redis]:
    """``loop`` (a follower's or the admin view's) in a task while the context runs, with a raw client of the same
    Redis to write as another version would; then the task, the client and ``store`` closed."""
    raw = aioredis.Redis.from_url(redis_url)
    task = asyncio.create_task(loop)
    try:
        yield raw
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await raw.aclose()
        await store.close()


async def _publish(raw: aioredis.Redis, event: dict[str, Any] | str) -> int:
    """A change event as another version's control plane would publish it, with the generation it takes."""
    gen = int(await raw.incr(contract.GENERATION_KEY))
    if isinstance(event, dict):
        event = json.dumps({**event, "gen": gen})
    await raw.publish(contract.EVENTS_CHANNEL, event)
    return gen


async def test_records_of_another_version_are_read_or_skipped_by_what_they_are(redis_url: str) -> None:
    """An older writer's record (a field it did not have yet) and a newer writer's optional field are read; a record
    of a newer schema version is skipped as such even when it does not validate as this version's (it had been
    counted as malformed, so a rollout in the wrong order looked like corrupt data)."""
    older, additive, newer = _key("older"), _key("additive"), _key("newer")
    raw = aioredis.Redis.from_url(redis_url)
    await raw.hset(
        contract.KEYS_HASH,
        mapping={
            older.digest: _as_written(older, created_at=None, source=None, name=None),
            additive.digest: _as_written(additive, ip_allowlist=["10.0.0.0/8"]),
            newer.digest: _as_written(newer, v=2, status="suspended"),
        },
    )
    await raw.set(contract.GENERATION_KEY, 1)
    await raw.aclose()
    async with _following(redis_url) as (follower, metrics, _):
        await eventually(lambda: follower.snapshot.loaded)
        keys = follower.snapshot.keys
        assert bytes.fromhex(older.digest) in keys and bytes.fromhex(additive.digest) in keys
        assert bytes.fromhex(newer.digest) not in keys
        assert _skipped(metrics, "key", "schema_version") == 1
        assert _skipped(metrics, "key", "malformed") == 0


async def test_changes_of_a_record_kind_this_version_does_not_know_are_left_out_of_the_event(redis_url: str) -> None:
    """A newer control plane's event may carry a kind of record this version has no table for: the known changes
    apply and the generation moves on (the whole event had failed to decode, and every such event cost a full
    reload with a traceback in the log)."""
    added = _key("added")
    async with _following(redis_url) as (follower, metrics, raw):
        await eventually(lambda: follower.connected)
        gen = await _publish(
            raw,
            {
                "v": contract.SCHEMA_VERSION,
                "changes": [
                    {"kind": "quota", "id": "q1", "value": "{}"},
                    {"kind": "key", "id": added.digest, "value": contract.encode_record(added)},
                ],
            },
        )
        await eventually(lambda: follower.snapshot.generation == gen)
        assert bytes.fromhex(added.digest) in follower.snapshot.keys
        assert _skipped(metrics, "unknown", "unknown_kind") == 1
        assert _reloads(metrics, "start") == 1 and _reloads(metrics, "error") == 0


@pytest.mark.parametrize(
    "event",
    [
        pytest.param("newer", id="newer-schema-version"),
        pytest.param("not an event", id="not-json"),
        pytest.param({"v": contract.SCHEMA_VERSION, "changes": "all"}, id="changes-not-a-list"),
    ],
)
async def test_an_event_this_version_cannot_read_is_never_applied_and_reloads(
    redis_url: str, event: str | dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    """An event of a newer schema version had been applied as if it were this version's (here: a delete of a key
    the store still holds), and an undecodable one ended the follower with a traceback; both now reload from the
    store, counted by their own reason."""
    kept = _key("kept")
    raw = aioredis.Redis.from_url(redis_url)
    await raw.hset(contract.KEYS_HASH, kept.digest, contract.encode_record(kept))
    await raw.set(contract.GENERATION_KEY, 1)
    await raw.aclose()
    if event == "newer":
        event = {"v": contract.SCHEMA_VERSION + 1, "changes": [{"kind": "key", "id": kept.digest, "value": None}]}
    async with _following(redis_url) as (follower, metrics, raw):
        await eventually(lambda: follower.connected)
        gen = await _publish(raw, event)
        await eventually(lambda: _reloads(metrics, "unreadable_event") == 1 and follower.snapshot.generation == gen)
        assert bytes.fromhex(kept.digest) in follower.snapshot.keys
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_the_admin_view_reloads_on_an_event_it_cannot_read(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = RedisStore(redis_url, timeout=5.0)
    first, second = _key("view-first"), _key("view-second")
    await store.apply([contract.put(first)])
    view = AdminState(store, default_tier="free")
    async with _running(redis_url, store, view.run()) as raw:
        await eventually(lambda: first.key_id in view.keys)
        await raw.hset(contract.KEYS_HASH, second.digest, contract.encode_record(second))
        await _publish(raw, {"v": contract.SCHEMA_VERSION + 1, "changes": []})
        await eventually(lambda: second.key_id in view.keys)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize(
    "state",
    [
        pytest.param(b"garbage", id="no-separator"),
        pytest.param(b"5", id="one-number"),
        pytest.param(b"5 abc", id="no-timestamp"),
        pytest.param(b"5 1700000000000 2", id="a-third-field"),
        pytest.param(None, id="a-list"),
    ],
)
async def test_a_bucket_state_of_another_layout_fails_no_check_and_is_rewritten(
    redis_url: str, state: bytes | None
) -> None:
    """One bucket this script could not parse had failed the whole script call: every check batched with it, other
    keys' too, followed --on-store-error, and the state stayed as it was (nothing rewrote it). It reads as a full
    bucket now, as a missing one does, and the take rewrites it in this version's layout."""
    store = RedisStore(redis_url, timeout=2.0)
    raw = aioredis.Redis.from_url(redis_url)
    name = contract.bucket_key("foreign", "requests")
    if state is None:
        await raw.rpush(name, b"5", b"1700000000000")
    else:
        await raw.set(name, state)
    foreign = BucketOp(key_id="foreign", dimension="requests", limit=10, window_ms=60_000, cost=1)
    other = BucketOp(key_id="neighbour", dimension="requests", limit=10, window_ms=60_000, cost=1)
    try:
        ((f,), (o,)) = await store.check_buckets([[foreign], [other]])
        assert f.allowed and f.remaining == 9
        assert o.allowed and o.remaining == 9
        level, _, stamp = (await raw.get(name)).partition(b" ")
        assert level == b"9" and stamp.isdigit()
    finally:
        await raw.aclose()
        await store.close()


async def test_a_ledger_counter_that_is_not_an_integer_fails_the_read_with_the_row_named(redis_url: str) -> None:
    """Counters of suffixes this version does not know are not summed; a value no HINCRBY wrote (another writer's
    float) had escaped as a bare ValueError (a 500 from the admin API)."""
    raw = aioredis.Redis.from_url(redis_url)
    row = contract.ledger_key("skewed", "20261201")
    await raw.hset(row, mapping={"m|requests": "2", "m|prompt": "7", "m|cached": "4"})
    store = RedisStore(redis_url, timeout=2.0)
    try:
        (read,) = await store.read_usage("skewed", ["20261201"])
        assert (read.model, read.requests, read.prompt_tokens, read.completion_tokens) == ("m", 2, 7, 0)
        await raw.hset(row, "m|completion", "1.5")
        with pytest.raises(StoreError, match=r"m\|completion"):
            await store.read_usage("skewed", ["20261201"])
    finally:
        await raw.aclose()
        await store.close()
