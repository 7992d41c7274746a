"""The whole chain as real processes: Envoy (ext_authz as Istio configures it) -> ``maas authz`` -> ``maas meter``
-> ``maas sim``, with real Redis and the openai client."""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import http.client
import json
import random
import socket
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from controlplane import envoy
from gateway.contract import Limit, Limits, ledger_day
from gateway.store.redis import RedisStore
from tests.conftest import PEPPER
from tests.support import platform
from tests.support.procs import Proc, RedisServer, free_port, maas_argv, start, wait_http
from tests.support.stack import IDENTITY_SECRET, authz_process, envoy_process
from tests.test_meter_quota import one_request
from tests.test_meter_stack import CHAT

pytestmark = [pytest.mark.redis, pytest.mark.envoy]

PREFIX = "/ext-authz"
MODEL = platform.QWEN
METER_KEY = platform.Key(
    "sk-meter-chain-0001",
    "mia",
    tier="enterprise",
    limits=Limits(requests=Limit(limit=1_000_000, window="1m"), tokens=Limit(limit=1_000_000, window="1d")),
)


@dataclass
class Chain:
    gateway_url: str
    sim_url: str
    meter_ops_url: str
    redis_url: str


def _process(name: str, args: list[str], *, ready: str, log_dir: Any) -> Proc:
    proc = start(name, maas_argv(*args), log_dir=log_dir)
    try:
        wait_http(ready, proc=proc.popen)
    except (RuntimeError, TimeoutError):
        proc.stop()
        raise RuntimeError(f"{name} did not start:\n{proc.log()}") from None
    return proc


@pytest.fixture(scope="module")
def chain(redis_session: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chain]:
    log_dir = tmp_path_factory.mktemp("meter-chain")
    platform.seed_afresh(redis_session.url, PEPPER, keys=(*platform.ALL_KEYS, METER_KEY))
    sim_port, meter_port, meter_ops = free_port(), free_port(), free_port()
    common = ["--host", "127.0.0.1", "--log-format", "text"]
    sim = _process(
        "sim",
        ["sim", "--port", str(sim_port), "--served-model-name", MODEL, "--tokens-per-second", "2000", *common],
        ready=f"http://127.0.0.1:{sim_port}/health",
        log_dir=log_dir,
    )
    meter_args = ["--upstream", f"http://127.0.0.1:{sim_port}", "--redis-url", redis_session.url]
    meter_args += ["--identity-secret", IDENTITY_SECRET, "--port", str(meter_port), "--ops-port", str(meter_ops)]
    meter = _process(
        "meter", ["meter", *meter_args, *common], ready=f"http://127.0.0.1:{meter_ops}/readyz", log_dir=log_dir
    )
    try:
        with authz_process(
            redis_url=redis_session.url, pepper=PEPPER, log_dir=log_dir, args=["--path-prefix", PREFIX]
        ) as authz:
            routes = [envoy.Route("/qwen3", "meter", rewrite="/")]
            clusters = [envoy.Cluster("meter", meter_port)]
            with envoy_process(
                routes=routes, clusters=clusters, authz_port=authz.port, log_dir=log_dir, path_prefix=PREFIX
            ) as gateway:
                yield Chain(
                    gateway.url, f"http://127.0.0.1:{sim_port}", f"http://127.0.0.1:{meter_ops}", redis_session.url
                )
    finally:
        meter.stop()
        sim.stop()
    for proc in (meter, sim):
        assert "Traceback" not in proc.log(), proc.log()


def _strip(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in ("id", "created")}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


async def _answers(client: openai.AsyncOpenAI) -> list[Any]:
    out: list[Any] = []
    chat = await client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=24)  # type: ignore[arg-type]
    out.append(chat.model_dump())
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=CHAT,  # type: ignore[arg-type]
        max_tokens=64,
        stream=True,
        stream_options={"include_usage": True},
    )
    out.append([c.model_dump() async for c in stream])
    plain = await client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=64, stream=True)  # type: ignore[arg-type]
    out.append([c.model_dump() async for c in plain])
    text = await client.completions.create(model=MODEL, prompt="A gateway", max_tokens=12)
    out.append(text.model_dump())
    text_stream = await client.completions.create(model=MODEL, prompt="A gateway", stream=True)
    out.append([c.model_dump() async for c in text_stream])
    emb = await client.embeddings.create(model=MODEL, input="hello")
    out.append(emb.model_dump())
    return out


