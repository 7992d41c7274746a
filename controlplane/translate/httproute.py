"""HTTPRoute (gateway.networking.k8s.io/v1) -> route table entries.

A rule's ``PathPrefix`` matches (no match means ``/``) on each of the route's hostnames (none means any host,
``*``) become entries pointing at the model behind the rule's backendRef, when that Service belongs to a known
InferenceService (``<isvc>-predictor``, ``<isvc>``). A ``URLRewrite`` filter with ``ReplacePrefixMatch`` is
recorded so the gateway knows the upstream path. Other match types and Services that serve no model are ignored.

maas authz decides on host and path alone, so a route only counts where those name one model:
- it must be attached to a gateway maas authz guards (``--gateways``; a route without ``parentRefs`` counts), else
  it is skipped as ``other_gateway`` (a route of another gateway must not stand for this one's paths);
- a rule's backendRefs with a positive weight (default 1) must all be one model's Services (weights or
  header/query/method matches that split one path between models are skipped as ``ambiguous_backend``: authz
  would check the request against the wrong model's allow-list).

A route labelled ``maas.io/self-service: "true"`` exposes the control plane's self-service API (``/v1/models``,
``/v1/me``): its PathPrefix matches become entries with ``model`` None, which maas authz admits for any valid key
without model checks, whatever its backend.
"""

from __future__ import annotations

from collections.abc import Mapping

from controlplane.errors import TranslateError
from controlplane.kinds import Obj, ObjKey, key_of, labels_of
from controlplane.translate.common import as_dict, as_list, spec
from gateway.contract import RouteRecord, route_id

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


def _attached(route: Obj, namespace: str, gateways: frozenset[str]) -> bool:
    """Whether a parentRef names one of ``gateways`` (``name`` or ``namespace/name``); no parentRefs counts."""
    refs = [as_dict(r) for r in as_list(spec(route).get("parentRefs"))]
    refs = [r for r in refs if r.get("kind", "Gateway") == "Gateway"]
    if not gateways or not refs:
        return True
    for ref in refs:
        name = str(ref.get("name") or "")
        if name in gateways or f"{ref.get('namespace') or namespace}/{name}" in gateways:
            return True
    return False


def _backend(
    rule: Mapping[str, object], namespace: str, *, models_by_isvc: Mapping[ObjKey, str], self_service: bool
) -> tuple[str | None, str] | None:
    """(model, first backend) of a rule; None when no backend serves a model. Raises when the rule's weighted
    backends serve more than one model, or a model and something else."""
    found: list[tuple[str | None, str]] = []
    for raw_ref in as_list(rule.get("backendRefs")):
        ref = as_dict(raw_ref)
        if ref.get("kind", "Service") != "Service" or ref.get("group", "") not in ("", "core"):
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
        raise TranslateError(f"one rule splits its traffic between {shown}", reason="ambiguous_backend")
    return found[0] if found and found[0][0] is not None else None


def translate_route(
    route: Obj, *, models_by_isvc: Mapping[ObjKey, str], gateways: frozenset[str] = frozenset()
) -> list[RouteRecord]:
    namespace, name = key_of(route)
    body = spec(route)
    if not isinstance(route.get("spec"), dict):
        raise TranslateError(f"HTTPRoute {namespace}/{name} has no spec", reason="invalid_spec")
    if not _attached(route, namespace, gateways):
        raise TranslateError(
            f"HTTPRoute {namespace}/{name} is attached to none of the gateways maas authz guards "
            f"({', '.join(sorted(gateways))})",
            reason="other_gateway",
        )
    hosts = [str(h) for h in as_list(body.get("hostnames")) if h] or ["*"]
    self_service = labels_of(route).get(SELF_SERVICE_LABEL, "").lower() == "true"
    out: list[RouteRecord] = []
    seen: dict[str, RouteRecord] = {}
    for raw_rule in as_list(body.get("rules")):
        rule = as_dict(raw_rule)
        found = _backend(rule, namespace, models_by_isvc=models_by_isvc, self_service=self_service)
        if found is None:
            continue
        backend = found
        matches = [as_dict(m) for m in as_list(rule.get("matches"))] or [{}]
        for match in matches:
            path = as_dict(match.get("path")) or {"type": "PathPrefix", "value": "/"}
            if path.get("type", "PathPrefix") != "PathPrefix":
                continue
            prefix = str(path.get("value") or "/")
            if not prefix.startswith("/"):
                raise TranslateError(f"HTTPRoute {namespace}/{name}: path {prefix!r}", reason="invalid_spec")
            for host in hosts:
                record = RouteRecord(
                    id=route_id(host, prefix),
                    host=host,
                    prefix=prefix,
                    model=backend[0],
                    rewrite=_rewrite(rule),
                    backend=backend[1],
                )
                earlier = seen.setdefault(record.id, record)
                if earlier.model != record.model:  # rules told apart by headers, query or method: not by authz
                    raise TranslateError(
                        f"{host}{prefix} leads to {earlier.model} and to {record.model} (matches on more than the "
                        "path)",
                        reason="ambiguous_backend",
                    )
                if earlier is record:
                    out.append(record)
    return out
