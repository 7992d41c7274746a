"""Settling one metered request: the bucket commit, the usage ledger and the token metrics, from the usage the
client was actually served. No HTTP here."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from gateway.contract import ledger_day
from gateway.errors import StoreError
from gateway.identity import Identity
from gateway.logs import RateLimitedLog
from gateway.meter import quota
from gateway.meter.metrics import OPERATIONS, MeterMetrics
from gateway.meter.quota import Reservation
from gateway.meter.request import Parsed
from gateway.meter.sse import Usage
from gateway.store import Store, UsageDelta

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

    @property
    def operation(self) -> str:
        return OPERATIONS[self.parsed.kind]


async def settle(store: Store, metrics: MeterMetrics, exchange: Exchange, *, served: Usage | None, status: int) -> None:
    """Commit ``served`` (None: nothing was served, refund everything), write the ledger, count the tokens. The
    bucket commit and the ledger write are independent and go to the store together (one round trip on Redis)."""
    exchange.settled = True
    model_children = metrics.models.get((exchange.model, exchange.operation))
    model_children.requests(status).inc()
    if served is not None and served.total == 0 and status == 499:
        served = None  # the client left before anything was sent: nothing served, no ledger row
    if served is None:
        await _commit(store, metrics, exchange, actual=0)
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
        day=ledger_day(),
        requests=1,
        prompt_tokens=served.prompt,
        completion_tokens=served.completion,
    )
    await asyncio.gather(_commit(store, metrics, exchange, actual=served.total), _ledger(store, metrics, delta_row))


async def _commit(store: Store, metrics: MeterMetrics, exchange: Exchange, *, actual: int) -> None:
    try:
        delta = await quota.commit(store, exchange.reservation, actual=actual)
    except StoreError as exc:
        metrics.store_errors["commit"].inc()
        _warn.warning("token commit failed for key %s: %s", exchange.identity.key_id, exc)
        return
    if delta < 0:
        metrics.refunded.inc(-delta)
    elif delta > 0 and exchange.reservation.limit > 0:
        metrics.debited.inc(delta)


async def _ledger(store: Store, metrics: MeterMetrics, row: UsageDelta) -> None:
    try:
        await store.add_usage([row])
    except StoreError as exc:
        metrics.store_errors["ledger"].inc()
        _warn.warning("usage ledger write failed for key %s: %s", row.key_id, exc)