async def test_openai_client_through_envoy_authz_meter_gets_what_the_simulator_sends(chain: Chain) -> None:
    through = openai.AsyncOpenAI(base_url=chain.gateway_url + "/qwen3/v1", api_key=METER_KEY.plaintext, max_retries=0)
    direct = openai.AsyncOpenAI(base_url=chain.sim_url + "/v1", api_key="unused", max_retries=0)
    async with through, direct:
        via_gateway = await _answers(through)
        straight = await _answers(direct)
        with pytest.raises(openai.AuthenticationError):
            await through.with_options(api_key="sk-wrong").chat.completions.create(model=MODEL, messages=CHAT)  # type: ignore[arg-type]
    assert _strip(via_gateway) == _strip(straight)
    assert via_gateway[1][-1]["usage"] is not None and all(c["usage"] is None for c in via_gateway[2])


def _tokens_total(ops_url: str, key_id: str) -> tuple[float, float]:
    with urllib.request.urlopen(ops_url + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    totals = [0.0, 0.0]
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "maas_tokens_total" and sample.labels["key_id"] == key_id:
                totals[0 if sample.labels["type"] == "prompt" else 1] += sample.value
    return totals[0], totals[1]


async def test_ledger_and_metrics_equal_usage_over_hundreds_of_mixed_requests(chain: Chain) -> None:
    key_id = METER_KEY.key_id(PEPPER)
    store = RedisStore(chain.redis_url, timeout=2.0)
    try:
        before = await store.read_usage(key_id, [ledger_day()])
        await _mixed_requests(chain, store, key_id, before)
    finally:
        await store.close()


async def _mixed_requests(chain: Chain, store: RedisStore, key_id: str, before: list[Any]) -> None:
    base = (before[0].requests, before[0].prompt_tokens, before[0].completion_tokens) if before else (0, 0, 0)
    metrics_before = await asyncio.to_thread(_tokens_total, chain.meter_ops_url, key_id)
    rng = random.Random(11)
    seen = [0, 0, 0]
    gate = asyncio.Semaphore(16)
    async with openai.AsyncOpenAI(
        base_url=chain.gateway_url + "/qwen3/v1", api_key=METER_KEY.plaintext, max_retries=0, timeout=30
    ) as client:

        async def run(kind: int) -> None:
            async with gate:
                prompt, completion = await one_request(client, kind, rng, model=MODEL)
            seen[0] += 1
            seen[1] += prompt
            seen[2] += completion

        await asyncio.gather(*(run(i % 5) for i in range(250)))
    after = await store.read_usage(key_id, [ledger_day()])
    metrics_after = await asyncio.to_thread(_tokens_total, chain.meter_ops_url, key_id)
    assert (after[0].model, after[0].requests - base[0]) == (MODEL, 250)
    assert (after[0].prompt_tokens - base[1], after[0].completion_tokens - base[2]) == (seen[1], seen[2])
    assert (metrics_after[0] - metrics_before[0], metrics_after[1] - metrics_before[1]) == (seen[1], seen[2])
    ready = await asyncio.to_thread(lambda: urllib.request.urlopen(chain.meter_ops_url + "/readyz", timeout=5).read())
    assert json.loads(ready)["status"] == "ready"


def test_an_allowed_response_carries_one_set_of_rate_limit_headers(chain: Chain) -> None:
    """The request bucket's headers come from maas authz (through Envoy), the token bucket's from maas meter after
    its reservation: one of each, never two different ``x-ratelimit-remaining-tokens``."""
    body = json.dumps({"model": MODEL, "messages": CHAT, "max_tokens": 8}).encode()
    request = urllib.request.Request(
        chain.gateway_url + "/qwen3/v1/chat/completions",
        data=body,
        headers={"authorization": f"APIKEY {METER_KEY.plaintext}", "content-type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as resp:
        assert resp.status == 200
        headers = resp.headers
    for dimension in ("requests", "tokens"):
        for part in ("limit", "remaining", "reset"):
            name = f"x-ratelimit-{part}-{dimension}"
            assert len(headers.get_all(name) or []) == 1, (name, headers.items())
    assert headers["x-ratelimit-limit-requests"] == "1000000"
    assert headers["x-ratelimit-limit-tokens"] == "1000000"
    assert int(headers["x-ratelimit-remaining-tokens"]) <= 1_000_000 - 8  # this request's reservation is counted


def test_every_response_carries_one_date_the_client_can_parse(chain: Chain) -> None:
    """The meter stamps its own ``date``; the model server's is not passed on beside it (Envoy had folded the two
    into ``date: <d>,<d>``), on metered answers, streamed ones and pass-through ones alike."""
    auth = {"authorization": f"APIKEY {METER_KEY.plaintext}", "content-type": "application/json"}
    chat = {"model": MODEL, "messages": CHAT, "max_tokens": 2}
    requests = [
        urllib.request.Request(chain.gateway_url + "/qwen3/v1/chat/completions", json.dumps(chat).encode(), auth),
        urllib.request.Request(
            chain.gateway_url + "/qwen3/v1/chat/completions", json.dumps({**chat, "stream": True}).encode(), auth
        ),
        urllib.request.Request(chain.gateway_url + "/qwen3/v1/models", headers=auth),
    ]
    for request in requests:
        with urllib.request.urlopen(request, timeout=10) as resp:
            assert resp.status == 200
            dates = resp.headers.get_all("date") or []
            resp.read()
        assert len(dates) == 1 and "," not in dates[0].split(", ", 1)[1], (request.full_url, dates)
        assert email.utils.parsedate_to_datetime(dates[0]).year >= 2024


def test_dot_segments_are_resolved_before_authz_and_the_meter(chain: Chain) -> None:
    """Envoy resolves dot segments as Istio's default path normalisation does, so the request is checked, routed
    and metered as the path it names (the meter itself refuses a path that still holds them: test_meter_server).
    Before, ``/v1/./chat/completions`` passed the meter as "not metered" and reached the model server unmetered."""
    body = json.dumps({"model": MODEL, "messages": CHAT, "max_tokens": 4}).encode()
    host, _, port = chain.gateway_url.removeprefix("http://").partition(":")
    auth = {"authorization": f"APIKEY {METER_KEY.plaintext}", "content-type": "application/json"}
    for path in ["/qwen3/v1/./chat/completions", "/qwen3/v1/x/../chat/completions", "/qwen3/%2E/v1/chat/completions"]:
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        try:
            conn.request("POST", path, body=body, headers=auth)  # sent as written: no client-side resolution
            resp = conn.getresponse()
            answer = json.loads(resp.read())
        finally:
            conn.close()
        assert resp.status == 200 and answer["usage"]["completion_tokens"] > 0, (path, resp.status, answer)
        assert resp.getheader("x-ratelimit-limit-tokens") == "1000000", (path, resp.getheaders())  # metered


def test_a_body_over_the_limit_gets_its_413_through_envoy(chain: Chain) -> None:
    """The meter refuses a body over --max-body-bytes from its content-length and reads the rest before closing:
    closing at once reset the connection under Envoy, which answered 503 "upstream connect error" instead. (The
    client sends and reads at once: Envoy itself closes on the client once it has answered.)"""
    body = json.dumps({"model": MODEL, "prompt": "x" * (9 << 20)}).encode()
    head = (
        f"POST /qwen3/v1/completions HTTP/1.1\r\nhost: gateway\r\nauthorization: APIKEY {METER_KEY.plaintext}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
    ).encode()
    host, _, port = chain.gateway_url.removeprefix("http://").partition(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sender = threading.Thread(target=_send, args=(sock, head + body))
        sender.start()
        received = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                received += chunk
        sender.join(30)
    head_part, _, rest = received.partition(b"\r\n\r\n")
    assert head_part.startswith(b"HTTP/1.1 413"), received[:300]
    assert json.loads(rest)["error"]["code"] == "request_too_large"


def _send(sock: socket.socket, data: bytes) -> None:
    with contextlib.suppress(OSError):  # Envoy closes on us once it has answered
        sock.sendall(data)
