"""A lean HTTP/1.1 client for the meter's upstream: a keep-alive connection pool on asyncio Protocols with
httptools (llhttp) parsing.

Why not aiohttp's client for metered requests: a metered request is one POST with a body already in memory whose
response is streamed back event by event, and aiohttp's ClientSession (URL objects, request/response objects,
tracing hooks, a payload writer) adds about a third of a millisecond to the time to first token on the machines we
measure — a third of the meter's whole budget. This client writes the request in one ``write`` and hands the
response body over as it arrives (de-chunked), with flow control: it stops reading from the upstream while more
than ``HIGH_WATER`` bytes wait for a slow client.

Connections are reused LIFO; an idle connection older than ``keepalive`` seconds is closed rather than reused
(vLLM's server drops idle keep-alive connections after 5 s, so the default stays below that). A request that dies on
a *reused* connection before any byte of the response arrived is sent once more on a new connection: the upstream
closed the idle connection as we wrote, and never saw the request. Other failures raise ``ConnectionError``
subclasses (or ``OSError`` from connecting) for the caller to map; a response that breaks mid-body raises from
``readany``. Timeouts belong to the caller (``asyncio.timeout`` around ``request`` and ``readany``).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections import deque
from collections.abc import Callable, Iterable
from urllib.parse import urlsplit

import httptools
from multidict import CIMultiDict

from gateway import outbound

log = logging.getLogger("maas.meter.h1")

HIGH_WATER = 256 * 1024
MAX_HEADER_BYTES = 64 * 1024


class UpstreamClosed(ConnectionError):
    """The upstream closed the connection, or sent something that is not HTTP/1.x."""


class ConnectFailed(ConnectionError):
    """No connection to the upstream (refused, unreachable, name not resolved)."""


class ConnectTimeout(TimeoutError):
    """The upstream did not accept a connection in time."""


class IdleTimeout(TimeoutError):
    """Nothing of the response body arrived within the time ``readany`` was given."""


class PoolFull(Exception):
    """Every connection is in use and the most requests allowed to wait for one already do: not queued."""


class Inbox:
    """Bytes a protocol receives for one reader: the connection feeds them in (``_feed``, ``_finish``), the reader
    takes what has arrived so far (``_take``). ``_feed`` says when more than ``HIGH_WATER`` bytes wait, so the
    connection can stop reading; ``_taken`` is the hook that lets it read again. Shared by the upstream client's
    responses and the proxy server's request bodies. A ``listen``-er is called from the protocol's callback
    once per batch of bytes received (``_delivered``: all the chunks one read brought) and at the end, and takes
    what waits with ``take_now`` (no task wakes up)."""

    __slots__ = ("_done", "_error", "_listener", "_parts", "_size", "_waiter")

    def __init__(self) -> None:
        self._parts: deque[bytes] = deque()
        self._size = 0
        self._waiter: asyncio.Future[None] | None = None
        self._done = False
        self._error: Exception | None = None
        self._listener: Callable[[], None] | None = None

    def listen(self, listener: Callable[[], None] | None) -> None:
        """Call ``listener`` in the protocol's callback when bytes or the end arrive (None: stop)."""
        self._listener = listener

    def take_now(self) -> bytes:
        """What waits, without waiting: ``b""`` when nothing does (see ``ended`` for the end)."""
        return self._take_waiting() if self._parts else b""

    @property
    def ended(self) -> bool:
        """Everything was taken and no more will come (the end, or a failure ``_take`` raises)."""
        return not self._parts and (self._done or self._error is not None)

    async def _take(self, idle: float | None = None) -> bytes:
        """What arrived since the last call (waiting for something, at most ``idle`` seconds, else
        ``IdleTimeout``), ``b""`` at the end. One timer per wait: cheaper than ``asyncio.timeout`` on a path taken
        once per streamed token."""
        while not self._parts:
            if self._error is not None:
                raise self._error
            if self._done:
                return b""
            self._waiting()
            loop = asyncio.get_running_loop()
            waiter = self._waiter = loop.create_future()
            timer = loop.call_later(idle, _expire, waiter, idle) if idle is not None else None
            try:
                await waiter
            finally:
                self._waiter = None
                if timer is not None:
                    timer.cancel()
        return self._take_waiting()

    def _take_waiting(self) -> bytes:
        """Everything that waits, now (``b""`` if nothing)."""
        data = self._parts[0] if len(self._parts) == 1 else b"".join(self._parts)
        self._parts.clear()
        self._size = 0
        self._taken()
        return data

    def _waiting(self) -> None:
        """Called before the reader waits for more."""

    def _taken(self) -> None:
        """Called once the reader has taken what waited."""

    # fed by the connection
    def _feed(self, data: bytes) -> bool:
        self._parts.append(data)
        self._size += len(data)
        self._wake()
        return self._size > HIGH_WATER

    def _delivered(self) -> None:
        """The protocol has fed all that one read brought."""
        if self._listener is not None and self._parts:
            self._listener()

    def _finish(self, error: Exception | None = None) -> None:
        if self._done or self._error is not None:
            return
        if error is None:
            self._done = True
        else:
            self._error = error
        if self._listener is not None:
            self._listener()
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class Response(Inbox):
    """One upstream response: status and headers at once, the body through ``readany`` as it arrives."""

    __slots__ = ("_conn", "headers", "status")

    def __init__(self, conn: _Connection, status: int, headers: CIMultiDict[str]) -> None:
        super().__init__()
        self._conn = conn
        self.status = status
        self.headers = headers

    @property
    def content_type(self) -> str:
        value = self.headers.get("content-type", "application/octet-stream")
        return value.partition(";")[0].strip().lower()

    async def readany(self, idle: float | None = None) -> bytes:
        """What arrived of the body since the last call, ``b""`` at its end; ``IdleTimeout`` after ``idle``
        seconds of silence."""
        return await self._take(idle)

    def _taken(self) -> None:
        self._conn.resume()

    def release(self) -> None:
        """Done with the response: the connection goes back to the pool if the body was read to its end."""
        self._conn.finished(self, reusable=self._done and self._error is None)

    def close(self) -> None:
        """Abandon the response and its connection (the upstream sees the client go away)."""
        self._conn.finished(self, reusable=False)


