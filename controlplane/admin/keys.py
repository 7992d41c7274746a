"""``/admin/v1/keys``: issue, list, show, change, revoke and rotate API keys.

Every write goes to the key's Secret through the source and then waits, up to ``--admin-write-timeout``, until the
record the sync path derives from it is in Redis (read-your-writes); the response says ``synced: false`` if not.
A new key's Secret is only ever created, never written over; a rotation that fails after creating it, or is cancelled
(the server shuts down), deletes it again, so no active key is left whose plaintext no one was given.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from controlplane import kinds
from controlplane.admin import keysecret as ks
from controlplane.admin.auth import audit
from controlplane.admin.context import (
    AdminContext,
    check_query,
    context,
    duration_seconds,
    expiry,
    json_model,
    landed,
    principal,
    read_body,
    retry_conflicts,
    source_failed,
    undo_failed,
)
from controlplane.admin.errors import (
    InvalidCursor,
    InvalidRequest,
    KeyExpired,
    KeyNotFound,
    KeyRevoked,
    PageTooLarge,
    ReadOnlyKey,
    SourceUnavailable,
    UnknownTier,
)
from controlplane.admin.models import KeyCreate, KeyCreated, KeyPage, KeyPatch, KeyUpdated, Rotated, RotateRequest
from controlplane.admin.views import key_view
from controlplane.errors import ConflictError, SourceError, TranslateError
from controlplane.kinds import Obj, meta
from controlplane.translate import secret as tr
from gateway.contract import KeyRecord, KeyStatus, digest_key, key_id_of

DEFAULT_PAGE = 100
MAX_PAGE = 1000
MAX_EXAMINED = 20_000
STATUSES = ("active", "disabled", "revoked", "expired")

log = logging.getLogger("maas.controlplane.admin")


def find_key(ctx: AdminContext, key_id: str) -> KeyRecord:
    record = ctx.state.keys.get(key_id)
    if record is None:
        raise KeyNotFound(f"No API key with id '{key_id}'.", param="key_id")
    return record


def writable(ctx: AdminContext, record: KeyRecord) -> None:
    if not ks.is_managed(record, ctx.key_namespace):
        raise ReadOnlyKey(
            f"The key '{record.key_id}' comes from {record.source} and is read-only here; edit that Secret."
        )
    if record.status is KeyStatus.REVOKED:
        raise KeyRevoked(f"The key '{record.key_id}' is revoked.")


def _projection(record: KeyRecord | None) -> tuple[object, ...] | None:
    if record is None:
        return None
    limits = record.limits
    counts = (
        limits.requests.limit if limits and limits.requests else None,
        limits.tokens.limit if limits and limits.tokens else None,
    )
    expires = round(record.expires_at) if record.expires_at is not None else None
    return (record.status, record.tier, record.models, expires, record.user, record.groups, record.name, counts)


@dataclass(frozen=True, slots=True)
class Written:
    record: KeyRecord
    """As Redis holds it once synced, else as derived from the Secret."""
    synced: bool
    secret: Obj
    """The Secret as stored: its resourceVersion makes a later write or delete of it conditional."""


@dataclass(frozen=True, slots=True)
class NewKey:
    plaintext: str
    key_id: str
    written: Written


@dataclass(frozen=True, slots=True)
class Drawn:
    """A new key whose Secret is created, not yet known to be synced to Redis."""

    plaintext: str
    key_id: str
    expected: KeyRecord
    secret: Obj
    """As created: its resourceVersion makes a delete of it conditional."""


async def write_secret(ctx: AdminContext, obj: Obj, *, no_window: str = "give limits.window") -> Written:
    """Apply the Secret; wait until Redis holds the record derived from it. ``no_window`` says what to do about a
    limit that has no window of its own and none from its tier."""
    expected = _expected(ctx, obj, no_window)
    return await _synced(ctx, expected, await _apply(ctx, obj))


async def _apply(ctx: AdminContext, obj: Obj) -> Obj:
    try:
        return await ctx.source.apply(obj)
    except ConflictError:
        raise  # the caller reads the object again and redoes its change
    except SourceError as exc:
        raise source_failed(exc) from exc


def _expected(ctx: AdminContext, obj: Obj, no_window: str) -> KeyRecord:
    """The key record the Secret translates to, or the admin error that says why it cannot be stored."""
    try:
        expected, _ = tr.translate_secret(
            obj, pepper=ctx.pepper, tiers=list(ctx.state.tiers.values()), default_tier=ctx.state.default_tier
        )
    except TranslateError as exc:
        if exc.reason == "invalid_limit" and tr.takes_tier_windows(obj):
            raise InvalidRequest(
                f"A limit without a window takes its tier's, and the key's tier has no such limit; {no_window}.",
                param="limits.window",
            ) from exc
        raise InvalidRequest(f"The key cannot be stored: {exc}") from exc
    return expected


async def _synced(ctx: AdminContext, expected: KeyRecord, stored: Obj) -> Written:
    """``stored`` once Redis holds ``expected`` (or the write timeout passed: not synced)."""
    want = _projection(expected)
    synced = await ctx.state.wait_until(
        lambda: _projection(ctx.state.key_by_digest(expected.digest)) == want, within=ctx.write_timeout
    )
    record = ctx.state.key_by_digest(expected.digest) if synced else None
    return Written(record=record or expected, synced=synced, secret=stored)


async def issue(
    ctx: AdminContext, annotations: Mapping[str, str | None], *, no_window: str = "give limits.window"
) -> NewKey:
    """Draw a key, create its Secret and wait until Redis holds its record; cancelled after the create (the server
    stops), the Secret is deleted: no one will be given the key."""
    drawn = await draw(ctx, annotations, no_window=no_window)
    try:
        return await synced_key(ctx, drawn)
    except asyncio.CancelledError:
        await _withdraw_cancelled(ctx, drawn, change="The creation of a key")
        raise


async def draw(ctx: AdminContext, annotations: Mapping[str, str | None], *, no_window: str) -> Drawn:
    """Draw a key and create its Secret. The Secret is only ever created, never written over: should one of its
    name exist (another key with the same key id, a 64-bit digest prefix), another key is drawn."""

    async def attempt(_: int) -> Drawn:
        plaintext = ks.new_api_key()
        digest = digest_key(plaintext, ctx.pepper)
        key_id = key_id_of(digest)
        obj = ks.key_secret(digest=digest, namespace=ctx.key_namespace, key_id=key_id, annotations=annotations)
        expected = _expected(ctx, obj, no_window)
        return Drawn(plaintext=plaintext, key_id=key_id, expected=expected, secret=await _create(ctx, obj))

    return await retry_conflicts(attempt, what="The Secret name of a new key")


def _same_key(obj: Obj) -> Callable[[Obj], bool]:
    """Whether a Secret read back holds the key digest ``obj`` was created with."""
    digest = (obj.get("data") or {}).get(tr.DIGEST)
    return lambda secret: (secret.get("data") or {}).get(tr.DIGEST) == digest


async def _create(ctx: AdminContext, obj: Obj) -> Obj:
    """Create a new key's Secret. A create that failed but landed (the API server applied it and its answer was
    lost) is a create: the Secret read back holds this key. A create cut by a cancellation (the server stops) runs
    to its end in the background and the Secret it made is deleted: no one will be given the key."""
    creating = asyncio.ensure_future(_apply(ctx, obj))
    try:
        return await asyncio.shield(creating)
    except asyncio.CancelledError:
        _in_background(ctx, _delete_cut_create(ctx, obj, creating))
        raise
    except SourceUnavailable as exc:
        name = meta(obj)["name"]
        made = await landed(ctx, kinds.SECRET, ctx.key_namespace, name, _same_key(obj))
        if made is None:
            raise
        log.warning(
            "the new key's Secret %s/%s was created, though the answer was lost: %s", ctx.key_namespace, name, exc
        )
        return made


async def _delete_cut_create(ctx: AdminContext, obj: Obj, creating: asyncio.Future[Obj]) -> None:
    """Delete the Secret a create cut by a cancellation made, once the create has ended (on the version it made: a
    Secret another writer changed since is kept and named in the log)."""
    name = meta(obj)["name"]
    try:
        made: Obj | None = await creating
    except Exception:  # failed, or its answer lost: read back whether it made the Secret
        made = await landed(ctx, kinds.SECRET, ctx.key_namespace, name, _same_key(obj))
    if made is None:
        return
    version = str(meta(made).get("resourceVersion") or "")
    try:
        await ctx.source.delete(kinds.SECRET, ctx.key_namespace, name, resource_version=version)
    except SourceError as exc:
        log.error(
            "a new key's Secret %s/%s was created while its request was cancelled, and deleting it was not possible "
            "(%s): it is an active key whose plaintext no one was given; delete it (kubectl -n %s delete secret %s)",
            ctx.key_namespace,
            name,
            exc,
            ctx.key_namespace,
            name,
        )
        return
    log.warning("a new key's Secret %s/%s created while its request was cancelled was deleted", ctx.key_namespace, name)


async def synced_key(ctx: AdminContext, drawn: Drawn) -> NewKey:
    written = await _synced(ctx, drawn.expected, drawn.secret)
    return NewKey(plaintext=drawn.plaintext, key_id=drawn.key_id, written=written)


def _check_tier(ctx: AdminContext, tier: str | None) -> None:
    if tier is not None and tier not in ctx.state.tiers:
        raise UnknownTier(f"No tier named '{tier}'.", param="tier")


async def create_key(request: web.Request) -> web.Response:
    ctx = context(request)
    body = await read_body(request, KeyCreate)
    now = ctx.now()
    expires_at = expiry(body.expires_in, body.expires_at, now=now)
    if expires_at is not None and expires_at <= now:
        raise InvalidRequest("'expires_at' is in the past.", param="expires_at")
    if body.limits is not None and body.limits.window is not None:
        duration_seconds(body.limits.window, param="limits.window")
    _check_tier(ctx, body.tier)
    annotations: dict[str, str | None] = {
        tr.MAAS_USER: body.user,
        tr.GROUPS_ANNOTATION: ",".join(body.groups) or None,
        tr.MAAS_TIER: body.tier,
        tr.MAAS_STATUS: "active",
        tr.MAAS_MODELS: ",".join(body.models) or None,
        tr.EXPIRES_AT: ks.stamp(expires_at) if expires_at is not None else None,
        tr.KEY_NAME: body.name or None,
        tr.MAAS_CREATED: ks.stamp(now),
        **ks.limit_annotations(body.limits),
    }
    new = await issue(ctx, annotations)
    audit(principal(request), "key.create", key_id=new.key_id, user=body.user, tier=body.tier)
    view = key_view(new.written.record, ctx.state, namespace=ctx.key_namespace, now=ctx.now())
    return json_model(KeyCreated(**view.model_dump(), key=new.plaintext, synced=new.written.synced), status=201)


def _cursor(text: str) -> str:
    try:
        value = base64.urlsafe_b64decode(text.encode() + b"=" * (-len(text) % 4)).decode()
    except (binascii.Error, ValueError, UnicodeDecodeError) as exc:
        raise InvalidCursor("Invalid 'cursor': pass the 'next_cursor' of the previous page.", param="cursor") from exc
    if not value.startswith("k:") or len(value) > 100:
        raise InvalidCursor("Invalid 'cursor': pass the 'next_cursor' of the previous page.", param="cursor")
    return value[2:]


def _encode_cursor(key_id: str) -> str:
    return base64.urlsafe_b64encode(f"k:{key_id}".encode()).decode().rstrip("=")


def page_limit(query: Mapping[str, str]) -> int:
    text = query.get("limit")
    if text is None:
        return DEFAULT_PAGE
    try:
        value = int(text)
    except ValueError as exc:
        raise InvalidRequest("'limit' must be an integer.", param="limit") from exc
    if value > MAX_PAGE:
        raise PageTooLarge(f"'limit' may be at most {MAX_PAGE}.", param="limit")
    if value < 1:
        raise InvalidRequest("'limit' must be at least 1.", param="limit")
    return value


async def list_keys(request: web.Request) -> web.Response:
    ctx = context(request)
    check_query(request, ("user", "tier", "status", "limit", "cursor"))
    query = {name: value for name, value in request.query.items() if value}  # an empty parameter filters nothing
    limit = page_limit(query)
    after = _cursor(query["cursor"]) if "cursor" in query else ""
    status = query.get("status")
    if status is not None and status not in STATUSES:
        raise InvalidRequest(f"'status' must be one of {', '.join(STATUSES)}.", param="status")
    facets: list[tuple[str, str]] = [(name, query[name]) for name in ("user", "tier") if name in query]
    if status is not None:
        facets.append(("status", "active" if status == "expired" else status))
    now = ctx.now()
    keys = ctx.state.keys

    def accept(key_id: str) -> bool:
        record = keys[key_id]
        if status in ("active", "expired"):
            expired = record.expires_at is not None and record.expires_at <= now
            return expired == (status == "expired")
        return True

    ids, has_more, resume = ctx.state.index.page(
        facets=facets, after=after, limit=limit, accept=accept, max_examined=MAX_EXAMINED
    )
    data = [key_view(keys[i], ctx.state, namespace=ctx.key_namespace, now=now) for i in ids]
    cursor = _encode_cursor(resume) if has_more and resume is not None else None
    return json_model(KeyPage(data=data, has_more=has_more, next_cursor=cursor))


async def get_key(request: web.Request) -> web.Response:
    ctx = context(request)
    record = find_key(ctx, request.match_info["key_id"])
    return json_model(key_view(record, ctx.state, namespace=ctx.key_namespace, now=ctx.now()))


async def _current_secret(ctx: AdminContext, record: KeyRecord) -> Obj:
    try:
        obj = await ctx.source.get(kinds.SECRET, ctx.key_namespace, ks.secret_name(record.key_id))
    except SourceError as exc:
        raise source_failed(exc) from exc
    if obj is None:
        raise KeyNotFound(f"The Secret of key '{record.key_id}' is gone.", param="key_id")
    return obj


def _unchanged_since(secret: Obj, record: KeyRecord) -> None:
    """Refuse a change to a key the Secret (read under the key's lock) says is revoked, whatever the view says."""
    if (secret["metadata"].get("annotations") or {}).get(tr.MAAS_STATUS) == "revoked":
        raise KeyRevoked(f"The key '{record.key_id}' is revoked.")


async def _update(request: web.Request, updates: Mapping[str, str | None], action: str) -> web.Response:
    ctx = context(request)
    record = find_key(ctx, request.match_info["key_id"])
    writable(ctx, record)

    async def change(_: int) -> Written:
        secret = await _current_secret(ctx, record)
        if updates.get(tr.MAAS_STATUS) != "revoked":
            _unchanged_since(secret, record)
        return await write_secret(ctx, ks.with_annotations(secret, updates))

    async with ctx.locks(record.key_id):
        written = await retry_conflicts(change, what=f"The Secret of key '{record.key_id}'")
    audit(principal(request), action, key_id=record.key_id, changes=",".join(sorted(updates)) or None)
    view = key_view(written.record, ctx.state, namespace=ctx.key_namespace, now=ctx.now())
    return json_model(KeyUpdated(**view.model_dump(), synced=written.synced))


async def patch_key(request: web.Request) -> web.Response:
    ctx = context(request)
    body = await read_body(request, KeyPatch)
    given = body.model_fields_set
    updates: dict[str, str | None] = {}
    if "name" in given:
        updates[tr.KEY_NAME] = body.name or None
    if "tier" in given:
        _check_tier(ctx, body.tier)
        updates[tr.MAAS_TIER] = body.tier
    if "models" in given:
        updates[tr.MAAS_MODELS] = ",".join(body.models or ()) or None
    if "limits" in given:
        if body.limits is not None and body.limits.window is not None:
            duration_seconds(body.limits.window, param="limits.window")
        updates.update(ks.limit_annotations(body.limits))
    if given & {"expires_in", "expires_at"}:
        now = ctx.now()
        expires_at = expiry(body.expires_in, body.expires_at, now=now)
        if expires_at is not None and expires_at <= now:
            raise InvalidRequest("'expires_at' is in the past.", param="expires_at")  # as when a key is issued
        updates[tr.EXPIRES_AT] = ks.stamp(expires_at) if expires_at is not None else None
    if "disabled" in given and body.disabled is not None:
        updates[tr.MAAS_STATUS] = "disabled" if body.disabled else "active"
    return await _update(request, updates, "key.update")


async def revoke_key(request: web.Request) -> web.Response:
    ctx = context(request)
    record = find_key(ctx, request.match_info["key_id"])
    if record.status is KeyStatus.REVOKED and ks.is_managed(record, ctx.key_namespace):
        return json_model(
            KeyUpdated(
                **key_view(record, ctx.state, namespace=ctx.key_namespace, now=ctx.now()).model_dump(), synced=True
            )
        )
    return await _update(request, {tr.MAAS_STATUS: "revoked"}, "key.revoke")


async def rotate_key(request: web.Request) -> web.Response:
    ctx = context(request)
    body = await read_body(request, RotateRequest, optional=True)
    grace = duration_seconds(body.grace_period, param="grace_period", allow_zero=True)
    old = find_key(ctx, request.match_info["key_id"])
    writable(ctx, old)
    async with ctx.locks(old.key_id):
        old_secret = await _current_secret(ctx, old)
        _unchanged_since(old_secret, old)
        now = ctx.now()
        if old.expires_at is not None and old.expires_at <= now:
            raise KeyExpired(
                f"The key '{old.key_id}' expired; give it a new expiry (PATCH expires_in) before rotating it."
            )
        inherited = {k: v for k, v in (old_secret["metadata"].get("annotations") or {}).items() if k != ks.ROTATED_TO}
        inherited[tr.MAAS_CREATED] = ks.stamp(now)
        drawn = await draw(ctx, inherited, no_window="give the key limits.window (PATCH) before rotating it")
        ends = now + grace
        if old.expires_at is not None:
            ends = min(ends, old.expires_at)
        # stamps have whole seconds: rounded up a grace period is never cut short; "0s" is now, rounded down
        ends_at = ks.stamp(ends) if grace else ks.stamp(int(now))
        try:
            new = await synced_key(ctx, drawn)
            ended = await _end_old(ctx, old, old_secret, new, ends_at=ends_at)
        except asyncio.CancelledError:
            await _withdraw_cancelled(ctx, drawn, change=f"The rotation of key '{old.key_id}'")
            raise
    audit(principal(request), "key.rotate", key_id=old.key_id, new_key_id=new.key_id, grace_seconds=grace)
    return json_model(
        Rotated(
            key=new.plaintext,
            key_id=new.key_id,
            new=key_view(new.written.record, ctx.state, namespace=ctx.key_namespace, now=ctx.now()),
            old=key_view(ended.record, ctx.state, namespace=ctx.key_namespace, now=ctx.now()),
            grace_period_ends_at=ends_at,
            synced=new.written.synced and ended.synced,
        )
    )


async def _end_old(ctx: AdminContext, old: KeyRecord, old_secret: Obj, new: NewKey, *, ends_at: str) -> Written:
    """Write the old key's end of grace; a failure withdraws the new key, unless the write landed all the same."""

    async def end_old(attempt: int) -> Written:
        secret = old_secret if attempt == 0 else await _current_secret(ctx, old)
        _unchanged_since(secret, old)
        updates = {tr.EXPIRES_AT: ends_at, ks.ROTATED_TO: new.key_id}
        return await write_secret(ctx, ks.with_annotations(secret, updates))

    try:
        return await retry_conflicts(end_old, what=f"The Secret of key '{old.key_id}'")
    except Exception as exc:
        landed = await _ended_anyway(ctx, old, {tr.EXPIRES_AT: ends_at, ks.ROTATED_TO: new.key_id})
        if landed is None:
            await _withdraw(
                ctx, new.key_id, new.written.secret, change=f"The rotation of key '{old.key_id}'", cause=exc
            )
            raise
        log.warning("rotation of key '%s': the old key's write failed (%s) but had landed", old.key_id, exc)
        return landed


async def _ended_anyway(ctx: AdminContext, old: KeyRecord, updates: Mapping[str, str]) -> Written | None:
    """The old key's Secret when the rotation's write to it failed but landed all the same (a timeout after the API
    server had applied it): withdrawing the new key then would leave the holder without a working key once the
    grace period ends. None when it did not land, or when the Secret cannot be read to tell."""

    def ended(secret: Obj) -> bool:
        annotations = secret["metadata"].get("annotations") or {}
        return all(annotations.get(name) == value for name, value in updates.items())

    secret = await landed(ctx, kinds.SECRET, ctx.key_namespace, ks.secret_name(old.key_id), ended)
    if secret is None:
        return None
    return await _synced(ctx, _expected(ctx, secret, "give limits.window"), secret)


async def _withdraw_cancelled(ctx: AdminContext, drawn: Drawn, *, change: str) -> None:
    """Withdraw the new key of a creation or rotation cancelled after its Secret was created (the server shuts
    down): no one will be given its plaintext. The delete runs in a task of its own, which a second cancellation
    does not stop, and which the server's shutdown waits for (``AdminContext.undoing``); its failure is logged by
    ``_withdraw``. A rotation's write of the old key may have landed before the cancellation: the old key then ends
    with its grace period."""
    cause = RuntimeError("the request was cancelled")
    await asyncio.shield(_in_background(ctx, _withdraw(ctx, drawn.key_id, drawn.secret, change=change, cause=cause)))


def _in_background(ctx: AdminContext, undo: Coroutine[Any, Any, None]) -> asyncio.Future[None]:
    """Run an undo of a cancelled change in a task of its own, which a cancellation of the request does not stop
    and the server's shutdown waits for (``AdminContext.undoing``); a failure it raises has been logged by it."""
    task = asyncio.ensure_future(undo)
    ctx.undoing.add(task)

    def done(task: asyncio.Future[None]) -> None:
        ctx.undoing.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: the undo has logged why it failed

    task.add_done_callback(done)
    return task


async def _withdraw(ctx: AdminContext, key_id: str, secret: Obj, *, change: str, cause: Exception) -> None:
    """Delete the new key's Secret of a creation or rotation that failed after creating it: its plaintext is never
    returned, so it would stay an active key no one holds. The delete is conditional on the version that was created
    (a Secret another writer changed since is kept); if it fails, the answer and the log name the Secret to remove."""
    name = ks.secret_name(key_id)
    version = str(meta(secret).get("resourceVersion") or "")
    try:
        await ctx.source.delete(kinds.SECRET, ctx.key_namespace, name, resource_version=version)
    except SourceError as exc:
        raise undo_failed(
            exc,
            lambda why: (
                f"{change} failed ({cause}), after it had created the new key's Secret "
                f"{ctx.key_namespace}/{name} (key '{key_id}', whose plaintext was not returned). Deleting that "
                f"Secret was not possible: {why}. Delete it (kubectl -n {ctx.key_namespace} delete secret {name}), "
                "then try again."
            ),
        ) from exc
    log.warning(
        "%s failed (%s): its new key's Secret %s/%s was deleted",
        change,
        cause,
        ctx.key_namespace,
        name,
    )


def add_routes(app: web.Application) -> None:
    app.router.add_post("/admin/v1/keys", create_key)
    app.router.add_get("/admin/v1/keys", list_keys, allow_head=False)
    app.router.add_get("/admin/v1/keys/{key_id}", get_key, allow_head=False)
    app.router.add_patch("/admin/v1/keys/{key_id}", patch_key)
    app.router.add_delete("/admin/v1/keys/{key_id}", revoke_key)
    app.router.add_post("/admin/v1/keys/{key_id}/rotate", rotate_key)
