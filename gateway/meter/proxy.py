"""The metering reverse proxy's request handler (on the lean server of ``gateway.meter.server``).

``POST`` to the OpenAI generation routes is metered: identity, bounded body, reservation, forwarding, usage
reading, settlement. Other methods on those routes get 405 (but ``OPTIONS``); everything else goes to the
upstream untouched. Accounting happens before the last bytes (``[DONE]``, or the whole non-streaming body) reach
the client, so a client that has its answer is already in the ledger.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass, field

from multidict import CIMultiDict

from gateway import identity as ident
from gateway.clock import ClockOffset
from gateway.contract import format_duration
from gateway.errors import StoreError, StoreNotSent
from gateway.logs import RateLimitedLog
from gateway.meter import h1, quota
from gateway.meter import request as req
from gateway.meter.accounting import Exchange, UsageBacklog, settle
from gateway.meter.errors import (
    BodyTooLarge,
    IdentityRejected,
    MeterError,
    MethodNotAllowed,
    ModelMismatch,
    StoreUnavailable,
    TokensExhausted,
    UnsupportedEndpoint,
    UnsupportedMediaType,
    UpstreamBroken,
    UpstreamTimeout,
    UpstreamUnavailable,
    envelope,
    normalise_upstream_error,
)
from gateway.meter.estimate import Estimator, Kind
from gateway.meter.metrics import OPERATIONS, UNKNOWN, MeterMetrics
from gateway.meter.quota import Outcome, Reservation
from gateway.meter.server import JSON, ClientGone, Reply, Request, Stream
from gateway.meter.sse import Splitter, SseError, StreamMeter, Usage, response_usage
from gateway.meter.upstream import Upstream, request_headers, response_headers
from gateway.store import Store

log = logging.getLogger("maas.meter")
_warn = RateLimitedLog(log)
_skewed = RateLimitedLog(log)
"""Stale identities come with every request while two nodes' clocks disagree: one warning per 10 s of its own, so
other warnings still get through."""

H_MAX_TOKENS = "x-maas-max-tokens"
H_CLAMPED = "x-maas-max-tokens-clamped"
JSON_TYPES = frozenset({"application/json", ""})


@dataclass(frozen=True, slots=True)
class MeterConfig:
    secret: bytes
    identity_max_age: float = 60.0
    trust_identity_headers: bool = False
    check_model: bool = True
    max_body_bytes: int = 8 * 1024 * 1024
    max_response_bytes: int = 64 * 1024 * 1024
    max_event_bytes: int = 1 << 20
    allow_unknown: bool = False
    clamp: bool = True
    default_max_tokens: int = 4096
    deny_on_store_error: bool = False
    estimator: Estimator = field(default_factory=Estimator)
    passthrough_posts: frozenset[str] = frozenset({"/tokenize", "/detokenize"})


@dataclass(frozen=True, slots=True)
class Meter:
    config: MeterConfig
    store: Store
    upstream: Upstream
    metrics: MeterMetrics
    clock: ClockOffset
    """This meter's clock against Redis's: ledger rows are filed under Redis's day (kept fresh by ``serving``)."""
    contexts: dict[str, int] = field(default_factory=dict)
    """Served model -> context length, as the model server lists them (kept fresh by ``follow_contexts``)."""
    backlog: UsageBacklog | None = None
    """Ledger rows waiting for the store (written by ``UsageBacklog.run``, which ``serving`` starts)."""


CONTEXT_REFRESH = 60.0
"""Seconds between reads of the model server's context lengths once known (1 s apart until then)."""


async def follow_contexts(meter: Meter) -> None:
    """Keep ``meter.contexts`` as the model server's ``/v1/models`` says, for as long as the meter runs."""
    while True:
        found = await meter.upstream.context_lengths(within=5.0)
        if found:
            meter.contexts.clear()
            meter.contexts.update(found)
        await asyncio.sleep(CONTEXT_REFRESH if meter.contexts else 1.0)


