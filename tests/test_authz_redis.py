"""``maas authz`` processes against real redis-server: exactness across processes, revocation, outages, bad input."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import pytest

from gateway import contract, identity
from gateway.contract import Limit, Limits, RecordKind
from gateway.store.redis import RedisStore
from tests.conftest import PEPPER
from tests.support import platform
from tests.support.procs import free_port, maas_argv, redis_server, start, wait_http
from tests.support.stack import IDENTITY_SECRET, Authz, authz_process
from tests.support.tools import check_metrics, promtool

pytestmark = pytest.mark.redis

PATH = "/qwen3/v1/chat/completions"


async def _status(http: aiohttp.ClientSession, authz: Authz, key: str, path: str = PATH) -> int:
    async with http.get(authz.url + path, headers={"Authorization": f"APIKEY {key}"}) as resp:
        await resp.read()
        return resp.status


async def _seed(url: str, *keys: platform.Key) -> RedisStore:
    store = RedisStore(url, timeout=2.0)
    await platform.seed(store, PEPPER, keys=keys or platform.ALL_KEYS)
    return store


async def test_several_processes_admit_exactly_the_limit(redis_url: str, log_dir: Path) -> None:
    key = platform.Key("sk-shared-limit", "shared", limits=Limits(requests=Limit(limit=37, window="1h")))
    store = await _seed(redis_url, key)
    with (
        authz_process(redis_url=redis_url, pepper=PEPPER, log_dir=log_dir, name="a1") as a1,
        authz_process(redis_url=redis_url, pepper=PEPPER, log_dir=log_dir, name="a2") as a2,
        authz_process(redis_url=redis_url, pepper=PEPPER, log_dir=log_dir, name="a3") as a3,
    ):
        connector = aiohttp.TCPConnector(limit=300)
        async with aiohttp.ClientSession(connector=connector) as http:
            targets = [a1, a2, a3] * 100
            statuses = await asyncio.gather(*(_status(http, t, key.plaintext) for t in targets))
    assert statuses.count(200) == 37
    assert statuses.count(429) == 300 - 37
    await store.close()


async def test_a_busy_key_spends_credits_and_a_stopping_replica_gives_them_back(redis_url: str, log_dir: Path) -> None:
    """Request credits in the real process: a key's requests one after another mostly skip Redis, and at SIGTERM the
    tokens taken ahead go back to the bucket (it holds exactly the limit less what was admitted)."""
    key = platform.Key("sk-credits-e2e", "busy", limits=Limits(requests=Limit(limit=500, window="1000h")))
    store = await _seed(redis_url, key)
    bucket = contract.bucket_key(key.key_id(PEPPER), "requests")
    with authz_process(redis_url=redis_url, pepper=PEPPER, log_dir=log_dir) as authz:
        async with aiohttp.ClientSession() as http:
            statuses = [await _status(http, authz, key.plaintext) for _ in range(40)]
            async with http.get(authz.ops_url + "/metrics") as resp:
                text = await resp.text()
        assert statuses == [200] * 40
        used = float(text.split('maas_authz_request_credits_total{outcome="used"} ')[1].split()[0])
        assert used >= 20, text  # most of them answered with no Redis call
        raw = await store._client.get(bucket)
        taken_ahead = 500 - 40 - int(float(raw.split()[0]))
        assert 0 < taken_ahead <= 5  # a hundredth of the limit at most
        assert authz.proc.stop() == 0  # SIGTERM
    raw = await store._client.get(bucket)
    assert int(float(raw.split()[0])) == 500 - 40  # the credits held went back; only what was admitted is spent
    await store.close()


async def test_revoked_key_is_denied_within_a_second(redis_url: str, log_dir: Path) -> None:
    store = await _seed(redis_url)
    with authz_process(redis_url=redis_url, pepper=PEPPER, log_dir=log_dir) as authz:
        async with aiohttp.ClientSession() as http:
            assert await _status(http, authz, platform.BIG.plaintext) == 200
            digest = contract.digest_key(platform.BIG.plaintext, PEPPER)
            await store.apply([contract.delete(RecordKind.KEY, digest)])
            revoked_at = time.monotonic()
            while await _status(http, authz, platform.BIG.plaintext) == 200:
                assert time.monotonic() - revoked_at < 1.0, "revocation took longer than a second"
                await asyncio.sleep(0.01)
            # and a tier change applies to the very next requests
            free = contract.DEFAULT_TIERS[0].model_copy(update={"limits": Limits(requests=Limit(limit=0, window="1m"))})
            await store.apply([contract.put(free)])
            changed_at = time.monotonic()
            while await _status(http, authz, platform.FREE.plaintext) != 429:
                assert time.monotonic() - changed_at < 1.0
                await asyncio.sleep(0.01)
    await store.close()


@pytest.mark.parametrize(
    ("policy", "during"),
    [
        pytest.param("deny", {503}, id="deny"),
        pytest.param("allow", {200}, id="allow"),
        pytest.param("local", {200, 429}, id="local"),
    ],
)
async def test_redis_outage_follows_policy_and_recovers(policy: str, during: set[int], log_dir: Path) -> None:
    port = free_port()
    with redis_server(port=port) as server:
        store = await _seed(server.url)
        await store.close()
        authz_cm = authz_process(
            redis_url=server.url, pepper=PEPPER, log_dir=log_dir, args=["--on-store-error", policy]
        )
        authz = authz_cm.__enter__()
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
                assert await _status(http, authz, platform.ADMIN.plaintext) == 200
                async with http.get(authz.ops_url + "/metrics") as resp:
                    before = await resp.text()  # the series alerts wait for are there, at 0, before any error
                assert f'maas_authz_store_policy_total{{policy="{policy}"}} 0.0' in before
                assert 'maas_store_errors_total{code="store_timeout",operation="buckets"} 0.0' in before
                server.kill()
                started = time.monotonic()
                statuses = [await _status(http, authz, platform.ADMIN.plaintext) for _ in range(20)]
                assert time.monotonic() - started < 5.0  # no hang: at most the store timeout per check
                assert set(statuses) <= during, statuses
                if policy == "allow":  # admitted without limits: no bucket state to tell, no made-up headers
                    headers = {"Authorization": f"APIKEY {platform.ADMIN.plaintext}"}
                    async with http.get(authz.url + PATH, headers=headers) as resp:
                        assert resp.status == 200
                        assert not [h for h in resp.headers if h.lower().startswith("x-ratelimit")], resp.headers
                # key checks keep working from the snapshot
                assert await _status(http, authz, "sk-unknown") == 401
                assert await _status(http, authz, platform.REVOKED.plaintext) == 401
                async with http.get(authz.ops_url + "/metrics") as resp:
                    text = await resp.text()
                assert "maas_store_up 0.0" in text
                with redis_server(port=port) as again:
                    reseeded = await _seed(again.url)
                    key = platform.Key("sk-after-outage", "late", limits=Limits(requests=Limit(limit=1, window="1h")))
                    await reseeded.apply([contract.put(key.record(PEPPER))])
                    bucket = contract.bucket_key(key.key_id(PEPPER), "requests")
                    deadline = time.monotonic() + 10
                    # the snapshot reloads after the reconnect, then checks go back to Redis's buckets
                    while not await reseeded._client.exists(bucket):
                        assert time.monotonic() < deadline, "authz did not recover after Redis returned"
                        await _status(http, authz, key.plaintext)
                        await asyncio.sleep(0.05)
                    assert await _status(http, authz, key.plaintext) == 429
                    await reseeded.close()
        finally:
            authz_cm.__exit__(None, None, None)


async def _raw(port: int, request: bytes) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    line = await asyncio.wait_for(reader.readline(), 5)
    writer.close()
    return int(line.split()[1])


@pytest.mark.parametrize(
    "request_bytes",
    [
        pytest.param(
            b"GET /qwen3 HTTP/1.1\r\nHost: x\r\nAuthorization: APIKEY " + b"a" * 65536 + b"\r\n\r\n", id="64k"
        ),
        pytest.param(
            b"GET /qwen3 HTTP/1.1\r\nHost: x\r\nAuthorization: APIKEY \xff\xfe\xe2\x82\r\n\r\n", id="non-ascii"
        ),
        pytest.param(b"GET /qwen3 HTTP/1.1\r\nHost: x\r\nAuthorization: APIKEY\r\n\r\n", id="garbled"),
        pytest.param(b"GET /qwen3 HTTP/1.1\r\nHost: \xc3\xa9vil\r\nx-api-key: k\r\n\r\n", id="odd-host"),
        pytest.param(b"GET /\xff\xfe HTTP/1.1\r\nHost: x\r\nx-api-key: admin-key-12345\r\n\r\n", id="odd-path"),
        pytest.param(b"GARBAGE\r\n\r\n", id="not-http"),
    ],
)
async def test_bad_input_gets_a_4xx(redis_url: str, log_dir: Path, request_bytes: bytes) -> None:
    store = await _seed(redis_url)
    with authz_process(redis_url=redis_url, pepper=PEPPER, log_dir=log_dir) as authz:
        status = await _raw(authz.port, request_bytes)
        assert 400 <= status < 500
        assert "Traceback" not in authz.proc.log()
    await store.close()


async def test_metrics_pass_promtool(redis_url: str, log_dir: Path) -> None:
    promtool()
    store = await _seed(redis_url)
    with authz_process(redis_url=redis_url, pepper=PEPPER, log_dir=log_dir, args=["--metrics-max-keys", "2"]) as authz:
        async with aiohttp.ClientSession() as http:
            for key in platform.ALL_KEYS:
                await _status(http, authz, key.plaintext)
            await _status(http, authz, "nope")
            async with http.get(authz.ops_url + "/metrics") as resp:
                text = await resp.text()
    await check_metrics(text.encode())
    assert 'key_id="_other"' in text
    key_series = {
        line.split("key_id=")[1].split(",")[0]
        for line in text.splitlines()
        if line.startswith("maas_key_requests_total{")
    }
    assert len(key_series) == 3  # two keys of their own, the rest in _other
    await store.close()


async def test_secrets_given_only_as_files_admit_a_key(
    redis_url: str, log_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The shipped manifests mount the pepper and the identity secret as files: with neither a variable nor a flag
    (so neither shows in /proc/PID/environ or the command line), a key digested with that pepper is admitted and
    the identity headers are signed with that secret."""
    monkeypatch.delenv("MAAS_KEY_PEPPER", raising=False)
    monkeypatch.delenv("MAAS_IDENTITY_SECRET", raising=False)
    pepper, secret = tmp_path / "key-pepper", tmp_path / "identity-secret"
    pepper.write_text(PEPPER.decode() + "\n")
    secret.write_text(IDENTITY_SECRET)
    store = await _seed(redis_url, platform.BIG)
    port, ops_port = free_port(), free_port()
    argv = maas_argv(
        "authz", "--redis-url", redis_url, "--host", "127.0.0.1", "--port", str(port), "--ops-port", str(ops_port)
    )
    env = {"MAAS_KEY_PEPPER_FILE": str(pepper), "MAAS_IDENTITY_SECRET_FILE": str(secret), "MAAS_LOG_FORMAT": "text"}
    proc = start("authz-files", argv, env=env, log_dir=log_dir)
    try:
        wait_http(f"http://127.0.0.1:{ops_port}/readyz", proc=proc.popen)
        authz = Authz(proc=proc, port=port, ops_port=ops_port)
        async with aiohttp.ClientSession() as http:
            async with http.get(
                authz.url + PATH, headers={"Authorization": f"APIKEY {platform.BIG.plaintext}"}
            ) as resp:
                assert resp.status == 200
                assert identity.verify(resp.headers, IDENTITY_SECRET.encode()).user == platform.BIG.user
            assert await _status(http, authz, "sk-not-a-key-0001") == 401
    finally:
        proc.stop()
        await store.close()
