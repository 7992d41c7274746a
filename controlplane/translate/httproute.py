"""HTTPRoute (gateway.networking.k8s.io/v1) -> route table entries.

A rule's ``PathPrefix`` matches (no match means ``/``; a trailing ``/`` is ignored, as Gateway API does) on each
of the route's hostnames (none means any host, ``*``) become entries pointing at the model behind the rule's
backendRef, when that Service belongs to a known InferenceService (``<isvc>-predictor``, ``<isvc>``). A
``URLRewrite`` filter with ``ReplacePrefixMatch`` is recorded so the gateway knows the upstream path. Services
that serve no model are ignored; ``Exact`` and ``RegularExpression`` matches (the route table holds prefixes) and
backends other than Services (an InferencePool) are left out and reported (``unsupported_match``,
``unsupported_backend``), while the rest of the route still counts.

maas authz decides on host and path alone, so a route only counts where those name one model (otherwise it has
no records at all, reported as below; ``NotServed``):
- it must be attached to a gateway maas authz guards (``--gateways``; a route without ``parentRefs`` counts, one
  attached only to Services, a mesh route, does not), else it is skipped as ``other_gateway`` (a route of another
  gateway must not stand for this one's paths);
- that gateway must not have refused it: a route whose ``status.parents`` entry for each of those gateways says
  ``Accepted: "False"`` is skipped as ``not_accepted`` (the gateway does not serve it, so its paths belong to
  whichever route it does serve; a route with no status yet counts);
- a rule's backendRefs with a positive weight (default 1) must all be one model's Services (weights or
  header/query/method matches that split one path between models are skipped as ``ambiguous_backend``: authz
  would check the request against the wrong model's allow-list).

A route labelled ``maas.io/self-service: "true"`` exposes the control plane's self-service API (``/v1/models``,
``/v1/me``): its PathPrefix matches become entries with ``model`` None, which maas authz admits for any valid key
without model checks, whatever its backend.
"""

from __future__ import annotations

from collections.abc import Mapping

from controlplane.errors import NotServed, TranslateError
from controlplane.kinds import Obj, ObjKey, key_of, labels_of
from controlplane.translate.common import as_dict, as_list, spec
from gateway.contract import RouteRecord, normalise_prefix, route_id

SERVICE_SUFFIXES = ("-predictor", "")
SELF_SERVICE_LABEL = "maas.io/self-service"


def model_for_service(namespace: str, service: str, *, models_by_isvc: Mapping[ObjKey, str]) -> str | None:
    """The model id served by a Service, given the model ids of the known ISVCs by (namespace, name)."""
    for suffix in SERVICE_SUFFIXES:
        if suffix and not service.endswith(suffix):
            continue
        isvc = service[: len(service) - len(suffix)] if suffix else service
        model = models_by_isvc.get((namespace, isvc))
        if model is not None:
            return model
    return None


def _rewrite(rule: Mapping[str, object]) -> str | None:
    for item in as_list(rule.get("filters")):
        entry = as_dict(item)
        if entry.get("type") != "URLRewrite":
            continue
        path = as_dict(as_dict(entry.get("urlRewrite")).get("path"))
        if path.get("type") == "ReplacePrefixMatch":
            return str(path.get("replacePrefixMatch") or "/")
        if path.get("type") == "ReplaceFullPath":
            return str(path.get("replaceFullPath") or "/")
    return None


def _ours(route: Obj, namespace: str, gateways: frozenset[str]) -> list[tuple[str, str]] | None:
    """The parentRefs naming one of ``gateways`` (``name`` or ``namespace/name``; any Gateway when none are set) as
    (namespace, name); None for a route without parentRefs (it counts), [] for one attached elsewhere."""
    refs = [as_dict(r) for r in as_list(spec(route).get("parentRefs"))]
    if not refs:
        return None
    ours = []
    for ref in refs:
        if ref.get("kind", "Gateway") != "Gateway" or ref.get("group", "gateway.networking.k8s.io") not in (
            "gateway.networking.k8s.io",
            "",
        ):
            continue  # a Service (a mesh route) or another kind of parent: not a gateway authz guards
        name = str(ref.get("name") or "")
        ns = str(ref.get("namespace") or namespace)
        if not gateways or name in gateways or f"{ns}/{name}" in gateways:
            ours.append((ns, name))
    return ours


def _refused_by_all(route: Obj, namespace: str, ours: list[tuple[str, str]]) -> bool:
    """Whether every one of ``ours`` has a ``status.parents`` entry saying ``Accepted: "False"``."""
    refused: set[tuple[str, str]] = set()
    for raw in as_list(as_dict(route.get("status")).get("parents")):
        entry = as_dict(raw)
        ref = as_dict(entry.get("parentRef"))
        parent = (str(ref.get("namespace") or namespace), str(ref.get("name") or ""))
        accepted = [as_dict(c) for c in as_list(entry.get("conditions")) if as_dict(c).get("type") == "Accepted"]
        if accepted and str(accepted[0].get("status")) == "False":
            refused.add(parent)
    return bool(ours) and set(ours) <= refused


