"""Two ``maas controlplane`` processes with Lease leader election against the emulator: only the leader writes;
killing it hands the lease (and the writing) over to the other."""

from __future__ import annotations

import re
import signal
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis as sync_redis

from gateway import contract
from tests.conftest import PEPPER
from tests.support import procs
from tests.support.k8s_emulator import K8sEmulator
from tests.test_controlplane_kube import key_secret

pytestmark = pytest.mark.redis

LEASE_DURATION = 2.0


def wait_until(check: Callable[[], Any], *, within: float = 20.0) -> Any:
    deadline = time.monotonic() + within
    value: Any = None
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"condition not met within {within}s (last value: {value!r})")


def metric(ops_port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{ops_port}/metrics", timeout=5).read().decode()
    match = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def start_plane(identity: str, *, kubeconfig: Path, redis_url: str, log_dir: Path) -> procs.Proc:
    ports = {"main": procs.free_port(), "ops": procs.free_port()}
    argv = procs.maas_argv(
        "controlplane",
        "--source=kubernetes",
        f"--kubeconfig={kubeconfig}",
        f"--redis-url={redis_url}",
        "--host=127.0.0.1",
        f"--port={ports['main']}",
        f"--ops-port={ports['ops']}",
        f"--identity={identity}",
        "--leader-election",
        f"--lease-duration={LEASE_DURATION}",
        "--renew-deadline=1.5",
        "--retry-period=0.2",
        "--backoff-max=0.5",
        "--log-format=text",
    )
    proc = procs.start(identity, argv, log_dir=log_dir)
    proc.ports = ports
    return proc


def test_only_the_leader_writes_and_a_killed_leader_hands_over(
    emulator: K8sEmulator, tmp_path: Path, redis_url: str, log_dir: Path
) -> None:
    kubeconfig = emulator.write_kubeconfig(tmp_path / "kubeconfig")
    emulator.create(key_secret("first", "sk-first"))
    planes = {name: start_plane(name, kubeconfig=kubeconfig, redis_url=redis_url, log_dir=log_dir) for name in "ab"}
    client = sync_redis.Redis.from_url(redis_url)
    try:
        for proc in planes.values():
            procs.wait_http(f"http://127.0.0.1:{proc.ports['ops']}/readyz", proc=proc.popen)

        def holder() -> str:
            lease = emulator.get("coordination.k8s.io/v1", "Lease", "default", "maas-controlplane")
            return str((lease or {}).get("spec", {}).get("holderIdentity") or "")

        leader_name = wait_until(holder)
        follower_name = "b" if leader_name == "a" else "a"
        leader, follower = planes[leader_name], planes[follower_name]
        first = contract.digest_key("sk-first", PEPPER)
        wait_until(lambda: client.hget(contract.KEYS_HASH, first))
        emulator.create(key_secret("second", "sk-second"))
        wait_until(lambda: client.hget(contract.KEYS_HASH, contract.digest_key("sk-second", PEPPER)))

        assert metric(leader.ports["ops"], "maas_controlplane_leader") == 1.0
        assert metric(follower.ports["ops"], "maas_controlplane_leader") == 0.0
        assert metric(leader.ports["ops"], 'maas_controlplane_record_writes_total{op="put"}') >= 2
        assert metric(follower.ports["ops"], 'maas_controlplane_record_writes_total{op="put"}') == 0.0

        leader.stop(sig=signal.SIGKILL)
        emulator.create(key_secret("third", "sk-third"))
        wait_until(lambda: holder() == follower_name, within=LEASE_DURATION * 5)
        wait_until(lambda: client.hget(contract.KEYS_HASH, contract.digest_key("sk-third", PEPPER)))
        assert metric(follower.ports["ops"], "maas_controlplane_leader") == 1.0
        lease = emulator.get("coordination.k8s.io/v1", "Lease", "default", "maas-controlplane")
        assert lease is not None and lease["spec"]["leaseTransitions"] == 1
    finally:
        client.close()
        for proc in planes.values():
            proc.stop()


def test_graceful_shutdown_releases_the_lease(
    emulator: K8sEmulator, tmp_path: Path, redis_url: str, log_dir: Path
) -> None:
    kubeconfig = emulator.write_kubeconfig(tmp_path / "kubeconfig")
    proc = start_plane("solo", kubeconfig=kubeconfig, redis_url=redis_url, log_dir=log_dir)
    try:
        procs.wait_http(f"http://127.0.0.1:{proc.ports['ops']}/readyz", proc=proc.popen)

        def spec() -> dict[str, Any]:
            lease = emulator.get("coordination.k8s.io/v1", "Lease", "default", "maas-controlplane")
            return dict((lease or {}).get("spec") or {})

        wait_until(lambda: spec().get("holderIdentity") == "solo")
        assert proc.stop() == 0
        assert spec()["holderIdentity"] == ""
    finally:
        proc.stop()
