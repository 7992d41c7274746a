"""The meter's refusals and failure modes: spoofed identity, bad input, upstream down, slow or broken."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp import web

from gateway.contract import bucket_key, ledger_day
from gateway.identity import H_TIER, Identity, sign
from gateway.sim.server import SimConfig
from tests.support.k8s_emulator import eventually
from tests.support.procs import free_port
from tests.support.tools import check_metrics, promtool
from tests.test_meter_stack import CHAT, MODEL, SECRET, running_stack, serve

pytestmark = pytest.mark.redis

BODY = {"model": MODEL, "messages": CHAT, "max_tokens": 5}


async def post(
    url: str, *, headers: dict[str, str], data: bytes | None = None, body: Any = None
) -> tuple[int, dict[str, Any]]:
    payload = data if data is not None else json.dumps(body if body is not None else BODY).encode()
    async with aiohttp.ClientSession() as session, session.post(url, data=payload, headers=headers) as resp:
        return resp.status, await resp.json(content_type=None)


def signed(**changes: str) -> dict[str, str]:
    identity = Identity(
        key_id="spoof", user="u", groups="free", tier="free", model=MODEL, token_limit=100, token_window_ms=60_000
    )
    headers = {**sign(identity, SECRET.encode()), "content-type": "application/json"}
    headers.update(changes)
    return headers


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        pytest.param({"content-type": "application/json"}, "missing_identity", id="no-identity"),
        pytest.param(
            {"x-maas-key-id": "k", "x-maas-tier": "enterprise", "content-type": "application/json"},
            "unsigned_identity",
            id="unsigned",
        ),
        pytest.param(signed(**{H_TIER: "enterprise"}), "invalid_identity", id="tier-changed-after-signing"),
        pytest.param(signed(**{"x-maas-token-limit": "999999/1000"}), "invalid_identity", id="limit-raised"),
        pytest.param(signed(**{"x-maas-signature": "v1=" + "0" * 64}), "invalid_identity", id="forged-signature"),
    ],
)
async def test_spoofed_identity_sent_straight_to_the_meter_is_rejected(
    redis_url: str, headers: dict[str, str], code: str
) -> None:
    async with running_stack(redis_url) as stack:
        status, body = await post(stack.meter_url + "/v1/chat/completions", headers=headers)
        assert await stack.store.read_usage("spoof", [ledger_day()]) == []
    assert status == 401 and body["error"]["code"] == code and body["error"]["type"] == "authentication_error"


async def test_stale_identity_is_rejected_and_trusted_mode_accepts_unsigned(redis_url: str) -> None:
    identity = Identity(key_id="old", user="u", groups="", tier="free", model=MODEL)
    stale = {**sign(identity, SECRET.encode(), now=1_000_000), "content-type": "application/json"}
    async with running_stack(redis_url) as stack:
        status, body = await post(stack.meter_url + "/v1/chat/completions", headers=stale)
        assert (status, body["error"]["code"]) == (401, "stale_identity")
    async with running_stack(redis_url, trust_identity_headers=True) as stack:
        unsigned = {"x-maas-key-id": "trusted", "content-type": "application/json"}
        status, body = await post(stack.meter_url + "/v1/chat/completions", headers=unsigned)
        assert status == 200 and body["usage"]["completion_tokens"] == 5
        assert (await stack.store.read_usage("trusted", [ledger_day()]))[0].requests == 1


@pytest.mark.parametrize(
    ("data", "content_type", "status", "code"),
    [
        pytest.param(
            b'{"model": "sim-model", "messages": [', "application/json", 400, "invalid_json", id="invalid-json"
        ),
        pytest.param(b'{"messages": []}' + b" " * 5000, "application/json", 413, "request_too_large", id="huge-body"),
        pytest.param(
            b'{"messages": [], "metadata": ' + b"[" * 1500 + b"]" * 1500 + b"}",
            "application/json",
            400,
            "invalid_json",
            id="nested-too-deeply",
        ),
        pytest.param(b"messages=hi", "application/x-www-form-urlencoded", 415, "unsupported_media_type", id="form"),
        pytest.param(
            b'{"messages": [], "temprature": 1}', "application/json", 400, "unknown_parameter", id="unknown-field"
        ),
        pytest.param(
            b'{"messages": [], "max_tokens": -1}', "application/json", 400, "invalid_request", id="bad-max-tokens"
        ),
        pytest.param(
            b'{"model": "other-model", "messages": []}', "application/json", 403, "model_not_allowed", id="other-model"
        ),
        # the model server reads a repeated key's last value, as the meter does
        pytest.param(
            b'{"model": "sim-model", "messages": [], "model": "other-model"}',
            "application/json",
            403,
            "model_not_allowed",
            id="repeated-model-key",
        ),
        pytest.param(
            b'{"model": "SIM-MODEL", "messages": []}', "application/json", 403, "model_not_allowed", id="other-case"
        ),
        pytest.param(
            b'{"model": "sim-model ", "messages": []}', "application/json", 403, "model_not_allowed", id="padded"
        ),
    ],
)
async def test_bad_input_gets_a_documented_4xx_and_costs_nothing(
    redis_url: str, data: bytes, content_type: str, status: int, code: str
) -> None:
    async with running_stack(redis_url, max_body_bytes=4096) as stack:
        headers = {**stack.headers(key_id="bad", limit=(1000, 60_000)), "content-type": content_type}
        got, body = await post(stack.meter_url + "/v1/chat/completions", headers=headers, data=data)
        metrics = await stack.metrics()
        assert await stack.store.read_usage("bad", [ledger_day()]) == []
    assert (got, body["error"]["code"]) == (status, code)
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert metrics[("maas_meter_rejected_total", (("reason", code),))] == 1


async def test_exhausted_tokens_get_429_with_openai_rate_limit_headers(redis_url: str) -> None:
    async with running_stack(redis_url) as stack:
        headers = {**stack.headers(key_id="tiny", limit=(30, 86_400_000)), "content-type": "application/json"}
        async with (
            aiohttp.ClientSession() as session,
            session.post(stack.meter_url + "/v1/chat/completions", json=BODY, headers=headers) as resp,
        ):
            assert resp.status == 429
            error = (await resp.json())["error"]
            assert (error["type"], error["code"]) == ("tokens", "rate_limit_exceeded")
            assert resp.headers["x-ratelimit-limit-tokens"] == "30"
            # more than the whole limit of 30: no retry-after (the retry case: test_meter_quota)
            assert "retry-after" not in resp.headers and "too large" in error["message"]
        metrics = await stack.metrics()
    assert metrics[("maas_meter_reservations_total", (("outcome", "denied"),))] == 1


async def test_upstream_down_is_503_and_not_ready(redis_url: str) -> None:
    async with running_stack(redis_url, upstream=f"http://127.0.0.1:{free_port()}") as stack:
        status, body = await post(stack.meter_url + "/v1/chat/completions", headers=signed())
        async with aiohttp.ClientSession() as session, session.get(stack.ops_url + "/readyz") as ready:
            assert ready.status == 503 and (await ready.json())["status"] == "not_ready"
        metrics = await stack.metrics()
    assert (status, body["error"]["code"]) == (503, "upstream_unavailable")
    assert metrics[("maas_meter_upstream_errors_total", (("reason", "connect"),))] == 1
    # forwarded, then failed: not "refused before forwarding"
    assert metrics.get(("maas_meter_rejected_total", (("reason", "upstream_unavailable"),)), 0) == 0


async def test_slow_upstream_is_504(redis_url: str) -> None:
    sim = SimConfig(served=(MODEL,), ttft_ms=1_000)
    async with running_stack(redis_url, sim=sim, upstream_first_byte_timeout=0.2) as stack:
        status, body = await post(stack.meter_url + "/v1/chat/completions", headers=signed())
        metrics = await stack.metrics()
    assert (status, body["error"]["code"]) == (504, "upstream_timeout")
    assert metrics.get(("maas_meter_rejected_total", (("reason", "upstream_timeout"),)), 0) == 0


async def test_stream_that_goes_silent_ends_with_an_error_event_and_is_charged_what_was_sent(redis_url: str) -> None:
    sim = SimConfig(served=(MODEL,), tokens_per_second=1)
    async with running_stack(redis_url, sim=sim, upstream_idle_timeout=0.3) as stack:
        headers = {**stack.headers(key_id="silent", limit=(10_000, 86_400_000)), "content-type": "application/json"}
        body = {**BODY, "stream": True, "ignore_eos": True}
        async with (
            aiohttp.ClientSession() as session,
            session.post(stack.meter_url + "/v1/chat/completions", json=body, headers=headers) as resp,
        ):
            events = (await resp.read()).decode().split("\n\n")
        rows = await stack.store.read_usage("silent", [ledger_day()])
    assert events[-3:] == [events[-3], "data: [DONE]", ""]
    error = json.loads(events[-3][6:])["error"]
    assert error["code"] == "upstream_timeout"
    tokens = [e for e in events if '"content":"' in e and '"content":""' not in e]
    assert rows[0].completion_tokens == len(tokens) == 1


async def broken_upstream(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await response.prepare(request)
    chunk = {"id": "x", "object": "chat.completion.chunk", "created": 1, "model": MODEL, "choices": []}
    await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
    await asyncio.sleep(0.05)
    assert request.transport is not None
    request.transport.close()
    return response


async def test_upstream_that_breaks_mid_stream_gets_a_502_error_event_and_no_ledger_row(redis_url: str) -> None:
    """The ledger counts requests that served tokens: a stream whose upstream broke after the head, with nothing
    sent, had added a request of no tokens to the key's row."""
    app = web.Application()
    app.router.add_post("/v1/chat/completions", broken_upstream)
    runner, url = await serve(app)
    try:
        async with running_stack(redis_url, upstream=url) as stack:
            async with (
                aiohttp.ClientSession() as session,
                session.post(
                    stack.meter_url + "/v1/chat/completions", json={**BODY, "stream": True}, headers=signed()
                ) as resp,
            ):
                text = (await resp.read()).decode()
            metrics = await stack.metrics()
            rows = await stack.store.read_usage("spoof", [ledger_day()])
            bucket = aioredis.Redis.from_url(redis_url)
            state = await bucket.get(bucket_key("spoof", "tokens"))
            await bucket.aclose()
    finally:
        await runner.cleanup()
    assert text.endswith("data: [DONE]\n\n") and '"code": "upstream_error"' in text
    assert metrics[("maas_meter_upstream_errors_total", (("reason", "broken"),))] == 1
    assert rows == [] and state is None  # no row, and the reservation refunded whole


