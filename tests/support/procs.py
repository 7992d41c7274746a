"""Start real processes (redis-server, maas subcommands, Envoy) on free ports and wait until they answer."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from controlplane.ports import free_port

VENV_BIN = Path(sys.executable).parent


def wait_port(port: int, *, timeout: float = 15.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before port {port} opened")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"port {port} did not open within {timeout}s")


def wait_http(url: str, *, timeout: float = 20.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered 200")
        try:
            with urllib.request.urlopen(url, timeout=1.0) as resp:
                if resp.status == 200:
                    return
        except (OSError, urllib.error.URLError) as exc:
            last = str(exc)
        time.sleep(0.05)
    raise TimeoutError(f"{url} not ready within {timeout}s: {last}")


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    ports: dict[str, int] = field(default_factory=dict)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, *, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        return self.popen.returncode


def start(name: str, argv: Sequence[str], *, env: dict[str, str] | None = None, log_dir: Path) -> Proc:
    log_path = log_dir / f"{name}.log"
    handle = log_path.open("wb")
    full_env = {**os.environ, **(env or {})}
    popen = subprocess.Popen(list(argv), stdout=handle, stderr=subprocess.STDOUT, env=full_env)
    handle.close()
    return Proc(name=name, popen=popen, log_path=log_path)


def maas_argv(*args: str) -> list[str]:
    return (
        [str(VENV_BIN / "maas"), *args]
        if (VENV_BIN / "maas").exists()
        else [sys.executable, "-m", "controlplane.cli", *args]
    )


@dataclass
class RedisServer:
    port: int
    proc: Proc
    data_dir: Path
    argv: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def kill(self) -> None:
        self.proc.stop(sig=signal.SIGKILL)

    def restart(self) -> None:
        """Start the killed server again with the same arguments and directory (a cluster node keeps its nodes
        file, so it comes back with its slots; its data is gone)."""
        self.proc = start(f"redis-{self.port}", self.argv, log_dir=self.data_dir)
        wait_port(self.port, proc=self.proc.popen)


def redis_binary() -> str | None:
    return shutil.which("redis-server")


@contextlib.contextmanager
def redis_server(*, port: int | None = None, extra: Sequence[str] = ()) -> Iterator[RedisServer]:
    binary = redis_binary()
    if binary is None:
        raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
    data_dir = Path(tempfile.mkdtemp(prefix="maas-redis-"))
    port = port or free_port()
    argv = [
        binary,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(data_dir),
        *extra,
    ]
    server = RedisServer(port=port, proc=start(f"redis-{port}", argv, log_dir=data_dir), data_dir=data_dir, argv=argv)
    try:
        wait_port(port, proc=server.proc.popen)
        yield server
    finally:
        server.proc.stop(sig=signal.SIGKILL)
        shutil.rmtree(data_dir, ignore_errors=True)


@dataclass
class RedisCluster:
    nodes: list[RedisServer]

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}/0"


def _cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free and valid too."""
    for _ in range(200):
        port = random.randint(20000, 29999)
        try:
            for candidate in (port, port + 10000):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a redis cluster node")


@contextlib.contextmanager
def redis_cluster(
    *, size: int = 3, replica_of_first: bool = False, node_timeout_ms: int = 15000
) -> Iterator[RedisCluster]:
    """A real Redis Cluster of ``size`` masters on free ports; with ``replica_of_first`` one more node, the last,
    replicates the first (the URL's node). ``node_timeout_ms``: how long a silent node takes to be failed."""
    with contextlib.ExitStack() as stack:
        nodes = [
            stack.enter_context(
                redis_server(
                    port=_cluster_port(),
                    extra=(
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        f"nodes-{i}.conf",
                        "--cluster-node-timeout",
                        str(node_timeout_ms),
                        "--repl-diskless-sync-delay",
                        "0",
                    ),
                )
            )
            for i in range(size + int(replica_of_first))
        ]
        cli = shutil.which("redis-cli") or "redis-cli"

        def run(*args: str) -> str:
            done = subprocess.run([cli, *args], check=True, capture_output=True, text=True, timeout=30)
            return done.stdout

        run(
            "--cluster",
            "create",
            *(f"127.0.0.1:{n.port}" for n in nodes[:size]),
            "--cluster-replicas",
            "0",
            "--cluster-yes",
        )
        if replica_of_first:
            master = run("-p", str(nodes[0].port), "cluster", "myid").strip()
            run("-p", str(nodes[-1].port), "cluster", "meet", "127.0.0.1", str(nodes[0].port))
            _wait_cluster(cli, nodes, lambda info, n: f"cluster_known_nodes:{len(nodes)}" in info)
            run("-p", str(nodes[-1].port), "cluster", "replicate", master)
            # a replica that has not synced yet would not take over
            _wait_cluster(
                cli,
                nodes[-1:],
                lambda info, n: "master_link_status:up" in run("-p", str(n.port), "info", "replication"),
            )
        _wait_cluster(cli, nodes, lambda info, n: "cluster_state:ok" in info)
        yield RedisCluster(nodes=nodes)


def _wait_cluster(cli: str, nodes: Sequence[RedisServer], ok: Callable[[str, RedisServer], bool]) -> None:
    deadline = time.monotonic() + 20
    while True:
        infos = [
            subprocess.run(
                [cli, "-p", str(n.port), "cluster", "info"], capture_output=True, text=True, timeout=5, check=False
            ).stdout
            for n in nodes
        ]
        if all(ok(info, n) for info, n in zip(infos, nodes, strict=True)):
            return
        if time.monotonic() > deadline:
            raise TimeoutError("redis cluster did not become ok")
        time.sleep(0.05)
