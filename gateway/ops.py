"""The ops port every server has: ``/healthz`` (the process runs), ``/readyz`` (it can serve), ``/metrics``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CollectorRegistry

from gateway.metrics import render

ReadyCheck = Callable[[], Awaitable[tuple[bool, str]]]


def ops_app(*, registry: CollectorRegistry, ready: ReadyCheck) -> web.Application:
    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        ok, detail = await ready()
        return web.json_response({"ready": ok, "detail": detail}, status=200 if ok else 503)

    async def metrics(_: web.Request) -> web.Response:
        body, content_type = render(registry)
        return web.Response(body=body, headers={"content-type": content_type})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app
