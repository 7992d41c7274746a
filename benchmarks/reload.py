"""``python -m benchmarks reload``: the RSS of ``maas authz`` holding many keys, after its cold start, at the peak
of each full reload (the new index built beside the one serving) and after it.

A reload is asked for as the follower meets one in production: a change event whose generation skips one (missed
events). RSS is sampled every 20 ms while the reload runs; with ``--keys`` (1,000,000 by default) and three reloads
it takes about a minute here.
"""

from __future__ import annotations

import argparse
import asyncio
import threading
import time
import urllib.request
from pathlib import Path

import redis as sync_redis

from benchmarks.authz import PEPPER, bench_keys, seed_many, seed_small
from benchmarks.common import rss_bytes, table
from gateway import contract
from tests.support.procs import redis_server
from tests.support.stack import authz_process

MIB = 1024 * 1024


def reloads_done(ops_url: str) -> float:
    """``maas_snapshot_reloads_total`` summed over its reasons (the start's load included)."""
    with urllib.request.urlopen(f"{ops_url}/metrics", timeout=5) as response:
        text = response.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("maas_snapshot_reloads_total{")
    )


def reload_peak(*, pid: int, ops_url: str, redis_url: str) -> int:
    """Publish an event a generation ahead (a gap: the follower reloads) and return the highest RSS seen until
    the reload is counted."""
    before = reloads_done(ops_url)
    client = sync_redis.Redis.from_url(redis_url)
    generation = int(client.get(contract.GENERATION_KEY) or 0)
    peak = rss_bytes(pid)
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, rss_bytes(pid))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        client.publish(contract.EVENTS_CHANNEL, contract.ChangeEvent(gen=generation + 2).model_dump_json())
        while reloads_done(ops_url) <= before:
            time.sleep(0.1)
    finally:
        stop.set()
        sampler.join()
        client.close()
    return peak


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks reload")
    parser.add_argument("--keys", type=int, default=1_000_000)
    parser.add_argument("--reloads", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="20,000 keys, one reload")
    args = parser.parse_args(argv)
    keys, reloads = (20_000, 1) if args.quick else (args.keys, args.reloads)
    log_dir = Path("/tmp/maas-bench-reload")
    log_dir.mkdir(exist_ok=True)
    with redis_server() as redis:
        asyncio.run(seed_small(redis.url, bench_keys(10)))
        seed_many(redis.url, keys)
        with authz_process(redis_url=redis.url, pepper=PEPPER, log_dir=log_dir, ready_timeout=300) as authz:
            pid = authz.proc.popen.pid
            time.sleep(1)
            rows = [["cold start", "", f"{rss_bytes(pid) / MIB:.0f}"]]
            for i in range(reloads):
                peak = reload_peak(pid=pid, ops_url=authz.ops_url, redis_url=redis.url)
                time.sleep(1)
                rows.append([f"reload {i + 1}", f"{peak / MIB:.0f}", f"{rss_bytes(pid) / MIB:.0f}"])
    print(f"maas authz RSS (MiB) with {keys:,} keys")
    print(table(["", "peak", "after"], rows))
    return 0
