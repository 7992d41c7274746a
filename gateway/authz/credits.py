"""Request credits: a busy key's next admissions taken from Redis ahead of its requests.

At low load every check of a request limit is a round trip to Redis of its own. On a small machine that trip costs
more than the wait for its answer: each wakes Redis and then this process, and those wake-ups slow whatever else
runs there (Envoy, the model server's sidecar) whether or not a request waits for them. A key whose requests come
close together (its previous one on this replica within ``ttl`` seconds) has its next few request tokens taken with
the check of one request, in the same script call (a ``RESERVE`` of ``1 + n`` that needs 1). Its next requests
spend them, answered from the snapshot with no store call; the request that spends the last one sends the check
that takes the next few, after it is answered.

How many: as many as the key's requests would spend within ``ttl`` at their recent pace, at most ``max_credits``
and at most a hundredth of the key's limit (at least one).

What stays exact, and what moves:
- every admission spends a token Redis debited first (nothing is admitted on a guess), of its own key, under the
  limits it was taken for (a tier or override change leaves the credits unspent);
- credits not spent within ``ttl`` are given back (a ``FORCE`` of minus their number), and so are those held at
  shutdown; a process that dies loses them (the key is refused early, never admitted more);
- a debit comes up to ``ttl`` before its request, so a bucket that was full meanwhile refills up to ``ttl`` sooner
  (at most ``ttl`` worth of its refill rate per window), and credits one replica holds count against the bucket for
  the others for up to ``ttl``;
- the token gate is read when the credits are taken: up to ``ttl`` old when spent (the meter checks tokens itself);
- credits are taken only while no other check of the key is out on this replica and the batcher has nothing waiting
  and a batch slot free: under load batches share the round trips already, and a burst that ends before its credits
  came back would leave them unspent for ``ttl``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from prometheus_client import Counter

from gateway.contract import REQUESTS
from gateway.limits import BucketMode, BucketOp, BucketResult
from gateway.logs import RateLimitedLog

log = logging.getLogger("maas.authz.credits")

CLOSE_SECONDS = 2.0
"""How long a stopping replica waits for its credits to be given back."""
LIMIT_SHARE = 100
"""Credits taken at once are at most the key's limit divided by this (at least one)."""
FORGET_SECONDS = 5.0
"""How often the keys idle for ``ttl`` are forgotten (a pass over every key remembered)."""
PACE_WEIGHT = 0.25
"""Weight of the latest gap between a key's requests in its running pace."""

Done = Callable[[list[BucketResult] | None, BaseException | None], None]
Submit = Callable[[Sequence[BucketOp], Done], None]


@dataclass(slots=True, eq=False)
class Holder:
    """One key's credits on this replica, and what is known of its recent checks."""

    key_id: str
    ops: tuple[BucketOp, ...]
    seen: float
    gap: float
    """Running mean of the seconds between this key's requests here."""
    left: int = 0
    """Credits held."""
    results: list[BucketResult] | None = None
    """The results of the check that took them (``remaining`` counts them all as spent)."""
    expires: float = 0.0
    out: int = 0
    """Checks of this key sent and not answered yet."""
    busy: bool = False
    """A check taking credits is out."""
    taking: Taking | None = None


@dataclass(slots=True, eq=False)
class Taking:
    """A request's check that takes ``wanted`` credits as well: ``ops`` asks for ``1 + wanted`` request tokens."""

    holder: Holder
    plain: tuple[BucketOp, ...]
    wanted: int
    ops: tuple[BucketOp, ...]
    sent_at: float = 0.0


def eligible(ops: tuple[BucketOp, ...]) -> bool:
    """Whether a check can carry credits: its first operation takes one request."""
    return bool(ops) and ops[0].dimension == REQUESTS and ops[0].mode == BucketMode.TAKE and ops[0].cost == 1


def _taking(ops: tuple[BucketOp, ...], count: int) -> tuple[BucketOp, ...]:
    """``ops`` with up to ``count`` request tokens taken (at least one, or the check is refused)."""
    first = ops[0]
    taking = BucketOp(first.key_id, first.dimension, first.limit, first.window_ms, count, BucketMode.RESERVE, 1)
    return (taking, *ops[1:])


def _counted(result: BucketResult, remaining: int) -> BucketResult:
    """``result`` as one request's check reads it: ``remaining`` left, one token taken (built directly: this is on
    the path of every request a credit answers, and ``dataclasses.replace`` walks the fields each time)."""
    return BucketResult(result.allowed, result.limit, remaining, result.reset_ms, result.retry_ms, 1)


