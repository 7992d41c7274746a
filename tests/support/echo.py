"""A small upstream that answers every request with what it received (method, path, headers, body) as JSON.

Run as ``python -m tests.support.echo PORT``."""

from __future__ import annotations

import sys

from aiohttp import web


async def echo(request: web.BaseRequest) -> web.Response:
    body = await request.read()
    return web.json_response(
        {
            "method": request.method,
            "path": request.raw_path,
            "headers": {k.lower(): v for k, v in request.headers.items()},
            "body": body.decode(errors="replace"),
        }
    )


def main() -> None:
    port = int(sys.argv[1])
    web.run_app(_app(), host="127.0.0.1", port=port, print=None, access_log=None)


def _app() -> web.Application:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


if __name__ == "__main__":
    main()
