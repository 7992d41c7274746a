"""The meter's lean HTTP/1.1 server (gateway/meter/server.py) on a real socket, driven by raw bytes: keep-alive and
pipelining, HTTP/1.0, Expect: 100-continue, framing of whole and streamed responses, HEAD, malformed input, flow
control both ways, clients that leave, idle keep-alive connections and shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httptools
import pytest

from gateway.connections import ConnectionCap
from gateway.meter import server as meter_server
from gateway.meter.server import ClientGone, Handler, Reply, Request, Server, Stream
from tests.support.k8s_emulator import eventually

LATER = "Thu, 01 Jan 2099 00:00:00 GMT"


@dataclass
class Answer:
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    done: bool = False


class Responses:
    """httptools callbacks collecting every response a connection sends."""

    def __init__(self) -> None:
        self.answers: list[Answer] = []
        self.parser = httptools.HttpResponseParser(self)

    def on_message_begin(self) -> None:
        self.answers.append(Answer())

    def on_status(self, status: bytes) -> None:
        self.answers[-1].status = self.parser.get_status_code()

    def on_header(self, name: bytes, value: bytes) -> None:
        self.answers[-1].headers[name.decode().lower()] = value.decode()

    def on_body(self, body: bytes) -> None:
        self.answers[-1].body += body

    def on_message_complete(self) -> None:
        self.answers[-1].done = True


class Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.responses = Responses()
        self.raw = b""
        self.closed = False

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def read(self, count: int) -> list[Answer]:
        """Until ``count`` complete responses (or the server closes)."""
        async with asyncio.timeout(5):
            while sum(a.done for a in self.responses.answers) < count and not self.closed:
                data = await self.reader.read(65536)
                if not data:
                    self.closed = True
                    with contextlib.suppress(httptools.HttpParserError):
                        self.responses.parser.feed_data(b"")
                    break
                self.raw += data
                self.responses.parser.feed_data(data)
        return self.responses.answers

    async def wait_closed(self, *, reset: bool = False) -> bool:
        """Until the server ends the connection: with a FIN, or also with a reset if ``reset`` (a server closing
        on a client that is still sending has its kernel answer the next bytes with one)."""
        async with asyncio.timeout(5):
            try:
                while data := await self.reader.read(65536):
                    self.raw += data
            except ConnectionResetError:
                if not reset:
                    raise
        return True


def capped(limit: int = 100, refusals: list[None] | None = None) -> ConnectionCap:
    """A connection cap of ``limit`` that appends to ``refusals`` per refused connection."""
    return ConnectionCap(
        limit,
        body=meter_server.TOO_MANY_CONNECTIONS,
        refused=lambda: None if refusals is None else refusals.append(None),
        logger=logging.getLogger("test"),
        port="proxy port",
    )


@contextlib.asynccontextmanager
async def running(handler: Handler, **options: Any) -> AsyncIterator[Server]:
    server = Server(handler, **{"cap": capped(), **options})
    await server.start("127.0.0.1", 0)
    try:
        yield server
    finally:
        await server.shutdown(grace=0.5)


@contextlib.asynccontextmanager
async def connect(server: Server) -> AsyncIterator[Client]:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        yield Client(reader, writer)
    finally:
        writer.close()


def post(path: str, body: bytes, *extra: str, version: str = "1.1", length: int | None = None) -> bytes:
    size = len(body) if length is None else length
    head = [f"POST {path} HTTP/{version}", "Host: meter", f"Content-Length: {size}", *extra]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def echo(request: Request) -> Reply:
    body = b"".join([chunk async for chunk in request.content])
    answer = {"method": request.method, "path": request.path, "target": request.path_qs, "size": len(body)}
    return Reply(200, json.dumps(answer).encode(), headers={"x-seen": request.headers.get("x-test", "")})


async def test_keep_alive_requests_are_answered_in_order_on_one_connection() -> None:
    async with running(echo) as server, connect(server) as client:
        await client.send(post("/v1/a%20b?x=1", b"12345", "X-Test: one"))
        first = (await client.read(1))[0]
        await client.send(post("/two", b"", "X-Test: two") + post("/three", b"abc"))  # pipelined
        answers = await client.read(3)
    assert [json.loads(a.body)["target"] for a in answers] == ["/v1/a%20b?x=1", "/two", "/three"]
    assert json.loads(first.body) == {"method": "POST", "path": "/v1/a b", "target": "/v1/a%20b?x=1", "size": 5}
    assert first.headers["x-seen"] == "one" and first.headers["content-length"] == str(len(first.body))
    assert "date" in first.headers and not client.closed


async def test_pipelined_requests_wait_for_the_one_before() -> None:
    async def slow_first(request: Request) -> Reply:
        if request.path == "/slow":
            await asyncio.sleep(0.1)
        return await echo(request)

    async with running(slow_first) as server, connect(server) as client:
        await client.send(post("/slow", b"a") + post("/fast", b"b"))
        answers = await client.read(2)
    assert [json.loads(a.body)["path"] for a in answers] == ["/slow", "/fast"]


async def streamer(request: Request) -> Stream:
    stream = request.stream(200, {"content-type": "text/event-stream"})
    for n in range(3):
        await stream.write(f"data: {n}\n\n".encode())
    await stream.write_eof()
    return stream


async def test_a_streamed_response_is_chunked_for_http_11_and_closes_for_http_10() -> None:
    async with running(streamer) as server:
        async with connect(server) as client:
            await client.send(post("/s", b""))
            answer = (await client.read(1))[0]
            assert (
                answer.headers["transfer-encoding"] == "chunked" and answer.body == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
            )
            assert not client.closed
        async with connect(server) as client:
            await client.send(post("/s", b"", "Connection: keep-alive", version="1.0"))
            assert await client.wait_closed()
    assert b"transfer-encoding" not in client.raw and client.raw.endswith(b"data: 2\n\n")
    assert b"connection: close" in client.raw


async def test_expect_continue_is_answered_when_the_body_is_read_and_not_when_refused_early() -> None:
    async def strict(request: Request) -> Reply:
        if (request.content_length or 0) > 10:
            return Reply(413, b"{}", content_type="application/json")
        return await echo(request)

    async with running(strict) as server:
        async with connect(server) as client:
            await client.send(post("/ok", b"", "Expect: 100-continue", length=4))
            head = await asyncio.wait_for(client.reader.readuntil(b"\r\n\r\n"), 5)
            assert head == b"HTTP/1.1 100 Continue\r\n\r\n"
            await client.send(b"body")
            assert json.loads((await client.read(1))[0].body)["size"] == 4
        async with connect(server) as client:
            await client.send(post("/big", b"", "Expect: 100-continue", length=99))
            raw = await asyncio.wait_for(client.reader.read(65536), 5)
            assert raw.startswith(b"HTTP/1.1 413 ") and b"100 Continue" not in raw
            assert b"connection: close" in raw and await client.wait_closed()  # the unread body cannot stay


AMBIGUOUS_TRANSFER_ENCODINGS = [
    ("te-identity-then-chunked", b"Transfer-Encoding: identity, chunked\r\n"),
    ("te-gzip-then-chunked", b"Transfer-Encoding: gzip, chunked\r\n"),
    ("te-empty-item", b"Transfer-Encoding: ,chunked\r\n"),
    ("te-two-lines", b"Transfer-Encoding: identity\r\nTransfer-Encoding: chunked\r\n"),
    ("te-trailing-space", b"Transfer-Encoding: chunked \r\n"),
    ("te-trailing-tab", b"Transfer-Encoding: chunked\t\r\n"),
]
"""Transfer-Encodings llhttp reads as chunked (or, for the tab, refuses only after the headers) that another parser
in front could read otherwise: the meter takes ``chunked`` alone, on one line, in HTTP/1.1."""


@pytest.mark.parametrize(
    ("data", "status", "code"),
    [
        pytest.param(b"NOT HTTP AT ALL\r\n\r\n", 400, "bad_request", id="garbage"),
        pytest.param(
            b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n", 431, "request_header_too_large", id="big"
        ),
        pytest.param(
            b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com\r\n\r\n", 405, "method_not_allowed", id="connect"
        ),
        pytest.param(b"DELETE * HTTP/1.1\r\nHost: x\r\n\r\n", 400, "bad_request", id="asterisk-target"),
        pytest.param(b"GET x/y HTTP/1.1\r\nHost: x\r\n\r\n", 400, "bad_request", id="relative-target"),
        pytest.param(b"GET /v1/./models HTTP/1.1\r\nHost: x\r\n\r\n", 400, "bad_request", id="dot-segment"),
        pytest.param(b"GET /v1/x/../models HTTP/1.1\r\nHost: x\r\n\r\n", 400, "bad_request", id="dot-dot-segment"),
        pytest.param(b"GET /%2e%2E/v1/models HTTP/1.1\r\nHost: x\r\n\r\n", 400, "bad_request", id="encoded-dots"),
        pytest.param(b"GET http://h/v1/. HTTP/1.1\r\nHost: x\r\n\r\n", 400, "bad_request", id="absolute-dot"),
        pytest.param(
            b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: close\r\n\r\nabc", 400, "bad_request", id="te-close"
        ),
        pytest.param(
            b"POST /x HTTP/1.0\r\nTransfer-Encoding: chunked, gzip\r\n\r\n", 400, "bad_request", id="te-not-last"
        ),
        pytest.param(b"GET /v1/models#x HTTP/1.1\r\nHost: x\r\n\r\n", 400, "bad_request", id="fragment"),
        *(
            pytest.param(
                b"POST /x HTTP/1.1\r\nHost: x\r\n" + te + b"\r\n3\r\nabc\r\n0\r\n\r\n", 400, "bad_request", id=name
            )
            for name, te in AMBIGUOUS_TRANSFER_ENCODINGS
        ),
        pytest.param(
            b"POST /x HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            400,
            "bad_request",
            id="te-http-10",
        ),
    ],
)
async def test_malformed_requests_get_an_error_envelope_and_the_connection_closes(
    data: bytes, status: int, code: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(meter_server, "_date", lambda: LATER.encode())
    async with running(echo) as server, connect(server) as client:
        await client.send(post("/before", b"x") + data)
        answers = await client.read(2)
        assert await client.wait_closed()
    assert answers[0].status == 200  # a request before the bad one is still answered
    assert answers[1].status == status and json.loads(answers[1].body)["error"]["code"] == code
    # the meter's own date, of the moment it answers: the canned answers had carried the time the process started
    assert answers[1].headers["date"] == LATER


CHUNKED = b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n"
"""The head and first chunk of a chunked upload: what follows it in the cases below breaks its framing."""


@pytest.mark.parametrize(
    "rest",
    [
        pytest.param(b"0x3\r\nabc\r\n0\r\n\r\n", id="hex-prefix"),
        pytest.param(b"-3\r\nabc\r\n0\r\n\r\n", id="negative"),
        pytest.param(b"1" + b"0" * 16 + b"\r\nabc\r\n0\r\n\r\n", id="overflow"),
        pytest.param(b"3 \r\nabc\r\n0\r\n\r\n", id="space-after-size"),
        pytest.param(b'3;x="a\r\nb"\r\nabc\r\n0\r\n\r\n', id="extension-with-crlf"),
        pytest.param(b"3\nabc\r\n0\r\n\r\n", id="bare-lf-after-size"),
        pytest.param(b"3\r\nabcX\r\n0\r\n\r\n", id="data-longer-than-size"),
        pytest.param(b"0\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n", id="no-final-crlf"),
        pytest.param(b"0\r\nContent-Length: 5\r\n\r\n", id="content-length-trailer"),
    ],
)
@pytest.mark.parametrize("late", [False, True], ids=["one-write", "while-read"])
async def test_a_body_whose_framing_breaks_gets_400_and_is_never_handled_whole(rest: bytes, *, late: bool) -> None:
    """The answer to a malformed body is the 400 (before the fix: the connection closed without an answer, or the
    handler's answer to a body cut short went out, a passthrough's 502), whether the break came before the request's
    turn (its handler is then not run) or while its handler read the body; no byte after the break is parsed."""
    handled: list[bytes] = []

    async def upload(request: Request) -> Reply:
        try:
            body = b"".join([chunk async for chunk in request.content])
        except ClientGone:
            return Reply(502, b"{}", content_type="application/json")  # as a passthrough whose upload broke
        handled.append(body)
        return Reply(200, b"{}", content_type="application/json")

    async with running(upload) as server, connect(server) as client:
        await client.send(post("/before", b"x") + CHUNKED + (b"" if late else rest))
        if late:
            await client.read(1)
            await client.send(rest)
        answers = await client.read(2)
        assert await client.wait_closed()
    assert [a.status for a in answers] == [200, 400] and handled == [b"x"]
    assert json.loads(answers[1].body)["error"]["code"] == "bad_request"
    assert answers[1].headers["connection"] == "close"


async def test_a_refused_body_whose_rest_is_malformed_gets_no_second_answer(caplog: pytest.LogCaptureFixture) -> None:
    """The rest of a body answered early (a 413 from its headers) is read and dropped; when it breaks its framing
    the connection only closes (before the fix: a second answer was written after the write side was shut, and the
    event loop logged the protocol's failure)."""

    async def refuse(_: Request) -> Reply:
        return Reply(413, b"{}", content_type="application/json")

    async with running(refuse) as server, connect(server) as client:
        await client.send(CHUNKED)
        assert [a.status for a in await client.read(1)] == [413]
        await client.send(b"zz\r\nabc\r\n0\r\n\r\n")
        assert await client.wait_closed()  # the write side: shut at the answer
        await eventually(lambda: not server.connections, within=5)  # the connection: closed at the malformed rest
    assert len(client.responses.answers) == 1 and client.raw.count(b"HTTP/1.1") == 1
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize(
    ("target", "path", "origin"),
    [
        pytest.param("http://other.example:8080/v1/models?x=1", "/v1/models", "/v1/models?x=1", id="host-port-query"),
        pytest.param("https://other.example", "/", "/", id="no-path"),
        pytest.param("http://u@other.example/v1/a%20b", "/v1/a b", "/v1/a%20b", id="userinfo-escaped"),
    ],
)
async def test_an_absolute_target_is_passed_on_in_origin_form(target: str, path: str, origin: str) -> None:
    """A proxy's request form names a host: appended to the upstream's URL, it had made another URL altogether."""
    async with running(echo) as server, connect(server) as client:
        await client.send(post(target, b"x"))
        answer = (await client.read(1))[0]
    assert json.loads(answer.body) == {"method": "POST", "path": path, "target": origin, "size": 1}


async def test_an_upgrade_header_is_ignored_and_the_request_answered_in_http_11() -> None:
    async with running(echo) as server, connect(server) as client:
        upgrade = post(
            "/up", b"", "Connection: Upgrade, HTTP2-Settings", "Upgrade: h2c", "HTTP2-Settings: AAMAAABkAAQAAP__"
        )
        await client.send(upgrade + post("/next", b"z"))
        answers = await client.read(2)
    assert [json.loads(a.body)["path"] for a in answers] == ["/up", "/next"] and answers[0].status == 200


async def test_a_failing_handler_gets_a_500_envelope_and_the_connection_lives_on() -> None:
    async def broken(request: Request) -> Reply:
        if request.path == "/boom":
            raise RuntimeError("bug")
        return await echo(request)

    async with running(broken) as server, connect(server) as client:
        await client.send(post("/boom", b"") + post("/after", b""))
        answers = await client.read(2)
    assert answers[0].status == 500 and json.loads(answers[0].body)["error"]["code"] == "internal_error"
    assert answers[1].status == 200


async def test_head_gets_the_headers_without_a_body() -> None:
    async def sized(request: Request) -> Stream:
        stream = request.stream(200, [("content-type", "text/plain")], content_length=5)
        await stream.write(b"hello")
        await stream.write_eof()
        return stream

    async with running(sized) as server, connect(server) as client:
        await client.send(b"HEAD / HTTP/1.1\r\nHost: m\r\n\r\nGET / HTTP/1.1\r\nHost: m\r\n\r\n")
        raw = b""
        async with asyncio.timeout(5):
            while not raw.endswith(b"hello"):
                raw += await client.reader.read(65536)
    assert raw.count(b"content-length: 5") == 2 and raw.count(b"hello") == 1


async def test_a_large_request_body_pauses_reading_until_the_handler_catches_up() -> None:
    paused: list[bool] = []

    async def slow_reader(request: Request) -> Reply:
        size = 0
        while True:
            await asyncio.sleep(0.01)
            paused.append(any(conn._read_paused for conn in server.connections))
            if not (chunk := await request.content.readany()):
                break
            size += len(chunk)
        return Reply(200, str(size).encode())

    body = b"x" * (4 << 20)
    async with running(slow_reader) as server, connect(server) as client:
        await client.send(post("/upload", body))
        answer = (await client.read(1))[0]
    assert answer.body == str(len(body)).encode() and any(paused)


async def test_a_streamed_write_waits_for_a_client_that_does_not_read_and_fails_when_it_leaves() -> None:
    progress: list[int] = []
    outcome: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def flood(request: Request) -> Stream:
        stream = request.stream(200, {"content-type": "application/octet-stream"})
        try:
            for n in range(4096):
                await stream.write(b"y" * 65536)
                progress.append(n)
        except ClientGone:
            outcome.set_result("gone")
            return stream
        outcome.set_result("finished")
        return stream

    async with running(flood) as server:
        _, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(post("/flood", b""))
        await asyncio.sleep(0.3)
        stalled = len(progress)
        await asyncio.sleep(0.2)
        assert len(progress) == stalled < 4095  # 256 MiB would be buffered without flow control
        writer.transport.abort()
        assert await asyncio.wait_for(outcome, 5) == "gone"


async def test_an_idle_keep_alive_connection_is_closed() -> None:
    async with running(echo, keepalive_timeout=0.2) as server, connect(server) as client:
        await client.send(post("/once", b""))
        assert (await client.read(1))[0].status == 200
        assert await client.wait_closed()


async def test_headers_trickled_a_byte_at_a_time_do_not_hold_the_connection() -> None:
    """A slowloris client keeps every read short of a whole head: the idle timer must still close it."""
    async with running(echo, keepalive_timeout=0.2) as server, connect(server) as client:
        head = b"GET /v1/models HTTP/1.1\r\n" + b"x-pad: y\r\n" * 10_000

        async def trickle() -> None:
            with contextlib.suppress(ConnectionError):
                for byte in head:
                    await client.send(bytes([byte]))
                    await asyncio.sleep(0.01)

        sender = asyncio.create_task(trickle())
        try:
            answers = await client.read(1)
            assert client.closed or await client.wait_closed(reset=True)
        finally:
            sender.cancel()
        assert [a.status for a in answers] == [408]
        assert json.loads(answers[0].body)["error"]["code"] == "request_timeout"
        assert not server.connections


async def test_a_request_body_that_stops_arriving_gets_408_and_the_connection_closes() -> None:
    async with running(echo, body_timeout=0.2) as server, connect(server) as client:
        await client.send(post("/v1/chat/completions", b'{"model":', length=100))
        answers = await client.read(1)
        assert client.closed or await client.wait_closed()
        assert [a.status for a in answers] == [408]
        assert not server.connections


async def test_a_slow_body_that_keeps_arriving_is_read_whole() -> None:
    async with running(echo, body_timeout=0.5) as server, connect(server) as client:
        await client.send(post("/slow", b"", length=6))
        for byte in b"abcdef":
            await asyncio.sleep(0.05)
            await client.send(bytes([byte]))
        answers = await client.read(1)
        assert answers[0].status == 200 and json.loads(answers[0].body)["size"] == 6


async def test_shutdown_lets_a_request_in_flight_finish_and_closes_idle_connections() -> None:
    release = asyncio.Event()

    async def waits(request: Request) -> Reply:
        if request.path == "/wait":
            await release.wait()
        return Reply(200, b"done")

    server = Server(waits, cap=capped())
    await server.start("127.0.0.1", 0)
    port = server.port
    async with connect(server) as busy, connect(server) as idle:
        await idle.send(post("/quick", b""))
        assert (await idle.read(1))[0].body == b"done"
        await busy.send(post("/wait", b""))
        await asyncio.sleep(0.05)
        stopping = asyncio.create_task(server.shutdown(grace=5))
        assert await idle.wait_closed()
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)
        release.set()
        answer = (await busy.read(1))[0]
        await stopping
    assert answer.body == b"done"


