"""Admin writes against the Kubernetes API emulator when the API server fails them or another writer races them: a
tier change, which touches two ConfigMaps, is all or nothing as the cluster ends up (or says exactly what is not),
as is a key rotation, which creates one Secret and updates another; a change that lost a race is started over,
after a pause, on top of the other writer's change; an object another writer created is never written over."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from controlplane.admin import keysecret
from controlplane.admin.context import CONFLICT_WAIT, WRITE_ATTEMPTS, retry_conflicts
from controlplane.admin.errors import Conflict, SourceUnavailable
from controlplane.admin.keysecret import secret_name
from controlplane.errors import ConflictError, SourceError
from controlplane.runner import ControlPlane
from gateway.contract import digest_key, key_id_of
from tests.support.admin_api import PEPPER, SEED, TOKEN_FILE, Api, running
from tests.support.k8s_emulator import K8sEmulator, eventually, load_manifests
from tests.test_controlplane_kube import settings_for

pytestmark = pytest.mark.redis

NS = "llm"
MAPPING = "tier-to-group-mapping"
LIMITS = "maas-tier-limits"
GOLD = {"level": 3, "groups": ["gold"], "limits": {"requests": {"limit": 100, "window": "1m"}}}
SILVER = "silver:\n  requests: {limit: 1, window: 1m}\n"


@pytest.fixture
def seeded(emulator: K8sEmulator) -> K8sEmulator:
    for obj in load_manifests(SEED):
        emulator.create(obj)
    return emulator


@pytest.fixture
async def served(seeded: K8sEmulator, tmp_path: Path, redis_url: str) -> AsyncIterator[tuple[ControlPlane, Api]]:
    tokens = tmp_path / "tokens"
    tokens.write_text(TOKEN_FILE)
    settings = settings_for(
        seeded,
        tmp_path,
        redis_url,
        admin_token_file=str(tokens),
        key_namespace=NS,
        admin_write_timeout=5.0,
        key_pepper=PEPPER.decode(),
    )
    async with running(settings) as served:
        yield served


@pytest.fixture
def api(served: tuple[ControlPlane, Api]) -> Api:
    return served[1]


def configmap(emulator: K8sEmulator, name: str) -> dict[str, Any] | None:
    return emulator.get("v1", "ConfigMap", NS, name)


def data(emulator: K8sEmulator, name: str) -> Any:
    found = configmap(emulator, name)
    return found and found["data"]


def other_writer_adds_silver(emulator: K8sEmulator) -> Callable[[], None]:
    """A ``kubectl edit`` of the limits ConfigMap: a tier of its own added."""

    def edit() -> None:
        current = configmap(emulator, LIMITS)
        assert current is not None
        current["data"] = {"limits": current["data"]["limits"] + SILVER}
        emulator.replace(current)

    return edit


@pytest.mark.parametrize(
    ("status", "times", "answer", "updates"),
    [
        # the limits written, the mapping refused, the limits restored
        pytest.param(500, 1, (503, "source_unavailable"), 3, id="api-server-error"),
        # each attempt the same, after a pause, until the attempts run out
        pytest.param(409, WRITE_ATTEMPTS, (409, "conflict"), 3 * WRITE_ATTEMPTS, id="lasting-conflict"),
    ],
)
async def test_a_tier_change_whose_second_write_fails_for_good_leaves_the_first_as_it_was(
    api: Api, seeded: K8sEmulator, status: int, times: int, answer: tuple[int, str], updates: int
) -> None:
    """The limits ConfigMap stayed written when the mapping's write failed: the cluster held limits for a tier it
    did not have, and a lost race was answered 503 like an API server failure."""
    before = {name: data(seeded, name) for name in (MAPPING, LIMITS)}
    seeded.inject("update configmaps", status, times=times, name=MAPPING)
    sent = seeded.requests["update configmaps"]
    code, error = await api.call("PUT", "/admin/v1/tiers/gold", json=GOLD)
    assert (code, error["error"]["code"]) == answer, error
    assert error["error"]["type"] in ("invalid_request_error", "server_error"), error
    assert {name: data(seeded, name) for name in (MAPPING, LIMITS)} == before
    assert seeded.requests["update configmaps"] - sent == updates
    code, _ = await api.call("GET", "/admin/v1/tiers/gold")
    assert code == 404


@pytest.mark.parametrize("failing", [MAPPING, LIMITS])
async def test_a_tier_write_that_failed_but_landed_completes_the_change(
    api: Api, seeded: K8sEmulator, failing: str
) -> None:
    """The API server applied the mapping's write but its answer was lost (a 500 after serving): the limits were
    taken back, so the cluster held the new tier without its limits, the half change a failure must not leave."""
    seeded.lose_answer("update configmaps", 500, name=failing)
    code, tier = await api.call("PUT", "/admin/v1/tiers/gold", json=GOLD)
    assert code == 201, tier
    assert "gold" in yaml.safe_load(data(seeded, LIMITS)["limits"])
    assert "gold" in str(yaml.safe_load(data(seeded, MAPPING)["tiers"])), data(seeded, MAPPING)
    assert seeded.requests["delete configmaps"] == 0
    code, _ = await api.call("GET", "/admin/v1/tiers/gold")
    assert code == 200


async def test_a_limits_configmap_the_failed_change_created_is_deleted_again(api: Api, seeded: K8sEmulator) -> None:
    seeded.delete("v1", "ConfigMap", NS, LIMITS)
    before = data(seeded, MAPPING)
    seeded.inject("update configmaps", 500, name=MAPPING)
    code, error = await api.call("PUT", "/admin/v1/tiers/gold", json=GOLD)
    assert (code, error["error"]["code"]) == (503, "source_unavailable"), error
    assert configmap(seeded, LIMITS) is None and data(seeded, MAPPING) == before
    assert seeded.requests["create configmaps"] == 1 and seeded.requests["delete configmaps"] == 1


async def test_a_restore_that_meets_another_writers_change_is_reported_not_overwritten(
    api: Api, seeded: K8sEmulator
) -> None:
    before = data(seeded, MAPPING)
    seeded.inject("update configmaps", 500, name=MAPPING)
    # after this change wrote the limits, and before it restores them, someone else edits them
    seeded.intercept("update configmaps", other_writer_adds_silver(seeded), name=MAPPING)
    code, error = await api.call("PUT", "/admin/v1/tiers/gold", json=GOLD)
    assert (code, error["error"]["code"]) == (409, "partial_change"), error
    message = error["error"]["message"]
    assert f"ConfigMap {NS}/{LIMITS} holds it" in message and f"ConfigMap {NS}/{MAPPING} does not" in message, message
    assert "another writer" in message, message
    limits = yaml.safe_load(data(seeded, LIMITS)["limits"])
    assert {"gold", "silver"} <= set(limits), limits  # the other writer's version, kept
    assert data(seeded, MAPPING) == before


async def test_a_restore_the_api_server_fails_is_reported(api: Api, seeded: K8sEmulator) -> None:
    seeded.inject("update configmaps", 500, name=MAPPING)
    seeded.intercept("update configmaps", lambda: seeded.inject("update configmaps", 503, name=LIMITS), name=MAPPING)
    code, error = await api.call("PUT", "/admin/v1/tiers/gold", json=GOLD)
    assert (code, error["error"]["code"], error["error"]["type"]) == (503, "partial_change", "server_error"), error
    assert f"ConfigMap {NS}/{LIMITS} holds it" in error["error"]["message"], error
    assert "gold" in yaml.safe_load(data(seeded, LIMITS)["limits"])


async def test_a_change_of_the_limits_alone_writes_only_the_limits(api: Api, seeded: K8sEmulator) -> None:
    """Nothing to take back when only one ConfigMap changes: a failing mapping write is never reached."""
    seeded.inject("update configmaps", 500, name=MAPPING)
    premium = {"display_name": "Premium Tier", "level": 1, "groups": ["premium"], "limits": {}}
    premium["limits"] = {"requests": {"limit": 21, "window": "2m"}}
    sent = seeded.requests["update configmaps"]
    code, tier = await api.call("PUT", "/admin/v1/tiers/premium", json=premium)
    assert code == 200 and tier["limits"]["requests"] == {"limit": 21, "window": "2m"}, tier
    assert seeded.requests["update configmaps"] - sent == 1


def start_overs(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "starting over in" in r.getMessage()]


async def test_a_tier_change_that_lost_a_race_is_redone_on_top_of_the_other_writers(
    api: Api, seeded: K8sEmulator, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "maas.controlplane.admin")
    seeded.intercept("update configmaps", other_writer_adds_silver(seeded), name=LIMITS)
    sent = seeded.requests["update configmaps"]
    code, tier = await api.call("PUT", "/admin/v1/tiers/gold", json=GOLD)
    assert code == 201 and tier["synced"] is True, tier
    # the limits refused (409, a stale resourceVersion), read again and written, then the mapping
    assert seeded.requests["update configmaps"] - sent == 3
    assert {"gold", "silver"} <= set(yaml.safe_load(data(seeded, LIMITS)["limits"]))
    # it paused before starting over (it had written again at once)
    assert [m.split(";")[0] for m in start_overs(caplog)] == [
        "The tier ConfigMaps changed under this change (attempt 1 of 5)"
    ]


async def test_a_key_change_that_lost_a_race_is_redone_on_top_of_the_other_writers(
    api: Api, seeded: K8sEmulator, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "maas.controlplane.admin")
    code, key = await api.call("POST", "/admin/v1/keys", json={"user": "dana"})
    assert code == 201, key
    name = secret_name(key["key_id"])

    def annotate() -> None:
        secret = seeded.get("v1", "Secret", NS, name)
        assert secret is not None
        secret["metadata"]["annotations"]["team.example.com/owner"] = "dana"
        seeded.replace(secret)

    seeded.intercept("update secrets", annotate, name=name)
    sent = seeded.requests["update secrets"]
    code, patched = await api.call("PATCH", f"/admin/v1/keys/{key['key_id']}", json={"name": "ci"})
    assert code == 200 and patched["name"] == "ci", patched
    assert seeded.requests["update secrets"] - sent == 2
    assert len(start_overs(caplog)) == 1, start_overs(caplog)
    secret = seeded.get("v1", "Secret", NS, name)
    assert secret is not None and secret["metadata"]["annotations"]["team.example.com/owner"] == "dana"


async def test_conflict_retries_wait_a_growing_jittered_pause_between_attempts() -> None:
    """They had started over at once: writers that had just collided collided again."""
    events: list[str | float] = []

    async def sleep(seconds: float) -> None:
        events.append(seconds)

    async def lose(attempt: int) -> None:
        events.append(f"attempt {attempt}")
        raise ConflictError("the object has been modified")

    with pytest.raises(Conflict) as lost:
        await retry_conflicts(lose, what="The object", sleep=sleep)
    assert (lost.value.status, lost.value.code) == (409, "conflict")
    assert events[0::2] == [f"attempt {n}" for n in range(WRITE_ATTEMPTS)]
    waits = events[1::2]
    assert len(waits) == WRITE_ATTEMPTS - 1
    for n, wait in enumerate(waits):
        assert isinstance(wait, float) and CONFLICT_WAIT * 2**n / 2 <= wait <= CONFLICT_WAIT * 2**n, waits

    events.clear()

    async def win_third(attempt: int) -> str:
        events.append(f"attempt {attempt}")
        if attempt < 2:
            raise ConflictError("the object has been modified")
        return "written"

    assert await retry_conflicts(win_third, what="The object", sleep=sleep) == "written"
    assert len(events) == 5 and events[4] == "attempt 2"

    async def fail(attempt: int) -> None:
        events.append(f"failed {attempt}")
        raise SourceError("HTTP 500")

    events.clear()
    with pytest.raises(SourceUnavailable):
        await retry_conflicts(fail, what="The object", sleep=sleep)
    assert events == ["failed 0"]  # only a lost race is retried


async def test_a_tier_configmap_another_writer_created_meanwhile_is_changed_not_written_over(
    api: Api, seeded: K8sEmulator, caplog: pytest.LogCaptureFixture
) -> None:
    """The limits ConfigMap was not there when read; created by someone else before this change's create, it was
    read again and replaced with this change's content alone (the create that met 409 AlreadyExists replaced)."""
    caplog.set_level(logging.INFO, "maas.controlplane.admin")
    seeded.delete("v1", "ConfigMap", NS, LIMITS)
    theirs = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": LIMITS, "namespace": NS}}
    seeded.intercept("create configmaps", lambda: seeded.create({**theirs, "data": {"limits": SILVER}}))
    code, tier = await api.call("PUT", "/admin/v1/tiers/gold", json=GOLD)
    assert code == 201, tier
    assert {"gold", "silver"} <= set(yaml.safe_load(data(seeded, LIMITS)["limits"]))
    assert seeded.requests["create configmaps"] == 1  # the second attempt found it and changed it
    assert len(start_overs(caplog)) == 1, start_overs(caplog)


