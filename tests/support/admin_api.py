"""Shared by the admin API tests: a control plane over a manifest directory and real Redis, and HTTP helpers."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from controlplane.runner import ControlPlane
from controlplane.settings import ControlPlaneSettings
from gateway.settings import load

SEED = Path(__file__).parent.parent / "fixtures" / "seed"
PEPPER = b"test-pepper-0123456789abcdef"
ADMIN_TOKEN = "admin-token-0123456789abcdef"
READER_TOKEN = "reader-token-0123456789abcdef"
TOKEN_FILE = f"# admin API tokens\nadmin ops {ADMIN_TOKEN}\nread-only auditor {READER_TOKEN}\n"


def seed_dir(path: Path) -> Path:
    manifests = path / "manifests"
    manifests.mkdir()
    for item in SEED.iterdir():
        shutil.copy(item, manifests)
    return manifests


def admin_settings(tmp: Path, redis_url: str, **overrides: Any) -> ControlPlaneSettings:
    tokens = tmp / "tokens"
    if not tokens.exists():
        tokens.write_text(TOKEN_FILE)
    values: dict[str, Any] = {
        "port": 0,
        "ops_port": 0,
        "host": "127.0.0.1",
        "source": f"dir:{seed_dir(tmp)}",
        "redis_url": redis_url,
        "dir_poll_interval": 0.05,
        "resync_period": 3600,
        "log_format": "text",
        "admin_token_file": str(tokens),
        "key_namespace": "llm",
        "admin_write_timeout": 5.0,
        "key_pepper": PEPPER.decode(),
    }
    return load(ControlPlaneSettings, **{**values, **overrides})


@dataclass
class Api:
    session: aiohttp.ClientSession
    base: str
    token: str = ADMIN_TOKEN

    def headers(self, token: str | None = None, **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token or self.token}", **extra}

    async def call(
        self, method: str, path: str, *, json: Any = None, token: str | None = None, **kwargs: Any
    ) -> tuple[int, Any]:
        headers = kwargs.pop("headers", None) or self.headers(token)
        async with self.session.request(method, self.base + path, json=json, headers=headers, **kwargs) as resp:
            if resp.content_type == "application/json":
                return resp.status, await resp.json()
            return resp.status, await resp.text()


@contextlib.asynccontextmanager
async def running(settings: ControlPlaneSettings) -> AsyncIterator[tuple[ControlPlane, Api]]:
    plane = ControlPlane(settings)
    await plane.start()
    try:
        assert plane.syncer is not None and plane.admin is not None
        await plane.syncer.ready.wait()
        await plane.admin.loaded.wait()
        # the first sync's change events may still be on their way to the admin view: let it catch up
        assert plane.store is not None
        target = await plane.store.generation()
        admin = plane.admin
        assert await admin.wait_until(lambda: admin.generation >= target, within=10.0)
        async with aiohttp.ClientSession() as session:
            yield plane, Api(session=session, base=f"http://127.0.0.1:{plane.ports['main']}")
    finally:
        await plane.stop()
