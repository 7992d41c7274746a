"""``maas keys`` as a real process against a running control plane: create, list, show, rotate, revoke, usage."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web

from controlplane.keys_cli import _table, _width
from tests.support.admin_api import ADMIN_TOKEN, admin_settings, running
from tests.support.procs import free_port, maas_argv

pytestmark = pytest.mark.redis


async def _keys(base: str, *args: str, token: str = ADMIN_TOKEN) -> tuple[int, str, str]:
    env = {**os.environ, "MAAS_ADMIN_URL": base, "MAAS_ADMIN_TOKEN": token}
    proc = await asyncio.create_subprocess_exec(
        *maas_argv("keys", *args), env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    return proc.returncode or 0, out.decode(), err.decode()


@contextlib.asynccontextmanager
async def _answering(handler: Callable[[web.Request], Awaitable[web.Response]]) -> AsyncIterator[str]:
    """The base URL of a server that answers every request with ``handler``: something other than the admin API."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def test_keys_cli_round_trip(tmp_path: Path, redis_url: str) -> None:
    async with running(admin_settings(tmp_path, redis_url)) as (_, api):
        code, out, _ = await _keys(api.base, "--output", "json", "create", "--user", "carol", "--tier", "premium")
        assert code == 0
        created = json.loads(out)
        key_id = created["key_id"]
        assert created["key"].startswith("sk-maas-")
        code, out, _ = await _keys(api.base, "list", "--user", "carol")
        assert code == 0 and key_id in out and "KEY_ID" in out and created["key"] not in out
        code, out, _ = await _keys(api.base, "show", key_id)
        assert code == 0 and "tier: premium" in out
        code, out, _ = await _keys(
            api.base, "-o", "json", "create", "--user", "dan", "--group", "a", "--group", "b", "--request-limit", "9"
        )
        limited = json.loads(out)["key_id"]
        code, out, _ = await _keys(api.base, "show", limited)
        # values as a person reads them, not Python's reprs of the JSON
        assert code == 0 and "groups: a, b\n" in out and "limits: requests 9/" in out and "tier_explicit: false" in out
        assert not any(word in out for word in ("None", "True", "False", "['", "{'")), out
        code, out, _ = await _keys(api.base, "rotate", key_id, "--grace-period", "5m")
        assert code == 0 and "sk-maas-" in out
        code, out, _ = await _keys(api.base, "-o", "json", "revoke", key_id)
        assert code == 0 and json.loads(out)["status"] == "revoked"
        code, out, _ = await _keys(api.base, "usage", "--group-by", "key")
        assert code == 0 and "TOTAL" in out
        code, out, _ = await _keys(api.base, "usage", "--group-by", "user,model")
        assert code == 0 and out.splitlines()[-1].startswith("TOTAL"), out  # labelled without a key_id column
        code, out, _ = await _keys(api.base, "usage")
        lines = out.splitlines()
        assert code == 0 and lines[1].startswith("REQUESTS") and len(lines) == 3, out
        assert lines[2].split()[0].isdigit(), out  # not grouped: one row, the total, with its numbers
        code, _, err = await _keys(api.base, "show", "missing")
        assert code == 1 and "HTTP 404" in err
        code, _, err = await _keys(api.base, "list", token="wrong-token-0123456789")
        assert code == 1 and "HTTP 401" in err


@pytest.mark.parametrize(
    "url",
    [
        "maas-controlplane.maas-system.svc",
        "http://[::1",
        "ftp://host/",
        "http://",
        "http://127.0.0.1:port/",
        "http://127.0.0.1:99999",
        "http://127.0.0.1:0",
        "http://admin:pa55word-pa55word@127.0.0.1:8700",
        "ftp://admin:pa55word-pa55word@127.0.0.1:8700",
    ],
)
async def test_a_malformed_admin_url_is_bad_usage_not_a_traceback(url: str) -> None:
    code, out, err = await _keys(url, "list")
    assert code == 2 and "admin URL" in err and "Traceback" not in err, (code, out, err)
    assert "MAAS_ADMIN_URL" in err and "pa55word" not in err and len(err.strip().splitlines()) == 1, err


