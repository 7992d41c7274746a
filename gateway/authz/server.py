"""The ext_authz check, independent of the HTTP server that carries it.

``Checker.begin`` answers from the snapshot alone (denials, limit-free allows) or returns a ``Pending`` check that
is handed to the caller's ``then`` when its bucket results arrive; ``Checker.finish`` turns bucket results (or a
store failure) into the answer. No task per request: ``then`` answers at once (``fasthttp``) or wakes the waiting
handler (the aiohttp adapter).
Only status 200 allows; a 5xx makes Envoy answer ``statusOnError`` with an empty body.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import http_exceptions, web, web_protocol

from gateway.authz.credits import Credits, Holder, Taking, eligible
from gateway.authz.follower import SnapshotFollower
from gateway.authz.metrics import AuthzMetrics
from gateway.connections import ConnectionCap
from gateway.decision import (
    STORE_DOWN,
    Admission,
    Denial,
    HeaderBlock,
    Policy,
    admit,
    error_body,
    identity_block,
    rate_limited,
    ratelimit_wire,
)
from gateway.errors import StoreError
from gateway.limits import BucketResult
from gateway.logs import RateLimitedLog
from gateway.store.base import Store
from gateway.store.batching import BucketBatcher
from gateway.store.memory import MemoryStore

log = logging.getLogger("maas.authz")

STORE_RETRY_AFTER = 0.5
"""After a store failure, checks skip the store for this long (seconds) and follow the failure policy: all checks
with a single Redis, the checks of keys on the failed node in Redis Cluster."""

NOT_READY = Denial(
    status=503,
    code="not_ready",
    body=error_body("The gateway has not loaded its keys yet.", error_type="server_error", code="not_ready"),
)
INTERNAL = Denial(
    status=503,
    code="internal_error",
    body=error_body("The gateway failed to check this request.", error_type="server_error", code="internal_error"),
)
TOO_MANY_CONNECTIONS = error_body(
    "The gateway has too many open connections; retry shortly.", error_type="server_error", code="too_many_connections"
)
"""The body of the 503 a connection past ``--max-connections`` gets (gateway/connections.py)."""
JSON = "application/json"


@dataclass(slots=True)
class Reply:
    status: int
    headers: list[tuple[str, str]]
    body: bytes = b""
    shared: HeaderBlock | None = None
    """When set, ``headers`` starts with ``shared.headers``, whose wire form is ready in ``shared.wire``."""
    wire: bytes | None = None
    """When set, the headers after ``shared`` in wire form only (``headers`` holds just ``shared.headers``): an
    allow answered by the HTTP/1.1 server needs no list of them."""

    def header_list(self) -> list[tuple[str, str]]:
        """All the headers as pairs, whichever form they are held in."""
        if not self.wire:
            return self.headers
        pairs = list(self.headers)
        for line in self.wire.decode().split("\r\n"):
            if line:
                name, _, value = line.partition(": ")
                pairs.append((name, value))
        return pairs


@dataclass(slots=True)
class Pending:
    """A check waiting for its bucket results: called with them (or with the error) as the batcher's ``done``,
    then handed to ``then``. ``tag`` is the caller's, carried through unchanged."""

    admission: Admission
    now: float
    then: Callable[[Pending], None]
    tag: object = None
    results: list[BucketResult] | None = None
    error: BaseException | None = None
    shard: str | None = None
    """The store node of the key's buckets, when the store has several (Redis Cluster)."""
    credit: Holder | Taking | None = None
    """What the request credits know this check under (gateway/authz/credits.py)."""

    def __call__(self, results: list[BucketResult] | None, error: BaseException | None) -> None:
        self.results, self.error = results, error
        self.then(self)


