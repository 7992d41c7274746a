"""Signed identity headers: what ``maas authz`` tells the upstream (the meter) about an allowed request.

The signature is HMAC-SHA256 under a secret shared by authz and meter, over a canonical string of every identity
header and a timestamp, so the meter can reject identity headers a client forged or replayed long after.

Values go on the wire as printable ASCII: anything else (a user id ``josé``, a newline in a group name) and ``%``
are percent-encoded as UTF-8, and the signature covers the encoded form, so what authz signs is byte for byte what
the meter reads (Envoy and HTTP servers disagree on non-ASCII header bytes); ``parse`` decodes them again.
"""

from __future__ import annotations

import hmac
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass

H_USER = "x-maas-user"
H_GROUPS = "x-maas-groups"
H_TIER = "x-maas-tier"
H_KEY_ID = "x-maas-key-id"
H_MODEL = "x-maas-model"
H_TOKEN_LIMIT = "x-maas-token-limit"
H_TS = "x-maas-identity-ts"
H_SIGNATURE = "x-maas-signature"

IDENTITY_HEADERS = (H_USER, H_GROUPS, H_TIER, H_KEY_ID, H_MODEL, H_TOKEN_LIMIT, H_TS, H_SIGNATURE)
SIGNATURE_VERSION = "v1"
SIGN_WINDOW = 10
"""Seconds of one signing window: authz dates an identity with the start of the window its check falls in and
reuses that signature for the rest of the window, so a fresh identity's timestamp is up to this much old."""


@dataclass(frozen=True, slots=True)
class Identity:
    key_id: str
    user: str
    groups: str
    tier: str
    model: str
    token_limit: int | None = None
    token_window_ms: int | None = None

    @property
    def token_limit_header(self) -> str:
        if self.token_limit is None or self.token_window_ms is None:
            return ""
        return f"{self.token_limit}/{self.token_window_ms}"


class IdentityError(ValueError):
    def __init__(self, message: str, *, code: str) -> None:
        super().__init__(message)
        self.code = code


class StaleIdentity(IdentityError):
    """A valid signature dated outside the accepted span of the verifier's clock: replayed, or (far more often) the
    clocks of maas authz and of the verifier differ by more than ``max_age``. ``offset``: how far the timestamp
    lies before (positive) or after (negative) the verifier's clock, seconds."""

    def __init__(self, *, offset: float, max_age: float) -> None:
        if offset > 0:
            where = f"{offset:.0f}s before this server's clock (at most {max_age + SIGN_WINDOW:g}s accepted)"
        else:
            where = f"{-offset:.0f}s after this server's clock (at most {max_age:g}s accepted)"
        super().__init__(
            f"identity is stale: dated {where}; the clocks of maas authz and this server differ (clock skew), "
            "or the identity was replayed",
            code="stale_identity",
        )
        self.offset = offset


_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")


def wire(value: str) -> str:
    """A header value as printable ASCII (percent-encoded UTF-8 for anything else, and for ``%``)."""
    if value.isascii() and value.isprintable() and "%" not in value:
        return value
    return urllib.parse.quote(value, safe=_SAFE)


def unwire(value: str) -> str:
    return urllib.parse.unquote(value, errors="replace") if "%" in value else value


def _canonical(ts: str, key_id: str, user: str, groups: str, tier: str, model: str, limit: str) -> bytes:
    """The signed string, of the header values as they are on the wire."""
    return "\n".join((SIGNATURE_VERSION, ts, key_id, user, groups, tier, model, limit)).encode()


def sign(identity: Identity, secret: bytes, *, now: float | None = None) -> dict[str, str]:
    ts = str(int(time.time() if now is None else now))
    values = [wire(v) for v in (identity.key_id, identity.user, identity.groups, identity.tier, identity.model)]
    key_id, user, groups, tier, model = values
    signature = hmac.digest(
        secret, _canonical(ts, key_id, user, groups, tier, model, identity.token_limit_header), "sha256"
    ).hex()
    headers = {
        H_USER: user,
        H_GROUPS: groups,
        H_TIER: tier,
        H_KEY_ID: key_id,
        H_MODEL: model,
        H_TS: ts,
        H_SIGNATURE: f"{SIGNATURE_VERSION}={signature}",
    }
    limit = identity.token_limit_header
    if limit:
        headers[H_TOKEN_LIMIT] = limit
    return headers


def parse(headers: Mapping[str, str]) -> Identity:
    """The identity in the headers, without checking the signature (for ``--trust-identity-headers``)."""
    key_id = headers.get(H_KEY_ID, "")
    if not key_id:
        raise IdentityError("request carries no maas identity", code="missing_identity")
    limit_text = headers.get(H_TOKEN_LIMIT, "")
    limit: int | None = None
    window: int | None = None
    if limit_text:
        try:
            a, b = limit_text.split("/", 1)
            limit, window = int(a), int(b)
        except ValueError as exc:
            raise IdentityError("malformed token limit header", code="invalid_identity") from exc
        if limit < 0 or window <= 0:
            raise IdentityError("malformed token limit header", code="invalid_identity")
    return Identity(
        key_id=unwire(key_id),
        user=unwire(headers.get(H_USER, "")),
        groups=unwire(headers.get(H_GROUPS, "")),
        tier=unwire(headers.get(H_TIER, "")),
        model=unwire(headers.get(H_MODEL, "")),
        token_limit=limit,
        token_window_ms=window,
    )


def verify(headers: Mapping[str, str], secret: bytes, *, max_age: float = 60.0, now: float | None = None) -> Identity:
    """The identity, if signed with ``secret`` and dated within ``max_age`` seconds of this clock; else
    IdentityError (``StaleIdentity`` for the date).

    Two clocks meet here: authz's dated the signature, this process's reads it. A timestamp is the start of its
    signing window, so it may be ``SIGN_WINDOW`` older than the check; timestamps from ``max_age + SIGN_WINDOW``
    before this clock to ``max_age`` after it are accepted, so the two clocks may differ by up to ``max_age``
    either way at every moment of a window. (Accepting ``max_age`` either side of the timestamp instead held only
    ``max_age - SIGN_WINDOW`` for a clock ahead, and between the two it refused a part of each window's requests:
    a fault that comes and goes, hard to trace to the clocks.)"""
    identity = parse(headers)
    ts = headers.get(H_TS, "")
    signature = headers.get(H_SIGNATURE, "")
    if not ts or not signature:
        raise IdentityError("identity headers are not signed", code="unsigned_identity")
    try:
        age = (time.time() if now is None else now) - int(ts)
    except ValueError as exc:
        raise IdentityError("malformed identity timestamp", code="invalid_identity") from exc
    signed = _canonical(
        ts,
        headers.get(H_KEY_ID, ""),
        headers.get(H_USER, ""),
        headers.get(H_GROUPS, ""),
        headers.get(H_TIER, ""),
        headers.get(H_MODEL, ""),
        headers.get(H_TOKEN_LIMIT, ""),
    )
    expected = f"{SIGNATURE_VERSION}=" + hmac.digest(secret, signed, "sha256").hex()
    if not hmac.compare_digest(expected.encode(), signature.encode()):
        raise IdentityError("identity signature does not match", code="invalid_identity")
    if not -max_age <= age <= max_age + SIGN_WINDOW:
        raise StaleIdentity(offset=age, max_age=max_age)
    return identity