async def test_meter_metrics_pass_promtool(redis_url: str) -> None:
    promtool()
    async with running_stack(redis_url) as stack:
        status, _ = await post(stack.meter_url + "/v1/chat/completions", headers=signed())
        assert status == 200
        async with aiohttp.ClientSession() as session, session.get(stack.ops_url + "/metrics") as resp:
            text = await resp.read()
    await check_metrics(text)
    assert b'maas_tokens_total{key_id="spoof"' in text and b"gen_ai_client_token_usage_bucket" in text


async def runaway_upstream(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await response.prepare(request)
    await response.write(b"data: " + b"x" * 4096)
    await asyncio.sleep(0.5)
    return response


async def test_an_oversized_upstream_event_ends_the_stream_with_an_error_event(redis_url: str) -> None:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", runaway_upstream)
    runner, url = await serve(app)
    try:
        async with (
            running_stack(redis_url, upstream=url, max_event_bytes=1024) as stack,
            aiohttp.ClientSession() as session,
            session.post(
                stack.meter_url + "/v1/chat/completions", json={**BODY, "stream": True}, headers=signed()
            ) as resp,
        ):
            text = (await resp.read()).decode()
    finally:
        await runner.cleanup()
    assert text.endswith("data: [DONE]\n\n") and "malformed event stream" in text


async def upload_echo(request: web.Request) -> web.Response:
    digest = hashlib.sha256()
    size = 0
    async for chunk in request.content.iter_any():
        digest.update(chunk)
        size += len(chunk)
    body = json.dumps({"method": request.method, "size": size, "sha256": digest.hexdigest()})
    return web.Response(text=body, content_type="application/json", headers={"x-upstream": "yes"})


async def test_passthrough_streams_request_bodies_and_answers_head(redis_url: str) -> None:
    app = web.Application()
    app.router.add_route("*", "/v1/files", upload_echo)
    runner, url = await serve(app)
    payload = bytes(range(256)) * (12 * 1024)  # 3 MiB, over the server's read high-water mark

    async def chunks() -> Any:
        for at in range(0, len(payload), 100_000):
            yield payload[at : at + 100_000]

    try:
        stack_cm = running_stack(redis_url, upstream=url, passthrough_posts="/v1/files")
        async with stack_cm as stack, aiohttp.ClientSession() as session:
            async with session.post(stack.meter_url + "/v1/files", data=chunks()) as resp:  # chunked upload
                uploaded = await resp.json()
                assert resp.headers["x-upstream"] == "yes"
            async with session.put(stack.meter_url + "/v1/files", data=io.BytesIO(payload)) as resp:  # sized upload
                sized = await resp.json()
            async with session.head(stack.meter_url + "/v1/files") as resp:
                head = (resp.status, resp.headers.get("content-length"), await resp.read())
    finally:
        await runner.cleanup()
    want = hashlib.sha256(payload).hexdigest()
    assert uploaded == {"method": "POST", "size": len(payload), "sha256": want}
    assert sized == {"method": "PUT", "size": len(payload), "sha256": want}
    assert head[0] == 200 and head[1] is not None and int(head[1]) > 0 and head[2] == b""


async def test_a_metered_body_that_arrives_in_pieces_is_read_whole_and_reserved(redis_url: str) -> None:
    raw = json.dumps({**BODY, "messages": [{"role": "user", "content": "word " * 600}]}).encode()

    async def slowly() -> Any:
        for at in range(0, len(raw), 700):
            yield raw[at : at + 700]
            await asyncio.sleep(0.02)  # the handler is already waiting for the rest

    async with running_stack(redis_url) as stack:
        headers = {**stack.headers(key_id="pieces", limit=(100_000, 60_000)), "content-type": "application/json"}
        async with (
            aiohttp.ClientSession() as session,
            session.post(stack.meter_url + "/v1/chat/completions", data=slowly(), headers=headers) as resp,
        ):
            answer = await resp.json()
        rows = await stack.store.read_usage("pieces", [ledger_day()])
    assert resp.status == 200 and answer["usage"]["completion_tokens"] == BODY["max_tokens"]
    assert rows[0].prompt_tokens == answer["usage"]["prompt_tokens"] >= 600  # the whole prompt reached the upstream


async def test_other_methods_on_a_metered_path_get_405_in_the_openai_envelope(redis_url: str) -> None:
    """Not passed to the model server, whose own answer would not be the OpenAI envelope (vLLM: 405 with
    ``{"detail": ...}``); a CORS preflight still is."""
    async with running_stack(redis_url) as stack, aiohttp.ClientSession() as session:
        for method in ("GET", "PUT", "DELETE", "PATCH"):
            async with session.request(method, stack.meter_url + "/v1/chat/completions") as resp:
                body = await resp.json(content_type=None)
                assert resp.status == 405 and resp.headers["allow"] == "POST", method
                assert body["error"]["type"] == "invalid_request_error", body
                assert body["error"]["code"] == "method_not_allowed" and method in body["error"]["message"]
        async with session.head(stack.meter_url + "/v1/embeddings") as resp:
            assert resp.status == 405 and await resp.read() == b""
        # the keep-alive connection that answered the HEAD (no body) still serves a metered request
        async with session.post(stack.meter_url + "/v1/chat/completions", json=BODY, headers=signed()) as resp:
            assert resp.status == 200 and (await resp.json())["usage"]["completion_tokens"] == 5
        async with (
            session.options(stack.sim_url + "/v1/chat/completions") as direct,
            session.options(stack.meter_url + "/v1/chat/completions") as metered,
        ):
            assert metered.status == direct.status
        async with aiohttp.ClientSession() as fresh, fresh.get(stack.ops_url + "/metrics") as resp:
            text = await resp.text()
    assert 'reason="method_not_allowed"' in text


@pytest.mark.parametrize(
    ("path", "body"),
    [
        pytest.param(
            "/v1/chat/completions",
            b'{"model":"%s","max_tokens":5,"messages":[{"role":"user","content":"cut emoji \\ud83d"}]}',
            id="chat-clamped",
        ),
        pytest.param("/v1/embeddings", b'{"model":"%s","input":"x \\udc00"}', id="embeddings"),
    ],
)
async def test_a_lone_surrogate_in_valid_json_is_served_not_a_500(redis_url: str, path: str, body: bytes) -> None:
    """Half an emoji (a string a client cut) is valid JSON: the estimate and the rewritten body had crashed on it."""
    async with running_stack(redis_url) as stack:
        headers = {**stack.headers(key_id="emoji", limit=(100_000, 60_000)), "content-type": "application/json"}
        got, answer = await post(stack.meter_url + path, headers=headers, data=body.replace(b"%s", MODEL.encode()))
    assert got == 200, answer
    assert answer["usage"]["prompt_tokens"] > 0


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/v1/responses"), ("POST", "/invocations"), ("POST", "/v1/load_lora_adapter"), ("DELETE", "/v1/x")],
)
async def test_requests_that_would_go_unmetered_are_refused(redis_url: str, method: str, path: str) -> None:
    """vLLM generates on /v1/responses and /invocations, and loads adapters on others: passed on, a key's holder had
    generated tokens no bucket or ledger saw."""
    async with running_stack(redis_url) as stack, aiohttp.ClientSession() as session:
        headers = stack.headers(key_id="sneaky", limit=(1000, 60_000))
        async with session.request(method, stack.meter_url + path, json={"model": MODEL}, headers=headers) as resp:
            got, body = resp.status, await resp.json()
        async with session.post(stack.meter_url + "/tokenize", json={"model": MODEL, "prompt": "hi"}) as resp:
            tokenize = await resp.text()  # a harmless POST of vLLM's, passed on by default (the sim lacks it)
        metrics = await stack.metrics()
    assert (got, body["error"]["code"]) == (404, "unsupported_endpoint")
    assert metrics[("maas_meter_rejected_total", (("reason", "unsupported_endpoint"),))] == 1
    assert "unsupported_endpoint" not in tokenize


