"""Every demo component in one process on the in-memory store, for machines without ``redis-server``.

``maas demo`` falls back to this when it finds no Redis: the control plane, ``maas authz``, and a ``maas meter`` and
``maas sim`` per model run as tasks of one event loop, sharing one ``memory://`` store (separate processes could
not share it). Envoy stays a process of its own. Every component keeps its own ports, so the demo waits for the
same readiness URLs either way. State is lost at exit; this mode is for trying the product, never for production.

Run as ``python -m controlplane.allinone SPEC.json`` (the demo writes the spec).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys
from pathlib import Path
from typing import Any

import uvloop
from aiohttp import web

from controlplane.runner import ControlPlane
from controlplane.settings import ControlPlaneSettings
from gateway import logs
from gateway.authz.main import serve as serve_authz
from gateway.authz.settings import AuthzSettings
from gateway.meter.app import build_meter, serving
from gateway.meter.settings import MeterSettings
from gateway.settings import load
from gateway.sim.server import SimConfig, build_app
from gateway.store.memory import MemoryStore

log = logging.getLogger("maas.demo")


async def _site(app: web.Application, host: str, port: int, runners: list[web.AppRunner]) -> None:
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    runners.append(runner)


async def run(spec: dict[str, Any]) -> None:
    store = MemoryStore()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    common: dict[str, Any] = {"redis_url": "memory://", "dev": True, "log_format": "text"}
    runners: list[web.AppRunner] = []
    meters = contextlib.AsyncExitStack()
    for m in spec["models"]:
        sim = SimConfig(served=(m["name"],), ttft_ms=spec["ttft_ms"], tokens_per_second=spec["tokens_per_second"])
        await _site(build_app(sim), "127.0.0.1", m["sim_port"], runners)
        meter_settings = load(
            MeterSettings,
            upstream=f"http://127.0.0.1:{m['sim_port']}",
            port=m["meter_port"],
            ops_port=m["meter_ops"],
            **common,
        )
        meter = build_meter(meter_settings, store=store)
        await meters.enter_async_context(
            serving(
                meter,
                host="127.0.0.1",
                port=m["meter_port"],
                ops_port=m["meter_ops"],
                max_connections=meter_settings.max_connections,
                shutdown_grace=1.0,
            )
        )
    plane = ControlPlane(
        load(
            ControlPlaneSettings,
            source=f"dir:{spec['manifests']}",
            port=spec["admin_port"],
            ops_port=spec["cp_ops"],
            host=spec["host"],
            leader_election=False,
            **common,
        ),
        store=store,
    )
    await plane.start()
    authz_settings = load(
        AuthzSettings, port=spec["authz_port"], ops_port=spec["authz_ops"], host="127.0.0.1", **common
    )
    authz = asyncio.create_task(serve_authz(authz_settings, stop=stop, store=store), name="authz")
    log.warning("single process on the in-memory store: state is lost at exit; not for production")
    await stop.wait()
    with contextlib.suppress(asyncio.CancelledError):
        await authz
    await plane.stop()
    await meters.aclose()
    for runner in reversed(runners):
        await runner.cleanup()


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    logs.setup(fmt="text", level="info")
    uvloop.run(run(spec))


if __name__ == "__main__":
    main()
