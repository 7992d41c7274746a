"""``make demo`` works on a fresh clone: the Makefile creates the venv, installs, and the demo comes up."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from tests.support.procs import free_port

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.redis, pytest.mark.envoy]


def test_make_demo_on_a_fresh_clone(tmp_path: Path) -> None:
    if not (ROOT / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not a git checkout: nothing to clone")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True, timeout=120)
    port, admin = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAAS_", "VIRTUAL_ENV", "PYTHON"))}
    make = subprocess.Popen(
        ["make", "demo", f"DEMO_ARGS=--port {port} --admin-port {admin}"],
        cwd=clone,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )
    assert make.stdout is not None
    output: list[str] = []
    try:
        deadline = time.monotonic() + 420
        while not (output and output[-1].startswith("ready ")):
            line = make.stdout.readline()
            assert line, "make demo ended before it was ready:\n" + "".join(output[-40:])
            output.append(line)
            assert time.monotonic() < deadline, "".join(output[-40:])
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/qwen3/v1/chat/completions",
            data=json.dumps({"model": "qwen3-0-6b-instruct", "messages": [{"role": "user", "content": "Hi"}]}).encode(),
            headers={"Authorization": "APIKEY admin-key-12345", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as resp:
            assert resp.status == 200
            assert json.loads(resp.read())["usage"]["total_tokens"] > 0
    finally:
        if make.poll() is None:
            os.killpg(make.pid, signal.SIGTERM)
            try:
                make.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(make.pid, signal.SIGKILL)
                make.wait(10)
        make.stdout.close()


def pins() -> dict[str, str]:
    found: dict[str, str] = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin"
            found[canonical(name)] = version
    return found


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_installed_distribution_is_pinned() -> None:
    """What ``make install`` put in the venv is exactly what constraints.txt pins: a dependency added to
    pyproject.toml without a pin would float to whatever its newest release is on the next fresh checkout."""
    pinned = pins()
    unpinned, drifted = [], []
    for dist in importlib.metadata.distributions():
        name = canonical(dist.metadata["Name"])
        if name in {"maas-gateway", "pip", "setuptools", "wheel"}:
            continue
        if name not in pinned:
            unpinned.append(name)
        elif pinned[name] != dist.version:
            drifted.append(f"{name} {dist.version} (pinned {pinned[name]})")
    assert not unpinned, f"installed but not in constraints.txt: {sorted(unpinned)}"
    assert not drifted, f"installed versions differ from constraints.txt (run `make install`): {drifted}"