async def test_a_body_without_a_model_is_sent_naming_the_routed_one(redis_url: str) -> None:
    """vLLM serves its own model to a body that names none: the meter names the routed model, so a request admitted
    for another model and sent to this model's server (a route the check and the proxy saw differently) is refused
    by the model server instead of served by it."""
    unnamed = {"messages": CHAT, "max_tokens": 5}
    async with running_stack(redis_url, sim=SimConfig(served=(MODEL,))) as stack:
        headers = {**stack.headers(key_id="unnamed"), "content-type": "application/json"}
        status, body = await post(stack.meter_url + "/v1/chat/completions", headers=headers, body=unnamed)
        assert (status, body["model"]) == (200, MODEL)
        elsewhere = {**stack.headers(key_id="elsewhere", model="granite-code"), "content-type": "application/json"}
        status, body = await post(stack.meter_url + "/v1/chat/completions", headers=elsewhere, body=unnamed)
        assert status == 404 and body["error"]["param"] == "model", body


async def test_a_passthrough_body_is_bounded_like_a_metered_one(redis_url: str) -> None:
    """``/tokenize`` passes unmetered: a body of any size had gone on to the model server's tokenizer."""
    received: list[int] = []

    async def count(request: web.Request) -> web.Response:
        size = 0
        async for data in request.content.iter_any():
            size += len(data)
        received.append(size)
        return web.json_response({"size": size})

    app = web.Application(client_max_size=1 << 30)
    app.router.add_route("*", "/tokenize", count)
    runner, url = await serve(app)
    payload = b"x" * 20_000

    async def chunks() -> Any:
        for at in range(0, len(payload), 1000):
            yield payload[at : at + 1000]

    try:
        async with (
            running_stack(redis_url, upstream=url, max_body_bytes=8192) as stack,
            aiohttp.ClientSession() as session,
        ):
            async with session.post(stack.meter_url + "/tokenize", data=payload) as resp:  # sized
                sized = (resp.status, (await resp.json())["error"]["code"])
            chunked: tuple[int, str] | None = None
            with contextlib.suppress(aiohttp.ClientError):  # the meter may close before the upload ends
                async with session.post(stack.meter_url + "/tokenize", data=chunks()) as resp:  # chunked
                    chunked = (resp.status, (await resp.json())["error"]["code"])
            async with session.post(stack.meter_url + "/tokenize", data=b"y" * 100) as resp:
                small = await resp.json()
    finally:
        await runner.cleanup()
    assert sized == (413, "request_too_large")
    assert chunked in (None, (413, "request_too_large"))
    assert small == {"size": 100}
    assert all(size <= 8192 for size in received), received  # the chunked one never reached the upstream whole


