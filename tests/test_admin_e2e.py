"""End to end through a real Envoy and a running ``maas authz``: keys issued, revoked, rotated and expired through
the admin API, a tier change, and self-service through the gateway's self-service route."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import aiohttp
import pytest
import yaml

from controlplane import envoy
from controlplane.demo import self_service_route
from tests.support.admin_api import PEPPER, admin_settings, running
from tests.support.stack import IDENTITY_SECRET, authz_process, echo_process, envoy_process

pytestmark = pytest.mark.redis


async def _status(session: aiohttp.ClientSession, url: str, key: str) -> tuple[int, dict[str, object]]:
    async with session.get(url, headers={"Authorization": f"Bearer {key}"}) as response:
        body = await response.json(content_type=None) if response.content_type == "application/json" else {}
        return response.status, body


async def _until(
    session: aiohttp.ClientSession, url: str, key: str, status: int, *, code: str | None = None, attempts: int = 200
) -> int:
    """Poll until the answer has ``status`` (and error ``code``, if given); the last status seen."""
    got = 0
    for _ in range(attempts):
        got, body = await _status(session, url, key)
        error = body.get("error")
        if got == status and (code is None or (isinstance(error, dict) and error.get("code") == code)):
            return got
        await asyncio.sleep(0.05)
    return got


async def test_admin_keys_through_envoy_and_authz(tmp_path: Path, redis_url: str, log_dir: Path) -> None:
    settings = admin_settings(tmp_path, redis_url, identity_secret=IDENTITY_SECRET)
    manifests = Path(settings.directory or "")
    (manifests / "self-service.yaml").write_text(yaml.safe_dump(self_service_route()))
    with contextlib.ExitStack() as stack:
        echo_port = await asyncio.to_thread(stack.enter_context, echo_process(log_dir=log_dir))
        authz = await asyncio.to_thread(
            stack.enter_context, authz_process(redis_url=redis_url, pepper=PEPPER, log_dir=log_dir)
        )
        async with running(settings) as (plane, api):
            routes = [
                envoy.Route("/qwen3", "echo", rewrite="/"),
                envoy.Route("/v1/models", "controlplane"),
                envoy.Route("/v1/me", "controlplane"),
            ]
            clusters = [envoy.Cluster("echo", echo_port), envoy.Cluster("controlplane", plane.ports["main"])]
            gw = await asyncio.to_thread(
                stack.enter_context,
                envoy_process(routes=routes, clusters=clusters, authz_port=authz.port, log_dir=log_dir),
            )
            chat = f"{gw.url}/qwen3/v1/chat/completions"
            status, _ = await api.call(
                "PUT",
                "/admin/v1/tiers/gold",
                json={"level": 9, "limits": {"requests": {"limit": 1000, "window": "1m"}}},
            )
            assert status == 201
            async with aiohttp.ClientSession() as session:
                status, created = await api.call("POST", "/admin/v1/keys", json={"user": "dana", "tier": "gold"})
                key, key_id = created["key"], created["key_id"]
                assert (await _status(session, chat, key))[0] == 200  # works at once: the API waited for Redis

                status, models = await _status(session, f"{gw.url}/v1/models", key)
                assert status == 200 and [m["id"] for m in models["data"]] == ["qwen3-0-6b-instruct"]  # type: ignore[index]
                status, me = await _status(session, f"{gw.url}/v1/me", key)
                assert status == 200 and me["key_id"] == key_id and me["tier"] == "gold"

                limits = {"requests": {"limit": 1000, "window": "1m"}}
                await api.call(
                    "PUT", "/admin/v1/tiers/gold", json={"level": 9, "limits": limits, "models": ["another-model"]}
                )
                status, body = await _status(session, chat, key)
                assert status == 403 and body["error"]["code"] == "model_not_allowed"  # type: ignore[index]
                await api.call("PUT", "/admin/v1/tiers/gold", json={"level": 9, "limits": limits})
                assert (await _status(session, chat, key))[0] == 200

                status, rotated = await api.call("POST", f"/admin/v1/keys/{key_id}/rotate", json={"grace_period": "2s"})
                assert (await _status(session, chat, rotated["key"]))[0] == 200
                assert (await _status(session, chat, key))[0] == 200  # in the grace period
                assert await _until(session, chat, key, 401) == 401  # and not after it
                assert (await _status(session, chat, rotated["key"]))[0] == 200

                await api.call("DELETE", f"/admin/v1/keys/{rotated['key_id']}")
                assert await _until(session, chat, rotated["key"], 401) == 401

                status, short = await api.call("POST", "/admin/v1/keys", json={"user": "erin", "expires_in": "1s"})
                # a 401 invalid_api_key can come first, before authz has the new key from the change event
                assert await _until(session, chat, short["key"], 401, code="expired_api_key") == 401
                status, body = await _status(session, chat, short["key"])
                assert status == 401 and body["error"]["code"] == "expired_api_key"  # type: ignore[index]
