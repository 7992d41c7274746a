"""Coalesces concurrent bucket checks into one store call per loop turn.

A round trip to Redis per request costs more CPU than the whole hot-path budget. Checks that arrive while a batch is
out wait for the next one, sent at the end of the loop turn; at most ``max_inflight`` batches are outstanding. At low
load (nothing in flight, nothing waiting, and the last batch held at most ``LOW_LOAD_BATCH`` checks) a check is sent
at once instead: a lone request does not wait for the end of the loop turn. Under load batches are large and every
check waits for its turn's batch (sending the first check of each turn alone had doubled the number of Redis calls
at saturation). Each key's group is still checked atomically by the store, so batching changes cost, never results.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from functools import partial

from gateway.errors import StoreError
from gateway.limits import BucketOp, BucketResult
from gateway.store.base import GroupsFailed, Store, outcome_into, send_buckets

log = logging.getLogger("maas.store.batching")

LOW_LOAD_BATCH = 2
"""A last batch of at most this many checks means low load: the next check on an idle batcher is sent at once."""

Done = Callable[[list[BucketResult] | None, BaseException | None], None]
"""Called once with the group's results, or with the error that failed its batch."""
Pending = tuple[Sequence[BucketOp], Done]


class BucketBatcher:
    def __init__(
        self,
        store: Store,
        *,
        max_inflight: int = 2,
        max_batch: int = 512,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        self._store = store
        self._max_inflight = max_inflight
        self._max_batch = max_batch
        self._on_batch = on_batch
        self._pending: list[Pending] = []
        self._scheduled = False
        self._inflight = 0
        self._last_size = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        """The loop of the first check (``asyncio.get_running_loop`` costs a getpid system call per call); a batcher
        serves one loop, as its store's connection does."""

    @property
    def unhurried(self) -> bool:
        """Nothing waiting and a batch slot free: a check submitted now goes out in this loop turn."""
        return not self._pending and self._inflight < self._max_inflight

    def check(self, ops: Sequence[BucketOp]) -> asyncio.Future[list[BucketResult]]:
        """The group's results as a future."""
        future: asyncio.Future[list[BucketResult]] = asyncio.get_running_loop().create_future()

        self.submit(ops, outcome_into(future))
        return future

    def submit(self, ops: Sequence[BucketOp], done: Done) -> None:
        """The group's results handed to ``done`` as soon as its batch returns, in the same loop turn (no future
        and no extra callback per check on the hot path)."""
        if not self._inflight and not self._pending and self._last_size <= LOW_LOAD_BATCH:
            self._send([(ops, done)])
            return
        self._pending.append((ops, done))
        if not self._scheduled and self._inflight < self._max_inflight:
            self._schedule()

    def _schedule(self) -> None:
        self._scheduled = True
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        while self._pending and self._inflight < self._max_inflight:
            batch = self._pending[: self._max_batch]
            del self._pending[: self._max_batch]
            self._send(batch)

    def _send(self, batch: list[Pending]) -> None:
        self._inflight += 1
        self._last_size = len(batch)
        # straight onto the store's connection when it can take callbacks; a task only when it cannot
        groups = [batch[0][0]] if len(batch) == 1 else [ops for ops, _ in batch]
        send_buckets(self._store, groups, partial(self._finish, batch))
        if self._on_batch is not None:
            self._on_batch(len(batch))

    def _finish(
        self, batch: list[Pending], results: list[list[BucketResult]] | None, error: BaseException | None
    ) -> None:
        try:
            if isinstance(error, GroupsFailed):  # some groups failed, the others have their answers
                for i, (_, done) in enumerate(batch):
                    failed = error.errors.get(i)
                    _call(done, None if failed is not None else error.results[i], failed)
            elif error is not None or results is None:
                failure = error or StoreError("the store returned no results")
                for _, done in batch:
                    _call(done, None, failure)
            else:
                for (_, done), result in zip(batch, results, strict=True):
                    _call(done, result, None)
        finally:
            self._inflight -= 1
            if self._pending and not self._scheduled:
                self._schedule()


def _call(done: Done, results: list[BucketResult] | None, error: BaseException | None) -> None:
    try:
        done(results, error)
    except Exception:  # one caller's failure must not keep the others of the batch from their answers
        log.exception("bucket check callback failed")
