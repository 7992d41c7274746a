"""Settling one metered request: the bucket commit, the usage ledger and the token metrics, from the usage the
client was actually served. No HTTP here."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from gateway.contract import ledger_day
from gateway.errors import StoreError, StoreNotSent
from gateway.identity import Identity
from gateway.logs import RateLimitedLog
from gateway.meter import quota
from gateway.meter.metrics import OPERATIONS, MeterMetrics
from gateway.meter.quota import Reservation
from gateway.meter.request import Parsed
from gateway.meter.sse import Usage
from gateway.store import Store, UsageDelta
from gateway.store.base import UsageNotWritten

log = logging.getLogger("maas.meter")
_warn = RateLimitedLog(log)


@dataclass(slots=True)
class Exchange:
    """One metered request on its way through the meter."""

    identity: Identity
    parsed: Parsed
    reservation: Reservation
    model: str
    started: float
    settled: bool = False
    """Set as settling begins: a request cut after that (its client left, the meter stops) is not settled again,
    and is not cut while it settles."""
    sent: Callable[[], Usage] | None = None
    """What the client has been sent so far, for a stream (a cut stream is charged that)."""
    clock: Callable[[], float] = time.time
    """The clock whose UTC day the ledger row is filed under: Redis's, as the meter knows it (``ClockOffset.now``)."""

    @property
    def operation(self) -> str:
        return OPERATIONS[self.parsed.kind]


class UsageBacklog:
    """Ledger rows whose write certainly did not happen (no connection to Redis, a node of the cluster down, a write
    Redis refused): kept, merged per (key, model, day), and written once the store answers again, so an outage loses
    no usage. A write that was sent and then timed out may have landed: it is counted as a failed write and not made
    again (a usage ledger must not count twice). A row that landed while its day's key index did not is held with
    no counts, which adds the key to the index again (harmless if it was there)."""

    MAX_ROWS = 100_000
    """Distinct (key, model, day) rows held at most; past it a new row is dropped and counted as a failed write."""
    RETRY_SECONDS = 1.0

    def __init__(self, metrics: MeterMetrics) -> None:
        self._metrics = metrics
        self._rows: dict[tuple[str, str, str], UsageDelta] = {}
        self._debits: dict[str, tuple[Reservation, int]] = {}
        """Key -> bucket commits that certainly did not run, merged (the latest reservation names the bucket)."""

    def __len__(self) -> int:
        return len(self._rows) + len(self._debits)

    def hold_debit(self, reservation: Reservation, delta: int) -> None:
        """Keep a bucket commit that certainly did not run, to make once the store answers: a request served while
        Redis could not be reached is charged to its key's quota as well as to its ledger."""
        held = self._debits.get(reservation.key_id)
        if held is None and len(self._debits) >= self.MAX_ROWS:
            self._metrics.store_errors["commit"].inc()
            return
        self._debits[reservation.key_id] = (reservation, delta + (held[1] if held is not None else 0))
        self._metrics.backlog.set(len(self))

    def hold(self, rows: list[UsageDelta]) -> None:
        for row in rows:
            ident = (row.key_id, row.model, row.day)
            held = self._rows.get(ident)
            if held is not None:
                self._rows[ident] = UsageDelta(
                    key_id=row.key_id,
                    model=row.model,
                    day=row.day,
                    requests=held.requests + row.requests,
                    prompt_tokens=held.prompt_tokens + row.prompt_tokens,
                    completion_tokens=held.completion_tokens + row.completion_tokens,
                )
            elif len(self._rows) < self.MAX_ROWS:
                self._rows[ident] = row
            else:
                self._metrics.store_errors["ledger"].inc()
                _warn.warning("usage ledger backlog full (%d rows): key %s's row is lost", self.MAX_ROWS, row.key_id)
        self._metrics.backlog.set(len(self))

    async def flush(self, store: Store) -> bool:
        """Write what is held; True when nothing is left."""
        rows, self._rows = list(self._rows.values()), {}
        debits, self._debits = list(self._debits.values()), {}
        if rows:
            try:
                await store.add_usage(rows)
            except StoreError as exc:
                _kept(self._metrics, rows, exc, self)
        for reservation, delta in debits:
            await _adjust(store, self._metrics, reservation, delta, self)
        self._metrics.backlog.set(len(self))
        return not len(self)

    async def run(self, store: Store) -> None:
        """Write the backlog whenever it holds rows, for as long as the meter runs."""
        while True:
            await asyncio.sleep(self.RETRY_SECONDS)
            await self.flush(store)


