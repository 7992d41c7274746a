"""The meter's lean upstream client (gateway/meter/h1.py) against a scripted HTTP/1.1 server on a real socket:
keep-alive reuse, the retry on a connection the upstream closed while idle, framing (content-length, chunked,
end-of-connection), interim responses, flow control, and broken upstreams."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from gateway.meter import h1
from tests.support.k8s_emulator import eventually

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Upstream:
    """A raw TCP server: every connection runs ``handler``; counts connections and requests."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        try:
            with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
                await self.handler(reader, writer)
        finally:
            writer.close()
            self.tasks.discard(task)

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await asyncio.sleep(0)

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"


@contextlib.asynccontextmanager
async def upstream(handler: Handler) -> AsyncIterator[Upstream]:
    up = Upstream(handler)
    up.server = await asyncio.start_server(up._serve, "127.0.0.1", 0)
    try:
        yield up
    finally:
        await up.stop()


async def read_request(reader: asyncio.StreamReader, into: list[bytes] | None = None) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        (int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")), 0
    )
    body = await reader.readexactly(length)
    if into is not None:
        into.append(head + body)
    return head + body


def keep_alive(up_requests: list[bytes], body: bytes = b'{"ok":true}') -> Handler:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader, up_requests)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (
                len(body), body
            ))  # fmt: skip
            await writer.drain()

    return handler


