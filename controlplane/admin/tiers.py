"""``/admin/v1/tiers``: tiers live in the two ConfigMaps the control plane reads (``tier-to-group-mapping``:
name, displayName, level, groups; ``maas-tier-limits``: limits and models), so a change made here is the same as a
``kubectl edit`` of them and reaches every maas authz through the normal sync path."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
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
    landed,
    principal,
    read_body,
    retry_conflicts,
    undo_failed,
)
from controlplane.admin.errors import (
    InvalidRequest,
    TierInUse,
    TierNotFound,
)
from controlplane.admin.models import TierDeleted, TierList, TierPut, TierUpdated
from controlplane.admin.views import tier_view
from controlplane.errors import ConflictError, SourceError
from controlplane.kinds import Obj, meta
from controlplane.translate.common import as_dict
from controlplane.translate.tiers import LIMITS_KEY, TIERS_KEY
from gateway.contract import DEFAULT_TIERS, Limits, TierRecord

log = logging.getLogger("maas.controlplane.admin")

BORROWERS_SHOWN = 5
"""Key ids named in the refusal of a tier change that would leave keys without the window they take from it."""
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


Entries = list[dict[str, Any]]
Edit = Callable[[Entries, dict[str, Any]], tuple[Entries, dict[str, Any]]]


def _documents(mapping_obj: Obj | None, limits_obj: Obj | None) -> tuple[Entries, dict[str, Any]]:
    """(tier mapping entries, limits document) as the ConfigMaps hold them, defaulting to the built-in tiers."""
    builtin = [
        {"name": t.name, "displayName": t.display_name, "level": t.level, "groups": list(t.groups)}
        for t in DEFAULT_TIERS
    ]
    entries = [as_dict(e) for e in _load(mapping_obj, TIERS_KEY, builtin)]
    builtin_limits = {t.name: {**_limits_doc(t.limits), "models": list(t.models)} for t in DEFAULT_TIERS}
    limits = _load(limits_obj, LIMITS_KEY, {} if limits_obj is not None else builtin_limits)
    return entries, limits


@dataclass(frozen=True, slots=True)
class _Write:
    """One ConfigMap's part of a tier change."""

    before: Obj | None
    """The ConfigMap as read (None: there was none)."""
    after: Obj
    """What to write; it carries ``before``'s resourceVersion, so it is written only if unchanged since."""

    @property
    def name(self) -> str:
        return f"ConfigMap {meta(self.after)['namespace']}/{meta(self.after)['name']}"


