"""Metering and quotas through the meter with real Redis and the openai client: the ledger and the metrics equal
the usage the clients saw, concurrent streams never overshoot a token bucket, early disconnects are charged what
was sent, upstream errors refund."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import signal
import time
from collections.abc import Sequence
from typing import Any

import httpx2
import openai
import pytest
import redis.asyncio as aioredis

from gateway.contract import bucket_key, ledger_day
from gateway.errors import StoreNotSent
from gateway.limits import BucketOp
from gateway.meter import quota
from gateway.meter.estimate import Estimator
from gateway.sim import engine
from gateway.sim.server import SimConfig
from gateway.store.base import UsageDelta
from gateway.store.redis import RedisStore
from tests.support.k8s_emulator import eventually
from tests.support.procs import free_port, redis_server
from tests.test_meter_stack import MODEL, Stack, raw_post, running_stack

pytestmark = pytest.mark.redis


async def wait_until_settled(stack: Stack, *, sim_aborted: float | None = None) -> dict[Any, float]:
    """Metrics once no metered request is in flight (and the simulator counted ``sim_aborted`` aborts)."""
    deadline = time.monotonic() + 10
    while True:
        metrics = await stack.metrics()
        busy = metrics[("maas_meter_requests_in_flight", ())] > 0
        if sim_aborted is not None:
            sim = await stack.metrics(stack.sim_url)
            busy = busy or sim.get(("maas_sim_aborted_generations_total", ()), 0) < sim_aborted
        if not busy or time.monotonic() > deadline:
            return metrics
        await asyncio.sleep(0.02)


async def one_request(
    client: openai.AsyncOpenAI, kind: int, rng: random.Random, *, model: str = MODEL
) -> tuple[int, int]:
    """One of several request shapes; returns the (prompt, completion) usage the client saw."""
    messages = [{"role": "user", "content": f"question {rng.randrange(10_000)} about metering"}]
    max_tokens = rng.choice([None, 5, 40])
    if kind == 0:
        chat = await client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens)  # type: ignore[arg-type]
        assert chat.usage is not None
        return chat.usage.prompt_tokens, chat.usage.completion_tokens
    if kind == 1:
        stream = await client.chat.completions.create(
            model=model,
            messages=messages,
            stream=True,
            stream_options={"include_usage": True},
            max_tokens=max_tokens,  # type: ignore[arg-type]
        )
        usage = [chunk.usage async for chunk in stream if chunk.usage is not None]
        assert len(usage) == 1
        return usage[0].prompt_tokens, usage[0].completion_tokens
    if kind == 2:
        # no usage asked for: the client counts the streamed tokens (one per chunk) and knows the prompt's size
        stream = await client.chat.completions.create(
            model=model, messages=messages, stream=True, max_tokens=max_tokens
        )  # type: ignore[arg-type]
        tokens = [c async for c in stream if c.choices and c.choices[0].delta.content]
        assert all(c.usage is None for c in tokens)
        return engine.chat_prompt_tokens(messages), len(tokens)
    if kind == 3:
        text = await client.completions.create(model=model, prompt=messages[0]["content"], max_tokens=max_tokens or 16)
        assert text.usage is not None
        return text.usage.prompt_tokens, text.usage.completion_tokens
    emb = await client.embeddings.create(model=model, input=[messages[0]["content"], "second"])
    return emb.usage.prompt_tokens, 0


async def test_ledger_and_metrics_equal_the_usage_clients_saw(redis_url: str) -> None:
    rng = random.Random(7)
    keys = {"k-alpha": (1_000_000, 60_000), "k-beta": None, "k-gamma": (500_000, 86_400_000)}
    seen = {k: [0, 0, 0] for k in keys}
    async with running_stack(redis_url, metrics_max_keys=2) as stack:
        clients = {k: stack.client(key_id=k, limit=limit) for k, limit in keys.items()}
        gate = asyncio.Semaphore(24)

        async def run(key: str, kind: int) -> None:
            async with gate:
                prompt, completion = await one_request(clients[key], kind, rng)
            seen[key][0] += 1
            seen[key][1] += prompt
            seen[key][2] += completion

        jobs = [run(rng.choice(list(keys)), i % 5) for i in range(300)]
        await asyncio.gather(*jobs)
        for client in clients.values():
            await client.close()
        metrics = await wait_until_settled(stack)
        for key in keys:
            rows = await stack.store.read_usage(key, [ledger_day()])
            assert [(r.model, r.requests, r.prompt_tokens, r.completion_tokens) for r in rows] == [(MODEL, *seen[key])]
    series = {
        labels: value
        for (name, labels), value in metrics.items()
        if name == "maas_tokens_total" and dict(labels)["model"] == MODEL
    }
    by_key: dict[str, list[float]] = {}
    for labels, value in series.items():
        lab = dict(labels)
        by_key.setdefault(lab["key_id"], [0, 0])[0 if lab["type"] == "prompt" else 1] += value
    assert len(by_key) == 3 and "_other" in by_key  # two keys of their own, the third in the overflow series
    assert sum(v[0] for v in by_key.values()) == sum(s[1] for s in seen.values())
    assert sum(v[1] for v in by_key.values()) == sum(s[2] for s in seen.values())
    for key in keys:
        if key in by_key:
            assert by_key[key] == [seen[key][1], seen[key][2]]
    assert metrics[("maas_meter_requests_total", (("model", MODEL), ("status", "200")))] == 300


async def test_fifty_concurrent_streams_never_overshoot_a_daily_token_bucket(redis_url: str) -> None:
    limit, window = 10_000, 86_400_000
    sim = SimConfig(served=(MODEL,), tokens_per_second=2000, ttft_ms=50)
    async with running_stack(redis_url, sim=sim) as stack:
        started = time.monotonic()
        async with stack.client(key_id="daily", limit=(limit, window)) as client:

            async def stream(i: int) -> tuple[str, int, int, dict[str, str]]:
                messages = [{"role": "user", "content": f"write a long story number {i}"}]
                try:
                    raw = await client.chat.completions.with_raw_response.create(
                        model=MODEL,
                        messages=messages,  # type: ignore[arg-type]
                        stream=True,
                        max_tokens=400,
                        stream_options={"include_usage": True},
                        extra_body={"ignore_eos": True},
                    )
                except openai.RateLimitError as exc:
                    assert exc.body["type"] == "tokens" and exc.body["code"] == "rate_limit_exceeded"  # type: ignore[index]
                    assert exc.response.headers["retry-after"]
                    return "denied", 0, 0, {}
                usage = [c.usage async for c in raw.parse() if c.usage is not None].pop()
                return "served", usage.prompt_tokens, usage.completion_tokens, dict(raw.headers)

            results = await asyncio.gather(*(stream(i) for i in range(50)))
        elapsed_ms = (time.monotonic() - started) * 1000
        await wait_until_settled(stack)
        rows = await stack.store.read_usage("daily", [ledger_day()])
    served = [r for r in results if r[0] == "served"]
    total = sum(p + c for _, p, c, _ in served)
    refill = limit * elapsed_ms / window + 1
    assert total <= limit + refill
    assert rows[0].prompt_tokens + rows[0].completion_tokens == total and rows[0].requests == len(served)
    clamped = [r for r in served if "x-maas-max-tokens-clamped" in r[3]]
    full = [r for r in served if "x-maas-max-tokens-clamped" not in r[3]]
    assert clamped and full and len(served) < 50
    for _, _, completion, headers in clamped:
        assert completion == int(headers["x-maas-max-tokens-clamped"]) < 400
    assert all(completion == 400 for _, _, completion, _ in full)


async def test_a_client_that_leaves_mid_stream_pays_what_it_was_sent(redis_url: str) -> None:
    sim = SimConfig(served=(MODEL,), tokens_per_second=5)
    messages = [{"role": "user", "content": "stream slowly please"}]
    async with running_stack(redis_url, sim=sim) as stack:
        async with stack.client(key_id="leaver", limit=(100_000, 86_400_000)) as client:
            stream = await client.chat.completions.create(
                model=MODEL,
                messages=messages,  # type: ignore[arg-type]
                stream=True,
                max_tokens=500,
                extra_body={"ignore_eos": True},
            )
            received = 0
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    received += 1
                if received == 3:
                    break
            await stream.close()
        metrics = await wait_until_settled(stack, sim_aborted=1)
        sim_metrics = await stack.metrics(stack.sim_url)
        rows = await stack.store.read_usage("leaver", [ledger_day()])
        bucket = aioredis.Redis.from_url(redis_url)
        state = await bucket.get(bucket_key("leaver", "tokens"))  # "<tokens> <ms timestamp>"
        level = float(state.split()[0]) if state else 0.0
        await bucket.aclose()
    charged = rows[0].prompt_tokens + rows[0].completion_tokens
    assert (rows[0].prompt_tokens, rows[0].completion_tokens) == (engine.chat_prompt_tokens(messages), 3)
    assert metrics[("maas_meter_client_disconnects_total", ())] == 1
    assert sim_metrics[("maas_sim_aborted_generations_total", ())] == 1
    assert sim_metrics[("vllm:generation_tokens_total", (("model_name", MODEL),))] == 0
    assert 100_000 - charged <= level < 100_000 - charged + 1  # the bucket holds only the charge (plus refill)


async def test_an_upstream_error_refunds_the_whole_reservation(redis_url: str) -> None:
    async with running_stack(redis_url) as stack:
        async with stack.client(key_id="unlucky", limit=(50_000, 86_400_000), model="") as client:
            with pytest.raises(openai.NotFoundError) as caught:
                await client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
        assert caught.value.body["code"] == "not_found"  # type: ignore[index]
        await wait_until_settled(stack)
        rows = await stack.store.read_usage("unlucky", [ledger_day()])
        bucket = aioredis.Redis.from_url(redis_url)
        assert not await bucket.exists(bucket_key("unlucky", "tokens"))  # refunded to full: nothing stored
        await bucket.aclose()
    assert rows == []


async def test_a_client_that_leaves_right_after_sending_gets_its_reservation_settled(redis_url: str) -> None:
    body = b'{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "stream": true}' % MODEL.encode()
    async with running_stack(redis_url) as stack:
        headers = {**stack.headers(key_id="gone", limit=(100_000, 86_400_000)), "content-type": "application/json"}
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        request = f"POST /v1/chat/completions HTTP/1.1\r\nhost: m\r\ncontent-length: {len(body)}\r\n{head}\r\n"
        for _ in range(3):  # the first opens the meter's upstream connection, the others can use it early
            _, writer = await asyncio.open_connection("127.0.0.1", int(stack.meter_url.rsplit(":", 1)[1]))
            writer.write(request.encode() + body)
            writer.close()  # gone before any answer: the checks and the reservation may already be under way
            await asyncio.sleep(0.3)
        metrics = await wait_until_settled(stack)
        bucket = aioredis.Redis.from_url(redis_url)
        state = await bucket.get(bucket_key("gone", "tokens"))
        await bucket.aclose()
    reserved = metrics.get(("maas_meter_reservations_total", (("outcome", "granted"),)), 0.0)
    level = float(state.split()[0]) if state else 100_000.0
    assert reserved >= 1 and level >= 100_000 - 1  # every reservation made was refunded: nothing was served


async def test_embeddings_are_refused_when_the_bucket_cannot_pay_for_their_input(redis_url: str) -> None:
    """Nothing of an embeddings request can be clamped, so its whole input estimate is the least it costs: on a
    bucket with less left it gets 429 (it was served, and the key went into debt far past its limit)."""
    async with running_stack(redis_url) as stack:
        async with stack.client(key_id="embed", limit=(100, 600_000)) as client:
            small = await client.embeddings.create(model=MODEL, input="a few words")
            assert small.usage.prompt_tokens > 0
            with pytest.raises(openai.RateLimitError) as refused:
                await client.embeddings.create(model=MODEL, input="many words " * 40)
        await wait_until_settled(stack)
        rows = await stack.store.read_usage("embed", [ledger_day()])
    assert refused.value.body["type"] == "tokens"  # type: ignore[index]
    assert rows[0].prompt_tokens == small.usage.prompt_tokens and rows[0].requests == 1


async def test_a_request_larger_than_the_whole_limit_is_told_so_without_a_retry_after(redis_url: str) -> None:
    """Waiting cannot make a bucket hold more than its limit: such a request gets 429 "request too large" with no
    retry-after (a client honouring one retried forever), and rate-limit headers that agree with each other."""
    async with running_stack(redis_url) as stack, stack.client(key_id="tiny", limit=(100, 600_000)) as client:
        with pytest.raises(openai.RateLimitError) as refused:
            await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "a long question " * 20}], max_tokens=5
            )
        short = [{"role": "user", "content": "short"}]
        await client.chat.completions.create(
            model=MODEL,
            messages=short,
            max_tokens=75,
            extra_body={"ignore_eos": True},  # type: ignore[arg-type]
        )
        with pytest.raises(openai.RateLimitError) as waits:  # one the bucket can pay once it refills still waits
            await client.chat.completions.create(model=MODEL, messages=short, max_tokens=5)  # type: ignore[arg-type]
    headers = refused.value.response.headers
    assert "too large" in refused.value.body["message"] and "retry-after" not in headers  # type: ignore[index]
    assert headers["x-ratelimit-limit-tokens"] == "100" and headers["x-ratelimit-remaining-tokens"] == "100"
    assert "too large" not in waits.value.body["message"] and int(waits.value.response.headers["retry-after"]) > 0  # type: ignore[index]


async def test_a_chat_without_max_tokens_gets_the_rest_of_the_context_as_vllm_would_give(redis_url: str) -> None:
    """The meter learns each model's context length from the model server's /v1/models and reserves the whole
    context for a chat request that sets no limit, leaving its body alone when the bucket pays: a long prompt is
    served as it is straight from vLLM. (The meter had set max_tokens to --default-max-tokens, and prompt + 4096
    over the context got vLLM's 400 "maximum context length"; directly the same request got 200.)"""
    sim = SimConfig(served=(MODEL,), max_model_len=1024)
    async with running_stack(redis_url, sim=sim) as stack:
        await eventually(lambda: stack.meter.contexts == {MODEL: 1024})
        body = {"model": MODEL, "messages": [{"role": "user", "content": "word " * 600}]}
        headers = {**stack.headers(key_id="ctx", limit=(100_000, 600_000)), "content-type": "application/json"}
        status, answer_headers, raw = await raw_post(stack.meter_url + "/v1/chat/completions", body, headers)
        direct, _, direct_raw = await raw_post(stack.sim_url + "/v1/chat/completions", body, {})
        await wait_until_settled(stack)
        rows = await stack.store.read_usage("ctx", [ledger_day()])
    answer = json.loads(raw)
    assert (status, direct) == (200, 200), raw
    assert answer["usage"]["prompt_tokens"] == json.loads(direct_raw)["usage"]["prompt_tokens"] > 600
    assert "x-maas-max-tokens" not in answer_headers  # the body went as the client sent it
    assert rows[0].prompt_tokens + rows[0].completion_tokens == answer["usage"]["total_tokens"] <= 1024


async def test_best_of_is_reserved_for_every_sequence_vllm_generates_and_charged_what_it_reports(
    redis_url: str,
) -> None:
    """vLLM generates ``best_of`` sequences of a completion and returns the ``n`` best: reserved for ``n`` only, a
    request clamped to what the key could pay generated four times that."""
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 100, "n": 1, "best_of": 4, "ignore_eos": True}
    async with running_stack(redis_url) as stack:
        headers = {**stack.headers(key_id="best", limit=(300, 600_000)), "content-type": "application/json"}
        status, answer_headers, raw = await raw_post(stack.meter_url + "/v1/completions", body, headers)
        fewer = {**body, "n": 2, "best_of": 1}
        refused, _, error = await raw_post(stack.meter_url + "/v1/completions", fewer, headers)
        await wait_until_settled(stack)
        rows = await stack.store.read_usage("best", [ledger_day()])
    per_sequence = (300 - Estimator().prompt_tokens("completion", body)) // 4
    answer = json.loads(raw)
    assert status == 200 and answer_headers["x-maas-max-tokens-clamped"] == str(per_sequence) and per_sequence < 100
    assert answer["usage"]["completion_tokens"] == per_sequence
    assert (rows[0].prompt_tokens, rows[0].completion_tokens) == (
        answer["usage"]["prompt_tokens"],
        answer["usage"]["completion_tokens"],
    )
    assert refused == 400 and json.loads(error)["error"]["param"] == "best_of"


