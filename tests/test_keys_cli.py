"""``maas keys`` as a real process against a running control plane: create, list, show, rotate, revoke, usage."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from controlplane.keys_cli import _table, _width
from tests.support.admin_api import ADMIN_TOKEN, admin_settings, running
from tests.support.procs import maas_argv

pytestmark = pytest.mark.redis


async def _keys(base: str, *args: str, token: str = ADMIN_TOKEN) -> tuple[int, str, str]:
    env = {**os.environ, "MAAS_ADMIN_URL": base, "MAAS_ADMIN_TOKEN": token}
    proc = await asyncio.create_subprocess_exec(
        *maas_argv("keys", *args), env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    return proc.returncode or 0, out.decode(), err.decode()


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


@pytest.mark.parametrize("url", ["maas-controlplane.maas-system.svc", "http://[::1", "ftp://host/", "http://"])
async def test_a_malformed_admin_url_is_bad_usage_not_a_traceback(url: str) -> None:
    code, out, err = await _keys(url, "list")
    assert code == 2 and "admin URL" in err and "Traceback" not in err, (code, out, err)


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
