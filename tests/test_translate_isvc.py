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


@pytest.mark.parametrize("status", [None, {}])
def test_an_isvc_kserve_has_not_reconciled_is_a_model_not_ready_yet(status: dict[str, Any] | None) -> None:
    record = translate_isvc(_isvc(status=status), runtime=RUNTIME)
    assert (record.ready, record.reason, record.url) == (False, "KServe has not reported a status yet", None)


@pytest.mark.parametrize(
    ("isvc", "reason"),
    [
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


@pytest.mark.parametrize(
    ("args", "served", "length"),
    [
        pytest.param(["--max-model-len=2k"], None, 2000, id="2k"),
        pytest.param(["--max-model-len", "4K"], None, 4096, id="4K"),
        pytest.param(["--max-model-len=25.6k"], None, 25600, id="25.6k"),
        pytest.param(["--max-model-len=auto"], None, None, id="auto"),
        pytest.param(["--max_model_len=8192", "--served_model_name=mistral-7b"], "mistral-7b", 8192, id="underscores"),
    ],
)
def test_vllm_argument_spellings(args: list[str], served: str | None, length: int | None) -> None:
    """vLLM takes human-readable lengths and either '_' or '-' in flag names: '2k' had dropped the whole model
    (404 on its routes) and --served_model_name had been ignored (403 for the name clients send)."""
    runtime = copy.deepcopy(RUNTIME)
    runtime["spec"]["containers"][0]["args"] = [
        a for a in runtime["spec"]["containers"][0].get("args", []) if "max-model-len" not in a
    ]
    record = translate_isvc(_isvc(spec__predictor__model__args=args), runtime=runtime)
    assert record.max_model_len == length
    assert record.id == (served or "qwen3-0-6b-instruct")


def test_a_custom_container_predictor_is_read_from_its_container() -> None:
    predictor = {
        "containers": [
            {
                "name": "kserve-container",
                "image": "vllm/vllm-openai:v0.11.0",
                "args": ["--served-model-name=llama-3.2-1b", "--max-model-len=4096"],
                "resources": {"limits": {"nvidia.com/gpu": "2"}},
            }
        ]
    }
    record = translate_isvc(_isvc(spec__predictor=predictor), runtime=None)
    assert (record.id, record.image, record.max_model_len, record.gpus) == (
        "llama-3.2-1b",
        "vllm/vllm-openai:v0.11.0",
        4096,
        2,
    )


def test_auto_selection_skips_disabled_runtimes_and_prefers_priority() -> None:
    def runtime(name: str, *, priority: int | None = None, disabled: bool = False) -> dict[str, Any]:
        obj = copy.deepcopy(RUNTIME)
        obj["metadata"]["name"] = name
        obj["spec"]["disabled"] = disabled
        obj["spec"]["supportedModelFormats"] = [{"name": "vLLM", "autoSelect": True, "priority": priority}]
        return obj

    runtimes = {
        ("llm", "a-disabled"): runtime("a-disabled", priority=9, disabled=True),
        ("llm", "b-low"): runtime("b-low", priority=1),
        ("llm", "c-high"): runtime("c-high", priority=5),
    }
    found = find_runtime(_isvc(spec__predictor__model__runtime=None), runtimes=runtimes, cluster_runtimes={})
    assert found is not None and found["metadata"]["name"] == "c-high"


def test_a_framework_specific_predictor_is_read_as_the_model_spec_kserve_makes_of_it() -> None:
    """``predictor.huggingface`` had lost its served name, storage URI, GPUs and context length."""
    isvc = _isvc(spec__predictor__model=None)
    isvc["spec"]["predictor"]["huggingface"] = {
        "args": ["--model_name=hf-qwen", "--backend=vllm", "--max-model-len=2048"],
        "storageUri": "hf://Qwen/Qwen3-0.6B",
        "resources": {"limits": {"nvidia.com/gpu": "2"}},
    }
    record = translate_isvc(isvc, runtime=None)
    assert (record.id, record.model_format, record.storage_uri) == ("hf-qwen", "huggingface", "hf://Qwen/Qwen3-0.6B")
    assert (record.gpus, record.max_model_len) == (2, 2048)
    hf_runtime = copy.deepcopy(RUNTIME)
    hf_runtime["metadata"]["name"] = "kserve-huggingfaceserver"
    hf_runtime["spec"]["supportedModelFormats"] = [{"name": "huggingface", "autoSelect": True}]
    found = find_runtime(isvc, runtimes={("llm", "kserve-huggingfaceserver"): hf_runtime}, cluster_runtimes={})
    assert found is hf_runtime