def test_a_reservation_for_the_whole_context() -> None:
    assert quota.plan(prompt_estimate=3000, choices=1, wanted=4096, context=1024) == (3001, 3001)
    assert quota.plan(prompt_estimate=30, choices=2, wanted=4096, context=1024) == (2048, 32)


async def test_a_client_that_leaves_before_a_whole_answer_stops_the_generation_and_pays_nothing(
    redis_url: str,
) -> None:
    """Without a stream the meter did not notice the client leaving: vLLM generated the whole answer for nobody and
    the key paid for all of it."""
    sim = SimConfig(served=(MODEL,), tokens_per_second=5)
    async with running_stack(redis_url, sim=sim) as stack:
        async with stack.client(key_id="walker", limit=(100_000, 86_400_000)) as client:
            with pytest.raises(openai.APITimeoutError):
                await client.with_options(timeout=1.0).chat.completions.create(
                    model=MODEL,
                    messages=[{"role": "user", "content": "a long answer please"}],
                    max_tokens=500,
                    extra_body={"ignore_eos": True},
                )
        metrics = await wait_until_settled(stack, sim_aborted=1)
        sim_metrics = await stack.metrics(stack.sim_url)
        rows = await stack.store.read_usage("walker", [ledger_day()])
        bucket = aioredis.Redis.from_url(redis_url)
        state = await bucket.get(bucket_key("walker", "tokens"))
        await bucket.aclose()
    assert metrics[("maas_meter_client_disconnects_total", ())] == 1
    assert sim_metrics[("maas_sim_aborted_generations_total", ())] == 1
    assert not rows or rows[0].requests == 0
    assert state is None  # refunded whole: a full bucket is forgotten


