from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis as sync_redis

from gateway.store.memory import MemoryStore
from gateway.store.redis import RedisStore
from tests.support.k8s_emulator import K8sEmulator
from tests.support.procs import RedisCluster, RedisServer, redis_binary, redis_cluster, redis_server

PEPPER = b"test-pepper-0123456789abcdef"

os.environ.setdefault("MAAS_KEY_PEPPER", PEPPER.decode())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if redis_binary() is None:
        skip = pytest.mark.skip(reason="redis-server not installed (.ci/run installs it)")
        for item in items:
            if "redis" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def redis_session() -> Iterator[RedisServer]:
    with redis_server() as server:
        yield server


@pytest.fixture
def redis_url(redis_session: RedisServer) -> str:
    """A clean database on the session's real redis-server."""
    client = sync_redis.Redis.from_url(redis_session.url)
    client.flushall()
    client.close()
    return redis_session.url


@pytest.fixture(scope="session")
def redis_cluster_session() -> Iterator[RedisCluster]:
    with redis_cluster() as cluster:
        yield cluster


@pytest.fixture
def redis_cluster_url(redis_cluster_session: RedisCluster) -> str:
    for node in redis_cluster_session.nodes:
        client = sync_redis.Redis(port=node.port)
        client.flushall()
        client.close()
    return redis_cluster_session.url


@pytest.fixture(params=["memory", "redis", "redis-cluster"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[MemoryStore | RedisStore]:
    """The contract suite's store: the same tests run against both implementations."""
    if request.param == "memory":
        mem = MemoryStore()
        yield mem
        await mem.close()
        return
    url = request.getfixturevalue("redis_url" if request.param == "redis" else "redis_cluster_url")
    red = RedisStore(url, timeout=2.0)
    yield red
    await red.close()


@pytest.fixture
def emulator() -> Iterator[K8sEmulator]:
    """A Kubernetes API emulator on a free port; kubernetes-asyncio talks to it over real HTTP."""
    emu = K8sEmulator(bookmark_interval=0.2).start()
    yield emu
    emu.stop()


@pytest.fixture
def log_dir(tmp_path: Path) -> Path:
    path = tmp_path / "logs"
    path.mkdir()
    return path