def _context_of(meter: Meter, identity: ident.Identity, parsed: req.Parsed) -> int | None:
    """The context length bounding a chat request that asks for no completion limit, when the model server told."""
    if parsed.kind != "chat" or parsed.max_tokens is not None or not meter.contexts:
        return None
    model = identity.model or parsed.model
    found = meter.contexts.get(model) if model else None
    if found is None and len(meter.contexts) == 1:
        found = next(iter(meter.contexts.values()))
    return found


def _error(exc: MeterError) -> Reply:
    return Reply(exc.status, exc.body(), headers=exc.headers, content_type=JSON)


PASSED_ON_METERED_PATHS = frozenset({"OPTIONS"})
"""Methods other than POST that a metered path still passes to the upstream (a browser's CORS preflight)."""
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
"""Methods passed to the upstream on any other path; others only on ``passthrough_posts``."""
UPSTREAM_FAILURES = (UpstreamUnavailable, UpstreamTimeout, UpstreamBroken)
"""Errors of a request that was forwarded (counted as upstream errors, not as refusals)."""


def _metered_kind(request: Request) -> Kind | None:
    return req.PATHS.get(request.path) if request.method == "POST" else None


async def handle(meter: Meter, request: Request) -> Reply | Stream:
    kind = _metered_kind(request)
    if kind is None:
        if request.path in req.PATHS and request.method not in PASSED_ON_METERED_PATHS:
            # the upstream's answer would be its own (vLLM: 405 {"detail": ...}), not the OpenAI envelope
            exc = MethodNotAllowed(
                f"Invalid method for URL ({request.method} {request.path}): use POST", headers={"allow": "POST"}
            )
            meter.metrics.rejected(exc.code).inc()
            return _error(exc)
        if request.method not in READ_METHODS and request.path not in meter.config.passthrough_posts:
            # vLLM generates on /v1/responses, /invocations, /pooling ... and loads adapters on others: passed on,
            # they would be neither metered nor limited
            refused = UnsupportedEndpoint(
                f"{request.method} {request.path} is not served through the gateway: only the metered endpoints "
                f"({', '.join(req.PATHS)}) take requests that generate"
            )
            meter.metrics.rejected(refused.code).inc()
            return _error(refused)
        return await passthrough(request, meter)
    meter.metrics.in_flight.inc()
    try:
        return await metered(request, meter, kind=kind)
    except MeterError as exc:
        if not isinstance(exc, UPSTREAM_FAILURES):  # forwarded, then failed: counted as upstream errors instead
            meter.metrics.rejected(exc.code).inc()
        # an expected refusal needs no traceback: without it the frames that hold the exception (the early hook's,
        # the handler's) and the exception free each other at once, not at the next collection
        exc.__traceback__ = None
        return _error(exc)
    finally:
        meter.metrics.in_flight.dec()


def authenticate(request: Request, meter: Meter) -> ident.Identity:
    """The identity authz signed, its stamp checked on Redis's clock as this meter knows it (authz stamps by the
    same clock, so their own clocks may disagree)."""
    config = meter.config
    try:
        if config.trust_identity_headers:
            return ident.parse(request.headers)
        return ident.verify(request.headers, config.secret, max_age=config.identity_max_age, now=meter.clock.now())
    except ident.StaleIdentity as exc:
        _skewed.warning(
            "refused the identity of key %s: %s (--identity-max-age %gs); check the clock offsets to Redis "
            "(maas_*_clock_offset_seconds) and NTP on this node and the maas authz nodes",
            request.headers.get(ident.H_KEY_ID, ""),
            exc,
            config.identity_max_age,
        )
        raise IdentityRejected(f"identity rejected: {exc}", code=exc.code) from exc
    except ident.IdentityError as exc:
        raise IdentityRejected(f"identity rejected: {exc}", code=exc.code) from exc


def _check_body_headers(request: Request, *, limit: int) -> None:
    if request.content_type not in JSON_TYPES and not request.content_type.endswith("+json"):
        raise UnsupportedMediaType(f"content-type must be application/json, got {request.content_type!r}")
    if request.content_length is not None and request.content_length > limit:
        raise BodyTooLarge(f"request body of {request.content_length} bytes exceeds the limit of {limit} bytes")