async def test_a_client_that_stops_sending_is_taken_as_gone() -> None:
    gone: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

    async def slow_stream(request: Request) -> Stream:
        stream = request.stream(200, {"content-type": "text/event-stream"})
        try:
            for _ in range(100):
                await asyncio.sleep(0.02)
                await stream.write(b"data: x\n\n")
        except ClientGone:
            gone.set_result(True)
        return stream

    async with running(slow_stream) as server, connect(server) as client:
        await client.send(post("/stream", b""))
        await client.reader.readuntil(b"data: x")
        client.writer.write_eof()
        assert await asyncio.wait_for(gone, 5)


async def test_the_early_hook_gets_a_whole_body_and_never_one_the_handler_is_reading() -> None:
    seen: list[tuple[str, bytes | None]] = []

    def early(request: Request) -> None:
        body = request.content.read_now()
        seen.append((request.path, body))
        request.early = body

    async def handler(request: Request) -> Reply:
        if isinstance(request.early, bytes):
            return Reply(200, b"early:" + request.early)
        body = b"".join([chunk async for chunk in request.content])
        return Reply(200, b"read:" + body)

    async with running(handler, early=early) as server, connect(server) as client:
        await client.send(post("/whole", b"abc"))
        assert (await client.read(1))[-1].body == b"early:abc"
        head = post("/pieces", b"", length=6)
        await client.send(head)
        await asyncio.sleep(0.05)  # the handler starts and waits for the body
        await client.send(b"def")
        await asyncio.sleep(0.05)
        await client.send(b"ghi")
        assert (await client.read(2))[-1].body == b"read:defghi"
    assert seen == [("/whole", b"abc")]


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n", id="aborted"),
        pytest.param(b"NOT HTTP\r\n\r\n", id="malformed"),
        pytest.param(post("/one", b"x") + post("/two", b"y", "Connection: close"), id="served"),
        pytest.param(post("/stream", b"x") + post("/stream", b"y", "Connection: close"), id="streamed"),
        pytest.param(CHUNKED + b"zz\r\n", id="broken-body"),
        pytest.param(post("/slow", b"x") + CHUNKED + b"zz\r\n", id="broken-body-queued"),
    ],
)
async def test_a_closed_connection_is_freed_at_once_not_by_the_collector(data: bytes) -> None:
    """Nothing of a connection outlives it in a reference cycle (the parser holds the protocol's callbacks; an
    aborted parse's traceback holds the frame that caught it; a stream points back at its request): a storm of
    short connections must not pile up until the next garbage collection."""

    async def answer(request: Request) -> Reply | Stream:
        if request.path == "/slow":
            await asyncio.sleep(0.1)  # the broken request behind it waits its turn
        if request.path != "/stream":
            return await echo(request)
        stream = request.stream(200, {"content-type": "text/event-stream"})
        await stream.write(b"data: 1\n\n")
        await stream.write_eof()
        return stream

    async with running(answer) as server:
        gc.collect()
        gc.disable()
        try:
            async with connect(server) as client:
                await client.send(data)
                await client.wait_closed()
            ours = ("_Connection", "Request", "Stream")

            def left() -> list[str]:
                objects = gc.get_objects()
                return [
                    type(o).__name__
                    for o in objects
                    if type(o).__module__ == Server.__module__ and type(o).__name__ in ours
                ]

            # polled: on a busy machine the server may still be closing; with a cycle the list never empties
            await eventually(lambda: not server.connections and not left(), within=5)
        finally:
            gc.enable()