async def test_a_request_that_finds_every_upstream_connection_busy_gets_a_504_that_says_so(redis_url: str) -> None:
    sim = SimConfig(served=(MODEL,), tokens_per_second=5)
    meter = {"upstream_max_connections": 1, "upstream_first_byte_timeout": 0.3}
    async with running_stack(redis_url, sim=sim, **meter) as stack:
        headers = {**stack.headers(key_id="pool", limit=(10_000, 86_400_000)), "content-type": "application/json"}
        url = stack.meter_url + "/v1/chat/completions"
        long = {**BODY, "max_tokens": 50, "ignore_eos": True, "stream": True}
        async with aiohttp.ClientSession() as session, session.post(url, json=long, headers=headers) as holding:
            await holding.content.readuntil(b"\n\n")  # the only upstream connection is taken
            async with aiohttp.ClientSession() as other, other.post(url, json=BODY, headers=headers) as queued:
                status, body = queued.status, await queued.json()
        metrics = await stack.metrics()
    assert (status, body["error"]["code"]) == (504, "upstream_timeout")
    assert "--upstream-max-connections" in body["error"]["message"]
    assert metrics[("maas_meter_upstream_errors_total", (("reason", "pool_timeout"),))] == 1
    assert metrics[("maas_meter_upstream_errors_total", (("reason", "first_byte_timeout"),))] == 0
    assert metrics[("maas_meter_requests_total", (("model", MODEL), ("status", "504")))] == 1