def fixed_first_key(monkeypatch: pytest.MonkeyPatch) -> str:
    """The next key drawn is ``first`` (then random ones again); returns the name of its Secret."""
    first = keysecret.new_api_key()
    draws = iter([first])
    real = keysecret.new_api_key
    monkeypatch.setattr(keysecret, "new_api_key", lambda: next(draws, None) or real())
    return secret_name(key_id_of(digest_key(first, PEPPER)))


def another_keys_secret(name: str) -> dict[str, Any]:
    digest = base64.b64encode(b"ab" * 32).decode()
    annotations = {"maas/user-id": "erin", "maas/status": "active"}
    metadata = {"name": name, "namespace": NS, "labels": {"maas.io/api-key": "true"}, "annotations": annotations}
    return {"apiVersion": "v1", "kind": "Secret", "metadata": metadata, "data": {"digest": digest}}


@pytest.mark.parametrize(
    "meanwhile", [pytest.param(False, id="there-before"), pytest.param(True, id="created-meanwhile")]
)
async def test_a_new_key_whose_secret_name_is_taken_gets_another_key_never_that_secret(
    api: Api, seeded: K8sEmulator, monkeypatch: pytest.MonkeyPatch, meanwhile: bool
) -> None:
    """Issuing a key replaced a Secret of the same name (another key's, same key id) with its own."""
    taken = fixed_first_key(monkeypatch)
    theirs = another_keys_secret(taken)
    if meanwhile:
        seeded.intercept("create secrets", lambda: seeded.create(theirs))
    else:
        seeded.create(theirs)
    code, key = await api.call("POST", "/admin/v1/keys", json={"user": "dana"})
    assert code == 201, key
    assert secret_name(key["key_id"]) != taken and key["user"] == "dana"
    kept = seeded.get("v1", "Secret", NS, taken)
    assert kept is not None and kept["data"] == theirs["data"], kept
    assert kept["metadata"]["annotations"] == theirs["metadata"]["annotations"]
    assert seeded.get("v1", "Secret", NS, secret_name(key["key_id"])) is not None