async def test_connections_past_the_cap_get_a_503_and_are_served_again_once_one_closes() -> None:
    """The proxy port accepted any number of connections: held idle, they took every descriptor, and the ops port,
    Redis and the upstream connections failed with them."""
    refusals: list[None] = []
    cap = capped(2, refusals)
    async with running(echo, cap=cap) as server, connect(server) as first, connect(server) as second:
        for client in (first, second):
            await client.send(post("/a", b"x"))
            assert [a.status for a in await client.read(1)] == [200]
        async with connect(server) as third:
            # a large body: the rest of it is read and dropped, or the client would get a reset while it sends
            await third.send(post("/a", b"x" * 4_000_000))
            [refused] = await third.read(1)
            assert await third.wait_closed()
        assert refused.status == 503 and refused.headers["connection"] == "close"
        assert json.loads(refused.body)["error"]["code"] == "too_many_connections"
        assert refusals == [None]
        for client in (first, second):  # the open connections are still served
            await client.send(post("/b", b"y"))
            assert [a.status for a in await client.read(2)] == [200, 200]
        first.writer.close()
        await eventually(lambda: cap.open == 1)
        async with connect(server) as fourth:
            await fourth.send(post("/c", b"z"))
            assert [a.status for a in await fourth.read(1)] == [200]
    assert refusals == [None]
