"""Self-service for key holders: ``GET /v1/models`` (OpenAI list shape, only the models the key may use, with a
``ready`` field) and ``GET /v1/me`` (the key's user, tier, limits, remaining quota and usage this month).

A caller is identified by its API key, in the header forms maas authz takes (the same parser), or, behind the
gateway, by the identity headers maas authz signed after checking the key (authz removes the key itself from the
upstream request). Identity headers are only accepted with a valid signature under ``--identity-secret``.
"""

from __future__ import annotations

import logging

from aiohttp import web

from controlplane.admin.context import AdminContext, context, json_model, rfc3339
from controlplane.admin.models import LimitsView, Me, OpenAIModel, OpenAIModelList, Usage
from controlplane.admin.usage import quota_of, read_rows, today_days
from controlplane.admin.views import effective_limits, limits_view
from gateway.contract import KeyRecord, KeyStatus, digest_key
from gateway.decision import EXPIRED_KEY, INVALID_KEY, Denial, credential, error_body
from gateway.identity import H_KEY_ID, H_SIGNATURE, IdentityError, StaleIdentity, verify
from gateway.logs import RateLimitedLog

log = logging.getLogger("maas.controlplane.selfservice")
_skewed = RateLimitedLog(log)


class Denied(Exception):
    def __init__(self, denial: Denial) -> None:
        super().__init__(denial.code)
        self.denial = denial

    def response(self) -> web.Response:
        d = self.denial
        return web.Response(body=d.body, status=d.status, headers=dict(d.headers), content_type="application/json")


def _identity_denial(message: str) -> Denial:
    body = error_body(message, error_type="invalid_request_error", code="invalid_identity")
    return Denial(status=401, code="invalid_identity", body=body)


def caller(request: web.Request, ctx: AdminContext) -> KeyRecord:
    headers = request.headers
    record: KeyRecord | None
    if ctx.identity_secret is not None and headers.get(H_KEY_ID) and headers.get(H_SIGNATURE):
        try:
            identity = verify({k.lower(): v for k, v in headers.items()}, ctx.identity_secret, now=ctx.now())
        except StaleIdentity as exc:
            _skewed.warning(
                "refused the identity of key %s: %s; check the clock offsets to Redis (maas_*_clock_offset_seconds) "
                "and NTP on this node and the maas authz nodes",
                headers.get(H_KEY_ID),
                exc,
            )
            raise Denied(_identity_denial(f"Identity headers rejected: {exc}")) from exc
        except IdentityError as exc:
            raise Denied(_identity_denial(f"Identity headers rejected: {exc}")) from exc
        record = ctx.state.keys.get(identity.key_id)
    else:
        token = credential(headers.get, lambda name: len(headers.getall(name, [])))
        if isinstance(token, Denial):
            raise Denied(token)
        record = ctx.state.key_by_digest(digest_key(token, ctx.pepper))
    if record is None or record.status is not KeyStatus.ACTIVE:
        raise Denied(INVALID_KEY)
    if record.expires_at is not None and record.expires_at <= ctx.now():
        raise Denied(EXPIRED_KEY)
    return record


def allowed_models(ctx: AdminContext, record: KeyRecord) -> list[str]:
    tier = ctx.state.tier_of(record)
    allowed = set(record.models) or (set(tier.models) if tier is not None else set())
    return sorted(m for m in ctx.state.models if not allowed or m in allowed)


async def my_models(request: web.Request) -> web.Response:
    ctx = context(request)
    try:
        record = caller(request, ctx)
    except Denied as exc:
        return exc.response()
    models = ctx.state.models
    data = [
        OpenAIModel(id=m, created=0, owned_by=models[m].namespace or "maas", ready=models[m].ready)
        for m in allowed_models(ctx, record)
    ]
    return json_model(OpenAIModelList(data=data))


async def me(request: web.Request) -> web.Response:
    ctx = context(request)
    try:
        record = caller(request, ctx)
    except Denied as exc:
        return exc.response()
    tier = ctx.state.tier_of(record)
    days = today_days(ctx.now())
    rows = await read_rows(ctx, key_ids=[record.key_id], days=days)
    prompt = sum(r.prompt_tokens for r in rows)
    completion = sum(r.completion_tokens for r in rows)
    usage = Usage(
        period=days[0].strftime("%Y-%m"),
        from_date=days[0].isoformat(),
        to_date=days[-1].isoformat(),
        requests=sum(r.requests for r in rows),
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
    )
    body = Me(
        key_id=record.key_id,
        name=record.name,
        user=record.user,
        groups=list(record.groups),
        tier=tier.name if tier is not None else None,
        models=list(record.models) or (list(tier.models) if tier is not None else []),
        expires_at=rfc3339(record.expires_at),
        limits=limits_view(effective_limits(record, tier)) or LimitsView(),
        quota=await quota_of(ctx, record),
        usage=usage,
    )
    return json_model(body)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/models", my_models, allow_head=False)
    app.router.add_get("/v1/me", me, allow_head=False)
