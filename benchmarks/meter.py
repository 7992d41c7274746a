"""``make bench-meter``: streaming through ``maas meter`` vs. straight to ``maas sim``, side by side in one run.

Real processes (``maas sim``, ``maas meter`` on real Redis, signed identity with a token limit so every request
reserves and commits), 64 concurrent streams from an aiohttp client. Two scenarios:
- paced: the simulator streams at a vLLM-like pace per stream (default 50 tokens/s); the meter should keep up,
  so tokens/s through the meter should be >= 0.9 x direct;
- unpaced: the simulator streams as fast as it can; on a 2-core machine the client, the simulator, the meter and
  Redis share the CPUs, so this ratio shows the meter's CPU cost rather than a ceiling.
Added time to first token: p50 and p99 of the first-token latency through the meter minus the same percentile
direct, with the simulator's own time to first token at 0. In the paced scenario 64 workers start spread over one
stream's duration and then stream back to back; only streams that start while all 64 workers are streaming are
timed (steady load of 64 streams); in the unpaced one they all start at once, so its first tokens queue behind each
other on both sides. A third measurement, one stream at a time (short paced streams, no
other load), gives the meter's own hop without the CPU contention of 64 streams on two shared cores.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks.common import percentile, table, write_result
from gateway.identity import Identity, sign
from tests.support.procs import Proc, free_port, maas_argv, redis_binary, redis_server, start, wait_http

SECRET = "bench-identity-secret-0123456789"
PEPPER = "bench-pepper-0123456789abcdef"
MODEL = "bench-model"
TOKEN_MARK = b'"delta":{"content":'


@dataclass
class Round:
    tokens: int
    seconds: float
    ttft: list[float]

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


@contextlib.contextmanager
def _processes(*, tps: float, log_dir: Path) -> Iterator[tuple[str, str]]:
    with contextlib.ExitStack() as stack:
        redis_url = stack.enter_context(redis_server()).url if redis_binary() else "memory://"
        sim_port, meter_port, ops_port = free_port(), free_port(), free_port()
        common = ["--host", "127.0.0.1", "--log-format", "text", "--log-level", "warning"]
        sim = start(
            f"sim-{sim_port}",
            maas_argv(
                "sim", "--port", str(sim_port), "--served-model-name", MODEL, "--tokens-per-second", str(tps), *common
            ),
            log_dir=log_dir,
        )
        stack.callback(sim.stop)
        wait_http(f"http://127.0.0.1:{sim_port}/health", proc=sim.popen)
        meter_args = ["--upstream", f"http://127.0.0.1:{sim_port}", "--redis-url", redis_url, "--key-pepper", PEPPER]
        meter_args += ["--identity-secret", SECRET, "--port", str(meter_port), "--ops-port", str(ops_port)]
        meter: Proc = start(f"meter-{meter_port}", maas_argv("meter", *meter_args, *common), log_dir=log_dir)
        stack.callback(meter.stop)
        wait_http(f"http://127.0.0.1:{ops_port}/readyz", proc=meter.popen)
        yield f"http://127.0.0.1:{sim_port}", f"http://127.0.0.1:{meter_port}"


def _headers(index: int) -> dict[str, str]:
    identity = Identity(
        key_id=f"bench{index % 8}", user="bench", groups="", tier="enterprise", model=MODEL,
        token_limit=1_000_000_000, token_window_ms=60_000,
    )  # fmt: skip
    return {**sign(identity, SECRET.encode()), "content-type": "application/json"}


async def _stream(
    session: aiohttp.ClientSession, url: str, *, index: int, tokens: int, delay: float = 0.0
) -> tuple[int, float]:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"benchmark stream {index}"}],
        "max_tokens": tokens,
        "ignore_eos": True,
        "stream": True,
    }
    if delay:
        await asyncio.sleep(delay)
    started = time.perf_counter()
    ttft = 0.0
    count = 0
    async with session.post(url + "/v1/chat/completions", json=body, headers=_headers(index)) as resp:
        if resp.status != 200:
            raise RuntimeError(f"{url}: HTTP {resp.status}: {await resp.text()}")
        async for data in resp.content.iter_any():
            found = data.count(TOKEN_MARK)
            if found and not count:
                ttft = time.perf_counter() - started
            count += found
    return count, ttft


async def _round(url: str, *, streams: int, tokens: int, stagger: float, waves: int) -> Round:
    """``streams`` workers; with a stagger, worker i starts i * stagger late and runs ``1 + waves`` streams back to
    back, and only the streams after each worker's first are timed: each of them starts while all ``streams``
    workers are streaming (steady load). Without a stagger, one stream per worker, all at once."""
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=300)) as session:
        await asyncio.gather(*(_stream(session, url, index=i, tokens=2) for i in range(streams)))  # warm connections

        async def worker(index: int) -> tuple[int, list[float]]:
            count, timed = 0, []
            for wave in range(1 + waves if stagger else 1):
                got, ttft = await _stream(
                    session, url, index=index, tokens=tokens, delay=index * stagger if wave == 0 else 0.0
                )
                count += got
                if wave > 0 or not stagger:
                    timed.append(ttft)
            return count, timed

        started = time.perf_counter()
        results = await asyncio.gather(*(worker(i) for i in range(streams)))
        seconds = time.perf_counter() - started
    return Round(tokens=sum(r[0] for r in results), seconds=seconds, ttft=[t for r in results for t in r[1]])


async def _scenario(
    direct: str, metered: str, *, streams: int, tokens: int, reps: int, stagger: float, waves: int
) -> dict[str, Any]:
    rounds: dict[str, list[Round]] = {"direct": [], "meter": []}
    for _ in range(reps):  # alternate, so drift on a shared machine hits both sides alike
        for side, url in (("direct", direct), ("meter", metered)):
            rounds[side].append(await _round(url, streams=streams, tokens=tokens, stagger=stagger, waves=waves))
    out: dict[str, Any] = {}
    for side, items in rounds.items():
        ttft = [t for r in items for t in r.ttft]
        out[side] = {
            "tokens_per_s": statistics.median(r.rate for r in items),
            "ttft_p50_ms": percentile(ttft, 0.5) * 1000,
            "ttft_p99_ms": percentile(ttft, 0.99) * 1000,
        }
    out["ratio"] = out["meter"]["tokens_per_s"] / out["direct"]["tokens_per_s"]
    out["added_ttft_p50_ms"] = out["meter"]["ttft_p50_ms"] - out["direct"]["ttft_p50_ms"]
    out["added_ttft_p99_ms"] = out["meter"]["ttft_p99_ms"] - out["direct"]["ttft_p99_ms"]
    return out


async def _one_at_a_time(direct: str, metered: str, *, count: int, reps: int) -> dict[str, Any]:
    ttft: dict[str, list[float]] = {"direct": [], "meter": []}
    async with aiohttp.ClientSession() as session:
        for url in (direct, metered):  # warm connections and code paths
            for i in range(10):
                await _stream(session, url, index=i, tokens=2)
        for _ in range(reps):
            for side, url in (("direct", direct), ("meter", metered)):
                for i in range(count):
                    ttft[side].append((await _stream(session, url, index=i, tokens=2))[1])
    out: dict[str, Any] = {
        side: {"ttft_p50_ms": percentile(v, 0.5) * 1000, "ttft_p99_ms": percentile(v, 0.99) * 1000}
        for side, v in ttft.items()
    }
    out["added_ttft_p50_ms"] = out["meter"]["ttft_p50_ms"] - out["direct"]["ttft_p50_ms"]
    out["added_ttft_p99_ms"] = out["meter"]["ttft_p99_ms"] - out["direct"]["ttft_p99_ms"]
    return out


def run(*, quick: bool, streams: int, tps: float, log_dir: Path) -> dict[str, Any]:
    reps = 1 if quick else 3
    results: dict[str, Any] = {}
    with _processes(tps=tps, log_dir=log_dir) as (direct, metered):
        results["one_at_a_time"] = asyncio.run(_one_at_a_time(direct, metered, count=30 if quick else 100, reps=reps))
    for name, pace, tokens in (("paced", tps, 20 if quick else 200), ("unpaced", 0.0, 50 if quick else 500)):
        # paced: starts spread over one stream's duration and each worker streaming back to back, so first tokens
        # are timed while all the streams run (steady load), not in a burst of simultaneous arrivals; unpaced: all
        # at once, for throughput
        stagger = tokens / pace / streams if pace else 0.0
        with _processes(tps=pace, log_dir=log_dir) as (direct, metered):
            results[name] = asyncio.run(
                _scenario(
                    direct,
                    metered,
                    streams=streams,
                    tokens=tokens,
                    reps=reps + 2 if pace and not quick else reps,  # the first-token p50 drifts most between rounds
                    stagger=stagger,
                    waves=1 if quick else 2,
                )
            )
            results[name].update(tokens_per_stream=tokens, tokens_per_second_per_stream=pace)
    return results


def report(results: dict[str, Any], *, streams: int) -> str:
    rows = []
    for name, r in results.items():
        if name == "one_at_a_time":
            continue
        pace = f"{r['tokens_per_second_per_stream']:g} tok/s" if r["tokens_per_second_per_stream"] else "unpaced"
        rows.append(
            (
                f"{name} ({pace}, {r['tokens_per_stream']} tok/stream)",
                r["direct"]["tokens_per_s"],
                r["meter"]["tokens_per_s"],
                r["ratio"],
                r["direct"]["ttft_p50_ms"],
                r["added_ttft_p50_ms"],
                r["added_ttft_p99_ms"],
            )
        )
    headers = ("scenario", "direct tok/s", "meter tok/s", "ratio", "direct TTFT p50 ms", "added p50 ms", "added p99 ms")
    out = f"maas meter vs. direct, {streams} concurrent streams\n\n" + table(headers, rows)
    single = results.get("one_at_a_time")
    if single is not None:
        out += "\n\nOne stream at a time (no other load): time to first token\n\n" + table(
            ("side", "p50 ms", "p99 ms"),
            [
                ("direct", single["direct"]["ttft_p50_ms"], single["direct"]["ttft_p99_ms"]),
                ("through the meter", single["meter"]["ttft_p50_ms"], single["meter"]["ttft_p99_ms"]),
                ("added", single["added_ttft_p50_ms"], single["added_ttft_p99_ms"]),
            ],
        )
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks meter", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short streams, one round (a few seconds)")
    parser.add_argument("--streams", type=int, default=64, help="concurrent streams")
    parser.add_argument("--tokens-per-second", type=float, default=50.0, help="per-stream pace of the paced scenario")
    parser.add_argument("--log-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="maas-bench-meter-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    results = run(quick=args.quick, streams=args.streams, tps=args.tokens_per_second, log_dir=log_dir)
    markdown = report(results, streams=args.streams)
    print(markdown)
    if not args.quick:
        path = write_result("meter", {"streams": args.streams, **results}, markdown)
        print(f"\nraw results: {path}")
    return 0
