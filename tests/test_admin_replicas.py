"""The admin API of two control plane replicas (a leader and a follower, as behind one Service) against the
Kubernetes API emulator and a real Redis: writes through either replica, reads on the other at once, and the API
server's conflicts and throttling."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, Self

import aiohttp
import pytest

from controlplane.admin.context import WRITE_ATTEMPTS
from controlplane.runner import ControlPlane
from controlplane.settings import ControlPlaneSettings
from controlplane.sources.kube import THROTTLE_RETRIES
from gateway.contract import ChangeEvent
from gateway.store.base import Subscription
from gateway.store.redis import RedisStore
from tests.support.admin_api import ADMIN_TOKEN, PEPPER, Api
from tests.support.k8s_emulator import K8sEmulator, eventually, load_manifests
from tests.test_controlplane_kube import settings_for as kube_settings

pytestmark = pytest.mark.redis

SEED = Path(__file__).parent / "fixtures" / "seed"
LAG = 0.5
"""Seconds the follower's view takes to apply each change event."""


class _LateEvents:
    def __init__(self, inner: Subscription) -> None:
        self._inner = inner

    async def __aenter__(self) -> Self:
        await self._inner.__aenter__()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self._inner.__aexit__(*exc)

    async def __aiter__(self) -> AsyncIterator[ChangeEvent]:
        async for event in self._inner:
            await asyncio.sleep(LAG)
            yield event


class LaggingStore(RedisStore):
    """A replica whose view of Redis follows late (a busy process, slow pub/sub delivery)."""

    def subscribe(self) -> Any:
        return _LateEvents(super().subscribe())


def settings_for(emulator: K8sEmulator, tmp_path: Path, redis_url: str, identity: str) -> ControlPlaneSettings:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"admin ops {ADMIN_TOKEN}\n")
    return kube_settings(
        emulator,
        tmp_path,
        redis_url,
        leader_election=True,
        lease_namespace="maas-system",
        identity=identity,
        retry_period=0.1,
        admin_token_file=str(tokens),
        key_namespace="llm",
        admin_write_timeout=5.0,
        key_pepper=PEPPER.decode(),
    )


@pytest.fixture
def seeded(emulator: K8sEmulator) -> Iterator[K8sEmulator]:
    for obj in load_manifests(SEED):
        emulator.create(obj)
    yield emulator


@pytest.fixture
async def replicas(seeded: K8sEmulator, tmp_path: Path, redis_url: str) -> AsyncIterator[tuple[Api, Api]]:
    """(leader, follower): the follower's view applies each change event ``LAG`` seconds late."""
    leader = ControlPlane(settings_for(seeded, tmp_path, redis_url, "leader"))
    follower = ControlPlane(
        settings_for(seeded, tmp_path, redis_url, "follower"), store=LaggingStore(redis_url, timeout=2.0)
    )
    planes: list[ControlPlane] = []
    try:
        for plane in (leader, follower):
            await plane.start()
            planes.append(plane)
            await eventually(lambda p=plane: p.syncer is not None and p.syncer.ready.is_set())  # type: ignore[misc]
        await eventually(lambda: leader.elector.is_leader() and not follower.elector.is_leader())
        await eventually(lambda: all(p.admin is not None and p.admin.loaded.is_set() for p in planes))
        async with aiohttp.ClientSession() as session:
            yield tuple(  # type: ignore[misc]
                Api(session=session, base=f"http://127.0.0.1:{p.ports['main']}") for p in (leader, follower)
            )
    finally:
        for plane in reversed(planes):
            await plane.stop()


async def test_a_change_answered_by_one_replica_is_seen_by_the_other_at_once(replicas: tuple[Api, Api]) -> None:
    """A key issued through one replica was 404 on the other (and its owner's /v1/me 401) until that replica's
    view had applied the change event, which it may do later than the writer answered."""
    leader, follower = replicas
    for writer, reader in ((leader, follower), (follower, leader)):
        status, key = await writer.call("POST", "/admin/v1/keys", json={"user": "alice", "tier": "premium"})
        assert status == 201 and key["synced"] is True, key
        path = f"/admin/v1/keys/{key['key_id']}"
        status, shown = await reader.call("GET", path)
        assert status == 200 and shown["user"] == "alice", shown
        status, me = await reader.call("GET", "/v1/me", headers={"Authorization": f"APIKEY {key['key']}"})
        assert status == 200 and me["user"] == "alice", me
        status, patched = await reader.call("PATCH", path, json={"name": "ci"})
        assert status == 200 and patched["name"] == "ci", patched
        status, shown = await writer.call("GET", path)
        assert status == 200 and shown["name"] == "ci", shown


async def test_the_api_servers_throttling_is_retried_then_answered_503_with_its_advice(
    replicas: tuple[Api, Api], seeded: K8sEmulator
) -> None:
    """A 429 from the API server (API Priority and Fairness: the request was not run) failed the change at once
    with a 503 that gave no Retry-After; it is retried after the server's Retry-After, and only a throttling that
    lasts is answered 503, with the advice."""
    leader, _ = replicas
    seeded.inject("create secrets", 429, times=2, retry_after=0)
    status, key = await leader.call("POST", "/admin/v1/keys", json={"user": "bob"})
    assert status == 201 and key["synced"] is True, key

    seeded.inject("get secrets", 429, times=THROTTLE_RETRIES + 1, retry_after=0)
    path = f"/admin/v1/keys/{key['key_id']}"
    async with leader.session.patch(leader.base + path, json={"name": "n"}, headers=leader.headers()) as resp:
        error = await resp.json()
        assert (resp.status, error["error"]["code"]) == (503, "source_unavailable"), error
        assert resp.headers["Retry-After"] == "1" and "throttling" in error["error"]["message"], error


async def test_conflicts_from_the_api_server_start_the_change_over(
    replicas: tuple[Api, Api], seeded: K8sEmulator
) -> None:
    leader, follower = replicas
    status, key = await leader.call("POST", "/admin/v1/keys", json={"user": "carol"})
    path = f"/admin/v1/keys/{key['key_id']}"
    seeded.inject("update secrets", 409, times=3)
    status, patched = await follower.call("PATCH", path, json={"name": "after-conflicts"})
    assert status == 200 and patched["name"] == "after-conflicts", patched
    seeded.inject("update secrets", 409, times=WRITE_ATTEMPTS)
    status, error = await follower.call("PATCH", path, json={"name": "never"})
    assert (status, error["error"]["code"]) == (409, "conflict"), error  # a lost race, not an API server failure
    status, shown = await leader.call("GET", path)
    assert shown["name"] == "after-conflicts", shown
