"""The ceiling for a Python HTTP ext_authz on this machine: aiohttp's low-level server on uvloop, access log off,
answering 200 to everything (the server ``maas authz --http-server aiohttp`` runs on; by default the check port
runs on a leaner httptools server). Also a minimal upstream.

Run as ``python -m benchmarks.trivial PORT``."""

from __future__ import annotations

import asyncio
import sys

import uvloop
from aiohttp import web


async def ok(_: web.BaseRequest) -> web.Response:
    return web.Response(status=200, body=b'{"ok":true}', content_type="application/json")


async def serve(port: int) -> None:
    runner = web.ServerRunner(web.Server(ok, access_log=None), handle_signals=True)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()
    await asyncio.Event().wait()


def main() -> None:
    uvloop.run(serve(int(sys.argv[1])))


if __name__ == "__main__":
    main()
