"""The control plane against the Kubernetes API emulator over real HTTP (kubernetes-asyncio) and a real Redis."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from controlplane import sync as sync_module
from controlplane.errors import ConflictError
from controlplane.kinds import SECRET
from controlplane.runner import ControlPlane
from controlplane.settings import ControlPlaneSettings
from gateway import contract
from gateway.contract import KeyRecord, RecordKind
from gateway.settings import load
from gateway.store.redis import RedisStore
from tests.conftest import PEPPER
from tests.support.admin_api import ADMIN_TOKEN, Api
from tests.support.k8s_emulator import K8sEmulator, eventually, load_manifests
from tests.support.platform import records
from tests.support.tools import check_metrics

pytestmark = pytest.mark.redis

SEED = Path(__file__).parent / "fixtures" / "seed"


def settings_for(emulator: K8sEmulator, tmp_path: Path, redis_url: str, **overrides: Any) -> ControlPlaneSettings:
    values: dict[str, Any] = {
        "port": 0,
        "ops_port": 0,
        "host": "127.0.0.1",
        "source": "kubernetes",
        "kubeconfig": str(emulator.write_kubeconfig(tmp_path / "kubeconfig")),
        "redis_url": redis_url,
        "leader_election": False,
        "resync_period": 3600,
        "backoff_max": 0.5,
        "log_format": "text",
    }
    values.update(overrides)
    return load(ControlPlaneSettings, **values)


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[RedisStore]:
    red = RedisStore(redis_url, timeout=2.0)
    yield red
    await red.close()


def key_secret(name: str, key: str, *, user: str = "", groups: str = "free", namespace: str = "llm") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"app": "llm-gateway"},
            "annotations": {"secret.kuadrant.io/user-id": user or name, "kuadrant.io/groups": groups},
        },
        "data": {"api_key": base64.b64encode(key.encode()).decode()},
    }


def digest(key: str) -> str:
    return contract.digest_key(key, PEPPER)


async def fetch(url: str) -> str:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return await response.text()


async def started(settings: ControlPlaneSettings) -> ControlPlane:
    plane = ControlPlane(settings)
    try:
        await plane.start()
        assert plane.syncer is not None
        await eventually(plane.syncer.ready.is_set)
    except BaseException:
        await plane.stop()
        raise
    return plane


async def test_seed_objects_become_records(
    emulator: K8sEmulator, tmp_path: Path, redis_url: str, store: RedisStore
) -> None:
    for obj in load_manifests(SEED):
        emulator.create(obj)
    plane = await started(settings_for(emulator, tmp_path, redis_url))
    try:
        got = await records(store)
        model = got[RecordKind.MODEL]["qwen3-0-6b-instruct"]
        assert model["ready"] is True and model["routes"] == ["*|/qwen3"] and model["max_model_len"] == 6144
        assert got[RecordKind.ROUTE] == {
            "*|/qwen3": {
                "v": 1,
                "id": "*|/qwen3",
                "host": "*",
                "prefix": "/qwen3",
                "model": "qwen3-0-6b-instruct",
                "rewrite": "/",
                "backend": "qwen3-0-6b-instruct-predictor.llm:80",
            }
        }
        keys = got[RecordKind.KEY]
        assert set(keys) == {digest("admin-key-12345"), digest("premium-key-67890"), digest("free-key-abcde")}
        admin = KeyRecord.model_validate(keys[digest("admin-key-12345")])
        assert (admin.user, admin.groups, admin.source) == ("admin", ("enterprise",), "secret:llm/admin-key")
        assert got[RecordKind.TIER]["enterprise"]["groups"] == ["enterprise", "admin"]
        assert not any("admin-key-12345" in json.dumps(v) for table in got.values() for v in table.values())

        # live changes: add, modify, delete
        emulator.create(key_secret("dave", "sk-dave"))
        await eventually(lambda: store.get_record(RecordKind.KEY, digest("sk-dave")))
        changed = key_secret("dave", "sk-dave", groups="premium")
        emulator.replace(changed)

        async def dave_is_premium() -> bool:
            raw = await store.get_record(RecordKind.KEY, digest("sk-dave"))
            return raw is not None and json.loads(raw)["groups"] == ["premium"]

        await eventually(dave_is_premium)
        emulator.replace(key_secret("dave", "sk-dave-rotated"))
        await eventually(lambda: store.get_record(RecordKind.KEY, digest("sk-dave-rotated")))
        assert await store.get_record(RecordKind.KEY, digest("sk-dave")) is None
        emulator.delete("v1", "Secret", "llm", "dave")

        async def dave_gone() -> bool:
            return await store.get_record(RecordKind.KEY, digest("sk-dave-rotated")) is None

        await eventually(dave_gone)
        # an ISVC going unready and its route being removed
        isvc = emulator.get("serving.kserve.io/v1beta1", "InferenceService", "llm", "qwen3-0-6b-instruct")
        assert isvc is not None
        isvc["status"]["conditions"] = [{"type": "Ready", "status": "False", "reason": "PredictorNotReady"}]
        emulator.replace(isvc)
        emulator.delete("gateway.networking.k8s.io/v1", "HTTPRoute", "llm", "qwen-route")

        async def model_unready_without_routes() -> bool:
            got = await records(store)
            model = got[RecordKind.MODEL].get("qwen3-0-6b-instruct", {})
            return model.get("ready") is False and model.get("routes") == [] and not got[RecordKind.ROUTE]

        await eventually(model_unready_without_routes)
    finally:
        await plane.stop()


async def test_gone_and_dropped_watches_relist_without_lost_or_duplicated_state(
    emulator: K8sEmulator, tmp_path: Path, redis_url: str, store: RedisStore
) -> None:
    for i in range(20):
        emulator.create(key_secret(f"user-{i}", f"sk-{i}"))
    plane = await started(settings_for(emulator, tmp_path, redis_url))
    try:
        lists_before = emulator.requests["list secrets"]
        emulator.force_gone()
        for i in range(5):
            emulator.delete("v1", "Secret", "llm", f"user-{i}")
        emulator.create(key_secret("late", "sk-late"))
        emulator.replace(key_secret("user-10", "sk-10", groups="enterprise"))
        want = {digest(f"sk-{i}") for i in range(5, 20)} | {digest("sk-late")}

        async def converged(expected: set[str]) -> bool:
            return set((await records(store))[RecordKind.KEY]) == expected

        await eventually(lambda: converged(want))
        assert emulator.requests["list secrets"] > lists_before

        watches_before = emulator.requests["watch secrets"]
        emulator.drop_watches()
        emulator.delete("v1", "Secret", "llm", "user-5")
        emulator.create(key_secret("after-drop", "sk-after-drop"))
        want = (want - {digest("sk-5")}) | {digest("sk-after-drop")}
        await eventually(lambda: converged(want))
        assert emulator.requests["watch secrets"] > watches_before
        user10 = json.loads(await store.get_record(RecordKind.KEY, digest("sk-10")) or b"{}")
        assert user10["groups"] == ["enterprise"]
        metrics = await fetch(f"http://127.0.0.1:{plane.ports['ops']}/metrics")
        assert 'maas_controlplane_watch_restarts_total{kind="Secret",reason="gone"}' in metrics
        assert 'maas_controlplane_watch_restarts_total{kind="Secret",reason="error"}' in metrics
    finally:
        await plane.stop()


async def test_restart_with_stale_redis_converges_to_exactly_the_desired_state(
    emulator: K8sEmulator, tmp_path: Path, redis_url: str, store: RedisStore
) -> None:
    for obj in load_manifests(SEED):
        emulator.create(obj)
    first = await started(settings_for(emulator, tmp_path, redis_url))
    await first.stop()
    desired = await records(store)

    stale_key = KeyRecord(key_id="f" * 16, digest="f" * 64, user="ghost")
    wrong_admin = KeyRecord(key_id=digest("admin-key-12345")[:16], digest=digest("admin-key-12345"), user="mallory")
    stale_model = contract.ModelRecord(id="deleted-model", ready=True)
    stale_route = contract.RouteRecord(id="*|/old", prefix="/old", model="deleted-model")
    stale_tier = contract.TierRecord(name="platinum", level=9)
    await store.apply([contract.put(r) for r in (stale_key, wrong_admin, stale_model, stale_route, stale_tier)])
    emulator.delete("v1", "Secret", "llm", "free-user-key")  # deleted while no control plane ran
    del desired[RecordKind.KEY][digest("free-key-abcde")]

    second = await started(settings_for(emulator, tmp_path, redis_url))
    try:
        assert await records(store) == desired
    finally:
        await second.stop()


async def test_a_store_that_lost_its_data_is_written_again_without_waiting_for_the_resync(
    emulator: K8sEmulator, tmp_path: Path, redis_url: str, store: RedisStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An idle control plane learnt of a Redis restarted empty at its next resync (5 minutes by default): until
    then maas authz knew no key and answered 401 to everyone."""
    monkeypatch.setattr(sync_module, "PROBE_SECONDS", 0.1)
    for obj in load_manifests(SEED):
        emulator.create(obj)
    plane = await started(settings_for(emulator, tmp_path, redis_url, resync_period=3600))
    try:
        desired = await records(store)
        assert desired[RecordKind.KEY]
        await store._client.flushall()

        async def rewritten() -> bool:
            return await records(store) == desired

        await eventually(rewritten, within=5)
    finally:
        await plane.stop()


