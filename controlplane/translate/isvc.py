"""InferenceService (+ its ServingRuntime / ClusterServingRuntime) -> ModelRecord.

The model id is the name vLLM serves: ``--served-model-name`` (or the Hugging Face server's ``--model_name``) in the
predictor's args, else in the runtime's args (after expanding ``{{.Name}}`` to the ISVC name), else the ISVC name.
The predictor is ``spec.predictor.model``, or a framework-specific field (``huggingface``, ``pytorch``, ...) read
as a model of that format, or custom ``containers``. An ISVC without status has not been seen
by KServe yet: its model is known and not ready (503 ``model_not_ready`` for its routes, not 404) until KServe
writes one.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from controlplane.errors import TranslateError
from controlplane.kinds import Obj, ObjKey, annotations_of, key_of
from controlplane.translate.common import as_dict, as_list, spec
from gateway.contract import ModelRecord

DEPLOYMENT_MODE = "serving.kserve.io/deploymentMode"
GPU = "nvidia.com/gpu"
_TEMPLATE = re.compile(r"\{\{\s*\.Name\s*\}\}")


def _arg_value(args: Sequence[str], flag: str) -> str | None:
    """Value of ``--flag=value`` or ``--flag value`` (the last occurrence wins, as in argparse), with ``_`` and ``-``
    alike in the flag's name (vLLM takes ``--max_model_len`` for ``--max-model-len``)."""
    found: str | None = None
    for index, arg in enumerate(args):
        if not arg.startswith("--"):
            continue
        name, eq, value = arg.partition("=")
        if name.replace("_", "-") != flag:
            continue
        if eq:
            found = value
        elif index + 1 < len(args):
            found = args[index + 1]
    return found


_HUMAN = re.compile(r"^(\d+(?:\.\d+)?)([kmgt]?)$", re.IGNORECASE)
_UNITS = {"k": 1, "m": 2, "g": 3, "t": 4}


def context_length(text: str | None) -> int | None:
    """``--max-model-len`` as vLLM reads it: ``4096``, ``4k`` (x1000), ``4K`` (x1024), ``25.6k``; ``auto`` or
    ``-1`` (vLLM's choice) and anything else unreadable give None: the length is information, not worth the model."""
    match = _HUMAN.match((text or "").strip())
    if match is None:
        return None
    number, unit = match.groups()
    scale = (1024 if unit.isupper() else 1000) ** _UNITS[unit.lower()] if unit else 1
    value = int(float(number) * scale)
    return value if value > 0 else None


def _container_args(container: Mapping[str, Any], name: str) -> list[str]:
    words = [str(a) for a in (*as_list(container.get("command")), *as_list(container.get("args")))]
    return [_TEMPLATE.sub(name, w) for w in words]


FRAMEWORKS = (
    "huggingface",
    "sklearn",
    "xgboost",
    "lightgbm",
    "pytorch",
    "tensorflow",
    "onnx",
    "triton",
    "pmml",
    "paddle",
)
"""KServe's framework-specific predictor fields (``predictor.huggingface: {...}``), the older way to write
``predictor.model`` with that ``modelFormat``."""


def model_spec(isvc: Obj) -> dict[str, Any]:
    """``spec.predictor.model``, or a framework-specific predictor read as the model spec KServe makes of it."""
    predictor = as_dict(spec(isvc).get("predictor"))
    model = as_dict(predictor.get("model"))
    if model:
        return model
    for framework in FRAMEWORKS:
        legacy = as_dict(predictor.get(framework))
        if legacy:
            return {**legacy, "modelFormat": {"name": framework}}
    return {}


def _runtime_container(runtime: Obj | None) -> dict[str, Any]:
    return _serving_container(spec(runtime).get("containers")) if runtime is not None else {}


def _serving_container(listed: Any) -> dict[str, Any]:
    """``kserve-container`` among ``containers``, else the first."""
    containers = [as_dict(c) for c in as_list(listed)]
    for container in containers:
        if container.get("name") == "kserve-container":
            return container
    return containers[0] if containers else {}


