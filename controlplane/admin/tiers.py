"""``/admin/v1/tiers``: tiers live in the two ConfigMaps the control plane reads (``tier-to-group-mapping``:
name, displayName, level, groups; ``maas-tier-limits``: limits and models), so a change made here is the same as a
``kubectl edit`` of them and reaches every maas authz through the normal sync path."""

from __future__ import annotations

from typing import Any

import yaml
from aiohttp import web

from controlplane import kinds
from controlplane.admin.auth import audit
from controlplane.admin.context import (
    AdminContext,
    context,
    duration_seconds,
    json_model,
    principal,
    read_body,
    source_failed,
)
from controlplane.admin.errors import InvalidRequest, TierInUse, TierNotFound
from controlplane.admin.models import Deleted, TierList, TierPut
from controlplane.admin.views import tier_view
from controlplane.errors import SourceError
from controlplane.kinds import Obj
from controlplane.translate.common import as_dict
from controlplane.translate.tiers import LIMITS_KEY, TIERS_KEY
from gateway.contract import DEFAULT_TIERS, Limits, TierRecord

_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


def _name(request: web.Request) -> str:
    name = request.match_info["name"]
    if not name or len(name) > 63 or not set(name) <= _NAME_CHARS:
        raise InvalidRequest("A tier name is 1-63 letters, digits, '.', '_' or '-'.", param="name")
    return name


def _load(obj: Obj | None, key: str, default: Any) -> Any:
    if obj is None:
        return default
    try:
        value = yaml.safe_load(str(as_dict(obj.get("data")).get(key) or ""))
    except (yaml.YAMLError, ValueError):  # ValueError: a timestamp-looking scalar that is no date (2025-02-30)
        return default
    return value if isinstance(value, type(default)) else default


def _limits_doc(limits: Limits) -> dict[str, Any]:
    return {
        d: {"limit": getattr(limits, d).limit, "window": getattr(limits, d).window}
        for d in ("requests", "tokens")
        if getattr(limits, d) is not None
    }


async def _read(ctx: AdminContext) -> tuple[str, list[dict[str, Any]], dict[str, Any]]:
    """(namespace, tier mapping entries, limits document), defaulting to the built-in tiers."""
    namespace = ctx.tier_namespace()
    try:
        mapping_obj = await ctx.source.get(kinds.CONFIGMAP, namespace, ctx.tier_configmap)
        limits_obj = await ctx.source.get(kinds.CONFIGMAP, namespace, ctx.tier_limits_configmap)
    except SourceError as exc:
        raise source_failed(exc) from exc
    builtin = [
        {"name": t.name, "displayName": t.display_name, "level": t.level, "groups": list(t.groups)}
        for t in DEFAULT_TIERS
    ]
    entries = [as_dict(e) for e in _load(mapping_obj, TIERS_KEY, builtin)]
    builtin_limits = {t.name: {**_limits_doc(t.limits), "models": list(t.models)} for t in DEFAULT_TIERS}
    limits = _load(limits_obj, LIMITS_KEY, {} if limits_obj is not None else builtin_limits)
    return namespace, entries, limits


def _configmap(namespace: str, name: str, key: str, document: Any) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app.kubernetes.io/name": "maas-tiers"}},
        "data": {key: yaml.safe_dump(document, sort_keys=False)},
    }


async def _write(ctx: AdminContext, namespace: str, entries: list[dict[str, Any]], limits: dict[str, Any]) -> None:
    try:
        await ctx.source.apply(_configmap(namespace, ctx.tier_limits_configmap, LIMITS_KEY, limits))
        await ctx.source.apply(_configmap(namespace, ctx.tier_configmap, TIERS_KEY, entries))
    except SourceError as exc:
        raise source_failed(exc) from exc


async def list_tiers(request: web.Request) -> web.Response:
    state = context(request).state
    tiers = sorted(state.tiers.values(), key=lambda t: (t.level, t.name))
    return json_model(TierList(data=[tier_view(t) for t in tiers]))


async def get_tier(request: web.Request) -> web.Response:
    name = _name(request)
    tier = context(request).state.tiers.get(name)
    if tier is None:
        raise TierNotFound(f"No tier named '{name}'.", param="name")
    return json_model(tier_view(tier))


async def put_tier(request: web.Request) -> web.Response:
    ctx = context(request)
    name = _name(request)
    body = await read_body(request, TierPut)
    for dimension in ("requests", "tokens"):
        limit = getattr(body.limits, dimension)
        if limit is not None:
            duration_seconds(limit.window, param=f"limits.{dimension}.window")
    expected = TierRecord(
        name=name,
        display_name=body.display_name or name,
        level=body.level,
        groups=tuple(dict.fromkeys(body.groups)),
        limits=Limits.model_validate(body.limits.model_dump(exclude_none=True)),
        models=tuple(body.models),
    )
    namespace, entries, limits = await _read(ctx)
    entry = {"name": name, "displayName": expected.display_name, "level": body.level, "groups": list(expected.groups)}
    entries = [e for e in entries if e.get("name") != name] + [entry]
    limits = {**limits, name: {**_limits_doc(expected.limits), "models": list(expected.models)}}
    created = name not in ctx.state.tiers
    await _write(ctx, namespace, entries, limits)
    await ctx.state.wait_until(lambda: ctx.state.tiers.get(name) == expected, within=ctx.write_timeout)
    audit(principal(request), "tier.put", tier=name)
    return json_model(tier_view(ctx.state.tiers.get(name) or expected), status=201 if created else 200)


async def delete_tier(request: web.Request) -> web.Response:
    ctx = context(request)
    name = _name(request)
    if name not in ctx.state.tiers:
        raise TierNotFound(f"No tier named '{name}'.", param="name")
    if name == ctx.state.default_tier:
        raise TierInUse(f"'{name}' is the default tier (--default-tier) and cannot be deleted.", param="name")
    users = ctx.state.users_of_tier(name)
    if users:
        raise TierInUse(f"{users} key(s) use the tier '{name}'; move them to another tier first.", param="name")
    namespace, entries, limits = await _read(ctx)
    entries = [e for e in entries if e.get("name") != name]
    limits = {k: v for k, v in limits.items() if k != name}
    await _write(ctx, namespace, entries, limits)
    await ctx.state.wait_until(lambda: name not in ctx.state.tiers, within=ctx.write_timeout)
    audit(principal(request), "tier.delete", tier=name)
    return json_model(Deleted(id=name, deleted=True))


def add_routes(app: web.Application) -> None:
    app.router.add_get("/admin/v1/tiers", list_tiers, allow_head=False)
    app.router.add_get("/admin/v1/tiers/{name}", get_tier, allow_head=False)
    app.router.add_put("/admin/v1/tiers/{name}", put_tier)
    app.router.add_delete("/admin/v1/tiers/{name}", delete_tier)
