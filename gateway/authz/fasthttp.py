"""A lean HTTP/1.1 server for the ext_authz port: httptools (llhttp) parsing on an asyncio Protocol.

Why not aiohttp here: an ext_authz check is a body-less request answered with a small header-only response, and
aiohttp's request/response machinery (a task per request, a StreamResponse, a writer) costs more CPU than the whole
check. This server creates no task per request: a check either answers at once from the snapshot or attaches a
callback to its bucket-check future. It speaks exactly what Envoy's HTTP ext_authz client needs: keep-alive
HTTP/1.1 (and 1.0), requests answered in order, bodies read and discarded (bounded), header size bounded (431),
malformed HTTP answered 400 and the connection closed, at most ``--max-connections`` connections open (past it a 503
and a close: ``gateway.connections``). Everything else (ops port, meter, admin API) stays on aiohttp;
``--http-server aiohttp`` puts the check back on aiohttp's low-level server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections import deque
from http import HTTPStatus
from typing import cast

import httptools

from gateway.authz.server import INTERNAL, JSON, Checker, Pending, Reply
from gateway.connections import ConnectionCap
from gateway.decision import error_body, header_lines
from gateway.httpparse import feed

log = logging.getLogger("maas.authz.http")

MAX_BODY_BYTES = 1 << 20
MAX_QUEUED = 128
"""Pipelined requests answered in order; past this many outstanding ones the connection stops reading."""
LINGER_SECONDS = 1.0
"""After an answer that closes the connection, how long what the client still sends is read and dropped before the
socket is closed: closed at once with bytes unread (a client still sending a body), the kernel resets the
connection, and the client could lose the answer it had not read yet."""
STALL_SECONDS = 30.0
"""A request begun and not complete for this long (checked every half of it) is answered 408 and its connection
closed: Envoy sends a check in one write, and a client trickling its headers or never finishing a body held the
connection, its parser and a file descriptor for ever. Idle keep-alive connections are left alone (Envoy's pool
keeps them; closing one as Envoy sends on it would fail that check)."""

_WANTED = {
    spelling: name
    for name in ("host", "authorization", "x-api-key")
    for spelling in (name.encode(), name.title().encode(), name.upper().encode())
}
"""The request headers the decision reads (by the spellings clients use, else lowercased)."""
_KNOWN = {
    **dict.fromkeys(
        (
            b"content-length",
            b"content-type",
            b"user-agent",
            b"accept",
            b"x-forwarded-for",
            b"x-forwarded-proto",
            b"x-forwarded-client-cert",
            b"x-request-id",
            b"x-envoy-internal",
            b"x-envoy-expected-rq-timeout-ms",
            b"x-envoy-original-path",
            b"x-b3-traceid",
            b"x-b3-spanid",
            b"x-b3-sampled",
            b"traceparent",
        ),
        "",
    ),
    **_WANTED,
}
"""Header names as Envoy spells them, mapped to the decision's name or to "" (not read): one lookup per header."""
_STATUS = {s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode() for s in HTTPStatus}
_KEEP = b"content-length: %d\r\n\r\n"
_KEEP_10 = b"connection: keep-alive\r\ncontent-length: %d\r\n\r\n"
_CLOSE = b"connection: close\r\ncontent-length: %d\r\n\r\n"
KEEP_ALIVE_10 = 2
"""``keep_alive`` for an HTTP/1.0 client that asked to keep the connection: the answer says it keeps it."""


def encode(reply: Reply, *, keep_alive: bool | int) -> bytes:
    head = _STATUS.get(reply.status) or f"HTTP/1.1 {reply.status} Unknown\r\n".encode()
    tail = (_KEEP_10 if keep_alive == KEEP_ALIVE_10 else _KEEP if keep_alive else _CLOSE) % len(reply.body)
    shared = reply.shared
    if shared is None:
        return head + header_lines(reply.headers) + tail + reply.body
    if reply.wire is not None:
        return head + shared.wire + reply.wire + tail + reply.body
    return head + shared.wire + header_lines(reply.headers[len(shared.headers) :]) + tail + reply.body


def _error(status: int, code: str, message: str) -> bytes:
    body = error_body(message, error_type="invalid_request_error", code=code)
    return encode(Reply(status, [("content-type", JSON)], body), keep_alive=False)


BAD_REQUEST = _error(400, "bad_request", "Malformed HTTP request.")
TOO_LARGE = _error(431, "request_header_too_large", "Request headers are too large.")
BODY_TOO_LARGE = _error(413, "request_too_large", "The check request body is too large.")
STALLED = _error(408, "request_timeout", "The check request did not arrive in time.")


