"""In-memory store for single-process use (``memory://``) and unit tests: same semantics as Redis, one event loop."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from types import TracebackType
from typing import Generic, Self, TypeVar

from gateway.contract import Change, ChangeEvent, RecordKind
from gateway.errors import StoreError
from gateway.limits import BucketMode, BucketOp, BucketResult, BucketState, evaluate
from gateway.store.base import LEDGER_WRITE_TTL_SECONDS, RESERVATION_TTL_MS, BucketsDone, UsageDelta, UsageRow

_CLOSED = object()
_RELEASED = -1
"""The tokens of a reservation marker once released (a reservation takes zero or more)."""


def _monotonic_ms() -> float:
    """The buckets' clock: their states never leave this process, so a wall clock's steps (NTP, a VM resumed or
    migrated) must not refill them at once (a step forward) or stall them (a step back)."""
    return time.monotonic() * 1000.0


class _MemorySubscription:
    def __init__(self, store: MemoryStore) -> None:
        self._store = store
        self._queue: asyncio.Queue[ChangeEvent | object] = asyncio.Queue()

    async def __aenter__(self) -> Self:
        self._store._subscribers.add(self._queue)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._store._subscribers.discard(self._queue)

    def __aiter__(self) -> AsyncIterator[ChangeEvent]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[ChangeEvent]:
        while True:
            item = await self._queue.get()
            if item is _CLOSED:
                raise StoreError("memory store closed")
            assert isinstance(item, ChangeEvent)
            yield item


class MemoryStore:
    def __init__(self, *, clock_ms: Callable[[], float] = _monotonic_ms) -> None:
        self._clock_ms = clock_ms
        self._records: dict[RecordKind, dict[str, bytes]] = {kind: {} for kind in RecordKind}
        self._generation = 0
        self._buckets: dict[tuple[str, str], BucketState] = {}
        self._usage: dict[tuple[str, str, str], list[int]] = {}
        self._reservations = _Expiring[tuple[str, str, str], tuple[int | None, bool]]()
        """(key, dimension, reservation id) -> tokens it took (None: it has not run; ``_RELEASED``), committed."""
        self._written = _Expiring[str, int]()
        """Ledger write ids that landed."""
        self._subscribers: set[asyncio.Queue[ChangeEvent | object]] = set()
        self.fail = False
        """Set to simulate an outage: every call raises ``StoreError``."""

    def _check(self) -> None:
        if self.fail:
            raise StoreError("memory store is failing (simulated outage)")

    async def ping(self) -> None:
        self._check()

    async def close(self) -> None:
        for queue in list(self._subscribers):
            queue.put_nowait(_CLOSED)

    async def generation(self) -> int:
        self._check()
        return self._generation

    async def scan_records(self, kind: RecordKind, *, batch: int = 5000) -> AsyncIterator[list[tuple[str, bytes]]]:
        self._check()
        items = list(self._records[kind].items())
        for start in range(0, len(items), batch):
            yield items[start : start + batch]

    async def get_record(self, kind: RecordKind, ident: str) -> bytes | None:
        self._check()
        return self._records[kind].get(ident)

    async def apply(self, changes: Sequence[Change]) -> int:
        self._check()
        for change in changes:
            table = self._records[change.kind]
            if change.value is None:
                table.pop(change.id, None)
            else:
                table[change.id] = change.value.encode()
        self._generation += 1
        event = ChangeEvent(gen=self._generation, changes=tuple(changes))
        for queue in self._subscribers:
            queue.put_nowait(event)
        return self._generation

    def subscribe(self) -> _MemorySubscription:
        self._check()
        return _MemorySubscription(self)

    sharded = False

    def shard_of(self, key_id: str) -> str:
        return ""

    async def check_buckets(self, groups: Sequence[Sequence[BucketOp]]) -> list[list[BucketResult]]:
        self._check()
        return self.check_now(groups)

    def submit_buckets(self, groups: Sequence[Sequence[BucketOp]], done: BucketsDone) -> bool:
        return False  # nothing to wait for: check_buckets answers in the same turn

    def check_now(self, groups: Sequence[Sequence[BucketOp]]) -> list[list[BucketResult]]:
        """The same check, synchronously (the in-process ``local`` failure policy answers without awaiting)."""
        now = self._clock_ms()
        out: list[list[BucketResult]] = []
        for ops in groups:
            keys = [(op.key_id, op.dimension) for op in ops]
            results, states = evaluate(list(ops), [self._buckets.get(k) for k in keys], now_ms=now)
            for key, state in zip(keys, states, strict=True):
                if state is None:
                    self._buckets.pop(key, None)
                else:
                    self._buckets[key] = state
            out.append(results)
        return out

    async def reset_buckets(self, key_id: str, dimensions: Sequence[str]) -> None:
        self._check()
        for dimension in dimensions:
            self._buckets.pop((key_id, dimension), None)

    async def reserve(self, op: BucketOp, reservation: str) -> BucketResult:
        self._check()
        now = self._clock_ms()
        marker = (op.key_id, op.dimension, reservation)
        ran = self._reservations.get(marker, now)
        if ran is not None:
            return self._made_again(op, *ran)
        [[result]] = self.check_now([[op]])
        self._reservations.put(marker, (result.debited, False), now=now, ttl=RESERVATION_TTL_MS)
        return result

    def _made_again(self, op: BucketOp, taken: int | None, committed: bool) -> BucketResult:
        """A reservation that finds its marker: made again (a client's retry), what it took and the level now;
        released or committed before it ran, denied."""
        if taken is None or taken == _RELEASED or committed:
            return BucketResult(allowed=False, limit=op.limit, remaining=0, reset_ms=0, retry_ms=0, debited=0)
        gate = BucketOp(
            key_id=op.key_id,
            dimension=op.dimension,
            limit=op.limit,
            window_ms=op.window_ms,
            cost=0,
            mode=BucketMode.GATE,
        )
        [[level]] = self.check_now([[gate]])
        return BucketResult(
            allowed=taken > 0,
            limit=op.limit,
            remaining=level.remaining,
            reset_ms=level.reset_ms,
            retry_ms=0,
            debited=taken,
        )

    def submit_reserve(self, op: BucketOp, reservation: str, done: BucketsDone) -> bool:
        return False

    async def release(self, op: BucketOp, reservation: str) -> None:
        self._check()
        now = self._clock_ms()
        marker = (op.key_id, op.dimension, reservation)
        taken, committed = self._reservations.get(marker, now) or (None, False)
        self._reservations.put(marker, (_RELEASED, committed), now=now, ttl=RESERVATION_TTL_MS)
        if taken is not None and taken > 0:
            self._force(op, -taken)

    async def commit(self, op: BucketOp, reservation: str) -> None:
        self._check()
        now = self._clock_ms()
        marker = (op.key_id, op.dimension, reservation)
        taken, committed = self._reservations.get(marker, now) or (None, False)
        if not committed:
            self._force(op, op.cost)
            self._reservations.put(marker, (taken, True), now=now, ttl=RESERVATION_TTL_MS)

    def _force(self, op: BucketOp, cost: int) -> None:
        forced = BucketOp(
            key_id=op.key_id,
            dimension=op.dimension,
            limit=op.limit,
            window_ms=op.window_ms,
            cost=cost,
            mode=BucketMode.FORCE,
        )
        self.check_now([[forced]])

    async def add_usage(self, deltas: Sequence[UsageDelta]) -> None:
        self._check()
        now = self._clock_ms()
        for d in deltas:
            if d.counts:
                if self._written.get(d.write_id, now) is not None:
                    continue  # made again: it landed the first time
                self._written.put(d.write_id, 1, now=now, ttl=LEDGER_WRITE_TTL_SECONDS * 1000)
            row = self._usage.setdefault((d.key_id, d.day, d.model), [0, 0, 0])
            row[0] += d.requests
            row[1] += d.prompt_tokens
            row[2] += d.completion_tokens

    async def read_usage(self, key_id: str, days: Sequence[str]) -> list[UsageRow]:
        self._check()
        wanted = set(days)
        return [
            UsageRow(key_id=k, model=m, day=d, requests=r[0], prompt_tokens=r[1], completion_tokens=r[2])
            for (k, d, m), r in sorted(self._usage.items())
            if k == key_id and d in wanted
        ]

    async def usage_key_ids(self, day: str) -> list[str]:
        self._check()
        return sorted({k for (k, d, _) in self._usage if d == day})


K = TypeVar("K")
V = TypeVar("V")


class _Expiring(Generic[K, V]):
    """Markers that expire, as keys with a TTL in Redis: every marker of a kind lives as long, so they expire in the
    order they were put, and the expired ones are dropped from the front as new ones come."""

    def __init__(self) -> None:
        self._items: dict[K, tuple[V, float]] = {}

    def get(self, key: K, now: float) -> V | None:
        held = self._items.get(key)
        return held[0] if held is not None and held[1] > now else None

    def put(self, key: K, value: V, *, now: float, ttl: float) -> None:
        self._items.pop(key, None)  # to the end: the order stays the order of expiry
        self._items[key] = (value, now + ttl)
        while True:
            first = next(iter(self._items.items()))
            if first[1][1] > now:
                return
            del self._items[first[0]]