async def test_a_request_past_the_upstream_queue_gets_503_at_once_and_its_reservation_back(redis_url: str) -> None:
    """The wait for a free upstream connection was bounded only in time: every request past the pool waited up to
    --upstream-first-byte-timeout, its tokens reserved. One more than --upstream-max-queue is refused at once."""
    sim = SimConfig(served=(MODEL,), tokens_per_second=5)
    meter = {"upstream_max_connections": 1, "upstream_max_queue": 1}
    async with running_stack(redis_url, sim=sim, **meter) as stack:
        url = stack.meter_url + "/v1/chat/completions"

        def headers(key_id: str) -> dict[str, str]:
            return {**stack.headers(key_id=key_id, limit=(10_000, 86_400_000)), "content-type": "application/json"}

        long = {**BODY, "max_tokens": 50, "ignore_eos": True, "stream": True}
        async with aiohttp.ClientSession() as session:
            holding = await session.post(url, json=long, headers=headers("holding"))
            await holding.content.readuntil(b"\n\n")  # the only upstream connection is taken
            queued = asyncio.create_task(post(url, headers=headers("queued")))
            await eventually(lambda: stack.meter.upstream.waiting() == 1)  # the queue's only place is taken
            waiting = await stack.metrics()
            async with session.post(url, json=BODY, headers=headers("busy")) as refused:
                status, retry_after, body = refused.status, refused.headers.get("retry-after"), await refused.json()
            holding.close()  # the client leaves: its upstream connection goes to the request that waits
            served, _ = await queued
        metrics = await stack.metrics()
        busy_rows = await stack.store.read_usage("busy", [ledger_day()])
        bucket = aioredis.Redis.from_url(redis_url)
        busy_bucket = await bucket.exists(bucket_key("busy", "tokens"))
        await bucket.aclose()
    assert (status, body["error"]["code"], body["error"]["type"]) == (503, "upstream_busy", "server_error")
    assert retry_after == "1" and "--upstream-max-queue" in body["error"]["message"]
    assert served == 200  # the one that waited was served once a connection came free
    assert waiting[("maas_meter_upstream_queued_requests", ())] == 1
    assert metrics[("maas_meter_upstream_queued_requests", ())] == 0
    assert metrics[("maas_meter_rejected_total", (("reason", "upstream_busy"),))] == 1
    assert metrics[("maas_meter_requests_total", (("model", MODEL), ("status", "503")))] == 1
    assert metrics[("maas_meter_reservations_total", (("outcome", "granted"),))] == 3
    assert busy_rows == [] and not busy_bucket  # reserved, then refunded in full: nothing stored


