"""Assembling the meter: the proxy server, the ops app (``/healthz``, ``/readyz``, ``/metrics``) and their
lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.clock import ClockOffset, SharedClock
from gateway.connections import ConnectionCap
from gateway.meter.accounting import UsageBacklog
from gateway.meter.estimate import Estimator
from gateway.meter.metrics import MeterMetrics
from gateway.meter.proxy import Meter, MeterConfig, begin_early, follow_contexts, handle
from gateway.meter.server import TOO_MANY_CONNECTIONS, Server
from gateway.meter.settings import MeterSettings
from gateway.meter.upstream import Upstream
from gateway.settings import split_csv
from gateway.store import Store, open_store


def config_of(settings: MeterSettings) -> MeterConfig:
    return MeterConfig(
        secret=settings.secret,
        identity_max_age=settings.identity_max_age,
        trust_identity_headers=settings.trust_identity_headers,
        check_model=settings.check_model,
        max_body_bytes=settings.max_body_bytes,
        max_response_bytes=settings.max_response_bytes,
        max_event_bytes=settings.max_event_bytes,
        allow_unknown=settings.unknown_fields == "allow",
        clamp=settings.clamp_max_tokens,
        default_max_tokens=settings.default_max_tokens,
        deny_on_store_error=settings.store_failure_policy == "deny",
        estimator=Estimator(bytes_per_token=settings.estimate_bytes_per_token, overhead=settings.estimate_overhead),
        passthrough_posts=frozenset(split_csv(settings.passthrough_posts)),
    )


def build_meter(settings: MeterSettings, *, store: Store | None = None) -> Meter:
    metrics = MeterMetrics(max_keys=settings.metrics_max_keys)
    upstream = Upstream(
        settings.upstream,
        connect_timeout=settings.upstream_connect_timeout,
        first_byte_timeout=settings.upstream_first_byte_timeout,
        idle_timeout=settings.upstream_idle_timeout,
        max_connections=settings.upstream_max_connections,
        keepalive=settings.upstream_keepalive,
        max_queue=settings.upstream_max_queue,
        errors=metrics.upstream_errors,
    )
    metrics.upstream_queued.set_function(upstream.waiting)
    return Meter(
        config=config_of(settings),
        store=store if store is not None else open_store(settings.redis_url, timeout=settings.store_timeout),
        upstream=upstream,
        metrics=metrics,
        clock=ClockOffset(metrics.clock_offset, logger=logging.getLogger("maas.meter")),
        backlog=UsageBacklog(metrics),
    )


BACKLOG = 2048
"""Connections the kernel queues for the proxy port before they are accepted."""


@dataclass(frozen=True, slots=True)
class Readiness:
    timeout: float


METER = web.AppKey("meter", Meter)
READINESS = web.AppKey("readiness", Readiness)


@dataclass(frozen=True, slots=True)
class Ports:
    proxy: int
    ops: int


def build_ops(meter: Meter, *, readiness_timeout: float = 1.0) -> web.Application:
    ops = web.Application()
    ops[METER] = meter
    ops[READINESS] = Readiness(timeout=readiness_timeout)
    ops.router.add_get("/healthz", healthz)
    ops.router.add_get("/readyz", readyz)
    ops.router.add_get("/metrics", metrics_handler)
    return ops


@contextlib.asynccontextmanager
async def serving(
    meter: Meter,
    *,
    host: str,
    port: int,
    ops_port: int,
    max_connections: int,
    readiness_timeout: float = 1.0,
    shutdown_grace: float = 25.0,
) -> AsyncIterator[Ports]:
    """One meter's proxy port (the lean server, at most ``max_connections`` client connections) and ops port
    (aiohttp), up while the context runs; on the way out the proxy stops listening and gives requests in flight
    ``shutdown_grace`` seconds, then the upstream connections and the store close."""
    cap = ConnectionCap(
        max_connections,
        body=TOO_MANY_CONNECTIONS,
        refused=meter.metrics.connections_refused.inc,
        logger=logging.getLogger("maas.meter.http"),
        port="proxy port",
    )
    meter.metrics.client_connections.set_function(lambda: cap.open)
    proxy = Server(functools.partial(handle, meter), cap=cap, early=functools.partial(begin_early, meter))
    ops = web.AppRunner(build_ops(meter, readiness_timeout=readiness_timeout), access_log=None, handle_signals=False)
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(meter.store.close)
        stack.push_async_callback(meter.upstream.close)
        await meter.upstream.start()
        contexts = asyncio.get_running_loop().create_task(follow_contexts(meter), name="meter-contexts")
        stack.push_async_callback(_stop, contexts)
        if isinstance(meter.store, SharedClock):
            clock = asyncio.get_running_loop().create_task(meter.clock.run(meter.store), name="meter-clock")
            stack.push_async_callback(_stop, clock)
        if meter.backlog is not None:
            # last thing before the store closes: one more try at what the backlog still holds, the rest counted
            stack.push_async_callback(meter.backlog.close, meter.store)
            backlog = asyncio.get_running_loop().create_task(meter.backlog.run(meter.store), name="meter-backlog")
            stack.push_async_callback(_stop, backlog)
        await ops.setup()
        stack.push_async_callback(ops.cleanup)
        await proxy.start(host, port, backlog=BACKLOG)
        stack.push_async_callback(proxy.shutdown, shutdown_grace)
        await web.TCPSite(ops, host, ops_port).start()
        yield Ports(proxy.port, ops.addresses[0][1])


async def _stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready when the upstream's ``/health`` answers 200; the store's state is reported, not required (the
    store failure policy decides what a store outage means)."""
    meter = request.app[METER]
    try:
        ok, detail = await meter.upstream.healthy(within=request.app[READINESS].timeout)
    except RuntimeError:
        ok, detail = False, "upstream session not started"
    store = "ok"
    with contextlib.suppress(Exception):
        store = "unavailable"
        await meter.store.ping()
        store = "ok"
    body = json.dumps({"status": "ready" if ok else "not_ready", "upstream": detail, "store": store})
    return web.Response(status=200 if ok else 503, text=body, content_type="application/json")


async def metrics_handler(request: web.Request) -> web.Response:
    return web.Response(
        body=generate_latest(request.app[METER].metrics.registry), headers={"content-type": CONTENT_TYPE_LATEST}
    )
