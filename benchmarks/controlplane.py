"""``make bench-controlplane``: the control plane at scale, against the Kubernetes API emulator and a real Redis.

- cold start: N key Secrets and M InferenceServices in the emulator -> Redis fully synced (every key, model and
  route record written) by a control plane started from nothing (target: 10,000 + 1,000 in <= 10 s);
- propagation: one Secret changed in the emulator -> the change event that carries its new key record reaching
  a subscriber of the store's change events (what ``maas authz`` follows), p50/p99 over many changes, with the
  full data set loaded (target: p99 <= 1 s).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import copy
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import redis as sync_redis

from benchmarks.common import percentile, table, write_result
from controlplane.runner import ControlPlane
from controlplane.settings import ControlPlaneSettings
from gateway import contract
from gateway.settings import load
from gateway.store.redis import RedisStore
from tests.support.k8s_emulator import K8sEmulator, load_manifests
from tests.support.procs import redis_server

PEPPER = "bench-pepper-0123456789abcdef"
SEED = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "seed"


def _secret(index: int, key: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": f"key-{index}",
            "namespace": f"team-{index % 50}",
            "labels": {"authorino.kuadrant.io/managed-by": "authorino"},
            "annotations": {"secret.kuadrant.io/user-id": f"user-{index}", "kuadrant.io/groups": "premium"},
        },
        "data": {"api_key": base64.b64encode(key.encode()).decode()},
    }


def _populate(emulator: K8sEmulator, *, keys: int, isvcs: int) -> None:
    seed = {o["kind"]: o for o in load_manifests(SEED)}
    emulator.create(seed["ServingRuntime"])
    for i in range(isvcs):
        isvc = copy.deepcopy(seed["InferenceService"])
        isvc["metadata"]["name"] = f"model-{i}"
        emulator.create(isvc)
        route = copy.deepcopy(seed["HTTPRoute"])
        route["metadata"]["name"] = f"route-{i}"
        route["spec"]["rules"][0]["matches"][0]["path"]["value"] = f"/model-{i}"
        route["spec"]["rules"][0]["backendRefs"][0]["name"] = f"model-{i}-predictor"
        emulator.create(route)
    for i in range(keys):
        emulator.create(_secret(i, f"sk-{i}"))


async def _measure(emulator: K8sEmulator, redis_url: str, *, keys: int, isvcs: int, samples: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
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
        )
        plane = ControlPlane(settings)
        started = time.perf_counter()
        await plane.start()
        assert plane.syncer is not None
        await plane.syncer.ready.wait()
        cold = time.perf_counter() - started
        client = sync_redis.Redis.from_url(redis_url)
        counts = {
            name: int(client.hlen(h))
            for name, h in (
                ("keys", contract.KEYS_HASH),
                ("models", contract.MODELS_HASH),
                ("routes", contract.ROUTES_HASH),
            )
        }
        client.close()
        if counts != {"keys": keys, "models": isvcs, "routes": isvcs}:
            raise RuntimeError(f"incomplete sync: {counts}")
        store = RedisStore(redis_url, timeout=2.0)
        latencies: list[float] = []
        try:
            async with store.subscribe() as subscription:
                events = aiter(subscription)
                for n in range(samples):
                    index = (n * 7919) % keys
                    new_key = f"sk-{index}-rotated-{n}"
                    digest = contract.digest_key(new_key, PEPPER.encode())
                    t0 = time.perf_counter()
                    await asyncio.to_thread(emulator.replace, _secret(index, new_key))
                    while True:
                        event = await anext(events)
                        if any(c.id == digest and c.value for c in event.changes):
                            break
                    latencies.append(time.perf_counter() - t0)
        finally:
            await store.close()
            await plane.stop()
    return {
        "keys": keys,
        "isvcs": isvcs,
        "cold_sync_seconds": cold,
        "samples": samples,
        "p50_ms": percentile(latencies, 0.5) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
        "max_ms": max(latencies) * 1000,
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks controlplane", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small counts: a smoke run in a few seconds")
    parser.add_argument("--keys", type=int, default=None)
    parser.add_argument("--isvcs", type=int, default=None)
    parser.add_argument("--samples", type=int, default=None)
    args = parser.parse_args(argv)
    keys = args.keys or (200 if args.quick else 10_000)
    isvcs = args.isvcs or (20 if args.quick else 1_000)
    samples = args.samples or (20 if args.quick else 200)
    logging.basicConfig(level=logging.WARNING)
    emulator = K8sEmulator(bookmark_interval=5.0).start()
    try:
        populate_started = time.perf_counter()
        _populate(emulator, keys=keys, isvcs=isvcs)
        populate = time.perf_counter() - populate_started
        with redis_server() as redis:
            result = asyncio.run(_measure(emulator, redis.url, keys=keys, isvcs=isvcs, samples=samples))
    finally:
        emulator.stop()
    rows = [
        ["objects in the emulator", f"{keys:,} key Secrets + {isvcs:,} InferenceServices + {isvcs:,} HTTPRoutes"],
        ["cold start -> Redis fully synced", f"{result['cold_sync_seconds']:.2f} s (target <= 10 s at 10k + 1k)"],
        ["Secret change -> change event, p50", f"{result['p50_ms']:.1f} ms"],
        ["Secret change -> change event, p99", f"{result['p99_ms']:.1f} ms (target <= 1000 ms)"],
        ["Secret change -> change event, max", f"{result['max_ms']:.1f} ms over {samples} changes"],
    ]
    markdown = "## Control plane\n\n" + table(["measure", "value"], rows)
    print(markdown)
    print(f"(emulator populated in {populate:.1f} s, not counted)")
    write_result("controlplane-quick" if args.quick else "controlplane", result, markdown)
    return 0