class Checker:
    def __init__(
        self,
        *,
        follower: SnapshotFollower,
        store: Store,
        policy: Policy,
        metrics: AuthzMetrics,
        on_store_error: str = "deny",
        max_inflight: int = 2,
        clock: Callable[[], float] = time.time,
        credits: int = 0,
        credit_seconds: float = 0.25,
    ) -> None:
        self._follower = follower
        self._policy = policy
        self._metrics = metrics
        # memoised admissions hold their key's metric cells: when an idle key's series is dropped, they are bound anew
        metrics.key_requests.on_evict = policy.cache.admissions.clear
        self._on_store_error = on_store_error
        self._clock = clock
        """Now, for key expiry and the identity's stamp: Redis's clock as this process knows it (``ClockOffset.now``),
        the one the control plane set the expiry by and the meter checks the stamp by."""
        self._batcher = BucketBatcher(store, max_inflight=max_inflight, on_batch=metrics.batch_size.observe)
        self._local = MemoryStore()
        self._store_down_until = 0.0
        self._shard_of = store.shard_of if store.sharded else None
        self._shards_down_until: dict[str, float] = {}
        """Per store node (Redis Cluster): a failed node's keys skip the store, the other nodes' keys do not."""
        self._store_log = RateLimitedLog(log, interval=10.0)
        self.observe = metrics.check_seconds.observe
        self._credits: Credits | None = None
        if credits > 0 and credit_seconds > 0:
            self._credits = Credits(
                self._batcher.submit,
                ttl=credit_seconds,
                max_credits=credits,
                idle=lambda: self._batcher.unhurried,
                store_up=self._store_usable,
                counter=metrics.request_credits,
            )

    def begin(
        self,
        *,
        host: str,
        path: str,
        get: Callable[[str], str | None],
        count: Callable[[str], int | None],
        then: Callable[[Pending], None],
        tag: object = None,
    ) -> Reply | Pending:
        """A reply at once, or a Pending check (carrying ``tag``) handed to ``then`` when its bucket results
        arrive (never before ``begin`` returns)."""
        snapshot = self._follower.snapshot
        if not snapshot.loaded:
            return self.deny(NOT_READY, "", "")
        now = self._clock()
        outcome = admit(snapshot, self._policy, host=host, path=path, get=get, count=count, now=now)
        if isinstance(outcome, Denial):
            return self.deny(outcome, outcome.tier, outcome.model)
        ops = outcome.ops
        if not ops:
            return self._allow(outcome, None, now)
        credit: Holder | Taking | None = None
        credits = self._credits
        mono = time.monotonic()
        if credits is not None and eligible(ops):
            used = credits.use(ops, mono)
            if isinstance(used, list):
                return self._allow(outcome, used, now)  # the credit the key's last check took
            credit = used
            if isinstance(used, Taking):
                ops = used.ops
        if self._shard_of is None:
            if mono >= self._store_down_until:
                pending = Pending(outcome, now, then, tag, credit=credit)
                self._batcher.submit(ops, pending)
                return pending
        else:
            shard = self._shard_of(outcome.key.key_id)
            if mono >= self._shards_down_until.get(shard, 0.0):
                pending = Pending(outcome, now, then, tag, shard=shard, credit=credit)
                self._batcher.submit(ops, pending)
                return pending
        if credit is not None and credits is not None:
            credits.landed(credit, None)
        return self._by_policy(outcome, now)

    def _store_usable(self, key_id: str) -> bool:
        if self._shard_of is None:
            return time.monotonic() >= self._store_down_until
        return time.monotonic() >= self._shards_down_until.get(self._shard_of(key_id), 0.0)

    async def close(self) -> None:
        """Give back the request credits held (after the check port closed, before the store does)."""
        if self._credits is not None:
            await self._credits.close()

    def finish(self, pending: Pending) -> Reply:
        """The answer once the bucket check is done; raises what the check raised, but for store failures."""
        credit = pending.credit
        if credit is not None and self._credits is not None:
            pending.results = self._credits.landed(credit, pending.results if pending.error is None else None)
        try:
            results: list[BucketResult] | None
            if pending.error is not None:
                raise pending.error
            results = pending.results
        except StoreError as exc:
            if pending.shard is None:
                self._store_down_until = time.monotonic() + STORE_RETRY_AFTER
            else:
                self._shards_down_until[pending.shard] = time.monotonic() + STORE_RETRY_AFTER
            self._metrics.store_error("buckets", exc.code)
            self._store_log.warning(
                "store unavailable, limits follow --on-store-error=%s: %s", self._on_store_error, exc
            )
            return self._by_policy(pending.admission, pending.now)
        else:
            self._metrics.store_ok()
            if results and results[0].allowed:  # the usual answer, without the detour through _decide
                return self._allow(pending.admission, results, pending.now)
        return self._decide(pending.admission, results, pending.now)

    def _decide(self, admission: Admission, results: list[BucketResult] | None, now: float) -> Reply:
        if results is None:
            return self.deny(STORE_DOWN, *_labels(admission))
        if not results[0].allowed:
            return self.deny(rate_limited(admission, results), *_labels(admission), key=admission)
        return self._allow(admission, results, now)

    def _allow(self, admission: Admission, results: list[BucketResult] | None, now: float) -> Reply:
        cells = admission.cells
        if cells is None:  # bound once per memoised admission
            tier, model = _labels(admission)
            key = admission.key
            metrics = self._metrics
            cells = admission.cells = (
                metrics.decision("allow", "ok", tier, model),
                metrics.key_requests.get(key.key_id, key.user, tier, "allow"),
            )
        for cell in cells:
            cell.value += 1.0  # Cell.inc, inlined: two per allowed check
        block = identity_block(admission, self._policy, now=now)  # the admission's own block within its window
        return Reply(
            200, list(block.headers), shared=block, wire=ratelimit_wire(admission, results) if results else None
        )

    def _by_policy(self, admission: Admission, now: float) -> Reply:
        """The answer while the store is unavailable, per ``--on-store-error``: ``allow`` admits without limits and
        without rate-limit headers (there is no bucket state to tell), ``local`` checks process-local buckets,
        ``deny`` refuses."""
        policy = self._on_store_error
        self._metrics.policy_applied.labels(policy).inc()
        if policy == "allow":
            return self._allow(admission, None, now)
        results = self._local.check_now([admission.ops])[0] if policy == "local" else None
        return self._decide(admission, results, now)

    def deny(self, denial: Denial, tier: str, model: str, *, key: Admission | None = None) -> Reply:
        self._metrics.decision("deny", denial.code, tier, model).inc()
        if key is not None:
            self._metrics.key_requests.get(key.key.key_id, key.key.user, tier, "deny").inc()
        return Reply(denial.status, [("content-type", JSON), *denial.headers], denial.body)


