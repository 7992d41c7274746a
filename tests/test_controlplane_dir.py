"""The ``dir:`` source: the same records as the Kubernetes source from the same YAML files, live file changes,
broken files, and writing admin-issued key Secrets as manifests."""

from __future__ import annotations

import asyncio
import base64
import math
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest

from controlplane.errors import ConflictError, SourceError, TranslateError
from controlplane.kinds import CONFIGMAP, SECRET
from controlplane.runner import ControlPlane
from controlplane.settings import ControlPlaneSettings
from controlplane.sources import Stream, directory
from controlplane.sources.directory import DirSource
from controlplane.translate.secret import translate_secret
from gateway import contract
from gateway.contract import RecordKind
from gateway.errors import ConfigError
from gateway.settings import load
from gateway.store.redis import RedisStore
from tests.conftest import PEPPER
from tests.support.k8s_emulator import K8sEmulator, eventually, load_manifests
from tests.test_controlplane_kube import records, settings_for, started

pytestmark = pytest.mark.redis

SEED = Path(__file__).parent / "fixtures" / "seed"


def dir_settings(path: Path, redis_url: str, **overrides: Any) -> ControlPlaneSettings:
    values: dict[str, Any] = {
        "port": 0,
        "ops_port": 0,
        "host": "127.0.0.1",
        "source": f"dir:{path}",
        "redis_url": redis_url,
        "dir_poll_interval": 0.05,
        "resync_period": 3600,
        "log_format": "text",
    }
    return load(ControlPlaneSettings, **{**values, **overrides})


def without_created_at(tables: dict[RecordKind, dict[str, dict[str, Any]]]) -> dict[RecordKind, Any]:
    """The API server stamps ``creationTimestamp`` (the keys' ``created_at``); a file has none."""
    return {
        kind: {k: {f: v for f, v in r.items() if f != "created_at"} for k, r in t.items()} for kind, t in tables.items()
    }


async def test_dir_source_gives_the_same_records_as_kubernetes(
    emulator: K8sEmulator, tmp_path: Path, redis_url: str
) -> None:
    for obj in load_manifests(SEED):
        emulator.create(obj)
    kube_store = RedisStore(redis_url, timeout=2.0)
    dir_store = RedisStore(redis_url.rsplit("/", 1)[0] + "/1", timeout=2.0)
    kube = await started(settings_for(emulator, tmp_path, redis_url))
    local = await started(dir_settings(SEED, redis_url.rsplit("/", 1)[0] + "/1"))
    try:
        from_kube, from_dir = await records(kube_store), await records(dir_store)
        assert all(from_kube[kind] for kind in RecordKind)
        assert without_created_at(from_kube) == without_created_at(from_dir)
        assert {r["created_at"] for r in from_dir[RecordKind.KEY].values()} == {None}
    finally:
        await kube.stop()
        await local.stop()
        await kube_store.close()
        await dir_store.close()


async def test_dir_source_follows_file_changes(tmp_path: Path, redis_url: str) -> None:
    manifests = tmp_path / "manifests"
    shutil.copytree(SEED, manifests)
    store = RedisStore(redis_url, timeout=2.0)
    plane = await started(dir_settings(manifests, redis_url))
    try:
        admin = contract.digest_key("admin-key-12345", PEPPER)
        assert await store.get_record(RecordKind.KEY, admin) is not None
        (manifests / "broken.yaml").write_text("kind: Secret\nmetadata: {name: [\n")
        keys = manifests / "07-api-key-secrets.yaml"
        keys.write_text(keys.read_text().replace("admin-key-12345", "admin-key-rotated"))
        rotated = contract.digest_key("admin-key-rotated", PEPPER)

        async def rotated_only() -> bool:
            got = await records(store)
            return rotated in got[RecordKind.KEY] and admin not in got[RecordKind.KEY]

        await eventually(rotated_only)
        assert plane.metrics.skipped.labels(kind="File", reason="invalid_yaml")._value.get() == 1
        (manifests / "05-model-routing.yaml").unlink()

        async def no_routes() -> bool:
            return not (await records(store))[RecordKind.ROUTE]

        await eventually(no_routes)
    finally:
        await plane.stop()
        await store.close()