async def test_a_stream_cut_by_shutdown_is_charged_what_was_sent(redis_url: str) -> None:
    """Streams still running when the grace period ends were cut without settling: the tokens served were never in
    the ledger and the whole reservation stayed taken."""
    sim = SimConfig(served=(MODEL,), tokens_per_second=20)
    messages = [{"role": "user", "content": "stream until the meter stops"}]
    received = 0

    async def read(client: openai.AsyncOpenAI) -> None:
        nonlocal received
        stream = await client.chat.completions.create(
            model=MODEL, messages=messages, stream=True, max_tokens=300, extra_body={"ignore_eos": True}
        )  # type: ignore[arg-type]
        with contextlib.suppress(openai.APIError, httpx2.HTTPError):
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    received += 1

    async with running_stack(redis_url, sim=sim) as stack:
        client = stack.client(key_id="cut", limit=(100_000, 86_400_000))
        reader = asyncio.create_task(read(client))
        await eventually(lambda: received >= 3)
    # the meter has shut down (grace 1 s), cutting the stream
    await asyncio.wait_for(reader, 10)
    await client.close()
    store = RedisStore(redis_url, timeout=2.0)
    rows = await store.read_usage("cut", [ledger_day()])
    await store.close()
    bucket = aioredis.Redis.from_url(redis_url)
    state = await bucket.get(bucket_key("cut", "tokens"))
    await bucket.aclose()
    assert 3 <= received < 300
    assert (rows[0].prompt_tokens, rows[0].completion_tokens) == (engine.chat_prompt_tokens(messages), received)
    level = float(state.split()[0]) if state else 0.0
    charged = rows[0].prompt_tokens + rows[0].completion_tokens
    assert 100_000 - charged <= level < 100_000 - charged + 5  # (plus a few seconds' refill)


