"""``make demo`` works on a fresh clone: the Makefile creates the venv, installs, and the demo comes up."""

from __future__ import annotations

import json
import os
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
