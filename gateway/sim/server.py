"""The simulator's HTTP server (aiohttp): vLLM's OpenAI routes, ``/health`` and ``/metrics``.

Streams are paced: the first token after ``ttft_ms``, then one token per choice every ``1 / tokens_per_second``
seconds. A client that goes away mid-stream stops the generation, counted in
``maas_sim_aborted_generations_total``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest

from gateway.sim import api
from gateway.sim.engine import SimRequestError, error_body

log = logging.getLogger("maas.sim")

JSON = "application/json"


@dataclass(frozen=True, slots=True)
class SimConfig:
    served: tuple[str, ...]
    max_model_len: int = 6144
    ttft_ms: float = 0.0
    tokens_per_second: float = 0.0
    embedding_dimensions: int = 32
    max_body_bytes: int = 32 * 1024 * 1024


class SimMetrics:
    """vLLM's metric names for what the simulator models, plus its abort counter. Children bound at start."""

    def __init__(self, served: tuple[str, ...]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        running = Gauge("vllm:num_requests_running", "Requests being generated", ["model_name"], registry=r)
        prompt = Counter("vllm:prompt_tokens", "Prompt tokens processed", ["model_name"], registry=r)
        generation = Counter("vllm:generation_tokens", "Generation tokens produced", ["model_name"], registry=r)
        success = Counter("vllm:request_success", "Requests finished", ["model_name", "finished_reason"], registry=r)
        self.running = {m: running.labels(m) for m in served}
        self.prompt = {m: prompt.labels(m) for m in served}
        self.generation = {m: generation.labels(m) for m in served}
        self.success = {(m, f): success.labels(m, f) for m in served for f in ("stop", "length", "abort")}
        self.aborted = Counter(
            "maas_sim_aborted_generations", "Generations stopped because the client went away", registry=r
        )


CONFIG = web.AppKey("config", SimConfig)
METRICS = web.AppKey("metrics", SimMetrics)
CREATED = web.AppKey("created", int)


def _error(exc: SimRequestError) -> web.Response:
    return web.Response(
        status=exc.status, text=error_body(str(exc), status=exc.status, param=exc.param), content_type=JSON
    )


async def _read_json(request: web.Request) -> dict[str, Any]:
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        raise SimRequestError("request body too large", status=413) from exc
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise SimRequestError(f"Invalid JSON body: {exc}") from exc
    except RecursionError:
        raise SimRequestError("Invalid JSON body: nested too deeply") from None
    if not isinstance(body, dict):
        raise SimRequestError("request body must be a JSON object")
    return body


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, chat=True)


async def completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, chat=False)


async def _generate(request: web.Request, *, chat: bool) -> web.StreamResponse:
    config = request.app[CONFIG]
    try:
        body = await _read_json(request)
        parse = api.parse_chat if chat else api.parse_completion
        job = parse(body, served=config.served, max_model_len=config.max_model_len)
    except SimRequestError as exc:
        return _error(exc)
    metrics = request.app[METRICS]
    metrics.running[job.model].inc()
    try:
        if not job.stream:
            delay = config.ttft_ms / 1000 + _token_delay(config) * max(job.steps - 1, 0)
            if not await _pace_while_connected(request, delay):  # vLLM aborts a request whose client left
                _aborted(metrics, job)
                return web.Response(status=499)
            _count(metrics, job, aborted=False)
            return web.Response(text=api.full_response(job), content_type=JSON)
        return await _stream(request, job, config=config, metrics=metrics)
    finally:
        metrics.running[job.model].dec()


def _token_delay(config: SimConfig) -> float:
    return 1.0 / config.tokens_per_second if config.tokens_per_second > 0 else 0.0


async def _pace(delay: float) -> None:
    if delay > 0:
        await asyncio.sleep(delay)


async def _pace_while_connected(request: web.Request, delay: float) -> bool:
    """Wait ``delay`` seconds; False as soon as the client's connection is gone (looked at every 50 ms)."""
    end = time.monotonic() + delay
    while (left := end - time.monotonic()) > 0:
        await asyncio.sleep(min(left, 0.05))
        transport = request.transport
        if transport is None or transport.is_closing():
            return False
    return True


async def _stream(request: web.Request, job: api.Job, *, config: SimConfig, metrics: SimMetrics) -> web.StreamResponse:
    response = web.StreamResponse(headers={"content-type": "text/event-stream; charset=utf-8"})
    await response.prepare(request)
    delay = _token_delay(config)
    started = time.monotonic()
    try:
        for step, data in enumerate(api.stream_steps(job)):
            if step < job.steps:
                # absolute schedule: the pace does not drift with the time spent writing
                await _pace(started + config.ttft_ms / 1000 + step * delay - time.monotonic())
            await response.write(data.encode())
    except ConnectionResetError:
        _aborted(metrics, job)
        return response
    except asyncio.CancelledError:
        _aborted(metrics, job)
        raise
    _count(metrics, job, aborted=False)
    await response.write_eof()
    return response


def _aborted(metrics: SimMetrics, job: api.Job) -> None:
    metrics.aborted.inc()
    _count(metrics, job, aborted=True)
    log.info("client went away, generation stopped", extra={"model": job.model})


def _count(metrics: SimMetrics, job: api.Job, *, aborted: bool) -> None:
    metrics.prompt[job.model].inc(job.prompt_tokens)
    if aborted:
        metrics.success[(job.model, "abort")].inc()
        return
    metrics.generation[job.model].inc(job.completion_tokens)
    for choice in job.choices:
        metrics.success[(job.model, choice.generation.finish_reason)].inc()


async def embeddings(request: web.Request) -> web.Response:
    config = request.app[CONFIG]
    try:
        body = await _read_json(request)
        text = api.embeddings_response(
            body, served=config.served, max_model_len=config.max_model_len, dimensions=config.embedding_dimensions
        )
    except SimRequestError as exc:
        return _error(exc)
    return web.Response(text=text, content_type=JSON)


async def models(request: web.Request) -> web.Response:
    config = request.app[CONFIG]
    text = api.models_response(config.served, max_model_len=config.max_model_len, created=request.app[CREATED])
    return web.Response(text=text, content_type=JSON)


async def health(request: web.Request) -> web.Response:
    return web.Response(status=200)


async def metrics_handler(request: web.Request) -> web.Response:
    return web.Response(
        body=generate_latest(request.app[METRICS].registry), headers={"content-type": CONTENT_TYPE_LATEST}
    )


async def not_found(request: web.Request) -> web.Response:
    return web.Response(status=404, text=error_body("Not Found", status=404), content_type=JSON)


def build_app(config: SimConfig) -> web.Application:
    app = web.Application(client_max_size=config.max_body_bytes)
    app[CONFIG] = config
    app[METRICS] = SimMetrics(config.served)
    app[CREATED] = int(time.time())
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_route("*", "/{tail:.*}", not_found)
    return app
