"""Settling one metered request: the bucket commit, the usage ledger and the token metrics, from the usage the
client was actually served. No HTTP here."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from functools import partial

from gateway.contract import ledger_day
from gateway.errors import StoreError, StoreNotSent
from gateway.identity import Identity
from gateway.limits import BucketOp
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
    """What the store did not take, made again once it answers, so an outage loses no usage and leaves no bucket
    short:

    - ledger rows whose write certainly did not happen (no connection to Redis, a node of the cluster down, a write
      Redis refused): merged per (key, model, day);
    - ledger rows whose write may have landed (sent, then timed out or the connection broke): each apart, with its
      own write id, which the store counts once (never merged: the merged row would count again what had landed);
    - bucket commits that certainly did not run, merged per key (under the reservation id of the first: it never
      ran either);
    - bucket commits that may have run, each apart with its reservation id, which the store commits once;
    - releases of reservations whose answer was lost, each by its id (a release is idempotent).

    A row that landed while its day's key index did not is held with no counts, which adds the key to the index
    again (harmless if it was there)."""

    UNCERTAIN_RETRY_SECONDS = 540.0
    """How long what may have landed is made again (its answer was lost): a minute within the life of its marker in
    Redis (``LEDGER_WRITE_TTL_SECONDS``, ``RESERVATION_TTL_MS``), past which a write that had landed would count
    again. Then it is dropped, counted as a failed write and logged: after a lost answer the write most likely ran
    (Redis paused, a connection cut after it answered), so dropping it undercharges at worst."""
    MAX_ROWS = 100_000
    """Rows held at most (merged and apart together), and as many commits and releases; past it a new one is
    dropped and counted as a failed write."""
    RETRY_SECONDS = 1.0
    FLUSH_CONCURRENCY = 32
    """Commits and releases a flush has waiting for the store at once: while Redis does not answer, a flush of
    thousands lasts a few store timeouts, not one per write (past the termination grace at shutdown, or past the
    time what may have landed can be made again in), and a Redis Cluster node's connection pool is not exhausted."""

    def __init__(self, metrics: MeterMetrics) -> None:
        self._metrics = metrics
        self._rows: dict[tuple[str, str, str], UsageDelta] = {}
        self._again: dict[str, UsageDelta] = {}
        """Write id -> a row that may have landed."""
        self._debits: dict[str, tuple[Reservation, int]] = {}
        """Key -> bucket commits that certainly did not run, merged."""
        self._commits: dict[str, tuple[Reservation, int]] = {}
        """Reservation id -> a bucket commit that may have run."""
        self._releases: dict[str, BucketOp] = {}
        """Reservation id -> its bucket operation."""
        self._since: dict[str, float] = {}
        """Write or reservation id -> when what may have landed under it was first held (monotonic seconds)."""

    def __len__(self) -> int:
        return len(self._rows) + len(self._again) + len(self._debits) + len(self._commits) + len(self._releases)

    def hold_debit(self, reservation: Reservation, delta: int) -> None:
        """Keep a bucket commit that certainly did not run, to make once the store answers: a request served while
        Redis could not be reached is charged to its key's quota as well as to its ledger."""
        held = self._debits.get(reservation.key_id)
        if held is None and len(self._debits) >= self.MAX_ROWS:
            self._metrics.store_errors["commit"].inc()
            return
        if held is not None:  # the latest reservation names the bucket (its limit), the first's id the commit
            reservation, delta = replace(reservation, ident=held[0].ident), held[1] + delta
        self._debits[reservation.key_id] = (reservation, delta)
        self._metrics.backlog.set(len(self))

    def hold_commit(self, reservation: Reservation, delta: int) -> bool:
        """Keep a bucket commit that may have run, to make again under its reservation id until the store answers;
        False when the backlog is full (nothing held)."""
        if reservation.ident not in self._commits and len(self._commits) >= self.MAX_ROWS:
            return False
        self._commits[reservation.ident] = (reservation, delta)
        self._since.setdefault(reservation.ident, time.monotonic())
        self._metrics.backlog.set(len(self))
        return True

    def hold_release(self, op: BucketOp, reservation: str) -> bool:
        """Keep the release of a reservation whose answer was lost, to make until the store answers; False when the
        backlog is full (nothing held)."""
        if len(self._releases) >= self.MAX_ROWS:
            self._metrics.store_errors["reserve"].inc()
            return False
        self._releases[reservation] = op
        self._since.setdefault(reservation, time.monotonic())
        self._metrics.backlog.set(len(self))
        return True

    def hold(self, rows: list[UsageDelta]) -> None:
        """Keep rows certainly not counted, merged with the held row of their (key, model, day): its write id was
        never counted either."""
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
                    write_id=held.write_id,
                )
            elif self._room():
                self._rows[ident] = row
            else:
                self._full(row)
        self._metrics.backlog.set(len(self))

    def hold_again(self, rows: list[UsageDelta]) -> None:
        """Keep rows that may have been counted, each apart with its write id."""
        for row in rows:
            if row.write_id in self._again or self._room():
                self._again[row.write_id] = row
                self._since.setdefault(row.write_id, time.monotonic())
            else:
                self._full(row)
        self._metrics.backlog.set(len(self))

    def _room(self) -> bool:
        return len(self._rows) + len(self._again) < self.MAX_ROWS

    def _full(self, row: UsageDelta) -> None:
        self._metrics.store_errors["ledger"].inc()
        _warn.warning("usage ledger backlog full (%d rows): key %s's row is lost", self.MAX_ROWS, row.key_id)

    async def flush(self, store: Store) -> bool:
        """Write what is held; True when nothing is left."""
        self._expire()
        rows, self._rows = list(self._rows.values()), {}
        again, self._again = list(self._again.values()), {}
        debits, self._debits = list(self._debits.values()), {}
        commits, self._commits = list(self._commits.values()), {}
        releases, self._releases = list(self._releases.items()), {}
        # set by the first write the store does not take: what is not sent yet stays held for the next flush (the
        # store is not answering; sent anyway, each would wait out its own timeout, and a flush could outlast a
        # shutdown's grace period)
        stalled = False
        if rows:
            try:
                await store.add_usage(rows)
            except StoreError as exc:
                _kept(self._metrics, rows, exc, self)
                stalled = True
        if again and stalled:
            self._again.update((row.write_id, row) for row in again)
        elif again:
            try:
                await store.add_usage(again)
            except StoreError as exc:
                _kept(self._metrics, again, exc, self, landed=True)
                stalled = True
        sending = asyncio.Semaphore(self.FLUSH_CONCURRENCY)

        async def bounded(
            send: Callable[[], Awaitable[None]], keep: Callable[[], None], held: Callable[[], bool]
        ) -> None:
            nonlocal stalled
            async with sending:
                if stalled:
                    keep()
                    return
                await send()
                stalled = stalled or held()

        await asyncio.gather(
            *(
                bounded(
                    partial(_adjust, store, self._metrics, reservation, delta, self),
                    partial(self.hold_debit, reservation, delta),
                    partial(self._debits.__contains__, reservation.key_id),
                )
                for reservation, delta in debits
            ),
            *(
                bounded(
                    partial(_adjust, store, self._metrics, r, delta, self, ran=True),
                    partial(self._commits.__setitem__, r.ident, (r, delta)),
                    partial(self._commits.__contains__, r.ident),
                )
                for r, delta in commits
            ),
            *(
                bounded(
                    partial(self._release, store, op, ident),
                    partial(self._releases.__setitem__, ident, op),
                    partial(self._releases.__contains__, ident),
                )
                for ident, op in releases
            ),
        )
        self._since = {
            ident: since
            for ident, since in self._since.items()
            if ident in self._again or ident in self._commits or ident in self._releases
        }
        self._metrics.backlog.set(len(self))
        return not len(self)

    async def _release(self, store: Store, op: BucketOp, ident: str) -> None:
        try:
            await store.release(op, ident)
        except StoreError:
            self._releases[ident] = op  # (made again: a release counts once)

    def _expire(self) -> None:
        """Drop what may have landed and has been held past ``UNCERTAIN_RETRY_SECONDS``: made again now, it could
        count twice."""
        if not self._since:
            return
        oldest = time.monotonic() - self.UNCERTAIN_RETRY_SECONDS
        for ident in [i for i, since in self._since.items() if since < oldest]:
            del self._since[ident]
            row = self._again.pop(ident, None)
            if row is not None:
                self._metrics.store_errors["ledger"].inc()
                _warn.warning("usage row of key %s whose answer was lost is not made again: too late", row.key_id)
            commit = self._commits.pop(ident, None)
            if commit is not None:
                self._metrics.store_errors["commit"].inc()
                key_id = commit[0].key_id
                _warn.warning("token commit of key %s whose answer was lost is not made again: too late", key_id)
            if self._releases.pop(ident, None) is not None:
                self._metrics.store_errors["reserve"].inc()  # its tokens come back as the bucket refills

    async def run(self, store: Store) -> None:
        """Write the backlog whenever it holds rows, for as long as the meter runs. Stopped (cancelled), it lets the
        flush in progress end first: that flush has taken what it writes out of the backlog and holds again what does
        not land only when its store calls end, so a cancel in the middle would lose it."""
        while True:
            await asyncio.sleep(self.RETRY_SECONDS)
            flushing = asyncio.ensure_future(self.flush(store))
            try:
                await asyncio.shield(flushing)
            except asyncio.CancelledError:
                await flushing
                raise

    async def close(self, store: Store) -> None:
        """The last flush, at shutdown: what is still held after it is lost with the process, so it is counted in
        the store errors of its operation and logged."""
        if await self.flush(store):
            return
        lost = {
            "ledger": len(self._rows) + len(self._again),
            "commit": len(self._debits) + len(self._commits),
            "reserve": len(self._releases),
        }
        for operation, count in lost.items():
            if count:
                self._metrics.store_errors[operation].inc(count)
        log.error(
            "meter stopping with %d usage ledger rows, %d token commits and %d reservation releases not written: "
            "the store did not take them",
            *lost.values(),
        )


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
    store: Store,
    metrics: MeterMetrics,
    reservation: Reservation,
    delta: int,
    backlog: UsageBacklog | None,
    *,
    ran: bool = False,
) -> None:
    """Debit (refund) ``delta`` of the reservation's bucket; held for later when it did not run, or may have run
    (made again under its reservation id, it counts once). ``ran``: an earlier attempt may have run, so it is never
    merged with another."""
    try:
        await quota.adjust(store, reservation, delta)
    except (StoreError, asyncio.CancelledError) as exc:
        # cancelled: a settle cut while the store had the commit (it outlived the shutdown's settle window); like a
        # lost answer it may have run, so it is held to be made again under its id by the backlog's last flush
        if backlog is not None and isinstance(exc, StoreNotSent) and not ran:
            backlog.hold_debit(reservation, delta)
        elif not (backlog is not None and reservation.ident and backlog.hold_commit(reservation, delta)):
            metrics.store_errors["commit"].inc()
            why = str(exc) or "cut before the store answered"
            _warn.warning("token commit failed for key %s: %s", reservation.key_id, why)
        if isinstance(exc, asyncio.CancelledError):
            raise
        return
    if delta < 0:
        metrics.refunded.inc(-delta)
    else:
        metrics.debited.inc(delta)