async def test_dir_source_apply_and_delete(tmp_path: Path) -> None:
    source = DirSource(tmp_path, poll_interval=0.05)
    shutil.copy(SEED / "07-api-key-secrets.yaml", tmp_path)
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "maas-key-1", "namespace": "llm", "labels": {"maas.io/api-key": "true"}},
        "data": {"digest": base64.b64encode(b"cd" * 32).decode()},
    }
    await source.apply(secret)
    stored = await source.get(SECRET, "llm", "maas-key-1")
    assert stored is not None and stored["data"] == secret["data"]
    assert (tmp_path / "maas-secret-llm-maas-key-1.yaml").exists()
    other = {**secret, "data": {"digest": base64.b64encode(b"ef" * 32).decode()}}
    with pytest.raises(ConflictError):  # without a resourceVersion a write creates, as on the API server
        await source.apply(other)
    with pytest.raises(ConflictError):  # a user manifest's object too
        await source.apply({**other, "metadata": {"name": "admin-key", "namespace": "llm"}})
    await source.apply({**other, "metadata": {**other["metadata"], "resourceVersion": "1"}})
    stored = await source.get(SECRET, "llm", "maas-key-1")
    assert stored is not None and stored["data"] == other["data"]
    listing = await source.list(Stream(SECRET, "llm"))
    assert {o["metadata"]["name"] for o in listing.items} == {
        "admin-key",
        "premium-user-key",
        "free-user-key",
        "maas-key-1",
    }
    assert await source.delete(SECRET, "llm", "maas-key-1") is True
    assert await source.delete(SECRET, "llm", "maas-key-1") is False
    with pytest.raises(SourceError, match="user manifest"):
        await source.delete(SECRET, "llm", "admin-key")
    assert await source.get(SECRET, "llm", "maas-key-1") is None


def test_leader_election_needs_kubernetes(tmp_path: Path, redis_url: str) -> None:
    with pytest.raises(ConfigError, match="leader"):
        ControlPlane(dir_settings(tmp_path, redis_url, leader_election=True))


async def test_an_object_a_translator_cannot_read_costs_that_object_not_the_sync(
    tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A translator's unexpected exception (here a tier ConfigMap whose YAML holds 2025-02-30, which PyYAML refuses
    with a ValueError, and an ISVC translator failing outright) skips that object with reason ``invalid``; the
    sync task lives on and later changes still reach Redis (it used to die, leaving a ready control plane that
    synced nothing more)."""
    import controlplane.desired as desired

    real = desired.translate_isvc

    def flaky(isvc: dict[str, Any], **kwargs: Any) -> Any:
        if isvc["metadata"]["name"] == "qwen3-0-6b-instruct":
            raise KeyError("a field the translator did not expect")
        return real(isvc, **kwargs)

    monkeypatch.setattr(desired, "translate_isvc", flaky)
    manifests = tmp_path / "manifests"
    shutil.copytree(SEED, manifests)
    store = RedisStore(redis_url, timeout=2.0)
    plane = await started(dir_settings(manifests, redis_url))
    try:
        (manifests / "tier-to-group-mapping.yaml").write_text(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: tier-to-group-mapping, namespace: llm}\n"
            "data:\n  tiers: |\n    - {name: free, description: 2025-02-30, level: 0, groups: [free]}\n"
        )
        keys = manifests / "07-api-key-secrets.yaml"
        keys.write_text(keys.read_text().replace("admin-key-12345", "admin-key-after-the-bad-one"))
        rotated = contract.digest_key("admin-key-after-the-bad-one", PEPPER)

        async def synced_after() -> bool:
            return rotated in (await records(store))[RecordKind.KEY]

        skipped = plane.metrics.skipped

        async def both_skipped() -> bool:  # the two files may be picked up in different polls
            isvc = skipped.labels(kind="InferenceService", reason="invalid")._value.get()
            return bool(isvc >= 1 and skipped.labels(kind="ConfigMap", reason="invalid_yaml")._value.get() >= 1)

        await eventually(synced_after)
        await eventually(both_skipped)
        assert (await records(store))[RecordKind.TIER]  # the tiers of the other ConfigMaps stand
    finally:
        await plane.stop()
        await store.close()


async def test_the_process_exits_non_zero_when_a_background_task_dies(
    tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A control plane whose sync (or a watch, or leader election) has died cannot do its job: `maas controlplane`
    exits 1 so Kubernetes restarts it, instead of staying up and ready while nothing is synced any more. Every
    other task stops when asked (the admin view's change-event reader had lost the cancel and held the exit for
    the stop's 5 s bound)."""
    from controlplane import main
    from controlplane.sync import Syncer

    async def dies(self: Syncer) -> None:
        raise RuntimeError("the sync met something it did not expect")

    monkeypatch.setattr(Syncer, "run", dies)
    manifests = tmp_path / "manifests"
    shutil.copytree(SEED, manifests)
    assert await asyncio.wait_for(main.serve(dir_settings(manifests, redis_url)), 20) == 1
    assert "did not stop" not in caplog.text


