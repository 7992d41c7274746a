"""The connections to the upstream (vLLM): the lean keep-alive client of ``h1`` for metered requests, one pooled
aiohttp session for passthrough and health probes, a timeout on every step, and both clients' exceptions turned
into the meter's errors (503 unreachable, 504 too slow, 502 broken) with a metric per reason. Metered requests wait
for a free connection of the lean client's pool, at most ``max_queue`` of them at a time; one more is refused at once
(503 ``upstream_busy``, counted as a refusal: it was never sent). Passthrough requests are bounded alike, apart from
the metered ones (a burst of ``/tokenize`` must not take the places of requests that hold reserved tokens): at most
``max_connections`` of them in flight, from their first byte sent to the last byte of their answer relayed or
dropped, and at most ``max_queue`` waiting; aiohttp's own pool would make any number wait, bounded only in time."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass

import aiohttp
import yarl
from multidict import CIMultiDict, MultiMapping
from prometheus_client import Counter

from gateway.logs import RateLimitedLog
from gateway.meter import h1
from gateway.meter.errors import MeterError, UpstreamBroken, UpstreamBusy, UpstreamTimeout, UpstreamUnavailable

log = logging.getLogger("maas.meter.upstream")
_warn = RateLimitedLog(log)

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)


METERED_DROP = frozenset({"accept-encoding", "expect"})
IDENTITY_PREFIX = "x-maas-"
RESPONSE_DROP = HOP_BY_HOP | {"date"}
"""The meter's server writes its own ``date`` on every response: the upstream's as well made two (Envoy folds them
into one comma-joined value, which no client parses as a date)."""


def request_headers(headers: Mapping[str, str], *, metered: bool) -> CIMultiDict[str]:
    """Client headers for the upstream: hop-by-hop ones dropped; metered requests ask for an unencoded body, and
    their body (already read) goes out with the headers, so a client's ``expect`` is not passed on. The identity
    headers stop here: the meter checked their first copy, and nothing behind it is to read them (or a second copy)."""
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        lower = name.lower()
        if lower in HOP_BY_HOP or (metered and lower in METERED_DROP) or lower.startswith(IDENTITY_PREFIX):
            continue
        out.add(name, value)
    return out


def response_headers(headers: MultiMapping[str]) -> CIMultiDict[str]:
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        if name.lower() not in RESPONSE_DROP:
            out.add(name, value)
    return out


Upstreamed = h1.Response | aiohttp.ClientResponse

BUSY_RETRY_AFTER = "1"
"""``retry-after`` of a request refused because the queue for a connection is full: a place comes free whenever one of
the requests in flight ends, which cannot be foretold; a second spreads the retries without stalling them."""


@dataclass(slots=True)
class _Queue:
    waiting: bool = False
    """Whether the request waits for a place among those in flight (so far not sent)."""


class Upstream:
    def __init__(
        self,
        base_url: str,
        *,
        connect_timeout: float,
        first_byte_timeout: float,
        idle_timeout: float,
        max_connections: int,
        errors: Mapping[str, Counter],
        max_queue: int,
        keepalive: float = 4.0,
    ) -> None:
        self.base_url = base_url
        self.first_byte_timeout = first_byte_timeout
        self.idle_timeout = idle_timeout
        self._connect_timeout = connect_timeout
        self._max_connections = max_connections
        self._max_queue = max_queue
        self._keepalive = keepalive
        self._errors = errors
        self._session: aiohttp.ClientSession | None = None
        self._pool: h1.Pool | None = None
        self._passing = h1.Slots(max_connections, max_waiting=max_queue)

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=self._max_connections,
            keepalive_timeout=self._keepalive if self._keepalive > 0 else None,
            force_close=self._keepalive <= 0,
            ttl_dns_cache=30,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None, connect=None, sock_connect=self._connect_timeout, sock_read=None),
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        )
        self._pool = h1.Pool(
            self.base_url,
            limit=self._max_connections,
            connect_timeout=self._connect_timeout,
            keepalive=self._keepalive,
            max_waiting=self._max_queue,
        )

    async def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
        if self._session is not None:
            await self._session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("upstream session not started")
        return self._session

    def went_silent(self) -> MeterError:
        """The error (counted) for a response body silent for longer than the idle timeout."""
        return self._fail(
            "idle_timeout", UpstreamTimeout(f"upstream went silent for {self.idle_timeout:g}s mid-response")
        )

    def _fail(self, reason: str, exc: MeterError) -> MeterError:
        self._errors[reason].inc()
        _warn.warning("upstream %s: %s", reason, exc)
        return exc

    async def send(
        self,
        method: str,
        path_qs: str,
        *,
        headers: CIMultiDict[str],
        body: bytes,
        prepared: h1.Prepared | None = None,
    ) -> h1.Response:
        """A request whose body is in memory (the metered ones), on the lean client: wait for the response
        headers (connect and first-byte timeouts). ``prepared`` (from ``prepare``, with the same request) is
        used instead of a new one; it may have been sent already."""
        if self._pool is None:
            raise RuntimeError("upstream session not started")
        with self._mapped_errors(), self._queue_timeout() as queue:
            async with asyncio.timeout(self.first_byte_timeout):
                if prepared is not None:
                    return await prepared.response()
                await self._take(queue, self._pool.take_slot)
                return await self._pool.request(method, path_qs, headers=headers.items(), body=body, slot=True)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _take(self, queue: _Queue, take: Callable[[], Awaitable[None]]) -> None:
        """Wait for a place among the requests in flight (``take``), or be refused at once past the queue."""
        queue.waiting = True
        try:
            await take()
        except h1.PoolFull as exc:
            raise self._busy() from exc
        queue.waiting = False

    @contextlib.contextmanager
    def _queue_timeout(self) -> Iterator[_Queue]:
        """A timeout that came while the request waited for a place (``_Queue.waiting``) is the meter's own limit,
        not a slow upstream: the request was never sent."""
        queue = _Queue()
        try:
            yield queue
        except TimeoutError as exc:
            if not queue.waiting:
                raise
            raise self._fail(
                "pool_timeout",
                UpstreamTimeout(
                    f"no upstream connection came free within {self.first_byte_timeout:g}s: all "
                    f"{self._max_connections} (--upstream-max-connections) are in use"
                ),
            ) from exc

    def _busy(self) -> UpstreamBusy:
        exc = UpstreamBusy(
            f"the model server is busy: all {self._max_connections} upstream connections (--upstream-max-connections) "
            f"are in use and {self._max_queue} requests (--upstream-max-queue) already wait for one; retry shortly",
            headers={"retry-after": BUSY_RETRY_AFTER},
        )
        _warn.warning("upstream queue full: %s", exc)
        return exc

    def waiting(self) -> int:
        """Requests (metered and passthrough) waiting for a free upstream connection."""
        return (self._pool.waiting if self._pool is not None else 0) + self._passing.waiting

    def prepare(self, method: str, path_qs: str, *, headers: CIMultiDict[str], body: bytes) -> h1.Prepared | None:
        """The request on an idle connection, to be sent from a callback; None when none is at hand."""
        if self._pool is None:
            return None
        return self._pool.prepare(method, path_qs, headers=headers.items(), body=body)

    async def open(
        self, method: str, path_qs: str, *, headers: CIMultiDict[str], data: AsyncIterable[bytes] | None
    ) -> aiohttp.ClientResponse:
        """A request streamed through unchanged (passthrough), on aiohttp's client: wait for a place among the
        passthrough requests in flight, then for the response headers (connect and first-byte timeouts). The place
        is the caller's until it gives the response to ``done``."""
        with self._mapped_errors(), self._queue_timeout() as queue:
            async with asyncio.timeout(self.first_byte_timeout):
                await self._take(queue, self._passing.take)
                try:
                    # encoded: the target goes upstream as the client sent it (yarl would resolve dot segments and
                    # re-quote; a proxy must not make one path of another)
                    url = yarl.URL(self.base_url + path_qs, encoded=True)
                    return await self.session.request(method, url, headers=headers, data=data, allow_redirects=False)
                except BaseException:
                    self._passing.give()
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def done(self, response: aiohttp.ClientResponse) -> None:
        """A passthrough response relayed, or given up: its connection back to the pool (closed when its body was
        not read to the end) and its place to the next request."""
        response.release()
        self._passing.give()

    @contextlib.contextmanager
    def _mapped_errors(self) -> Iterator[None]:
        try:
            yield
        except (aiohttp.ConnectionTimeoutError, h1.ConnectTimeout) as exc:
            raise self._fail(
                "connect_timeout",
                UpstreamTimeout(f"upstream did not accept a connection within {self._connect_timeout:g}s"),
            ) from exc
        except TimeoutError as exc:
            raise self._fail(
                "first_byte_timeout", UpstreamTimeout(f"upstream sent no response within {self.first_byte_timeout:g}s")
            ) from exc
        except (aiohttp.ClientConnectorError, h1.ConnectFailed) as exc:
            raise self._fail(
                "connect", UpstreamUnavailable(f"upstream is not reachable: {getattr(exc, 'strerror', None) or exc}")
            ) from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise self._fail(
                "broken", UpstreamBroken(f"upstream failed before responding: {type(exc).__name__}")
            ) from exc

    async def chunks(self, response: Upstreamed) -> AsyncIterator[bytes]:
        """The response body as it arrives; a silence longer than the idle timeout ends it with UpstreamTimeout."""
        lean = isinstance(response, h1.Response)
        while True:
            try:
                if lean:
                    data = await response.readany(self.idle_timeout)  # type: ignore[union-attr]
                else:
                    async with asyncio.timeout(self.idle_timeout):
                        data = await response.content.readany()  # type: ignore[union-attr]
            except TimeoutError as exc:
                raise self.went_silent() from exc
            except (aiohttp.ClientError, OSError) as exc:
                raise self._fail(
                    "broken", UpstreamBroken(f"upstream response broke off: {type(exc).__name__}")
                ) from exc
            if not data:
                return
            yield data

    async def read(self, response: Upstreamed, *, limit: int) -> bytes:
        parts: list[bytes] = []
        size = 0
        async for data in self.chunks(response):
            size += len(data)
            if size > limit:
                response.close()
                raise self._fail("broken", UpstreamBroken(f"upstream response exceeds {limit} bytes"))
            parts.append(data)
        return b"".join(parts)

    def count(self, reason: str) -> None:
        self._errors[reason].inc()

    async def context_lengths(self, *, within: float) -> dict[str, int]:
        """Each served model's context length, from the model server's ``GET /v1/models`` (vLLM lists
        ``max_model_len`` per model); empty when it does not answer or says nothing of them."""
        try:
            async with asyncio.timeout(within):
                async with self.session.get(self.base_url + "/v1/models") as response:
                    body = await response.read() if response.status == 200 else b"{}"
            listed = json.loads(body).get("data")
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError, RecursionError, AttributeError):
            return {}
        lengths: dict[str, int] = {}
        for model in listed if isinstance(listed, list) else ():
            if isinstance(model, dict) and isinstance(model.get("id"), str):
                length = model.get("max_model_len")
                if isinstance(length, int) and not isinstance(length, bool) and length > 0:
                    lengths[model["id"]] = length
        return lengths

    async def healthy(self, *, within: float) -> tuple[bool, str]:
        """The upstream's own readiness: ``GET /health`` answering 200."""
        try:
            async with asyncio.timeout(within):
                async with self.session.get(self.base_url + "/health") as response:
                    await response.read()
                    return response.status == 200, f"upstream /health answered {response.status}"
        except TimeoutError:
            return False, f"upstream /health did not answer within {within:g}s"
        except (aiohttp.ClientError, OSError) as exc:
            return False, f"upstream /health failed: {type(exc).__name__}"