def _labels(admission: Admission) -> tuple[str, str]:
    return (admission.tier.name if admission.tier is not None else "", admission.model or "")


class AiohttpHandler:
    """The check on aiohttp's low-level server (``--http-server aiohttp``)."""

    def __init__(self, checker: Checker) -> None:
        self._checker = checker

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        started = time.perf_counter()
        checker = self._checker
        headers = request.headers
        coding = headers.get("transfer-encoding")
        if coding is not None and coding.lower() != "chunked":
            return _framing_refused()
        arrived: asyncio.Future[Pending] = asyncio.get_running_loop().create_future()

        def then(pending: Pending) -> None:
            if not arrived.done():  # the client may be gone and the handler cancelled
                arrived.set_result(pending)

        try:
            step = checker.begin(
                host=headers.get("host", ""),
                path=request.raw_path,
                get=headers.get,
                count=lambda name: len(headers.getall(name, ())),
                then=then,
            )
            if isinstance(step, Pending):
                step = checker.finish(await arrived)
        except Exception:
            log.exception("ext_authz check failed")
            step = checker.deny(INTERNAL, "", "")
        checker.observe(time.perf_counter() - started)
        return web.Response(status=step.status, headers=step.header_list(), body=step.body or None)


def _framing_refused() -> web.Response:
    """A Transfer-Encoding other than ``chunked`` alone (aiohttp reads ``identity, chunked`` and ``gzip, chunked`` as
    chunked; it refuses a second line and HTTP/1.0 itself): answered and closed as the fast server does."""
    body = error_body("Malformed HTTP request.", error_type="invalid_request_error", code="bad_request")
    response = web.Response(status=400, body=body, content_type=JSON)
    response.force_close()
    return response


class _EnvelopeHandler(web_protocol.RequestHandler):
    """aiohttp's connection handler, answering what it cannot parse, and a handler's failure, in the OpenAI envelope
    (aiohttp's own answers are plain text, some echoing the request line), as its server's ``answer`` says."""

    def __init__(self, manager: EnvelopeServer, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._answer = manager.answer

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            raise ConnectionError("the response was sent already: the connection is closed")
        status, code, text = self._answer(status, exc)
        kind = "server_error" if status >= 500 else "invalid_request_error"
        response = web.Response(status=status, body=error_body(text, error_type=kind, code=code), content_type=JSON)
        response.force_close()
        return response


def headers_too_large(exc: BaseException | None) -> bool:
    """Whether aiohttp refused a request for an over-long line or too many headers (a 431, not a 400)."""
    return isinstance(exc, http_exceptions.LineTooLong) or "too many headers" in str(exc).lower()


class EnvelopeServer(web.Server):
    """``web.Server`` whose connections answer malformed requests in the OpenAI envelope: 431 for headers over
    ``--max-header-bytes``, 400 otherwise; with a ``cap``, at most ``cap.limit`` connections are open at once."""

    def __init__(
        self,
        handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]],
        *,
        cap: ConnectionCap | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(handler, **kwargs)
        self._cap = cap

    # the listener's protocol factory: past the cap it makes a refusal, not a RequestHandler
    def __call__(self) -> web_protocol.RequestHandler | asyncio.Protocol:  # type: ignore[override]
        if self._cap is None:
            return self._handler()
        return self._cap.protocol(self._handler)

    def _handler(self) -> web_protocol.RequestHandler:
        return _EnvelopeHandler(self, loop=self._loop, **self._kwargs)

    def connection_lost(self, handler: web_protocol.RequestHandler, exc: BaseException | None = None) -> None:
        if self._cap is not None:
            self._cap.release()  # called once per connection (aiohttp's handler forgets its manager then)
        super().connection_lost(handler, exc)

    def answer(self, status: int, exc: BaseException | None) -> tuple[int, str, str]:
        """(status, code, message) for what aiohttp could not parse (``status`` < 500) or a handler that raised."""
        if headers_too_large(exc):
            return 431, "request_header_too_large", "Request headers are too large."
        if status < 500:
            return 400, "bad_request", "Malformed HTTP request."
        log.error("ext_authz connection failed", exc_info=exc)
        return 503, "internal_error", "The gateway failed to check this request."