def _write(before: Obj | None, *, namespace: str, name: str, key: str, document: Any) -> _Write | None:
    """The write that makes the ConfigMap hold ``document``; None if it holds it already (one write fewer that
    could fail halfway through a change)."""
    if before is not None:
        try:
            if yaml.safe_load(str(as_dict(before.get("data")).get(key) or "")) == document:
                return None
        except (yaml.YAMLError, ValueError):
            pass  # unreadable: written over, as the edit started from the defaults
    metadata: dict[str, Any] = {
        "name": name,
        "namespace": namespace,
        "labels": {"app.kubernetes.io/name": "maas-tiers"},
    }
    if before is not None:
        metadata["resourceVersion"] = meta(before).get("resourceVersion")
    data = {key: yaml.safe_dump(document, sort_keys=False)}
    return _Write(before=before, after={"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data})


async def _attempt(ctx: AdminContext, edit: Edit) -> None:
    """Read both ConfigMaps, edit, write back what changed: all of it or, as the cluster ends up, none.

    The limits go first: a new tier's limits are in place before the tier exists (the other way round it would,
    for a moment, be a tier without limits). When the second write fails, the first is taken back, so a change
    that fails, or loses a race and is started over, leaves the ConfigMaps as they were; if the first cannot be
    taken back, ``PartialChange`` says what each one holds."""
    namespace = ctx.tier_namespace()
    mapping_obj = await ctx.source.get(kinds.CONFIGMAP, namespace, ctx.tier_configmap)
    limits_obj = await ctx.source.get(kinds.CONFIGMAP, namespace, ctx.tier_limits_configmap)
    entries, limits = edit(*_documents(mapping_obj, limits_obj))
    planned = (
        _write(limits_obj, namespace=namespace, name=ctx.tier_limits_configmap, key=LIMITS_KEY, document=limits),
        _write(mapping_obj, namespace=namespace, name=ctx.tier_configmap, key=TIERS_KEY, document=entries),
    )
    done: list[tuple[_Write, Obj]] = []
    for write in (w for w in planned if w is not None):
        try:
            done.append((write, await ctx.source.apply(write.after)))
        except SourceError as exc:
            landed = None if isinstance(exc, ConflictError) else await _landed(ctx, write)
            if landed is not None:
                log.warning("tier change: the write of %s failed (%s) but had landed", write.name, exc)
                done.append((write, landed))
                continue
            for written, stored in done:
                await _take_back(ctx, written, stored, failed=write, cause=exc)
            raise


async def _landed(ctx: AdminContext, write: _Write) -> Obj | None:
    """The ConfigMap when a write of it that failed was applied all the same (its answer lost: a timeout, a 5xx
    after serving): taking the other ConfigMap back then would leave the half change a failure is meant to avoid.
    None when it holds something else, or cannot be read to tell."""
    before = meta(write.before).get("resourceVersion") if write.before is not None else None

    def written(now: Obj) -> bool:
        return now.get("data") == write.after["data"] and (before is None or meta(now).get("resourceVersion") != before)

    return await landed(ctx, kinds.CONFIGMAP, meta(write.after)["namespace"], meta(write.after)["name"], written)


async def _take_back(ctx: AdminContext, write: _Write, stored: Obj, *, failed: _Write, cause: SourceError) -> None:
    """Put back what ``write`` replaced, on condition of the resourceVersion it got (``stored``): a ConfigMap that
    another writer changed after this change wrote it keeps that writer's version, and the answer says so."""
    version = str(meta(stored).get("resourceVersion") or "")
    namespace, name = meta(write.after)["namespace"], meta(write.after)["name"]
    try:
        if write.before is None:  # this change created it
            await ctx.source.delete(kinds.CONFIGMAP, namespace, name, resource_version=version)
        else:
            kept = {k: v for k, v in meta(write.before).items() if k != "managedFields"}
            await ctx.source.apply({**write.before, "metadata": {**kept, "resourceVersion": version}})
    except SourceError as exc:
        raise undo_failed(
            exc,
            lambda why: (
                f"The tier change is half written: {write.name} holds it (resourceVersion {version}) and "
                f"{failed.name} does not (its write failed: {cause}). Restoring {write.name} was not possible: {why}. "
                "Check both ConfigMaps, then repeat or undo the change."
            ),
        ) from exc
    log.warning("tier change: %s was written, %s failed (%s): %s restored", write.name, failed.name, cause, write.name)


async def _change(ctx: AdminContext, edit: Edit) -> None:
    """Under one lock in this replica; started over, after a pause, when another writer changed a ConfigMap in
    between (the writes carry the resourceVersions read)."""

    async def attempt(_: int) -> None:
        await _attempt(ctx, edit)

    async with ctx.locks("tiers"):
        await retry_conflicts(attempt, what="The tier ConfigMaps")


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
    borrowers = ctx.window_borrowers(expected)
    if borrowers:
        shown = ", ".join(borrowers[:BORROWERS_SHOWN]) + (", ..." if len(borrowers) > BORROWERS_SHOWN else "")
        raise TierInUse(
            f"{len(borrowers)} active key(s) take a limit's window from their tier, which this change would leave "
            f"without that limit ({shown}); give them their own window (PATCH limits.window), or disable or revoke "
            "them, first.",
            param="limits",
        )
    entry = {"name": name, "displayName": expected.display_name, "level": body.level, "groups": list(expected.groups)}

    def edit(entries: Entries, limits: dict[str, Any]) -> tuple[Entries, dict[str, Any]]:
        # in its place: a change of the limits alone leaves the mapping as it was, and only the limits are written
        at = next((i for i, e in enumerate(entries) if e.get("name") == name), len(entries))
        others = [e for e in entries if e.get("name") != name]
        own = {**_limits_doc(expected.limits), "models": list(expected.models)}
        return [*others[:at], entry, *others[at:]], {**limits, name: own}

    created = name not in ctx.state.tiers
    await _change(ctx, edit)
    synced = await ctx.state.wait_until(lambda: ctx.state.tiers.get(name) == expected, within=ctx.write_timeout)
    audit(principal(request), "tier.put", tier=name)
    view = tier_view(ctx.state.tiers.get(name) or expected) if synced else tier_view(expected)
    return json_model(TierUpdated(**view.model_dump(), synced=synced), status=201 if created else 200)


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

    def edit(entries: Entries, limits: dict[str, Any]) -> tuple[Entries, dict[str, Any]]:
        return [e for e in entries if e.get("name") != name], {k: v for k, v in limits.items() if k != name}

    await _change(ctx, edit)
    synced = await ctx.state.wait_until(lambda: name not in ctx.state.tiers, within=ctx.write_timeout)
    audit(principal(request), "tier.delete", tier=name)
    return json_model(TierDeleted(id=name, deleted=True, synced=synced))


def add_routes(app: web.Application) -> None:
    app.router.add_get("/admin/v1/tiers", list_tiers, allow_head=False)
    app.router.add_get("/admin/v1/tiers/{name}", get_tier, allow_head=False)
    app.router.add_put("/admin/v1/tiers/{name}", put_tier)
    app.router.add_delete("/admin/v1/tiers/{name}", delete_tier)
