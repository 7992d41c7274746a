"""``maas authz``: start the ext_authz server, the ops server and the snapshot follower."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal

import uvloop
from aiohttp import web

from gateway import __version__, logs
from gateway.authz.fasthttp import CheckServer
from gateway.authz.follower import SnapshotFollower
from gateway.authz.metrics import AuthzMetrics
from gateway.authz.server import TOO_MANY_CONNECTIONS, AiohttpHandler, Checker, EnvelopeServer
from gateway.authz.settings import AuthzSettings
from gateway.clock import ClockOffset, SharedClock
from gateway.connections import ConnectionCap
from gateway.decision import Policy
from gateway.ops import ops_app
from gateway.runtime import descriptors_needed, raise_descriptor_limit, tune_gc
from gateway.settings import add_flags, load, warn_misspelt_variables
from gateway.store import Store, open_store

log = logging.getLogger("maas.authz")

BACKLOG = 1024
"""Connections the kernel queues for the check port before they are accepted."""


def configure(parser: argparse.ArgumentParser) -> None:
    add_flags(parser, AuthzSettings)


def run(args: argparse.Namespace) -> int:
    settings = load(AuthzSettings, args)
    logs.setup(fmt=settings.log_format, level=settings.log_level)
    warn_misspelt_variables(AuthzSettings)
    tune_gc()
    raise_descriptor_limit(descriptors_needed(max_connections=settings.max_connections, backlog=BACKLOG))
    uvloop.run(serve(settings))
    return 0


async def serve(settings: AuthzSettings, *, stop: asyncio.Event | None = None, store: Store | None = None) -> None:
    """Run until ``stop`` is set (default: SIGTERM/SIGINT). ``store`` shares one store object with other
    components of the same process (the single-process demo); by default it is opened from ``--redis-url``."""
    if settings.dev:
        log.warning("DEVELOPMENT MODE: fixed pepper and identity secret; never use --dev in production")
    log.info("maas authz %s starting", __version__, extra={"settings": settings.redacted()})
    store = store or open_store(settings.redis_url, timeout=settings.store_timeout)
    metrics = AuthzMetrics(max_keys=settings.metrics_max_keys)
    follower = SnapshotFollower(store, metrics=metrics)
    policy = Policy(
        pepper=settings.pepper,
        identity_secret=settings.identity_key,
        default_tier=settings.default_tier,
        path_prefix=settings.path_prefix.rstrip("/"),
        allow_unrouted=settings.allow_unrouted,
        remove_credentials=not settings.forward_api_key,
    )
    clock = ClockOffset(metrics.clock_offset, logger=log)
    checker = Checker(
        follower=follower,
        store=store,
        policy=policy,
        metrics=metrics,
        on_store_error=settings.on_store_error,
        max_inflight=settings.bucket_max_inflight,
        clock=clock.now,
        credits=settings.request_credits,
        credit_seconds=settings.request_credit_ms / 1000,
    )

    async def ready() -> tuple[bool, str]:
        snapshot = follower.snapshot
        if not snapshot.loaded:
            return False, "snapshot not loaded yet"
        return True, f"generation {snapshot.generation}, {len(snapshot.keys)} keys"

    tasks = [asyncio.create_task(follower.run(), name="snapshot-follower")]
    if isinstance(store, SharedClock):
        tasks.append(asyncio.create_task(clock.run(store), name="clock-offset"))
    for task in tasks:
        task.add_done_callback(_log_crash)
    ops_runner = web.AppRunner(ops_app(registry=metrics.registry, ready=ready), access_log=None)
    await ops_runner.setup()
    cap = ConnectionCap(
        settings.max_connections,
        body=TOO_MANY_CONNECTIONS,
        refused=metrics.connections_refused.inc,
        logger=log,
        port="check port",
    )
    metrics.client_connections.set_function(lambda: cap.open)
    authz_runner: web.ServerRunner | None = None
    fast_server: CheckServer | None = None
    if settings.http_server == "fast":
        fast_server = CheckServer(checker, max_header_bytes=settings.max_header_bytes, cap=cap)
        await fast_server.start(host=settings.host, port=settings.port, backlog=BACKLOG)
    else:
        server = EnvelopeServer(
            AiohttpHandler(checker),
            cap=cap,
            access_log=None,
            max_field_size=settings.max_header_bytes,
            max_line_size=settings.max_header_bytes,
        )
        authz_runner = web.ServerRunner(server, handle_signals=False)
        await authz_runner.setup()
        await web.TCPSite(authz_runner, settings.host, settings.port, reuse_port=True, backlog=BACKLOG).start()
    await web.TCPSite(ops_runner, settings.ops_listen_host, settings.ops_port).start()
    log.info(
        "listening",
        extra={
            "host": settings.host,
            "port": settings.port,
            "ops_host": settings.ops_listen_host,
            "ops_port": settings.ops_port,
        },
    )

    stop = stop or _stop_on_signals()
    await stop.wait()
    log.info("shutting down")
    for task in tasks:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    if fast_server is not None:
        await fast_server.close()
    if authz_runner is not None:
        await authz_runner.cleanup()
    await checker.close()
    await ops_runner.cleanup()
    await store.close()


def _stop_on_signals() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


def _log_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("task %s crashed", task.get_name(), exc_info=task.exception())
