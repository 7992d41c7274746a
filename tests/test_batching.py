"""The bucket batcher: concurrent checks share one store call, every caller hears its own result or the batch's
error, and one caller's failing callback does not keep the others from their answers."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from gateway.errors import StoreError
from gateway.limits import BucketMode, BucketOp, BucketResult
from gateway.store.batching import BucketBatcher, Done
from gateway.store.memory import MemoryStore


def op(key: str, limit: int = 2) -> BucketOp:
    return BucketOp(key_id=key, dimension="requests", limit=limit, window_ms=60_000, cost=1, mode=BucketMode.TAKE)


class Counting(MemoryStore):
    def __init__(self, *, fail: bool = False) -> None:
        super().__init__()
        self.calls: list[int] = []
        self.fail = fail

    async def check_buckets(self, groups: Sequence[Sequence[BucketOp]]) -> list[list[BucketResult]]:
        self.calls.append(len(groups))
        if self.fail:
            raise StoreError("redis down")
        return await super().check_buckets(groups)


async def test_a_lone_check_goes_at_once_and_checks_arriving_meanwhile_share_one_store_call() -> None:
    """The first check on an idle batcher is sent in ``submit`` (it does not wait for the loop turn to end); the
    checks of the same turn that follow it wait for it (``max_inflight=1``) and then go together."""
    store = Counting()
    batcher = BucketBatcher(store, max_inflight=1)
    got: dict[int, list[BucketResult] | None] = {}
    finished = asyncio.Event()

    def done(i: int) -> Done:
        def call(results: list[BucketResult] | None, error: BaseException | None) -> None:
            assert error is None
            got[i] = results
            if len(got) == 3:
                finished.set()

        return call

    for i in range(3):
        batcher.submit([op("k")], done(i))
    future = batcher.check([op("other")])
    await asyncio.wait_for(finished.wait(), 2)
    assert (await future)[0].allowed
    assert store.calls == [1, 3]
    assert [got[i][0].allowed for i in range(3)] == [True, True, False]  # type: ignore[index]


async def test_after_a_large_batch_an_idle_batcher_coalesces_the_turn_instead_of_sending_at_once() -> None:
    """Sending at once is for low load: after a batch of more than LOW_LOAD_BATCH checks, the first check of a turn
    waits for the turn's batch (else under load every turn's first check would cost a store call of its own)."""
    store = Counting()
    batcher = BucketBatcher(store, max_inflight=1)

    async def turn(count: int) -> None:
        futures = [batcher.check([op(f"k{len(store.calls)}-{i}", limit=100)]) for i in range(count)]
        await asyncio.wait_for(asyncio.gather(*futures), 2)

    await turn(5)  # idle and low load: the first at once, the other four together
    assert store.calls == [1, 4]
    await turn(3)  # the last batch held 4: the whole turn goes as one batch
    assert store.calls == [1, 4, 3]
    await turn(1)  # the last batch held 3: a lone check waits for the end of its turn (a batch of one either way)
    await turn(2)  # the last batch held 1: low load again, the first goes at once
    assert store.calls == [1, 4, 3, 1, 1, 1]


async def test_results_never_reach_a_caller_before_submit_returns() -> None:
    """Callers (the ext_authz check) rely on ``done`` coming later, never from inside ``submit``, even when the
    check is sent at once."""
    batcher = BucketBatcher(Counting())
    calls: list[str] = []
    heard = asyncio.Event()

    def done(results: list[BucketResult] | None, error: BaseException | None) -> None:
        calls.append("done")
        heard.set()

    batcher.submit([op("k")], done)
    calls.append("returned")
    await asyncio.wait_for(heard.wait(), 2)
    assert calls == ["returned", "done"]


async def test_a_failed_batch_reaches_every_caller_and_a_raising_callback_does_not_stop_the_others() -> None:
    batcher = BucketBatcher(Counting(fail=True))
    errors: list[BaseException | None] = []

    def broken(results: list[BucketResult] | None, error: BaseException | None) -> None:
        raise RuntimeError("caller bug")

    batcher.submit([op("a")], broken)
    batcher.submit([op("b")], lambda results, error: errors.append(error))
    future = batcher.check([op("c")])
    with pytest.raises(StoreError):
        await asyncio.wait_for(future, 2)
    assert len(errors) == 1 and isinstance(errors[0], StoreError)
