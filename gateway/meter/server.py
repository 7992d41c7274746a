"""The meter's proxy port: a lean HTTP/1.1 server, httptools (llhttp) parsing on an asyncio Protocol.

Why not aiohttp's server here: every metered request pays the server's per-request machinery on its time to first
token, and on the machines we measure aiohttp's (request object, router, payload writer) costs 0.13-0.16 ms more per
request than this server (measured side by side, one POST at a time, a one-event streamed answer) — a sixth of
the meter's whole 1 ms budget. The ops port (``/healthz``, ``/readyz``, ``/metrics``) stays on aiohttp.

What it speaks:
- HTTP/1.1 and 1.0 with keep-alive; pipelined requests are answered in order (each waits for the one before);
- request bodies streamed to the handler as they arrive (``Request.content``), with flow control: the connection
  stops reading while more than ``HIGH_WATER`` bytes wait unread; ``Expect: 100-continue`` is answered when the
  handler first reads the body (so a 413 or 415 decided from the headers goes out without the body being sent);
- whole responses (``Reply``, with content-length) and streamed ones (``Request.stream``: chunked for HTTP/1.1,
  delimited by closing the connection for 1.0), no body for HEAD, 204 and 304, and write flow control (a streamed
  write waits while the client's socket buffer is full);
- malformed HTTP gets 400, headers over ``max_header_bytes`` 431, CONNECT 405, all in the OpenAI error envelope,
  and the connection closes; so does a body framing another parser could read otherwise (a Transfer-Encoding other
  than ``chunked`` alone), and a body whose framing breaks (a bad chunk) gets the 400 as its request's answer, with
  nothing after it read; an ``Upgrade`` header (h2c, websocket) is ignored and the request answered in
  HTTP/1.1; a handler that fails gets a 500 envelope (or, mid-stream, the connection closed);
- at most ``cap.limit`` connections are open at once: past it a new one gets a 503 and is closed
  (gateway/connections.py);
- a client that stops sending (FIN) is taken as gone: the connection closes at once, so a stream in progress is
  charged for what was sent;
- an idle keep-alive connection closes after ``keepalive_timeout`` seconds, and so does one whose request headers
  have not all arrived by then (counted from the connection's start or its last response: headers trickled a byte
  at a time must not hold a connection for ever); a request body that stops arriving for ``body_timeout`` seconds
  gets 408 and the connection closes; ``shutdown`` stops listening, closes idle connections and gives requests in
  flight a grace period.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus
from typing import cast
from urllib.parse import unquote, urlsplit

import httptools
from multidict import CIMultiDict

from gateway.connections import ConnectionCap
from gateway.httpparse import feed
from gateway.meter.errors import envelope
from gateway.meter.h1 import HIGH_WATER, IdleTimeout, Inbox

log = logging.getLogger("maas.meter.http")

MAX_HEADER_BYTES = 64 * 1024
KEEPALIVE_TIMEOUT = 75.0
BODY_TIMEOUT = 60.0
"""Longest silence while a request body is read (nginx's ``client_body_timeout``): a body never finished must not
hold its connection, its task and the pool slot it waits for without end."""
JSON = "application/json"

_REASONS = {s.value: s.phrase for s in HTTPStatus}
_NO_BODY = frozenset({204, 304})
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class ClientGone(ConnectionResetError):
    """The client closed the connection."""


@dataclass(slots=True)
class Reply:
    """A whole response: sent with a content-length once the handler returns it."""

    status: int
    body: bytes = b""
    headers: Mapping[str, str] | None = None
    content_type: str | None = None


class Body(Inbox):
    """A request body as it arrives: ``readany`` returns what came since the last call, ``b""`` at its end."""

    __slots__ = ("_conn", "_continue")

    def __init__(self, conn: _Connection, *, expect_continue: bool) -> None:
        super().__init__()
        self._conn = conn
        self._continue = expect_continue

    @property
    def complete(self) -> bool:
        """Every byte of the body has arrived (read or not)."""
        return self._done

    async def readany(self) -> bytes:
        try:
            return await self._take(self._conn.body_timeout)  # a timer only while waiting for bytes not yet here
        except IdleTimeout:
            self._conn.body_timed_out()
            raise ClientGone("the request body stopped arriving") from None

    def read_now(self) -> bytes | None:
        """The whole body when all of it has arrived (and nothing was read yet), else None."""
        if not self._done or self._error is not None:
            return None
        return self._take_waiting()

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[bytes]:
        while data := await self.readany():
            yield data

    def _waiting(self) -> None:
        if self._continue:  # the client holds the body back until it is asked for
            self._continue = False
            self._conn.send(_CONTINUE)

    def _taken(self) -> None:
        self._conn.consumed()


class Request:
    """One request: method, target, headers (case-insensitive), the body as it arrives."""

    __slots__ = (
        "_conn",
        "_stream",
        "content",
        "cuttable",
        "early",
        "handling",
        "headers",
        "keep_alive",
        "method",
        "path",
        "path_qs",
        "version",
    )

    def __init__(
        self,
        conn: _Connection,
        *,
        method: str,
        target: str,
        path: str,
        headers: CIMultiDict[str],
        version: str,
        keep_alive: bool,
        expect_continue: bool,
    ) -> None:
        self._conn = conn
        self._stream: Stream | None = None
        self.method = method
        self.path_qs = target
        self.path = path
        self.headers = headers
        self.version = version
        self.keep_alive = keep_alive
        self.content = Body(conn, expect_continue=expect_continue)
        self.early: object = None
        """What the server's ``early`` hook left for the handler (opaque to the server)."""
        self.cuttable: Callable[[], bool] | None = None
        """Set by a handler whose wait may be cut when the client leaves (it settles what it started on the
        ``CancelledError``); called then, it says whether cutting is still safe (not while the handler settles)."""
        self.handling = False

    @property
    def content_type(self) -> str:
        """The media type, lowercased, without parameters; ``""`` when the request has no content-type."""
        return self.headers.get("content-type", "").partition(";")[0].strip().lower()

    @property
    def content_length(self) -> int | None:
        value = self.headers.get("content-length")
        return int(value) if value is not None and value.isdigit() else None

    @property
    def body_exists(self) -> bool:
        return "transfer-encoding" in self.headers or (self.content_length or 0) > 0

    @property
    def gone(self) -> bool:
        """Whether the client's connection has closed."""
        return self._conn.closed

    def stream(
        self,
        status: int,
        headers: Mapping[str, str] | Iterable[tuple[str, str]],
        *,
        reason: str | None = None,
        content_length: int | None = None,
    ) -> Stream:
        """Start a streamed response (its head goes out with the first write); raises ``ClientGone`` when the
        client has already left."""
        if self._conn.closed:
            raise ClientGone("client closed the connection")
        self._stream = Stream(self, status, headers, reason=reason, content_length=content_length)
        return self._stream


def _has_dot_segment(path: str) -> bool:
    return "." in path and any(segment in (".", "..") for segment in path.split("/"))


def _origin_form(target: str) -> str:
    """The target as the upstream is asked for it: absolute-form (``http://host/path?q``, as sent to proxies) becomes
    ``/path?q``; the upstream is the meter's, never the host a client names (appended to the upstream's URL, an
    absolute target had made ``http://vllmhttp://host/...``: a 500, or a connection to another host)."""
    if target.startswith(("http://", "https://")):
        parts = urlsplit(target)
        return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return target


def _path_of(target: str) -> str:
    return unquote(target.partition("?")[0])


class Stream:
    """A streamed response; ``write`` sends at once (waiting only while the client's buffer is full)."""

    __slots__ = ("_body", "_chunked", "_conn", "_head", "_length", "_request", "_sent", "finished")

    def __init__(
        self,
        request: Request,
        status: int,
        headers: Mapping[str, str] | Iterable[tuple[str, str]],
        *,
        reason: str | None,
        content_length: int | None,
    ) -> None:
        self._conn = request._conn
        self._request = request
        self._body = request.method != "HEAD" and status not in _NO_BODY
        self._length = content_length
        self._sent = 0
        self.finished = False
        framing: list[tuple[str, str]] = []
        self._chunked = False
        if content_length is not None:
            framing.append(("content-length", str(content_length)))
        elif self._body:
            if request.version == "1.1":
                self._chunked = True
                framing.append(("transfer-encoding", "chunked"))
            else:
                request.keep_alive = False  # an HTTP/1.0 body without a length ends with the connection
        self._head = _head(status, reason, _pairs(headers) + framing, keep_alive=request.keep_alive)

    async def write(self, data: bytes) -> None:
        if self.send_now(data):
            await self._conn.drain()

    def send_now(self, data: bytes) -> bool:
        """Send ``data`` at once, from any callback; True when the client's buffer is full (``drained`` waits
        until it is not)."""
        conn = self._conn
        if conn.closed:
            raise ClientGone("client closed the connection")
        if not data or not self._body:
            return conn.write_paused
        self._sent += len(data)
        if self._chunked:
            data = b"%x\r\n%b\r\n" % (len(data), data)
        if self._head:
            data, self._head = self._head + data, b""
        conn.send(data)
        return conn.write_paused

    async def drained(self) -> None:
        """Wait while the client's buffer is full; ``ClientGone`` when the client has left."""
        await self._conn.drain()

    async def write_eof(self) -> None:
        if self.finished:
            return
        self.finished = True
        out, self._head = self._head, b""
        if self._chunked:
            out += b"0\r\n\r\n"
        if self._body and self._length is not None and self._sent != self._length:
            self._request.keep_alive = False  # the body the head announced was not all sent
        if out:
            self._conn.send(out)
        if self._conn.write_paused:
            await self._conn.drain()


def _pairs(headers: Mapping[str, str] | Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    return list(headers.items()) if isinstance(headers, Mapping) else list(headers)


_date_cache: tuple[int, bytes] = (0, b"")


def _date() -> bytes:
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, formatdate(now, usegmt=True).encode())
    return _date_cache[1]


def _head(status: int, reason: str | None, headers: list[tuple[str, str]], *, keep_alive: bool) -> bytes:
    phrase = reason or _REASONS.get(status, "Unknown")
    lines = [b"HTTP/1.1 %d %s\r\n" % (status, phrase.encode("latin-1", "replace"))]
    lines += [f"{name}: {value}\r\n".encode("latin-1", "replace") for name, value in headers]
    lines.append(b"date: %s\r\n" % _date())
    if not keep_alive:
        lines.append(b"connection: close\r\n")
    lines.append(b"\r\n")
    return b"".join(lines)


def encode_reply(reply: Reply, *, head_only: bool, keep_alive: bool) -> bytes:
    headers = _pairs(reply.headers) if reply.headers else []
    if reply.content_type is not None:
        headers.insert(0, ("content-type", reply.content_type))
    if reply.status not in _NO_BODY:
        headers.append(("content-length", str(len(reply.body))))
    head = _head(reply.status, None, headers, keep_alive=keep_alive)
    return head if head_only or reply.status in _NO_BODY else head + reply.body


def _error(status: int, code: str, message: str) -> Reply:
    """A canned answer to malformed input (encoded when sent: its ``date`` is the time it is sent)."""
    return Reply(status, envelope(message, type_="invalid_request_error", code=code), content_type=JSON)


class _Abort(Exception):
    def __init__(self, response: Reply | bytes) -> None:
        super().__init__()
        self.response = response


Handler = Callable[[Request], Awaitable[Reply | Stream]]
INTERNAL = envelope("The meter failed to handle the request.", type_="server_error", code="internal_error")


class _Connection(asyncio.Protocol):
    def __init__(self, server: Server) -> None:
        self._server = server
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._queue: deque[Request] = deque()
        self._task: asyncio.Task[None] | None = None
        self._current: Request | None = None
        self._read_paused = False
        self._drain: asyncio.Future[None] | None = None
        self._idle: asyncio.TimerHandle | None = None
        self._url = b""
        self._raw_headers: list[tuple[bytes, bytes]] = []
        self._size = 0
        self._failure: bytes | None = None
        self._broken: Request | None = None
        """The request whose body was malformed: ``_failure`` is its answer."""
        self._lingering: asyncio.TimerHandle | None = None
        self._head_pending = False
        self.body_timeout = server.body_timeout
        self.write_paused = False
        self.closed = False

    # --- asyncio.Protocol -----------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's transports are not asyncio subclasses
        self._server.connections.add(self)
        self._arm_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._transport = None
        self._server.connections.discard(self)
        self._server.cap.release()
        del self._parser  # it holds this protocol's callbacks: the pair is freed now, not at a later collection
        if self._idle is not None:
            self._idle.cancel()
        if self._lingering is not None:
            self._lingering.cancel()
        self._broken = None
        gone = ClientGone("client closed the connection")
        for request in self._queue:
            request.content._finish(gone)
        current = self._queue[0] if self._queue else None
        cut = current.cuttable if current is not None and current.handling else None
        if cut is not None and self._task is not None and cut():
            self._task.cancel()  # a metered request waiting on vLLM: it stops (and vLLM with it) and is settled
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(gone)
            self._drain.exception()  # retrieved here: a writer that stopped waiting must not warn

    def data_received(self, data: bytes) -> None:
        failure = feed(self, data)
        if failure is not None:
            self._fail(failure.response if isinstance(failure, _Abort) else BAD_REQUEST)
            del failure  # its traceback holds this frame: kept, the pair would wait for the collector

    def eof_received(self) -> bool:
        """The client stopped sending: taken as the client leaving (as HTTP clients and Envoy only do that when
        they are done), so the connection closes at once and a stream in progress is charged for what was sent."""
        return False

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    # --- httptools callbacks ----------------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        # the idle timer runs on until the headers are complete: it bounds the time they take to arrive
        self._head_pending = True
        self._url = b""
        self._raw_headers = []
        self._size = 0

    def on_url(self, url: bytes) -> None:
        self._grow(len(url))
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._size += len(name) + len(value) + 4
        if self._size > self._server.max_header_bytes:
            raise _Abort(TOO_LARGE)
        self._raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._head_pending = False
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        parser = self._parser
        method = parser.get_method().decode("ascii", "replace")
        if method == "CONNECT":
            raise _Abort(NOT_ALLOWED)
        if not self._url.startswith((b"/", b"http://", b"https://")) or b"#" in self._url:
            # "*" (asterisk-form) or garbage: nothing the model server could be asked; a fragment is never sent, and
            # model servers disagree on whether it is part of the path (h11 keeps it, httptools drops it)
            raise _Abort(BAD_TARGET)
        version = parser.get_http_version()
        headers = CIMultiDict([(name.decode("latin-1"), value.decode("latin-1")) for name, value in self._raw_headers])
        codings = headers.getall("transfer-encoding", ())
        if codings and (version != "1.1" or len(codings) > 1 or codings[0].lower() != "chunked"):
            raise _Abort(BAD_TRANSFER_ENCODING)
        target = self._url.decode("latin-1")
        if target[0] != "/":
            target = _origin_form(target)
        path = _path_of(target)
        if _has_dot_segment(path):
            # RFC 3986 5.2.4: resolved by the client, never sent; a path that only becomes a metered one once they
            # are resolved (by the upstream or a client library) must not pass as another path
            raise _Abort(DOT_SEGMENT)
        request = Request(
            self,
            method=method,
            target=target,
            path=path,
            headers=headers,
            version=version,
            keep_alive=parser.should_keep_alive(),
            expect_continue=version == "1.1" and headers.get("expect", "").lower() == "100-continue",
        )
        self._current = request
        self._queue.append(request)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._serve())

    def on_body(self, body: bytes) -> None:
        if self._lingering is not None:
            return  # the rest of a body nobody reads: dropped
        current = self._current
        if current is not None and current.content._feed(body) and not self._read_paused and self._transport:
            self._read_paused = True
            self._transport.pause_reading()

    def on_message_complete(self) -> None:
        if self._lingering is not None:
            self.close()
            raise _Abort(b"")  # parse nothing after the dropped body: the connection is closed
        current = self._current
        if current is None:
            return
        current.content._finish()
        self._current = None
        early = self._server.early
        # only for the request about to be handled: not one the handler may be reading already, nor one queued
        # behind others (a connection that closes first would leave its early work unsettled)
        if early is not None and not current.handling and self._queue and self._queue[0] is current:
            try:
                early(current)
            except Exception:  # the hook's work is only an early start: the handler still answers
                log.exception("early hook failed for %s %s", current.method, current.path)

    # --- for requests and responses ---------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        if self._transport is not None:
            self._transport.write(data)

    async def drain(self) -> None:
        if self.closed:
            raise ClientGone("client closed the connection")
        if not self.write_paused:
            return
        self._drain = asyncio.get_running_loop().create_future()
        try:
            await self._drain
        finally:
            self._drain = None

    def consumed(self) -> None:
        if self._read_paused and self._failure is None and self._transport is not None:
            current = self._current
            if current is None or current.content._size <= HIGH_WATER:
                self._read_paused = False
                self._transport.resume_reading()

    @property
    def idle(self) -> bool:
        return self._task is None and not self._queue

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    # --- internals --------------------------------------------------------------------------------------------

    def _grow(self, size: int) -> None:
        self._size += size
        if self._size > self._server.max_header_bytes:
            raise _Abort(TOO_LARGE)

    def _fail(self, response: Reply | bytes) -> None:
        """Malformed input: answered once, after the responses already owed, then the connection closes. Malformed
        input in a body (a bad chunk size, a missing CRLF, a bad trailer) is that request's answer; in the rest of a
        body already answered and being dropped, it only closes the connection (a second answer to one request
        would be taken for the answer to the next)."""
        if self._lingering is not None:
            self.close()
            return
        if isinstance(response, Reply):
            response = encode_reply(response, head_only=False, keep_alive=False)
        broken = self._current
        if broken is not None:
            broken.content._finish(ClientGone("the request was malformed"))
            self._current = None
        if self._transport is None or self._failure is not None:
            return
        self._failure = response
        self._broken = broken
        if not self._read_paused:
            self._transport.pause_reading()
            self._read_paused = True
        if self._task is None:
            self.send(response)
            self.close()

    async def _serve(self) -> None:
        try:
            while self._queue:
                request = self._queue[0]
                if self.closed and request.early is None:
                    self._queue.popleft()  # the client left before anything was started for it
                    continue
                # work the early hook started (a reservation, say) is finished by the handler even if the client
                # has left: that is where it is settled
                await self._answer(request)
                self._queue.popleft()
                if not request.keep_alive:
                    self._close_after(request)
                    return
            if self._failure is not None:
                self.send(self._failure)
                self.close()
                return
            self._arm_idle()
        finally:
            self._task = None

    async def _answer(self, request: Request) -> None:
        request.handling = True
        # a body already known to be malformed when its turn comes is not handled: nothing of it goes upstream
        result = None if request is self._broken else await self._handle(request)
        if not request.content.complete:
            request.keep_alive = False  # the rest of an unread body would be taken for the next request
        if request is self._broken:
            self._broken = None  # it points back at this connection: unlinked, neither waits for the collector
            if request._stream is None and self._failure is not None:
                self.send(self._failure)  # its 400, not what the handler made of a body cut short (a 502, say)
        elif isinstance(result, Reply) and request._stream is None:
            self.send(encode_reply(result, head_only=request.method == "HEAD", keep_alive=request.keep_alive))
        elif request._stream is None or not request._stream.finished:
            request.keep_alive = False  # a response that was not ended: only closing tells the client
        # the stream and the early hook's work point back at the request: unlinked, none of them waits for the collector
        request._stream = None
        request.early = None

    async def _handle(self, request: Request) -> Reply | Stream | None:
        try:
            return await self._server.handler(request)
        except ConnectionResetError:  # the client left while its request was read or answered
            return None
        except Exception:
            log.exception("meter request %s %s failed", request.method, request.path)
            return Reply(500, INTERNAL, content_type=JSON) if request._stream is None else None

    def _close_after(self, request: Request) -> None:
        """Close once the client has sent the rest of a body that was not read (an early 413, say). Closing with
        input unread makes the kernel reset the connection, and a client (Envoy) still sending then loses the
        answer before it reads it; so the write side is shut and the rest of the body read and dropped, for up
        to ``LINGER_SECONDS`` (RFC 9112 9.6)."""
        transport = self._transport
        if transport is None or request.content.complete or self._current is not request:
            self.close()
            return
        if transport.can_write_eof():
            transport.write_eof()
        self._lingering = asyncio.get_running_loop().call_later(LINGER_SECONDS, self.close)
        if self._read_paused:
            self._read_paused = False
            transport.resume_reading()

    def _arm_idle(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
        self._idle = asyncio.get_running_loop().call_later(self._server.keepalive_timeout, self._expire)

    def _expire(self) -> None:
        self._idle = None
        if self.idle:
            if self._head_pending and self._failure is None:
                self.send(encode_reply(HEAD_TIMEOUT, head_only=False, keep_alive=False))
            self.close()

    def body_timed_out(self) -> None:
        """The body being read stopped arriving: answered 408 unless an answer to it has begun, then closed."""
        current = self._queue[0] if self._queue else None
        if current is not None and current._stream is None and self._failure is None:
            self.send(encode_reply(BODY_TIMEOUT_REPLY, head_only=False, keep_alive=False))
        self.close()


SETTLE_SECONDS = 3.0
"""At shutdown, how long requests cut at the end of the grace period have to settle (bucket commit, ledger)."""
LINGER_SECONDS = 5.0
"""How long the unread rest of a refused request's body is read and dropped before the connection closes."""
BAD_REQUEST = _error(400, "bad_request", "Malformed HTTP request.")
TOO_MANY_CONNECTIONS = envelope(
    "The meter has too many open connections; retry shortly.", type_="server_error", code="too_many_connections"
)
"""The body of the 503 a connection past ``--max-connections`` gets (gateway/connections.py)."""
TOO_LARGE = _error(431, "request_header_too_large", "Request headers are too large.")
NOT_ALLOWED = _error(405, "method_not_allowed", "CONNECT is not supported.")
BAD_TARGET = _error(400, "bad_request", "The request target must be a path starting with '/', without a '#' fragment.")
DOT_SEGMENT = _error(400, "bad_request", "The request path must not hold '.' or '..' segments; resolve them first.")
HEAD_TIMEOUT = _error(408, "request_timeout", "The request headers did not arrive in time.")
BODY_TIMEOUT_REPLY = _error(408, "request_timeout", "The request body stopped arriving.")
BAD_TRANSFER_ENCODING = _error(
    400, "bad_request", "A request's Transfer-Encoding must be chunked alone, on one line, in HTTP/1.1."
)
"""Any other coding, list or spelling is refused (RFC 9112 6.1, 6.3): a body whose length two parsers could read
differently (``identity, chunked``, a second line, ``chunked`` with trailing whitespace, HTTP/1.0) is where a second
request hides; and a coding besides chunked (``gzip, chunked``) would reach the model server unlabelled."""


class Server:
    """The listening socket and its connections, at most ``cap.limit`` of them; ``handler`` answers each request."""

    def __init__(
        self,
        handler: Handler,
        *,
        cap: ConnectionCap,
        early: Callable[[Request], None] | None = None,
        keepalive_timeout: float = KEEPALIVE_TIMEOUT,
        body_timeout: float = BODY_TIMEOUT,
        max_header_bytes: int = MAX_HEADER_BYTES,
    ) -> None:
        self.handler = handler
        self.cap = cap
        self.early = early
        """Called in the protocol callback as soon as a request's body has arrived whole (before the handler's
        task may have run): work that should not wait a loop turn."""
        self.keepalive_timeout = keepalive_timeout
        self.body_timeout = body_timeout
        self.max_header_bytes = max_header_bytes
        self.connections: set[_Connection] = set()
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int, *, backlog: int = 2048) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._protocol, host, port, backlog=backlog)

    def _protocol(self) -> asyncio.Protocol:
        return self.cap.protocol(lambda: _Connection(self))

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("server not started")
        return int(self._server.sockets[0].getsockname()[1])

    async def shutdown(self, grace: float = 10.0) -> None:
        """Stop listening, close idle connections, let requests in flight finish for ``grace`` seconds, then close
        what is left: a metered request cut then settles what it served (as when its client leaves), for up to
        ``SETTLE_SECONDS``, before anything still running is cancelled."""
        if self._server is not None:
            self._server.close()
        deadline = asyncio.get_running_loop().time() + grace
        while True:
            for conn in list(self.connections):
                if conn.idle:
                    conn.close()
            busy = [conn._task for conn in self.connections if conn._task is not None]
            if not busy or asyncio.get_running_loop().time() >= deadline:
                break
            await asyncio.wait(busy, timeout=max(0.0, min(0.1, deadline - asyncio.get_running_loop().time())))
        busy = [conn._task for conn in self.connections if conn._task is not None]
        for conn in list(self.connections):
            conn.close()
        if busy:
            await asyncio.wait(busy, timeout=SETTLE_SECONDS)
        for task in busy:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self.connections.clear()
