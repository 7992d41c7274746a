"""The check port's HTTP layers (the httptools server and aiohttp's) answer the same, byte for byte where it matters:
keep-alive, pipelined requests in order, bounded headers, malformed HTTP."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.store.redis import RedisStore
from tests.conftest import PEPPER
from tests.support import platform
from tests.support.stack import Authz, authz_process

pytestmark = pytest.mark.redis

CHECK = "GET /qwen3/v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: APIKEY {key}\r\n\r\n"


@pytest.fixture(params=["fast", "aiohttp"])
async def authz(request: pytest.FixtureRequest, redis_url: str, log_dir: Path) -> AsyncIterator[Authz]:
    store = RedisStore(redis_url, timeout=2.0)
    await platform.seed(store, PEPPER)
    await store.close()
    with authz_process(
        redis_url=redis_url, pepper=PEPPER, log_dir=log_dir, args=["--http-server", request.param]
    ) as running:
        yield running
        assert "Traceback" not in running.proc.log()


async def _responses(port: int, payload: bytes, count: int) -> list[tuple[int, dict[str, str], bytes]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(payload)
    await writer.drain()
    out = []
    for _ in range(count):
        status_line = await asyncio.wait_for(reader.readline(), 5)
        headers: dict[str, str] = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        out.append((int(status_line.split()[1]), headers, body))
    writer.close()
    return out


async def test_pipelined_checks_are_answered_in_order(authz: Authz) -> None:
    keys = [platform.ADMIN.plaintext, "sk-wrong", platform.GRANITE_ONLY.plaintext, platform.BIG.plaintext]
    payload = "".join(CHECK.format(key=k) for k in keys).encode()
    answers = await _responses(authz.port, payload, len(keys))
    assert [a[0] for a in answers] == [200, 401, 403, 200]
    assert answers[0][1]["x-maas-user"] == "admin"
    assert answers[3][1]["x-maas-user"] == "gina"
    assert b"invalid_api_key" in answers[1][2]


async def test_header_names_are_read_in_any_spelling(authz: Authz) -> None:
    """Names are case-insensitive: the spellings clients use, Envoy's lowercase and anything else; the names Envoy
    adds that the check does not read change nothing."""
    admin, granite = platform.ADMIN.plaintext, platform.GRANITE_ONLY.plaintext
    checks = [
        f"GET /qwen3/v1/chat/completions HTTP/1.1\r\nhOsT: gw\r\naUtHoRiZaTiOn: APIKEY {admin}\r\n\r\n",
        f"GET /qwen3/v1/chat/completions HTTP/1.1\r\nhost: gw\r\nx-request-id: 1\r\nX-Api-Key: {granite}\r\n\r\n",
        f"GET /qwen3/v1/chat/completions HTTP/1.1\r\nHOST: gw\r\nx-forwarded-proto: http\r\nX-API-KEY: {admin}\r\n"
        f"x-API-key: {granite}\r\n\r\n",
    ]
    answers = await _responses(authz.port, "".join(checks).encode(), len(checks))
    assert [a[0] for a in answers] == [200, 403, 400]  # the last sends two different keys under one name
    assert answers[0][1]["x-maas-user"] == "admin"


async def test_connection_is_kept_alive(authz: Authz) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", authz.port)
    for _ in range(3):
        writer.write(CHECK.format(key=platform.ADMIN.plaintext).encode())
        await writer.drain()
        status = await asyncio.wait_for(reader.readline(), 5)
        assert status.startswith(b"HTTP/1.1 200")
        while (line := await reader.readline()) != b"\r\n":
            assert line
    writer.close()


@pytest.mark.parametrize(
    ("payload", "status"),
    [
        pytest.param(
            b"GET / HTTP/1.1\r\nHost: x\r\nx-junk: " + b"j" * 70000 + b"\r\n\r\n", {400, 431}, id="huge-header"
        ),
        pytest.param(b"NOT HTTP AT ALL\r\n\r\n", {400}, id="garbage"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello", {401}, id="body-ignored"),
        pytest.param(b"GET /qwen3 HTTP/1.0\r\nx-api-key: admin-key-12345\r\n\r\n", {200}, id="http-1.0"),
        pytest.param(
            b"GET /qwen3 HTTP/1.1\r\nhOsT: gw\r\naUtHoRiZaTiOn: APIKEY admin-key-12345\r\n\r\n", {200}, id="odd-case"
        ),
        pytest.param(
            b"GET /qwen3 HTTP/1.1\r\nHost: gw\r\nX-API-KEY: admin-key-12345\r\nx-api-key: other\r\n\r\n",
            {400},
            id="duplicate-in-two-spellings",
        ),
        pytest.param(
            b"GET /qwen3 HTTP/1.1\r\nHost: gw\r\n"
            + b"".join(b"x-envoy-extra-%d: %d\r\n" % (i, i) for i in range(40))
            + b"Authorization: APIKEY admin-key-12345\r\n\r\n",
            {200},
            id="many-other-headers",
        ),
    ],
)
async def test_odd_requests(authz: Authz, payload: bytes, status: set[int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", authz.port)
    writer.write(payload)
    await writer.drain()
    line = await asyncio.wait_for(reader.readline(), 5)
    writer.close()
    assert int(line.split()[1]) in status


@pytest.mark.parametrize(
    ("payload", "status", "code"),
    [
        pytest.param(
            b"GET / HTTP/1.1\r\nHost: x\r\nx-junk: " + b"j" * 70000 + b"\r\n\r\n",
            431,
            "request_header_too_large",
            id="huge-header",
        ),
        pytest.param(
            b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"x-h%d: v\r\n" % i for i in range(6000)) + b"\r\n",
            431,
            "request_header_too_large",
            id="too-many-headers",
        ),
        pytest.param(b"NOT HTTP AT ALL\r\n\r\n", 400, "bad_request", id="garbage"),
        pytest.param(b"GET / HTTP/9.9\r\nHost: x\r\n\r\n", 400, "bad_request", id="bad-version"),
        *(
            pytest.param(
                b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: %s\r\n\r\n3\r\nabc\r\n0\r\n\r\n" % coding
                + CHECK.format(key=platform.ADMIN.plaintext).encode(),
                400,
                "bad_request",
                id=name,
            )
            for name, coding in (
                ("te-identity-chunked", b"identity, chunked"),
                ("te-gzip-chunked", b"gzip, chunked"),
                ("te-empty-item", b",chunked"),
            )
        ),
    ],
)
async def test_malformed_requests_get_the_openai_envelope_from_either_server(
    authz: Authz, payload: bytes, status: int, code: str
) -> None:
    """aiohttp's own answers were plain text (some echoing the request line), and a header over the limit a 400."""
    reader, writer = await asyncio.open_connection("127.0.0.1", authz.port)
    writer.write(payload)
    await writer.drain()
    status_line = await asyncio.wait_for(reader.readline(), 5)
    headers: dict[str, str] = {}
    while (line := await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    writer.close()
    assert int(status_line.split()[1]) == status
    assert headers["content-type"].startswith("application/json")
    assert json.loads(body)["error"]["code"] == code
