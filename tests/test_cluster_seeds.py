"""A Redis Cluster URL with several seed nodes (``redis+cluster://user:pass@host1:port,host2:port/0``): the store and
``maas authz`` start from any seed that answers, a process none of whose seeds answers stays not ready with a log line
naming every seed, and the password shows in neither."""

from __future__ import annotations

import asyncio
import time
import urllib.error
import urllib.request
from pathlib import Path

import aiohttp
import pytest
import redis as sync_redis

from gateway import contract
from gateway.contract import RecordKind
from gateway.errors import StoreError
from gateway.store.redis import RedisStore
from tests.conftest import PEPPER
from tests.support import platform
from tests.support.procs import RedisCluster, free_port
from tests.support.stack import authz_process
from tests.test_store_cluster import _statuses, denying_checker

pytestmark = pytest.mark.redis

USER = "maas-seeds"
PASSWORD = "seed-pass-7f3a9c1e"
PATH = "/qwen3/v1/chat/completions"


@pytest.fixture
def cluster(redis_cluster_session: RedisCluster, redis_cluster_url: str) -> RedisCluster:
    """The session's cluster, emptied, with a user of its own whose password the URLs carry (AUTH with a wrong one
    fails on any node)."""
    for node in redis_cluster_session.nodes:
        client = sync_redis.Redis(port=node.port)
        client.acl_setuser(
            USER, enabled=True, passwords=[f"+{PASSWORD}"], keys=["*"], channels=["*"], categories=["+@all"]
        )
        client.close()
    return redis_cluster_session


def _url(*ports: int) -> str:
    return f"redis+cluster://{USER}:{PASSWORD}@{','.join(f'127.0.0.1:{p}' for p in ports)}/0"


async def test_the_store_starts_from_the_second_seed_while_the_first_is_down(cluster: RedisCluster) -> None:
    """A cluster URL named one node: a store opened while that node was down had no cluster client to start."""
    store = RedisStore(_url(free_port(), cluster.nodes[1].port), timeout=0.5)
    checker, follower = denying_checker(store)
    try:
        async with store.subscribe() as sub:  # the dead seed first, then the live one
            gen = await platform.seed(store, PEPPER, keys=(platform.ADMIN,))
            event = await asyncio.wait_for(anext(aiter(sub)), 5)
            assert event.gen == gen
        await follower.reload(reason="start")
        assert await _statuses(checker, [platform.ADMIN]) == [200]  # a bucket check on the cluster
    finally:
        await store.close()


async def test_a_cluster_none_of_whose_seeds_answers_names_them_all() -> None:
    """redis-py's error names the last seed it tried; the store's names every seed, and never the password."""
    dead = [free_port(), free_port()]
    store = RedisStore(_url(*dead), timeout=0.5)
    try:
        with pytest.raises(StoreError) as caught:
            await store.generation()
        with pytest.raises(StoreError) as subscribing:
            async with store.subscribe():
                pass
    finally:
        await store.close()
    for error in (caught.value, subscribing.value):
        assert all(f"127.0.0.1:{port}" in str(error) for port in dead), error
        assert PASSWORD not in str(error)


async def test_authz_starts_and_answers_while_the_first_seed_is_down(cluster: RedisCluster, log_dir: Path) -> None:
    dead = free_port()
    url = _url(dead, cluster.nodes[1].port)
    seeder = RedisStore(url, timeout=2.0)
    try:
        await platform.seed(seeder, PEPPER, keys=(platform.ADMIN,))
        json_logs = ["--log-format", "json"]  # the effective settings are logged
        with authz_process(redis_url=url, pepper=PEPPER, log_dir=log_dir, args=json_logs) as authz:
            headers = {"Authorization": f"APIKEY {platform.ADMIN.plaintext}"}
            async with aiohttp.ClientSession() as http, http.get(authz.url + PATH, headers=headers) as resp:
                assert resp.status == 200  # with --on-store-error deny: the key's bucket was checked in the cluster
            # and it follows the change events: a revoked key is refused
            await seeder.apply([contract.delete(RecordKind.KEY, contract.digest_key(platform.ADMIN.plaintext, PEPPER))])
            async with aiohttp.ClientSession() as http:
                deadline = time.monotonic() + 10
                while True:
                    async with http.get(authz.url + PATH, headers=headers) as resp:
                        if resp.status == 401:
                            break
                    assert time.monotonic() < deadline, "the revocation never reached authz"
                    await asyncio.sleep(0.05)
            log = authz.proc.log()
    finally:
        await seeder.close()
    assert f"redis+cluster://***@127.0.0.1:{dead},127.0.0.1:{cluster.nodes[1].port}/0" in log, log
    assert PASSWORD not in log, log


def test_authz_whose_seeds_are_all_down_is_not_ready_and_says_where_it_looked(log_dir: Path) -> None:
    dead = [free_port(), free_port()]
    with authz_process(redis_url=_url(*dead), pepper=PEPPER, log_dir=log_dir, wait_ready=False) as authz:
        deadline = time.monotonic() + 10
        while "change events unavailable" not in authz.proc.log():
            assert time.monotonic() < deadline, authz.proc.log()
            time.sleep(0.05)
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(authz.ops_url + "/readyz", timeout=5)
        caught.value.close()
        assert caught.value.code == 503
        log = authz.proc.log()
    (line,) = [line for line in log.splitlines() if "change events unavailable" in line][:1]
    assert all(f"127.0.0.1:{port}" in line for port in dead), line
    assert PASSWORD not in log, log