def _backend(
    rule: Mapping[str, object],
    namespace: str,
    *,
    models_by_isvc: Mapping[ObjKey, str],
    self_service: bool,
    notes: list[TranslateError],
) -> tuple[str | None, str] | None:
    """(model, first backend) of a rule; None when no backend serves a model. Raises when the rule's weighted
    backends serve more than one model, or a model and something else."""
    found: list[tuple[str | None, str]] = []
    for raw_ref in as_list(rule.get("backendRefs")):
        ref = as_dict(raw_ref)
        if ref.get("kind", "Service") != "Service" or ref.get("group", "") not in ("", "core"):
            notes.append(
                TranslateError(
                    f"backendRef {ref.get('kind')} {ref.get('name')!r}: only Services are mapped to models",
                    reason="unsupported_backend",
                )
            )
            continue
        weight = ref.get("weight", 1)
        if isinstance(weight, int) and weight <= 0:
            continue  # gets no traffic
        ns = str(ref.get("namespace") or namespace)
        model = model_for_service(ns, str(ref.get("name", "")), models_by_isvc=models_by_isvc)
        port = f":{ref['port']}" if ref.get("port") else ""
        found.append((None if self_service else model, f"{ref.get('name')}.{ns}{port}"))
        if self_service:
            return found[0]
    models = {model for model, _ in found}
    if len(models) > 1:
        shown = ", ".join(sorted(m or "(no model)" for m in models))
        raise NotServed(f"one rule splits its traffic between {shown}", reason="ambiguous_backend")
    return found[0] if found and found[0][0] is not None else None


def translate_route(
    route: Obj,
    *,
    models_by_isvc: Mapping[ObjKey, str],
    gateways: frozenset[str] = frozenset(),
    notes: list[TranslateError] | None = None,
    conditional: set[str] | None = None,
) -> list[RouteRecord]:
    """The route's entries; parts left out of an otherwise good route are added to ``notes`` when given, and the
    ids of entries whose match also needs headers, query parameters or a method to ``conditional``."""
    namespace, name = key_of(route)
    body = spec(route)
    notes = notes if notes is not None else []
    if not isinstance(route.get("spec"), dict):
        raise TranslateError(f"HTTPRoute {namespace}/{name} has no spec", reason="invalid_spec")
    ours = _ours(route, namespace, gateways)
    if ours is not None and not ours:
        raise NotServed(
            f"HTTPRoute {namespace}/{name} is attached to none of the gateways maas authz guards "
            f"({', '.join(sorted(gateways)) or 'any Gateway'})",
            reason="other_gateway",
        )
    if ours and _refused_by_all(route, namespace, ours):
        raise NotServed(
            f"HTTPRoute {namespace}/{name} is not accepted by its gateway (status.parents: Accepted False)",
            reason="not_accepted",
        )
    hosts = [str(h) for h in as_list(body.get("hostnames")) if h] or ["*"]
    self_service = labels_of(route).get(SELF_SERVICE_LABEL, "").lower() == "true"
    out: list[RouteRecord] = []
    seen: dict[str, RouteRecord] = {}
    for raw_rule in as_list(body.get("rules")):
        rule = as_dict(raw_rule)
        found = _backend(rule, namespace, models_by_isvc=models_by_isvc, self_service=self_service, notes=notes)
        if found is None:
            continue
        backend = found
        matches = [as_dict(m) for m in as_list(rule.get("matches"))] or [{}]
        for match in matches:
            path = as_dict(match.get("path")) or {"type": "PathPrefix", "value": "/"}
            kind = path.get("type", "PathPrefix")
            if kind != "PathPrefix":
                notes.append(
                    TranslateError(
                        f"path match {kind} {path.get('value')!r} left out: only PathPrefix matches are checked",
                        reason="unsupported_match",
                    )
                )
                continue
            raw_prefix = str(path.get("value") or "/")
            if not raw_prefix.startswith("/"):
                raise TranslateError(f"HTTPRoute {namespace}/{name}: path {raw_prefix!r}", reason="invalid_spec")
            prefix = normalise_prefix(raw_prefix)
            more_than_the_path = bool(match.get("headers") or match.get("queryParams") or match.get("method"))
            for host in hosts:
                record = RouteRecord(
                    id=route_id(host, prefix),
                    host=host,
                    prefix=prefix,
                    model=backend[0],
                    rewrite=_rewrite(rule),
                    backend=backend[1],
                )
                if conditional is not None and more_than_the_path:
                    conditional.add(record.id)
                earlier = seen.setdefault(record.id, record)
                if earlier.model != record.model:  # rules told apart by headers, query or method: not by authz
                    raise NotServed(
                        f"{host}{prefix} leads to {earlier.model} and to {record.model} (matches on more than the "
                        "path)",
                        reason="ambiguous_backend",
                    )
                if earlier is record:
                    out.append(record)
    return out