class StallingStore(RedisStore):
    """Redis, until ``stall`` is set: then its first commit and first ledger write wait longer than the shutdown's
    settle window, and every later one fails unsent."""

    def __init__(self, url: str) -> None:
        super().__init__(url, timeout=2.0)
        self.stall = False
        self._stalled: set[str] = set()

    async def _gate(self, what: str) -> None:
        if not self.stall:
            return
        if what not in self._stalled:
            self._stalled.add(what)
            await asyncio.sleep(60)
        raise StoreNotSent(f"{what}: the store is gone")

    async def commit(self, op: BucketOp, reservation: str) -> None:
        await self._gate("commit")
        await super().commit(op, reservation)

    async def add_usage(self, deltas: Sequence[UsageDelta]) -> None:
        await self._gate("ledger")
        await super().add_usage(deltas)


async def test_a_settle_cut_at_shutdown_is_counted_and_logged_as_lost(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A stream cut by the shutdown whose settle is still waiting for the store when the settle window ends: its
    commit and its ledger row were dropped with no metric. Now they are held for the backlog's last flush and,
    the store not taking them, counted in the store errors and logged."""
    sim = SimConfig(served=(MODEL,), tokens_per_second=20)
    store = StallingStore(redis_url)
    received = 0

    async def read(client: openai.AsyncOpenAI) -> None:
        nonlocal received
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "go on"}], stream=True, max_tokens=300
        )
        with contextlib.suppress(openai.APIError, httpx2.HTTPError):
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    received += 1

    with caplog.at_level(logging.ERROR, logger="maas.meter"):
        async with running_stack(redis_url, sim=sim, store=store) as stack:
            client = stack.client(key_id="cut-late", limit=(100_000, 86_400_000))
            reader = asyncio.create_task(read(client))
            await eventually(lambda: received >= 3)
            store.stall = True
        await asyncio.wait_for(reader, 10)
        await client.close()
    errors = stack.meter.metrics.registry.get_sample_value
    assert errors("maas_meter_store_errors_total", {"operation": "commit"}) == 1
    assert errors("maas_meter_store_errors_total", {"operation": "ledger"}) == 1
    lost = [r.getMessage() for r in caplog.records if "not written" in r.getMessage()]
    assert lost == [
        "meter stopping with 1 usage ledger rows, 1 token commits and 0 reservation releases not written: the store "
        "did not take them"
    ]


async def test_a_stream_left_before_its_first_token_writes_no_ledger_row(redis_url: str) -> None:
    """The ledger holds requests that served tokens: a client gone before the first one had added a request."""
    sim = SimConfig(served=(MODEL,), ttft_ms=3_000)
    async with running_stack(redis_url, sim=sim) as stack:
        async with stack.client(key_id="impatient", limit=(100_000, 86_400_000)) as client:
            with pytest.raises(openai.APITimeoutError):
                stream = await client.with_options(timeout=0.5).chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True
                )
                async for _ in stream:
                    pass
        metrics = await wait_until_settled(stack)
        rows = await stack.store.read_usage("impatient", [ledger_day()])
    assert metrics[("maas_meter_client_disconnects_total", ())] == 1
    assert not rows or rows[0].requests == 0


async def test_usage_served_while_redis_is_down_reaches_the_ledger_once_it_returns(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A ledger write that could not be sent was dropped (counted, logged): every request served during an outage
    was missing from the usage and the bills made of it. The outage is logged, not every request served in it (a
    line per request had flooded the logs at the request rate)."""
    port = free_port()
    with redis_server(port=port) as first:
        async with (
            running_stack(first.url, store_timeout=0.2) as stack,
            stack.client(key_id="outage", limit=(100_000, 86_400_000)) as client,
        ):
            first.kill()
            seen = []
            for _ in range(3):  # served: the default failure policy forwards without a reservation
                chat = await client.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": "during the outage"}], max_tokens=4
                )
                assert chat.usage is not None
                seen.append(chat.usage.total_tokens)
            metrics = await stack.metrics()
            # three requests: one merged ledger row, and one merged debit of the key's bucket
            assert metrics[("maas_meter_ledger_backlog_rows", ())] == 2
            skipped = [r for r in caplog.records if r.getMessage().startswith("token reservation skipped")]
            assert len(skipped) <= 1
            with redis_server(port=port) as again:
                store = RedisStore(again.url, timeout=2.0)

                async def landed() -> bool:
                    rows = await store.read_usage("outage", [ledger_day()])
                    return bool(rows) and rows[0].requests == 3

                await eventually(landed, within=10)
                rows = await store.read_usage("outage", [ledger_day()])
                await store.close()
                assert rows[0].prompt_tokens + rows[0].completion_tokens == sum(seen)

                async def drained() -> bool:  # the row is in Redis before the meter has its answer and lets it go
                    return (await stack.metrics())[("maas_meter_ledger_backlog_rows", ())] == 0

                await eventually(drained, within=10)