class HeldUpstream:
    """An upstream whose ``/hold`` answers one chunk, then one every 0.1 s until ``release`` is set; ``/stall`` goes
    silent after its first chunk; ``/broken`` drops the connection unanswered; ``/v1/models`` answers at once. All of
    them end when ``stop`` is set."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.stop = asyncio.Event()
        self.app = web.Application()
        self.app.router.add_get("/hold", self.hold)
        self.app.router.add_get("/stall", self.stall)
        self.app.router.add_get("/broken", self.broken)
        self.app.router.add_get("/v1/models", self.models)

    async def hold(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b"chunk\n")
        while not (self.release.is_set() or self.stop.is_set()):
            await asyncio.sleep(0.1)
            await response.write(b"chunk\n")
        await response.write_eof()
        return response

    async def stall(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b"chunk\n")
        await self.stop.wait()
        return response

    async def broken(self, request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        request.transport.close()
        await self.stop.wait()
        raise AssertionError("unreachable")

    async def models(self, _: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": []})


async def test_passthrough_requests_past_the_upstream_queue_get_503_at_once_and_every_end_gives_back_their_place(
    redis_url: str,
) -> None:
    """Passthrough requests waited on aiohttp's pool, bounded only in time: with every connection taken by a long
    answer, any number of ``GET /v1/models`` waited out --upstream-first-byte-timeout. Now as many as
    --upstream-max-connections are in flight and --upstream-max-queue wait; one more is refused at once. Whichever way
    a request ends, its place comes free: with one place, a request after each end is served (a leaked place would
    make it wait out the first-byte timeout and answer 504)."""
    held = HeldUpstream()
    runner, upstream = await serve(held.app)
    meter = {"upstream_max_connections": 1, "upstream_max_queue": 1, "upstream_first_byte_timeout": 10}
    try:
        async with (
            running_stack(redis_url, upstream=upstream, upstream_idle_timeout=1.0, **meter) as stack,
            aiohttp.ClientSession() as session,
        ):

            async def get(path: str) -> tuple[int, bytes]:
                async with aiohttp.ClientSession() as own, own.get(stack.meter_url + path) as resp:
                    with contextlib.suppress(aiohttp.ClientPayloadError):  # an answer cut short
                        return resp.status, await resp.read()
                    return resp.status, b""

            holding = await session.get(stack.meter_url + "/hold")
            await holding.content.readline()  # the only place in flight is taken
            queued = asyncio.create_task(get("/v1/models"))
            await eventually(lambda: stack.meter.upstream.waiting() == 1)  # the queue's only place is taken
            waiting = await stack.metrics()
            async with session.get(stack.meter_url + "/v1/models") as refused:
                status, retry_after, body = refused.status, refused.headers.get("retry-after"), await refused.json()
            held.release.set()
            relayed = await holding.read()  # the answer relayed to its end: its place goes to the one that waits
            served = await queued
            held.release = asyncio.Event()

            gone = await session.get(stack.meter_url + "/hold")
            await gone.content.readline()
            cut = asyncio.create_task(get("/v1/models"))  # waits in the queue, then its client leaves
            await eventually(lambda: stack.meter.upstream.waiting() == 1)
            cut.cancel()
            await eventually(lambda: stack.meter.upstream.waiting() == 0)
            gone.close()  # the client leaves mid-answer
            after_gone = await get("/v1/models")
            broken = await get("/broken")
            after_broken = await get("/v1/models")
            stalled = await get("/stall")  # cut by the idle timeout mid-answer
            after_stall = await get("/v1/models")
            metrics = await stack.metrics()
    finally:
        held.stop.set()
        await runner.cleanup()
    assert (status, body["error"]["code"], body["error"]["type"]) == (503, "upstream_busy", "server_error")
    assert retry_after == "1" and "--upstream-max-queue" in body["error"]["message"]
    assert relayed.count(b"chunk") >= 1 and served[0] == 200
    assert waiting[("maas_meter_upstream_queued_requests", ())] == 1
    assert metrics[("maas_meter_upstream_queued_requests", ())] == 0
    assert metrics[("maas_meter_rejected_total", (("reason", "upstream_busy"),))] == 1
    assert broken[0] == 502 and stalled[0] == 200  # (the head was relayed; the body ends cut short)
    assert metrics[("maas_meter_upstream_errors_total", (("reason", "idle_timeout"),))] == 1
    assert (after_gone[0], after_broken[0], after_stall[0]) == (200, 200, 200)


ZERO_USAGE = {"prompt_tokens": 0, "total_tokens": 0, "completion_tokens": 0}


def usageless_upstream(zeros: bool) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """An OpenAI-compatible server that ignores ``stream_options`` and reports no usage (``zeros``: a usage of zero
    tokens on the answer, on every chunk and in a final usage chunk)."""
    usage = {"usage": ZERO_USAGE} if zeros else {}

    async def answer(request: web.Request) -> web.StreamResponse:
        if not (await request.json()).get("stream"):
            message = {"index": 0, "message": {"role": "assistant", "content": "hi there"}, "finish_reason": "stop"}
            body = {"id": "x", "object": "chat.completion", "model": MODEL, "choices": [message], **usage}
            return web.json_response(body)
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        head = {"id": "x", "object": "chat.completion.chunk", "model": MODEL}
        for text in ("hi", " there"):
            chunk = {**head, "choices": [{"index": 0, "delta": {"content": text}}], **usage}
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
        if zeros:
            await response.write(f"data: {json.dumps({**head, 'choices': [], **usage})}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        return response

    return answer


@pytest.mark.parametrize("zeros", [False, True], ids=["no-usage", "zero-usage"])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_an_answer_without_usage_is_charged_its_bound_not_nothing(
    redis_url: str, stream: bool, zeros: bool
) -> None:
    """A usage of zero tokens was charged as reported: nothing (vLLM never serves a request without a prompt
    token, so such a report is no more a usage than a missing one)."""
    app = web.Application()
    app.router.add_post("/v1/chat/completions", usageless_upstream(zeros))
    runner, url = await serve(app)
    try:
        async with running_stack(redis_url, upstream=url) as stack:
            key = f"usageless-{stream}-{zeros}"
            headers = {**stack.headers(key_id=key, limit=(10_000, 86_400_000)), "content-type": "application/json"}
            async with (
                aiohttp.ClientSession() as session,
                session.post(
                    stack.meter_url + "/v1/chat/completions", json={**BODY, "stream": stream}, headers=headers
                ) as resp,
            ):
                assert resp.status == 200 and b"there" in await resp.read()
            rows = await stack.store.read_usage(key, [ledger_day()])
            metrics = await stack.metrics()
    finally:
        await runner.cleanup()
    assert rows[0].completion_tokens == BODY["max_tokens"] and rows[0].prompt_tokens > 0
    assert metrics[("maas_meter_upstream_errors_total", (("reason", "no_usage"),))] == 1


def token_event(text: str, completion: int) -> bytes:
    """A vLLM chat chunk with the continuous usage the meter asks for (7 prompt tokens)."""
    choice = {"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": None}
    usage = {"prompt_tokens": 7, "total_tokens": 7 + completion, "completion_tokens": completion}
    chunk = {"id": "x", "object": "chat.completion.chunk", "created": 1, "model": MODEL, "choices": [choice]}
    return b"data: " + json.dumps({**chunk, "usage": usage}, separators=(",", ":")).encode() + b"\n\n"


VLLM_500 = b'data: {"error": {"object": "error", "message": "engine died", "type": "InternalServerError", ' + (
    b'"param": null, "code": 500}}\n\n'
)
FLAT_400 = b'data: {"object":"error","message":"bad grammar","type":"BadRequestError","param":null,"code":400}\n\n'
NO_CODE = b'data: {"error": {"message": "something failed", "type": "server_error"}}\n\n'


@pytest.mark.parametrize(
    ("events", "status", "charged"),
    [
        pytest.param([token_event("hi", 1), token_event(" there", 2), VLLM_500], 500, (7, 2), id="vllm-500"),
        pytest.param([token_event("hi", 1), FLAT_400], 400, (7, 1), id="flat-400"),
        pytest.param([NO_CODE], 502, None, id="no-code-no-usage"),
    ],
)
async def test_a_stream_vllm_ends_with_an_error_event_is_counted_with_its_status(
    redis_url: str, events: list[bytes], status: int, charged: tuple[int, int] | None
) -> None:
    """The client's head said 200 before the error came: the metric says what happened, the charge is what vLLM
    reported before the error (nothing, the reservation refunded, when it reported nothing)."""

    async def erring(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        for event in [*events, b"data: [DONE]\n\n"]:
            await response.write(event)
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", erring)
    runner, url = await serve(app)
    try:
        async with running_stack(redis_url, upstream=url) as stack:
            headers = {**stack.headers(key_id="erred", limit=(10_000, 86_400_000)), "content-type": "application/json"}
            async with (
                aiohttp.ClientSession() as session,
                session.post(
                    stack.meter_url + "/v1/chat/completions", json={**BODY, "stream": True}, headers=headers
                ) as resp,
            ):
                text = (await resp.read()).decode()
            rows = await stack.store.read_usage("erred", [ledger_day()])
            metrics = await stack.metrics()
    finally:
        await runner.cleanup()
    assert resp.status == 200 and text.endswith(events[-1].decode() + "data: [DONE]\n\n")
    requests = {labels[1][1]: value for (name, labels), value in metrics.items() if name == "maas_meter_requests_total"}
    assert requests == {str(status): 1}
    assert [(row.prompt_tokens, row.completion_tokens) for row in rows] == ([charged] if charged else [])
    assert metrics[("maas_meter_upstream_errors_total", (("reason", "status_5xx"),))] == (status >= 500)
    assert metrics[("maas_meter_upstream_errors_total", (("reason", "no_usage"),))] == 0
    if charged is None:  # the whole reservation came back
        assert metrics[("maas_meter_commit_tokens_total", (("direction", "refund"),))] > 0


async def test_identity_headers_stop_at_the_meter(redis_url: str) -> None:
    """The identity headers (and a second, unchecked copy of one) went on to the model server: the meter checks the
    first copy only, so anything behind it that read them could be told another identity."""
    seen: list[list[str]] = []

    async def record(request: web.Request) -> web.Response:
        seen.append([name.lower() for name in request.headers])
        if request.path == "/tokenize":
            return web.json_response({"tokens": [1], "count": 1})
        usage = {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
        message = {"role": "assistant", "content": "x"}
        choice = {"index": 0, "message": message, "finish_reason": "stop"}
        return web.json_response(
            {"id": "c", "object": "chat.completion", "model": MODEL, "choices": [choice], "usage": usage}
        )

    app = web.Application()
    app.router.add_route("*", "/tokenize", record)
    app.router.add_route("*", "/v1/chat/completions", record)
    runner, url = await serve(app)
    try:
        async with running_stack(redis_url, upstream=url) as stack, aiohttp.ClientSession() as session:
            headers = [*stack.headers(key_id="hops").items(), ("x-maas-user", "someone-else")]
            for path, body in (("/v1/chat/completions", BODY), ("/tokenize", {"model": MODEL, "prompt": "hi"})):
                async with session.post(stack.meter_url + path, headers=headers, json=body) as resp:
                    assert resp.status == 200, await resp.text()
    finally:
        await runner.cleanup()
    assert len(seen) == 2
    for names in seen:
        assert not [name for name in names if name.startswith("x-maas-")], names