async def read_body(request: Request, *, limit: int) -> bytes:
    _check_body_headers(request, limit=limit)
    parts: list[bytes] = []
    size = 0
    while True:
        data = await request.content.readany()
        if not data:
            return b"".join(parts)
        size += len(data)
        if size > limit:
            raise _too_large(limit)
        parts.append(data)


def _too_large(limit: int) -> BodyTooLarge:
    return BodyTooLarge(f"request body exceeds the limit of {limit} bytes")


def _begin_reserve(meter: Meter, identity: ident.Identity, parsed: req.Parsed) -> quota.Reserving:
    return quota.Reserving(
        identity,
        prompt_estimate=parsed.prompt_estimate,
        choices=parsed.sequences,
        wanted=req.wanted_completion(parsed, default_max_tokens=meter.config.default_max_tokens),
        clamp=meter.config.clamp,
        store=meter.store,
        context=_context_of(meter, identity, parsed),
    )


async def _reserve(meter: Meter, reserving: quota.Reserving, identity: ident.Identity) -> Reservation:
    config = meter.config
    try:
        return await reserving.outcome()
    except TokensExhausted:
        meter.metrics.reservations[Outcome.DENIED].inc()
        raise
    except StoreError as exc:
        meter.metrics.reservations[Outcome.STORE_ERROR].inc()
        meter.metrics.store_errors["reserve"].inc()
        released = not isinstance(exc, StoreNotSent) and _release(meter, reserving)
        if config.deny_on_store_error:
            raise StoreUnavailable(f"token quota store unavailable: {exc}") from exc
        _warn.warning("token reservation skipped, store failed: %s", exc)  # once per request while Redis is down
        if isinstance(exc, StoreNotSent) or released:  # not taken (or given back): the commit debits the whole usage
            return quota.untaken(identity, reserving.sent[1] if reserving.sent is not None else "")
        return quota.unlimited(identity.key_id, outcome=Outcome.STORE_ERROR)


def _release(meter: Meter, reserving: quota.Reserving) -> bool:
    """Give back a reservation whose answer was lost (it may have run, or may yet): held and made until Redis
    answers. False when there is no backlog to hold it (its tokens then come back as the bucket refills)."""
    if meter.backlog is None or reserving.sent is None:
        return False
    op, reservation = reserving.sent
    return meter.backlog.hold_release(op, reservation)


@dataclass(slots=True)
class Begun:
    """A metered request checked and on its way: its reservation sent, its upstream request built (and prepared on
    an idle connection, to go out from the reservation's reply callback)."""

    started: float
    identity: ident.Identity
    raw: bytes
    parsed: req.Parsed
    reserving: quota.Reserving
    expected: int | None
    body: bytes
    headers: CIMultiDict[str]
    prepared: h1.Prepared | None
    relay: Relay | None = None
    """Set when the streamed answer started from the upstream connection's callback."""

    @property
    def model(self) -> str:
        return self.identity.model or self.parsed.model or UNKNOWN


def begin_early(meter: Meter, request: Request) -> None:
    """The server's hook for a request whose body has arrived whole: a metered one is checked and its reservation
    sent right here, in the protocol callback, rather than when the handler's task first runs (one loop turn later,
    behind whatever else is ready). What it finds, or the error it meets, waits on the request for the handler."""
    kind = _metered_kind(request)
    if kind is None:
        return
    started = time.perf_counter()
    try:
        identity = authenticate(request, meter)
        _check_body_headers(request, limit=meter.config.max_body_bytes)
        raw = request.content.read_now()
        if raw is None:
            return
        if len(raw) > meter.config.max_body_bytes:
            raise _too_large(meter.config.max_body_bytes)
        request.early = _begin(meter, request, kind, identity, raw, started)
    except Exception as exc:  # raised again by the handler, where every error is answered
        request.early = exc