async def test_the_admin_token_is_never_printed(tmp_path: Path, redis_url: str) -> None:
    """A token ending in a newline (a Secret made from a file written with echo) made urllib fail with a traceback
    that printed the token; now the newline is dropped, and a token that cannot go in a header is refused unprinted."""
    async with running(admin_settings(tmp_path, redis_url)) as (_, api):
        code, out, err = await _keys(api.base, "list", token=f" {ADMIN_TOKEN}\n")
        assert code == 0 and "KEY_ID" in out, (out, err)
        for token in (f"{ADMIN_TOKEN}\r\nX-A: 1", f"ops {ADMIN_TOKEN}", f"{ADMIN_TOKEN}\x7f", f"{ADMIN_TOKEN}\u20ac"):
            code, out, err = await _keys(api.base, "list", token=token)
            assert code == 2 and "MAAS_ADMIN_TOKEN holds" in err and "Traceback" not in err, (token, out, err)
            assert ADMIN_TOKEN not in out + err


async def test_control_characters_from_a_secret_do_not_reach_the_terminal(tmp_path: Path, redis_url: str) -> None:
    """Whoever may write a key Secret sets its user id and name: an escape sequence there was printed as it was by
    list and show, driving the terminal of the admin who ran them (here: clear the screen, forge a line)."""
    settings = admin_settings(tmp_path, redis_url)
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": "odd-key",
            "namespace": "llm",
            "labels": {"app": "llm-gateway"},
            "annotations": {"secret.kuadrant.io/user-id": "eve\x1b[2J\u202e", "maas.io/key-name": "x\nstatus: ok"},
        },
        "stringData": {"api_key": "odd-key-0123456789"},
    }
    (Path(settings.directory or "") / "odd.yaml").write_text(json.dumps(secret))
    async with running(settings) as (_, api):
        code, out, err = await _keys(api.base, "list", "--user", "eve\x1b[2J\u202e")
        assert code == 0 and "eve\\x1b[2J\\u202e" in out, (out, err)
        key_id = out.splitlines()[1].split()[0]
        code, out, err = await _keys(api.base, "show", key_id)
        assert code == 0 and "name: x\\nstatus: ok\n" in out, (out, err)
        assert not any(ch in out for ch in "\x1b\u202e") and "\nstatus: ok" not in out.replace("\\n", ""), out


async def test_list_as_json_is_the_api_page(tmp_path: Path, redis_url: str) -> None:
    async with running(admin_settings(tmp_path, redis_url)) as (_, api):
        code, out, _ = await _keys(api.base, "-o", "json", "list", "--limit", "1")
        page = json.loads(out)
        assert code == 0 and page["has_more"] is True and page["next_cursor"], page
        _, api_page = await api.call("GET", "/admin/v1/keys?limit=1")
        assert page == api_page


def test_table_columns_line_up_with_wide_characters() -> None:
    rows = [{"name": "🔑 key", "user": "a"}, {"name": "plain", "user": "b"}, {"name": "日本語", "user": "c"}]
    lines = _table(rows, ["name", "user"]).splitlines()
    # the second column starts at the same terminal column on every line (wide characters count twice)
    assert {_width(line[: line.rindex(" ") + 1]) for line in lines} == {_width("日本語  ")}


async def test_a_change_not_synced_yet_is_done_with_a_warning(tmp_path: Path, redis_url: str) -> None:
    """The table left out the API's "synced": false: a key handed out that authz refused until the next sync."""
    async with running(admin_settings(tmp_path, redis_url, admin_write_timeout=0.001)) as (_, api):
        code, out, err = await _keys(api.base, "create", "--user", "slow")
        assert code == 0 and "sk-maas-" in out, (out, err)
        assert "warning: not synced yet" in err and "refuses it until" in err, err
        key_id = out.splitlines()[1].split()[0]
        code, out, err = await _keys(api.base, "rotate", key_id)
        assert code == 0 and "warning: not synced yet" in err and "refuses the new key" in err, (out, err)
        code, out, err = await _keys(api.base, "-o", "json", "revoke", key_id)
        assert code == 0 and json.loads(out)["synced"] is False and "admits it until" in err, (out, err)
        code, _, err = await _keys(api.base, "list")
        assert code == 0 and "warning" not in err


