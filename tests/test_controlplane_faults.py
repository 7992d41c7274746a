"""The control plane against a misbehaving API server (the emulator's faults) and at scale: many namespaces, objects
recreated during an outage, watches that end at once or keep expiring, an Event storm, a CRD removed."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from controlplane import events as events_module
from controlplane import kinds
from controlplane.errors import SourceError
from controlplane.runner import ControlPlane
from controlplane.sources import Stream, kube
from controlplane.sources.kube import KubeSource
from gateway.contract import RecordKind
from gateway.store.redis import RedisStore
from tests.support.k8s_emulator import K8sEmulator, eventually, load_manifests
from tests.support.platform import records
from tests.test_controlplane_kube import SEED, digest, fetch, key_secret, settings_for, started

pytestmark = pytest.mark.redis

LEASE = {"lease_duration": 2.0, "renew_deadline": 1.5, "retry_period": 0.2, "identity": "solo"}


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[RedisStore]:
    red = RedisStore(redis_url, timeout=2.0)
    yield red
    await red.close()


@pytest.fixture
def quiet_emulator() -> Iterator[K8sEmulator]:
    """Bookmarks rarely: a hundred watches sending five a second each would only load the test machine."""
    emu = K8sEmulator(bookmark_interval=30.0).start()
    yield emu
    emu.stop()


def lease_spec(emulator: K8sEmulator) -> dict[str, Any]:
    lease = emulator.get("coordination.k8s.io/v1", "Lease", "default", "maas-controlplane")
    return dict((lease or {}).get("spec") or {})


def warning_events(emulator: K8sEmulator) -> list[tuple[str, str]]:
    return sorted((e["involvedObject"]["name"], e["reason"]) for e in emulator.objects("v1", "Event"))


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


async def test_the_lease_is_renewed_and_changes_arrive_with_many_namespaces(
    quiet_emulator: K8sEmulator, tmp_path: Path, redis_url: str, store: RedisStore
) -> None:
    """Ten streams a namespace: with 12 namespaces, 121 watches held every connection of one pool of 100, so the
    Lease requests waited behind them (and timed out) and one watch never opened: nothing reached Redis."""
    emulator = quiet_emulator
    namespaces = [f"ns{i:02d}" for i in range(12)]
    for ns in namespaces:
        emulator.create(key_secret("k", f"sk-{ns}", namespace=ns))
    settings = settings_for(
        emulator, tmp_path, redis_url, namespaces=",".join(namespaces), leader_election=True, **LEASE
    )
    plane = await started(settings)
    try:
        await eventually(lambda: plane.elector.is_leader() and lease_spec(emulator).get("holderIdentity") == "solo")
        renewed = lease_spec(emulator)["renewTime"]
        await eventually(lambda: lease_spec(emulator)["renewTime"] != renewed, within=5)
        await eventually(lambda: emulator.open_watches() == 10 * len(namespaces) + 1)
        emulator.create(key_secret("late", "sk-late", namespace=namespaces[-1]))
        await eventually(lambda: store.get_record(RecordKind.KEY, digest("sk-late")))
        assert len((await records(store))[RecordKind.KEY]) == len(namespaces) + 1
    finally:
        await plane.stop()


async def test_a_watch_left_without_a_connection_fails_instead_of_waiting_silently(
    emulator: K8sEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing bounded a watch's wait for a free connection: one stream too many never opened, and said nothing."""
    monkeypatch.setattr(kube, "REQUEST_TIMEOUT", 0.5)
    source = await KubeSource.connect(kubeconfig=str(emulator.write_kubeconfig(tmp_path / "kubeconfig")), streams=1)
    stream = Stream(kinds.SECRET, "llm")

    async def hold() -> None:
        async for _ in source.watch(stream, resource_version=version):
            pass

    holders: list[asyncio.Task[None]] = []
    try:
        version = (await source.list(stream)).resource_version
        holders = [asyncio.create_task(hold()) for _ in range(1 + kube.STREAM_POOL_HEADROOM)]
        await eventually(lambda: emulator.open_watches() == len(holders))
        with pytest.raises(SourceError, match="timeout"):
            await asyncio.wait_for(anext(aiter(source.watch(stream, resource_version=version))), timeout=5)
    finally:
        for task in holders:
            task.cancel()
        await asyncio.gather(*holders, return_exceptions=True)
        await source.close()


async def test_a_secret_deleted_and_recreated_during_an_outage_loses_its_key(
    emulator: K8sEmulator, tmp_path: Path, redis_url: str, store: RedisStore
) -> None:
    """The re-list after the outage found a Secret of the same name (another uid, without api_key): it was taken
    for a change of the old one, whose key kept its last good record, so a key revoked by deleting its Secret
    kept working."""
    emulator.create(key_secret("alice", "sk-alice"))
    plane = await started(settings_for(emulator, tmp_path, redis_url))
    try:
        await eventually(lambda: store.get_record(RecordKind.KEY, digest("sk-alice")))
        emulator.disconnect()
        emulator.delete("v1", "Secret", "llm", "alice")
        emulator.create({**key_secret("alice", "unused"), "data": {}})
        emulator.force_gone()
        emulator.reconnect()

        async def revoked() -> bool:
            return await store.get_record(RecordKind.KEY, digest("sk-alice")) is None

        await eventually(revoked)
        skipped = json.loads(await fetch(f"http://127.0.0.1:{plane.ports['main']}/v1/sync"))["skipped"]
        assert [(s["name"], s["reason"]) for s in skipped] == [("alice", "missing_api_key")]
    finally:
        await plane.stop()


