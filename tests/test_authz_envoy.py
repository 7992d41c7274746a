"""``maas authz`` behind a real Envoy configured as Istio's envoyExtAuthzHttp provider, with real Redis."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from controlplane import envoy
from gateway.identity import H_KEY_ID, H_MODEL, H_SIGNATURE, H_TIER, H_USER, verify
from gateway.store.redis import RedisStore
from tests.conftest import PEPPER
from tests.support import platform
from tests.support.k8s_emulator import eventually
from tests.support.procs import RedisServer, redis_server
from tests.support.stack import IDENTITY_SECRET, Envoy, authz_process, echo_process, envoy_process

pytestmark = [pytest.mark.redis, pytest.mark.envoy]

PREFIX = "/ext-authz"
GRANITE_HOST = "granite.maas.local"


@pytest.fixture(scope="module")
def stack(redis_session: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Envoy]:
    log_dir = tmp_path_factory.mktemp("envoy-stack")
    # a host-named route beside the path-prefixed ones for any host
    platform.seed_afresh(redis_session.url, PEPPER, hosts={GRANITE_HOST: platform.GRANITE})
    with (
        authz_process(
            redis_url=redis_session.url, pepper=PEPPER, log_dir=log_dir, args=["--path-prefix", PREFIX]
        ) as authz,
        echo_process(log_dir=log_dir) as echo_port,
    ):
        clusters = [envoy.Cluster("echo", echo_port)]
        routes = [
            envoy.Route("/", "echo", hosts=(GRANITE_HOST,)),
            envoy.Route("/qwen3", "echo", rewrite="/"),
            envoy.Route("/granite", "echo", rewrite="/v1"),
            envoy.Route("/mistral", "echo", rewrite="/"),
            envoy.Route("/v1/models", "echo"),
            envoy.Route("/healthz", "echo", checked=False),
            envoy.Route("/", "echo"),
        ]
        with envoy_process(
            routes=routes, clusters=clusters, authz_port=authz.port, log_dir=log_dir, path_prefix=PREFIX
        ) as proxy:
            yield proxy
        assert "Traceback" not in authz.proc.log(), authz.proc.log()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


async def _call(
    http: aiohttp.ClientSession, stack: Envoy, path: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], Any]:
    async with http.post(stack.url + path, headers=headers or {}, json={"model": "x"}) as resp:
        text = await resp.text()
        body: Any = None
        if text and resp.content_type == "application/json":
            body = await resp.json()
        return resp.status, {k.lower(): v for k, v in resp.headers.items()}, body


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({"Authorization": f"APIKEY {platform.ADMIN.plaintext}"}, id="apikey"),
        pytest.param({"Authorization": f"Bearer {platform.ADMIN.plaintext}"}, id="bearer"),
        pytest.param({"x-api-key": platform.ADMIN.plaintext}, id="x-api-key"),
    ],
)
async def test_valid_key_reaches_upstream_with_identity_and_without_key(
    stack: Envoy, http: aiohttp.ClientSession, headers: dict[str, str]
) -> None:
    status, resp_headers, body = await _call(http, stack, "/qwen3/v1/chat/completions", headers)
    assert status == 200, body
    upstream = body["headers"]
    assert body["path"] == "/v1/chat/completions"
    assert "authorization" not in upstream and "x-api-key" not in upstream
    assert upstream[H_USER] == "admin"
    assert upstream[H_TIER] == "enterprise"
    assert upstream[H_MODEL] == platform.QWEN
    assert upstream[H_KEY_ID] == platform.ADMIN.key_id(PEPPER)
    assert upstream[H_SIGNATURE].startswith("v1=")
    identity = verify(upstream, IDENTITY_SECRET.encode())
    assert identity.token_limit == 100_000
    assert "x-ratelimit-remaining-requests" in resp_headers


async def test_missing_key_is_401_at_once_with_challenge(stack: Envoy, http: aiohttp.ClientSession) -> None:
    status, headers, body = await asyncio.wait_for(_call(http, stack, "/qwen3/v1/chat/completions"), 5)
    assert status == 401
    assert headers["www-authenticate"] == 'APIKEY realm="maas"'
    assert body["error"]["code"] == "missing_api_key"
    assert body["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("key", "code"),
    [
        pytest.param("sk-not-a-key", "invalid_api_key", id="wrong"),
        pytest.param(platform.REVOKED.plaintext, "invalid_api_key", id="revoked"),
        pytest.param(platform.DISABLED.plaintext, "invalid_api_key", id="disabled"),
        pytest.param(platform.EXPIRED.plaintext, "expired_api_key", id="expired"),
    ],
)
async def test_bad_keys_get_401(stack: Envoy, http: aiohttp.ClientSession, key: str, code: str) -> None:
    status, headers, body = await _call(http, stack, "/qwen3/v1/chat/completions", {"Authorization": f"APIKEY {key}"})
    assert status == 401
    assert body["error"]["code"] == code
    assert "www-authenticate" in headers


async def test_model_outside_allow_list_is_403(stack: Envoy, http: aiohttp.ClientSession) -> None:
    auth = {"Authorization": f"Bearer {platform.GRANITE_ONLY.plaintext}"}
    status, _, body = await _call(http, stack, "/qwen3/v1/chat/completions", auth)
    assert status == 403
    assert body["error"]["code"] == "model_not_allowed"
    status, _, body = await _call(http, stack, "/granite/chat/completions", auth)
    assert status == 200
    assert body["path"] == "/v1/chat/completions"


async def test_sixth_free_request_in_two_minutes_is_429(stack: Envoy, http: aiohttp.ClientSession) -> None:
    auth = {"Authorization": f"APIKEY {platform.FREE.plaintext}"}
    statuses = []
    for _ in range(5):
        status, headers, _ = await _call(http, stack, "/qwen3/v1/chat/completions", auth)
        statuses.append(status)
    assert statuses == [200] * 5
    assert headers["x-ratelimit-remaining-requests"] == "0"
    status, headers, body = await _call(http, stack, "/qwen3/v1/chat/completions", auth)
    assert status == 429
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["x-ratelimit-limit-requests"] == "5"
    assert 1 <= int(headers["retry-after"]) <= 24
    assert body["error"]["type"] == "requests"
    assert body["error"]["code"] == "rate_limit_exceeded"


async def test_not_ready_model_is_503(stack: Envoy, http: aiohttp.ClientSession) -> None:
    status, _, _ = await _call(
        http, stack, "/mistral/v1/completions", {"Authorization": f"APIKEY {platform.ADMIN.plaintext}"}
    )
    assert status == 503


async def test_unknown_path_is_404_json(stack: Envoy, http: aiohttp.ClientSession) -> None:
    status, _, body = await _call(http, stack, "/nope/v1/chat", {"Authorization": f"APIKEY {platform.ADMIN.plaintext}"})
    assert status == 404
    assert body["error"]["code"] == "route_not_found"


async def test_model_less_route_needs_only_a_key(stack: Envoy, http: aiohttp.ClientSession) -> None:
    status, _, body = await _call(http, stack, "/v1/models", {"Authorization": f"APIKEY {platform.PREMIUM.plaintext}"})
    assert status == 200
    assert body["headers"][H_USER] == "bob"
    assert body["headers"][H_MODEL] == ""


async def test_health_path_is_not_checked(stack: Envoy, http: aiohttp.ClientSession) -> None:
    async with http.get(stack.url + "/healthz") as resp:
        assert resp.status == 200


@pytest.mark.parametrize(
    "host",
    [
        pytest.param(GRANITE_HOST, id="named"),
        pytest.param(f"{GRANITE_HOST}.", id="trailing-dot"),
        pytest.param(f"{GRANITE_HOST}:80", id="port"),
        pytest.param(f"{GRANITE_HOST.upper()}.:80", id="dot-port-case"),
    ],
)
async def test_a_request_goes_where_the_check_admitted_it(stack: Envoy, http: aiohttp.ClientSession, host: str) -> None:
    """A key that may use only granite, at granite's named host, on a path that the routes for any host send to
    qwen3: the check and Envoy must pick the same route (a trailing dot or a port had the check take granite's
    route while Envoy sent the request on to qwen3)."""
    auth = {"Authorization": f"APIKEY {platform.GRANITE_ONLY.plaintext}", "Host": host}
    status, _, body = await _call(http, stack, "/qwen3/v1/chat/completions", auth)
    if status == 200:  # admitted for granite's host: it must have been routed there (no rewrite: the path as sent)
        assert body["path"] == "/qwen3/v1/chat/completions", body
        assert body["headers"][H_MODEL] == platform.GRANITE
    else:
        assert (status, body["error"]["code"]) == (403, "model_not_allowed")


async def test_a_check_port_at_its_connection_cap_is_a_503_through_envoy_and_serves_again_after(
    log_dir: Path, http: aiohttp.ClientSession
) -> None:
    """At the cap the check port answers a new connection 503 and closes it: Envoy answers ``statusOnError`` (503)
    for the request at once (a paused listener would leave Envoy's check waiting for its timeout), and once the
    connection holding the cap closes, Envoy's next connection is served. On a Redis of its own: the module's stack
    keeps the session's."""
    with redis_server() as redis:
        store = RedisStore(redis.url, timeout=2.0)
        await platform.seed(store, PEPPER)
        await store.close()
        with (
            authz_process(
                redis_url=redis.url, pepper=PEPPER, log_dir=log_dir, args=["--max-connections", "1"]
            ) as authz,
            echo_process(log_dir=log_dir) as echo_port,
            envoy_process(
                routes=[envoy.Route("/qwen3", "echo", rewrite="/")],
                clusters=[envoy.Cluster("echo", echo_port)],
                authz_port=authz.port,
                log_dir=log_dir,
            ) as proxy,
        ):
            headers = {"Authorization": f"APIKEY {platform.ADMIN.plaintext}"}
            reader, writer = await asyncio.open_connection("127.0.0.1", authz.port)  # holds the one connection
            writer.write(b"GET /qwen3/v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
            async with asyncio.timeout(5):
                assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 401")
            status, _, body = await _call(http, proxy, "/qwen3/v1/chat/completions", headers)
            assert (status, body) == (503, None)
            writer.close()
            await eventually(lambda: _served(http, proxy, headers))
        assert "Traceback" not in authz.proc.log(), authz.proc.log()


async def _served(http: aiohttp.ClientSession, proxy: Envoy, headers: dict[str, str]) -> bool:
    return (await _call(http, proxy, "/qwen3/v1/chat/completions", headers))[0] == 200
