"""The desired records, computed from the objects the reflectors hold. Level-triggered: every computation reads
the latest state of the objects, so the order in which changes of different objects arrive does not matter.

Keys are maintained per Secret (10,000s of them: only changed Secrets are retranslated); tiers, models and routes
are recomputed as a whole when any of their objects changed (they are few). A malformed object is reported once
per resourceVersion and its last good translation keeps serving until it is fixed or deleted; an object that is
well formed but stands for nothing (``NotServed``: a route of another gateway, say) has no records.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

from controlplane import kinds
from controlplane.errors import NotServed, TranslateError
from controlplane.kinds import Kind, Obj, ObjKey, meta
from controlplane.translate.httproute import translate_route
from controlplane.translate.isvc import find_runtime, translate_isvc
from controlplane.translate.secret import takes_tier_windows, translate_secret
from controlplane.translate.tiers import merge, parse_limits, parse_mapping
from gateway.contract import (
    EVERYONE,
    KeyRecord,
    KeyStatus,
    ModelRecord,
    RecordKind,
    RouteRecord,
    TierRecord,
    encode_record,
)

log = logging.getLogger("maas.controlplane.sync")

Lookup = Callable[[Kind], dict[ObjKey, Obj]]
Report = Callable[[Kind, Obj, TranslateError], None]
Clear = Callable[[Kind, ObjKey], None]


class Desired:
    def __init__(
        self,
        *,
        objects: Lookup,
        report: Report,
        pepper: bytes,
        default_tier: str,
        tier_configmap: str,
        tier_limits_configmap: str,
        tier_namespace: str = "",
        gateways: frozenset[str] = frozenset(),
        clear: Clear | None = None,
    ) -> None:
        self._objects = objects
        self._clear = clear
        """Called when an object translates (again): whatever was reported about it no longer holds."""
        self._gateways = gateways
        self._report = report
        self._pepper = pepper
        self._default_tier = default_tier
        self._tier_names = (tier_configmap, tier_limits_configmap)
        self._tier_namespace = tier_namespace
        """The namespace whose tier ConfigMaps win when several namespaces hold them (else the first by name)."""
        self.records: dict[RecordKind, dict[str, str]] = {k: {} for k in RecordKind}
        self.tiers: list[TierRecord] = []
        self._keys: dict[ObjKey, KeyRecord] = {}
        self._owners: dict[str, set[ObjKey]] = {}
        self._tier_dependent: set[ObjKey] = set()
        self._last_good: dict[tuple[str, ObjKey], Any] = {}

    def _translate(self, kind: Kind, key: ObjKey, obj: Obj, fn: Callable[[], Any]) -> Any:
        try:
            value = fn()
        except NotServed as exc:
            self._report(kind, obj, exc)
            self.forget(kind, key)
            return None
        except TranslateError as exc:
            self._report(kind, obj, exc)
            return self._last_good.get((kind.name, key))
        except Exception as exc:  # a translator's blind spot must cost one object, never the sync task
            log.exception("cannot translate %s %s/%s", kind.name, key[0], key[1])
            self._report(kind, obj, TranslateError(f"cannot be read: {type(exc).__name__}: {exc}", reason="invalid"))
            return self._last_good.get((kind.name, key))
        self._last_good[(kind.name, key)] = value
        if self._clear is not None:
            self._clear(kind, key)
        return value

    def forget(self, kind: Kind, key: ObjKey) -> None:
        self._last_good.pop((kind.name, key), None)
        if self._clear is not None:
            self._clear(kind, key)

    # --- keys ----------------------------------------------------------------------------------------------

    def update_secrets(self, keys: Iterable[ObjKey]) -> set[str]:
        """Retranslate these Secrets; returns the digests whose desired record may have changed."""
        secrets = self._objects(kinds.SECRET)
        touched: set[str] = set()
        for key in keys:
            old = self._keys.pop(key, None)
            if old is not None:
                touched.add(old.digest)
                self._owners.get(old.digest, set()).discard(key)
            self._tier_dependent.discard(key)
            obj = secrets.get(key)
            if obj is None:
                self.forget(kinds.SECRET, key)
                continue
            result = self._translate(
                kinds.SECRET,
                key,
                obj,
                partial(translate_secret, obj, pepper=self._pepper, tiers=self.tiers, default_tier=self._default_tier),
            )
            if takes_tier_windows(obj):
                self._tier_dependent.add(key)  # refused or not, a tier change may give or take its limits' windows
            if result is None:
                continue
            record, depends = result
            self._keys[key] = record
            self._owners.setdefault(record.digest, set()).add(key)
            touched.add(record.digest)
            if depends:
                self._tier_dependent.add(key)
        table = self.records[RecordKind.KEY]
        for digest in touched:
            owners = self._owners.get(digest)
            if owners:
                # Two Secrets holding the same key: the first by namespace/name wins, deterministically.
                table[digest] = encode_record(self._keys[min(owners)])
            else:
                self._owners.pop(digest, None)
                table.pop(digest, None)
        return touched

    def all_secrets(self) -> set[ObjKey]:
        return set(self._keys) | set(self._objects(kinds.SECRET))

    def window_borrowers(self, tier: TierRecord, *, now: float) -> list[str]:
        """Key ids of the active keys whose limits take their window from their tier and would find none if ``tier``
        replaced the tier of its name: their Secrets would be refused, and the keys kept on their last limits."""
        before = self.tiers
        after = [t for t in before if t.name != tier.name] + [tier]
        secrets = self._objects(kinds.SECRET)
        found: set[str] = set()
        for key in self._tier_dependent:
            obj = secrets.get(key)
            if obj is None:
                continue
            try:
                record, _ = translate_secret(obj, pepper=self._pepper, tiers=before, default_tier=self._default_tier)
            except TranslateError:
                continue  # refused already, not by this change
            if record.status is not KeyStatus.ACTIVE or (record.expires_at is not None and record.expires_at <= now):
                continue  # denied whatever its limits
            try:
                translate_secret(obj, pepper=self._pepper, tiers=after, default_tier=self._default_tier)
            except TranslateError as exc:
                if exc.reason == "invalid_limit":
                    found.add(record.key_id)
        return sorted(found)

    # --- tiers ---------------------------------------------------------------------------------------------

    def tier_namespace(self) -> str | None:
        """The namespace of the tier ConfigMaps in use: ``tier_namespace`` if it holds any, else the first by name
        that does; None when there are none."""
        found = sorted({ns for ns, name in self._objects(kinds.CONFIGMAP) if name in self._tier_names})
        if self._tier_namespace in found:
            return self._tier_namespace
        return found[0] if found else None

    def update_tiers(self) -> set[ObjKey]:
        """Recompute the tiers; returns the Secrets to retranslate because the tiers changed."""
        mapping_name = self._tier_names[0]
        mapping: list[TierRecord] | None = None
        mapping_obj: Obj | None = None
        limits: dict[str, Any] | None = None
        used = self.tier_namespace()
        for key, obj in sorted(self._objects(kinds.CONFIGMAP).items()):
            if key[1] not in self._tier_names:
                continue
            if key[0] != used:  # the same tiers defined twice: one set counts, and the other is said to be ignored
                self._report(
                    kinds.CONFIGMAP,
                    obj,
                    TranslateError(f"ignored: the tier ConfigMaps of namespace {used!r} are used", reason="duplicate"),
                )
            elif key[1] == mapping_name:
                mapping = self._translate(kinds.CONFIGMAP, key, obj, partial(parse_mapping, obj))
                mapping_obj = obj
            else:
                limits = self._translate(kinds.CONFIGMAP, key, obj, partial(parse_limits, obj))
        tiers = merge(mapping, limits)
        if mapping_obj is not None and not any(t.name == self._default_tier or EVERYONE in t.groups for t in tiers):
            # (the built-in tiers have both)
            problem = TranslateError(
                f"no tier is named {self._default_tier!r} (--default-tier) and none lists {EVERYONE!r}: keys in "
                "no tier's groups are refused (403 no_tier)",
                reason="unknown_default_tier",
            )
            self._report(kinds.CONFIGMAP, mapping_obj, problem)
        changed = tiers != self.tiers
        self.tiers = tiers
        self.records[RecordKind.TIER] = {t.name: encode_record(t) for t in tiers}
        return set(self._tier_dependent) if changed else set()

    # --- models and routes ---------------------------------------------------------------------------------

    def update_models(self) -> None:
        runtimes = self._objects(kinds.RUNTIME)
        cluster_runtimes = self._objects(kinds.CLUSTER_RUNTIME)
        models: dict[str, ModelRecord] = {}
        by_isvc: dict[ObjKey, str] = {}
        for key, isvc in sorted(self._objects(kinds.ISVC).items()):
            runtime = find_runtime(isvc, runtimes=runtimes, cluster_runtimes=cluster_runtimes)
            record = self._translate(kinds.ISVC, key, isvc, partial(translate_isvc, isvc, runtime=runtime))
            if record is None:
                continue
            if record.id in models:
                self._report(
                    kinds.ISVC, isvc, TranslateError(f"model id {record.id!r} is already served", reason="duplicate")
                )
                continue
            models[record.id] = record
            by_isvc[key] = record.id
        routes: dict[str, RouteRecord] = {}
        ordered = sorted(
            self._objects(kinds.HTTPROUTE).items(),
            key=lambda item: (str(meta(item[1]).get("creationTimestamp") or ""), item[0]),
        )
        claims: dict[str, list[tuple[Obj, str | None, bool]]] = {}
        """Route id -> (route, model, whether its match needs more than the path), for every route claiming it."""
        for key, route in ordered:
            notes: list[TranslateError] = []
            conditional: set[str] = set()
            entries = self._translate(
                kinds.HTTPROUTE,
                key,
                route,
                partial(
                    translate_route,
                    route,
                    models_by_isvc=by_isvc,
                    gateways=self._gateways,
                    notes=notes,
                    conditional=conditional,
                ),
            )
            for note in notes:  # parts left out of a route that otherwise counts
                self._report(kinds.HTTPROUTE, route, note)
            for entry in entries or []:
                if entry.model is None or entry.model in models:
                    routes.setdefault(entry.id, entry)
                    claims.setdefault(entry.id, []).append((route, entry.model, entry.id in conditional))
        for ident, claimants in claims.items():
            # Two routes send one host and path to different models, one of them told apart by headers, query or
            # method: Envoy picks by those, authz cannot, so the older route's model would be checked for requests
            # that go to the other one (an allow-list bypass). As within one route, the path gets no record.
            leads_to = {model for _, model, _ in claimants}
            if len(leads_to) > 1 and any(extra for _, _, extra in claimants):
                routes.pop(ident, None)
                shown = ", ".join(sorted(m or "(no model)" for m in leads_to))
                for route, _, _ in claimants:
                    problem = NotServed(
                        f"{ident} leads to {shown} through routes told apart by more than the path",
                        reason="ambiguous_backend",
                    )
                    self._report(kinds.HTTPROUTE, route, problem)
        model_routes: dict[str, list[str]] = {}
        for entry in routes.values():
            if entry.model is not None:
                model_routes.setdefault(entry.model, []).append(entry.id)
        self.records[RecordKind.MODEL] = {
            m.id: encode_record(m.model_copy(update={"routes": tuple(sorted(model_routes.get(m.id, ())))}))
            for m in models.values()
        }
        self.records[RecordKind.ROUTE] = {r.id: encode_record(r) for r in routes.values()}
