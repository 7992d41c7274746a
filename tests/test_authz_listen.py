"""``maas authz`` binds its check port to ``--host`` and its ops port to ``--ops-host`` (default: ``--host``), so the
check port can stay on the pod's loopback while the kubelet and Prometheus reach the ops port."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import aiohttp
import pytest

from controlplane.ports import free_port
from gateway.authz.main import serve
from gateway.authz.settings import AuthzSettings
from gateway.settings import load
from gateway.store.memory import MemoryStore


@contextlib.asynccontextmanager
async def running(**values: object) -> AsyncIterator[AuthzSettings]:
    settings = load(
        AuthzSettings, dev=True, key_pepper=None, port=free_port(), ops_port=free_port(), log_format="text", **values
    )
    stop = asyncio.Event()
    task = asyncio.create_task(serve(settings, stop=stop, store=MemoryStore()))
    try:
        for _ in range(200):  # until both ports answer where they should
            if await reachable(settings.host, settings.port) and await reachable(
                settings.ops_listen_host, settings.ops_port
            ):
                break
            assert not task.done(), task
            await asyncio.sleep(0.02)
        yield settings
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def reachable(host: str, port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection(host, port)
    except OSError:
        return False
    writer.close()
    await writer.wait_closed()
    return True


async def healthz(host: str, port: int) -> int:
    async with aiohttp.ClientSession() as session, session.get(f"http://{host}:{port}/healthz") as response:
        return response.status


@pytest.mark.parametrize(
    ("values", "check_host", "ops_host"),
    [
        pytest.param({"host": "127.0.0.2"}, "127.0.0.2", "127.0.0.2", id="ops-port-follows-host"),
        pytest.param({"host": "127.0.0.2", "ops_host": "127.0.0.3"}, "127.0.0.2", "127.0.0.3", id="ops-host-apart"),
    ],
)
async def test_check_and_ops_ports_bind_where_told(values: dict[str, str], check_host: str, ops_host: str) -> None:
    """The sidecar overlay's check port had listened on 0.0.0.0: any pod could probe keys through it (and drain
    their buckets), though only the local Envoy needs it."""
    async with running(**values) as settings:
        assert await reachable(check_host, settings.port)
        assert not await reachable("127.0.0.1", settings.port)
        assert await healthz(ops_host, settings.ops_port) == 200
        if ops_host != check_host:
            assert not await reachable(check_host, settings.ops_port)