def _expire(waiter: asyncio.Future[None], timeout: float) -> None:
    if not waiter.done():
        waiter.set_exception(IdleTimeout(f"no data within {timeout:g}s"))


class _Connection(asyncio.Protocol):
    """One keep-alive connection; httptools calls the ``on_*`` methods while ``data_received`` feeds it."""

    def __init__(self, pool: Pool) -> None:
        self._pool = pool
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._headers: CIMultiDict[str] = CIMultiDict()
        self._header_bytes = 0
        self._name = b""
        self._opening: asyncio.Future[Response] | None = None
        self._on_head: Callable[[Response], None] | None = None
        self._response: Response | None = None
        self._complete = False
        self._keep_alive = False
        self._paused = False
        self.received = False
        self.closed = False
        self.idle_since = 0.0

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.received = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamClosed("upstream switched protocols"))
        except httptools.HttpParserError as exc:
            self._fail(UpstreamClosed(f"upstream sent invalid HTTP: {exc}"))
        if self._response is not None:
            self._response._delivered()  # a listener relays the read's chunks together

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        del self._parser  # it holds this protocol's callbacks: the pair is freed now, not at a later collection
        response = self._response
        if response is not None and not self._complete and self._reads_to_eof(response) and exc is None:
            self._complete = True  # a body delimited by the end of the connection
            response._finish()
            return
        self._fail(UpstreamClosed("upstream closed the connection" + (f": {exc}" if exc else "")))

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value)
        if self._header_bytes > MAX_HEADER_BYTES:
            raise UpstreamClosed(f"upstream response headers exceed {MAX_HEADER_BYTES} bytes")
        if name:
            self._name = name
            self._headers.add(name.decode("latin-1"), value.decode("latin-1"))
        elif self._name:  # a continuation of the previous header's value
            key = self._name.decode("latin-1")
            last = self._headers.popall(key)
            self._headers.extend((key, v) for v in last[:-1])
            self._headers.add(key, last[-1] + value.decode("latin-1"))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        headers, self._headers, self._header_bytes = self._headers, CIMultiDict(), 0
        if status < 200:  # 100 Continue and other interim responses
            return
        opening = self._opening
        if opening is None or opening.done():
            raise UpstreamClosed("upstream sent a response nobody asked for")
        self._opening = None
        response = self._response = Response(self, status, headers)
        hook, self._on_head = self._on_head, None
        if hook is not None:
            try:
                hook(response)
            except Exception:  # the caller handles the response from its task then
                log.exception("response head hook failed")
        opening.set_result(response)

    def on_body(self, body: bytes) -> None:
        if self._response is not None and self._response._feed(body) and not self._paused and self._transport:
            self._paused = True
            self._transport.pause_reading()

    def on_message_complete(self) -> None:
        if self._response is None:  # the end of an interim response
            return
        self._complete = True
        self._keep_alive = self._parser.should_keep_alive()  # llhttp forgets it once the callback returns
        self._response._finish()

    # used by Pool and Response
    def send(self, payload: bytes, on_head: Callable[[Response], None] | None = None) -> asyncio.Future[Response]:
        assert self._transport is not None
        self._opening = asyncio.get_running_loop().create_future()
        self._on_head = on_head
        self._response = None
        self._complete = self._keep_alive = False
        self.received = False
        self._transport.write(payload)
        return self._opening

    def resume(self) -> None:
        if self._paused and self._transport is not None and not self.closed:
            self._paused = False
            self._transport.resume_reading()

    def finished(self, response: Response, *, reusable: bool) -> None:
        if self._response is not response:
            return
        self._response = None
        keep = reusable and self._complete and self._keep_alive and not self.closed
        if not keep:
            self.close()
        self._pool.release(self, reusable=keep)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self._transport is not None:
                self._transport.close()

    def _reads_to_eof(self, response: Response) -> bool:
        h = response.headers
        return "content-length" not in h and "chunked" not in h.get("transfer-encoding", "").lower()

    def _fail(self, error: Exception) -> None:
        if self._opening is not None and not self._opening.done():
            self._opening.set_exception(error)
        if self._response is not None:
            self._response._finish(error)
        self.close()


