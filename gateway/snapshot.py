"""The in-memory snapshot the hot path reads: keys by digest, tiers, models and the route table.

Everything is parsed and compiled when a record arrives, so a request only does dictionary look-ups. Tiers, models
and routes are small and rebuilt as a new ``Catalog`` on every change (swapped by rebinding one attribute). The key
index can hold millions of entries, so it is patched in place: a put or a delete is one dictionary operation on the
event loop, never a copy of the whole index.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import cast

from gateway.contract import (
    EVERYONE,
    KeyFields,
    KeyRecord,
    KeyStatus,
    Limits,
    LimitsFields,
    ModelRecord,
    RouteRecord,
    TierRecord,
    normalise_prefix,
    parse_window,
)

STATUS_ACTIVE = 0
STATUS_DISABLED = 1
STATUS_REVOKED = 2
_STATUS = {KeyStatus.ACTIVE: STATUS_ACTIVE, KeyStatus.DISABLED: STATUS_DISABLED, KeyStatus.REVOKED: STATUS_REVOKED}


@dataclass(frozen=True, slots=True)
class CompiledLimits:
    """Limits with windows in milliseconds; a ``None`` limit means no bucket for that dimension."""

    requests: tuple[int, int] | None = None
    tokens: tuple[int, int] | None = None

    @classmethod
    def of(cls, limits: Limits | LimitsFields | None) -> CompiledLimits | None:
        """Compiled once per distinct value and shared: a million keys with the same override hold one object. A
        window ``parse_window`` refuses raises its ``WindowError`` (a key's limits come from the full load's
        ``decode_key_fields`` with their windows unchecked)."""
        if limits is None:
            return None
        if isinstance(limits, dict):
            req_fields, tok_fields = limits.get("requests"), limits.get("tokens")
            requests = (req_fields["limit"], req_fields["window"]) if req_fields is not None else None
            tokens = (tok_fields["limit"], tok_fields["window"]) if tok_fields is not None else None
        else:
            # memoised by plain tuples: a pydantic model's hash and equality run in Python
            requests = (limits.requests.limit, limits.requests.window) if limits.requests is not None else None
            tokens = (limits.tokens.limit, limits.tokens.window) if limits.tokens is not None else None
        memo = (requests, tokens)
        compiled = _compiled.get(memo)
        if compiled is None:
            compiled = cls(
                requests=(requests[0], parse_window(requests[1])) if requests is not None else None,
                tokens=(tokens[0], parse_window(tokens[1])) if tokens is not None else None,
            )
            if len(_compiled) < 100_000:
                _compiled[memo] = compiled
        return compiled

    def merged_over(self, base: CompiledLimits) -> CompiledLimits:
        return CompiledLimits(requests=self.requests or base.requests, tokens=self.tokens or base.tokens)


_compiled: dict[tuple[tuple[int, str] | None, tuple[int, str] | None], CompiledLimits] = {}


class KeyEntry:
    """One API key, compact: millions of these live in memory. Strings shared by many keys are interned."""

    __slots__ = ("expires_at", "groups", "key_id", "limits", "models", "status", "tier", "user")

    def __init__(
        self,
        *,
        key_id: str,
        user: str,
        groups: str,
        tier: str | None,
        models: frozenset[str] | None,
        status: int,
        expires_at: float | None,
        limits: CompiledLimits | None,
    ) -> None:
        self.key_id = key_id
        self.user = user
        self.groups = groups
        self.tier = tier
        self.models = models
        self.status = status
        self.expires_at = expires_at
        self.limits = limits


_interned_models: dict[frozenset[str], frozenset[str]] = {}


def compile_key(fields: KeyFields) -> tuple[bytes, KeyEntry]:
    """The index entry of a key (``decode_key_fields``); a ``WindowError`` for a limit's window that is not one."""
    models: frozenset[str] | None = None
    listed = fields.get("models")
    if listed:
        models = frozenset(listed)
        models = _interned_models.setdefault(models, models)
    tier = fields.get("tier")
    entry = KeyEntry(
        key_id=fields["key_id"],
        user=fields["user"],
        groups=sys.intern(",".join(fields.get("groups", ()))),
        tier=sys.intern(tier) if tier else None,
        models=models,
        status=_STATUS[fields.get("status", KeyStatus.ACTIVE)],
        expires_at=fields.get("expires_at"),
        limits=CompiledLimits.of(fields.get("limits")),
    )
    return bytes.fromhex(fields["digest"]), entry


def compile_record(record: KeyRecord) -> tuple[bytes, KeyEntry]:
    """``compile_key`` of a ``KeyRecord``."""
    return compile_key(cast(KeyFields, record.model_dump()))


