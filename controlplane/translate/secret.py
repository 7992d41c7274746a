"""API-key Secret -> KeyRecord. The plaintext key is hashed here and never leaves this module.

Reads Kuadrant-format Secrets as they are (``data.api_key``; annotations ``secret.kuadrant.io/user-id`` and
``kuadrant.io/groups``), the ``maas/*`` labels/annotations of maas-billing's key manager, and our own admin-issued
Secrets (label ``maas.io/api-key=true``) that hold only the digest in ``data.digest``.

``maas/request-limit`` / ``maas/token-limit`` override the tier's limits over ``maas/time-window``; without a
window they use the window of the key's tier, which is why the translator takes the tiers. A revoked or disabled key
needs no limits to be denied: limits that cannot be read leave it without them rather than refused.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime

from controlplane.errors import TranslateError
from controlplane.kinds import Obj, annotations_of, key_of, labels_of, meta
from controlplane.translate.common import MAX_LIMIT, as_dict, csv, parse_int, parse_time
from gateway.contract import (
    EVERYONE,
    KeyRecord,
    KeyStatus,
    Limit,
    Limits,
    TierRecord,
    WindowError,
    digest_key,
    key_id_of,
)

API_KEY = "api_key"
DIGEST = "digest"
USER_ANNOTATION = "secret.kuadrant.io/user-id"
GROUPS_ANNOTATION = "kuadrant.io/groups"
MAAS_USER = "maas/user-id"
MAAS_TIER = "maas/tier"
MAAS_STATUS = "maas/status"
MAAS_MODELS = "maas/models-allowed"
MAAS_TOKEN_LIMIT = "maas/token-limit"
MAAS_REQUEST_LIMIT = "maas/request-limit"
MAAS_WINDOW = "maas/time-window"
MAAS_CREATED = "maas/created-at"
EXPIRES_AT = "maas.io/expires-at"
KEY_NAME = "maas.io/key-name"
_DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")
_STATUSES = {
    "active": KeyStatus.ACTIVE,
    "inactive": KeyStatus.DISABLED,
    "disabled": KeyStatus.DISABLED,
    "revoked": KeyStatus.REVOKED,
}


def _data_value(secret: Obj, field: str) -> bytes | None:
    """``data[field]`` base64-decoded (``stringData`` as the API server folds it, for raw manifests)."""
    string_data = as_dict(secret.get("stringData"))
    if field in string_data:
        value = string_data[field]
        return b"" if value is None else str(value).encode()  # "api_key:" with nothing after it is empty
    data = as_dict(secret.get("data"))
    if field not in data:
        return None
    raw = data[field]
    if not isinstance(raw, str):
        raise TranslateError(f"data.{field} is not a string", reason="invalid_base64")
    try:
        # line breaks are ignored, as the API server's decoder does (`base64` wraps its output at 76 columns)
        return base64.b64decode(raw.replace("\r", "").replace("\n", "").encode(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise TranslateError(f"data.{field} is not valid base64", reason="invalid_base64") from exc


def _digest(secret: Obj, pepper: bytes) -> str:
    plaintext = _data_value(secret, API_KEY)
    if plaintext is None:
        stored = _data_value(secret, DIGEST)
        if stored is None:
            raise TranslateError("Secret has no data.api_key", reason="missing_api_key")
        digest = stored.decode(errors="replace").strip().lower()
        if not _DIGEST_RE.match(digest):
            raise TranslateError("data.digest is not a hex SHA-256 digest", reason="invalid_digest")
        return digest
    key = plaintext.strip()
    if not key:
        raise TranslateError("data.api_key is empty", reason="empty_api_key")
    return digest_key(key, pepper)


def resolve_tier(
    *, explicit: str | None, groups: Sequence[str], tiers: Sequence[TierRecord], default: str
) -> TierRecord | None:
    """``maas/tier`` if set and known, else the highest-level tier whose groups intersect the key's (every key is in
    ``system:authenticated``), else ``default`` (as maas authz resolves it: an unknown tier name never leaves a key
    without limits)."""
    by_name = {t.name: t for t in tiers}
    if explicit and explicit in by_name:
        return by_name[explicit]
    wanted = {*groups, EVERYONE}
    matching = [t for t in tiers if wanted.intersection(t.groups)]
    if matching:
        return max(matching, key=lambda t: (t.level, t.name))
    return by_name.get(default)


LATEST = 253_402_300_799.0
"""9999-12-31T23:59:59Z: an expiry past it is a misreading (epoch milliseconds read as seconds, say)."""


def _expiry(value: str | None) -> float | None:
    """``maas.io/expires-at``: RFC 3339 (``T``/``Z`` in either case; no offset is UTC) or epoch seconds. Unreadable
    or out of range is an error, not "never expires": the key is skipped, as for any invalid annotation."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        epoch = float(text)
    except ValueError:
        try:
            moment = datetime.fromisoformat(text.upper().replace("Z", "+00:00"))
        except ValueError as exc:
            raise TranslateError(f"{EXPIRES_AT} is not a time: {value!r}", reason="invalid_expiry") from exc
        epoch = (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()
    if not 0 <= epoch <= LATEST:
        raise TranslateError(f"{EXPIRES_AT} is out of range (epoch seconds?): {value!r}", reason="invalid_expiry")
    return epoch


def takes_tier_windows(secret: Obj) -> bool:
    """Whether the Secret's own limits take their window from its tier (so a tier change may change them)."""
    values = {**labels_of(secret), **annotations_of(secret)}
    return bool(values.get(MAAS_REQUEST_LIMIT) or values.get(MAAS_TOKEN_LIMIT)) and not values.get(MAAS_WINDOW)


def _no_window(annotation: str, tier: TierRecord | None) -> str:
    """A limit without ``maas/time-window`` takes its tier's window; a tier without that limit has none to give,
    and the limit was dropped without a word (the key ran without it): the Secret is refused instead."""
    raise TranslateError(
        f"{annotation} needs {MAAS_WINDOW}: tier {tier.name if tier else '(none)'!r} has no such limit to take a "
        "window from",
        reason="invalid_limit",
    )


def _limits(values: Mapping[str, str], *, tier: TierRecord | None) -> tuple[Limits | None, bool]:
    """(per-key limit overrides, whether they depend on the tier's windows)."""
    requests_text = values.get(MAAS_REQUEST_LIMIT)
    tokens_text = values.get(MAAS_TOKEN_LIMIT)
    if not requests_text and not tokens_text:
        return None, False
    window = values.get(MAAS_WINDOW)
    depends = window is None
    try:
        requests = tokens = None
        if requests_text:
            count = parse_int(requests_text, what=MAAS_REQUEST_LIMIT, reason="invalid_limit", maximum=MAX_LIMIT)
            tier_window = tier.limits.requests.window if tier and tier.limits.requests else None
            requests = Limit(limit=count, window=window or tier_window or _no_window(MAAS_REQUEST_LIMIT, tier))
        if tokens_text:
            count = parse_int(tokens_text, what=MAAS_TOKEN_LIMIT, reason="invalid_limit", maximum=MAX_LIMIT)
            tier_window = tier.limits.tokens.window if tier and tier.limits.tokens else None
            tokens = Limit(limit=count, window=window or tier_window or _no_window(MAAS_TOKEN_LIMIT, tier))
    except (WindowError, ValueError) as exc:
        raise TranslateError(f"invalid {MAAS_WINDOW}: {window!r}", reason="invalid_limit") from exc
    return Limits(requests=requests, tokens=tokens), depends


def translate_secret(
    secret: Obj, *, pepper: bytes, tiers: Sequence[TierRecord] = (), default_tier: str = "free"
) -> tuple[KeyRecord, bool]:
    """(the key record, whether it depends on the tiers and must be retranslated when they change)."""
    namespace, name = key_of(secret)
    digest = _digest(secret, pepper)
    values = {**labels_of(secret), **annotations_of(secret)}
    groups = csv(values.get(GROUPS_ANNOTATION))
    explicit_tier = values.get(MAAS_TIER) or None
    status_text = values.get(MAAS_STATUS, "active").strip().lower()
    status = _STATUSES.get(status_text)
    if status is None:
        raise TranslateError(f"unknown {MAAS_STATUS} {status_text!r}", reason="invalid_status")
    tier = resolve_tier(explicit=explicit_tier, groups=groups, tiers=tiers, default=default_tier)
    try:
        limits, depends = _limits(values, tier=tier)
    except TranslateError:
        if status is KeyStatus.ACTIVE:
            raise
        # a revoked or disabled key is denied whatever its limits say: limits that cannot be read (a window its
        # tier no longer gives) must not keep the denial out of the store, where the last good record, active,
        # would go on admitting the key
        limits, depends = None, takes_tier_windows(secret)
    record = KeyRecord(
        key_id=key_id_of(digest),
        digest=digest,
        user=values.get(USER_ANNOTATION) or values.get(MAAS_USER) or name,
        groups=groups,
        tier=explicit_tier,
        models=csv(values.get(MAAS_MODELS)),
        status=status,
        expires_at=_expiry(values.get(EXPIRES_AT)),
        limits=limits,
        name=values.get(KEY_NAME) or name,
        source=f"secret:{namespace}/{name}",
        created_at=parse_time(values.get(MAAS_CREATED)) or parse_time(meta(secret).get("creationTimestamp")),
    )
    return record, depends