async def test_usage_served_while_redis_is_down_is_charged_to_the_bucket_once_it_returns() -> None:
    """A request forwarded because its reservation could not be sent (the default failure policy) was never debited:
    its key's quota did not count what it served, however soon Redis came back."""
    port = free_port()
    limit = (100_000, 365 * 86_400_000)
    with redis_server(port=port) as first:
        async with (
            running_stack(first.url, store_timeout=0.2) as stack,
            stack.client(key_id="free-ride", limit=limit) as client,
        ):
            first.kill()
            chat = await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "during the outage"}], max_tokens=4
            )
            assert chat.usage is not None
            with redis_server(port=port) as again:

                async def drained() -> bool:
                    return (await stack.metrics())[("maas_meter_ledger_backlog_rows", ())] == 0

                await eventually(drained, within=10)
                bucket = aioredis.Redis.from_url(again.url)
                state = await bucket.get(bucket_key("free-ride", "tokens"))
                await bucket.aclose()
    assert state is not None
    level = float(state.split()[0])
    assert level == limit[0] - chat.usage.total_tokens


async def test_a_request_served_while_redis_is_paused_leaves_the_bucket_whole_and_is_counted_once() -> None:
    """Redis stopped (SIGSTOP) past the store timeout: the reservation's answer was lost, but it ran once Redis went
    on, so its tokens stayed taken (the commit did not give them back); the commit and the ledger write, sent while
    it was stopped, may have run too. Released and made again under their ids, each counts once."""
    limit = (100_000, 365 * 86_400_000)
    with redis_server() as server:
        async with (
            running_stack(server.url, redis_timeout=0.25) as stack,
            stack.client(key_id="paused", limit=limit) as client,
        ):
            ask = {"model": MODEL, "messages": [{"role": "user", "content": "while redis sleeps"}], "max_tokens": 6}
            first = await client.chat.completions.create(**ask)  # type: ignore[call-overload]
            server.proc.popen.send_signal(signal.SIGSTOP)
            try:
                second = await client.chat.completions.create(**ask)  # type: ignore[call-overload]
                await asyncio.sleep(0.6)  # the commit and the ledger write go out and time out too
            finally:
                server.proc.popen.send_signal(signal.SIGCONT)

            async def drained() -> bool:
                metrics = await stack.metrics()
                return metrics[("maas_meter_ledger_backlog_rows", ())] == 0

            await eventually(drained, within=10)
            failures = await stack.metrics()
            store = RedisStore(server.url, timeout=2.0)
            (row,) = await store.read_usage("paused", [ledger_day()])
            await store.close()
            bucket = aioredis.Redis.from_url(server.url)
            state = await bucket.get(bucket_key("paused", "tokens"))
            await bucket.aclose()
    assert first.usage is not None and second.usage is not None
    served = first.usage.total_tokens + second.usage.total_tokens
    assert failures[("maas_meter_store_errors_total", (("operation", "reserve"),))] == 1  # the answer was lost
    assert (row.requests, row.prompt_tokens + row.completion_tokens) == (2, served)
    assert state is not None
    assert limit[0] - served <= float(state.split()[0]) < limit[0] - served + 1  # (a release refills it to its time)