@dataclass(frozen=True, slots=True)
class TierEntry:
    name: str
    level: int
    limits: CompiledLimits
    models: frozenset[str] | None


@dataclass(frozen=True, slots=True)
class ModelEntry:
    id: str
    ready: bool
    reason: str


@dataclass(frozen=True, slots=True)
class Route:
    model: str | None
    prefix: str


class RouteTable:
    """(host, path prefix) -> route, longest prefix wins, matched on whole path segments as Gateway API does;
    routes for the host itself win over those of the most specific wildcard hostname (``*.example.com``: any
    subdomain, not example.com itself), which win over routes for any host (``*``)."""

    def __init__(self, routes: Iterable[RouteRecord]) -> None:
        self._by_host: dict[str, dict[str, Route]] = {}
        self._wild: dict[str, dict[str, Route]] = {}
        """".example.com" (from "*.example.com") -> its routes"""
        self._any: dict[str, Route] = {}
        for r in routes:
            prefix = normalise_prefix(r.prefix)
            host = r.host.lower()
            if host in ("*", ""):
                table = self._any
            elif host.startswith("*."):
                table = self._wild.setdefault(host[1:], {})
            else:
                table = self._by_host.setdefault(host, {})
            table[prefix] = Route(model=r.model, prefix=prefix)
        self.size = len(self._any) + sum(len(t) for t in (*self._by_host.values(), *self._wild.values()))

    def _wildcard(self, host: str) -> dict[str, Route] | None:
        dot = host.find(".")
        while dot > 0:  # "a.b.example.com": .b.example.com, then .example.com, then .com
            table = self._wild.get(host[dot:])
            if table is not None:
                return table
            dot = host.find(".", dot + 1)
        return None

    def wildcard(self, host: str) -> bool:
        """Whether a wildcard hostname's routes cover ``host``."""
        return self._wildcard(host) is not None if self._wild else False

    def lookup(self, host: str, path: str) -> Route | None:
        named = self._by_host.get(host) if self._by_host else None
        wild = self._wildcard(host) if self._wild else None
        for table in (named, wild, self._any):
            if not table:
                continue
            p = path
            while True:
                route = table.get(p)
                if route is not None:
                    return route
                if len(p) <= 1:
                    break
                cut = p.rfind("/")
                p = p[:cut] if cut > 0 else "/"
        return None


@dataclass(frozen=True, slots=True)
class Catalog:
    """Tiers, models and routes: small, rebuilt whole on every change."""

    tiers: Mapping[str, TierEntry] = field(default_factory=dict)
    group_tiers: Mapping[str, TierEntry] = field(default_factory=dict)
    models: Mapping[str, ModelEntry] = field(default_factory=dict)
    routes: RouteTable = field(default_factory=lambda: RouteTable(()))

    @classmethod
    def build(
        cls,
        *,
        tiers: Iterable[TierRecord],
        models: Iterable[ModelRecord],
        routes: Iterable[RouteRecord],
    ) -> Catalog:
        tier_entries = {
            t.name: TierEntry(
                name=t.name,
                level=t.level,
                limits=CompiledLimits.of(t.limits) or CompiledLimits(),
                models=frozenset(t.models) or None,
            )
            for t in tiers
        }
        group_tiers: dict[str, TierEntry] = {}
        for tier_record in sorted(tiers, key=lambda t: t.level):
            for group in tier_record.groups:
                group_tiers[group] = tier_entries[tier_record.name]
        model_entries = {m.id: ModelEntry(id=m.id, ready=m.ready, reason=m.reason) for m in models}
        return cls(tiers=tier_entries, group_tiers=group_tiers, models=model_entries, routes=RouteTable(routes))

    def tier_of(self, key: KeyEntry, default_tier: str) -> TierEntry | None:
        """The key's own tier if set and known; else the highest-level tier among its groups (every key is in
        ``system:authenticated``); else the default tier; None when that does not exist either (the decision refuses
        such a key: an unknown own tier, a typo or a deleted tier, must not leave the key without limits)."""
        if key.tier is not None:
            own = self.tiers.get(key.tier)
            if own is not None:
                return own
        best: TierEntry | None = self.group_tiers.get(EVERYONE)
        if key.groups:
            for group in key.groups.split(","):
                tier = self.group_tiers.get(group)
                if tier is not None and (best is None or tier.level > best.level):
                    best = tier
        return best or self.tiers.get(default_tier)


class Snapshot:
    """What the hot path reads. ``keys`` is patched in place; ``catalog`` is swapped whole."""

    def __init__(self, *, keys: dict[bytes, KeyEntry] | None = None, catalog: Catalog | None = None) -> None:
        self.keys: dict[bytes, KeyEntry] = keys if keys is not None else {}
        self.catalog = catalog or Catalog()
        self.generation = 0
        self.loaded = False
