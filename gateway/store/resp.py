"""A minimal pipelined RESP connection for the hot paths: EVALSHA of the bucket script, and the usage ledger.

redis-py spends more CPU packing, pooling and retrying a command than the bucket script costs Redis. This connection
writes pre-encoded RESP (each bucket operation carries its own encoded key and arguments), parses replies with
hiredis in the protocol's ``data_received``, and hands each reply to its waiter there and then (Redis answers a
connection's commands in order): no task, no stream reader and no future between the socket and the caller that
wants the answer. A waiter is a plain callback, so the bucket batcher gets its results in the loop turn the reply
arrives in; ``call`` and ``call_many`` wrap it in a future for code that awaits.

Every send carries its own deadline. A reply that does not come in time, a failed or closed socket, or a reply
that cannot be parsed closes the connection and fails every waiting caller: an order-matched pipe must never guess.
Deadlines are watched by one timer per pipe, set for the oldest waiter's deadline (replies come in order, so no
later waiter can expire first), not by a timer per send: under steady traffic it fires about once per timeout.
A caller that stops waiting (a cancelled request) does not: its waiter stays in line and drops the reply. The meter's
usage-ledger writes share the pipe; everything else (records, events, reads, Redis Cluster) stays on redis-py.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import deque
from collections.abc import Callable
from typing import Any, cast

import hiredis

from gateway import outbound
from gateway.errors import StoreError, StoreNotSent, StoreTimeout

log = logging.getLogger("maas.store.resp")

Waiter = Callable[[Any, StoreError | None], None]
"""Called once, with the reply (an error reply arrives as the StoreError) or with the error that ended the pipe."""


def command(*parts: bytes) -> bytes:
    return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)


def bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


class NoScript(StoreError):
    """The server does not have the script (it restarted or was flushed): load it and retry."""


REFUSED = (b"OOM", b"READONLY", b"LOADING", b"MASTERDOWN", b"NOAUTH", b"WRONGPASS", b"NOPERM", b"BUSY ")
"""Error replies of a command Redis refused before running it (out of memory, a replica, still loading, not
authenticated, a script running): ``StoreNotSent``, as it can be made again without running twice."""


def _reply_error(reply: hiredis.ReplyError) -> StoreError:
    message = str(reply)
    if message.startswith("NOSCRIPT"):
        return NoScript(message)
    if message.encode().startswith(REFUSED):
        return StoreNotSent(f"redis refused the command: {message}")
    return StoreError(f"redis error: {message}")


_Waiting = tuple[Waiter, float, str]
"""A waiter in line, the deadline of the send it belongs to (loop time) and what that send was for."""


def _deliver(waiter: Waiter, reply: Any, error: StoreError | None) -> None:
    try:
        waiter(reply, error)
    except Exception:  # one caller's failure must not desynchronise the pipe or keep the others waiting
        log.exception("redis reply callback failed")


class _Protocol(asyncio.Protocol):
    def __init__(self, pipe: RespPipe) -> None:
        self._pipe = pipe
        self._parser = hiredis.Reader()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        parser = self._parser
        pipe = self._pipe
        try:
            parser.feed(data)
            while (reply := parser.gets()) is not False:
                if pipe.current is not self:
                    return  # reset by a callback: what is left belongs to nobody
                if not pipe.waiters:
                    raise hiredis.ProtocolError("a reply nobody asked for")
                waiter = pipe.waiters.popleft()[0]
                try:
                    if isinstance(reply, hiredis.ReplyError):
                        waiter(None, _reply_error(reply))
                    else:
                        waiter(reply, None)
                except Exception:  # one caller's failure must not desynchronise the pipe or keep the others waiting
                    log.exception("redis reply callback failed")
        except hiredis.ProtocolError as exc:
            self._pipe.reset(StoreError(f"redis connection failed: {exc}"), self)

    def connection_lost(self, exc: Exception | None) -> None:
        reason = f": {exc}" if exc is not None else ""
        self._pipe.reset(StoreError(f"redis closed the connection{reason}"), self)


class RespPipe:
    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 6379,
        path: str | None = None,
        db: int = 0,
        username: str | None = None,
        password: str | None = None,
        tls: ssl.SSLContext | None = None,
        timeout: float = 0.25,
    ) -> None:
        self._host = host
        self._port = port
        self._path = path
        """A Unix socket's path (``unix://`` URLs); host and port are not used then."""
        self._timeout = timeout
        self._hello: list[bytes] = []
        if password:
            auth = (b"AUTH", username.encode(), password.encode()) if username else (b"AUTH", password.encode())
            self._hello.append(command(*auth))
        if db:
            self._hello.append(command(b"SELECT", str(db).encode()))
        self._tls = tls
        self.current: _Protocol | None = None
        """The connected protocol, None while there is none (a plain attribute: read on every send and reply)."""
        self.waiters: deque[_Waiting] = deque()
        self._lock = asyncio.Lock()
        self._watch: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        """The loop of the current connection (``asyncio.get_running_loop`` costs a getpid system call per send)."""

    async def connect(self) -> None:
        async with self._lock:
            if self.current is not None:
                return
            loop = asyncio.get_running_loop()
            try:
                async with asyncio.timeout(max(self._timeout, 0.05) * 4):
                    path = self._path
                    protocol = await outbound.connect(
                        lambda: _Protocol(self),
                        (lambda factory: loop.create_unix_connection(factory, path))
                        if path is not None
                        else (lambda factory: loop.create_connection(factory, self._host, self._port, ssl=self._tls)),
                        close=_Protocol.close,
                    )
            except (OSError, TimeoutError) as exc:
                where = self._path if self._path is not None else f"{self._host}:{self._port}"
                raise StoreNotSent(f"cannot connect to redis at {where}: {exc!r}") from exc
            self.current = protocol
            self._loop = loop
            if self._hello:
                # AUTH and SELECT in one write, before anything else can be sent: a command another caller sent
                # while AUTH's reply was awaited had gone ahead of SELECT, into database 0
                try:
                    await self._wait(b"".join(self._hello), len(self._hello), "connection setup")
                except StoreError as exc:
                    # An error reply (the connection still up) means nothing sent on this connection ran: Redis
                    # answers whatever followed a refused AUTH with NOAUTH. A connection lost or timed out meanwhile
                    # says nothing of the kind.
                    kind = StoreNotSent if self.current is protocol else StoreError
                    refused = kind(f"redis refused the connection setup: {exc}")
                    self.reset(refused, protocol)
                    raise refused from exc

    def send(self, payload: bytes, waiters: list[Waiter], what: str) -> bool:
        """Write ``payload`` (one encoded command per waiter) now; False when not connected (``connect`` first).
        The waiters hear their replies in order, or the error that ended the connection, including a deadline
        passed (``StoreTimeout``) — never nothing."""
        protocol = self.current
        loop = self._loop
        if protocol is None or protocol.transport is None or loop is None:
            return False
        deadline = loop.time() + self._timeout
        self.waiters.extend([(waiter, deadline, what) for waiter in waiters])
        protocol.transport.write(payload)
        if self._watch is None:
            self._watch = loop.call_at(deadline, self._check_deadline, loop)
        return True

    def _check_deadline(self, loop: asyncio.AbstractEventLoop) -> None:
        self._watch = None
        if not self.waiters:
            return
        _, deadline, what = self.waiters[0]
        if deadline <= loop.time():
            self.reset(StoreTimeout(f"redis {what} timed out after {self._timeout:g}s"))
        else:
            self._watch = loop.call_at(deadline, self._check_deadline, loop)

    async def call(self, payload: bytes, what: str = "call") -> Any:
        """Send one encoded command and wait for its reply (an error reply raises StoreError)."""
        (reply,) = await self._wait(payload, 1, what)
        return reply

    async def call_many(self, payload: bytes, count: int, what: str = "call") -> list[Any]:
        """Send ``count`` encoded commands in one write and wait for all their replies (any error reply raises
        StoreError once all have arrived: the connection stays in step)."""
        return await self._wait(payload, count, what)

    async def call_each(self, payload: bytes, count: int, what: str = "call") -> list[tuple[Any, StoreError | None]]:
        """``call_many`` with each command's own outcome: its reply, or the error it got (an error reply, or the one
        that ended the connection). Raises only when nothing was sent (``StoreNotSent``)."""
        if self.current is None:
            await self.connect()
        future: asyncio.Future[list[tuple[Any, StoreError | None]]] = asyncio.get_running_loop().create_future()
        outcomes: list[tuple[Any, StoreError | None]] = []

        def one(reply: Any, error: StoreError | None) -> None:
            outcomes.append((reply, error))
            if len(outcomes) == count and not future.done():
                future.set_result(outcomes)

        if not self.send(payload, [one] * count, what):
            raise StoreNotSent("redis connection closed")
        return await future

    async def _wait(self, payload: bytes, count: int, what: str) -> list[Any]:
        outcomes = await self.call_each(payload, count, what)
        for _, error in outcomes:
            if error is not None:
                raise error
        return [reply for reply, _ in outcomes]

    def reset(self, error: StoreError, protocol: _Protocol | None = None) -> None:
        """Close the connection (only if it is still ``protocol``'s, when given) and fail every waiting caller."""
        current = self.current
        if current is None or (protocol is not None and protocol is not current):
            return
        self.current = None
        if current.transport is not None:
            current.transport.close()
        waiters, self.waiters = self.waiters, deque()
        for waiter, _, _ in waiters:
            _deliver(waiter, None, error)

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        self.reset(StoreError("closed"))