def _refund(ops: tuple[BucketOp, ...], count: int) -> tuple[BucketOp, ...]:
    first = ops[0]
    return (BucketOp(first.key_id, first.dimension, first.limit, first.window_ms, -count, BucketMode.FORCE),)


class Credits:
    MAX_HOLDERS = 100_000
    """Keys remembered at once; past it the ones idle longest are forgotten at the next sweep (never one holding
    credits or with a check out)."""

    def __init__(
        self,
        submit: Submit,
        *,
        ttl: float,
        max_credits: int,
        idle: Callable[[], bool],
        store_up: Callable[[str], bool],
        counter: Counter,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._submit = submit
        self._ttl = ttl
        self._max = max_credits
        self._idle = idle
        self._store_up = store_up
        self._clock = clock
        self._holders: dict[str, Holder] = {}
        self._holding: set[Holder] = set()
        """The holders with credits."""
        self._next_forget = 0.0
        self._sweeping: asyncio.TimerHandle | None = None
        self._refunds: set[asyncio.Future[None]] = set()
        self._closed = False
        self._taken = counter.labels("taken")
        self._used = counter.labels("used")
        self._refunded = counter.labels("refunded")
        self._lost = counter.labels("lost")
        self._lost_log = RateLimitedLog(log, interval=10.0)
        """One line per 10 s: while Redis is down every expiring credit's give-back fails."""

    @property
    def held(self) -> int:
        """Credits held now."""
        return sum(h.left for h in self._holding)

    def use(self, ops: tuple[BucketOp, ...], now: float) -> list[BucketResult] | Holder | Taking:
        """For an admitted check of ``ops`` (``eligible``) at monotonic ``now``: the results of a credit spent (the
        request is admitted); else what the caller sends ``ops`` under (a ``Holder``), or a ``Taking`` whose ``ops``
        it sends instead (the check takes credits too). Either goes back to ``landed`` with the results, or with None
        if nothing was sent."""
        key_id = ops[0].key_id
        holder = self._holders.get(key_id)
        if holder is None:
            holder = self._holders[key_id] = Holder(key_id, ops, now, self._ttl)
            if self._sweeping is None and not self._closed:
                self._schedule_sweep()
            holder.out += 1
            return holder
        gap = now - holder.seen
        holder.gap += (min(gap, self._ttl) - holder.gap) * PACE_WEIGHT
        holder.seen = now
        if holder.left:
            spent = self._spend(holder, ops, now)
            if spent is not None:
                return spent
            self._give_back(holder)  # past their time (the sweep had not come yet), or the key's limits changed
        holder.ops = ops
        holder.out += 1
        if gap <= self._ttl and holder.out == 1 and not holder.busy and not self._closed and self._idle():
            holder.busy = True
            wanted = self._wanted(holder)
            taking = holder.taking
            if taking is None or taking.plain is not ops or taking.wanted != wanted:
                taking = holder.taking = Taking(holder, ops, wanted, _taking(ops, 1 + wanted))
            taking.sent_at = now
            return taking
        return holder

    def _spend(self, holder: Holder, ops: tuple[BucketOp, ...], now: float) -> list[BucketResult] | None:
        """One of the key's credits for a request checked under ``ops`` at ``now`` (None: they are not for it)."""
        held = holder.results
        if held is None or holder.ops is not ops or now >= holder.expires:
            return None
        holder.left -= 1
        self._used.inc()
        if not holder.left:
            self._holding.discard(holder)
            if not self._closed:
                holder.busy = True
                asyncio.get_running_loop().call_soon(self._next, holder)
        first = held[0]
        # Redis counted every credit as spent when it took them: the ones still held are not yet
        return [_counted(first, first.remaining + holder.left), *held[1:]]

    def _wanted(self, holder: Holder) -> int:
        """Credits worth taking for this key now: what its recent pace spends within ``ttl``, within the bounds."""
        pace = int(self._ttl / holder.gap) if holder.gap > 0 else self._max
        return max(1, min(pace, self._max, holder.ops[0].limit // LIMIT_SHARE))

    def landed(self, sent: Holder | Taking, results: list[BucketResult] | None) -> list[BucketResult] | None:
        """The results of a check ``use`` let through (None: it failed, or was never sent), as the request's answer
        reads them. The tokens a ``Taking`` got beyond the request's own are held as credits, and the request's results
        are returned as a check of one token would have given them."""
        if isinstance(sent, Holder):
            sent.out -= 1
            if sent.left and results:
                # credits taken by a check sent before this one (Redis ran it first) came back meanwhile: they are
                # this key's, so a refusal spends one of them instead, and an allow counts them as not yet spent
                if not results[0].allowed:
                    return self._spend(sent, sent.ops, self._clock()) or results
                sent.results = results  # the later reading of the buckets: the credits' answers count from it
                first = results[0]
                return [_counted(first, first.remaining + sent.left), *results[1:]]
            return results
        holder = sent.holder
        holder.out -= 1
        holder.busy = False
        if not results or results[0].debited <= 1:
            return results
        first = results[0]
        extra = first.debited - 1
        self._hold(holder, sent.plain, extra, [_counted(first, first.remaining), *results[1:]], sent.sent_at)
        return [_counted(first, first.remaining + extra), *results[1:]]

    def _hold(
        self, holder: Holder, sent: tuple[BucketOp, ...], count: int, results: list[BucketResult], taken_at: float
    ) -> None:
        self._taken.inc(count)
        if self._closed or sent is not holder.ops or holder.left:
            # the replica is stopping, or the key's limits changed, while they were out
            self._refund(sent, count)
            return
        holder.left, holder.results, holder.expires = count, results, taken_at + self._ttl
        self._holding.add(holder)
        if self._sweeping is None:
            self._schedule_sweep()

    def _next(self, holder: Holder) -> None:
        """The check taking the next credits, after a request spent the last (only while no other check of the key
        is out, the batcher has nothing waiting and a slot free, and the store is not skipped after a failure)."""
        if self._closed or holder.out or holder.left or not self._idle() or not self._store_up(holder.key_id):
            holder.busy = False
            return
        ops, taken_at = holder.ops, self._clock()
        wanted = self._wanted(holder)

        def done(results: list[BucketResult] | None, error: BaseException | None) -> None:
            holder.busy = False
            if error is None and results and results[0].allowed and results[0].debited > 0:
                self._hold(holder, ops, results[0].debited, results, taken_at)

        self._submit(_taking(ops, wanted), done)

    def _give_back(self, holder: Holder) -> None:
        count, holder.left, holder.results = holder.left, 0, None
        self._holding.discard(holder)
        if count:
            self._refund(holder.ops, count)

    def _refund(self, ops: tuple[BucketOp, ...], count: int) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def done(results: list[BucketResult] | None, error: BaseException | None) -> None:
            if error is None and results:
                self._refunded.inc(count)
            else:
                self._lost.inc(count)
                self._lost_log.warning(
                    "%d request credits of key %s were not given back: %s", count, ops[0].key_id, error
                )
            if not future.done():
                future.set_result(None)

        self._refunds.add(future)
        future.add_done_callback(self._refunds.discard)
        self._submit(_refund(ops, count), done)

    def _schedule_sweep(self) -> None:
        self._sweeping = asyncio.get_running_loop().call_later(self._ttl, self._sweep)

    def _sweep(self) -> None:
        """Give back the credits held past ``ttl``; every ``FORGET_SECONDS``, forget the keys idle for ``ttl``."""
        self._sweeping = None
        now = self._clock()
        for holder in [h for h in self._holding if now >= h.expires]:
            self._give_back(holder)
        if now >= self._next_forget or len(self._holders) > self.MAX_HOLDERS:
            self._next_forget = now + FORGET_SECONDS
            idle_since = now - self._ttl
            idle = [h for h in self._holders.values() if not h.left and not h.busy and not h.out]
            for holder in idle:
                if holder.seen < idle_since:
                    del self._holders[holder.key_id]
            if len(self._holders) > self.MAX_HOLDERS:  # busy keys beyond the cap: the longest idle go first
                idle = sorted((h for h in idle if h.key_id in self._holders), key=lambda h: h.seen)
                for holder in idle[: len(self._holders) - self.MAX_HOLDERS]:
                    del self._holders[holder.key_id]
        if self._holders and not self._closed:
            self._schedule_sweep()

    async def close(self, *, wait: float = CLOSE_SECONDS) -> None:
        """Give back every credit held, and those still being taken once they land; wait up to ``wait`` seconds for
        the store's answers (each store call has its own timeout)."""
        self._closed = True
        if self._sweeping is not None:
            self._sweeping.cancel()
            self._sweeping = None
        deadline = self._clock() + wait
        while True:
            for holder in list(self._holding):
                self._give_back(holder)
            refunds = list(self._refunds)
            taking = any(h.busy or h.out for h in self._holders.values())
            left = deadline - self._clock()
            if (not refunds and not taking) or left <= 0:
                return
            if refunds:
                await asyncio.wait(refunds, timeout=left)
            else:
                await asyncio.sleep(min(0.01, left))  # checks still out give their credits back when they land
