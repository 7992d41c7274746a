"""Request smuggling and desync through the meter: raw bytes to its proxy port, the simulator behind a relay that
parses what the meter sends upstream. Every request the model server gets is one a client sent as a request, whole,
metered and charged to the key that signed it; a body's bytes never become a request; a framing two parsers could
read differently is refused with a 400 and the connection closed, before anything goes upstream."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field

import httptools
import pytest
from aiohttp import web

from gateway.contract import ledger_day
from gateway.sim.server import SimConfig, build_app
from tests.test_meter_stack import MODEL, Stack, running_stack, serve

pytestmark = pytest.mark.redis

WHO = ("alice", "bob", "smuggled")
"""The message content of each request, to tell upstream which client's request a body is."""


@dataclass
class Upstream:
    """The requests the model server got through the relay: (method, path, whose body), in order."""

    requests: list[tuple[str, str, str]] = field(default_factory=list)
    heads: list[str] = field(default_factory=list)
    """The paths of every request whose head arrived (whole or not)."""


class _Parsed:
    """httptools callbacks for one meter->upstream connection."""

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.body = b""

    def on_message_begin(self) -> None:
        self.url, self.body = b"", b""

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_headers_complete(self) -> None:
        self.upstream.heads.append(self.url.decode())

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        method, path = self.parser.get_method().decode(), self.url.decode()
        if (method, path) != ("GET", "/v1/models"):  # the meter's own reads of the context lengths
            who = next((name for name in WHO if name.encode() in self.body), "")
            self.upstream.requests.append((method, path, who))


@contextlib.asynccontextmanager
async def recorded_stack(redis_url: str, app: web.Application | None = None) -> AsyncIterator[tuple[Stack, Upstream]]:
    """The meter in front of a relay in front of the simulator (or ``app``); the relay parses what the meter sends."""
    sim_runner, sim_url = await serve(app or build_app(SimConfig(served=(MODEL,))))
    sim_port = int(sim_url.rsplit(":", 1)[1])
    upstream = Upstream()

    async def relay(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        parsed = _Parsed(upstream)
        sim_r, sim_w = await asyncio.open_connection("127.0.0.1", sim_port)

        async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, feed: bool) -> None:
            while data := await reader.read(65536):
                if feed:
                    parsed.parser.feed_data(data)  # a parse error here fails the test: the meter sent bad HTTP
                writer.write(data)
            writer.close()

        with contextlib.suppress(ConnectionError):
            await asyncio.gather(pipe(client_r, sim_w, True), pipe(sim_r, client_w, False))

    relay_server = await asyncio.start_server(relay, "127.0.0.1", 0)
    port = relay_server.sockets[0].getsockname()[1]
    try:
        async with running_stack(redis_url, upstream=f"http://127.0.0.1:{port}") as stack:
            yield stack, upstream
    finally:
        relay_server.close()
        await sim_runner.cleanup()


def chat(
    headers: Mapping[str, str],
    who: str,
    *,
    framing: bytes | None = None,
    extra: bytes = b"",
    target: bytes = b"/v1/chat/completions",
    version: bytes = b"1.1",
    chunk: bytes = b"%x",
) -> bytes:
    """A chat request as raw bytes, its body sent with a content-length or, given ``framing`` that says chunked, as
    one chunk whose size is written as ``chunk``."""
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": who}], "max_tokens": 3}).encode()
    lines = b"".join(b"%s: %s\r\n" % (name.encode(), value.encode()) for name, value in headers.items())
    if framing is None:
        framing, payload = b"Content-Length: %d\r\n" % len(body), body
    else:
        payload = chunk % len(body) + b"\r\n" + body + b"\r\n0\r\n\r\n"
    head = b"POST %s HTTP/%s\r\nHost: meter\r\nContent-Type: application/json\r\n" % (target, version)
    return head + lines + framing + extra + b"\r\n" + payload


TE = b"Transfer-Encoding: chunked\r\n"
Build = Callable[[Mapping[str, str], Mapping[str, str]], bytes]
"""The bytes a client sends, given alice's and bob's signed identity headers."""


def _unsigned(who: str = "smuggled") -> bytes:
    return chat({}, who)


def _chunked_then(rest: bytes) -> Build:
    """alice's chunked request whose last chunk is followed by ``rest`` instead of its final CRLF (or trailers)."""
    return lambda a, _: chat(a, "alice", framing=TE)[: -len(b"0\r\n\r\n")] + rest


