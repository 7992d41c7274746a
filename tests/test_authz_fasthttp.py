"""The check port's HTTP/1.1 protocol (gateway/authz/fasthttp.py) on a real socket, for what the process-level tests
cannot see: what a closed connection leaves behind."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator
from typing import Any, cast

import pytest

from gateway import connections
from gateway.authz.fasthttp import CheckProtocol, CheckServer, encode
from gateway.authz.server import Checker, Reply
from gateway.connections import ConnectionCap
from tests.support.k8s_emulator import eventually


class _Deny:
    """Stands in for the checker: every check is a 401 at once (no store, no snapshot)."""

    def begin(self, **_: Any) -> Reply:
        return Reply(401, [("content-type", "application/json")], b"{}")

    def observe(self, _: float) -> None:
        return None


@contextlib.asynccontextmanager
async def _denying_server(cap: ConnectionCap | None = None, **options: Any) -> AsyncIterator[tuple[CheckServer, int]]:
    """A check port whose every check is a 401, on a free port: (server, port)."""
    if cap is None:
        cap = ConnectionCap(100, body=b"{}", refused=lambda: None, logger=logging.getLogger("test"), port="check port")
    server = CheckServer(cast(Checker, _Deny()), max_header_bytes=65536, cap=cap, **options)
    await server.start(host="127.0.0.1", port=0)
    try:
        assert server._server is not None
        yield server, server._server.sockets[0].getsockname()[1]
    finally:
        await server.close()


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n", id="aborted"),
        pytest.param(b"NOT HTTP\r\n\r\n", id="malformed"),
        pytest.param(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nConnection: close\r\n\r\n", id="served"),
    ],
)
async def test_a_closed_connection_is_freed_at_once_not_by_the_collector(data: bytes) -> None:
    """The parser holds the protocol's callbacks and an aborted parse's traceback holds the frame that caught it:
    neither may leave a reference cycle behind, or a storm of short connections piles up until the next collection
    (the process runs young collections rarely: gateway/runtime.py)."""
    async with _denying_server() as (_, port):
        gc.collect()
        gc.disable()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(data)
            async with asyncio.timeout(5):
                answer = await reader.read()  # until the server closes
            writer.close()
            assert answer.startswith(b"HTTP/1.1 4")
            # polled: on a busy machine the connection may still be closing; with a cycle it never goes
            await eventually(lambda: not [o for o in gc.get_objects() if isinstance(o, CheckProtocol)], within=5)
        finally:
            gc.enable()


async def test_a_client_that_pipelines_without_reading_its_answers_does_not_fill_the_memory() -> None:
    """Only unanswered requests were bounded: answers piled up in the write buffer (a gigabyte from one
    connection that never read). Reading now stops while the client is behind."""
    async with _denying_server() as (server, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            requests = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 10_000
            for _ in range(40):  # 10 MB of requests, as fast as the socket takes them, answers never read
                writer.write(requests)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.2):
                        await writer.drain()
            [protocol] = list(server._connections)
            assert protocol._transport is not None
            assert protocol._transport.get_write_buffer_size() < 1 << 20  # the high-water mark, not the whole backlog
            answer = encode(_Deny().begin(), keep_alive=True)
            received = 0
            async with asyncio.timeout(30):  # and it answers every request once the client reads
                while received < 400_000 * len(answer):
                    chunk = await reader.read(1 << 20)
                    assert chunk
                    received += len(chunk)
            assert received == 400_000 * len(answer)
        finally:
            writer.close()


async def test_an_upgrade_header_is_ignored_and_an_http_10_keep_alive_is_said() -> None:
    """A request asking to upgrade (h2c, websocket) got its answer and then an unasked 400; an HTTP/1.0 client that
    asked for keep-alive got no ``connection: keep-alive``, so it waited for a close."""
    async with _denying_server() as (_, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"GET /a HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n")
            writer.write(b"GET /b HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            answer = encode(_Deny().begin(), keep_alive=True)
            async with asyncio.timeout(5):
                first = await reader.readexactly(len(answer))
                second = await reader.readuntil(b"\r\n\r\n")
            assert first == answer
            assert second.startswith(b"HTTP/1.1 401") and b"connection: keep-alive\r\n" in second
            await reader.readexactly(2)  # its body, "{}"
            writer.write(b"GET /c HTTP/1.1\r\nHost: x\r\n\r\n")  # the connection is still open for more
            async with asyncio.timeout(5):
                assert await reader.readexactly(len(answer)) == answer
        finally:
            writer.close()


def _chunked(framing: bytes, body: bytes = b"3\r\nabc\r\n0\r\n\r\n", version: bytes = b"1.1") -> bytes:
    return b"POST /b HTTP/%s\r\nHost: x\r\n%s\r\n%s" % (version, framing, body)


TE = b"Transfer-Encoding: chunked\r\n"


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(_chunked(b"Transfer-Encoding: identity, chunked\r\n"), id="te-identity-then-chunked"),
        pytest.param(_chunked(b"Transfer-Encoding: ,chunked\r\n"), id="te-empty-item"),
        pytest.param(_chunked(b"Transfer-Encoding: identity\r\n" + TE), id="te-two-lines"),
        pytest.param(_chunked(b"Transfer-Encoding: chunked \r\n"), id="te-trailing-space"),
        pytest.param(_chunked(b"transfer-encoding: chunked\r\n" + TE), id="te-twice"),
        pytest.param(_chunked(TE, version=b"1.0"), id="te-http-10"),
        pytest.param(_chunked(TE + b"Content-Length: 3\r\n"), id="te-and-cl"),
        pytest.param(_chunked(b"Content-Length: 3\r\nContent-Length: 4\r\n", b"abc"), id="two-cl"),
        pytest.param(_chunked(b"X: a\r\n " + TE), id="obs-fold"),
        pytest.param(_chunked(TE, b"0x3\r\nabc\r\n0\r\n\r\n"), id="chunk-0x"),
        pytest.param(_chunked(TE, b"1" + b"0" * 16 + b"\r\nabc\r\n0\r\n\r\n"), id="chunk-overflow"),
        pytest.param(_chunked(TE, b"3\r\nabc\r\n0\r\nGET /c HTTP/1.1\r\n\r\n"), id="no-final-crlf"),
        pytest.param(_chunked(TE, b"3\r\nabc\r\n0\r\nContent-Length: 1\r\n\r\n"), id="cl-trailer"),
    ],
)
async def test_a_framing_other_parsers_could_read_otherwise_is_refused(data: bytes) -> None:
    """llhttp reads the Transfer-Encodings here as chunked (and refuses the rest itself); a parser in front may not,
    and then what it took for the next request is this one's body. The check port refuses them as the meter does: a
    400 after the answers owed, and the connection closed before anything after it is read."""
    async with _denying_server() as (_, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n" + data + b"GET /c HTTP/1.1\r\nHost: x\r\n\r\n")
            async with asyncio.timeout(5):
                answers = await reader.read()  # until the server closes
        finally:
            writer.close()
    assert answers.startswith(encode(_Deny().begin(), keep_alive=True) + b"HTTP/1.1 400 ")
    assert answers.count(b"HTTP/1.1") == 2 and b'"code": "bad_request"' in answers


@pytest.mark.parametrize(
    ("head", "then"),
    [
        pytest.param(b"GET /a HTTP/1.1\r\nHost: x\r\n", b"X-Pad: y\r\n" * 5_000, id="headers-trickled"),
        pytest.param(b"POST /a HTTP/1.1\r\nContent-Length: 100000\r\n\r\n", b"a" * 100_000, id="body-trickled"),
        pytest.param(b"G", b"", id="request-line-unfinished"),
    ],
)
async def test_a_request_that_never_completes_is_answered_408_and_closed(head: bytes, then: bytes) -> None:
    """A client trickling its headers (or body) a byte at a time held its connection, parser and descriptor for
    ever: the check port had no timeout at all."""
    async with _denying_server(stall_seconds=0.2) as (server, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)

        async def trickle() -> None:
            with contextlib.suppress(ConnectionError):
                writer.write(head)
                for byte in then:
                    await asyncio.sleep(0.01)
                    writer.write(bytes([byte]))

        sender = asyncio.create_task(trickle())
        try:
            async with asyncio.timeout(5):
                answer = await reader.read()  # until the server closes
        finally:
            sender.cancel()
            writer.close()
        assert answer.startswith(b"HTTP/1.1 408") and b"request_timeout" in answer
        await eventually(lambda: not list(server._connections), within=5)


async def test_an_idle_keep_alive_connection_outlives_the_stall_sweeps() -> None:
    """Envoy keeps its connections to the check port open between checks: only requests in progress are timed."""
    async with _denying_server(stall_seconds=0.1) as (_, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        answer = encode(_Deny().begin(), keep_alive=True)
        try:
            for _ in range(3):
                writer.write(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
                async with asyncio.timeout(5):
                    assert await reader.readexactly(len(answer)) == answer
                await asyncio.sleep(0.3)  # several sweeps pass while it is idle
        finally:
            writer.close()


async def test_refused_connections_are_answered_and_closed_even_when_their_clients_hold_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A refused connection waits for its client to read the 503 and close (closed with the request unread, the
    kernel resets it and the answer is lost), but not for ever, and no more of them wait than the cap: refusals
    must not hold the descriptors the cap saves."""
    monkeypatch.setattr(connections, "LINGER_SECONDS", 0.2)
    refusals: list[None] = []
    cap = ConnectionCap(
        1, body=b"{}", refused=lambda: refusals.append(None), logger=logging.getLogger("test"), port="check port"
    )
    async with _denying_server(cap=cap) as (_, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await reader.readexactly(len(encode(_Deny().begin(), keep_alive=True)))
        refused = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
        try:
            for refused_reader, _ in refused:  # never closed by the client: the server closes each
                async with asyncio.timeout(5):
                    answer = await refused_reader.read()
                assert answer.startswith(b"HTTP/1.1 503") and b"connection: close\r\n" in answer
            assert cap.lingering <= 1
            await eventually(lambda: cap.lingering == 0, within=5)
        finally:
            for _, refused_writer in refused:
                refused_writer.close()
            writer.close()
        assert len(refusals) == 3 and cap.open == 1
