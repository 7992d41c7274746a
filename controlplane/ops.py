"""HTTP surfaces: the ops port (``/healthz``, ``/readyz``, ``/metrics``), the main port's sync status, and the
runner both ports are served with."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from aiohttp import http_exceptions, web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from controlplane.metrics import Metrics
from controlplane.sync import Syncer
from gateway.authz.server import EnvelopeServer, headers_too_large

log = logging.getLogger("maas.controlplane.http")


class Elector(Protocol):
    def is_leader(self) -> bool: ...


@dataclass(frozen=True, slots=True)
class Parts:
    syncer: Syncer
    metrics: Metrics
    elector: Elector
    started: float


PARTS = web.AppKey("parts", Parts)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    parts = request.app[PARTS]
    if parts.syncer.ready.is_set():
        return web.json_response({"status": "ready", "leader": parts.elector.is_leader()})
    return web.json_response({"status": "syncing"}, status=503)


async def metrics(request: web.Request) -> web.Response:
    parts = request.app[PARTS]
    parts.metrics.leader.set(1 if parts.elector.is_leader() else 0)
    body = generate_latest(parts.metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def status(request: web.Request) -> web.Response:
    parts = request.app[PARTS]
    syncer = parts.syncer
    body = {
        "ready": syncer.ready.is_set(),
        "leader": parts.elector.is_leader(),
        "generation": syncer.generation,
        "uptime_seconds": round(time.monotonic() - parts.started, 3),
        "objects": {name: syncer.count(name) for name in syncer.reflectors},
        "records": {kind.value: len(table) for kind, table in syncer.desired.records.items()},
        "skipped": syncer.skipped_now(),
        "streams": {
            r.stream.name: {"synced": r.synced.is_set(), "objects": len(r.items)}
            for rs in syncer.reflectors.values()
            for r in rs
        },
    }
    return web.json_response(body, dumps=lambda v: json.dumps(v, sort_keys=True))


@web.middleware
async def _not_found(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPNotFound:
        error = {"message": f"no such endpoint: {request.path}", "type": "invalid_request_error", "code": "not_found"}
        return web.json_response({"error": {**error, "param": None}}, status=404)


def ops_app(parts: Parts) -> web.Application:
    app = web.Application()
    app[PARTS] = parts
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app


def main_app(parts: Parts) -> web.Application:
    app = web.Application(middlewares=[_not_found])
    app[PARTS] = parts
    app.router.add_get("/v1/sync", status)
    return app


class ApiServer(EnvelopeServer):
    """What aiohttp answers itself, before any handler runs, in the OpenAI envelope as the admin API answers the
    rest (aiohttp's answers are plain text): a body in an encoding it cannot decode, an over-long line, malformed
    HTTP; and a handler's failure."""

    def answer(self, status: int, exc: BaseException | None) -> tuple[int, str, str]:
        if isinstance(exc, http_exceptions.ContentEncodingError):
            return 415, "unsupported_media_type", "Unsupported Content-Encoding: send the body as is, gzip or deflate."
        if headers_too_large(exc):
            return 431, "request_header_too_large", "The request line or a header is too long, or there are too many."
        if status < 500:
            return 400, "invalid_request", "Malformed HTTP request."
        if isinstance(exc, asyncio.CancelledError):  # cut by the shutdown, past REQUEST_GRACE_SECONDS: no failure
            log.info("a request still running when the server stopped was cancelled")
            return 503, "shutting_down", "The control plane stopped while answering this request; retry."
        log.error("request failed", exc_info=exc)
        return 500, "internal_error", "The control plane failed to answer this request; its log has the details."


class ApiRunner(web.AppRunner):
    """``web.AppRunner`` over an ``ApiServer``."""

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()
        return ApiServer(
            plain.request_handler,
            request_factory=plain.request_factory,
            handler_cancellation=plain.handler_cancellation,
            **plain._kwargs,
        )
