"""What to answer for one ext_authz check: pure code, no I/O, no aiohttp, no redis.

The order (DESIGN §4): credential -> key -> route/model -> limits -> allow. ``admit`` does the first three from the
snapshot alone; the caller runs the returned bucket operations against the store and hands the results to
``after_limits``. Every denial carries a stable snake_case code (JSON ``code`` and metric ``reason``).
"""

from __future__ import annotations

import hmac
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from gateway.contract import REQUESTS, TOKENS, format_duration
from gateway.identity import H_TOKEN_LIMIT, SIGN_WINDOW, Identity, sign
from gateway.limits import BucketMode, BucketOp, BucketResult
from gateway.snapshot import STATUS_ACTIVE, STATUS_REVOKED, CompiledLimits, KeyEntry, Snapshot, TierEntry

MAX_KEY_LENGTH = 512
WWW_AUTHENTICATE = ("www-authenticate", 'APIKEY realm="maas"')
CREDENTIAL_HEADERS = ("authorization", "x-api-key")
REMOVE = "x-envoy-auth-headers-to-remove"
CREDENTIALS = "authorization,x-api-key"


@dataclass(frozen=True, slots=True)
class Denial:
    status: int
    code: str
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()
    error_type: str = "invalid_request_error"
    tier: str = ""
    model: str = ""
    """The metric labels of a denial decided once the key's tier and the model were known."""


@dataclass(slots=True, eq=False)
class Admission:
    """An admitted (key, route): memoised per presented credential, so it also carries what every allowed request
    of it reuses: the signed identity block of the current signing window and the caller's metric cells."""

    key: KeyEntry
    tier: TierEntry | None
    model: str | None
    limits: CompiledLimits
    ops: tuple[BucketOp, ...]
    block: HeaderBlock | None = None
    block_window: int = -1
    cells: tuple[Any, ...] | None = None
    wire_template: str | None = None


class HotCache:
    """Per-process memo of what many requests share: the bucket operations of a key under given limits, and the
    signed identity headers of a (key, tier, model) within one signing window: every request of a key in the same
    ``SIGN_WINDOW`` seconds carries the same timestamp and signature, so a timestamp is up to that much older than
    its check (``identity.verify`` allows for it on top of ``--identity-max-age``)."""

    MAX_ENTRIES = 100_000
    MAX_ADMISSIONS = 50_000
    MAX_MEMO_TARGET = 512
    """Longer host + path are not memoised: a key's holder choosing paths of 60 KiB (any path under a routed prefix
    is admitted) had grown the memo to gigabytes, 429s included, past the pod's memory limit."""

    def __init__(self) -> None:
        self.admissions: dict[tuple[tuple[str | None, str | None], str, str], Admission] = {}
        """Admissions by (credential headers as presented, host, path): valid for one key index, catalog and
        generation. Keyed by the credential itself so a repeated request skips parsing it, the HMAC and the index
        lookup; only admitted credentials are kept (never a denied one), in process memory only, at most
        ``MAX_ADMISSIONS`` of at most ``MAX_MEMO_TARGET`` characters of host and path, dropped on every change."""
        self.admissions_of: tuple[object, object, int] = (None, None, -1)
        self.ops: dict[tuple[str, CompiledLimits], tuple[BucketOp, ...]] = {}
        self.identity: dict[tuple[KeyEntry, str, str, tuple[int, int] | None], HeaderBlock] = {}
        self.second = 0


def header_lines(headers: Sequence[tuple[str, str]]) -> bytes:
    """Headers in HTTP/1.1 wire form (``name: value\\r\\n`` each); a CR or LF inside a value becomes a space, so no
    record's value can split a response."""
    lines = []
    for name, value in headers:
        if "\n" in value or "\r" in value:
            value = value.replace("\r", " ").replace("\n", " ")
        lines.append(f"{name}: {value}\r\n")
    return "".join(lines).encode("utf-8", "replace")


@dataclass(frozen=True, slots=True)
class HeaderBlock:
    """Headers shared by many answers, with their wire form computed once."""

    headers: tuple[tuple[str, str], ...]
    wire: bytes