ACCEPTED = [
    pytest.param(lambda a, _: chat(a, "alice") + _unsigned(), [200, 401], ["alice"], id="pipelined-unsigned"),
    pytest.param(lambda a, b: chat(a, "alice") + chat(b, "bob"), [200, 200], ["alice", "bob"], id="pipelined-two-keys"),
    pytest.param(
        lambda a, _: chat(a, "alice", framing=TE) + _unsigned(), [200, 401], ["alice"], id="chunked-then-more"
    ),
    pytest.param(lambda a, _: chat(a, "alice", framing=TE, chunk=b"000%x"), [200], ["alice"], id="chunk-leading-zeros"),
    pytest.param(lambda a, _: chat(a, "alice", framing=TE, chunk=b"%x;ext=1"), [200], ["alice"], id="chunk-extension"),
    pytest.param(_chunked_then(b"0\r\nX-Trailer: 1\r\n\r\n"), [200], ["alice"], id="trailer"),
    pytest.param(
        lambda a, _: chat(a, "alice", extra=b"Expect: 100-continue\r\n") + _unsigned(),
        [200, 401],
        ["alice"],
        id="expect",
    ),
    pytest.param(
        lambda a, b: chat(a, "alice", version=b"1.0", extra=b"Connection: keep-alive\r\n") + chat(b, "bob"),
        [200, 200],
        ["alice", "bob"],
        id="http-10-keep-alive",
    ),
    pytest.param(
        lambda a, b: chat(a, "alice", extra=b"Connection: close\r\n") + chat(b, "bob"), [200], ["alice"], id="close"
    ),
    pytest.param(
        lambda a, _: b"GET /health HTTP/1.1\r\nHost: m\r\nContent-Length: %d\r\n\r\n" % len(_unsigned()) + _unsigned(),
        [200],
        [("GET", "/health", "smuggled")],
        id="body-on-get",
    ),
    pytest.param(
        lambda a, _: chat(a, "alice", target=b"http://other.example/v1/chat/completions"),
        [200],
        ["alice"],
        id="absolute",
    ),
]
"""Framings that are unambiguous: what follows a body is a request of its own, signed or refused on its own."""

REFUSED = [
    pytest.param(b"Content-Length: 5\r\n" + TE, id="cl-and-te"),
    pytest.param(TE + b"Content-Length: 5\r\n", id="te-and-cl"),
    pytest.param(TE + b"Content-Length: 5\r\nContent-Length: 5\r\n", id="te-and-two-cl"),
    pytest.param(b"Transfer-Encoding: identity, chunked\r\n", id="te-identity-chunked"),
    pytest.param(b"Transfer-Encoding: chunked, identity\r\n", id="te-chunked-identity"),
    pytest.param(b"Transfer-Encoding: xchunked\r\n", id="te-xchunked"),
    pytest.param(b"Transfer-Encoding: chunked \r\n", id="te-trailing-space"),
    pytest.param(b"Transfer-Encoding: chunked\t\r\n", id="te-trailing-tab"),
    pytest.param(b"Transfer-Encoding : chunked\r\n", id="te-space-before-colon"),
    pytest.param(b"Transfer-Encoding: identity\r\n" + TE, id="te-second-line"),
    pytest.param(b"Transfer-Encoding: gzip, chunked\r\n", id="te-gzip-chunked"),
    pytest.param(b"X-Fold: a\r\n " + TE, id="te-in-obs-fold"),
    pytest.param(b"X-Nul: a\x00b\r\n" + TE, id="nul-in-value"),
    pytest.param(b"X-Cr: a\rb\r\n" + TE, id="cr-in-value"),
    pytest.param(b"X\x00Name: a\r\n" + TE, id="nul-in-name"),
]
"""Header framings refused before the body (each is sent with a chunked body and bob's request after it)."""

BROKEN_BODIES = [
    pytest.param(lambda a, _: chat(a, "alice", framing=TE, chunk=b"0x%x"), id="chunk-0x"),
    pytest.param(lambda a, _: chat(a, "alice", framing=TE, chunk=b"-%x"), id="chunk-negative"),
    pytest.param(lambda a, _: chat(a, "alice", framing=TE, chunk=b"1000000000000000%x"), id="chunk-overflow"),
    pytest.param(_chunked_then(b"0\r\n"), id="no-final-crlf"),
    pytest.param(_chunked_then(b"0\r\nContent-Length: 5\r\n\r\n"), id="content-length-trailer"),
    pytest.param(lambda a, _: chat(a, "alice").replace(b"\r\n", b"\n"), id="bare-lf"),
    pytest.param(
        lambda a, _: chat(a, "alice").replace(b"Content-Type", b"Content-Length: 1\r\nContent-Type", 1), id="two-cl"
    ),
    pytest.param(lambda a, _: chat(a, "alice", version=b"1.0", framing=TE), id="te-on-http-10"),
    pytest.param(lambda a, _: chat(a, "alice", target=b"/v1/chat/completions#x"), id="fragment"),
]
"""Requests refused whole (bob's request after each must not be parsed either)."""