async def test_the_admin_view_survives_an_unexpected_error_and_reloads(
    tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As authz's snapshot follower does: a bug met while reading the store is logged and the view reloads, rather
    than the admin API answering from a view that stopped following (or the process exiting over it)."""
    from controlplane.admin import state

    real = state._decode
    calls = {"n": 0}

    def first_fails(kind: Any, raw: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("a record the view did not expect")
        return real(kind, raw)

    monkeypatch.setattr(state, "_decode", first_fails)
    manifests = tmp_path / "manifests"
    shutil.copytree(SEED, manifests)
    plane = await started(dir_settings(manifests, redis_url))
    try:
        assert plane.admin is not None

        async def loaded() -> bool:
            return plane.admin is not None and plane.admin.loaded.is_set() and bool(plane.admin.keys)

        await eventually(loaded)
        assert calls["n"] > 1 and not plane.failed.is_set()
    finally:
        await plane.stop()


async def test_dir_source_streams_share_scans_and_an_unchanged_folder_is_not_parsed_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With thousands of Secrets every stream re-read and re-hashed the whole folder every poll (a core busy with
    nothing changing): now streams polling together share one scan, and a scan that finds no file changed reuses
    the objects it has. A write through apply, or a file changed by hand, is still seen."""
    shutil.copy(SEED / "07-api-key-secrets.yaml", tmp_path)
    source = DirSource(tmp_path, poll_interval=10.0)
    normalised = 0
    real = directory._normalise

    def counting(doc: dict[str, Any], kind: Any) -> dict[str, Any]:
        nonlocal normalised
        normalised += 1
        return real(doc, kind)

    monkeypatch.setattr(directory, "_normalise", counting)
    streams = [Stream(SECRET, "llm", label_selector=s) for s in ("app=llm-gateway", "maas.io/api-key=true", "")]
    first = [await source.list(stream) for stream in streams]
    assert normalised == 3 and len({listing.resource_version for listing in first}) == 1  # one scan for all three
    source._last_at = -math.inf  # as after half a poll interval: the folder is walked again, nothing changed
    await source.list(streams[0])
    assert normalised == 3
    await source.apply(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "k2", "namespace": "llm"},
            "stringData": {"api_key": "x"},
        }
    )
    after = await source.list(streams[2])
    assert "k2" in {o["metadata"]["name"] for o in after.items} and after.resource_version != first[0].resource_version


async def test_a_write_during_a_scan_is_seen_by_the_next_read(tmp_path: Path) -> None:
    """A scan already under way when apply writes must not stand for the folder after the write: two admin
    changes read-modify-writing one ConfigMap lost one of them when the second read that older scan."""
    shutil.copy(SEED / "07-api-key-secrets.yaml", tmp_path)
    source = DirSource(tmp_path, poll_interval=10.0)
    real = source._scan_sync
    written = threading.Event()

    def slow_scan() -> Any:
        result = real()  # reads the folder before the write below
        written.wait(5)
        return result

    source._scan_sync = slow_scan  # type: ignore[method-assign]
    under_way = asyncio.create_task(source.list(Stream(SECRET, "llm")))
    await asyncio.sleep(0.1)
    added = {"name": "k-new", "namespace": "llm"}
    await source.apply({"apiVersion": "v1", "kind": "Secret", "metadata": added, "stringData": {"api_key": "x"}})
    written.set()
    await under_way
    source._scan_sync = real  # type: ignore[method-assign]
    assert await source.get(SECRET, "llm", "k-new") is not None


async def test_manifests_the_api_server_would_refuse_or_fold_cost_their_file_not_the_scan(tmp_path: Path) -> None:
    source = DirSource(tmp_path, poll_interval=0.05)
    bad: list[Path] = []
    source.on_bad_file = lambda file, _: bad.append(file)
    (tmp_path / "no-metadata.yaml").write_text("apiVersion: v1\nkind: Secret\nmetadata:\ndata: {api_key: eA==}\n")
    (tmp_path / "date-keys.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: notes, namespace: llm}\n"
        "data:\n  2025-01-01: release notes\n  8080: port\n  when: 2025-01-01T10:00:00Z\n"
    )
    (tmp_path / "blank-key.yaml").write_text(
        "apiVersion: v1\nkind: Secret\nmetadata: {name: blank, namespace: llm}\nstringData:\n  api_key:\n"
    )
    objects = await source.list(Stream(SECRET, "llm"))
    assert [o["metadata"]["name"] for o in objects.items] == ["blank"]
    assert objects.items[0]["data"] == {"api_key": ""}  # as the API server stores it: empty, not "None"
    notes = await source.get(CONFIGMAP, "llm", "notes")
    assert notes is not None and notes["data"] == {
        "2025-01-01": "release notes",
        "8080": "port",
        "when": "2025-01-01 10:00:00+00:00",
    }
    assert bad == [tmp_path / "no-metadata.yaml"]
    with pytest.raises(TranslateError) as refused:
        translate_secret(objects.items[0], pepper=PEPPER)
    assert refused.value.reason == "empty_api_key"


async def test_a_blank_string_data_key_is_skipped_not_the_key_none(tmp_path: Path, redis_url: str) -> None:
    (tmp_path / "blank-key.yaml").write_text(
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: blank\n  namespace: llm\n  labels: {app: llm-gateway}\n"
        "  annotations: {secret.kuadrant.io/user-id: someone}\nstringData:\n  api_key:\n"
    )
    store = RedisStore(redis_url, timeout=2.0)
    plane = await started(dir_settings(tmp_path, redis_url))
    try:

        async def skipped() -> bool:
            return plane.metrics.skipped.labels(kind="Secret", reason="empty_api_key")._value.get() >= 1

        await eventually(skipped)
        assert await store.get_record(RecordKind.KEY, contract.digest_key("None", PEPPER)) is None
    finally:
        await plane.stop()
        await store.close()
