"""HTTPRoute (gateway.networking.k8s.io/v1) -> route table entries.

A rule's ``PathPrefix`` matches (no match means ``/``) on each of the route's hostnames (none means any host,
``*``) become entries pointing at the model behind the rule's backendRef, when that Service belongs to a known
InferenceService (``<isvc>-predictor``, ``<isvc>``). A ``URLRewrite`` filter with ``ReplacePrefixMatch`` is
recorded so the gateway knows the upstream path. Other match types and Services that serve no model are ignored.

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


def translate_route(route: Obj, *, models_by_isvc: Mapping[ObjKey, str]) -> list[RouteRecord]:
    namespace, name = key_of(route)
    body = spec(route)
    if not isinstance(route.get("spec"), dict):
        raise TranslateError(f"HTTPRoute {namespace}/{name} has no spec", reason="invalid_spec")
    hosts = [str(h) for h in as_list(body.get("hostnames")) if h] or ["*"]
    self_service = labels_of(route).get(SELF_SERVICE_LABEL, "").lower() == "true"
    out: list[RouteRecord] = []
    for raw_rule in as_list(body.get("rules")):
        rule = as_dict(raw_rule)
        backend: tuple[str | None, str, str] | None = None
        for raw_ref in as_list(rule.get("backendRefs")):
            ref = as_dict(raw_ref)
            if ref.get("kind", "Service") != "Service" or ref.get("group", "") not in ("", "core"):
                continue
            ns = str(ref.get("namespace") or namespace)
            model = model_for_service(ns, str(ref.get("name", "")), models_by_isvc=models_by_isvc)
            if self_service:
                port = f":{ref['port']}" if ref.get("port") else ""
                backend = (None, f"{ref.get('name')}.{ns}{port}", ns)
                break
            if model is not None:
                port = f":{ref['port']}" if ref.get("port") else ""
                backend = (model, f"{ref.get('name')}.{ns}{port}", ns)
                break
        if backend is None:
            continue
        matches = [as_dict(m) for m in as_list(rule.get("matches"))] or [{}]
        for match in matches:
            path = as_dict(match.get("path")) or {"type": "PathPrefix", "value": "/"}
            if path.get("type", "PathPrefix") != "PathPrefix":
                continue
            prefix = str(path.get("value") or "/")
            if not prefix.startswith("/"):
                raise TranslateError(f"HTTPRoute {namespace}/{name}: path {prefix!r}", reason="invalid_spec")
            for host in hosts:
                out.append(
                    RouteRecord(
                        id=route_id(host, prefix),
                        host=host,
                        prefix=prefix,
                        model=backend[0],
                        rewrite=_rewrite(rule),
                        backend=backend[1],
                    )
                )
    return out