def _begin(meter: Meter, request: Request, kind: Kind, identity: ident.Identity, raw: bytes, started: float) -> Begun:
    config = meter.config
    parsed = req.parse(raw, kind=kind, estimator=config.estimator, allow_unknown=config.allow_unknown)
    if config.check_model and identity.model and parsed.model and parsed.model != identity.model:
        raise ModelMismatch(
            f"model {parsed.model!r} is not the model this route serves ({identity.model!r})", param="model"
        )
    # the reservation goes to Redis now; the upstream request is built while it is on its way, for the case that
    # the bucket grants it in full (DESIGN §5: nothing is forwarded before the grant)
    reserving = _begin_reserve(meter, identity, parsed)
    expected = reserving.expected_max_tokens
    body = req.upstream_body(
        raw, parsed, max_tokens=expected, inject_usage=parsed.can_inject_usage, model=_routed(config, identity)
    )
    headers = request_headers(request.headers, metered=True)
    # on an idle connection the request goes upstream from Redis's reply callback if the grant is whole
    prepared = meter.upstream.prepare("POST", request.path_qs, headers=headers, body=body)
    begun = Begun(started, identity, raw, parsed, reserving, expected, body, headers, prepared)
    if prepared is not None:
        reserving.when_granted_in_full(
            lambda: prepared.fire(lambda upstream: _relay_early(meter, request, begun, upstream))
        )
    return begun


class _Bounded:
    """A chunked body passed on, cut when it grows past ``limit`` bytes: the upstream request fails unfinished, and
    ``over`` says why (aiohttp reports it as a broken connection)."""

    def __init__(self, content: AsyncIterable[bytes], limit: int) -> None:
        self._content = content
        self._limit = limit
        self.over = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        size = 0
        async for data in self._content:
            size += len(data)
            if size > self._limit:
                self.over = True
                raise _too_large(self._limit)
            yield data


def _routed(config: MeterConfig, identity: ident.Identity) -> str | None:
    """The model a body without one is sent naming (with ``--check-model``): the routed model, so vLLM serves or
    refuses exactly that one (without it, vLLM serves whatever model it has: a request admitted for one model and
    sent to another model's server passed the model check by naming none)."""
    return identity.model or None if config.check_model else None


def _streams(parsed: req.Parsed, upstream: h1.Response) -> bool:
    return parsed.stream and upstream.status < 400 and upstream.content_type == "text/event-stream"


def _relay_early(meter: Meter, request: Request, begun: Begun, upstream: h1.Response) -> None:
    """The head hook of a request sent from the reservation's callback: a streamed answer starts right here (the
    first token goes to the client as it arrives, not when the handler's task next runs)."""
    if not _streams(begun.parsed, upstream):
        return
    extra = _quota_headers(begun.reserving.granted_in_full(), begun.parsed)
    try:
        begun.relay = _open_relay(meter, request, begun.parsed, begun.model, begun.started, upstream, extra)
    except ConnectionResetError:
        return  # the task finds the client gone


def _open_relay(
    meter: Meter,
    request: Request,
    parsed: req.Parsed,
    model: str,
    started: float,
    upstream: h1.Response,
    extra: dict[str, str],
) -> Relay:
    """The client's streamed response started (``ClientGone`` if the client has left) and relayed from now on."""
    headers = response_headers(upstream.headers)
    headers.update(extra)
    relay = Relay(meter, parsed, model, started, request.stream(upstream.status, headers), upstream)
    relay.start()
    return relay


