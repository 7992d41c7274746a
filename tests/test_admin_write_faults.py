"""Admin writes against the Kubernetes API emulator when another writer races them: a change that lost a race is
started over, after a pause, on top of the other writer's change."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from controlplane.admin.context import CONFLICT_WAIT, WRITE_ATTEMPTS, retry_conflicts
from controlplane.admin.errors import Conflict, SourceUnavailable
from controlplane.admin.keysecret import secret_name
from controlplane.errors import ConflictError, SourceError
from tests.support.admin_api import PEPPER, SEED, TOKEN_FILE, Api, running
from tests.support.k8s_emulator import K8sEmulator, load_manifests
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
async def api(seeded: K8sEmulator, tmp_path: Path, redis_url: str) -> AsyncIterator[Api]:
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
    async with running(settings) as (_, client):
        yield client


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