async def test_malformed_objects_are_skipped_reported_and_the_rest_keeps_syncing(
    emulator: K8sEmulator, tmp_path: Path, redis_url: str, store: RedisStore
) -> None:
    bad = [
        ("no-api-key", {}),
        ("not-base64", {"api_key": "!!!not-base64!!!"}),
        ("empty", {"api_key": ""}),
    ]
    for name, data in bad:
        emulator.create({**key_secret(name, "unused"), "data": data})
    emulator.create(key_secret("good", "sk-good"))
    for obj in load_manifests(SEED / "qwen3-0.6b-vllm-raw.yaml", SEED / "vllm-latest-runtime.yaml"):
        emulator.create(obj)
    no_status = load_manifests(SEED / "qwen3-0.6b-vllm-raw.yaml")[0]
    no_status["metadata"]["name"] = "pending-model"
    del no_status["status"]
    emulator.create(no_status)
    emulator.create(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "tier-to-group-mapping", "namespace": "llm"},
            "data": {"tiers": "- name: free\n  groups: [free\n"},
        }
    )
    plane = await started(settings_for(emulator, tmp_path, redis_url))
    try:
        got = await records(store)
        assert set(got[RecordKind.KEY]) == {digest("sk-good")}
        assert set(got[RecordKind.MODEL]) == {"qwen3-0-6b-instruct", "pending-model"}
        assert not got[RecordKind.MODEL]["pending-model"]["ready"]  # known, not ready: 503, not 404, for its routes
        assert set(got[RecordKind.TIER]) == {t.name for t in contract.DEFAULT_TIERS}

        def events() -> dict[str, str]:
            return {e["involvedObject"]["name"]: e["reason"] for e in emulator.objects("v1", "Event")}

        await eventually(lambda: len(events()) == 4)
        assert events() == {
            "no-api-key": "MaasSkippedMissingApiKey",
            "not-base64": "MaasSkippedInvalidBase64",
            "empty": "MaasSkippedEmptyApiKey",
            "tier-to-group-mapping": "MaasSkippedInvalidYaml",
        }
        metrics = await fetch(f"http://127.0.0.1:{plane.ports['ops']}/metrics")
        for kind, reason in [
            ("Secret", "missing_api_key"),
            ("Secret", "invalid_base64"),
            ("Secret", "empty_api_key"),
            ("ConfigMap", "invalid_yaml"),
        ]:
            assert f'maas_controlplane_skipped_objects_total{{kind="{kind}",reason="{reason}"}} 1.0' in metrics

        # /v1/sync names them, with their reasons (it had only counts)
        sync_url = f"http://127.0.0.1:{plane.ports['main']}/v1/sync"
        skipped = {(s["kind"], s["name"]): s["reason"] for s in json.loads(await fetch(sync_url))["skipped"]}
        assert skipped == {
            ("Secret", "no-api-key"): "missing_api_key",
            ("Secret", "not-base64"): "invalid_base64",
            ("Secret", "empty"): "empty_api_key",
            ("ConfigMap", "tier-to-group-mapping"): "invalid_yaml",
        }

        # the loop keeps going: a fix and a new key both land
        emulator.replace(key_secret("empty", "sk-fixed"))
        emulator.create(key_secret("newer", "sk-newer"))
        emulator.delete("v1", "Secret", "llm", "no-api-key")

        async def both() -> bool:
            keys = (await records(store))[RecordKind.KEY]
            return {digest("sk-fixed"), digest("sk-newer")} <= set(keys)

        await eventually(both)

        async def only_the_broken_left() -> bool:  # fixed and deleted ones are gone
            names = {s["name"] for s in json.loads(await fetch(sync_url))["skipped"]}
            return names == {"not-base64", "tier-to-group-mapping"}

        await eventually(only_the_broken_left)
    finally:
        await plane.stop()