async def _ledger(store: Store, metrics: MeterMetrics, row: UsageDelta, backlog: UsageBacklog | None) -> None:
    try:
        await store.add_usage([row])
    except asyncio.CancelledError:  # as a commit cut (``_adjust``): may have landed, held apart with its write id
        _kept(metrics, [row], StoreError("cut before the store answered"), backlog, landed=True)
        raise
    except StoreError as exc:
        _kept(metrics, [row], exc, backlog)


def _kept(
    metrics: MeterMetrics,
    rows: list[UsageDelta],
    exc: StoreError,
    backlog: UsageBacklog | None,
    *,
    landed: bool = False,
) -> None:
    """Hold what did not land (written once the store answers: what may have landed with its own write id, counted
    once), count and log what cannot be held. ``landed``: the rows may have been counted by an earlier write, so
    none of them may be merged, whatever this one's outcome."""
    if isinstance(exc, UsageNotWritten):
        unsent, uncertain, unindexed = exc.unsent, exc.uncertain, exc.unindexed
    elif isinstance(exc, StoreNotSent):
        unsent, uncertain, unindexed = rows, [], []
    else:
        unsent, uncertain, unindexed = [], rows, []
    if landed:
        unsent, uncertain = [], unsent + uncertain
    if backlog is not None:
        backlog.hold(unsent + unindexed)
        backlog.hold_again(uncertain)
        return
    metrics.store_errors["ledger"].inc()
    keys = ", ".join(sorted({d.key_id for d in unsent + uncertain or unindexed}))
    _warn.warning("usage ledger write failed for key %s: %s", keys[:200], exc)
