"""The meter in front of the simulator, both in-process on real ports, with real Redis and the openai client:
responses through the meter are what the simulator sends directly (modulo ids and timestamps).

Also the harness the other meter test modules use (``running_stack``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from gateway.identity import Identity, sign
from gateway.meter.app import build_meter, serving
from gateway.meter.proxy import Meter
from gateway.meter.settings import MeterSettings
from gateway.settings import load
from gateway.sim.server import SimConfig, build_app
from gateway.store.redis import RedisStore
from tests.support.k8s_emulator import eventually

SECRET = "identity-secret-for-tests-0123456789"
MODEL = "sim-model"
pytestmark = pytest.mark.redis


async def serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}"


@dataclass
class Stack:
    sim_url: str
    meter_url: str
    ops_url: str
    store: RedisStore
    sim_app: web.Application
    meter: Meter

    def headers(
        self,
        *,
        key_id: str = "key1",
        limit: tuple[int, int] | None = None,
        model: str = MODEL,
        now: float | None = None,
    ) -> dict[str, str]:
        identity = Identity(
            key_id=key_id,
            user=f"user-{key_id}",
            groups="premium",
            tier="premium",
            model=model,
            token_limit=limit[0] if limit else None,
            token_window_ms=limit[1] if limit else None,
        )
        return sign(identity, SECRET.encode(), now=now)

    def client(self, *, direct: bool = False, **headers: Any) -> openai.AsyncOpenAI:
        base = self.sim_url if direct else self.meter_url
        return openai.AsyncOpenAI(
            base_url=base + "/v1", api_key="unused", max_retries=0, timeout=30, default_headers=self.headers(**headers)
        )

    async def metrics(self, url: str | None = None) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        async with aiohttp.ClientSession() as session, session.get((url or self.ops_url) + "/metrics") as resp:
            text = await resp.text()
        out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return out


@contextlib.asynccontextmanager
async def running_stack(
    redis_url: str,
    *,
    sim: SimConfig | None = None,
    store: RedisStore | None = None,
    redis_timeout: float = 2.0,
    **meter: Any,
) -> AsyncIterator[Stack]:
    """Simulator and meter (proxy and ops apps) on free ports of this event loop, the meter on real Redis (through
    ``store`` when given; else each of its calls bounded by ``redis_timeout``)."""
    sim_app = build_app(sim or SimConfig(served=(MODEL, "other-model")))
    sim_runner, sim_url = await serve(sim_app)
    settings = load(
        MeterSettings, upstream=meter.pop("upstream", sim_url), redis_url=redis_url, identity_secret=SECRET, **meter
    )
    store = store or RedisStore(redis_url, timeout=redis_timeout)
    built = build_meter(settings, store=store)
    try:
        async with serving(
            built,
            host="127.0.0.1",
            port=0,
            ops_port=0,
            max_connections=settings.max_connections,
            shutdown_grace=1.0,
        ) as ports:
            base = "http://127.0.0.1:"
            yield Stack(sim_url, f"{base}{ports.proxy}", f"{base}{ports.ops}", store, sim_app, built)
    finally:
        await sim_runner.cleanup()


_VOLATILE = re.compile(rb'"(id|created)":("[^"]*"|\d+)')


def normalise(raw: bytes) -> bytes:
    return _VOLATILE.sub(rb'"\1":"_"', raw)


async def raw_post(url: str, body: dict[str, Any], headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, json=body, headers=headers) as resp,
    ):
        return resp.status, dict(resp.headers), await resp.read()


CHAT = [{"role": "user", "content": "What does a token bucket do?"}]
RAW_CASES = [
    pytest.param("/v1/chat/completions", {"messages": CHAT, "max_tokens": 12}, id="chat"),
    pytest.param("/v1/chat/completions", {"messages": CHAT, "stream": True}, id="chat-stream"),
    pytest.param(
        "/v1/chat/completions",
        {"messages": CHAT, "stream": True, "n": 2, "stream_options": {"include_usage": True}},
        id="chat-stream-usage-n2",
    ),
    pytest.param(
        "/v1/chat/completions",
        {"messages": CHAT, "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}},
        id="chat-stream-continuous",
    ),
    pytest.param(
        "/v1/completions", {"prompt": "Once upon a time", "max_tokens": 20, "stream": True}, id="completion-stream"
    ),
    pytest.param(
        "/v1/completions",
        {"prompt": ["a", "b"], "stream": True, "stream_options": {"include_usage": True}},
        id="completion-batch-stream-usage",
    ),
    pytest.param("/v1/completions", {"prompt": [1, 2, 3], "max_tokens": 5}, id="completion-token-ids"),
    pytest.param("/v1/embeddings", {"input": ["hello", "world"]}, id="embeddings"),
    pytest.param("/v1/chat/completions", {"messages": CHAT, "max_tokens": 9000}, id="vllm-error-context"),
]


@pytest.mark.parametrize(("path", "body"), RAW_CASES)
@pytest.mark.parametrize("limited", [False, True], ids=["no-token-limit", "token-limit"])
async def test_meter_sends_the_bytes_the_simulator_sends(
    redis_url: str, path: str, body: dict[str, Any], limited: bool
) -> None:
    async with running_stack(redis_url) as stack:
        headers = stack.headers(limit=(1_000_000, 60_000) if limited else None)
        direct = await raw_post(stack.sim_url + path, {"model": MODEL, **body}, headers)
        metered = await raw_post(stack.meter_url + path, {"model": MODEL, **body}, headers)
    assert metered[0] == direct[0]
    if direct[0] == 200:
        assert normalise(metered[2]) == normalise(direct[2])
        assert metered[1]["Content-Type"] == direct[1]["Content-Type"]
    else:
        error = json.loads(metered[2])["error"]
        assert error["message"] == json.loads(direct[2])["error"]["message"] and error["code"] == "bad_request"


def _strip(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in ("id", "created")}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


async def test_openai_client_sees_the_same_answers_through_the_meter(redis_url: str) -> None:
    async with running_stack(redis_url) as stack:
        seen: list[list[Any]] = []
        for direct in (True, False):
            async with stack.client(direct=direct, limit=(100_000, 60_000)) as client:
                answers: list[Any] = []
                chat = await client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=20)  # type: ignore[arg-type]
                answers.append(chat.model_dump())
                stream = await client.chat.completions.create(
                    model=MODEL,
                    messages=CHAT,
                    stream=True,
                    stream_options={"include_usage": True},  # type: ignore[arg-type]
                )
                answers.append([chunk.model_dump() async for chunk in stream])
                text = await client.completions.create(model=MODEL, prompt="The gateway", max_tokens=30)
                answers.append(text.model_dump())
                text_stream = await client.completions.create(model=MODEL, prompt="The gateway", stream=True)
                answers.append([chunk.model_dump() async for chunk in text_stream])
                emb = await client.embeddings.create(model=MODEL, input=["one", "two"])
                answers.append(emb.model_dump())
                seen.append(answers)
    assert _strip(seen[0]) == _strip(seen[1])
    assert seen[1][1][-1]["usage"]["completion_tokens"] > 0 and seen[1][1][-1]["choices"] == []


async def test_other_paths_pass_through_untouched(redis_url: str) -> None:
    async with running_stack(redis_url) as stack, aiohttp.ClientSession() as session:
        for path in ("/v1/models", "/health", "/metrics", "/nope"):
            async with session.get(stack.sim_url + path) as direct, session.get(stack.meter_url + path) as metered:
                assert metered.status == direct.status
                if path == "/v1/models":
                    assert await metered.read() == await direct.read()
        async with session.get(stack.ops_url + "/readyz") as ready:
            assert ready.status == 200 and (await ready.json())["status"] == "ready"


async def test_the_ops_port_answers_while_the_proxy_port_is_at_its_connection_cap(redis_url: str) -> None:
    """Connections held idle on the proxy port had no bound but the descriptors: once those were gone, the kubelet's
    probes and Prometheus could not reach the ops port either."""
    async with running_stack(redis_url, max_connections=2) as stack:
        port = int(stack.meter_url.rsplit(":", 1)[1])
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
        try:
            await eventually(lambda: _metric(stack, "maas_meter_client_connections", 2))  # both accepted and counted
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /health HTTP/1.1\r\nHost: meter\r\n\r\n")
            async with asyncio.timeout(5):
                refused = await reader.read()
            writer.close()
            assert refused.startswith(b"HTTP/1.1 503") and b"too_many_connections" in refused
            async with aiohttp.ClientSession() as session:
                for path in ("/healthz", "/readyz"):
                    async with session.get(stack.ops_url + path) as response:
                        assert response.status == 200, path
            metrics = await stack.metrics()
            assert metrics[("maas_meter_client_connections_refused_total", ())] == 1
        finally:
            for _, held_writer in held:
                held_writer.close()
        await eventually(lambda: _metric(stack, "maas_meter_client_connections", 0))


async def _metric(stack: Stack, name: str, value: float) -> bool:
    return (await stack.metrics())[(name, ())] == value
