"""The admin API against a control plane over a manifest directory and a real Redis: keys, tiers, quota, usage,
auth, documented 4xx, and no plaintext key anywhere but the create and rotate responses."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import os
from pathlib import Path
from typing import Any

import multidict
import pytest
import redis as sync_redis

from controlplane.admin.auth import Principal, Role, TokenBook
from controlplane.admin.context import duration_seconds
from controlplane.admin.errors import InvalidDuration
from gateway.contract import ledger_day
from gateway.limits import BucketOp
from gateway.store.base import UsageDelta
from tests.support.admin_api import ADMIN_TOKEN, READER_TOKEN, TOKEN_FILE, admin_settings, running
from tests.support.k8s_emulator import eventually

pytestmark = pytest.mark.redis


def _read_dir(path: Path) -> str:
    return " ".join(p.read_text() for p in path.iterdir() if p.is_file())


def _write(path: Path, text: str) -> None:
    path.write_text(text)


async def test_key_lifecycle_and_no_plaintext_anywhere(
    tmp_path: Path, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with running(admin_settings(tmp_path, redis_url)) as (plane, api):
        status, created = await api.call(
            "POST",
            "/admin/v1/keys",
            json={
                "user": "alice",
                "name": "ci",
                "tier": "premium",
                "models": ["qwen3"],
                "expires_in": "30d",
                "limits": {"requests": 7, "window": "1m"},
            },
        )
        assert status == 201, created
        plaintext, key_id = created["key"], created["key_id"]
        assert plaintext.startswith("sk-maas-") and len(plaintext) == len("sk-maas-") + 43
        assert created["synced"] is True and created["status"] == "active" and created["source"] == "admin"
        assert created["limits"]["requests"] == {"limit": 7, "window": "1m"}
        seen: list[str] = []
        status, shown = await api.call("GET", f"/admin/v1/keys/{key_id}")
        assert status == 200 and shown["tier"] == "premium" and "key" not in shown
        seen.append(str(shown))
        status, patched = await api.call("PATCH", f"/admin/v1/keys/{key_id}", json={"tier": "free", "disabled": True})
        assert status == 200 and patched["tier"] == "free" and patched["status"] == "disabled"
        seen.append(str(patched))
        status, listed = await api.call("GET", "/admin/v1/keys?user=alice")
        assert [k["key_id"] for k in listed["data"]] == [key_id]
        seen.append(str(listed))
        status, rotated = await api.call("PATCH", f"/admin/v1/keys/{key_id}", json={"disabled": False})
        status, rotated = await api.call("POST", f"/admin/v1/keys/{key_id}/rotate", json={"grace_period": "1h"})
        assert status == 200 and rotated["key"] != plaintext and rotated["old"]["key_id"] == key_id
        status, revoked = await api.call("DELETE", f"/admin/v1/keys/{key_id}")
        assert status == 200 and revoked["status"] == "revoked"
        seen.append(str(revoked))
        status, again = await api.call("PATCH", f"/admin/v1/keys/{key_id}", json={"tier": "free"})
        assert status == 409 and again["error"]["code"] == "key_revoked"
        status, quota = await api.call("GET", f"/admin/v1/keys/{rotated['key_id']}/quota")
        seen.append(str(quota))
        on_disk = _read_dir(Path(plane.settings.directory or ""))
    client = sync_redis.Redis.from_url(redis_url)
    values: list[bytes] = []
    for name in client.scan_iter(count=1000):
        kind = client.type(name)
        if kind == b"string":
            values.append(client.get(name) or b"")
        elif kind == b"hash":
            values += [k + v for k, v in client.hgetall(name).items()]
        elif kind == b"set":
            values += list(client.smembers(name))
    client.close()
    for secret in (plaintext, rotated["key"]):
        assert values and all(secret.encode() not in v for v in values)
        assert secret not in caplog.text
        assert secret not in on_disk
        assert all(secret not in s for s in seen)
    assert "key.create by ops" in caplog.text and f"key_id={key_id}" in caplog.text


async def test_kuadrant_keys_are_listed_read_only(tmp_path: Path, redis_url: str) -> None:
    async with running(admin_settings(tmp_path, redis_url)) as (_, api):
        status, page = await api.call("GET", "/admin/v1/keys")
        assert status == 200
        sources = {k["source"] for k in page["data"]}
        assert "secret:llm/admin-key" in sources and all(k["read_only"] for k in page["data"])
        key_id = page["data"][0]["key_id"]
        for method, path, body in (
            ("PATCH", f"/admin/v1/keys/{key_id}", {"tier": "free"}),
            ("DELETE", f"/admin/v1/keys/{key_id}", None),
            ("POST", f"/admin/v1/keys/{key_id}/rotate", {}),
        ):
            status, error = await api.call(method, path, json=body)
            assert (status, error["error"]["code"]) == (409, "read_only_key")


async def test_pagination_walks_every_key_once(tmp_path: Path, redis_url: str) -> None:
    async with running(admin_settings(tmp_path, redis_url)) as (_, api):
        for i in range(7):
            status, _ = await api.call("POST", "/admin/v1/keys", json={"user": f"u{i % 2}"})
            assert status == 201
        ids: list[str] = []
        cursor = ""
        while True:
            status, page = await api.call("GET", f"/admin/v1/keys?limit=3{cursor}")
            assert status == 200 and len(page["data"]) <= 3
            ids += [k["key_id"] for k in page["data"]]
            if not page["has_more"]:
                break
            cursor = f"&cursor={page['next_cursor']}"
        assert len(ids) == 10 and ids == sorted(set(ids))
        status, page = await api.call("GET", "/admin/v1/keys?user=u0&status=active&tier=free")
        assert len(page["data"]) == 4


async def test_list_filters_combine(tmp_path: Path, redis_url: str) -> None:
    """Every filter applies, not only the most selective one (that one's list is walked, the others looked up)."""
    async with running(admin_settings(tmp_path, redis_url)) as (_, api):
        made = {}
        for user, tier in [("alice", "free"), ("alice", "free"), ("alice", "premium"), ("bob", "premium")]:
            status, key = await api.call("POST", "/admin/v1/keys", json={"user": user, "tier": tier})
            assert status == 201
            made.setdefault((user, tier), []).append(key["key_id"])
        status, _ = await api.call("DELETE", f"/admin/v1/keys/{made['bob', 'premium'][0]}")
        assert status == 200

        async def listed(query: str) -> list[str]:
            status, page = await api.call("GET", f"/admin/v1/keys?{query}")
            assert status == 200, page
            return sorted(k["key_id"] for k in page["data"])

        assert await listed("user=alice&status=revoked") == []
        assert await listed("user=bob&status=active") == []
        assert await listed("user=alice&tier=premium") == made["alice", "premium"]
        assert await listed("user=alice&tier=free&status=active") == sorted(made["alice", "free"])
        assert await listed("tier=premium&status=revoked") == made["bob", "premium"]
        # an empty parameter filters nothing, as in usage reports (user= had listed no key)
        assert await listed("user=&tier=&status=&limit=&cursor=") == await listed("") != []


@pytest.mark.parametrize(
    ("method", "path", "body", "token", "status", "code"),
    [
        pytest.param("GET", "/admin/v1/keys", None, "", 401, "missing_admin_token", id="no-token"),
        pytest.param("GET", "/admin/v1/keys", None, "wrong-token-0123456789", 401, "invalid_admin_token", id="wrong"),
        pytest.param("POST", "/admin/v1/keys", {"user": "a"}, READER_TOKEN, 403, "read_only_token", id="read-only"),
        pytest.param(
            "POST",
            "/admin/v1/keys",
            {"user": "a", "colour": 1},
            ADMIN_TOKEN,
            400,
            "invalid_request",
            id="unknown-field",
        ),
        pytest.param(
            "POST",
            "/admin/v1/keys",
            {"user": "a", "expires_in": "30 years"},
            ADMIN_TOKEN,
            400,
            "invalid_duration",
            id="bad-duration",
        ),
        pytest.param(
            "POST",
            "/admin/v1/keys",
            {"user": "a", "limits": {"requests": 1, "window": "0s"}},
            ADMIN_TOKEN,
            400,
            "invalid_duration",
            id="bad-window",
        ),
        pytest.param(
            "POST", "/admin/v1/keys", {"user": "a", "tier": "gold"}, ADMIN_TOKEN, 400, "unknown_tier", id="unknown-tier"
        ),
        pytest.param("GET", "/admin/v1/keys?limit=100000", None, ADMIN_TOKEN, 400, "page_too_large", id="huge-page"),
        pytest.param("GET", "/admin/v1/keys?cursor=%%%", None, ADMIN_TOKEN, 400, "invalid_cursor", id="bad-cursor"),
        pytest.param("GET", "/admin/v1/keys/nope", None, READER_TOKEN, 404, "key_not_found", id="no-such-key"),
        pytest.param(
            "PUT",
            "/admin/v1/tiers/x",
            {"limits": {"requests": {"limit": 1, "window": "1y"}}},
            ADMIN_TOKEN,
            400,
            "invalid_duration",
            id="tier-bad-window",
        ),
        pytest.param("DELETE", "/admin/v1/tiers/free", None, ADMIN_TOKEN, 409, "tier_in_use", id="tier-in-use"),
        pytest.param(
            "PUT", "/admin/v1/tiers/x", {"level": 1}, ADMIN_TOKEN, 400, "invalid_request", id="tier-without-limits"
        ),
        pytest.param(
            "GET",
            "/admin/v1/usage?from=2020-01-01&to=2022-01-01",
            None,
            ADMIN_TOKEN,
            400,
            "invalid_request",
            id="usage-range",
        ),
        pytest.param("GET", "/admin/v1/nothing", None, ADMIN_TOKEN, 404, "not_found", id="unknown-path"),
        pytest.param("PUT", "/admin/v1/keys", {}, ADMIN_TOKEN, 405, "method_not_allowed", id="bad-method"),
    ],
)
async def test_documented_errors(
    tmp_path: Path, redis_url: str, method: str, path: str, body: object, token: str, status: int, code: str
) -> None:
    async with running(admin_settings(tmp_path, redis_url)) as (_, api):
        headers = {"Authorization": f"Bearer {token}"} if token else {"X-Nothing": "1"}
        got, error = await api.call(method, path, json=body, headers=headers)
        assert (got, error["error"]["code"]) == (status, code), error
        assert set(error["error"]) == {"message", "type", "param", "code"}


async def test_values_are_read_as_documented_and_never_converted(tmp_path: Path, redis_url: str) -> None:
    """Strings were taken for numbers and booleans, epoch numbers and dates for times, non-ASCII digits and spaces
    in durations (a tier stored "5 m", which Kuadrant cannot read); a PATCH took an expiry in the past."""
    async with running(admin_settings(tmp_path, redis_url)) as (_, api):
        status, key = await api.call(
            "POST", "/admin/v1/keys", json={"user": "t", "expires_at": "2030-01-01T00:00:00+02:00"}
        )
        assert status == 201 and key["expires_at"] == "2029-12-31T22:00:00Z", key
        path = f"/admin/v1/keys/{key['key_id']}"
        cases = [
            (
                "POST",
                "/admin/v1/keys",
                {"user": "a", "limits": {"requests": "5"}},
                "invalid_request",
                "limits.requests",
            ),
            ("POST", "/admin/v1/keys", {"user": "a", "limits": {"tokens": 5.0}}, "invalid_request", "limits.tokens"),
            ("POST", "/admin/v1/keys", {"user": 7}, "invalid_request", "user"),
            ("POST", "/admin/v1/keys", {"user": "a", "expires_at": 1900000000}, "invalid_request", "expires_at"),
            ("POST", "/admin/v1/keys", {"user": "a", "expires_at": "2030-01-01"}, "invalid_request", "expires_at"),
            (
                "POST",
                "/admin/v1/keys",
                {"user": "a", "expires_at": "2030-01-01T00:00:00"},
                "invalid_request",
                "expires_at",
            ),
            ("POST", "/admin/v1/keys", {"user": "a", "expires_in": "\uff11h"}, "invalid_duration", "expires_in"),
            ("POST", "/admin/v1/keys", {"user": "a", "expires_in": "1 h"}, "invalid_duration", "expires_in"),
            (
                "POST",
                "/admin/v1/keys",
                {"user": "a", "limits": {"requests": 1, "window": "5 m"}},
                "invalid_duration",
                "limits.window",
            ),
            ("PATCH", path, {"disabled": "yes"}, "invalid_request", "disabled"),
            ("PATCH", path, {"disabled": 1}, "invalid_request", "disabled"),
            ("PATCH", path, {"expires_at": "2001-01-01T00:00:00Z"}, "invalid_request", "expires_at"),
            ("POST", f"{path}/rotate", {"grace_period": " 0 s"}, "invalid_duration", "grace_period"),
            ("PUT", "/admin/v1/tiers/t", {"level": "3", "limits": {}}, "invalid_request", "level"),
            (
                "PUT",
                "/admin/v1/tiers/t",
                {"limits": {"requests": {"limit": 5, "window": "5 m"}}},
                "invalid_duration",
                "limits.requests.window",
            ),
            (
                "PUT",
                "/admin/v1/tiers/t",
                {"limits": {"tokens": {"limit": 5, "window": "\u0665m"}}},
                "invalid_duration",
                "limits.tokens.window",
            ),
        ]
        for method, where, body, code, param in cases:
            status, error = await api.call(method, where, json=body)
            assert (status, error["error"]["code"], error["error"]["param"]) == (400, code, param), (body, error)
        status, now = await api.call("GET", path)
        assert (now["status"], now["expires_at"]) == ("active", "2029-12-31T22:00:00Z"), now
        status, now = await api.call("PATCH", path, json={"expires_at": "2035-06-30T12:00:00.5z", "disabled": True})
        assert status == 200 and (now["status"], now["expires_at"]) == ("disabled", "2035-06-30T12:00:01Z"), now
        status, tier = await api.call(
            "PUT", "/admin/v1/tiers/t", json={"limits": {"requests": {"limit": 5, "window": "1m30s"}}}
        )
        assert status == 201 and tier["limits"]["requests"] == {"limit": 5, "window": "1m30s"}, tier


async def test_body_limits_and_content_type(tmp_path: Path, redis_url: str) -> None:
    async with running(admin_settings(tmp_path, redis_url)) as (_, api):
        status, error = await api.call(
            "POST", "/admin/v1/keys", data=b"x" * 70_000, headers=api.headers(**{"Content-Type": "application/json"})
        )
        assert (status, error["error"]["code"]) == (413, "body_too_large")
        status, error = await api.call("POST", "/admin/v1/keys", data=b"user=a", headers=api.headers())
        assert (status, error["error"]["code"]) == (415, "unsupported_media_type")
        status, error = await api.call(
            "POST", "/admin/v1/keys", data=b"{nope", headers=api.headers(**{"Content-Type": "application/json"})
        )
        assert (status, error["error"]["code"]) == (400, "invalid_json")
        for not_an_object in (b"[]", b"null", b'"x"'):
            status, error = await api.call(
                "POST",
                "/admin/v1/keys",
                data=not_an_object,
                headers=api.headers(**{"Content-Type": "application/json"}),
            )
            assert (status, error["error"]["message"]) == (400, "The body must be a JSON object."), error
        status, error = await api.call(
            "POST", "/admin/v1/keys", json={"user": "a", "expires_at": "9999-12-31T23:59:59-12:00"}
        )
        assert (status, error["error"]["param"]) == (400, "expires_at"), error  # year 10000 in UTC: was dropped
        deep = b'{"user": "a", "name": ' + b"[" * 5000 + b"]" * 5000 + b"}"  # past Python's recursion limit
        status, error = await api.call(
            "POST", "/admin/v1/keys", data=deep, headers=api.headers(**{"Content-Type": "application/json"})
        )
        assert (status, error["error"]["code"]) == (400, "invalid_json")


async def test_what_aiohttp_answers_itself_is_in_the_envelope(
    tmp_path: Path, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A body that does not decompress was a plain-text 500; an encoding aiohttp cannot decode, an over-long line
    and malformed HTTP were aiohttp's plain-text 400s, on both ports."""
    async with running(admin_settings(tmp_path, redis_url)) as (plane, api):
        as_json = {"Content-Type": "application/json"}
        status, key = await api.call(
            "POST",
            "/admin/v1/keys",
            data=gzip.compress(b'{"user": "zip"}'),
            headers=api.headers(**as_json, **{"Content-Encoding": "gzip"}),
        )
        assert status == 201 and key["user"] == "zip", key
        ops = f"http://127.0.0.1:{plane.ports['ops']}"

        def post(data: bytes, encoding: str, status: int, code: str) -> tuple[Any, ...]:
            return (api.base, "POST", "/admin/v1/keys", data, {**as_json, "Content-Encoding": encoding}, status, code)

        for base, method, path, data, headers, status, code in (
            post(b'{"user":"x"}', "gzip", 400, "invalid_json"),
            post(b'{"user":"x"}', "deflate", 400, "invalid_json"),
            post(b"x" * 60_000, "gzip", 400, "invalid_json"),
            post(b'{"user":"x"}', "br", 415, "unsupported_media_type"),
            (api.base, "GET", "/admin/v1/keys", None, {"X-Big": "a" * 9000}, 431, "request_header_too_large"),
            (api.base, "GET", "/admin/v1/keys?user=" + "a" * 9000, None, {}, 431, "request_header_too_large"),
            (ops, "GET", "/healthz", None, {"X-Big": "a" * 9000}, 431, "request_header_too_large"),
        ):
            async with api.session.request(method, base + path, data=data, headers=api.headers(**headers)) as resp:
                assert resp.content_type == "application/json", (path, headers, await resp.text())
                body = await resp.json()
            assert (resp.status, body["error"]["code"]) == (status, code), (path, headers, body)
            assert set(body["error"]) == {"message", "type", "param", "code"}
        reader, writer = await asyncio.open_connection("127.0.0.1", plane.ports["main"])
        writer.write(b"GET /admin/v1/keys HTTP/1.1\r\nHost: cp\r\nBad Header: x\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        head, _, body_bytes = answer.partition(b"\r\n\r\n")
        assert head.split()[1] == b"400" and json.loads(body_bytes)["error"]["code"] == "invalid_request", answer
    assert "Traceback" not in caplog.text and "Unhandled exception" not in caplog.text


def test_token_file_comments_may_end_a_line(tmp_path: Path) -> None:
    """A trailing comment had made the whole file fail to parse (and the previous tokens, or none, stay)."""
    path = tmp_path / "tokens"
    path.write_text(
        "# admin tokens\n  # indented\nadmin ops tok#en-0123456789abcdef   # rotated 2025-06\n"
        "read-only auditor abcdef0123456789abcdef\t# billing\n"
    )
    book = TokenBook(path=str(path), dev=False)
    assert book.check("Bearer tok#en-0123456789abcdef", write=True) == Principal(name="ops", role=Role.ADMIN)
    assert book.check("Bearer abcdef0123456789abcdef", write=False).role is Role.READ_ONLY


@pytest.mark.parametrize(
    ("mode", "warned"),
    [
        pytest.param(0o644, True, id="world-readable"),
        pytest.param(0o600, False, id="owner-only"),
        pytest.param(0o440, False, id="group-readable"),  # the deploy manifests' defaultMode, with fsGroup
    ],
)
def test_a_token_file_every_user_can_read_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, mode: int, warned: bool
) -> None:
    path = tmp_path / "tokens"
    path.write_text("admin ops admin-token-0123456789abcdef\n")
    path.chmod(mode)
    with caplog.at_level(logging.WARNING, logger="maas.controlplane.admin"):
        TokenBook(path=str(path), dev=False)
    assert ("readable by every user" in caplog.text) is warned
    assert "admin-token-0123456789abcdef" not in caplog.text


async def test_token_file_is_reloaded(tmp_path: Path, redis_url: str) -> None:
    settings = admin_settings(tmp_path, redis_url)
    async with running(settings) as (_, api):
        new_token = "rotated-admin-token-0123456789"
        _write(Path(settings.admin_token_file or ""), f"admin rotated {new_token}\n")

        async def accepted() -> bool:
            status, _ = await api.call("GET", "/admin/v1/tiers", token=new_token)
            return status == 200

        await eventually(accepted)
        status, _ = await api.call("GET", "/admin/v1/tiers", token=ADMIN_TOKEN)
        assert status == 401


async def test_a_token_file_removed_revokes_every_token(
    tmp_path: Path, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Removing the file (or its key from the mounted Secret) after a leak had kept every token working until a
    restart ("keeping 2 tokens"); now it refuses them, says so once, and a file put back is loaded again."""
    settings = admin_settings(tmp_path, redis_url)
    path = settings.admin_token_file or ""
    async with running(settings) as (_, api):
        os.remove(path)

        async def refused() -> bool:
            status, error = await api.call("GET", "/admin/v1/tiers")
            return status == 401 and error["error"]["code"] == "invalid_admin_token"

        await eventually(refused)
        await asyncio.sleep(1.1)  # past the once-a-second check: the file is looked for again, still not there
        assert await refused()
        assert caplog.text.count("is missing: the admin API refuses every call") == 1, caplog.text
        _write(Path(path), TOKEN_FILE)

        async def accepted() -> bool:
            status, _ = await api.call("GET", "/admin/v1/tiers")
            return status == 200

        await eventually(accepted)


async def test_tiers_quota_and_usage(tmp_path: Path, redis_url: str) -> None:
    async with running(admin_settings(tmp_path, redis_url)) as (plane, api):
        status, tier = await api.call(
            "PUT",
            "/admin/v1/tiers/gold",
            json={"level": 7, "groups": ["gold"], "limits": {"requests": {"limit": 2, "window": "1m"}}},
        )
        assert status == 201 and tier["limits"]["requests"] == {"limit": 2, "window": "1m"}
        status, error = await api.call("PUT", "/admin/v1/tiers/gold", json={"level": 7, "groups": ["gold"]})
        assert (status, error["error"]["param"]) == (400, "limits"), error  # it had made the tier unlimited
        status, tier = await api.call("PUT", "/admin/v1/tiers/open", json={"limits": {}})
        assert status == 201 and tier["limits"] == {"requests": None, "tokens": None}, tier
        status, created = await api.call("POST", "/admin/v1/keys", json={"user": "bob", "groups": ["gold"]})
        key_id = created["key_id"]
        assert created["tier"] == "gold" and created["tier_explicit"] is False
        status, error = await api.call("DELETE", "/admin/v1/tiers/gold")
        assert (status, error["error"]["code"]) == (409, "tier_in_use")
        assert plane.store is not None
        await plane.store.check_buckets([[BucketOp(key_id, "requests", 2, 60_000, 1)]])
        status, quota = await api.call("GET", f"/admin/v1/keys/{key_id}/quota")
        assert quota["requests"]["limit"] == 2 and quota["requests"]["remaining"] == 1 and quota["tokens"] is None
        status, quota = await api.call("POST", f"/admin/v1/keys/{key_id}/quota/reset")
        assert status == 200 and quota["requests"]["remaining"] == 2
        today = ledger_day()
        await plane.store.add_usage(
            [
                UsageDelta(key_id=key_id, model="m1", day=today, requests=2, prompt_tokens=10, completion_tokens=5),
                UsageDelta(key_id=key_id, model="m2", day=today, requests=1, prompt_tokens=1, completion_tokens=1),
                UsageDelta(key_id="0000000000000000", model="m1", day=today, requests=4),
            ]
        )
        status, report = await api.call("GET", "/admin/v1/usage?group_by=user,model")
        rows = {(r["user"], r["model"]): (r["requests"], r["total_tokens"]) for r in report["data"]}
        assert rows == {("bob", "m1"): (2, 15), ("bob", "m2"): (1, 2), (None, "m1"): (4, 0)}
        assert report["total"]["requests"] == 7
        status, report = await api.call("GET", "/admin/v1/usage?user=bob&model=m1&group_by=day")
        assert [(r["day"], r["requests"]) for r in report["data"]] == [(report["to"], 2)]
        status, report = await api.call("GET", "/admin/v1/usage?key_id=&user=&tier=&model=&from=&group_by=user")
        assert status == 200 and report["total"]["requests"] == 7  # empty parameters filter nothing
        status, report = await api.call("GET", "/admin/v1/usage?to=0001-01-05")  # the default span, cut at year 1
        assert status == 200 and (report["from"], report["data"]) == ("0001-01-01", []), report
        status, text = await api.call(
            "GET", "/admin/v1/usage?group_by=key&tier=gold", headers=api.headers(Accept="text/csv")
        )
        assert status == 200 and text.splitlines() == [
            "key_id,requests,prompt_tokens,completion_tokens,total_tokens",
            f"{key_id},3,11,6,17",
        ]
        status, error = await api.call("GET", "/admin/v1/usage", headers=api.headers(Accept="image/png"))
        assert (status, error["error"]["code"]) == (406, "not_acceptable")


async def test_csv_cells_never_run_as_formulas(tmp_path: Path, redis_url: str) -> None:
    """User names and model ids come from outside; a cell starting with = + - @ ran as a formula in a spreadsheet."""
    async with running(admin_settings(tmp_path, redis_url)) as (plane, api):
        status, key = await api.call("POST", "/admin/v1/keys", json={"user": "@A1:B9"})
        assert status == 201, key
        assert plane.store is not None
        day = ledger_day()
        await plane.store.add_usage(
            [
                UsageDelta(key_id=key["key_id"], model="=HYPERLINK(x)", day=day, requests=1),
                UsageDelta(key_id=key["key_id"], model="-2+3", day=day, requests=2),
                UsageDelta(key_id=key["key_id"], model="qwen3", day=day, requests=4),
            ]
        )
        status, text = await api.call(
            "GET", "/admin/v1/usage?group_by=user,model", headers=api.headers(Accept="text/csv")
        )
        assert status == 200 and text.splitlines() == [
            "user,model,requests,prompt_tokens,completion_tokens,total_tokens",
            "'@A1:B9,'-2+3,2,0,0,0",
            "'@A1:B9,'=HYPERLINK(x),1,0,0,0",
            "'@A1:B9,qwen3,4,0,0,0",
        ], text
        status, report = await api.call("GET", "/admin/v1/usage?group_by=model")
        assert {r["model"] for r in report["data"]} == {"=HYPERLINK(x)", "-2+3", "qwen3"}  # JSON as it is


async def test_concurrent_changes_to_one_key_all_land(tmp_path: Path, redis_url: str) -> None:
    """Each change reads the key's Secret, edits it and writes it back under the key's lock: parallel PATCHes
    each keep their field (one was lost, and writers racing on one temporary file got 500s), and a revoke racing a
    rotate stays revoked (the rotate had written back the Secret it read before the revoke)."""
    async with running(admin_settings(tmp_path, redis_url)) as (_, api):
        status, key = await api.call("POST", "/admin/v1/keys", json={"user": "racer"})
        assert status == 201
        path = f"/admin/v1/keys/{key['key_id']}"
        patches = [{"name": "n1"}, {"disabled": True}, {"models": ["qwen3-0-6b-instruct"]}]
        patches += [{"limits": {"requests": i + 1}} for i in range(10)]
        answers = await asyncio.gather(*(api.call("PATCH", path, json=body) for body in patches))
        assert [status for status, _ in answers] == [200] * len(patches), answers
        status, now = await api.call("GET", path)
        assert (now["name"], now["status"], now["models"]) == ("n1", "disabled", ["qwen3-0-6b-instruct"]), now

        for _ in range(3):
            status, key = await api.call("POST", "/admin/v1/keys", json={"user": "racer"})
            path = f"/admin/v1/keys/{key['key_id']}"
            (rotated, _), (revoked, _) = await asyncio.gather(
                api.call("POST", f"{path}/rotate", json={"grace_period": "1h"}), api.call("DELETE", path)
            )
            assert rotated in (200, 409) and revoked == 200
            status, after = await api.call("GET", path)
            assert after["status"] == "revoked", after
    assert not [f for f in os.listdir(tmp_path / "manifests") if f.endswith(".tmp")]


async def test_concurrent_tier_writes_all_land_and_say_synced(tmp_path: Path, redis_url: str) -> None:
    async with running(admin_settings(tmp_path, redis_url)) as (_, api):
        names = [f"race-{i}" for i in range(4)]
        body = {"level": 3, "groups": ["g"], "limits": {"requests": {"limit": 10, "window": "1m"}}}
        answers = await asyncio.gather(*(api.call("PUT", f"/admin/v1/tiers/{n}", json=body) for n in names))
        assert all(status == 201 and tier["synced"] is True for status, tier in answers), answers
        _, listed = await api.call("GET", "/admin/v1/tiers")
        assert set(names) <= {t["name"] for t in listed["data"]}
        answers = await asyncio.gather(*(api.call("DELETE", f"/admin/v1/tiers/{n}") for n in names))
        assert all(status == 200 and gone["synced"] is True for status, gone in answers), answers


async def test_rotating_now_or_an_expired_key(tmp_path: Path, redis_url: str) -> None:
    """grace_period "0s" ends the old key at once (it was rounded up to the next second); an expired key is not
    rotated into a new key that is born expired."""
    async with running(admin_settings(tmp_path, redis_url)) as (_, api):
        status, key = await api.call("POST", "/admin/v1/keys", json={"user": "rot"})
        status, rotated = await api.call("POST", f"/admin/v1/keys/{key['key_id']}/rotate", json={"grace_period": "0s"})
        assert status == 200 and rotated["old"]["status"] == "expired", rotated
        status, key = await api.call("POST", "/admin/v1/keys", json={"user": "rot", "expires_in": "1s"})

        async def expired() -> bool:
            return (await api.call("GET", f"/admin/v1/keys/{key['key_id']}"))[1]["status"] == "expired"

        await eventually(expired, within=5)
        status, refused = await api.call("POST", f"/admin/v1/keys/{key['key_id']}/rotate", json={})
        assert (status, refused["error"]["code"]) == (409, "key_expired"), refused


async def test_a_limit_override_without_a_window_needs_a_tier_that_has_one(tmp_path: Path, redis_url: str) -> None:
    """It was stored and silently dropped (the key had no token limit), then came back on a later tier change."""
    async with running(admin_settings(tmp_path, redis_url)) as (_, api):
        tier = {"level": 1, "groups": ["r"], "limits": {"requests": {"limit": 3, "window": "1m"}}}
        assert (await api.call("PUT", "/admin/v1/tiers/reqonly", json=tier))[0] == 201
        body = {"user": "drop", "tier": "reqonly", "limits": {"tokens": 500}}
        status, error = await api.call("POST", "/admin/v1/keys", json=body)
        assert (status, error["error"]["code"], error["error"]["param"]) == (400, "invalid_request", "limits.window")
        status, key = await api.call("POST", "/admin/v1/keys", json={**body, "limits": {"tokens": 500, "window": "1h"}})
        assert status == 201 and key["limits"]["tokens"] == {"limit": 500, "window": "1h"}, key
        status, key = await api.call(
            "POST", "/admin/v1/keys", json={"user": "ok", "tier": "free", "limits": {"tokens": 7}}
        )
        assert status == 201 and key["limits"]["tokens"] == {"limit": 7, "window": "1m"}, key  # the tier's window
        status, error = await api.call("PATCH", f"/admin/v1/keys/{key['key_id']}", json={"tier": "reqonly"})
        assert (status, error["error"]["param"]) == (400, "limits.window"), error


def test_a_duration_error_says_what_is_wrong_with_it() -> None:
    with pytest.raises(InvalidDuration, match="between 1ms and 366d"):
        duration_seconds("400d", param="expires_in")
    with pytest.raises(InvalidDuration, match="a number and a unit"):
        duration_seconds("30 years", param="expires_in")
    assert duration_seconds("1h30m", param="expires_in") == 5400.0


async def test_a_report_over_many_keys_is_summed_as_it_is_read(
    tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An all-keys report held every ledger row before summing them (millions for 10,000 keys over a year); rows are
    now added up a few keys at a time, and the totals stay the same."""
    from controlplane.admin import usage

    async with running(admin_settings(tmp_path, redis_url)) as (plane, api):
        store = plane.store
        assert store is not None
        day = ledger_day()
        count = usage.READ_CONCURRENCY * 3 + 5
        await store.add_usage(
            [UsageDelta(key_id=f"{i:016x}", model="m", day=day, requests=1, prompt_tokens=i) for i in range(count)]
        )
        reads: list[str] = []
        read_usage = store.read_usage

        async def counted(key_id: str, days: Any) -> Any:
            reads.append(key_id)
            return await read_usage(key_id, days)

        monkeypatch.setattr(store, "read_usage", counted)
        read_before_adding: list[int] = []
        add = usage._add

        def adding(*args: Any, **kwargs: Any) -> None:
            read_before_adding.append(len(reads))
            add(*args, **kwargs)

        monkeypatch.setattr(usage, "_add", adding)
        status, report = await api.call("GET", "/admin/v1/usage")
        assert status == 200 and report["total"]["requests"] == count, report
        assert report["total"]["prompt_tokens"] == sum(range(count))
        assert read_before_adding[0] <= usage.READ_CONCURRENCY and len(read_before_adding) >= 4


async def test_two_authorization_headers_are_refused_whichever_comes_first(tmp_path: Path, redis_url: str) -> None:
    """The first of two Authorization headers counted: an admin token followed by anything passed. As authz does
    with a repeated credential, the admin API now refuses the request, whatever the order."""
    async with running(admin_settings(tmp_path, redis_url)) as (_, api):
        for first, second in ((ADMIN_TOKEN, "x" * 20), ("x" * 20, ADMIN_TOKEN), (ADMIN_TOKEN, ADMIN_TOKEN)):
            headers = multidict.CIMultiDict(
                [("Authorization", f"Bearer {first}"), ("Authorization", f"Bearer {second}")]
            )
            status, error = await api.call("GET", "/admin/v1/tiers", headers=headers)
            assert (status, error["error"]["code"]) == (401, "invalid_admin_token"), error
            assert "More than one Authorization header" in error["error"]["message"]