class Pool:
    """Keep-alive connections to one upstream origin (``http`` or ``https``), at most ``limit`` at a time; at most
    ``max_waiting`` requests wait for one of them (None: any number), more raise ``PoolFull``."""

    def __init__(
        self,
        base_url: str,
        *,
        limit: int,
        connect_timeout: float,
        keepalive: float = 4.0,
        max_waiting: int | None = None,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"upstream must be an http(s) URL, got {base_url!r}")
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._ssl: ssl.SSLContext | None = ssl.create_default_context() if parts.scheme == "https" else None
        self._prefix = parts.path.rstrip("/")
        default_port = self._port == (443 if parts.scheme == "https" else 80)
        host = f"[{self._host}]" if ":" in self._host else self._host
        self._host_header = (host if default_port else f"{host}:{self._port}").encode("idna")
        self._idle: list[_Connection] = []
        self._slots = Slots(limit, max_waiting=max_waiting)
        self._busy: set[_Connection] = set()
        self._connect_timeout = connect_timeout
        self._keepalive = keepalive

    async def request(
        self, method: str, path_qs: str, *, headers: Iterable[tuple[str, str]], body: bytes, slot: bool = False
    ) -> Response:
        """Send the request and wait for the response's status and headers. ``slot``: the caller holds one
        already (``take_slot``), which the request now owns."""
        if not slot:
            await self._slots.take()
        conn: _Connection | None = None
        try:
            payload = self._encode(method, path_qs, headers, body)
            conn, reused = await self._checkout()
            return await self._exchange(conn, reused, payload, conn.send(payload))
        except BaseException:
            if conn is not None:
                self._drop(conn)
            self._slots.give()
            raise

    async def take_slot(self) -> None:
        """Wait until fewer than ``limit`` requests are in flight, and hold a place for one (for ``request``)."""
        await self._slots.take()

    @property
    def waiting(self) -> int:
        """Requests waiting for a connection."""
        return self._slots.waiting

    def prepare(self, method: str, path_qs: str, *, headers: Iterable[tuple[str, str]], body: bytes) -> Prepared | None:
        """A request on an idle connection, ready to be sent from a callback (``Prepared.fire``); None when that
        needs waiting (no free slot or no idle connection): use ``request`` then."""
        if not self._slots.try_take():
            return None
        conn = self._take_idle()
        if conn is None:
            self._slots.give()
            return None
        return Prepared(self, conn, self._encode(method, path_qs, headers, body))

    async def _exchange(
        self, conn: _Connection, reused: bool, payload: bytes, opening: asyncio.Future[Response] | None
    ) -> Response:
        """The response to ``payload`` sent on ``conn`` (``opening``); sent once more on a new connection when a
        reused one turns out to have been closed by the upstream before any byte of an answer, or was closed
        before it could be sent (``opening`` None)."""
        if opening is not None:
            try:
                return await opening
            except UpstreamClosed:
                if not reused or conn.received:
                    raise
        self._drop(conn)
        fresh, _ = await self._connect()
        try:
            return await fresh.send(payload)
        except BaseException:
            self._drop(fresh)
            raise

    def _drop(self, conn: _Connection) -> None:
        conn.close()
        self._busy.discard(conn)

    def release(self, conn: _Connection, *, reusable: bool) -> None:
        if conn not in self._busy:
            return
        self._busy.discard(conn)
        if reusable and self._keepalive > 0:
            conn.idle_since = time.monotonic()
            self._idle.append(conn)
        elif reusable:
            conn.close()
        self._slots.give()

    def close(self) -> None:
        for conn in (*self._idle, *self._busy):
            conn.close()
        self._idle.clear()

    async def _checkout(self) -> tuple[_Connection, bool]:
        conn = self._take_idle()
        if conn is not None:
            return conn, True
        return await self._connect()

    def _take_idle(self) -> _Connection | None:
        stale_before = time.monotonic() - self._keepalive
        while self._idle:
            conn = self._idle.pop()
            if conn.closed or conn.idle_since < stale_before:
                conn.close()
                continue
            self._busy.add(conn)
            return conn
        return None

    async def _connect(self) -> tuple[_Connection, bool]:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout):
                conn = await outbound.connect(
                    lambda: _Connection(self),
                    lambda factory: loop.create_connection(factory, self._host, self._port, ssl=self._ssl),
                    close=_Connection.close,
                )
        except TimeoutError as exc:
            raise ConnectTimeout(f"no connection within {self._connect_timeout:g}s") from exc
        except OSError as exc:
            raise ConnectFailed(exc.strerror or str(exc)) from exc
        self._busy.add(conn)
        return conn, False

    def _encode(self, method: str, path_qs: str, headers: Iterable[tuple[str, str]], body: bytes) -> bytes:
        lines = [b"%s %s HTTP/1.1\r\nhost: %s\r\ncontent-length: %d\r\n" % (
            method.encode("ascii"), (self._prefix + path_qs).encode("latin-1"), self._host_header, len(body)
        )]  # fmt: skip
        for name, value in headers:
            lines.append(b"%s: %s\r\n" % (name.encode("latin-1"), value.encode("utf-8", "surrogateescape")))
        lines.append(b"\r\n")
        lines.append(body)
        return b"".join(lines)


