"""A rolling upgrade: processes of two versions share one Redis. The other version is stood for by writing what it
would write (records, change events, bucket states, ledger rows) into a real redis-server directly."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from gateway import contract
from gateway.limits import BucketOp
from gateway.store.redis import RedisStore

pytestmark = pytest.mark.redis

PEPPER = b"version-skew-pepper"


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