def managed_secrets(emulator: K8sEmulator) -> set[str]:
    return {
        s["metadata"]["name"] for s in emulator.objects("v1", "Secret") if s["metadata"]["name"].startswith("maas-key-")
    }


@pytest.mark.parametrize(
    ("status", "times", "answer"),
    [
        pytest.param(409, WRITE_ATTEMPTS, (409, "conflict"), id="lasting-conflict"),
        pytest.param(500, 1, (503, "source_unavailable"), id="api-server-error"),
    ],
)
async def test_a_rotation_whose_old_key_write_fails_deletes_the_new_keys_secret(
    api: Api, seeded: K8sEmulator, status: int, times: int, answer: tuple[int, str]
) -> None:
    """The new key's Secret stayed: an active key whose plaintext no one was given."""
    code, key = await api.call("POST", "/admin/v1/keys", json={"user": "dana"})
    assert code == 201, key
    name = secret_name(key["key_id"])
    before = seeded.get("v1", "Secret", NS, name)
    seeded.inject("update secrets", status, times=times, name=name)
    code, error = await api.call("POST", f"/admin/v1/keys/{key['key_id']}/rotate", json={"grace_period": "1h"})
    assert (code, error["error"]["code"]) == answer, error
    assert managed_secrets(seeded) == {name}
    assert seeded.get("v1", "Secret", NS, name) == before
    assert seeded.requests["delete secrets"] == 1


