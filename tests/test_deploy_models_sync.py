"""The rendered deploy/ manifests and the control plane agree: maas controlplane, configured as the base Deployment
configures it, reads the objects of ``models/``, ``models/samples`` and the tier ConfigMaps of ``base/`` from the
Kubernetes API emulator (over real HTTP) and writes the expected catalog, routes, tiers and keys to a real Redis."""

from __future__ import annotations

import copy
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from controlplane.runner import ControlPlane
from controlplane.settings import ControlPlaneSettings
from gateway import contract
from gateway.contract import RecordKind
from gateway.settings import load
from gateway.store.redis import RedisStore
from tests.conftest import PEPPER
from tests.support.admin_api import ADMIN_TOKEN, running
from tests.support.k8s_emulator import RESOURCES, K8sEmulator, eventually, rbac_authorizer
from tests.support.platform import records
from tests.test_deploy_manifests import find, render

pytestmark = pytest.mark.redis

EMULATED_KINDS = {kind for kind, _ in RESOURCES.values()}

EXPECTED_MODELS = {
    # model id: (route prefix, storageUri, max_model_len)
    "qwen3-0-6b-instruct": ("/qwen3", "hf://Qwen/Qwen3-0.6B", 6144),
    "granite-code": ("/granite", "hf://ibm-granite/granite-3b-code-instruct-128k", 6144),
    "mistral": ("/mistral", "hf://mistralai/Mistral-7B-Instruct-v0.3", 6144),
    "nomic-embed": ("/nomic", "hf://nomic-ai/nomic-embed-text-v1.5", 2048),
}


def ready(isvc: dict[str, Any]) -> dict[str, Any]:
    """The InferenceService as KServe reports it once its predictor is up."""
    out = copy.deepcopy(isvc)
    name, namespace = out["metadata"]["name"], out["metadata"]["namespace"]
    out["status"] = {
        "url": f"http://{name}-{namespace}.example.com",
        "address": {"url": f"http://{name}-predictor.{namespace}.svc.cluster.local"},
        "conditions": [{"type": t, "status": "True"} for t in ("IngressReady", "PredictorReady", "Ready")],
    }
    return out


def cluster_objects() -> list[dict[str, Any]]:
    objs = []
    for path in ("base", "models", "models/samples"):
        for obj in render(path):
            if obj["kind"] in EMULATED_KINDS and obj["kind"] != "Service":
                objs.append(ready(obj) if obj["kind"] == "InferenceService" else obj)
    return objs