async def metered(request: Request, meter: Meter, *, kind: Kind) -> Reply | Stream:
    early = request.early
    if isinstance(early, BaseException):
        raise early
    if isinstance(early, Begun):
        begun = early
    else:  # the body was not whole when the head arrived: read it here
        started = time.perf_counter()
        identity = authenticate(request, meter)  # a wrong identity is refused before the body is read
        raw = await read_body(request, limit=meter.config.max_body_bytes)
        begun = _begin(meter, request, kind, identity, raw, started)
    identity, parsed, body, prepared = begun.identity, begun.parsed, begun.body, begun.prepared
    try:
        reservation = await _reserve(meter, begun.reserving, identity)
    except BaseException:
        if prepared is not None:
            prepared.abandon()
        raise
    if reservation.max_tokens != begun.expected:
        body = req.upstream_body(
            begun.raw,
            parsed,
            max_tokens=reservation.max_tokens,
            inject_usage=parsed.can_inject_usage,
            model=_routed(meter.config, identity),
        )
        if prepared is not None:
            prepared.abandon()  # never sent: the grant was not whole
            prepared = None
    overhead = time.perf_counter() - begun.started
    exchange = Exchange(identity, parsed, reservation, begun.model, begun.started, clock=meter.clock.now)
    # From here the request is cut when its client leaves or the meter stops (the server cancels it): the upstream
    # connection closes, so vLLM stops generating, and what the client was served is settled, as always.
    request.cuttable = lambda: not exchange.settled
    try:
        if request.gone:  # it left while the reservation was taken (nothing cuts that wait): not sent on
            if prepared is not None:
                prepared.abandon()  # (sent early, when the grant came: closed, so vLLM stops)
            _count_reservation(meter, reservation, overhead)
            raise asyncio.CancelledError
        return await _forward(request, meter, begun, exchange, body, prepared, overhead)
    except asyncio.CancelledError:
        if begun.relay is not None:
            begun.relay.stop()
            begun.relay.upstream.close()
        if not exchange.settled:
            meter.metrics.disconnects.inc()
            served = exchange.sent() if exchange.sent is not None else None
            await settle(meter.store, meter.metrics, exchange, backlog=meter.backlog, served=served, status=499)
        raise
    finally:
        request.cuttable = None


async def _forward(
    request: Request,
    meter: Meter,
    begun: Begun,
    exchange: Exchange,
    body: bytes,
    prepared: h1.Prepared | None,
    overhead: float,
) -> Reply | Stream:
    reservation = exchange.reservation
    # the bookkeeping below waits until the request is upstream: it is then done while vLLM works on the answer
    try:
        upstream = await meter.upstream.send(
            "POST", request.path_qs, headers=begun.headers, body=body, prepared=prepared
        )
    except MeterError as exc:
        if begun.relay is not None:  # a response whose head came, but too late
            begun.relay.stop()
            begun.relay.upstream.close()
        _count_reservation(meter, reservation, overhead)
        await settle(meter.store, meter.metrics, exchange, backlog=meter.backlog, served=None, status=exc.status)
        raise
    _count_reservation(meter, reservation, overhead)
    extra = _quota_headers(reservation, exchange.parsed)
    try:
        relay = begun.relay if begun.relay is not None and begun.relay.upstream is upstream else None
        if relay is not None or _streams(exchange.parsed, upstream):
            return await _stream(request, meter, exchange, upstream, extra, relay)
        if upstream.status >= 400:
            return await _upstream_error(request, meter, exchange, upstream, extra)
        return await _whole(request, meter, exchange, upstream, extra)
    finally:
        upstream.release()


def _count_reservation(meter: Meter, reservation: Reservation, overhead: float) -> None:
    if reservation.outcome is not Outcome.STORE_ERROR:  # store errors were counted when they happened
        meter.metrics.reservations[reservation.outcome].inc()
    meter.metrics.overhead.observe(overhead)


def _quota_headers(reservation: Reservation, parsed: req.Parsed) -> dict[str, str]:
    headers: dict[str, str] = {}
    if reservation.max_tokens is not None and reservation.max_tokens != parsed.max_tokens:
        headers[H_MAX_TOKENS] = str(reservation.max_tokens)
    if reservation.clamped:
        headers[H_CLAMPED] = str(reservation.max_tokens)
    if reservation.limit > 0 and reservation.outcome is not Outcome.STORE_ERROR:  # (nothing known of the bucket)
        headers["x-ratelimit-limit-tokens"] = str(reservation.limit)
        headers["x-ratelimit-remaining-tokens"] = str(reservation.remaining)
        headers["x-ratelimit-reset-tokens"] = format_duration(reservation.reset_ms)
    return headers