async def test_a_rotation_whose_old_key_write_landed_but_failed_is_done(api: Api, seeded: K8sEmulator) -> None:
    """The API server applied the old key's end but its answer was lost (a 500 after serving): the new key was
    deleted anyway, leaving the holder a key that ends with its grace period (at once with "0s") and none to follow."""
    code, key = await api.call("POST", "/admin/v1/keys", json={"user": "dana"})
    assert code == 201, key
    name = secret_name(key["key_id"])
    seeded.lose_answer("update secrets", 500, name=name)
    code, rotated = await api.call("POST", f"/admin/v1/keys/{key['key_id']}/rotate", json={"grace_period": "0s"})
    assert code == 200, rotated
    assert managed_secrets(seeded) == {name, secret_name(rotated["key_id"])}
    old = seeded.get("v1", "Secret", NS, name)
    assert old is not None and old["metadata"]["annotations"]["maas.io/rotated-to"] == rotated["key_id"], old
    assert seeded.requests["delete secrets"] == 0
    code, shown = await api.call("GET", f"/admin/v1/keys/{rotated['key_id']}")
    assert code == 200 and shown["status"] == "active", shown


async def test_a_rotation_of_a_key_revoked_meanwhile_deletes_the_new_keys_secret(api: Api, seeded: K8sEmulator) -> None:
    code, key = await api.call("POST", "/admin/v1/keys", json={"user": "dana"})
    assert code == 201, key
    name = secret_name(key["key_id"])

    def revoke() -> None:  # through another replica, between this rotation's read of the old Secret and its write
        secret = seeded.get("v1", "Secret", NS, name)
        assert secret is not None
        secret["metadata"]["annotations"]["maas/status"] = "revoked"
        seeded.replace(secret)

    seeded.intercept("update secrets", revoke, name=name)
    code, error = await api.call("POST", f"/admin/v1/keys/{key['key_id']}/rotate", json={"grace_period": "1h"})
    assert (code, error["error"]["code"]) == (409, "key_revoked"), error
    assert managed_secrets(seeded) == {name}


