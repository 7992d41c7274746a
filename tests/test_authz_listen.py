"""``maas authz`` binds its check port to ``--host`` and its ops port to ``--ops-host`` (default: ``--host``), so the
check port can stay on the pod's loopback while the kubelet and Prometheus reach the ops port; and holds at most
``--max-connections`` client connections on the check port, so the ops port keeps answering."""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from controlplane.ports import free_port
from gateway.authz.main import serve
from gateway.authz.settings import AuthzSettings
from gateway.settings import load
from gateway.store.memory import MemoryStore
from tests.conftest import PEPPER
from tests.support.k8s_emulator import eventually
from tests.support.stack import authz_process


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


CHECK = b"GET /v1/models HTTP/1.1\r\nHost: gateway\r\n\r\n"


async def metric(port: int, name: str) -> float:
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/metrics") as response:
        assert response.status == 200
        for line in (await response.text()).splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"{name} not exposed")


async def answer(reader: asyncio.StreamReader) -> bytes:
    """One response: its head and its content-length body."""
    async with asyncio.timeout(5):
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0])
        return head + await reader.readexactly(length)


async def checked(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection the check port serves (a check answered on it)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(CHECK)
    assert (await answer(reader)).startswith(b"HTTP/1.1 401")
    return reader, writer


@pytest.mark.parametrize("http_server", ["fast", "aiohttp"])
async def test_connections_past_the_cap_get_a_503_while_open_ones_and_the_ops_port_are_served(
    http_server: str,
) -> None:
    """Any number of client connections was accepted: held idle by the tens of thousands they took every descriptor
    and then the ops port and Redis failed too."""
    async with running(host="127.0.0.1", max_connections=2, http_server=http_server) as settings:
        ops = settings.ops_port
        await eventually(lambda: healthz_ready(ops))
        await eventually(lambda: _at(ops, "maas_authz_client_connections", 0))  # the start-up probes are gone
        held = [await checked(settings.port) for _ in range(2)]

        reader, writer = await asyncio.open_connection("127.0.0.1", settings.port)
        writer.write(CHECK)
        async with asyncio.timeout(5):
            refused = await reader.read()  # the answer, then the server closes
        writer.close()
        head, _, body = refused.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503") and b"connection: close" in head.lower()
        assert json.loads(body)["error"]["code"] == "too_many_connections"

        assert await healthz("127.0.0.1", ops) == 200
        assert await metric(ops, "maas_authz_client_connections_refused_total") == 1
        assert await metric(ops, "maas_authz_client_connections") == 2
        for held_reader, held_writer in held:  # the open connections are still served
            held_writer.write(CHECK)
            assert (await answer(held_reader)).startswith(b"HTTP/1.1 401")

        held[0][1].close()
        await eventually(lambda: _at(ops, "maas_authz_client_connections", 1))
        _, writer = await checked(settings.port)  # served again
        writer.close()
        held[1][1].close()
        assert await metric(ops, "maas_authz_client_connections_refused_total") == 1


async def healthz_ready(port: int) -> bool:
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/readyz") as response:
        return response.status == 200


async def _at(port: int, name: str, value: float) -> bool:
    return await metric(port, name) == value


@pytest.mark.redis
async def test_connections_held_on_the_check_port_leave_the_ops_port_its_descriptors(
    redis_url: str, log_dir: Path
) -> None:
    """The real process with 256 descriptors: 600 connections held open on the check port had taken them all, and
    then the ops port could accept nothing (EMFILE), so probes and Prometheus failed with it."""
    cap, total = 16, 600
    with authz_process(
        redis_url=redis_url, pepper=PEPPER, log_dir=log_dir, args=("--max-connections", str(cap))
    ) as authz:
        resource.prlimit(authz.proc.popen.pid, resource.RLIMIT_NOFILE, (256, 256))
        held = []
        try:
            for _ in range(total):  # one at a time: the process accepts them as they come, as from real clients
                held.append(await asyncio.open_connection("127.0.0.1", authz.port))
            ops = authz.ops_port
            await eventually(lambda: _at(ops, "maas_authz_client_connections_refused_total", total - cap))
            assert await healthz("127.0.0.1", ops) == 200
            assert await metric(ops, "maas_authz_client_connections") == cap
        finally:
            for _, writer in held:
                writer.close()
        await eventually(lambda: _at(ops, "maas_authz_client_connections", 0))
        _, writer = await checked(authz.port)  # served again
        writer.close()