@dataclass(frozen=True, slots=True)
class Policy:
    """Per-process decision settings, fixed at start."""

    pepper: bytes
    identity_secret: bytes
    default_tier: str = "free"
    path_prefix: str = ""
    allow_unrouted: bool = False
    remove_credentials: bool = True
    cache: HotCache = field(default_factory=HotCache, compare=False)


def error_body(message: str, *, error_type: str, code: str, param: str | None = None) -> bytes:
    return json.dumps({"error": {"message": message, "type": error_type, "param": param, "code": code}}).encode()


@lru_cache(maxsize=64)
def _denial(
    status: int, code: str, message: str, error_type: str = "invalid_request_error", tier: str = "", model: str = ""
) -> Denial:
    headers: tuple[tuple[str, str], ...] = (("x-ext-auth-reason", code),)
    if status == 401:
        headers = (WWW_AUTHENTICATE, *headers)
    return Denial(
        status=status,
        code=code,
        body=error_body(message, error_type=error_type, code=code),
        headers=headers,
        error_type=error_type,
        tier=tier,
        model=model,
    )


MISSING_KEY = _denial(
    401,
    "missing_api_key",
    "No API key provided. Send 'Authorization: APIKEY <key>', 'Authorization: Bearer <key>' or 'x-api-key: <key>'.",
)
INVALID_KEY = _denial(401, "invalid_api_key", "Incorrect API key provided.")
MALFORMED_KEY = _denial(401, "invalid_api_key", "Malformed API key: expected one printable token.")
EXPIRED_KEY = _denial(401, "expired_api_key", "The API key has expired.")
DUPLICATE_KEY = _denial(400, "conflicting_credentials", "More than one API key was sent; send exactly one.")
NO_TIER = _denial(
    403,
    "no_tier",
    "This API key belongs to no tier (its tier, groups and the default tier match none defined); ask the platform "
    "team to define the tier.",
    "permission_error",
)
NO_ROUTE = _denial(404, "route_not_found", "No model is served at this host and path.")
BAD_HOST = _denial(400, "invalid_host", "The Host header is not a host name or IP address with an optional port.")
PORTED_WILDCARD = _denial(
    400,
    "invalid_host",
    "This host is served by a wildcard hostname route: send its Host header without a port.",
)
STORE_DOWN = _denial(
    503, "rate_limit_unavailable", "Rate limits cannot be checked right now; retry shortly.", "server_error"
)


def credential(get: Callable[[str], str | None], count: Callable[[str], int | None]) -> str | Denial:
    """The API key of a request (``Authorization: APIKEY|Bearer <key>`` or ``x-api-key``), or the denial.
    ``count(name)``: how many times the header came; None stands for "once or not at all" (so a dict of the
    repeated headers' counts can answer with its ``get``, no function call per request)."""
    auth = get("authorization")
    api_key_header = get("x-api-key")
    if api_key_header is not None and not api_key_header.strip():
        api_key_header = None  # an empty x-api-key is no key, as an empty Authorization is none
    if (count("authorization") or 0) > 1 or (count("x-api-key") or 0) > 1:
        return DUPLICATE_KEY
    token: str | None = None
    if auth is not None:
        scheme, _, rest = auth.strip().partition(" ")
        lowered = scheme.lower()
        if lowered in ("apikey", "bearer"):
            token = rest.strip()
            if not token:
                return MALFORMED_KEY
        elif api_key_header is None:
            return MISSING_KEY if not auth.strip() else _unsupported_scheme(scheme, bare=not rest.strip())
    if api_key_header is not None:
        other = api_key_header.strip()
        if token is not None and other != token:
            return DUPLICATE_KEY
        token = other
    if token is None:
        return MISSING_KEY
    if "," in token:
        return DUPLICATE_KEY  # a repeated header, folded into one by Envoy ("APIKEY a,APIKEY b"): keys hold no comma
    if not token or len(token) > MAX_KEY_LENGTH or not token.isprintable() or " " in token:
        return MALFORMED_KEY
    return token


