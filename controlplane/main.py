"""``maas controlplane``: sync InferenceServices, runtimes, HTTPRoutes, tiers and API-key Secrets into Redis."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

from controlplane.errors import SourceError
from controlplane.runner import ControlPlane
from controlplane.settings import ControlPlaneSettings
from gateway import logs
from gateway.settings import add_flags, load, warn_misspelt_variables

log = logging.getLogger("maas.controlplane")


def configure(parser: argparse.ArgumentParser) -> None:
    add_flags(parser, ControlPlaneSettings)


async def serve(settings: ControlPlaneSettings) -> int:
    plane = ControlPlane(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await plane.start()
        stopping = asyncio.ensure_future(stop.wait())
        failing = asyncio.ensure_future(plane.failed.wait())
        await asyncio.wait((stopping, failing), return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        failing.cancel()
        if plane.failed.is_set():
            log.error("a background task failed (logged above); exiting so the process is restarted")
            return 1
        log.info("shutting down")
    except SourceError as exc:
        log.error("cannot start: %s", exc)
        return 1
    finally:
        await plane.stop()
    return 0


def run(args: argparse.Namespace) -> int:
    settings = load(ControlPlaneSettings, args)
    logs.setup(fmt=settings.log_format, level=settings.log_level)
    warn_misspelt_variables(ControlPlaneSettings)
    log.info("settings", extra={"settings": settings.redacted()})
    if settings.key_pepper is None:
        log.warning("DEVELOPMENT MODE: API keys are hashed with the fixed development pepper; never use in production")
    return asyncio.run(serve(settings))