def find_runtime(isvc: Obj, *, runtimes: Mapping[ObjKey, Obj], cluster_runtimes: Mapping[ObjKey, Obj]) -> Obj | None:
    """The ServingRuntime the ISVC names (its namespace first, then cluster-wide), or, when it names none, the
    runtime KServe would pick: an enabled one that auto-selects the model format, the highest ``priority`` of that
    format first, the ISVC's namespace before cluster runtimes, then by name."""
    namespace, _ = key_of(isvc)
    model = model_spec(isvc)
    wanted = model.get("runtime")
    if wanted:
        return runtimes.get((namespace, str(wanted))) or cluster_runtimes.get(("", str(wanted)))
    fmt = str(as_dict(model.get("modelFormat")).get("name", "")).lower()
    for scope in (
        [r for k, r in sorted(runtimes.items()) if k[0] == namespace],
        [r for _, r in sorted(cluster_runtimes.items())],
    ):
        best: tuple[int, Obj] | None = None
        for runtime in scope:
            if spec(runtime).get("disabled") is True:
                continue
            for supported in as_list(spec(runtime).get("supportedModelFormats")):
                entry = as_dict(supported)
                if str(entry.get("name", "")).lower() == fmt and entry.get("autoSelect"):
                    priority = entry.get("priority")
                    rank = priority if isinstance(priority, int) and not isinstance(priority, bool) else 0
                    if best is None or rank > best[0]:
                        best = (rank, runtime)
        if best is not None:
            return best[1]
    return None


def _gpus(resources: Mapping[str, Any]) -> int:
    best = 0
    for section in ("limits", "requests"):
        value = as_dict(resources.get(section)).get(GPU)
        if value is not None:
            try:
                best = max(best, int(str(value)))
            except ValueError as exc:
                raise TranslateError(f"{GPU} is not an integer: {value!r}", reason="invalid_spec") from exc
    return best


def _condition(status: Mapping[str, Any], kind: str) -> dict[str, Any] | None:
    for cond in as_list(status.get("conditions")):
        if as_dict(cond).get("type") == kind:
            return as_dict(cond)
    return None


def _readiness(status: Mapping[str, Any]) -> tuple[bool, str]:
    ready = _condition(status, "Ready") or _condition(status, "PredictorReady")
    if ready is None:
        return False, "no Ready condition"
    if str(ready.get("status")) == "True":
        return True, ""
    return False, str(ready.get("reason") or ready.get("message") or "not ready")


def _optional_int(value: Any, *, what: str) -> int | None:
    if value is None:
        return None
    try:
        return int(str(value))
    except ValueError as exc:
        raise TranslateError(f"{what} is not an integer: {value!r}", reason="invalid_spec") from exc


def translate_isvc(isvc: Obj, *, runtime: Obj | None) -> ModelRecord:
    namespace, name = key_of(isvc)
    if not name:
        raise TranslateError("InferenceService has no name", reason="invalid_spec")
    predictor = as_dict(spec(isvc).get("predictor"))
    if not predictor:
        raise TranslateError("InferenceService has no spec.predictor", reason="invalid_spec")
    status = as_dict(isvc.get("status"))
    model = model_spec(isvc)
    # a custom predictor (``predictor.containers``, no runtime) is read from its serving container
    own = model or _serving_container(predictor.get("containers"))
    rt_container = _runtime_container(runtime) if model else {}
    args = _container_args(rt_container, name) + _container_args(own, name)
    # vLLM's flag, else KServe's Hugging Face server's (``--model_name``, which names the model it serves)
    served = _arg_value(args, "--served-model-name") or _arg_value(args, "--model-name")
    ready, reason = _readiness(status) if status else (False, "KServe has not reported a status yet")
    url = as_dict(status.get("address")).get("url") or status.get("url")
    resources = as_dict(own.get("resources")) or as_dict(rt_container.get("resources"))
    runtime_name = model.get("runtime") or (key_of(runtime)[1] if runtime is not None else None)
    max_len = _arg_value(args, "--max-model-len")
    return ModelRecord(
        id=(served or name).split()[0] if (served or name).strip() else name,
        namespace=namespace,
        ready=ready,
        reason=reason,
        url=str(url) if url else None,
        runtime=str(runtime_name) if runtime_name else None,
        image=str(own.get("image") or rt_container.get("image") or "") or None,
        model_format=str(as_dict(model.get("modelFormat")).get("name") or "") or None,
        storage_uri=str(model.get("storageUri") or predictor.get("storageUri") or "") or None,
        gpus=_gpus(resources),
        min_replicas=_optional_int(predictor.get("minReplicas"), what="minReplicas"),
        max_replicas=_optional_int(predictor.get("maxReplicas"), what="maxReplicas"),
        max_model_len=context_length(max_len),
        deployment_mode=annotations_of(isvc).get(DEPLOYMENT_MODE),
        isvc=f"{namespace}/{name}",
    )