def _unsupported_scheme(scheme: str, *, bare: bool) -> Denial:
    """``Authorization: Basic ...``, or a key sent bare without a scheme: say which forms work (a lone token is
    taken for a key and never echoed back)."""
    forms = "Send 'Authorization: APIKEY <key>', 'Authorization: Bearer <key>' or 'x-api-key: <key>'."
    if bare:
        return _denial(401, "invalid_api_key", f"The Authorization header has no scheme. {forms}")
    shown = f" '{scheme}'" if len(scheme) <= 16 and scheme.isalpha() else ""
    return _denial(401, "invalid_api_key", f"Unsupported Authorization scheme{shown}. {forms}")


_HOST = re.compile(r"([a-z0-9_.-]*|\[[0-9a-f:.]+\])(?::([0-9]{1,5}))?")
"""A host name, IPv4 or bracketed IPv6 address (lowercased), and an optional port of digits only."""


def _split_host(host: str) -> tuple[str, bool] | None:
    """The host as Envoy matches it to a virtual host, and whether a port came with it; None for a Host that Envoy
    might match otherwise. Lowercased (ASCII only: ``str.lower`` maps the Kelvin sign to ``k``, Envoy does not), the
    port dropped: Istio lists a host as ``host`` and ``host:*``, and ``host:*`` matches whatever follows the colon,
    so only a port of digits passes (split at the last colon, ``host:1:2`` was checked as ``host:1`` while Envoy
    routed it as ``host``; ``host:`` and ``host:x`` were checked as ``host``, while Envoy routes ``host:`` to the
    routes for any host). A trailing dot stays: Envoy routes ``example.com.`` as another host (to the ``*``
    routes), unless ``strip_trailing_host_dot`` strips it, and then before the check too."""
    if not host.isascii():
        return None
    found = _HOST.fullmatch(host.lower())
    if found is None:
        return None
    return found[1], found[2] is not None


def admit(
    snapshot: Snapshot,
    policy: Policy,
    *,
    host: str,
    path: str,
    get: Callable[[str], str | None],
    count: Callable[[str], int | None],
    now: float,
) -> Admission | Denial:
    if (count("authorization") or 0) > 1 or (count("x-api-key") or 0) > 1:
        return DUPLICATE_KEY
    presented = (get("authorization"), get("x-api-key"))
    query = path.find("?")
    if query >= 0:
        path = path[:query]
    cache = policy.cache
    seen = cache.admissions_of
    if (
        seen[0] is not snapshot.keys
        or seen[1] is not snapshot.catalog
        or seen[2] != snapshot.generation
        or len(cache.admissions) >= HotCache.MAX_ADMISSIONS
    ):
        # a change event bumps the generation; a reload swaps the key index (whatever its generation)
        cache.admissions.clear()
        cache.admissions_of = (snapshot.keys, snapshot.catalog, snapshot.generation)
    memo = (presented, host, path)
    admission = cache.admissions.get(memo)
    if admission is not None:
        held = admission.key
        if held.status == STATUS_ACTIVE and (held.expires_at is None or held.expires_at > now):
            return admission
    token = credential(get, count)
    if isinstance(token, Denial):
        return token
    digest = hmac.digest(policy.pepper, token.encode("utf-8", "surrogateescape"), "sha256")
    key = snapshot.keys.get(digest)
    if key is None or key.status == STATUS_REVOKED:
        return INVALID_KEY
    if key.status != STATUS_ACTIVE:
        return _denial(401, "invalid_api_key", "The API key is disabled.")
    if key.expires_at is not None and key.expires_at <= now:
        return EXPIRED_KEY
    outcome = _route(snapshot, policy, key, host, path)
    if isinstance(outcome, Admission) and len(host) + len(path) <= HotCache.MAX_MEMO_TARGET:
        cache.admissions[memo] = outcome
    return outcome


