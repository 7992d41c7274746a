"""Kubernetes Warning Events about skipped objects, sent from a bounded queue by a few workers at a capped rate, so
thousands of malformed objects cost the API server a trickle of writes instead of a burst of one request each.

As client-go's event broadcaster: a queue of ``QUEUE_SIZE`` (an Event that does not fit is dropped and counted), a
token bucket of ``BURST`` Events refilled at ``RATE`` a second (client-go's is per object; here the Syncer already
sends one Event per problem, so the bucket is global), and ``WORKERS`` requests in flight at most.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from controlplane.errors import SourceError
from controlplane.kinds import Obj, key_of
from controlplane.metrics import Metrics
from controlplane.sources.base import Source

log = logging.getLogger("maas.controlplane.events")

QUEUE_SIZE = 1000
BURST = 25
RATE = 5.0
"""Events a second, sustained."""
WORKERS = 2

Lost = Callable[[Hashable], None]
"""Called with an Event's ident when it was dropped or could not be written (so it may be tried again later)."""


@dataclass(frozen=True, slots=True)
class _Pending:
    ident: Hashable
    obj: Obj
    reason: str
    message: str


class TokenBucket:
    def __init__(self, *, burst: int, rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._burst = float(burst)
        self._rate = rate
        self._clock = clock
        self._tokens = float(burst)
        self._at = clock()

    def reserve(self) -> float:
        """Take a token, borrowing it if there is none: how long to wait before using it (0.0: at once)."""
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._at) * self._rate) - 1.0
        self._at = now
        return 0.0 if self._tokens >= 0.0 else -self._tokens / self._rate

    async def take(self) -> None:
        delay = self.reserve()
        if delay > 0:
            await asyncio.sleep(delay)


class EventQueue:
    def __init__(self, *, source: Source, metrics: Metrics, lost: Lost) -> None:
        self._source = source
        self._metrics = metrics
        self._lost = lost
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue(maxsize=QUEUE_SIZE)
        self._bucket = TokenBucket(burst=BURST, rate=RATE)

    def submit(self, ident: Hashable, obj: Obj, *, reason: str, message: str) -> bool:
        """Queue an Event; False (counted, and ``lost`` called) when the queue is full."""
        try:
            self._queue.put_nowait(_Pending(ident=ident, obj=obj, reason=reason, message=message))
        except asyncio.QueueFull:
            self._metrics.warning_events.labels(result="dropped").inc()
            self._lost(ident)
            return False
        return True

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            for i in range(WORKERS):
                group.create_task(self._work(), name=f"events-{i}")

    async def _work(self) -> None:
        while True:
            pending = await self._queue.get()
            await self._bucket.take()
            try:
                await self._source.report(pending.obj, reason=pending.reason, message=pending.message)
            except SourceError as exc:
                log.warning("cannot record a Kubernetes Event for %s: %s", key_of(pending.obj), exc)
                self._metrics.warning_events.labels(result="failed").inc()
                self._lost(pending.ident)
            else:
                self._metrics.warning_events.labels(result="sent").inc()
            finally:
                self._queue.task_done()
