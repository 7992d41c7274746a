"""End to end: deleting a key Secret in the cluster makes a running ``maas authz`` deny the key."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import pytest

from tests.support import procs
from tests.support.k8s_emulator import K8sEmulator, eventually, load_manifests
from tests.test_controlplane_kube import settings_for, started

pytestmark = pytest.mark.redis

SEED = Path(__file__).parent / "fixtures" / "seed"


async def status_of(port: int, key: str) -> int:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/qwen3/v1/models", headers={"Authorization": f"APIKEY {key}"}) as response,
    ):
        return response.status


async def test_deleted_key_secret_is_denied_by_a_running_authz(
    emulator: K8sEmulator, tmp_path: Path, redis_url: str, log_dir: Path
) -> None:
    for obj in load_manifests(SEED):
        emulator.create(obj)
    plane = await started(settings_for(emulator, tmp_path, redis_url))
    port, ops = procs.free_port(), procs.free_port()
    authz = procs.start(
        "authz",
        procs.maas_argv(
            "authz",
            f"--port={port}",
            f"--ops-port={ops}",
            "--host=127.0.0.1",
            f"--redis-url={redis_url}",
            "--identity-secret=identity-secret-for-tests-0123456789",
            "--log-format=text",
        ),
        log_dir=log_dir,
    )
    try:
        await asyncio.to_thread(procs.wait_http, f"http://127.0.0.1:{ops}/readyz", proc=authz.popen)
        assert await status_of(port, "admin-key-12345") != 401
        assert await status_of(port, "premium-key-67890") != 401
        started_at = time.monotonic()
        emulator.delete("v1", "Secret", "llm", "admin-key")

        async def denied() -> bool:
            return await status_of(port, "admin-key-12345") == 401

        await eventually(denied, interval=0.01)
        print(f"revocation reached authz in {time.monotonic() - started_at:.3f}s")
        assert await status_of(port, "premium-key-67890") != 401
    finally:
        authz.stop()
        await plane.stop()
