"""Reconciliation of the meter's accounts under faults: a seeded pseudo-random mix of requests (the openai client
and raw HTTP; chat, completions and embeddings; streaming and not; ``n`` > 1; clients that leave; upstream errors
before the head and mid-stream; requests refused for quota) goes through the in-process meter, on real Redis, to a
fake vLLM that records, per request, every byte of usage it generated and wrote. Meanwhile Redis is paused past the
store timeout (SIGSTOP/SIGCONT) and restarted on its port (its data kept, or lost), and the upstream is killed and
started again. Once the meter has drained (no request in flight, no ledger row held, ``/readyz`` ready), per key:

- the usage ledger, as the product reads it, equals the sum over the requests of what the rules below charge, from
  what the fake upstream wrote (with Redis's data lost: less what the ledger held at the moment of the loss);
- ``maas_tokens_total`` equals the same sum;
- the token bucket holds the key's limit less what was charged: every reservation was settled (with the data lost,
  a bucket that starts again full may only hold more).

"Charge what vLLM reported" holds for a complete answer (its body's ``usage``, or a stream's final usage chunk).
Where the product's rule is deliberately another, the test checks that rule instead:

- a stream the client left: the usage of the last chunk written to it (the fake stops sending until the client is
  gone, so that is every chunk the fake wrote);
- a stream the upstream broke (closed mid-stream, or killed): the usage of what was sent, the last chunk's;
- a stream vLLM ended with an error event: the usage reported before it, nothing when none was;
- an answer that reports no usage at all: its bound, the prompt estimate plus every choice's ``max_tokens`` as sent;
- an upstream error status, a connection closed before the head, an upstream that is down, a client gone before
  a whole (non-streamed) answer, a request refused (429): nothing;
- a request is a ledger row's ``requests`` only when it served tokens.

The run is deterministic for a seed (``MAAS_RECONCILE_SEED``; the request mix and the moments of the faults, as
request numbers): a failure names the seed it ran with.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import openai
import pytest
import redis as sync_redis
import redis.asyncio as aioredis
from aiohttp import web

from gateway.contract import bucket_key, ledger_day, ledger_key
from gateway.identity import Identity, sign
from gateway.meter.app import build_meter, serving
from gateway.meter.estimate import Estimator
from gateway.meter.settings import MeterSettings
from gateway.settings import load
from gateway.sim import api, engine
from gateway.sim.engine import SimRequestError, error_body
from gateway.store.redis import RedisStore
from tests.support.procs import free_port, redis_server

pytestmark = pytest.mark.redis

SEED = int(os.environ.get("MAAS_RECONCILE_SEED", "1729"))
SECRET = "identity-secret-for-tests-0123456789"
MODEL = "sim-model"
YEAR_MS = 365 * 86_400_000
KEYS: dict[str, int | None] = {"k-open": None, "k-big": 5_000_000, "k-mid": 60_000, "k-tight": 400}
"""Key -> token limit over a year (None: no token limit). The year makes the refill during a run a token or two."""
REQUESTS = 240
STORE_TIMEOUT = 0.25
H_RID, H_FAULT = "x-test-rid", "x-test-fault"


# --- the fake vLLM --------------------------------------------------------------------------------------------


@dataclass
class Attempt:
    """What the fake upstream wrote for one request it received."""

    kind: str
    stream: bool
    n: int
    head: bool = False
    body_done: bool = False
    """A whole non-streamed body, or a stream's ``[DONE]``."""
    reported: tuple[int, int] | None = None
    """The usage of the answer: the body's, or the stream's final usage chunk."""
    per_choice: dict[int, tuple[int, int]] = field(default_factory=dict)
    """Stream: per choice, the continuous usage of the last chunk written (prompt, completion so far)."""
    error_event: bool = False
    max_tokens: int | None = None
    """The per-choice completion limit the request arrived with."""

    def streamed(self) -> tuple[int, int]:
        """The usage of what was written, as the meter's stream tracker counts it (each prompt once)."""
        prompts: dict[int, int] = {}
        for index, (prompt, _) in self.per_choice.items():
            prompts[index // self.n] = max(prompts.get(index // self.n, 0), prompt)
        return sum(prompts.values()), sum(c for _, c in self.per_choice.values())


class FakeVllm:
    """vLLM's answers from the simulator's model, paced, on a fixed port that can be killed and opened again. A
    request's ``x-test-fault`` header picks how it ends; every write is recorded per ``x-test-rid``."""

    def __init__(self) -> None:
        self.port = free_port()
        self.attempts: dict[str, list[Attempt]] = defaultdict(list)
        self.arrived: dict[str, asyncio.Event] = defaultdict(asyncio.Event)
        self._transports: set[Any] = set()
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self.outage = asyncio.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._generate)
        app.router.add_post("/v1/completions", self._generate)
        app.router.add_post("/v1/embeddings", self._embeddings)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._ok)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.1)
        await self._runner.setup()
        for attempt in range(100):  # the killed listener's port may take a moment to come free
            self._site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
            try:
                await self._site.start()
                return
            except OSError:
                if attempt == 99:
                    raise
                await asyncio.sleep(0.02)

    async def kill(self) -> None:
        """As a killed process: the port closes and every connection with it (what was written still arrives)."""
        if self._runner is None:
            return
        for transport in list(self._transports):
            transport.close()
        await self._runner.cleanup()
        self._runner = None

    async def _ok(self, request: web.Request) -> web.Response:
        return web.Response(text="")

    async def _models(self, request: web.Request) -> web.Response:
        return web.Response(
            text=api.models_response((MODEL,), max_model_len=6144, created=0), content_type="application/json"
        )

    def _begin(self, request: web.Request, attempt: Attempt) -> tuple[str, str]:
        rid = request.headers.get(H_RID, "")
        self.attempts[rid].append(attempt)
        self.arrived[rid].set()
        self._transports.add(request.transport)
        return rid, request.headers.get(H_FAULT, "ok")

    async def _embeddings(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        attempt = Attempt(kind="embeddings", stream=False, n=1)
        _, fault = self._begin(request, attempt)
        try:
            early = await self._fail_early(request, fault, attempt)
            if early is not None:
                return early
            text = api.embeddings_response(body, served=(MODEL,), max_model_len=6144, dimensions=8)
            if fault == "nousage":
                text = json.dumps({k: v for k, v in json.loads(text).items() if k != "usage"})
            response = await _whole(request, text)
            attempt.head = attempt.body_done = True
            usage = json.loads(text).get("usage")
            attempt.reported = (usage["prompt_tokens"], 0) if usage else None
            return response
        except ConnectionResetError:  # killed
            return web.Response(status=499)
        finally:
            self._transports.discard(request.transport)

    async def _fail_early(self, request: web.Request, fault: str, attempt: Attempt) -> web.StreamResponse | None:
        """The faults that end a request before its head: an error status, a dropped connection, a client that
        leaves before a non-streamed answer (the fake waits for it to go)."""
        if fault == "status500":
            attempt.head = True
            return web.Response(status=500, text=error_body("boom", status=500), content_type="application/json")
        if fault == "drop" or (fault == "hang" and not attempt.stream):
            if fault == "drop" and request.transport is not None:
                request.transport.close()
            await _until_gone(request)
            return web.Response(status=499)
        return None

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        chat = request.path.endswith("chat/completions")
        try:
            job = (api.parse_chat if chat else api.parse_completion)(body, served=(MODEL,), max_model_len=6144)
        except SimRequestError as exc:
            return web.Response(
                status=exc.status, text=error_body(str(exc), status=exc.status), content_type="application/json"
            )
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        attempt = Attempt(kind=job.kind, stream=job.stream, n=engine.int_param(body, "n") or 1, max_tokens=limit)
        _, fault = self._begin(request, attempt)
        try:
            early = await self._fail_early(request, fault, attempt)
            if early is not None:
                return early
            if fault == "nousage":
                job.include_usage = job.continuous = False
            if not job.stream:
                text = api.full_response(job)
                if fault == "nousage":
                    text = json.dumps({k: v for k, v in json.loads(text).items() if k != "usage"})
                await asyncio.sleep(0.002 * job.steps)
                response = await _whole(request, text)
                attempt.head = attempt.body_done = True
                if fault != "nousage":
                    attempt.reported = (job.prompt_tokens, job.completion_tokens)
                return response
            return await self._stream(request, job, fault, attempt)
        except ConnectionResetError:  # killed
            return web.Response(status=499)
        finally:
            self._transports.discard(request.transport)

    async def _stream(self, request: web.Request, job: api.Job, fault: str, attempt: Attempt) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-type": "text/event-stream; charset=utf-8"})
        await response.prepare(request)
        attempt.head = True
        name, _, arg = fault.partition(":")
        cut = int(arg) if arg else -1
        try:
            for step, data in enumerate(api.stream_steps(job)):
                if step == cut and name in ("hang", "break", "error"):
                    await self._end_early(request, response, name, attempt)
                    return response
                await asyncio.sleep(0.004)
                await response.write(data.encode())
                self._wrote(attempt, job, step)
        except ConnectionResetError:
            return response
        return response

    async def _end_early(self, request: web.Request, response: web.StreamResponse, name: str, attempt: Attempt) -> None:
        if name == "hang":  # the client leaves after what it was sent: wait for it
            await _until_gone(request)
        elif name == "break":
            assert request.transport is not None
            request.transport.close()
        else:
            event = json.dumps({"error": {"message": "engine died", "type": "InternalServerError", "code": 500}})
            await response.write(f"data: {event}\n\ndata: [DONE]\n\n".encode())
            attempt.error_event = attempt.body_done = True

    @staticmethod
    def _wrote(attempt: Attempt, job: api.Job, step: int) -> None:
        if step >= job.steps:  # the final usage chunk (if asked for) and [DONE]
            attempt.body_done = True
            if job.include_usage:
                attempt.reported = (job.prompt_tokens, job.completion_tokens)
            return
        if not job.continuous:
            return
        for c in job.choices:
            done = min(step + 1, len(c.generation.tokens))
            attempt.per_choice[c.index] = (c.prompt, done)


async def _whole(request: web.Request, text: str) -> web.StreamResponse:
    """A whole JSON answer, written before the handler returns (so a kill cannot fall between the record and it)."""
    response = web.StreamResponse(headers={"content-type": "application/json"})
    response.content_length = len(text.encode())
    await response.prepare(request)
    await response.write(text.encode())
    await response.write_eof()
    return response


async def _until_gone(request: web.Request) -> None:
    while True:
        if request.transport is None or request.transport.is_closing():
            return
        await asyncio.sleep(0.01)


# --- the requests ---------------------------------------------------------------------------------------------


@dataclass
class Planned:
    rid: str
    key: str
    path: str
    body: dict[str, Any]
    fault: str
    client: str
    """``openai`` or ``raw``."""

    @property
    def kind(self) -> str:
        return {"/v1/chat/completions": "chat", "/v1/completions": "completion"}.get(self.path, "embeddings")


def plan(rng: random.Random) -> list[Planned]:
    out = []
    for i in range(REQUESTS):
        key = rng.choice(list(KEYS))
        path = rng.choice(["/v1/chat/completions"] * 3 + ["/v1/completions"] * 2 + ["/v1/embeddings"])
        words = " ".join(
            rng.choice(["token", "bucket", "ledger", "stream", "quota"]) for _ in range(rng.randint(1, 12))
        )
        body: dict[str, Any] = {"model": MODEL}
        if path == "/v1/embeddings":
            body["input"] = words if rng.random() < 0.5 else [words, "second input"]
            fault = rng.choice(["ok"] * 8 + ["status500", "drop", "nousage"])
            out.append(Planned(f"r{i}", key, path, body, fault, rng.choice(["openai", "raw"])))
            continue
        if path == "/v1/chat/completions":
            body["messages"] = [{"role": "user", "content": words}]
        else:
            body["prompt"] = words if rng.random() < 0.7 else [words, "once upon a time"]
        body["stream"] = rng.random() < 0.6
        if rng.random() < 0.25:
            body["n"] = rng.choice([2, 3])
        max_tokens = rng.choice([None, 6, 20, 40])
        fault = rng.choice(["ok"] * 10 + ["status500", "drop", "nousage", "hang", "break", "error"])
        if fault in ("hang", "break", "error") and body["stream"]:
            # (a client left with nothing sent: the meter sends the head with the first event, so it never has it)
            fault = f"{fault}:{rng.randint(1 if fault == 'hang' else 0, 4)}"
            max_tokens = 30
            body["ignore_eos"] = True  # so the stream is longer than the cut
        if fault == "nousage" and max_tokens is None:
            max_tokens = 12  # a bound that is the request's own, not the meter's default
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        if body["stream"] and rng.random() < 0.5:
            body["stream_options"] = {"include_usage": True, "continuous_usage_stats": rng.random() < 0.3}
        if fault.startswith("hang") and key == "k-tight":
            key = "k-big"  # not clamped below the cut
        client = "raw" if fault.startswith("hang") or rng.random() < 0.4 else "openai"
        out.append(Planned(f"r{i}", key, path, body, fault, client))
    return out


def headers_of(key: str, rid: str, fault: str) -> dict[str, str]:
    limit = KEYS[key]
    identity = Identity(
        key_id=key,
        user=f"user-{key}",
        groups="premium",
        tier="premium",
        model=MODEL,
        token_limit=limit,
        token_window_ms=YEAR_MS if limit else None,
    )
    return {**sign(identity, SECRET.encode()), H_RID: rid, H_FAULT: fault}


async def send_raw(session: aiohttp.ClientSession, url: str, p: Planned, fake: FakeVllm) -> int:
    """One request over raw HTTP; a ``hang`` client leaves once it has every token the fake sent before stopping
    (a stream), or once the fake has the request (a whole answer)."""
    headers = headers_of(p.key, p.rid, p.fault)
    if p.fault == "hang" or (p.fault.startswith("hang") and not p.body.get("stream")):
        request = asyncio.ensure_future(session.post(url + p.path, json=p.body, headers=headers))
        arrived = asyncio.ensure_future(fake.arrived[p.rid].wait())
        await asyncio.wait([request, arrived], return_when=asyncio.FIRST_COMPLETED)
        if request.done():  # refused before it got upstream
            arrived.cancel()
            resp = request.result()
            await resp.read()
            return resp.status
        request.cancel()
        with contextlib.suppress(asyncio.CancelledError, aiohttp.ClientError):
            await request
        return 499
    async with session.post(url + p.path, json=p.body, headers=headers) as resp:
        if not p.fault.startswith("hang") or resp.status != 200:
            await resp.read()
            return resp.status
        want = (
            int(p.fault.split(":")[1]) * (p.body.get("n") or 1) * (2 if isinstance(p.body.get("prompt"), list) else 1)
        )
        got = 0
        while got < want:
            line = await resp.content.readline()
            if not line:
                break
            got += _tokens_in(line)
        resp.close()  # gone, mid-stream
        return 499


def _tokens_in(line: bytes) -> int:
    if not line.startswith(b"data: {"):
        return 0
    chunk = json.loads(line[6:])
    return sum(1 for c in chunk.get("choices", []) if (c.get("delta", {}).get("content") or c.get("text")))


async def send_openai(client: openai.AsyncOpenAI, p: Planned) -> int:
    extra = {"extra_headers": headers_of(p.key, p.rid, p.fault)}
    body = {k: v for k, v in p.body.items() if k not in ("ignore_eos",)}
    if "ignore_eos" in p.body:
        extra["extra_body"] = {"ignore_eos": True}
    try:
        if p.kind == "embeddings":
            await client.embeddings.create(**body, **extra)
        elif p.kind == "chat":
            answer = await client.chat.completions.create(**body, **extra)
            if body.get("stream"):
                async for _ in answer:
                    pass
        else:
            answer = await client.completions.create(**body, **extra)
            if body.get("stream"):
                async for _ in answer:
                    pass
    except openai.APIStatusError as exc:
        return exc.status_code
    except openai.APIError:
        return 200  # an error event in a stream
    return 200


# --- the stack and the faults ---------------------------------------------------------------------------------


class Redis:
    """The real redis-server on a fixed port, restarted with its data (SHUTDOWN SAVE) or without (SIGKILL)."""

    def __init__(self, stack: contextlib.ExitStack) -> None:
        self.server = stack.enter_context(redis_server())
        self.url = self.server.url
        self.lost: dict[str, tuple[int, int, int]] = {}
        """Per key, the ledger the data loss took."""

    def _client(self) -> sync_redis.Redis:
        return sync_redis.Redis(port=self.server.port, socket_timeout=5)

    def restart(self, *, keep: bool, down: float) -> None:
        client = self._client()
        if keep:
            with contextlib.suppress(sync_redis.ConnectionError):
                client.shutdown(save=True)
            self.server.proc.popen.wait(10)
        else:
            client.client_pause(10_000, all=False)  # writes wait: what the ledger holds is what is lost
            self.lost = _ledger_now(client)
            self.server.kill()
            (self.server.data_dir / "dump.rdb").unlink(missing_ok=True)
        client.close()
        time.sleep(down)
        self.server.restart()

    def pause(self, seconds: float) -> None:
        self.server.proc.popen.send_signal(signal.SIGSTOP)
        time.sleep(seconds)
        self.server.proc.popen.send_signal(signal.SIGCONT)


def _ledger_now(client: sync_redis.Redis) -> dict[str, tuple[int, int, int]]:
    out = {}
    for key in KEYS:
        fields = client.hgetall(ledger_key(key, ledger_day()))
        counts = [0, 0, 0]
        for name, value in fields.items():
            slot = {"requests": 0, "prompt": 1, "completion": 2}[name.decode().rpartition("|")[2]]
            counts[slot] += int(value)
        out[key] = (counts[0], counts[1], counts[2])
    return out


@dataclass
class Meter:
    url: str
    ops: str

    async def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        from prometheus_client.parser import text_string_to_metric_families

        async with aiohttp.ClientSession() as session, session.get(self.ops + "/metrics") as resp:
            text = await resp.text()
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    async def drained(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """The metrics once nothing is in flight, no ledger row is held and /readyz says the store answers."""
        deadline = time.monotonic() + 20
        while True:
            metrics = await self.metrics()
            busy = metrics[("maas_meter_requests_in_flight", ())] or metrics[("maas_meter_ledger_backlog_rows", ())]
            async with aiohttp.ClientSession() as session, session.get(self.ops + "/readyz") as resp:
                ready = resp.status == 200 and (await resp.json())["store"] == "ok"
            if not busy and ready:
                return metrics
            assert time.monotonic() < deadline, f"meter not drained: {busy=} {ready=}"
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def running(redis_url: str, fake: FakeVllm) -> AsyncIterator[Meter]:
    settings = load(
        MeterSettings, upstream=fake.url, redis_url=redis_url, identity_secret=SECRET, store_timeout=STORE_TIMEOUT
    )
    built = build_meter(settings, store=RedisStore(redis_url, timeout=STORE_TIMEOUT))
    async with serving(built, host="127.0.0.1", port=0, ops_port=0, max_connections=1000, shutdown_grace=1.0) as ports:
        yield Meter(f"http://127.0.0.1:{ports.proxy}", f"http://127.0.0.1:{ports.ops}")


def faults(rng: random.Random, *, keep: bool) -> dict[int, Callable[[Redis, FakeVllm], Any]]:
    """Request number -> the fault started as that request is sent."""
    at = rng.sample(range(20, REQUESTS - 40), 5)
    pause = rng.uniform(0.4, 0.8)  # past the store timeout
    down = rng.uniform(0.2, 0.6)
    return {
        at[0]: lambda r, f: asyncio.to_thread(r.pause, pause),
        at[1]: lambda r, f: asyncio.to_thread(r.restart, keep=keep, down=down),
        at[2]: lambda r, f: _upstream_outage(f, down),
        at[3]: lambda r, f: asyncio.to_thread(r.pause, pause / 2),
        at[4]: lambda r, f: _upstream_outage(f, down / 2),
    }


async def _upstream_outage(fake: FakeVllm, down: float) -> None:
    async with fake.outage:  # one at a time: an outage begun while another was down had bound a second listener
        await fake.kill()
        await asyncio.sleep(down)
        await fake.start()


# --- what the rules charge ------------------------------------------------------------------------------------


def charge(p: Planned, attempt: Attempt) -> tuple[int, int]:
    """What the product's rules charge for what the fake wrote (module docstring)."""
    if not attempt.head:
        return 0, 0
    if attempt.stream and not attempt.body_done:
        return attempt.streamed()  # left by its client, or broken: what was sent
    if attempt.error_event:
        return attempt.streamed()
    if attempt.reported is not None:
        return attempt.reported
    if attempt.body_done and p.fault == "nousage":
        return bound(p, attempt)
    return 0, 0  # an error status


def bound(p: Planned, attempt: Attempt) -> tuple[int, int]:
    prompt = Estimator().prompt_tokens(p.kind, p.body)  # type: ignore[arg-type]
    if p.kind == "embeddings":
        return prompt, 0
    prompts = len(p.body["prompt"]) if isinstance(p.body.get("prompt"), list) else 1
    assert attempt.max_tokens is not None
    return prompt, (p.body.get("n") or 1) * prompts * attempt.max_tokens


def expected_ledger(planned: list[Planned], fake: FakeVllm) -> dict[str, tuple[int, int, int]]:
    out = {key: [0, 0, 0] for key in KEYS}
    for p in planned:
        for attempt in fake.attempts.get(p.rid, []):
            prompt, completion = charge(p, attempt)
            if prompt + completion:
                row = out[p.key]
                row[0] += 1
                row[1] += prompt
                row[2] += completion
    return {key: (r[0], r[1], r[2]) for key, r in out.items()}


# --- the test -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("keep", [pytest.param(True, id="redis-data-kept"), pytest.param(False, id="redis-data-lost")])
async def test_the_accounts_reconcile_under_faults(keep: bool) -> None:
    try:
        await reconcile(keep=keep, seed=SEED)
    except BaseException:
        print(f"\ntest_meter_reconcile failed with MAAS_RECONCILE_SEED={SEED}")
        raise


async def reconcile(*, keep: bool, seed: int) -> None:
    rng = random.Random(f"{seed}-{keep}")
    planned = plan(rng)
    scheduled = faults(rng, keep=keep)
    fake = FakeVllm()
    await fake.start()
    statuses: dict[str, int] = {}
    with contextlib.ExitStack() as stack:
        redis = Redis(stack)
        try:
            async with (
                running(redis.url, fake) as meter,
                aiohttp.ClientSession() as session,
                openai.AsyncOpenAI(base_url=meter.url + "/v1", api_key="unused", max_retries=0, timeout=20) as client,
            ):
                gate = asyncio.Semaphore(12)
                background: list[asyncio.Task[Any]] = []

                async def one(p: Planned) -> None:
                    async with gate:
                        if p.client == "raw":
                            statuses[p.rid] = await send_raw(session, meter.url, p, fake)
                        else:
                            statuses[p.rid] = await send_openai(client, p)

                jobs = []
                for i, p in enumerate(planned):
                    if i in scheduled:
                        background.append(asyncio.ensure_future(scheduled[i](redis, fake)))
                    jobs.append(asyncio.ensure_future(one(p)))
                    await asyncio.sleep(0.01 if i % 4 else 0)
                await asyncio.gather(*background)
                await asyncio.gather(*jobs)
                metrics = await meter.drained()
                store = RedisStore(redis.url, timeout=2.0)
                ledger = {
                    key: [
                        (r.requests, r.prompt_tokens, r.completion_tokens)
                        for r in await store.read_usage(key, [ledger_day()])
                    ]
                    for key in KEYS
                }
                buckets = await _levels(redis.url)
                await store.close()
        finally:
            await fake.kill()
    problems = discrepancies(planned, fake, keep=keep, lost=redis.lost, ledger=ledger, metrics=metrics, buckets=buckets)
    assert not problems, f"seed {seed}:\n" + "\n".join(problems)
    refused = [rid for rid, status in statuses.items() if status == 429]
    # every reservation the bucket denied was a 429 that never went upstream (how many, the faults' timing decides:
    # a seed whose Redis outage covers most requests forwards them without a reservation)
    denied = metrics[("maas_meter_reservations_total", (("outcome", "denied"),))]
    assert len(refused) == denied and all(not fake.attempts.get(rid) for rid in refused)


def discrepancies(
    planned: list[Planned],
    fake: FakeVllm,
    *,
    keep: bool,
    lost: dict[str, tuple[int, int, int]],
    ledger: dict[str, list[tuple[int, int, int]]],
    metrics: dict[tuple[str, tuple[tuple[str, str], ...]], float],
    buckets: dict[str, float],
) -> list[str]:
    """Every way the accounts differ from what the rules charge, per key."""
    problems = []
    want = expected_ledger(planned, fake)
    for key, (requests, prompt, completion) in want.items():
        was = lost.get(key, (0, 0, 0))
        now = (requests - was[0], prompt - was[1], completion - was[2])
        got = ledger[key][0] if ledger[key] else (0, 0, 0)
        # a write whose answer was lost with the data is made again on the new data (its marker was lost too): it
        # may bring back what the loss took, never more than was charged
        if (
            got != now
            if keep
            else not all(n <= g <= c for n, g, c in zip(now, got, (requests, prompt, completion), strict=True))
        ):
            problems.append(
                f"ledger of {key}: {got} (requests, prompt, completion), charged {now} (lost with the data: {was})"
            )
        tokens = (
            metrics.get(("maas_tokens_total", _labels(key, "prompt")), 0.0),
            metrics.get(("maas_tokens_total", _labels(key, "completion")), 0.0),
        )
        if tokens != (prompt, completion):
            problems.append(f"maas_tokens_total of {key}: {tokens}, charged {(prompt, completion)}")
        limit = KEYS[key]
        if limit is None:
            continue
        left = limit - prompt - completion
        high = left + 3 if keep else limit  # (a token or two of refill; with the data lost the bucket began again full)
        if not left <= buckets[key] <= high:
            problems.append(
                f"bucket of {key}: {buckets[key]:.1f} tokens, {left} expected ({limit} less {limit - left} charged)"
            )
    return problems


def _labels(key: str, kind: str) -> tuple[tuple[str, str], ...]:
    return tuple(
        sorted({"key_id": key, "user": f"user-{key}", "tier": "premium", "model": MODEL, "type": kind}.items())
    )


async def _levels(url: str) -> dict[str, float]:
    """Each limited key's token bucket now (a missing state is a full bucket), refilled to now as the script does."""
    client = aioredis.Redis.from_url(url)
    now_s, now_us = await client.time()
    now = now_s * 1000 + now_us // 1000
    out = {}
    for key, limit in KEYS.items():
        if limit is None:
            continue
        state = await client.get(bucket_key(key, "tokens"))
        if state is None:
            out[key] = float(limit)
            continue
        tokens, ts = (float(x) for x in state.split())
        out[key] = min(limit, tokens + max(0, now - ts) * limit / YEAR_MS)
    await client.aclose()
    return out
