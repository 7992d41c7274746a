"""InferenceService + ServingRuntime -> ModelRecord, table-tested on the seed's manifests and variants."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from controlplane.errors import TranslateError
from controlplane.translate.isvc import find_runtime, translate_isvc

SEED = Path(__file__).parent / "fixtures" / "seed"
ISVC: dict[str, Any] = yaml.safe_load((SEED / "qwen3-0.6b-vllm-raw.yaml").read_text())
RUNTIME: dict[str, Any] = yaml.safe_load((SEED / "vllm-latest-runtime.yaml").read_text())


def _isvc(**changes: Any) -> dict[str, Any]:
    obj = copy.deepcopy(ISVC)
    for path, value in changes.items():
        node = obj
        *parents, leaf = path.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        if value is None:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    return obj


def test_seed_isvc_with_its_runtime() -> None:
    record = translate_isvc(ISVC, runtime=RUNTIME)
    assert record.id == "qwen3-0-6b-instruct"
    assert record.namespace == "llm"
    assert record.ready is True and record.reason == ""
    assert record.url == "http://qwen3-0-6b-instruct-predictor.llm.svc.cluster.local"
    assert (record.runtime, record.image, record.model_format) == ("vllm-latest", "vllm/vllm-openai:latest", "vLLM")
    assert record.storage_uri == "hf://Qwen/Qwen3-0.6B"
    assert (record.gpus, record.min_replicas, record.max_replicas) == (1, 1, 1)
    assert record.max_model_len == 6144
    assert record.deployment_mode == "RawDeployment"
    assert record.isvc == "llm/qwen3-0-6b-instruct"


@pytest.mark.parametrize(
    ("isvc", "runtime", "expected"),
    [
        pytest.param(
            _isvc(), None, {"id": "qwen3-0-6b-instruct", "image": None, "max_model_len": None}, id="no-runtime"
        ),
        pytest.param(
            _isvc(spec__predictor__model__args=["--served-model-name=qwen3", "--max-model-len", "4096"]),
            RUNTIME,
            {"id": "qwen3", "max_model_len": 4096},
            id="predictor-args-override-runtime",
        ),
        pytest.param(
            _isvc(
                status__conditions=[
                    {"type": "PredictorReady", "status": "False", "reason": "MinimumReplicasUnavailable"}
                ]
            ),
            RUNTIME,
            {"ready": False, "reason": "MinimumReplicasUnavailable"},
            id="predictor-not-ready",
        ),
        pytest.param(
            _isvc(status__conditions=[{"type": "PredictorReady", "status": "True"}]),
            RUNTIME,
            {"ready": True},
            id="predictor-ready-without-ready",
        ),
        pytest.param(
            _isvc(status__address=None),
            RUNTIME,
            {"url": "http://qwen3-0-6b-instruct-llm.example.com"},
            id="url-from-status-url",
        ),
        pytest.param(
            _isvc(spec__predictor__model__resources={"limits": {"nvidia.com/gpu": 2}}),
            RUNTIME,
            {"gpus": 2},
            id="gpu-limits-only",
        ),
        pytest.param(
            _isvc(spec__predictor__model__resources=None),
            RUNTIME,
            {"gpus": 0},
            id="no-resources",
        ),
        pytest.param(
            _isvc(metadata__annotations=None, spec__predictor__minReplicas=None, spec__predictor__maxReplicas=None),
            RUNTIME,
            {"deployment_mode": None, "min_replicas": None, "max_replicas": None},
            id="serverless-defaults",
        ),
    ],
)
def test_isvc_variants(isvc: dict[str, Any], runtime: dict[str, Any] | None, expected: dict[str, Any]) -> None:
    record = translate_isvc(isvc, runtime=runtime)
    assert {k: getattr(record, k) for k in expected} == expected


@pytest.mark.parametrize(
    ("isvc", "reason"),
    [
        pytest.param(_isvc(status=None), "no_status", id="no-status"),
        pytest.param(_isvc(status={}), "no_status", id="empty-status"),
        pytest.param(_isvc(spec=None), "invalid_spec", id="no-spec"),
        pytest.param(
            _isvc(spec__predictor__model__resources={"limits": {"nvidia.com/gpu": "a"}}), "invalid_spec", id="bad-gpu"
        ),
        pytest.param(_isvc(spec__predictor__minReplicas="x"), "invalid_spec", id="bad-replicas"),
    ],
)
def test_isvc_rejected(isvc: dict[str, Any], reason: str) -> None:
    with pytest.raises(TranslateError) as info:
        translate_isvc(isvc, runtime=RUNTIME)
    assert info.value.reason == reason


@pytest.mark.parametrize(
    ("isvc", "runtimes", "cluster", "expected"),
    [
        pytest.param(ISVC, {("llm", "vllm-latest"): RUNTIME}, {}, "vllm-latest", id="named-in-namespace"),
        pytest.param(
            ISVC,
            {},
            {("", "vllm-latest"): {**RUNTIME, "kind": "ClusterServingRuntime", "metadata": {"name": "vllm-latest"}}},
            "vllm-latest",
            id="named-cluster-runtime",
        ),
        pytest.param(ISVC, {("other", "vllm-latest"): RUNTIME}, {}, None, id="other-namespace-not-used"),
        pytest.param(
            _isvc(spec__predictor__model__runtime=None),
            {("llm", "vllm-latest"): RUNTIME},
            {},
            "vllm-latest",
            id="auto-selected-by-format",
        ),
    ],
)
def test_find_runtime(isvc: dict[str, Any], runtimes: Any, cluster: Any, expected: str | None) -> None:
    found = find_runtime(isvc, runtimes=runtimes, cluster_runtimes=cluster)
    assert (found["metadata"]["name"] if found else None) == expected
