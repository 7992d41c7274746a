"""Keys whose limits take their window from their tier, when the tier would lose that limit: the admin API refuses
such a tier change, and a key left without its window by a change made in the cluster can still be revoked and
disabled (through the API and ``maas keys``), and a running ``maas authz`` then denies it."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from pathlib import Path

import aiohttp
import pytest
import yaml

from controlplane import kinds
from tests.support.admin_api import PEPPER, Api, admin_settings, running
from tests.support.k8s_emulator import eventually
from tests.support.stack import authz_process
from tests.test_keys_cli import _keys

pytestmark = pytest.mark.redis

BOTH = {
    "level": 4,
    "groups": ["silver"],
    "limits": {"requests": {"limit": 100, "window": "1m"}, "tokens": {"limit": 10_000, "window": "1m"}},
}
TOKENS_ONLY = {**BOTH, "limits": {"tokens": {"limit": 10_000, "window": "1m"}}}


async def _borrower(api: Api, user: str) -> dict[str, str]:
    """A silver key with a request limit of its own and no window: it takes the tier's request window."""
    status, key = await api.call(
        "POST", "/admin/v1/keys", json={"user": user, "tier": "silver", "limits": {"requests": 3}}
    )
    assert status == 201 and key["limits"]["requests"] == {"limit": 3, "window": "1m"}, key
    return key


async def test_a_tier_change_that_takes_a_borrowed_window_away_is_refused(tmp_path: Path, redis_url: str) -> None:
    async with running(admin_settings(tmp_path, redis_url)) as (_, api):
        assert (await api.call("PUT", "/admin/v1/tiers/silver", json=BOTH))[0] == 201
        keys = [await _borrower(api, f"victim-{i}") for i in range(7)]
        status, error = await api.call("PUT", "/admin/v1/tiers/silver", json=TOKENS_ONLY)
        assert (status, error["error"]["code"], error["error"]["param"]) == (409, "tier_in_use", "limits"), error
        message = error["error"]["message"]
        assert message.startswith("7 active key(s)") and sorted(k["key_id"] for k in keys)[0] in message, message
        status, tier = await api.call("GET", "/admin/v1/tiers/silver")
        assert tier["limits"]["requests"] == {"limit": 100, "window": "1m"}  # unchanged
        # a new window for the limit, or keys with their own window, revoked or disabled, do not hold it back
        changed = {**BOTH, "limits": {**BOTH["limits"], "requests": {"limit": 50, "window": "2m"}}}
        assert (await api.call("PUT", "/admin/v1/tiers/silver", json=changed))[0] == 200
        for i, key in enumerate(keys):
            path = f"/admin/v1/keys/{key['key_id']}"
            if i == 0:
                status, _ = await api.call("PATCH", path, json={"limits": {"requests": 3, "window": "1h"}})
            elif i == 1:
                status, _ = await api.call("PATCH", path, json={"disabled": True})
            else:
                status, _ = await api.call("DELETE", path)
            assert status == 200
        status, tier = await api.call("PUT", "/admin/v1/tiers/silver", json=TOKENS_ONLY)
        assert status == 200 and tier["limits"]["requests"] is None, tier
        # a new tier that takes the keys of its groups from their tier counts too
        status, key = await api.call(
            "POST", "/admin/v1/keys", json={"user": "g", "groups": ["gold"], "limits": {"tokens": 9}}
        )
        assert status == 201 and key["tier"] == "free"
        gold = {"level": 9, "groups": ["gold"], "limits": {"requests": {"limit": 1, "window": "1m"}}}
        status, error = await api.call("PUT", "/admin/v1/tiers/gold", json=gold)
        assert (status, error["error"]["code"]) == (409, "tier_in_use") and key["key_id"] in error["error"]["message"]


async def _check(session: aiohttp.ClientSession, port: int, key: str) -> int:
    url = f"http://127.0.0.1:{port}/qwen3/v1/models"
    async with session.get(url, headers={"Authorization": f"APIKEY {key}"}) as response:
        return response.status


async def _denied(session: aiohttp.ClientSession, port: int, key: str) -> bool:
    return await _check(session, port, key) == 401


async def test_a_key_whose_tier_lost_its_window_can_be_revoked_and_disabled(
    tmp_path: Path, redis_url: str, log_dir: Path
) -> None:
    """The tier loses the limit in the cluster (a kubectl edit of the ConfigMap): the keys' Secrets are refused and
    their last records kept, so authz admits them; revoking or disabling them had been refused for want of a window."""
    with contextlib.ExitStack() as stack:
        authz = await asyncio.to_thread(
            stack.enter_context, authz_process(redis_url=redis_url, pepper=PEPPER, log_dir=log_dir)
        )
        async with running(admin_settings(tmp_path, redis_url)) as (plane, api), aiohttp.ClientSession() as session:
            assert (await api.call("PUT", "/admin/v1/tiers/silver", json=BOTH))[0] == 201
            revoked, disabled, by_cli, rotated = [await _borrower(api, f"victim-{i}") for i in range(4)]
            for key in (revoked, disabled, by_cli, rotated):
                assert await _check(session, authz.port, key["key"]) == 200
            assert plane.source is not None
            limits = await plane.source.get(kinds.CONFIGMAP, "llm", "maas-tier-limits")
            assert limits is not None
            document = yaml.safe_load(limits["data"]["limits"])
            document["silver"].pop("requests")
            limits["data"]["limits"] = yaml.safe_dump(document)
            await plane.source.apply(limits)

            async def refused() -> bool:
                _, sync = await api.call("GET", "/v1/sync")
                return sum(s["reason"] == "invalid_limit" for s in sync["skipped"]) == 4

            await eventually(refused)
            assert await _check(session, authz.port, revoked["key"]) == 200  # the last good record

            status, body = await api.call("DELETE", f"/admin/v1/keys/{revoked['key_id']}")
            assert status == 200 and (body["status"], body["synced"]) == ("revoked", True), body
            status, body = await api.call("PATCH", f"/admin/v1/keys/{disabled['key_id']}", json={"disabled": True})
            assert status == 200 and (body["status"], body["synced"]) == ("disabled", True), body
            code, out, err = await _keys(api.base, "revoke", by_cli["key_id"])
            assert code == 0 and "status: revoked" in out, (out, err)
            for key in (revoked, disabled, by_cli):
                await eventually(functools.partial(_denied, session, authz.port, key["key"]))
            # a rotation would issue an active key with the same window-less limit: it says what to do first
            status, error = await api.call("POST", f"/admin/v1/keys/{rotated['key_id']}/rotate", json={})
            assert (status, error["error"]["param"]) == (400, "limits.window") and "PATCH" in error["error"]["message"]
            _, sync = await api.call("GET", "/v1/sync")
            assert [s["name"] for s in sync["skipped"]] == [f"maas-key-{rotated['key_id']}"], sync