async def _upstream_error(
    request: Request, meter: Meter, exchange: Exchange, upstream: h1.Response, extra: dict[str, str]
) -> Reply:
    try:
        raw = await meter.upstream.read(upstream, limit=64 * 1024)
    except MeterError:
        raw = b""
    if upstream.status >= 500:
        meter.upstream.count("status_5xx")
    await settle(meter.store, meter.metrics, exchange, backlog=meter.backlog, served=None, status=upstream.status)
    body = normalise_upstream_error(upstream.status, raw)
    return Reply(upstream.status, body, headers=extra, content_type=JSON)


async def _whole(
    request: Request, meter: Meter, exchange: Exchange, upstream: h1.Response, extra: dict[str, str]
) -> Reply:
    try:
        raw = await meter.upstream.read(upstream, limit=meter.config.max_response_bytes)
    except MeterError as exc:
        await settle(meter.store, meter.metrics, exchange, backlog=meter.backlog, served=None, status=exc.status)
        raise
    served = response_usage(raw)
    if served is None or not served.total:
        served = _unreported(meter, exchange) if upstream.content_type == "application/json" else Usage()
    await settle(meter.store, meter.metrics, exchange, backlog=meter.backlog, served=served, status=upstream.status)
    headers = response_headers(upstream.headers)
    headers.update(extra)
    return Reply(upstream.status, raw, headers=headers)


def _unreported(meter: Meter, exchange: Exchange) -> Usage:
    """What a successful answer that reports no usage, or a usage of zero tokens, is charged (an upstream that
    ignores the usage the meter asks for, or fills it with zeros: vLLM never serves a request without a prompt
    token): the most the request could have cost, its prompt estimate and every choice's completion limit. Charging
    nothing would make such an upstream's answers free."""
    meter.upstream.count("no_usage")
    _warn.warning("upstream answer without usage: charged the request's reservation bound")
    parsed = exchange.parsed
    per_choice = exchange.reservation.max_tokens
    if per_choice is None:
        per_choice = req.wanted_completion(parsed, default_max_tokens=meter.config.default_max_tokens)
    return Usage(prompt=parsed.prompt_estimate, completion=parsed.choices * per_choice if parsed.generates else 0)


class Relay:
    """A streamed answer on its way to the client: the upstream's events re-framed and counted (``StreamMeter``),
    the usage of what the client has been sent, the time to the first token. Events are relayed from the upstream
    connection's callback as they arrive (``pump``: no task wakes up per token); for a request sent from the
    reservation's callback that starts with the response head, before the handler's task runs again. The relay
    hands over to the task (``stop``) at the last event (``[DONE]`` waits for the settlement), at the end of the
    body or a failure, when the client is gone, and when the client's buffer is full (the task waits until the
    client has read, then the relay goes on from the callback)."""

    __slots__ = (
        "failure",
        "first",
        "full",
        "gone",
        "held",
        "last",
        "listening",
        "response",
        "sent",
        "splitter",
        "started",
        "tracker",
        "ttft",
        "upstream",
        "waiter",
    )

    def __init__(
        self, meter: Meter, parsed: req.Parsed, model: str, started: float, response: Stream, upstream: h1.Response
    ) -> None:
        self.response = response
        self.upstream = upstream
        self.tracker = StreamMeter(
            want_usage=parsed.want_usage,
            want_continuous=parsed.want_continuous,
            null_usage=parsed.kind == "completion",
            per_prompt=parsed.n,
        )
        self.splitter = Splitter(max_event_bytes=meter.config.max_event_bytes)
        self.ttft = meter.metrics.models.get((model, OPERATIONS[parsed.kind])).ttft
        self.started = started
        self.first = True
        self.sent = Usage()  # the usage of what the client has been sent
        self.held = b""  # the last events, [DONE] among them, held for the task
        self.gone = False
        self.failure: Exception | None = None
        self.listening = False
        self.full = False  # stopped because the client's buffer is full
        self.last = 0.0  # when the upstream last sent something (monotonic)
        self.waiter: asyncio.Future[None] | None = None

    def events(self, data: bytes) -> bytes:
        """The client's bytes for what arrived (``b""`` until an event is whole)."""
        return b"".join(self.tracker.event(event) for event in self.splitter.feed(data))

    def sending(self) -> float:
        """Called just before a write of events: the time to first token, at the first."""
        return time.perf_counter() - self.started if self.first else 0.0

    def wrote(self, ttft: float) -> None:
        if self.first:  # observed once the first token is on its way to the client
            self.first = False
            self.ttft.observe(ttft)
        self.sent = self.tracker.usage()

    def start(self) -> None:
        """Relay from the upstream's callback from now on, starting with what already waits."""
        self.full = False
        self.listening = True
        self.last = time.monotonic()
        self.upstream.listen(self.pump)
        self.pump()

    def pump(self) -> None:
        """The upstream's listener: relay what arrived at once."""
        upstream = self.upstream
        try:
            data = upstream.take_now()
            if data:
                self.last = time.monotonic()
                out = self.events(data)
                if self.tracker.done:
                    self.held = out
                    self.stop()
                    return
                if out:
                    ttft = self.sending()
                    self.full = self.response.send_now(out)
                    self.wrote(ttft)
                    if self.full:
                        self.stop()
                        return
            if upstream.ended:  # the end, or a failure: the task meets it
                self.stop()
        except ConnectionResetError:
            self.gone = True
            self.stop()
        except Exception as exc:  # raised again in the task
            self.failure = exc
            self.stop()

    def stop(self) -> None:
        if self.listening:
            self.listening = False
            self.upstream.listen(None)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def stopped(self, upstream: Upstream) -> None:
        """Wait while the relay runs from the callback; ``went_silent`` when the upstream sends nothing for longer
        than its idle timeout."""
        waiter = self.waiter = asyncio.get_running_loop().create_future()
        try:
            while self.listening:
                remaining = self.last + upstream.idle_timeout - time.monotonic()
                if remaining <= 0:
                    raise upstream.went_silent()
                await asyncio.wait((waiter,), timeout=remaining)
        finally:
            self.stop()