async def test_a_closed_pipe_ends_quietly(tmp_path: Path, redis_url: str) -> None:
    """``maas keys list --all | head -1`` printed a BrokenPipeError traceback."""
    async with running(admin_settings(tmp_path, redis_url)) as (_, api):
        env = {**os.environ, "MAAS_ADMIN_URL": api.base, "MAAS_ADMIN_TOKEN": ADMIN_TOKEN}

        def listing_into_a_closed_pipe() -> tuple[int, str]:
            proc = subprocess.Popen(
                maas_argv("keys", "list", "--all"), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
            assert proc.stdout is not None and proc.stderr is not None
            proc.stdout.close()  # the reader is gone before the listing is printed
            with proc.stderr:
                err = proc.stderr.read().decode()
            return proc.wait(timeout=30), err

        code, err = await asyncio.to_thread(listing_into_a_closed_pipe)
        assert (code, err) == (141, ""), err


async def test_an_answer_that_is_not_the_api_is_a_clear_error(tmp_path: Path) -> None:
    """A URL pointing at some web page: the HTML it answers was a JSONDecodeError traceback."""

    async def page(request: web.Request) -> web.Response:
        return web.Response(text="<html>hello</html>", content_type="text/html")

    async with _answering(page) as base:
        for args in (("list",), ("create", "--user", "a")):
            code, out, err = await _keys(base, *args)
            assert code == 2 and "does not answer as the admin API" in err and "text/html" in err, (out, err)
            assert "Traceback" not in err


async def test_the_model_gateways_401_is_not_the_admin_api(tmp_path: Path) -> None:
    """The demo's gateway port given as the admin URL: maas authz's 401 (``invalid_api_key``) read as the admin API
    refusing the token, exit 1 with "Incorrect API key provided", which sent people to check a token that was fine."""

    async def gateway(request: web.Request) -> web.Response:
        body = {"error": {"message": "Incorrect API key provided.", "type": "invalid_request_error", "param": None}}
        body["error"]["code"] = "invalid_api_key"
        return web.json_response(body, status=401, headers={"www-authenticate": 'Bearer realm="maas"'})

    async with _answering(gateway) as base:
        code, out, err = await _keys(base, "list")
        assert code == 2 and "does not answer as the admin API" in err and "MAAS_ADMIN_URL" in err, (out, err)


async def test_a_created_key_whose_output_is_lost_is_named_on_stderr(tmp_path: Path, redis_url: str) -> None:
    """``maas keys create > /dev/full`` was an OSError traceback, and the key, issued, was never seen again."""
    async with running(admin_settings(tmp_path, redis_url)) as (_, api):
        env = {**os.environ, "MAAS_ADMIN_URL": api.base, "MAAS_ADMIN_TOKEN": ADMIN_TOKEN}

        def create_into_a_full_disk() -> tuple[int, str]:
            with open("/dev/full", "wb") as full:
                done = subprocess.run(
                    maas_argv("keys", "create", "--user", "erin"), env=env, stdout=full, stderr=subprocess.PIPE
                )
            return done.returncode, done.stderr.decode()

        code, err = await asyncio.to_thread(create_into_a_full_disk)
        assert code == 74 and "cannot write the output" in err and "Traceback" not in err, err
        _, page = await api.call("GET", "/admin/v1/keys?user=erin")
        (key,) = page["data"]
        assert f"maas keys revoke {key['key_id']}" in err, err


async def test_a_window_without_a_limit_is_bad_usage() -> None:
    """``--window`` alone was dropped without a word: the key had the tier's limits."""
    code, out, err = await _keys("http://127.0.0.1:9", "-o", "json", "create", "--user", "w", "--window", "1h")
    assert code == 2 and "--window" in err and not out, (out, err)