async def test_a_broken_cluster_serving_runtime_is_reported_on_its_inference_service(
    emulator: K8sEmulator, tmp_path: Path, redis_url: str
) -> None:
    """Events go where the API server takes them and the RBAC lets the control plane write: a problem found through
    a ClusterServingRuntime (cluster-scoped) is reported on the InferenceService that uses it, in that object's
    namespace. An Event about the ClusterServingRuntime itself would have to be in ``default`` (core Events of a
    cluster-scoped object are refused in any other namespace), where the control plane is granted nothing."""
    (runtime,) = load_manifests(SEED / "vllm-latest-runtime.yaml")
    runtime["kind"] = "ClusterServingRuntime"
    del runtime["metadata"]["namespace"]
    runtime["spec"]["containers"][0]["resources"] = {"limits": {"nvidia.com/gpu": "lots"}}
    emulator.create(runtime)
    (isvc,) = load_manifests(SEED / "qwen3-0.6b-vllm-raw.yaml")
    del isvc["spec"]["predictor"]["model"]["resources"]  # the runtime's count
    emulator.create(isvc)
    plane = await started(settings_for(emulator, tmp_path, redis_url))
    try:
        await eventually(lambda: emulator.objects("v1", "Event"))
        await asyncio.sleep(0.2)  # nothing else follows
        events = [
            (e["metadata"]["namespace"], e["involvedObject"]["kind"], e["involvedObject"]["name"], e["reason"])
            for e in emulator.objects("v1", "Event")
        ]
        assert events == [("llm", "InferenceService", "qwen3-0-6b-instruct", "MaasSkippedInvalidSpec")]
    finally:
        await plane.stop()


