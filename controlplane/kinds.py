"""The cluster object kinds the control plane reads, and small helpers over raw (dict) Kubernetes objects."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

Obj = dict[str, Any]
ObjKey = tuple[str, str]
"""(namespace, name); namespace is "" for cluster-scoped objects."""


@dataclass(frozen=True, slots=True)
class Kind:
    name: str
    group: str
    version: str
    plural: str
    namespaced: bool = True

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def base_path(self, namespace: str | None) -> str:
        root = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        if self.namespaced and namespace:
            return f"{root}/namespaces/{namespace}/{self.plural}"
        return f"{root}/{self.plural}"


SECRET = Kind("Secret", "", "v1", "secrets")
CONFIGMAP = Kind("ConfigMap", "", "v1", "configmaps")
EVENT = Kind("Event", "", "v1", "events")
LEASE = Kind("Lease", "coordination.k8s.io", "v1", "leases")
ISVC = Kind("InferenceService", "serving.kserve.io", "v1beta1", "inferenceservices")
RUNTIME = Kind("ServingRuntime", "serving.kserve.io", "v1alpha1", "servingruntimes")
CLUSTER_RUNTIME = Kind("ClusterServingRuntime", "serving.kserve.io", "v1alpha1", "clusterservingruntimes", False)
HTTPROUTE = Kind("HTTPRoute", "gateway.networking.k8s.io", "v1", "httproutes")

WATCHED: tuple[Kind, ...] = (SECRET, CONFIGMAP, ISVC, RUNTIME, CLUSTER_RUNTIME, HTTPROUTE)
ALL_KINDS: tuple[Kind, ...] = (*WATCHED, EVENT, LEASE)
BY_NAME: dict[str, Kind] = {k.name: k for k in ALL_KINDS}


def kind_of(obj: Obj) -> Kind | None:
    """The known kind of a manifest, matched on ``kind`` and the API group (any version of the group)."""
    kind = BY_NAME.get(str(obj.get("kind", "")))
    if kind is None:
        return None
    group = str(obj.get("apiVersion", "")).rpartition("/")[0]
    return kind if group == kind.group else None


def meta(obj: Obj) -> dict[str, Any]:
    value = obj.get("metadata")
    return value if isinstance(value, dict) else {}


def key_of(obj: Obj) -> ObjKey:
    m = meta(obj)
    return (str(m.get("namespace") or ""), str(m.get("name") or ""))


def labels_of(obj: Obj) -> dict[str, str]:
    value = meta(obj).get("labels")
    return {str(k): str(v) for k, v in value.items()} if isinstance(value, dict) else {}


def annotations_of(obj: Obj) -> dict[str, str]:
    value = meta(obj).get("annotations")
    return {str(k): str(v) for k, v in value.items()} if isinstance(value, dict) else {}


def ref(obj: Obj) -> str:
    namespace, name = key_of(obj)
    return f"{namespace}/{name}" if namespace else name