class Prepared:
    """A request with its connection and slot taken, to be sent without waiting: ``fire`` (from any callback),
    then ``response`` (in the task). ``abandon`` gives back what it holds: the connection to the pool when the
    request was never sent, else closed."""

    __slots__ = ("_conn", "_opening", "_payload", "_pool", "_settled")

    def __init__(self, pool: Pool, conn: _Connection, payload: bytes) -> None:
        self._pool = pool
        self._conn = conn
        self._payload = payload
        self._opening: asyncio.Future[Response] | None = None
        self._settled = False

    def fire(self, on_head: Callable[[Response], None] | None = None) -> None:
        """Send the request now; ``on_head`` is called with the response from the callback that reads its head
        (before ``response`` wakes)."""
        if self._opening is None and not self._settled and not self._conn.closed:
            self._opening = self._conn.send(self._payload, on_head)

    async def response(self) -> Response:
        """The response's status and headers (sent now if ``fire`` was not called)."""
        self._settled = True
        pool, conn = self._pool, self._conn
        try:
            if self._opening is None and not conn.closed:
                self._opening = conn.send(self._payload)
            return await pool._exchange(conn, True, self._payload, self._opening)
        except BaseException:
            pool._drop(conn)
            pool._slots.give()
            raise

    def abandon(self) -> None:
        if self._settled:
            return
        self._settled = True
        unsent = self._opening is None and not self._conn.closed
        if not unsent:
            if self._opening is not None:
                self._opening.cancel()
            self._conn.close()
        self._pool.release(self._conn, reusable=unsent)


class Slots:
    """A counting limit with a synchronous ``try_take`` (``asyncio.Semaphore`` has none): slots given back go to
    waiters first, in order; past ``max_waiting`` waiters ``take`` raises ``PoolFull`` instead of waiting."""

    __slots__ = ("_free", "_max_waiting", "_waiters", "waiting")

    def __init__(self, limit: int, *, max_waiting: int | None = None) -> None:
        self._free = limit
        self._max_waiting = max_waiting
        self._waiters: deque[asyncio.Future[None]] = deque()
        self.waiting = 0

    def try_take(self) -> bool:
        if self._free > 0:
            self._free -= 1
            return True
        return False

    async def take(self) -> None:
        if self.try_take():
            return
        if self._max_waiting is not None and self.waiting >= self._max_waiting:
            raise PoolFull(f"all connections are in use and {self.waiting} requests wait for one")
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self.waiting += 1
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.give()  # handed a slot just as the wait was cancelled: pass it on
            raise
        finally:
            self.waiting -= 1

    def give(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._free += 1
