"""The main port's application: the admin API, self-service, ``/openapi.json`` and the sync status, behind one
middleware that authenticates admin calls and answers every error in the OpenAI envelope."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from controlplane.admin import keys, selfservice, tiers, usage
from controlplane.admin.context import ADMIN, MAX_BODY_BYTES, PRINCIPAL, AdminContext, context, json_model
from controlplane.admin.errors import (
    AdminError,
    BodyTooLarge,
    InvalidToken,
    NotSynced,
    StoreUnavailable,
    error_response,
)
from controlplane.admin.models import ModelList
from controlplane.admin.openapi import document
from controlplane.admin.views import model_view
from controlplane.ops import PARTS, Parts, status
from gateway.errors import StoreError

log = logging.getLogger("maas.controlplane.admin")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
CATCH_UP_SECONDS = 2.0
"""How long a call waits for this replica's view to reach what Redis holds when it arrives."""


@web.middleware
async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    ctx = context(request)
    path = request.path
    try:
        if path.startswith("/admin/"):
            if len(request.headers.getall("authorization", ())) > 1:  # which one counts is not for us to guess
                raise InvalidToken(
                    "More than one Authorization header: send one, 'Authorization: Bearer <admin token>'.",
                    headers={"www-authenticate": 'Bearer realm="maas-admin"'},
                )
            request[PRINCIPAL] = ctx.tokens.check(
                request.headers.get("authorization"), write=request.method in WRITE_METHODS
            )
        if path.startswith("/admin/") or path in ("/v1/models", "/v1/me"):
            if not ctx.state.loaded.is_set():
                raise NotSynced(
                    "The control plane has no view of the platform yet (Redis not read yet, or no sync has written "
                    "it yet); retry shortly."
                )
            # a change answered by another replica is in Redis, not yet necessarily in this replica's view
            await ctx.state.catch_up(within=CATCH_UP_SECONDS)
        if request.method not in WRITE_METHODS:
            return await handler(request)
        change = asyncio.get_running_loop().create_future()
        ctx.changes.add(change)
        try:
            return await handler(request)
        finally:
            ctx.changes.discard(change)
            change.set_result(None)
    except AdminError as exc:
        return exc.response()
    except StoreError as exc:
        return StoreUnavailable(f"Redis is unavailable: {exc}").response()
    except web.HTTPRequestEntityTooLarge:
        return BodyTooLarge(f"The body is larger than {MAX_BODY_BYTES} bytes.").response()
    except web.HTTPMethodNotAllowed as exc:
        allow = ", ".join(sorted(exc.allowed_methods))
        return error_response(
            405,
            message=f"{request.method} is not allowed on {path}; use {allow}.",
            code="method_not_allowed",
            headers={"Allow": allow},
        )
    except web.HTTPNotFound:
        return error_response(404, message=f"No such endpoint: {request.method} {path}.", code="not_found")


async def catalog(request: web.Request) -> web.Response:
    state = context(request).state
    return json_model(ModelList(data=[model_view(state.models[k]) for k in sorted(state.models)]))


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(document())


async def finish_undoing(app: web.Application) -> None:
    """On shutdown, after the requests in flight were cancelled: wait for the changes among them to end (aiohttp
    cancels them without waiting: one starts its undo as it meets the cancellation), then for the undos they
    started, within the runner's own bound: a cancelled key creation or rotation leaves no key behind whose
    plaintext no one was given."""
    ctx = app[ADMIN]
    if ctx.changes:
        await asyncio.wait(set(ctx.changes))
    pending = set(ctx.undoing)
    if pending:
        log.info("waiting for %d undo(s) of cancelled admin changes", len(pending))
        await asyncio.wait(pending)


def main_app(parts: Parts, ctx: AdminContext) -> web.Application:
    app = web.Application(middlewares=[guard], client_max_size=MAX_BODY_BYTES)
    app[PARTS] = parts
    app[ADMIN] = ctx
    app.router.add_get("/v1/sync", status, allow_head=False)
    app.router.add_get("/openapi.json", openapi, allow_head=False)
    app.router.add_get("/admin/v1/models", catalog, allow_head=False)
    keys.add_routes(app)
    tiers.add_routes(app)
    usage.add_routes(app)
    selfservice.add_routes(app)
    app.on_cleanup.append(finish_undoing)
    return app
