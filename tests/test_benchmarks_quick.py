"""The benchmarks run once in their quick mode, so they never rot (their numbers are not asserted here)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.redis, pytest.mark.envoy]


@pytest.mark.parametrize("suite", ["all", "authz", "authz --unix-socket", "controlplane", "meter"])
def test_quick_benchmark_runs(suite: str) -> None:
    if shutil.which("wrk") is None and suite.split()[0] in ("all", "authz"):
        pytest.skip("wrk is not installed (Debian package 'wrk'; .ci/run installs it)")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", *suite.split(), "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "|" in proc.stdout  # a table was printed
    if "--unix-socket" in suite:
        assert "maas authz reaches Redis over a Unix socket" in proc.stdout
