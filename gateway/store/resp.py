"""A minimal pipelined RESP connection for the hot paths: EVALSHA of the bucket script, and the usage ledger.

redis-py spends more CPU packing, pooling and retrying a command than the bucket script costs Redis. This connection
writes pre-encoded RESP (each bucket operation carries its own encoded key and arguments), parses replies with
hiredis, and matches them to callers in order (Redis answers a connection's commands in order). Any failure or
timeout closes the connection and fails every waiting caller: an order-matched pipe must never guess. The meter's
usage-ledger writes share the pipe (one write of a few HINCRBYs per request); everything else (records, events,
reads, Redis Cluster) stays on redis-py.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections import deque
from typing import Any

import hiredis

from gateway.errors import StoreError

READ_CHUNK = 1 << 16


def command(*parts: bytes) -> bytes:
    return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)


def bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


class NoScript(StoreError):
    """The server does not have the script (it restarted or was flushed): load it and retry."""


class RespPipe:
    def __init__(
        self,
        *,
        host: str,
        port: int,
        db: int = 0,
        username: str | None = None,
        password: str | None = None,
        tls: bool = False,
    ) -> None:
        self._host = host
        self._port = port
        self._hello: list[bytes] = []
        if password:
            auth = (b"AUTH", username.encode(), password.encode()) if username else (b"AUTH", password.encode())
            self._hello.append(command(*auth))
        if db:
            self._hello.append(command(b"SELECT", str(db).encode()))
        self._tls = ssl.create_default_context() if tls else None
        self._writer: asyncio.StreamWriter | None = None
        self._waiters: deque[asyncio.Future[Any]] = deque()
        self._lock = asyncio.Lock()
        self._reader_task: asyncio.Task[None] | None = None

    async def _connect(self) -> asyncio.StreamWriter:
        async with self._lock:
            if self._writer is not None:
                return self._writer
            try:
                reader, writer = await asyncio.open_connection(self._host, self._port, ssl=self._tls)
            except OSError as exc:
                raise StoreError(f"cannot connect to redis at {self._host}:{self._port}: {exc}") from exc
            self._writer = writer
            self._reader_task = asyncio.get_running_loop().create_task(self._read(reader), name="resp-reader")
            for hello in self._hello:
                reply = await self._send(writer, hello)
                if isinstance(reply, hiredis.ReplyError):
                    self._reset(StoreError(f"redis refused the connection setup: {reply}"))
                    raise StoreError(f"redis refused the connection setup: {reply}")
            return writer

    def _send(self, writer: asyncio.StreamWriter, payload: bytes) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        writer.write(payload)
        return future

    async def call(self, payload: bytes) -> Any:
        """Send one encoded command and wait for its reply (a Redis error reply raises StoreError)."""
        writer = self._writer or await self._connect()
        future = self._send(writer, payload)
        try:
            reply = await future
        except asyncio.CancelledError:
            # a timeout mid-flight: the reply would be taken by the next caller, so drop the connection
            self._reset(StoreError("redis call cancelled"))
            raise
        if isinstance(reply, hiredis.ReplyError):
            message = str(reply)
            if message.startswith("NOSCRIPT"):
                raise NoScript(message)
            raise StoreError(f"redis error: {message}")
        return reply

    async def call_many(self, payload: bytes, count: int) -> list[Any]:
        """Send ``count`` encoded commands in one write and wait for all their replies (any error reply raises
        StoreError after all have arrived, so the connection stays in step)."""
        writer = self._writer or await self._connect()
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in range(count)]
        self._waiters.extend(futures)
        writer.write(payload)
        try:
            replies = [await f for f in futures]
        except asyncio.CancelledError:
            self._reset(StoreError("redis call cancelled"))
            raise
        for reply in replies:
            if isinstance(reply, hiredis.ReplyError):
                raise StoreError(f"redis error: {reply}")
        return replies

    async def _read(self, reader: asyncio.StreamReader) -> None:
        parser = hiredis.Reader()
        error: StoreError = StoreError("redis closed the connection")
        try:
            while True:
                data = await reader.read(READ_CHUNK)
                if not data:
                    break
                parser.feed(data)
                while (reply := parser.gets()) is not False:
                    if self._waiters:
                        future = self._waiters.popleft()
                        if not future.done():
                            future.set_result(reply)
        except (OSError, hiredis.ProtocolError) as exc:
            error = StoreError(f"redis connection failed: {exc}")
        self._reset(error)

    def _reset(self, error: StoreError) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()
        while self._waiters:
            future = self._waiters.popleft()
            if not future.done():
                future.set_exception(error)
        task, self._reader_task = self._reader_task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    async def close(self) -> None:
        task = self._reader_task
        self._reset(StoreError("closed"))
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await task
