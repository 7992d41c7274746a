"""``python -m benchmarks admin``: the admin API at scale, against the Kubernetes API emulator and a real Redis.

- issuing N keys through ``POST /admin/v1/keys`` (32 concurrent clients; each call answers once its key is in
  Redis): keys/s and latency per call;
- listing them page by page (``limit=100``): latency per page;
- listing stays O(page): page latency with 1,000 keys vs 100,000 keys in Redis (records beyond the issued ones are
  written straight to Redis, as the sync path would).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import logging
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks.common import table, write_result
from controlplane.runner import ControlPlane
from controlplane.settings import ControlPlaneSettings
from gateway import contract
from gateway.contract import KeyRecord, digest_key, key_id_of
from gateway.settings import load
from gateway.store.redis import RedisStore
from tests.support.k8s_emulator import K8sEmulator, load_manifests
from tests.support.procs import redis_server

PEPPER = "bench-pepper-0123456789abcdef"
TOKEN = "bench-admin-token-0123456789"
SEED = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "seed"
CONCURRENCY = 32


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))] * 1000 if ordered else 0.0


async def _issue(session: aiohttp.ClientSession, base: str, count: int) -> tuple[float, list[float]]:
    latencies: list[float] = []
    queue = list(range(count))

    async def worker() -> None:
        while queue:
            i = queue.pop()
            started = time.perf_counter()
            async with session.post(f"{base}/admin/v1/keys", json={"user": f"user-{i % 500}"}) as response:
                assert response.status == 201, await response.text()
                await response.read()
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return time.perf_counter() - started, latencies


async def _walk(session: aiohttp.ClientSession, base: str) -> tuple[int, list[float]]:
    latencies: list[float] = []
    seen = 0
    cursor = ""
    while True:
        started = time.perf_counter()
        async with session.get(f"{base}/admin/v1/keys?limit=100{cursor}") as response:
            page = await response.json()
        latencies.append(time.perf_counter() - started)
        seen += len(page["data"])
        if not page["has_more"]:
            return seen, latencies
        cursor = f"&cursor={page['next_cursor']}"


async def _pages(session: aiohttp.ClientSession, base: str, ids: list[str], samples: int) -> list[float]:
    """Pages of 100 starting at random keys (through a cursor built like the API's)."""
    latencies = []
    for _ in range(samples):
        cursor = base64.urlsafe_b64encode(f"k:{random.choice(ids)}".encode()).decode().rstrip("=")
        started = time.perf_counter()
        async with session.get(f"{base}/admin/v1/keys?limit=100&cursor={cursor}") as response:
            await response.read()
        latencies.append(time.perf_counter() - started)
    return latencies


async def _fill(store: RedisStore, plane: ControlPlane, total: int) -> None:
    assert plane.admin is not None
    have = len(plane.admin.keys)
    changes = []
    for i in range(have, total):
        digest = digest_key(f"bulk-{i}", PEPPER.encode())
        record = KeyRecord(key_id=key_id_of(digest), digest=digest, user=f"bulk-{i % 1000}", source="secret:llm/bulk")
        changes.append(contract.put(record))
    for start in range(0, len(changes), 5000):
        await store.apply(changes[start : start + 5000])
    admin = plane.admin
    await admin.wait_until(lambda: len(admin.keys) >= total, within=120.0)


async def _measure(emulator: K8sEmulator, redis_url: str, *, keys: int, big: int, samples: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "tokens").write_text(f"admin bench {TOKEN}\n")
        settings = load(
            ControlPlaneSettings,
            port=0,
            ops_port=0,
            host="127.0.0.1",
            source="kubernetes",
            kubeconfig=str(emulator.write_kubeconfig(Path(tmp) / "kubeconfig")),
            redis_url=redis_url,
            key_pepper=PEPPER,
            leader_election=False,
            log_level="warning",
            admin_token_file=str(Path(tmp) / "tokens"),
            key_namespace="llm",
        )
        plane = ControlPlane(settings)
        await plane.start()
        store = RedisStore(redis_url, timeout=10.0)
        try:
            assert plane.syncer is not None and plane.admin is not None
            await plane.syncer.ready.wait()
            await plane.admin.loaded.wait()
            base = f"http://127.0.0.1:{plane.ports['main']}"
            headers = {"Authorization": f"Bearer {TOKEN}"}
            connector = aiohttp.TCPConnector(limit=CONCURRENCY)
            async with aiohttp.ClientSession(headers=headers, connector=connector) as session:
                seconds, issue = await _issue(session, base, keys)
                listed, walk = await _walk(session, base)
                await _fill(store, plane, 1_000)
                small = await _pages(session, base, sorted(plane.admin.keys), samples)
                await _fill(store, plane, big)
                large = await _pages(session, base, sorted(plane.admin.keys), samples)
        finally:
            await store.close()
            await plane.stop()
    return {
        "keys": keys,
        "issue_seconds": seconds,
        "keys_per_second": keys / seconds,
        "issue_p50_ms": _pct(issue, 50),
        "issue_p99_ms": _pct(issue, 99),
        "listed": listed,
        "pages": len(walk),
        "page_p50_ms": _pct(walk, 50),
        "page_p99_ms": _pct(walk, 99),
        "page_1k_p50_ms": _pct(small, 50),
        "page_1k_p99_ms": _pct(small, 99),
        "big": big,
        "page_big_p50_ms": _pct(large, 50),
        "page_big_p99_ms": _pct(large, 99),
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks admin", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small counts: a smoke run in a few seconds")
    parser.add_argument("--keys", type=int, default=None, help="keys issued through the API (10,000)")
    parser.add_argument("--big", type=int, default=None, help="keys in Redis for the O(page) check (100,000)")
    parser.add_argument("--samples", type=int, default=None, help="page calls per size")
    args = parser.parse_args(argv)
    keys = args.keys or (300 if args.quick else 10_000)
    big = args.big or (10_000 if args.quick else 100_000)
    samples = args.samples or (50 if args.quick else 300)
    logging.basicConfig(level=logging.WARNING)
    emulator = K8sEmulator(bookmark_interval=5.0).start()
    try:
        for obj in load_manifests(SEED):
            emulator.create(obj)
        with redis_server() as redis:
            r = asyncio.run(_measure(emulator, redis.url, keys=keys, big=max(big, 1_001), samples=samples))
    finally:
        emulator.stop()
    rows = [
        ["issue keys through the API", f"{keys:,} keys, {CONCURRENCY} clients: {r['keys_per_second']:.0f} keys/s"],
        ["issue: latency per call p50 / p99", f"{r['issue_p50_ms']:.1f} ms / {r['issue_p99_ms']:.1f} ms"],
        ["list page by page (limit 100)", f"{r['listed']:,} keys in {r['pages']} pages"],
        ["list: latency per page p50 / p99", f"{r['page_p50_ms']:.2f} ms / {r['page_p99_ms']:.2f} ms"],
        ["page at 1,000 keys p50 / p99", f"{r['page_1k_p50_ms']:.2f} ms / {r['page_1k_p99_ms']:.2f} ms"],
        [f"page at {r['big']:,} keys p50 / p99", f"{r['page_big_p50_ms']:.2f} ms / {r['page_big_p99_ms']:.2f} ms"],
    ]
    markdown = "## Admin API\n\n" + table(["measure", "value"], rows)
    print(markdown)
    write_result("admin-quick" if args.quick else "admin", r, markdown)
    return 0
