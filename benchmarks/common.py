"""Shared benchmark plumbing: wrk runs with a JSON summary, process RSS, result files and Markdown tables."""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"

WRK_SCRIPT = """
local keys = {%(keys)s}
local path = "%(path)s"
local method = "%(method)s"
local body = %(body)s
local interval = %(interval)s
local connections = %(connections)s
local n = 0
local delays = 0
request = function()
  n = n + 1
  local headers = {}
  if body then headers["Content-Type"] = "application/json" end
  if #keys > 0 then headers["Authorization"] = "APIKEY " .. keys[(n %% #keys) + 1] end
  return wrk.format(method, path, headers, body)
end
if interval > 0 then
  -- wrk asks for a delay before every request, the first one of each connection included: spread those first
  -- requests over one interval, else all connections send together and a "fixed rate" is a train of bursts
  delay = function()
    delays = delays + 1
    if delays <= connections then return math.floor(interval * (delays - 1) / connections) end
    return interval
  end
end
done = function(summary, latency, requests)
  local p = {}
  for _, q in ipairs({50, 90, 99, 99.9}) do p[tostring(q)] = latency:percentile(q) end
  io.write(string.format('WRKJSON {"requests": %%d, "duration_us": %%d, "non2xx": %%d, "errors": %%d, ' ..
    '"p50_us": %%d, "p90_us": %%d, "p99_us": %%d, "p999_us": %%d, "mean_us": %%f}\\n',
    summary.requests, summary.duration, summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    p["50"], p["90"], p["99"], p["99.9"], latency.mean))
end
"""


@dataclass
class WrkResult:
    requests: int
    duration_us: int
    non2xx: int
    errors: int
    p50_us: int
    p90_us: int
    p99_us: int
    p999_us: int
    mean_us: float

    @property
    def rps(self) -> float:
        return self.requests / (self.duration_us / 1e6) if self.duration_us else 0.0


def wrk_binary() -> str:
    found = shutil.which("wrk")
    if found is None:
        raise SystemExit("wrk is not installed: apt-get install wrk")
    return found


def run_wrk(
    url: str,
    *,
    path: str,
    keys: Sequence[str] = (),
    duration: float = 10.0,
    connections: int = 32,
    threads: int = 1,
    rate: float | None = None,
    body: str | None = None,
) -> WrkResult:
    """Closed-loop saturation, or a paced rate (wrk's ``delay()``: each connection waits connections/rate between
    requests, the connections' first requests spread evenly over one such wait)."""
    interval = int(connections / rate * 1000) if rate else 0
    script = WRK_SCRIPT % {
        "keys": ", ".join(json.dumps(k) for k in keys),
        "path": path,
        "interval": interval,
        "connections": max(1, connections // threads),  # per wrk thread: each has its own Lua state
        "method": "POST" if body is not None else "GET",
        "body": json.dumps(body) if body is not None else "nil",
    }
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as handle:
        handle.write(script)
        script_path = handle.name
    try:
        proc = subprocess.run(
            [
                wrk_binary(),
                "-t",
                str(threads),
                "-c",
                str(connections),
                "-d",
                f"{max(1, round(duration))}s",
                "--latency",
                "-s",
                script_path,
                url,
            ],
            capture_output=True,
            text=True,
            timeout=duration + 60,
            check=True,
        )
    finally:
        os.unlink(script_path)
    line = next(x for x in proc.stdout.splitlines() if x.startswith("WRKJSON "))
    return WrkResult(**json.loads(line[len("WRKJSON ") :]))


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else 0.0


def percentile(values: Sequence[float], q: float) -> float:
    """The value at fraction ``q`` (0-1) of the sorted values; 0.0 for none."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def machine() -> dict[str, Any]:
    cpu = "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def fmt(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:,.2f}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _plain(value: Any) -> Any:
    return asdict(value) if hasattr(value, "__dataclass_fields__") else str(value)


def write_result(name: str, data: dict[str, Any], markdown: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"machine": machine(), **data}
    path = RESULTS / f"{name}.json"
    path.write_text(
        json.dumps(payload, indent=2, default=lambda o: asdict(o) if hasattr(o, "__dataclass_fields__") else str(o))
    )
    (RESULTS / f"{name}.md").write_text(markdown + "\n")
    return path