class CheckProtocol(asyncio.Protocol):
    def __init__(self, checker: Checker, *, max_header_bytes: int, cap: ConnectionCap) -> None:
        self._checker = checker
        self._cap = cap
        self._max_header = max_header_bytes
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._queue: deque[_Slot] = deque()
        self._paused = False
        self._write_paused = False
        """The client reads its answers slower than it pipelines requests: reading stops until it catches up
        (answered requests had piled up in the write buffer without bound, a gigabyte from one connection)."""
        self._started = 0.0
        self._pending = False
        """Bytes of a request not yet complete were received (set per read, cleared per request)."""
        self._reset()

    def _reset(self) -> None:
        """Ready for the next request of the connection (done when one completes: no callback per message begin)."""
        self._url = b""
        self._headers: dict[str, str] = {}
        self._repeated: dict[str, int] = {}
        self._size = 0
        self._body = 0
        self._chunked = False

    # --- asyncio.Protocol -----------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's transports are not asyncio subclasses

    def connection_lost(self, exc: Exception | None) -> None:
        self._cap.release()
        self._transport = None
        self._queue.clear()
        del self._parser  # it holds this protocol's callbacks: the pair is freed now, not at a later collection

    def pause_writing(self) -> None:
        self._write_paused = True
        if self._transport is not None and not self._paused:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._transport is not None and not self._paused:
            self._transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self._transport is None:  # answered and closing (lingering): the rest is dropped
            return
        self._started = time.perf_counter()  # the checks this read completes are timed from its arrival
        self._pending = True
        failure = feed(self, data)
        if failure is not None:
            self._fail(failure.response if isinstance(failure, _Abort) else BAD_REQUEST)
            del failure  # its traceback holds this frame: kept, the pair would wait for the collector

    # --- httptools callbacks ----------------------------------------------------------------------------------

    def on_url(self, url: bytes) -> None:
        self._size += len(url)
        if self._size > self._max_header:
            raise _Abort(TOO_LARGE)
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._size += len(name) + len(value) + 4
        if self._size > self._max_header:
            raise _Abort(TOO_LARGE)
        key = _KNOWN.get(name)
        if key is None:
            lower = name.lower()
            if lower == b"transfer-encoding":
                self._transfer_encoding(value)
                return
            key = _WANTED.get(lower)
        if not key:  # the decision reads only these; Envoy sends a dozen more per check
            return
        if key in self._headers:
            self._repeated[key] = self._repeated.get(key, 1) + 1
            return
        self._headers[key] = value.decode("utf-8", "surrogateescape")

    def _transfer_encoding(self, value: bytes) -> None:
        """Only ``chunked``, alone, once, in HTTP/1.1 (llhttp takes ``identity, chunked``, a second line, trailing
        whitespace and HTTP/1.0 as chunked): a body length another parser could read otherwise is refused, as the
        meter refuses it."""
        if self._chunked or value.lower() != b"chunked" or self._parser.get_http_version() != "1.1":
            raise _Abort(BAD_REQUEST)
        self._chunked = True

    def on_body(self, body: bytes) -> None:
        self._body += len(body)
        if self._body > MAX_BODY_BYTES:
            raise _Abort(BODY_TOO_LARGE)

    def on_message_complete(self) -> None:
        self._pending = False
        keep_alive: bool | int = self._parser.should_keep_alive()
        if keep_alive and self._parser.get_http_version() == "1.0":
            keep_alive = KEEP_ALIVE_10
        slot = _Slot()
        self._queue.append(slot)
        checker = self._checker
        headers, repeated = self._headers, self._repeated
        started = self._started
        url = self._url
        self._reset()
        try:
            step = checker.begin(
                host=headers.get("host", ""),
                path=url.decode("utf-8", "surrogateescape"),
                get=headers.get,
                count=repeated.get,  # only the names that came more than once are in it
                then=self._settle,
                tag=(slot, keep_alive, started),
            )
        except Exception:
            log.exception("ext_authz check failed")
            step = checker.deny(INTERNAL, "", "")
        if not isinstance(step, Pending):
            slot.fill(encode(step, keep_alive=keep_alive), close=not keep_alive)
            self._flush()
            checker.observe(time.perf_counter() - started)
        if len(self._queue) > MAX_QUEUED and self._transport is not None and not self._paused:
            self._paused = True
            if not self._write_paused:
                self._transport.pause_reading()

    # --- answers ----------------------------------------------------------------------------------------------

    def _settle(self, pending: Pending) -> None:
        slot, keep_alive, started = cast(tuple[_Slot, bool, float], pending.tag)
        checker = self._checker
        try:
            reply = checker.finish(pending)
        except Exception:
            log.exception("ext_authz check failed")
            reply = checker.deny(INTERNAL, "", "")
        slot.fill(encode(reply, keep_alive=keep_alive), close=not keep_alive)
        self._flush()
        checker.observe(time.perf_counter() - started)

    def _flush(self) -> None:
        transport = self._transport
        if transport is None:
            return
        queue = self._queue
        while queue and queue[0].data is not None:
            slot = queue.popleft()
            transport.write(slot.data)  # type: ignore[arg-type]
            if slot.close:
                queue.clear()
                self._transport = None
                _linger(transport)
                return
        if self._paused and len(queue) <= MAX_QUEUED // 2:
            self._paused = False
            if not self._write_paused:
                transport.resume_reading()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    @property
    def partial(self) -> object | None:
        """A token of the request being received (the same until it completes), or None between requests."""
        return self._headers if self._pending or self._size else None

    def stalled(self) -> None:
        """The request being received did not complete in time: answered 408 (after those owed), then closed."""
        self._pending = False
        if self._transport is not None and not self._paused:
            self._paused = True  # nothing more is read from it
            self._transport.pause_reading()
        self._fail(STALLED)

    def _fail(self, response: bytes) -> None:
        """Answer a request we cannot parse (after the ones before it) and close the connection."""
        slot = _Slot()
        slot.fill(response, close=True)
        self._queue.append(slot)
        self._flush()