def _route(snapshot: Snapshot, policy: Policy, key: KeyEntry, host: str, path: str) -> Admission | Denial:
    """Steps 3 and 4 of the decision for a valid key: route, model, allow-list, readiness, limits."""
    catalog = snapshot.catalog
    prefix = policy.path_prefix
    if prefix and path.startswith(prefix):
        path = path[len(prefix) :] or "/"
    split = _split_host(host)
    if split is None:
        return BAD_HOST
    name, ported = split
    if ported and catalog.routes.wildcard(name):
        # Istio lists a wildcard hostname as `*.example.com` and `*.example.com:<listener port>`: Envoy takes its
        # routes for the listener's port, which is not known here (even over a host's own `host:*`), and the
        # routes for any host for another port
        return PORTED_WILDCARD
    route = catalog.routes.lookup(name, path)
    tier = catalog.tier_of(key, policy.default_tier)
    if tier is None and route is not None and route.model is not None:
        return NO_TIER  # a key of no tier would run without limits: refused, loudly
    base = tier.limits if tier is not None else CompiledLimits()
    limits = key.limits.merged_over(base) if key.limits is not None else base
    if route is None:
        if not policy.allow_unrouted:
            return NO_ROUTE
        # no model to check, but the key's limits hold: a catch-all upstream is not a way around them
        return Admission(key=key, tier=tier, model=None, limits=limits, ops=_ops(policy.cache, key.key_id, limits))
    model_id = route.model
    if model_id is None:
        return Admission(key=key, tier=tier, model=None, limits=limits, ops=())
    allowed = key.models if key.models is not None else (tier.models if tier is not None else None)
    if allowed is not None and model_id not in allowed:
        message = f"This API key may not use the model '{model_id}'."
        return _denial(403, "model_not_allowed", message, "permission_error", tier.name if tier else "", model_id)
    model = catalog.models.get(model_id)
    if model is None or not model.ready:
        reason = f": {model.reason}" if model is not None and model.reason else ""
        message = f"The model '{model_id}' is not ready{reason}."
        return _denial(503, "model_not_ready", message, "server_error", tier.name if tier else "", model_id)
    return Admission(key=key, tier=tier, model=model_id, limits=limits, ops=_ops(policy.cache, key.key_id, limits))


def _ops(cache: HotCache, key_id: str, limits: CompiledLimits) -> tuple[BucketOp, ...]:
    ops = cache.ops.get((key_id, limits))
    if ops is None:
        built: list[BucketOp] = []
        if limits.requests is not None:
            built.append(BucketOp(key_id, REQUESTS, limits.requests[0], limits.requests[1], 1))
        if limits.tokens is not None:
            built.append(BucketOp(key_id, TOKENS, limits.tokens[0], limits.tokens[1], 1, BucketMode.GATE))
        if len(cache.ops) >= HotCache.MAX_ENTRIES:
            cache.ops.clear()
        ops = cache.ops[(key_id, limits)] = tuple(built)
    return ops


def _ratelimit_names(dimension: str) -> tuple[str, str, str]:
    return (f"x-ratelimit-limit-{dimension}", f"x-ratelimit-remaining-{dimension}", f"x-ratelimit-reset-{dimension}")


_RATELIMIT_NAMES = {dimension: _ratelimit_names(dimension) for dimension in (REQUESTS, TOKENS)}


def _ratelimit_headers(admission: Admission, results: list[BucketResult]) -> list[tuple[str, str]]:
    headers: list[tuple[str, str]] = []
    for op, res in zip(admission.ops, results, strict=True):
        limit, remaining, reset = _RATELIMIT_NAMES.get(op.dimension) or _ratelimit_names(op.dimension)
        headers += ((limit, str(res.limit)), (remaining, str(res.remaining)), (reset, format_duration(res.reset_ms)))
    return headers