async def _stream(
    request: Request,
    meter: Meter,
    exchange: Exchange,
    upstream: h1.Response,
    extra: dict[str, str],
    relay: Relay | None,
) -> Reply | Stream:
    if relay is None:
        try:
            relay = _open_relay(meter, request, exchange.parsed, exchange.model, exchange.started, upstream, extra)
        except ConnectionResetError:
            upstream.close()
            meter.metrics.disconnects.inc()
            await settle(meter.store, meter.metrics, exchange, backlog=meter.backlog, served=None, status=499)
            return Reply(499)
    response, tracker = relay.response, relay.tracker
    exchange.sent = lambda: relay.sent
    failure: MeterError | None = None
    try:
        await relay.stopped(meter.upstream)
        while relay.full:  # the client's buffer was full: on from the callback once the client has read
            await response.drained()
            relay.start()
            await relay.stopped(meter.upstream)
        if relay.gone:
            raise ClientGone("client closed the connection")
        if relay.failure is not None:
            raise relay.failure
        out = relay.held
        if not tracker.done:  # the body ended or failed before [DONE]: the task meets the end or the failure
            async for data in meter.upstream.chunks(upstream):
                out = relay.events(data)
                if tracker.done:
                    break
                if out:
                    ttft = relay.sending()
                    await response.write(out)
                    relay.wrote(ttft)
        if tracker.done:
            # settle before the client sees [DONE]: a client that has its whole answer is already accounted
            served, status = _stream_outcome(meter, exchange, tracker, status=upstream.status)
            await settle(meter.store, meter.metrics, exchange, backlog=meter.backlog, served=served, status=status)
            tail = _last_event(out)
            ttft = relay.sending()
            await response.write(out[: len(out) - len(tail)])
            await response.write(tail)
            if relay.first:
                relay.wrote(ttft)
    except ConnectionResetError:
        upstream.close()
        meter.metrics.disconnects.inc()
        if not tracker.done:
            await settle(meter.store, meter.metrics, exchange, backlog=meter.backlog, served=relay.sent, status=499)
        return response
    except MeterError as exc:
        failure = exc
        upstream.close()
    except SseError as exc:
        meter.upstream.count("broken")
        failure = UpstreamBroken(f"upstream sent a malformed event stream: {exc}")
        upstream.close()
    if not tracker.done:
        await _broken_stream(response, meter, exchange, tracker, failure)
        return response
    await response.write_eof()
    return response


