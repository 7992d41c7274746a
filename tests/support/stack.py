"""Context managers that run the real processes of the stack on free ports: maas authz, Envoy, the echo upstream."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from controlplane import envoy
from tests.support.procs import Proc, free_port, maas_argv, start, wait_http, wait_port

IDENTITY_SECRET = "test-identity-secret-0123456789"


@dataclass
class Authz:
    proc: Proc
    port: int
    ops_port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ops_url(self) -> str:
        return f"http://127.0.0.1:{self.ops_port}"


@contextlib.contextmanager
def authz_process(
    *,
    redis_url: str,
    pepper: bytes,
    log_dir: Path,
    args: Sequence[str] = (),
    name: str = "authz",
    ready_timeout: float = 20.0,
    wait_ready: bool = True,
) -> Iterator[Authz]:
    """``maas authz`` on free ports, once its /readyz answers 200 (``wait_ready=False``: once its ops port is open,
    for a process that cannot get ready)."""
    port, ops_port = free_port(), free_port()
    argv = maas_argv(
        "authz",
        "--redis-url",
        redis_url,
        "--key-pepper",
        pepper.decode(),
        "--identity-secret",
        IDENTITY_SECRET,
        "--port",
        str(port),
        "--ops-port",
        str(ops_port),
        "--host",
        "127.0.0.1",
        "--log-format",
        "text",
        *args,
    )
    proc = start(name, argv, log_dir=log_dir)
    try:
        if wait_ready:
            wait_http(f"http://127.0.0.1:{ops_port}/readyz", proc=proc.popen, timeout=ready_timeout)
        else:
            wait_port(ops_port, proc=proc.popen, timeout=ready_timeout)
        yield Authz(proc=proc, port=port, ops_port=ops_port)
    finally:
        proc.stop()


@contextlib.contextmanager
def echo_process(*, log_dir: Path, name: str = "echo") -> Iterator[int]:
    """The echo upstream on a free port; its answers carry ``name`` as ``upstream``."""
    port = free_port()
    proc = start(f"{name}-{port}", [sys.executable, "-m", "tests.support.echo", str(port), name], log_dir=log_dir)
    try:
        wait_port(port, proc=proc.popen)
        yield port
    finally:
        proc.stop()


@dataclass
class Envoy:
    proc: Proc
    port: int
    admin_port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@contextlib.contextmanager
def envoy_process(
    *,
    routes: Sequence[envoy.Route],
    clusters: Sequence[envoy.Cluster],
    authz_port: int | None,
    log_dir: Path,
    path_prefix: str = "",
    authz_timeout_s: float = 1.0,
) -> Iterator[Envoy]:
    for attempt in range(3):
        port, admin_port = free_port(), free_port()
        gw = envoy.Gateway(
            listen_port=port,
            admin_port=admin_port,
            authz=envoy.Cluster("maas-authz", authz_port) if authz_port is not None else None,
            routes=routes,
            clusters=clusters,
            path_prefix=path_prefix,
            authz_timeout_s=authz_timeout_s,
        )
        config = envoy.write_config(gw, log_dir / f"envoy-{port}.json")
        proc = start(f"envoy-{port}", envoy.command(config), log_dir=log_dir)
        try:
            wait_http(f"http://127.0.0.1:{admin_port}/ready", proc=proc.popen)
        except RuntimeError as exc:  # exited early: a port taken by another process is retried on new ports
            proc.stop()
            tail = proc.log()[-2000:]
            if attempt == 2 or "already in use" not in tail:
                raise RuntimeError(f"{exc}; Envoy's log ends with:\n{tail}") from exc
            continue
        except BaseException:
            proc.stop()
            raise
        break
    try:
        yield Envoy(proc=proc, port=port, admin_port=admin_port)
    finally:
        proc.stop()