def rate_limited(admission: Admission, results: list[BucketResult]) -> Denial:
    culprit_op, culprit = max(zip(admission.ops, results, strict=True), key=lambda pair: pair[1].retry_ms)
    retry_s = max(1, -(-culprit.retry_ms // 1000))
    dimension = culprit_op.dimension
    if dimension == REQUESTS:
        message = (
            f"Rate limit reached for requests: limit {culprit.limit} per "
            f"{format_duration(culprit_op.window_ms)}. Retry in {format_duration(culprit.retry_ms)}."
        )
    else:
        message = f"Token quota exhausted: limit {culprit.limit} per {format_duration(culprit_op.window_ms)}. "
        message += f"Retry in {format_duration(culprit.retry_ms)}."
    headers = [("retry-after", str(retry_s)), ("x-ext-auth-reason", "rate_limit_exceeded")]
    if culprit.limit <= 0:  # a limit of 0 never refills: waiting cannot help, so no retry-after
        window = format_duration(culprit_op.window_ms)
        message = f"This key's {dimension} limit is 0 per {window}: it is not allowed any."
        headers = headers[1:]
    headers += _ratelimit_headers(admission, results)
    body = error_body(message, error_type=dimension, code="rate_limit_exceeded")
    return Denial(status=429, code="rate_limit_exceeded", body=body, headers=tuple(headers), error_type=dimension)


def allow_headers(
    admission: Admission, results: list[BucketResult] | None, policy: Policy, *, now: float
) -> list[tuple[str, str]]:
    """Headers of the 200: identity for the upstream, credential removal, and rate-limit state for the client."""
    block = identity_block(admission, policy, now=now)
    return [*block.headers, *(_ratelimit_headers(admission, results) if results else ())]


def ratelimit_wire(admission: Admission, results: list[BucketResult]) -> bytes:
    """The rate-limit headers of an allowed check in HTTP/1.1 wire form, formatted in one step from a template
    per set of dimensions (the same lines ``allow_headers`` lists)."""
    template = admission.wire_template
    if template is None:
        template = admission.wire_template = _wire_template(tuple(op.dimension for op in admission.ops))
    if len(results) == 2:  # requests and tokens, the usual pair
        first, second = results
        values: tuple[object, ...] = (
            first.limit,
            first.remaining,
            format_duration(first.reset_ms),
            second.limit,
            second.remaining,
            format_duration(second.reset_ms),
        )
    else:
        values = tuple(v for res in results for v in (res.limit, res.remaining, format_duration(res.reset_ms)))
    return (template % values).encode()


@lru_cache(maxsize=64)
def _wire_template(dimensions: tuple[str, ...]) -> str:
    lines = []
    for dimension in dimensions:
        limit, remaining, reset = _RATELIMIT_NAMES.get(dimension) or _ratelimit_names(dimension)
        lines.append(f"{limit}: %d\r\n{remaining}: %d\r\n{reset}: %s\r\n")
    return "".join(lines)


def identity_block(admission: Admission, policy: Policy, *, now: float) -> HeaderBlock:
    """The headers every allowed request of this identity shares in the current signing window (memoised with
    their wire form): the signed identity for the upstream and the credential removal."""
    second = int(now) // SIGN_WINDOW * SIGN_WINDOW
    block = admission.block
    if block is not None and admission.block_window == second:
        return block
    key = admission.key
    tokens = admission.limits.tokens
    tier = admission.tier.name if admission.tier is not None else ""
    model = admission.model or ""
    cache = policy.cache
    if second != cache.second or len(cache.identity) >= HotCache.MAX_ENTRIES:
        cache.identity.clear()
        cache.second = second
    memo = (key, tier, model, tokens)
    block = cache.identity.get(memo)
    if block is None:
        identity = Identity(
            key_id=key.key_id,
            user=key.user,
            groups=key.groups,
            tier=tier,
            model=model,
            token_limit=tokens[0] if tokens is not None else None,
            token_window_ms=tokens[1] if tokens is not None else None,
        )
        signed = sign(identity, policy.identity_secret, now=second)
        base = list(signed.items())
        # Envoy sets only the headers this answer carries: an identity header the client sent that the answer does
        # not (the token limit of a key without one) would reach the upstream as the client wrote it
        removed = [CREDENTIALS] if policy.remove_credentials else []
        removed += [] if H_TOKEN_LIMIT in signed else [H_TOKEN_LIMIT]
        if removed:
            base.append((REMOVE, ",".join(removed)))
        block = cache.identity[memo] = HeaderBlock(tuple(base), header_lines(base))
    admission.block, admission.block_window = block, second
    return block
