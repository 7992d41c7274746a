"""``maas meter``: flags, settings and the process (proxy port and ops port on one uvloop event loop)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

import uvloop
from aiohttp import web

from gateway import logs
from gateway.meter.app import build_apps, build_meter
from gateway.meter.settings import MeterSettings
from gateway.settings import add_flags, load

log = logging.getLogger("maas.meter")


def configure(parser: argparse.ArgumentParser) -> None:
    add_flags(parser, MeterSettings)


async def serve(settings: MeterSettings) -> None:
    meter = build_meter(settings)
    app, ops = build_apps(meter, readiness_timeout=settings.readiness_timeout, max_body_bytes=settings.max_body_bytes)
    runners = [
        web.AppRunner(app, access_log=None, handle_signals=False),
        web.AppRunner(ops, access_log=None, handle_signals=False),
    ]
    for runner in runners:
        await runner.setup()
    try:
        await web.TCPSite(runners[0], settings.host, settings.port, backlog=2048).start()
        await web.TCPSite(runners[1], settings.host, settings.ops_port).start()
        if settings.dev and settings.identity_secret is None:
            log.warning("DEVELOPMENT MODE: identity headers verified with the fixed development secret")
        if settings.trust_identity_headers:
            log.warning("identity headers are trusted without a signature (--trust-identity-headers)")
        log.info("maas meter listening", extra={"settings": settings.redacted()})
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        for runner in reversed(runners):
            await runner.cleanup()


def run(args: argparse.Namespace) -> int:
    settings = load(MeterSettings, args)
    logs.setup(fmt=settings.log_format, level=settings.log_level)
    uvloop.run(serve(settings))
    return 0