async def settle(
    store: Store,
    metrics: MeterMetrics,
    exchange: Exchange,
    *,
    served: Usage | None,
    status: int,
    backlog: UsageBacklog | None = None,
) -> None:
    """Commit ``served`` (None: nothing was served, refund everything), write the ledger, count the tokens. The
    bucket commit and the ledger write are independent and go to the store together (one round trip on Redis)."""
    exchange.settled = True
    model_children = metrics.models.get((exchange.model, exchange.operation))
    model_children.requests(status).inc()
    if served is not None and served.total == 0 and status >= 400:
        # a request that ended before it served anything (its client left, its stream broke or went silent after
        # the head): no ledger row, which counts requests that served tokens
        served = None
    if served is None:
        await _commit(store, metrics, exchange, actual=0, backlog=backlog)
        return
    identity = exchange.identity
    children = metrics.key(key_id=identity.key_id, user=identity.user, tier=identity.tier, model=exchange.model)
    children.prompt.inc(served.prompt)
    children.completion.inc(served.completion)
    model_children.prompt_hist.observe(served.prompt)
    if exchange.parsed.generates:
        model_children.completion_hist.observe(served.completion)
    delta_row = UsageDelta(
        key_id=identity.key_id,
        model=exchange.model,
        day=ledger_day(exchange.clock()),
        requests=1,
        prompt_tokens=served.prompt,
        completion_tokens=served.completion,
    )
    await asyncio.gather(
        _commit(store, metrics, exchange, actual=served.total, backlog=backlog),
        _ledger(store, metrics, delta_row, backlog),
    )


async def _commit(
    store: Store, metrics: MeterMetrics, exchange: Exchange, *, actual: int, backlog: UsageBacklog | None
) -> None:
    reservation = exchange.reservation
    delta = actual - reservation.reserved
    if reservation.limit > 0 and delta != 0:
        await _adjust(store, metrics, reservation, delta, backlog)


async def _adjust(
    store: Store, metrics: MeterMetrics, reservation: Reservation, delta: int, backlog: UsageBacklog | None
) -> None:
    """Debit (refund) ``delta`` of the reservation's bucket; held for later when it certainly did not run (made
    again, it would count twice if it had)."""
    try:
        await quota.adjust(store, reservation, delta)
    except StoreError as exc:
        if isinstance(exc, StoreNotSent) and backlog is not None:
            backlog.hold_debit(reservation, delta)
            return
        metrics.store_errors["commit"].inc()
        _warn.warning("token commit failed for key %s: %s", reservation.key_id, exc)
        return
    if delta < 0:
        metrics.refunded.inc(-delta)
    else:
        metrics.debited.inc(delta)


async def _ledger(store: Store, metrics: MeterMetrics, row: UsageDelta, backlog: UsageBacklog | None) -> None:
    try:
        await store.add_usage([row])
    except StoreError as exc:
        _kept(metrics, [row], exc, backlog)


def _kept(metrics: MeterMetrics, rows: list[UsageDelta], exc: StoreError, backlog: UsageBacklog | None) -> None:
    """Hold what certainly did not land (written once the store answers), count and log what may have."""
    if isinstance(exc, UsageNotWritten):
        unsent, uncertain, unindexed = exc.unsent, exc.uncertain, exc.unindexed
    elif isinstance(exc, StoreNotSent):
        unsent, uncertain, unindexed = rows, [], []
    else:
        unsent, uncertain, unindexed = [], rows, []
    if backlog is not None:
        backlog.hold(unsent + unindexed)
    else:
        uncertain = uncertain + unsent
    if uncertain or (backlog is None and unindexed):
        metrics.store_errors["ledger"].inc()
        keys = ", ".join(sorted({d.key_id for d in uncertain or unindexed}))
        _warn.warning("usage ledger write failed for key %s: %s", keys[:200], exc)