@pytest.mark.parametrize(
    "other_holder",
    [
        pytest.param(False, id="leader-from-the-start"),
        pytest.param(True, id="follower-that-takes-over"),
    ],
)
async def test_objects_malformed_before_a_replica_leads_get_exactly_one_event(
    emulator: K8sEmulator, tmp_path: Path, redis_url: str, other_holder: bool
) -> None:
    """A problem seen while this replica was not (yet) the leader was marked as reported: its Event never came."""
    if other_holder:  # a replica killed a moment ago: this one follows until the Lease expires
        emulator.create(
            {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": "maas-controlplane", "namespace": "default"},
                "spec": {"holderIdentity": "gone", "leaseDurationSeconds": 3, "leaseTransitions": 0},
            }
        )
    emulator.create({**key_secret("nokey", "unused"), "data": {}})
    emulator.create(key_secret("good", "sk-good"))
    settings = settings_for(emulator, tmp_path, redis_url, leader_election=True, resync_period=0.3, **LEASE)
    plane = await started(settings)
    try:
        if other_holder:
            assert not plane.elector.is_leader() and warning_events(emulator) == []
        await eventually(plane.elector.is_leader)
        want = [("nokey", "MaasSkippedMissingApiKey")]
        await eventually(lambda: warning_events(emulator) == want)
        emulator.force_gone()  # a re-list, and full syncs every 0.3 s: no second Event
        await asyncio.sleep(1.5)
        assert warning_events(emulator) == want
    finally:
        await plane.stop()


@pytest.mark.parametrize(
    "fault",
    [
        pytest.param("eof", id="watch-ends-at-once"),
        pytest.param("gone", id="watch-always-410"),
    ],
)
async def test_watches_that_end_at_once_or_keep_expiring_back_off(
    emulator: K8sEmulator, tmp_path: Path, redis_url: str, store: RedisStore, fault: str
) -> None:
    """A server that ended every watch at once was asked again at once (over a thousand watches a second), one
    that answered every watch with 410 was re-listed at once (hundreds of full lists a second)."""
    plane = await started(settings_for(emulator, tmp_path, redis_url, backoff_max=1.0))
    try:

        def requests() -> int:
            return sum(n for name, n in emulator.requests.items() if name.split()[0] in ("list", "watch"))

        emulator.watch_fault = fault
        emulator.drop_watches()
        await asyncio.sleep(0.5)
        before = requests()
        await asyncio.sleep(2.0)
        made = requests() - before
        # 11 streams; with the backoff each makes a few requests in 2 s (a list and a watch per 410): ~60 in all
        assert made < 200, f"{made} list and watch requests in 2 s"
        emulator.watch_fault = None
        emulator.create(key_secret("after", "sk-after"))
        await eventually(lambda: store.get_record(RecordKind.KEY, digest("sk-after")))
    finally:
        await plane.stop()


async def test_an_event_storm_is_capped_and_does_not_cost_the_lease(
    quiet_emulator: K8sEmulator, tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every malformed object's Event was sent at once, one task each: thousands of requests in flight delayed the
    Lease renewal past its deadline and the leader stepped down."""
    emulator = quiet_emulator
    monkeypatch.setattr(events_module, "QUEUE_SIZE", 20)
    monkeypatch.setattr(events_module, "BURST", 5)
    monkeypatch.setattr(events_module, "RATE", 10.0)
    for i in range(300):
        emulator.create({**key_secret(f"bad-{i:03d}", "unused"), "data": {}})
    settings = settings_for(emulator, tmp_path, redis_url, leader_election=True, **LEASE)
    plane = ControlPlane(settings)
    leading: list[bool] = []
    began = time.monotonic()
    try:
        await plane.start()
        await eventually(plane.elector.is_leader)
        started_at = time.monotonic()
        while time.monotonic() - started_at < 2.5:
            leading.append(plane.elector.is_leader())
            await asyncio.sleep(0.05)
        assert all(leading), "the leader stepped down during the Event storm"
        assert lease_spec(emulator)["leaseTransitions"] == 0
        sent = len(emulator.objects("v1", "Event"))
        assert 0 < sent <= 5 + 10.0 * (time.monotonic() - began) + 2  # burst + rate x time (+ one per worker)
        text = await fetch(f"http://127.0.0.1:{plane.ports['ops']}/metrics")
        # the queue holds 20: the rest is dropped (and tried again at the next full sync)
        assert metric(text, 'maas_controlplane_warning_events_total{result="dropped"}') >= 300 - 20
    finally:
        await plane.stop()


async def test_a_crd_removed_during_an_outage_takes_its_objects_along(
    emulator: K8sEmulator, tmp_path: Path, redis_url: str, store: RedisStore
) -> None:
    """The re-list after the outage got 404 (KServe uninstalled): the reflector kept what it held, so the models
    stayed in Redis."""
    for obj in load_manifests(SEED):
        emulator.create(obj)
    plane = await started(settings_for(emulator, tmp_path, redis_url))
    try:
        assert (await records(store))[RecordKind.MODEL]
        emulator.disconnect()
        emulator.uninstall("serving.kserve.io/v1beta1", "InferenceService")
        emulator.reconnect()

        async def no_models() -> bool:
            got = await records(store)
            return not got[RecordKind.MODEL] and not got[RecordKind.ROUTE]

        await eventually(no_models)
        assert (await records(store))[RecordKind.KEY]  # the other kinds are untouched
    finally:
        await plane.stop()
