"""A small upstream that answers every request with what it received (method, path, headers, body) as JSON.

Run as ``python -m tests.support.echo PORT [NAME]``: the answer names the upstream (``upstream``), so a test with
several of them sees which one a request reached."""

from __future__ import annotations

import sys

from aiohttp import web

NAME = web.AppKey("name", str)


async def echo(request: web.BaseRequest) -> web.Response:
    body = await request.read()
    return web.json_response(
        {
            "upstream": request.app[NAME],
            "method": request.method,
            "path": request.raw_path,
            "headers": {k.lower(): v for k, v in request.headers.items()},
            "body": body.decode(errors="replace"),
        }
    )


def main() -> None:
    port = int(sys.argv[1])
    name = sys.argv[2] if len(sys.argv) > 2 else "echo"
    web.run_app(_app(name), host="127.0.0.1", port=port, print=None, access_log=None)


def _app(name: str) -> web.Application:
    app = web.Application()
    app[NAME] = name
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


if __name__ == "__main__":
    main()