async def test_a_rotation_cut_by_a_shutdown_deletes_the_new_keys_secret_before_the_process_ends(
    served: tuple[ControlPlane, Api], seeded: K8sEmulator
) -> None:
    """The control plane stopped while a rotation waited on the old key's write, after the new key's Secret was
    created: the rotation was dropped (aiohttp waited 60 s for it, the process 3 s), and the new Secret stayed, an
    active key whose plaintext no one was given."""
    plane, api = served
    code, key = await api.call("POST", "/admin/v1/keys", json={"user": "dana"})
    assert code == 201, key
    name = secret_name(key["key_id"])
    arrived, done = threading.Event(), threading.Event()

    async def hang() -> None:  # the API server does not answer the old key's write until the test ends
        arrived.set()
        await asyncio.to_thread(done.wait, 60)

    seeded.intercept("update secrets", hang, name=name)
    rotation = asyncio.create_task(api.call("POST", f"/admin/v1/keys/{key['key_id']}/rotate"))
    try:
        await eventually(arrived.is_set)
        (new,) = managed_secrets(seeded) - {name}
        await plane.stop()
        with contextlib.suppress(aiohttp.ClientError):
            await rotation  # (the connection is closed: no answer)
    finally:
        done.set()
    assert managed_secrets(seeded) == {name}
    assert seeded.requests["delete secrets"] == 1
    assert new not in managed_secrets(seeded)