async def test_the_emulator_refuses_events_where_the_api_server_does(emulator: K8sEmulator) -> None:
    """The rule the test above relies on: a cluster-scoped object's Event in maas-system is a 422."""
    url = f"{emulator.url}/api/v1/namespaces/maas-system/events"
    event: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": "x."},
        "involvedObject": {"kind": "ClusterServingRuntime", "name": "x"},
    }
    async with aiohttp.ClientSession() as session:
        async with session.post(url, json=event) as response:
            assert response.status == 422
        async with session.post(url.replace("maas-system", "default"), json=event) as response:
            assert response.status == 201
        event["involvedObject"]["namespace"] = "maas-system"
        async with session.post(url, json=event) as response:
            assert response.status == 201


async def test_ops_port_and_status(emulator: K8sEmulator, tmp_path: Path, redis_url: str) -> None:
    one = key_secret("one", "sk-one")
    one["metadata"]["labels"]["kuadrant.io/apikeys-by"] = "rhcl-keys"  # matched by two default selectors: counted once
    emulator.create(one)
    plane = await started(settings_for(emulator, tmp_path, redis_url, namespaces="llm,other"))
    try:
        base = f"http://127.0.0.1:{plane.ports['ops']}"
        assert json.loads(await fetch(f"{base}/healthz"))["status"] == "ok"
        assert json.loads(await fetch(f"{base}/readyz")) == {"status": "ready", "leader": True}
        text = await fetch(f"{base}/metrics")
        for name in (
            'maas_controlplane_watch_events_total{kind="Secret",type="ADDED"} 2.0',  # one per watch that sees it
            'maas_controlplane_objects{kind="Secret"} 1.0',
            "maas_controlplane_sync_lag_seconds_count",
            "maas_controlplane_last_full_sync_timestamp_seconds",
            "maas_controlplane_leader 1.0",
            'maas_controlplane_records{kind="key"} 1.0',
        ):
            assert name in text
        if shutil.which("promtool") or os.environ.get("MAAS_REQUIRE_PROMTOOL"):  # the rest of the test runs anyway
            await check_metrics(text.encode())
        status = json.loads(await fetch(f"http://127.0.0.1:{plane.ports['main']}/v1/sync"))
        assert status["ready"] is True and status["records"]["key"] == 1 and status["objects"]["Secret"] == 1
        assert "secrets/other/app=llm-gateway" in status["streams"]
    finally:
        await plane.stop()


