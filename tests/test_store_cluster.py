"""The Redis store against a real Redis Cluster losing a node: change events, bucket checks and the usage ledger
keep working on what is left. Each test has a cluster of its own (it kills a node of it)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import pytest

from gateway import contract
from gateway.contract import RecordKind
from gateway.errors import StoreError
from gateway.store.redis import RedisStore
from tests.support.procs import redis_cluster

pytestmark = pytest.mark.redis

T = TypeVar("T")


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