def deployment_env() -> dict[str, str]:
    container = find(render("base"), "Deployment", "maas-controlplane")["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e["value"] for e in container["env"] if "value" in e}


def deployed_settings(emulator: K8sEmulator, tmp_path: Path, redis_url: str, **overrides: Any) -> ControlPlaneSettings:
    """maas controlplane as base/'s Deployment configures it, on local ports, the emulator and a test Redis."""
    env = deployment_env()
    values: dict[str, Any] = {
        "port": 0,
        "ops_port": 0,
        "host": "127.0.0.1",
        "source": env["MAAS_SOURCE"],
        "namespaces": env["MAAS_NAMESPACES"],
        "key_namespace": env.get("MAAS_KEY_NAMESPACE", ""),
        "kubeconfig": str(emulator.write_kubeconfig(tmp_path / "kubeconfig")),
        "redis_url": redis_url,
        "resync_period": 3600,
        "log_format": "text",
    }
    return load(ControlPlaneSettings, **{**values, **overrides})


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[RedisStore]:
    red = RedisStore(redis_url, timeout=2.0)
    yield red
    await red.close()


async def test_rendered_models_yield_the_expected_catalog(
    emulator: K8sEmulator, tmp_path: Path, redis_url: str, store: RedisStore
) -> None:
    for obj in cluster_objects():
        emulator.create(obj)
    plane = ControlPlane(deployed_settings(emulator, tmp_path, redis_url, leader_election=False))
    await plane.start()
    try:
        assert plane.syncer is not None
        await eventually(plane.syncer.ready.is_set)
        got = await records(store)

        models = got[RecordKind.MODEL]
        assert set(models) == set(EXPECTED_MODELS)
        for model_id, (prefix, storage_uri, max_len) in EXPECTED_MODELS.items():
            model = models[model_id]
            assert model["ready"] is True, model
            assert (model["runtime"], model["model_format"], model["gpus"]) == ("vllm-latest", "vLLM", 1)
            assert (model["storage_uri"], model["max_model_len"], model["namespace"]) == (storage_uri, max_len, "llm")
            assert model["routes"] == [contract.route_id("*", prefix)]

        routes = got[RecordKind.ROUTE]
        assert {r["prefix"]: r["model"] for r in routes.values()} == {
            prefix: model_id for model_id, (prefix, _, _) in EXPECTED_MODELS.items()
        }
        for route in routes.values():
            assert route["rewrite"] == "/" and route["backend"] == f"{route['model']}-predictor.llm:80"

        tiers = {name: contract.TierRecord.model_validate(raw) for name, raw in got[RecordKind.TIER].items()}
        assert set(tiers) == {t.name for t in contract.DEFAULT_TIERS}
        for default in contract.DEFAULT_TIERS:
            tier = tiers[default.name]
            assert (tier.level, tier.groups, tier.limits) == (default.level, default.groups, default.limits)

        samples = {o["stringData"]["api_key"]: o for o in render("models/samples")}
        keys = got[RecordKind.KEY]
        assert set(keys) == {contract.digest_key(key, PEPPER) for key in samples}
        for key, secret in samples.items():
            record = contract.KeyRecord.model_validate(keys[contract.digest_key(key, PEPPER)])
            annotations = secret["metadata"]["annotations"]
            assert record.user == annotations["secret.kuadrant.io/user-id"]
            assert record.groups == (annotations["kuadrant.io/groups"],)
            assert record.source == f"secret:llm/{secret['metadata']['name']}"
        assert not any(key in json.dumps(table) for key in samples for table in got.values())
    finally:
        await plane.stop()


async def test_the_shipped_rbac_allows_everything_the_control_plane_does(
    emulator: K8sEmulator, tmp_path: Path, redis_url: str
) -> None:
    """The API server enforces base/'s Roles, ClusterRoles and bindings for the maas-controlplane service account
    while the control plane, configured as its Deployment is, elects itself leader, syncs, and serves the admin
    API's writes: issuing, changing, rotating and revoking a key, and writing and deleting a tier."""
    for obj in cluster_objects():
        emulator.create(obj)
    emulator.authorize = rbac_authorizer(render("base"), "maas-system", "maas-controlplane")
    tokens = tmp_path / "tokens"
    tokens.write_text(f"admin ops {ADMIN_TOKEN}\n")
    settings = deployed_settings(
        emulator,
        tmp_path,
        redis_url,
        leader_election=deployment_env()["MAAS_LEADER_ELECTION"] == "true",
        lease_namespace="maas-system",
        identity="maas-controlplane-0",
        retry_period=0.2,
        admin_token_file=str(tokens),
        admin_write_timeout=5.0,
        key_pepper=PEPPER.decode(),
    )
    async with running(settings) as (plane, api):
        # the admin view may have loaded Redis before this replica won the Lease and wrote the first sync
        await eventually(lambda: plane.admin is not None and "premium" in plane.admin.tiers)
        status, issued = await api.call("POST", "/admin/v1/keys", json={"user": "alice", "tier": "premium"})
        assert status == 201, (issued, emulator.forbidden)
        key_id = issued["key_id"]
        status, body = await api.call("PATCH", f"/admin/v1/keys/{key_id}", json={"tier": "enterprise"})
        assert status == 200, body
        status, body = await api.call("POST", f"/admin/v1/keys/{key_id}/rotate", json={"grace_period": "0s"})
        assert status == 200, body
        status, body = await api.call("DELETE", f"/admin/v1/keys/{body['key_id']}")
        assert status == 200, body
        gold = {"level": 3, "groups": ["gold"], "limits": {"requests": {"limit": 100, "window": "1m"}}}
        status, body = await api.call("PUT", "/admin/v1/tiers/gold", json=gold)
        assert status == 201, body
        status, body = await api.call("DELETE", "/admin/v1/tiers/gold")
        assert status == 200, body
    assert not emulator.forbidden
    for verb in ("watch secrets", "create secrets", "update secrets", "update configmaps", "create leases"):
        assert emulator.requests[verb], verb


def test_the_rbac_authorizer_refuses_what_no_rule_grants() -> None:
    allows = rbac_authorizer(render("base"), "maas-system", "maas-controlplane")
    assert allows("update", "", "configmaps", "maas-system", "maas-tier-limits")
    assert not allows("update", "", "configmaps", "maas-system", "some-other-configmap")
    assert not allows("update", "", "configmaps", "llm", "maas-tier-limits")
    # a tier change takes back a tier ConfigMap it created when its second write fails
    assert allows("delete", "", "configmaps", "maas-system", "maas-tier-limits")
    assert not allows("delete", "", "configmaps", "maas-system", "some-other-configmap")
    assert not allows("list", "", "secrets", "kube-system", None)
    assert allows("list", "", "secrets", "llm", None)
    assert not allows("get", "", "secrets", "default", "x")
    assert allows("create", "", "secrets", "llm", None) and allows("update", "", "secrets", "llm", "x")
    for verb in ("create", "update", "patch", "delete"):  # maas-system holds maas-secrets, maas-redis, admin tokens
        assert not allows(verb, "", "secrets", "maas-system", None if verb == "create" else "maas-secrets"), verb
    # a key rotation that fails after creating the new key's Secret deletes it again
    assert allows("delete", "", "secrets", "llm", "x") and not allows("patch", "", "secrets", "llm", "x")
    assert not rbac_authorizer(render("base"), "maas-system", "maas-authz")("get", "", "secrets", "llm", "x")
