"""A streamed answer whose request went upstream from the reservation's callback starts from the upstream
connection's callbacks (``proxy.Relay.pump``) and is taken over by the handler's task: the bytes, the usage and the
failure handling are those of the task's relay."""

from __future__ import annotations

import asyncio
import json
import socket
from collections import Counter
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict

from gateway.contract import ledger_day
from gateway.meter import h1, proxy, server
from gateway.meter.server import ClientGone
from gateway.meter.sse import SseError
from gateway.sim.server import SimConfig
from tests.test_meter_stack import CHAT, MODEL, normalise, raw_post, running_stack, serve

pytestmark = pytest.mark.redis

LIMIT = (1_000_000, 86_400_000)


@pytest.fixture
def pumps(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Counts what the callback relay did: relays started from the head's callback, first tokens written from the
    upstream's callback, held endings, failures."""
    seen: Counter[str] = Counter()
    pump = proxy.Relay.pump

    def counted(self: proxy.Relay) -> None:
        first = self.first
        pump(self)
        seen["calls"] += 1
        if not self.listening and not (self.held or self.gone or self.failure or self.upstream.ended):
            seen["client_full"] += 1
        if first and not self.first:
            seen["first_token"] += 1
        if self.held:
            seen["held"] += 1
        if self.failure is not None:
            seen[type(self.failure).__name__] += 1

    early = proxy._relay_early

    def started_early(meter: Any, request: Any, begun: proxy.Begun, upstream: h1.Response) -> None:
        early(meter, request, begun, upstream)
        seen["early"] += begun.relay is not None

    monkeypatch.setattr(proxy.Relay, "pump", counted)
    monkeypatch.setattr(proxy, "_relay_early", started_early)
    return seen


async def test_streams_relayed_from_the_callback_are_the_simulators_bytes_and_are_metered(
    redis_url: str, pumps: Counter[str]
) -> None:
    sim = SimConfig(served=(MODEL,), tokens_per_second=400)
    body = {
        "model": MODEL,
        "messages": CHAT,
        "stream": True,
        "max_tokens": 8,
        "stream_options": {"include_usage": True},
    }
    async with running_stack(redis_url, sim=sim) as stack:
        headers = stack.headers(key_id="relay", limit=LIMIT)
        direct = await raw_post(stack.sim_url + "/v1/chat/completions", body, headers)
        answers = []
        async with aiohttp.ClientSession() as session:
            for _ in range(4):  # the first opens the upstream connection; the others find it idle
                async with session.post(stack.meter_url + "/v1/chat/completions", json=body, headers=headers) as r:
                    answers.append((r.status, r.headers.get("x-ratelimit-limit-tokens"), await r.read()))
        rows = await stack.store.read_usage("relay", [ledger_day()])
    assert pumps["early"] >= 3  # started from the response head's callback
    assert pumps["first_token"] == 4  # the first token left from the upstream's callback
    for status, limit_header, raw in answers:
        assert (status, limit_header) == (200, str(LIMIT[0]))
        assert normalise(raw) == normalise(direct[2])
    usage = json.loads(direct[2].split(b"\n\n")[-3][6:])["usage"]
    assert rows[0].requests == 4 and rows[0].completion_tokens == 4 * usage["completion_tokens"]


async def test_an_answer_complete_in_its_first_bytes_is_settled_before_done(
    redis_url: str, pumps: Counter[str]
) -> None:
    sim = SimConfig(served=(MODEL,), tokens_per_second=0)  # unpaced: the whole answer comes with the head
    body = {"model": MODEL, "messages": CHAT, "stream": True, "max_tokens": 3}
    async with running_stack(redis_url, sim=sim) as stack:
        headers = stack.headers(key_id="whole", limit=LIMIT)
        async with aiohttp.ClientSession() as session:
            for _ in range(3):
                async with session.post(stack.meter_url + "/v1/chat/completions", json=body, headers=headers) as r:
                    text = (await r.read()).decode()
                    assert text.endswith("data: [DONE]\n\n")
                    rows = await stack.store.read_usage("whole", [ledger_day()])
                    assert rows[0].completion_tokens > 0  # in the ledger once the client has [DONE]
    assert pumps["held"] >= 1


async def test_a_client_that_reads_slowly_gets_every_event_at_its_pace(
    redis_url: str, pumps: Counter[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    accepted = server._Connection.connection_made

    def small_send_buffer(self: server._Connection, transport: asyncio.BaseTransport) -> None:
        # a slow network: without this, loopback's send buffer grows to megabytes and absorbs the whole answer
        transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
        accepted(self, transport)

    monkeypatch.setattr(server._Connection, "connection_made", small_send_buffer)
    sim = SimConfig(served=(MODEL,), tokens_per_second=0)
    body = {"model": MODEL, "messages": CHAT, "stream": True, "max_tokens": 3000, "ignore_eos": True}
    async with running_stack(redis_url, sim=sim) as stack:
        headers = {**stack.headers(key_id="slow", limit=LIMIT), "content-type": "application/json"}
        port = int(stack.meter_url.rsplit(":", 1)[1])
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the meter's writes back up quickly
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=sock)
        payload = json.dumps(body).encode()
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        writer.write(
            f"POST /v1/chat/completions HTTP/1.1\r\nhost: meter\r\n{head}content-length: {len(payload)}\r\n"
            f"connection: close\r\n\r\n".encode()
            + payload
        )
        await asyncio.sleep(0.5)  # not reading: the meter's buffer for this client fills up
        received = bytearray()
        while chunk := await reader.read(2048):
            received += chunk
            await asyncio.sleep(0)
        writer.close()
        rows = await stack.store.read_usage("slow", [ledger_day()])
    assert pumps["client_full"] >= 1  # the relay waited for the client to read, then went on
    assert received.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")  # the last chunk, then the end of the body
    assert received.count(b'"delta":{"content":') == rows[0].completion_tokens == 3000


async def runaway_after_one(request: web.Request) -> web.StreamResponse:
    """A normal answer to a request that does not stream; an event that never ends to one that does."""
    body = await request.json()
    if not body.get("stream"):
        usage = {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
        message = {"role": "assistant", "content": "ok"}
        return web.json_response(
            {"id": "c", "object": "chat.completion", "created": 1, "model": MODEL, "usage": usage,
             "choices": [{"index": 0, "message": message, "finish_reason": "stop"}]}
        )  # fmt: skip
    response = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await response.prepare(request)
    await response.write(b"data: " + b"x" * 4096)
    await asyncio.sleep(0.5)
    return response


async def test_a_malformed_first_event_met_in_the_callback_ends_the_stream_with_an_error_event(
    redis_url: str, pumps: Counter[str]
) -> None:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", runaway_after_one)
    runner, url = await serve(app)
    body: dict[str, Any] = {"model": MODEL, "messages": CHAT, "max_tokens": 5}
    try:
        async with (
            running_stack(redis_url, upstream=url, max_event_bytes=1024) as stack,
            aiohttp.ClientSession() as session,
        ):
            headers = stack.headers(key_id="runaway", limit=LIMIT)
            async with session.post(stack.meter_url + "/v1/chat/completions", json=body, headers=headers) as r:
                assert r.status == 200  # leaves an idle upstream connection behind
            async with session.post(
                stack.meter_url + "/v1/chat/completions", json={**body, "stream": True}, headers=headers
            ) as r:
                text = (await r.read()).decode()
    finally:
        await runner.cleanup()
    assert pumps["SseError"] == 1
    assert text.endswith("data: [DONE]\n\n") and "malformed event stream" in text


# --- the callback relay on its own, over a real upstream response and a client stream that can fill or leave ---


class _Conn:
    def resume(self) -> None:
        pass


class _Client:
    def __init__(self, *, full: bool = False, gone: bool = False) -> None:
        self.sent: list[bytes] = []
        self.full = full
        self.gone = gone

    def send_now(self, data: bytes) -> bool:
        if self.gone:
            raise ClientGone("client closed the connection")
        self.sent.append(data)
        return self.full


def _relay(client: _Client, *, max_event_bytes: int = 1 << 20) -> tuple[proxy.Relay, h1.Response]:
    from gateway.meter import request as req
    from gateway.meter.estimate import Estimator
    from gateway.meter.metrics import MeterMetrics

    raw = json.dumps({"model": MODEL, "messages": CHAT, "stream": True}).encode()
    parsed = req.parse(raw, kind="chat", estimator=Estimator(), allow_unknown=False)
    meter: Any = type("M", (), {})()
    meter.config = proxy.MeterConfig(secret=b"s" * 32, max_event_bytes=max_event_bytes)
    meter.metrics = MeterMetrics(max_keys=10)
    upstream = h1.Response(_Conn(), 200, CIMultiDict({"content-type": "text/event-stream"}))  # type: ignore[arg-type]
    relay = proxy.Relay(meter, parsed, MODEL, 0.0, client, upstream)  # type: ignore[arg-type]
    relay.start()
    return relay, upstream


def feed(upstream: h1.Response, data: bytes) -> None:
    """What the upstream connection does with one read: the body's chunks fed, then the batch delivered."""
    upstream._feed(data)
    upstream._delivered()


def _event(content: str, completion: int = 1) -> bytes:
    """A chunk as vLLM writes it with continuous usage (which the meter asks for and takes out again)."""
    delta = {"content": content}
    usage = {"prompt_tokens": 3, "completion_tokens": completion, "total_tokens": 3 + completion}
    chunk = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": MODEL,
             "choices": [{"index": 0, "delta": delta, "finish_reason": None}], "usage": usage}  # fmt: skip
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


def test_the_callback_relay_writes_each_whole_event_at_once_and_holds_the_end() -> None:
    client = _Client()
    relay, upstream = _relay(client)
    feed(upstream, _event("a")[:20])
    assert client.sent == [] and relay.first
    feed(upstream, _event("a")[20:] + _event("b", 2))
    sent = b"".join(client.sent)
    assert sent.count(b"data: ") == 2 and b'"content":"b"' in sent and b"usage" not in sent and not relay.first
    assert relay.sent.completion == 2
    feed(upstream, b"data: [DONE]\n\n")
    assert relay.held.endswith(b"data: [DONE]\n\n") and relay.tracker.done
    feed(upstream, _event("late", 3))  # no longer listened to: waits for the task
    assert len(client.sent) == 1 and upstream.take_now() == _event("late", 3)


@pytest.mark.parametrize(
    ("client", "stops"),
    [
        pytest.param(_Client(full=True), "full", id="client-buffer-full"),
        pytest.param(_Client(gone=True), "gone", id="client-gone"),
    ],
)
def test_the_callback_relay_stops_for_the_task(client: _Client, stops: str) -> None:
    relay, upstream = _relay(client)
    feed(upstream, _event("a"))
    assert relay.gone is (stops == "gone")
    assert relay.sent.completion == (1 if stops == "full" else 0)  # what the client was sent, and no more
    feed(upstream, _event("b"))
    assert upstream.take_now() == _event("b")  # left for the task


def test_the_callback_relay_keeps_a_failure_for_the_task_and_stops_at_the_end() -> None:
    relay, upstream = _relay(_Client(), max_event_bytes=64)
    feed(upstream, b"data: " + b"x" * 100)
    assert isinstance(relay.failure, SseError)
    relay, upstream = _relay(_Client())
    upstream._finish()
    feed(upstream, _event("a"))  # after the end nothing is relayed from the callback
    assert relay.first and upstream.take_now() == _event("a")


def test_the_chunks_one_read_brought_go_out_in_one_write_and_the_end_hands_over() -> None:
    client = _Client()
    relay, upstream = _relay(client)
    for i in range(5):  # five HTTP chunks parsed out of one read
        upstream._feed(_event(str(i), i + 1))
    assert client.sent == []
    upstream._delivered()
    assert len(client.sent) == 1 and client.sent[0].count(b"data: ") == 5
    upstream._feed(_event("x", 6))
    upstream._finish()  # the body ends in the same read, without [DONE]: relayed, then the task takes over
    assert len(client.sent) == 2 and not relay.listening and relay.sent.completion == 6
