"""``maas meter``: flags, settings and the process (proxy port and ops port on one uvloop event loop)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

import uvloop

from gateway import logs
from gateway.meter.app import BACKLOG, build_meter, serving
from gateway.meter.settings import MeterSettings
from gateway.runtime import descriptors_needed, raise_descriptor_limit, tune_gc
from gateway.settings import add_flags, load, warn_misspelt_variables

log = logging.getLogger("maas.meter")


def configure(parser: argparse.ArgumentParser) -> None:
    add_flags(parser, MeterSettings)


async def serve(settings: MeterSettings) -> None:
    meter = build_meter(settings)
    async with serving(
        meter,
        host=settings.host,
        port=settings.port,
        ops_port=settings.ops_port,
        max_connections=settings.max_connections,
        readiness_timeout=settings.readiness_timeout,
        shutdown_grace=settings.shutdown_grace,
    ):
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


def run(args: argparse.Namespace) -> int:
    settings = load(MeterSettings, args)
    logs.setup(fmt=settings.log_format, level=settings.log_level)
    warn_misspelt_variables(MeterSettings)
    tune_gc()
    needed = descriptors_needed(
        max_connections=settings.max_connections, backlog=BACKLOG, upstream=settings.upstream_max_connections
    )
    raise_descriptor_limit(needed)
    uvloop.run(serve(settings))
    return 0