def _stream_outcome(meter: Meter, exchange: Exchange, tracker: StreamMeter, *, status: int) -> tuple[Usage | None, int]:
    """What a stream that reached ``[DONE]`` is charged, and the status it is counted with. A stream vLLM ended with
    an error event is counted with the error's status (the client got ``200`` and the event: the head was gone) and
    charged the usage vLLM reported before it, or nothing when it reported none (refunded, as an error status is)."""
    error = tracker.error_status
    if error is None:
        usage = tracker.usage()
        return (usage if usage.total else _unreported(meter, exchange)), status
    if error >= 500:
        meter.upstream.count("status_5xx")
    _warn.warning("upstream ended a stream of key %s with an error event (%d)", exchange.identity.key_id, error)
    return (tracker.usage() if tracker.reported else None), error


def _last_event(out: bytes) -> bytes:
    at = out.rfind(b"data:")
    return out[at:] if at >= 0 else b""


async def _broken_stream(
    response: Stream, meter: Meter, exchange: Exchange, tracker: StreamMeter, failure: MeterError | None
) -> None:
    """The upstream stream ended without ``[DONE]``: charge what was sent, tell the client as vLLM does (an error
    event, then ``[DONE]``)."""
    if failure is None:  # a clean end of the body, but without [DONE]
        meter.upstream.count("broken")
        failure = UpstreamBroken("upstream closed the stream before it was complete")
    await settle(
        meter.store, meter.metrics, exchange, backlog=meter.backlog, served=tracker.usage(), status=failure.status
    )
    event = envelope(str(failure), type_=failure.type, code=failure.code)
    try:
        await response.write(b"data: " + event + b"\n\ndata: [DONE]\n\n")
        await response.write_eof()
    except ConnectionResetError:
        meter.metrics.disconnects.inc()


async def passthrough(request: Request, meter: Meter) -> Reply | Stream:
    """Any other request: streamed to the upstream and back unchanged (bounded by the same timeouts, its body by
    ``--max-body-bytes``: ``/tokenize`` of a gigabyte prompt is unmetered tokenizer work on the model server). It is
    cut when its client leaves: nothing is settled for it, and its place among the passthrough requests in flight (or
    in the queue for one) goes to the next."""
    limit = meter.config.max_body_bytes
    data: AsyncIterable[bytes] | None = None
    if request.body_exists:
        length = request.content_length
        if length is not None and length > limit:
            refused = BodyTooLarge(f"request body of {length} bytes exceeds the limit of {limit} bytes")
            meter.metrics.rejected(refused.code).inc()
            return _error(refused)
        data = request.content if length is not None else _Bounded(request.content, limit)
    request.cuttable = _always
    try:
        return await _pass(request, meter, data, limit)
    finally:
        request.cuttable = None


def _always() -> bool:
    return True


async def _pass(request: Request, meter: Meter, data: AsyncIterable[bytes] | None, limit: int) -> Reply | Stream:
    try:
        upstream = await meter.upstream.open(
            request.method, request.path_qs, headers=request_headers(request.headers, metered=False), data=data
        )
    except MeterError as exc:
        failure = _too_large(limit) if isinstance(data, _Bounded) and data.over else exc
        if not isinstance(failure, UPSTREAM_FAILURES):  # never sent: a refusal, as for a metered request
            meter.metrics.rejected(failure.code).inc()
        return _error(failure)
    try:
        response = request.stream(
            upstream.status,
            response_headers(upstream.headers),
            reason=upstream.reason,
            content_length=upstream.content_length,
        )
        try:
            async for chunk in meter.upstream.chunks(upstream):
                await response.write(chunk)
            await response.write_eof()
        except (MeterError, ConnectionResetError):
            upstream.close()  # the response stays unfinished: the server closes the client's connection
        return response
    except ConnectionResetError:
        upstream.close()
        return Reply(499)
    finally:
        meter.upstream.done(upstream)