def answer(reply: bytes, into: list[bytes] | None = None) -> Handler:
    """An upstream that reads one request (kept in ``into``), sends ``reply`` and closes the connection without
    saying so beforehand (as an idle keep-alive timeout does)."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader, into)
        writer.write(reply)
        await writer.drain()

    return handler


async def read_all(response: h1.Response) -> bytes:
    parts = []
    while data := await response.readany():
        parts.append(data)
    return b"".join(parts)


async def served(pool: h1.Pool, path: str, body: bytes) -> bytes:
    """One request on ``pool``, its body read whole, its connection released."""
    response = await pool.request("POST", path, headers=[], body=body)
    try:
        return await read_all(response)
    finally:
        response.release()


async def test_request_is_one_write_with_host_and_length_and_connections_are_reused() -> None:
    seen: list[bytes] = []
    async with upstream(keep_alive(seen)) as up:
        pool = h1.Pool(up.url + "/prefix/", limit=4, connect_timeout=1)
        for _ in range(3):
            response = await pool.request("POST", "/v1/x?a=1", headers=[("x-maas-user", "ü")], body=b"{}")
            assert (response.status, response.content_type) == (200, "application/json")
            assert await read_all(response) == b'{"ok":true}'
            response.release()
        pool.close()
        port = up.url.rsplit(":", 1)[1]
    assert up.connections == 1
    assert seen[0] == (
        f"POST /prefix/v1/x?a=1 HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\ncontent-length: 2\r\n".encode()
        + "x-maas-user: ü\r\n\r\n{}".encode()
    )


async def test_an_idle_connection_the_upstream_closed_is_replaced_and_the_request_sent_once() -> None:
    seen: list[bytes] = []

    async with upstream(answer(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", seen)) as up:
        pool = h1.Pool(up.url, limit=4, connect_timeout=1)
        first = await pool.request("POST", "/a", headers=[], body=b"1")
        assert await read_all(first) == b"ok"
        first.release()
        await asyncio.sleep(0.05)
        second = await pool.request("POST", "/b", headers=[], body=b"2")
        assert await read_all(second) == b"ok"
        second.release()
        pool.close()
    assert up.connections == 2
    assert [r.split(b" ")[1] for r in seen] == [b"/a", b"/b"]


@pytest.mark.parametrize(("keepalive", "pause"), [(0.01, 0.05), (0.0, 0.0)], ids=["stale", "keepalive-off"])
async def test_idle_connections_past_the_keepalive_are_not_reused(keepalive: float, pause: float) -> None:
    seen: list[bytes] = []
    async with upstream(keep_alive(seen)) as up:
        pool = h1.Pool(up.url, limit=4, connect_timeout=1, keepalive=keepalive)
        for _ in range(2):
            response = await pool.request("POST", "/", headers=[], body=b"")
            await read_all(response)
            response.release()
            await asyncio.sleep(pause)
        pool.close()
    assert up.connections == 2


async def test_chunked_and_end_of_connection_bodies_and_interim_responses() -> None:
    async def chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n")
        writer.write(b"transfer-encoding: chunked\r\n\r\n5\r\ndata:\r\n")
        await writer.drain()
        await asyncio.sleep(0.02)
        writer.write(b"3\r\n 1\n\r\n0\r\n\r\n")
        await writer.drain()
        await read_request(reader)  # the connection stays usable

    async with upstream(chunked) as up:
        pool = h1.Pool(up.url, limit=2, connect_timeout=1)
        response = await pool.request("POST", "/", headers=[], body=b"")
        assert response.content_type == "text/event-stream"
        assert await read_all(response) == b"data: 1\n"
        response.release()
        pool.close()
    async with upstream(answer(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nall of it")) as up:
        pool = h1.Pool(up.url, limit=2, connect_timeout=1)
        response = await pool.request("POST", "/", headers=[], body=b"")
        assert await read_all(response) == b"all of it"
        response.release()
        pool.close()


@pytest.mark.parametrize(
    "reply",
    [
        pytest.param(b"", id="closed-before-answering"),
        pytest.param(b"SMTP ready\r\n\r\n", id="not-http"),
        pytest.param(b"HTTP/1.1 200 OK\r\nx: " + b"a" * 70_000 + b"\r\n\r\n", id="huge-headers"),
    ],
)
async def test_an_upstream_that_does_not_answer_http_raises_a_connection_error(reply: bytes) -> None:
    async with upstream(answer(reply)) as up:
        pool = h1.Pool(up.url, limit=2, connect_timeout=1)
        with pytest.raises(h1.UpstreamClosed):
            await pool.request("POST", "/", headers=[], body=b"")
        pool.close()


async def test_a_body_cut_short_raises_from_readany_and_the_connection_is_not_reused() -> None:
    async with upstream(answer(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly this")) as up:
        pool = h1.Pool(up.url, limit=1, connect_timeout=1)
        response = await pool.request("POST", "/", headers=[], body=b"")
        assert await response.readany() == b"only this"
        with pytest.raises(h1.UpstreamClosed):
            await response.readany()
        response.release()
        with pytest.raises(h1.UpstreamClosed):  # a new connection, answered the same way
            await read_all(await pool.request("POST", "/", headers=[], body=b""))
        pool.close()
    assert up.connections == 2


async def test_past_max_waiting_a_request_for_a_connection_is_refused_at_once() -> None:
    async with upstream(keep_alive([])) as up:
        pool = h1.Pool(up.url, limit=1, connect_timeout=1, max_waiting=1)
        held = await pool.request("POST", "/", headers=[], body=b"")  # the only connection, until released
        gives_up = asyncio.create_task(served(pool, "/", b""))
        await eventually(lambda: pool.waiting == 1)
        with pytest.raises(h1.PoolFull):
            await pool.request("POST", "/", headers=[], body=b"")
        gives_up.cancel()  # a request that stops waiting frees its place in the queue
        with contextlib.suppress(asyncio.CancelledError):
            await gives_up
        assert pool.waiting == 0
        waits = asyncio.create_task(served(pool, "/", b"next"))
        await eventually(lambda: pool.waiting == 1)
        await read_all(held)
        held.release()
        assert await waits == b'{"ok":true}' and pool.waiting == 0
        pool.close()


async def test_connect_failures_are_told_apart() -> None:
    async with upstream(keep_alive([])) as up:
        url = up.url
    with pytest.raises(h1.ConnectFailed):
        await h1.Pool(url, limit=1, connect_timeout=1).request("POST", "/", headers=[], body=b"")


async def test_a_slow_reader_pauses_the_upstream_and_gets_everything() -> None:
    total = 4 * h1.HIGH_WATER

    async def big(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % total)
        for _ in range(total // 1024):
            writer.write(b"x" * 1024)
            await writer.drain()

    async with upstream(big) as up:
        pool = h1.Pool(up.url, limit=1, connect_timeout=1)
        response = await pool.request("POST", "/", headers=[], body=b"")
        await asyncio.sleep(0.2)  # the upstream writes while nobody reads
        conn = response._conn
        assert conn._paused
        assert response._size <= h1.HIGH_WATER + 65536 * 2
        assert len(await read_all(response)) == total
        response.release()
        pool.close()


async def test_the_pool_limit_queues_requests_and_a_cancelled_request_frees_its_slot() -> None:
    gate = asyncio.Event()

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            await gate.wait()
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
            await writer.drain()

    async with upstream(slow) as up:
        pool = h1.Pool(up.url, limit=1, connect_timeout=1)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.1):
                await pool.request("POST", "/", headers=[], body=b"")
        gate.set()
        response = await asyncio.wait_for(pool.request("POST", "/", headers=[], body=b""), 2)
        assert response.status == 200
        response.release()
        pool.close()
    assert up.connections == 2  # the cancelled request's connection was dropped, not reused mid-response


async def test_readany_gives_up_after_the_idle_time_and_the_response_can_still_be_closed() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nhi\r\n")
        await writer.drain()
        await asyncio.sleep(5)

    async with upstream(silent) as up:
        pool = h1.Pool(up.url, limit=1, connect_timeout=1)
        response = await pool.request("POST", "/", headers=[], body=b"")
        assert await response.readany(0.5) == b"hi"
        with pytest.raises(h1.IdleTimeout):
            await response.readany(0.05)
        response.close()
        pool.close()


async def test_a_prepared_request_uses_an_idle_connection_and_holds_its_slot() -> None:
    seen: list[bytes] = []
    async with upstream(keep_alive(seen)) as up:
        pool = h1.Pool(up.url, limit=1, connect_timeout=1)
        assert pool.prepare("POST", "/a", headers=[], body=b"0") is None  # no idle connection yet
        assert await served(pool, "/a", b"1") == b'{"ok":true}'

        prepared = pool.prepare("POST", "/b", headers=[], body=b"22")
        assert prepared is not None
        assert pool.prepare("POST", "/c", headers=[], body=b"3") is None  # the only slot is held
        waiting = asyncio.create_task(pool.request("POST", "/c", headers=[], body=b"333"))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        prepared.fire()  # as from a callback: on the wire before anyone awaits it
        await asyncio.sleep(0.05)
        assert seen[-1].endswith(b"\r\n\r\n22")
        second = await prepared.response()
        assert await read_all(second) == b'{"ok":true}'
        second.release()  # the slot passes to the waiting request
        third = await asyncio.wait_for(waiting, 2)
        assert await read_all(third) == b'{"ok":true}'
        third.release()
        pool.close()
    assert up.connections == 1 and len(seen) == 3


async def test_an_abandoned_prepared_request_gives_its_connection_back_unsent() -> None:
    seen: list[bytes] = []
    async with upstream(keep_alive(seen)) as up:
        pool = h1.Pool(up.url, limit=1, connect_timeout=1)
        await served(pool, "/a", b"1")
        prepared = pool.prepare("POST", "/b", headers=[], body=b"2")
        assert prepared is not None
        prepared.abandon()
        prepared.fire()  # too late: nothing is sent
        again = pool.prepare("POST", "/c", headers=[], body=b"3")  # the same connection, the slot free again
        assert again is not None
        response = await again.response()
        await read_all(response)
        response.release()
        pool.close()
    assert up.connections == 1 and [r[-1:] for r in seen] == [b"1", b"3"]


async def test_a_prepared_request_whose_idle_connection_was_closed_goes_on_a_new_one() -> None:
    seen: list[bytes] = []
    async with upstream(answer(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", seen)) as up:
        pool = h1.Pool(up.url, limit=2, connect_timeout=1)
        assert await served(pool, "/a", b"1") == b"ok"
        prepared = pool.prepare("POST", "/b", headers=[], body=b"2")
        assert prepared is not None
        await asyncio.sleep(0.05)  # the upstream closes the idle connection meanwhile
        prepared.fire()
        second = await prepared.response()
        assert await read_all(second) == b"ok"
        second.release()
        pool.close()
    assert up.connections == 2 and [r[-1:] for r in seen] == [b"1", b"2"]


async def test_a_connection_the_upstream_closed_is_freed_at_once_not_by_the_collector() -> None:
    """The parser holds the connection's callbacks: a closed connection must not wait in a reference cycle for the
    next garbage collection (vLLM closes idle keep-alive connections every few seconds)."""
    async with upstream(answer(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")) as up:
        pool = h1.Pool(up.url, limit=4, connect_timeout=1)
        gc.collect()
        gc.disable()
        try:
            assert await served(pool, "/a", b"1") == b"ok"
            await asyncio.sleep(0.05)  # the upstream closes it
            assert await served(pool, "/b", b"2") == b"ok"  # on a new connection; the first one is gone
            await asyncio.sleep(0.05)
            pool.close()
            # polled: on a busy machine a connection may still be closing; with a cycle it never goes
            await eventually(lambda: not [o for o in gc.get_objects() if type(o) is h1._Connection], within=5)
        finally:
            gc.enable()