async def _exchange(stack: Stack, data: bytes) -> tuple[list[int], list[str], bool]:
    """Send ``data`` in one write: the statuses answered (interim ones left out), the error codes, and whether the
    meter closed the connection within 3 s."""
    reader, writer = await asyncio.open_connection("127.0.0.1", int(stack.meter_url.rsplit(":", 1)[1]))
    writer.write(data)
    raw, closed = b"", False
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(3):
            while chunk := await reader.read(65536):
                raw += chunk
            closed = True
    writer.close()
    statuses = [int(s) for s in re.findall(rb"HTTP/1\.1 (\d{3}) ", raw) if not s.startswith(b"1")]
    return statuses, [c.decode() for c in re.findall(rb'"code": "(\w+)"', raw)], closed


async def _charged(stack: Stack, key: str) -> int:
    return sum(row.requests for row in await stack.store.read_usage(key, [ledger_day()]))


async def _run(redis_url: str, build: Build) -> tuple[list[int], list[str], bool, Upstream, dict[str, int]]:
    async with recorded_stack(redis_url) as (stack, upstream):
        signed = {key: stack.headers(key_id=key) for key in ("alice", "bob")}
        statuses, codes, closed = await _exchange(stack, build(signed["alice"], signed["bob"]))
        charged = {key: await _charged(stack, key) for key in signed}
    return statuses, codes, closed, upstream, charged


@pytest.mark.parametrize(("build", "statuses", "upstream"), ACCEPTED)
async def test_each_request_upstream_was_sent_as_one_and_is_charged_to_its_signer(
    redis_url: str, build: Build, statuses: list[int], upstream: list[str | tuple[str, str, str]]
) -> None:
    answered, _, _, seen, charged = await _run(redis_url, build)
    expected = [u if isinstance(u, tuple) else ("POST", "/v1/chat/completions", u) for u in upstream]
    assert answered == statuses and seen.requests == expected
    assert charged == {key: sum(1 for *_, who in expected if who == key) for key in charged}  # each by its signer


@pytest.mark.parametrize("framing", REFUSED)
async def test_an_ambiguous_header_framing_is_refused_and_nothing_goes_upstream(redis_url: str, framing: bytes) -> None:
    def build(a: Mapping[str, str], b: Mapping[str, str]) -> bytes:
        return chat(a, "alice", framing=framing) + chat(b, "bob")

    statuses, codes, closed, seen, charged = await _run(redis_url, build)
    assert (statuses, codes, closed) == ([400], ["bad_request"], True)
    assert seen.requests == [] and charged == {"alice": 0, "bob": 0}


@pytest.mark.parametrize("build", BROKEN_BODIES)
async def test_a_malformed_request_is_refused_and_nothing_after_it_is_read(redis_url: str, build: Build) -> None:
    statuses, codes, closed, seen, charged = await _run(redis_url, lambda a, b: build(a, b) + chat(b, "bob"))
    assert (statuses, codes, closed) == ([400], ["bad_request"], True)
    assert seen.requests == [] and charged == {"alice": 0, "bob": 0}


async def test_a_passthrough_upload_that_breaks_midway_is_a_400_and_never_completes_upstream(redis_url: str) -> None:
    """The passthrough streams a body as it arrives, so the model server has its head when the framing breaks: the
    relay must never see that request whole (the meter cuts it), and the client gets the 400, not the 502 of an
    upstream request cut short."""

    async def tokenize(request: web.Request) -> web.Response:
        return web.json_response({"size": len(await request.read())})  # vLLM's reads the whole body first

    app = web.Application()
    app.router.add_post("/tokenize", tokenize)
    async with recorded_stack(redis_url, app) as (stack, upstream):
        reader, writer = await asyncio.open_connection("127.0.0.1", int(stack.meter_url.rsplit(":", 1)[1]))
        writer.write(b"POST /tokenize HTTP/1.1\r\nHost: m\r\nContent-Type: application/json\r\n" + TE + b"\r\n")
        writer.write(b'a\r\n{"model": \r\n')
        await asyncio.sleep(0.2)  # the meter has opened the upstream request and sent what it had
        writer.write(b'zz\r\n"x"}\r\n0\r\n\r\n')
        async with asyncio.timeout(5):
            raw = await reader.read()
        writer.close()
        await asyncio.sleep(0.2)
    assert raw.startswith(b"HTTP/1.1 400 ") and b'"code": "bad_request"' in raw
    assert upstream.requests == [] and "/tokenize" in upstream.heads  # sent, cut before its end