def _linger(transport: asyncio.Transport) -> None:
    """Close after the answer: the write side at once (the client reads the answer, then the end), the socket once
    the client closes its side or after ``LINGER_SECONDS``."""
    if not transport.can_write_eof():
        transport.close()
        return
    transport.write_eof()
    asyncio.get_running_loop().call_later(LINGER_SECONDS, transport.close)


class _Slot:
    """One request's place in the answer order; ``data`` is set when its answer is known (class defaults, no
    ``__init__`` to run per request)."""

    data: bytes | None = None
    close = False

    def fill(self, data: bytes, *, close: bool) -> None:
        self.data = data
        self.close = close


class _Abort(Exception):
    def __init__(self, response: bytes) -> None:
        super().__init__("abort")
        self.response = response


class CheckServer:
    """The listening socket and its open connections (Envoy keeps them open: shutdown closes them), at most
    ``cap.limit`` of them."""

    def __init__(
        self, checker: Checker, *, max_header_bytes: int, cap: ConnectionCap, stall_seconds: float = STALL_SECONDS
    ) -> None:
        self._checker = checker
        self._max_header = max_header_bytes
        self._cap = cap
        self._connections: weakref.WeakSet[CheckProtocol] = weakref.WeakSet()
        self._server: asyncio.Server | None = None
        self._stall = stall_seconds
        self._sweeper: asyncio.TimerHandle | None = None
        self._suspects: weakref.WeakKeyDictionary[CheckProtocol, object] = weakref.WeakKeyDictionary()

    def _sweep(self) -> None:
        """Close the connections whose request was already in progress, the same request, at the last sweep: one
        timer for the server, nothing per request."""
        suspects: weakref.WeakKeyDictionary[CheckProtocol, object] = weakref.WeakKeyDictionary()
        for protocol in list(self._connections):
            partial = protocol.partial
            if partial is None:
                continue
            if self._suspects.get(protocol) is partial:
                protocol.stalled()
            else:
                suspects[protocol] = partial
        self._suspects = suspects
        self._sweeper = asyncio.get_running_loop().call_later(self._stall / 2, self._sweep)

    def _protocol(self) -> asyncio.Protocol:
        return self._cap.protocol(self._admit)

    def _admit(self) -> CheckProtocol:
        protocol = CheckProtocol(self._checker, max_header_bytes=self._max_header, cap=self._cap)
        self._connections.add(protocol)
        return protocol

    async def start(self, *, host: str, port: int, backlog: int = 1024) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._protocol, host=host, port=port, reuse_port=True, backlog=backlog)
        self._sweeper = loop.call_later(self._stall / 2, self._sweep)

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        self._suspects.clear()
        if self._server is not None:
            self._server.close()
        for protocol in list(self._connections):
            protocol.close()
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2.0):
                    await self._server.wait_closed()