async def test_kubernetes_source_applies_and_deletes_admin_key_secrets(
    emulator: K8sEmulator, tmp_path: Path, redis_url: str, store: RedisStore
) -> None:
    plane = await started(settings_for(emulator, tmp_path, redis_url))
    try:
        assert plane.source is not None
        admin_digest = digest("sk-issued-by-admin")
        secret = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {
                "name": "maas-key-abc",
                "namespace": "llm",
                "labels": {"maas.io/api-key": "true"},
                "annotations": {"maas/user-id": "erin", "maas/tier": "premium"},
            },
            "data": {"digest": base64.b64encode(admin_digest.encode()).decode()},
        }
        created = await plane.source.apply(secret)
        await eventually(lambda: store.get_record(RecordKind.KEY, admin_digest))
        secret["metadata"]["annotations"]["maas/status"] = "revoked"
        with pytest.raises(ConflictError):  # a write without a resourceVersion creates: it never writes over one
            await plane.source.apply(secret)
        stored = await plane.source.get(SECRET, "llm", "maas-key-abc")
        assert stored is not None and "maas/status" not in stored["metadata"]["annotations"]
        version = created["metadata"]["resourceVersion"]
        await plane.source.apply({**secret, "metadata": {**secret["metadata"], "resourceVersion": version}})

        async def revoked() -> bool:
            raw = await store.get_record(RecordKind.KEY, admin_digest)
            return raw is not None and json.loads(raw)["status"] == "revoked"

        await eventually(revoked)
        # a write carrying the resourceVersion it read is conditional: a change in between is a conflict, not lost
        read = await plane.source.get(SECRET, "llm", "maas-key-abc")
        assert read is not None and read["metadata"]["resourceVersion"]
        await plane.source.apply({**read, "metadata": {**read["metadata"], "annotations": {"maas/user-id": "x"}}})
        with pytest.raises(ConflictError):
            await plane.source.apply(read)
        assert await plane.source.delete(SECRET, "llm", "maas-key-abc") is True
        with pytest.raises(ConflictError):  # and a deleted one too
            await plane.source.apply(read)
        assert await plane.source.delete(SECRET, "llm", "maas-key-abc") is False

        async def gone() -> bool:
            return await store.get_record(RecordKind.KEY, admin_digest) is None

        await eventually(gone)
    finally:
        await plane.stop()


async def test_admin_api_says_not_synced_until_a_sync_has_written_redis(
    emulator: K8sEmulator, tmp_path: Path, redis_url: str, store: RedisStore
) -> None:
    """A new install: this replica is a follower (another holds the Lease) and Redis is still empty. Its admin API
    answers 503 not_synced instead of "no tier named ..." or an empty key list, until the leader's first sync."""
    emulator.create(
        {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": "maas-controlplane", "namespace": "maas-system"},
            "spec": {
                "holderIdentity": "the-other-replica",
                "leaseDurationSeconds": 3600,
                "renewTime": time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime()),
            },
        }
    )
    tokens = tmp_path / "tokens"
    tokens.write_text(f"admin ops {ADMIN_TOKEN}\n")
    settings = settings_for(
        emulator,
        tmp_path,
        redis_url,
        leader_election=True,
        lease_namespace="maas-system",
        identity="follower",
        retry_period=0.1,
        admin_token_file=str(tokens),
    )
    plane = ControlPlane(settings)
    await plane.start()
    try:
        assert plane.admin is not None
        async with aiohttp.ClientSession() as session:
            api = Api(session=session, base=f"http://127.0.0.1:{plane.ports['main']}")

            await asyncio.sleep(0.5)  # long enough for the view to have read the empty Redis
            status, body = await api.call("POST", "/admin/v1/keys", json={"user": "alice", "tier": "premium"})
            assert status == 503 and body["error"]["code"] == "not_synced", body
            assert (await api.call("GET", "/admin/v1/tiers"))[0] == 503
            # the leader (elsewhere) writes its first sync
            await store.apply([contract.put(tier) for tier in contract.DEFAULT_TIERS])
            await eventually(lambda: plane.admin is not None and plane.admin.loaded.is_set())
            status, body = await api.call("GET", "/admin/v1/tiers")
            assert status == 200 and {t["name"] for t in body["data"]} >= {"free", "premium"}, body
    finally:
        await plane.stop()