@pytest.mark.parametrize(
    ("other_writer", "answer"),
    [
        pytest.param(False, (503, "partial_change", "server_error"), id="delete-fails"),
        pytest.param(True, (409, "partial_change", "invalid_request_error"), id="changed-since"),
    ],
)
async def test_a_new_keys_secret_that_cannot_be_deleted_is_named_in_the_answer_and_the_log(
    api: Api, seeded: K8sEmulator, caplog: pytest.LogCaptureFixture, other_writer: bool, answer: tuple[int, str, str]
) -> None:
    code, key = await api.call("POST", "/admin/v1/keys", json={"user": "dana"})
    assert code == 201, key
    name = secret_name(key["key_id"])
    seeded.inject("update secrets", 409, times=WRITE_ATTEMPTS, name=name)

    def annotate_new() -> None:
        (new,) = managed_secrets(seeded) - {name}
        secret = seeded.get("v1", "Secret", NS, new)
        assert secret is not None
        secret["metadata"]["annotations"]["team.example.com/owner"] = "dana"
        seeded.replace(secret)

    if other_writer:
        seeded.intercept("delete secrets", annotate_new)
    else:
        seeded.inject("delete secrets", 500)
    code, error = await api.call("POST", f"/admin/v1/keys/{key['key_id']}/rotate", json={"grace_period": "1h"})
    assert (code, error["error"]["code"], error["error"]["type"]) == answer, error
    (orphan,) = managed_secrets(seeded) - {name}
    message = error["error"]["message"]
    assert f"{NS}/{orphan}" in message and "kept changing" in message, message
    logged = [r for r in caplog.records if r.levelno == logging.ERROR and f"{NS}/{orphan}" in r.getMessage()]
    assert len(logged) == 1, caplog.records


@pytest.mark.parametrize("path", ["create", "rotate"])
async def test_a_new_keys_secret_created_though_the_answer_was_lost_is_the_key_given_out(
    api: Api, seeded: K8sEmulator, path: str
) -> None:
    """The API server created the new key's Secret but its answer was lost (a 500 after serving): the request
    failed with 503 and left that Secret, an active key whose plaintext no one was given."""
    old = None
    if path == "rotate":
        code, old = await api.call("POST", "/admin/v1/keys", json={"user": "dana"})
        assert code == 201, old
    before = managed_secrets(seeded)
    seeded.lose_answer("create secrets", 500)
    if old is None:
        code, key = await api.call("POST", "/admin/v1/keys", json={"user": "dana"})
        assert code == 201, key
    else:
        code, key = await api.call("POST", f"/admin/v1/keys/{old['key_id']}/rotate", json={"grace_period": "1h"})
        assert code == 200, key
    assert managed_secrets(seeded) - before == {secret_name(key["key_id"])}
    assert seeded.requests["create secrets"] == 1 + (old is not None)
    made = seeded.get("v1", "Secret", NS, secret_name(key["key_id"]))
    assert made is not None
    assert base64.b64decode(made["data"]["digest"]).decode() == digest_key(key["key"], PEPPER)
    code, shown = await api.call("GET", f"/admin/v1/keys/{key['key_id']}")
    assert code == 200 and shown["status"] == "active", shown


@pytest.mark.parametrize("answered", ["before-the-cut", "after-the-cut"])
async def test_a_key_creation_cut_by_a_shutdown_deletes_the_secret_its_create_made(
    served: tuple[ControlPlane, Api], seeded: K8sEmulator, answered: str
) -> None:
    """The control plane stopped while a new key's creation was in flight: its Secret stayed, an active key whose
    plaintext no one was given. The API server answers the create before the request is cut (it was waiting for
    Redis to hold the key), or only after (the request was cut during the create, which landed later). Either way
    the Secret is deleted before the process ends."""
    plane, api = served
    arrived, done = threading.Event(), threading.Event()

    async def slow() -> None:  # the API server answers the create only when the test lets it
        arrived.set()
        await asyncio.to_thread(done.wait, 60)

    seeded.intercept("create secrets", slow)
    creation = asyncio.create_task(api.call("POST", "/admin/v1/keys", json={"user": "dana"}))
    stopping = None
    try:
        await eventually(arrived.is_set)
        stopping = asyncio.create_task(plane.stop())
        if answered == "after-the-cut":
            with pytest.raises(aiohttp.ClientError):
                await creation  # the request was cancelled, its connection closed
    finally:
        done.set()
    with contextlib.suppress(aiohttp.ClientError):
        await creation
    await asyncio.wait_for(stopping, 10)
    assert seeded.requests["create secrets"] == 1 and seeded.requests["delete secrets"] == 1
    assert managed_secrets(seeded) == set()
