"""``maas demo``: the seed guide's platform on one machine, from the same manifests as ``deploy/``.

Starts and owns, as child processes: Redis (``redis-server`` on a free port with a temporary data dir), ``maas
controlplane --source dir:`` over a copy of the sample manifests, ``maas authz``, one ``maas sim`` per
InferenceService with a ``maas meter`` in front of it (the predictor pod of the cluster layout), and a real Envoy
programmed as Istio programs the gateway (ext_authz for the CUSTOM AuthorizationPolicy, HTTPRoute prefixes and
rewrites). The InferenceServices get the status KServe would write once their predictor answers.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from controlplane import envoy
from controlplane.ports import free_port, reserve

SAMPLE_FILES = (
    "models/servingruntime.yaml",
    "models/inferenceservices.yaml",
    "models/httproutes.yaml",
    "models/samples/sample-keys.yaml",
    "base/tiers.yaml",
)
DEMO_NAMESPACE = "llm"
SELF_SERVICE_PATHS = ("/v1/models", "/v1/me")
SELF_SERVICE_FILE = "istio/self-service.yaml"


def _default_deploy_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "deploy"


def _port(text: str) -> int:
    """A TCP port the user picks: a bad one is a usage error here, not an Envoy config dump later."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is a number from 1 to 65535, not {port}")
    return port


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number, 0 or more, not {text}")
    return value


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--port", type=_port, default=8000, help="Envoy gateway port (the guide's port-forward; default %(default)s)"
    )
    parser.add_argument(
        "--admin-port", type=_port, default=8001, help="admin API port (maas controlplane; default %(default)s)"
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address Envoy and the admin API listen on (default %(default)s)"
    )
    parser.add_argument(
        "--deploy-dir",
        type=Path,
        default=None,
        help="deploy/ folder with the sample manifests (default: the one of this checkout)",
    )
    parser.add_argument(
        "--ttft-ms",
        type=_non_negative,
        default=30.0,
        help="simulated time to first token, milliseconds (default %(default)g)",
    )
    parser.add_argument(
        "--tokens-per-second",
        type=_non_negative,
        default=200.0,
        help="simulated tokens per second per stream (default %(default)g)",
    )
    parser.add_argument(
        "--ready-timeout", type=_non_negative, default=60.0, help="seconds to wait for every part (default %(default)g)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (manifests, logs)")
    parser.add_argument(
        "--store",
        choices=("auto", "redis", "memory"),
        default="auto",
        help="redis: a redis-server child; memory: every part in one process; auto: redis when redis-server is found",
    )


def _child_env() -> dict[str, str]:
    """The demo configures its children with flags only: MAAS_* variables meant for a real deployment (a pepper,
    a Redis URL) must not leak into it."""
    return {k: v for k, v in os.environ.items() if not k.startswith("MAAS_")}


def _die_with_parent() -> None:
    """Children get SIGTERM if the demo itself is killed, so nothing outlives it."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class Child:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    ready_url: str | None = None

    def tail(self, lines: int = 20) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class Model:
    name: str
    sim_port: int = field(default_factory=free_port)
    meter_port: int = field(default_factory=free_port)
    meter_ops: int = field(default_factory=free_port)


class Demo:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        reserve(args.port, args.admin_port)  # the children's ports are picked around the two the user chose
        self.deploy = (args.deploy_dir or _default_deploy_dir()).resolve()
        self.tmp = Path(tempfile.mkdtemp(prefix="maas-demo-"))
        self.manifests = self.tmp / "manifests"
        self.logs = self.tmp / "logs"
        self.children: list[Child] = []
        self.redis_url = ""
        self.redis_note = ""

    # --- children -------------------------------------------------------------------------------------------

    def spawn(self, name: str, argv: list[str], *, ready_url: str | None = None) -> Child:
        log = self.logs / f"{name}.log"
        with log.open("wb") as handle:
            popen = subprocess.Popen(
                argv,
                stdout=handle,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=_child_env(),
                preexec_fn=_die_with_parent,
            )
        child = Child(name=name, popen=popen, log=log, ready_url=ready_url)
        self.children.append(child)
        return child

    def maas(self, name: str, *args: str, ready_url: str | None = None) -> Child:
        return self.spawn(name, [sys.executable, "-m", "controlplane.cli", *args], ready_url=ready_url)

    def stop(self) -> None:
        for child in reversed(self.children):
            if child.popen.poll() is None:
                child.popen.terminate()
        deadline = time.monotonic() + 10
        for child in self.children:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.popen.wait(max(0.1, deadline - time.monotonic()))
            if child.popen.poll() is None:
                child.popen.kill()
                child.popen.wait(5)
        if not self.args.keep:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def dead(self) -> Child | None:
        return next((c for c in self.children if c.popen.poll() is not None), None)

    # --- setup ----------------------------------------------------------------------------------------------

    def load_manifests(self) -> list[dict[str, Any]]:
        docs: list[dict[str, Any]] = []
        for rel in SAMPLE_FILES:
            path = self.deploy / rel
            if not path.exists():
                raise SystemExit(f"maas demo: sample manifest {path} is missing (run from the source tree)")
            docs += [d for d in yaml.safe_load_all(path.read_text()) if isinstance(d, dict)]
        return docs

    def write_manifests(self, docs: list[dict[str, Any]], models: dict[str, Model]) -> None:
        """The samples with the status KServe writes for a ready predictor, plus the self-service route."""
        self.manifests.mkdir(parents=True)
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        out = []
        for doc in docs:
            if doc.get("kind") == "InferenceService":
                name = doc["metadata"]["name"]
                url = f"http://127.0.0.1:{models[name].meter_port}"
                conditions = [
                    {"type": t, "status": "True", "lastTransitionTime": now}
                    for t in ("PredictorReady", "IngressReady", "Ready")
                ]
                doc = {**doc, "status": {"url": url, "address": {"url": url}, "conditions": conditions}}
            out.append(doc)
        out.append(self_service_route(self.deploy))
        (self.manifests / "demo.yaml").write_text(yaml.safe_dump_all(out, sort_keys=False))

    def start_redis(self) -> bool:
        """A redis-server child; False when the demo should run on the in-memory store instead."""
        binary = shutil.which("redis-server")
        if self.args.store == "memory" or (binary is None and self.args.store == "auto"):
            why = "as asked" if self.args.store == "memory" else "redis-server was not found on PATH"
            print(
                f"maas demo: {why}: running every part in one process on the in-memory store (state is lost at "
                "exit; install redis-server for the real layout: one process per part)",
                flush=True,
            )
            self.redis_url = "memory:// (one process)"
            return False
        if binary is None:
            raise SystemExit("maas demo: --store redis, but redis-server was not found (apt-get install redis-server)")
        port = free_port()
        data = self.tmp / "redis"
        data.mkdir()
        self.spawn(
            "redis",
            [
                binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(data),
                "--save",
                "",
                "--appendonly",
                "no",
            ],
        )
        self.redis_url = f"redis://127.0.0.1:{port}/0"
        _wait_port(port, timeout=10)
        return True

    def start(self) -> tuple[int, dict[str, Model]]:
        self.logs.mkdir(parents=True)
        docs = self.load_manifests()
        models = {
            d["metadata"]["name"]: Model(d["metadata"]["name"]) for d in docs if d.get("kind") == "InferenceService"
        }
        self.write_manifests(docs, models)
        cp_ops, authz_port, authz_ops = free_port(), free_port(), free_port()
        if self.start_redis():
            self.start_processes(models, cp_ops=cp_ops, authz_port=authz_port, authz_ops=authz_ops)
        else:
            self.start_single_process(models, cp_ops=cp_ops, authz_port=authz_port, authz_ops=authz_ops)
        admin_port = free_port()
        gateway = envoy_gateway(
            docs,
            models,
            listen_port=self.args.port,
            admin_port=admin_port,
            authz_port=authz_port,
            controlplane_port=self.args.admin_port,
            listen_host=self.args.host,
        )
        config = envoy.write_config(gateway, self.tmp / "envoy.json")
        self.spawn("envoy", envoy.command(config), ready_url=f"http://127.0.0.1:{admin_port}/ready")
        return authz_ops, models

    def start_single_process(self, models: dict[str, Model], *, cp_ops: int, authz_port: int, authz_ops: int) -> None:
        spec = {
            "manifests": str(self.manifests),
            "admin_port": self.args.admin_port,
            "cp_ops": cp_ops,
            "authz_port": authz_port,
            "authz_ops": authz_ops,
            "host": self.args.host,
            "ttft_ms": self.args.ttft_ms,
            "tokens_per_second": self.args.tokens_per_second,
            "models": [
                {"name": m.name, "sim_port": m.sim_port, "meter_port": m.meter_port, "meter_ops": m.meter_ops}
                for m in models.values()
            ],
        }
        path = self.tmp / "allinone.json"
        path.write_text(json.dumps(spec))
        child = self.spawn(
            "allinone",
            [sys.executable, "-m", "controlplane.allinone", str(path)],
            ready_url=f"http://127.0.0.1:{authz_ops}/readyz",
        )
        for url in [
            f"http://127.0.0.1:{cp_ops}/readyz",
            *(f"http://127.0.0.1:{m.meter_ops}/readyz" for m in models.values()),
        ]:
            self.children.append(Child(name="allinone", popen=child.popen, log=child.log, ready_url=url))

    def start_processes(self, models: dict[str, Model], *, cp_ops: int, authz_port: int, authz_ops: int) -> None:
        common = ["--redis-url", self.redis_url, "--dev", "--log-format", "text"]
        for m in models.values():
            self.maas(
                f"sim-{m.name}",
                "sim",
                "--port",
                str(m.sim_port),
                "--host",
                "127.0.0.1",
                "--served-model-name",
                m.name,
                "--ttft-ms",
                str(self.args.ttft_ms),
                "--tokens-per-second",
                str(self.args.tokens_per_second),
                "--log-format",
                "text",
                ready_url=f"http://127.0.0.1:{m.sim_port}/health",
            )
            self.maas(
                f"meter-{m.name}",
                "meter",
                "--upstream",
                f"http://127.0.0.1:{m.sim_port}",
                "--port",
                str(m.meter_port),
                "--ops-port",
                str(m.meter_ops),
                "--host",
                "127.0.0.1",
                *common,
                ready_url=f"http://127.0.0.1:{m.meter_ops}/readyz",
            )
        self.maas(
            "controlplane",
            "controlplane",
            "--source",
            f"dir:{self.manifests}",
            "--port",
            str(self.args.admin_port),
            "--ops-port",
            str(cp_ops),
            "--host",
            self.args.host,
            "--no-leader-election",
            *common,
            ready_url=f"http://127.0.0.1:{cp_ops}/readyz",
        )
        self.maas(
            "authz",
            "authz",
            "--port",
            str(authz_port),
            "--ops-port",
            str(authz_ops),
            "--host",
            "127.0.0.1",
            *common,
            ready_url=f"http://127.0.0.1:{authz_ops}/readyz",
        )

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.args.ready_timeout
        pending = [c for c in self.children if c.ready_url]
        while pending:
            dead = self.dead()
            if dead is not None:
                raise ChildDied(dead)
            pending = [c for c in pending if not _answers(c.ready_url or "")]
            if time.monotonic() > deadline:
                names = ", ".join(c.name for c in pending)
                raise SystemExit(f"maas demo: not ready after {self.args.ready_timeout:.0f}s: {names}")
            time.sleep(0.05)


class ChildDied(Exception):
    def __init__(self, child: Child) -> None:
        super().__init__(child.name)
        self.child = child


def self_service_route(deploy: Path | None = None) -> dict[str, Any]:
    """The HTTPRoute that exposes the key holders' self-service API (``/v1/models``, ``/v1/me``) on the gateway:
    deploy/istio/self-service.yaml's, as on a cluster."""
    path = (deploy or _default_deploy_dir()) / SELF_SERVICE_FILE
    if not path.exists():
        raise SystemExit(f"maas demo: manifest {path} is missing (run from the source tree)")
    for doc in yaml.safe_load_all(path.read_text()):
        if isinstance(doc, dict) and doc.get("kind") == "HTTPRoute":
            return doc
    raise SystemExit(f"maas demo: {path} holds no HTTPRoute")


def envoy_gateway(
    docs: list[dict[str, Any]],
    models: dict[str, Model],
    *,
    listen_port: int,
    admin_port: int,
    authz_port: int,
    controlplane_port: int,
    listen_host: str,
) -> envoy.Gateway:
    """The gateway Istio would program from these HTTPRoutes, each predictor Service played by its meter."""
    clusters = [envoy.Cluster(f"meter-{m.name}", m.meter_port) for m in models.values()]
    clusters.append(envoy.Cluster("controlplane", controlplane_port))
    routes = [envoy.Route(p, "controlplane") for p in SELF_SERVICE_PATHS]
    # Every other path still goes through ext_authz, which answers 404 (route_not_found) in the OpenAI envelope.
    routes.append(envoy.Route("/", "controlplane"))
    for doc in docs:
        if doc.get("kind") != "HTTPRoute":
            continue
        spec = doc.get("spec") or {}
        hosts = tuple(spec.get("hostnames") or ("*",))
        for rule in spec.get("rules") or []:
            backend: dict[str, Any] = next(iter(rule.get("backendRefs") or []), {})
            isvc = str(backend.get("name", "")).removesuffix("-predictor")
            if isvc not in models:
                continue
            rewrite = None
            for f in rule.get("filters") or []:
                path = (f.get("urlRewrite") or {}).get("path") or {}
                if path.get("type") == "ReplacePrefixMatch":
                    rewrite = path.get("replacePrefixMatch") or "/"
            for match in rule.get("matches") or [{"path": {"type": "PathPrefix", "value": "/"}}]:
                prefix = (match.get("path") or {}).get("value", "/")
                routes.append(envoy.Route(prefix, f"meter-{isvc}", rewrite=rewrite, hosts=hosts))
    return envoy.Gateway(
        listen_port=listen_port,
        admin_port=admin_port,
        authz=envoy.Cluster("maas-authz", authz_port),
        routes=routes,
        clusters=clusters,
        listen_host=listen_host,
        authz_timeout_s=1.0,
    )


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as resp:
            return bool(resp.status == 200)
    except (OSError, urllib.error.URLError):
        return False


def _wait_port(port: int, *, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.02)
    raise SystemExit(f"maas demo: nothing listens on port {port} after {timeout:.0f}s")


def banner(demo: Demo, models: dict[str, Model], started: float) -> Iterator[str]:
    base = f"http://{'localhost' if demo.args.host in ('127.0.0.1', '0.0.0.0') else demo.args.host}:{demo.args.port}"
    admin = f"http://localhost:{demo.args.admin_port}"
    yield f"ready {base} in {time.monotonic() - started:.1f}s"
    yield ""
    parts = "Envoy + maas authz + maas meter + maas sim + maas controlplane"
    in_memory = demo.redis_url.startswith("memory:")
    yield f"maas-gateway demo: {parts}" + (" (one process, in-memory store)" if in_memory else " + Redis")
    yield f"  gateway (Envoy):   {base}     models: " + ", ".join(f"/{_prefix(n)}" for n in models)
    yield f"  admin API:         {admin}   (development admin token: maas-dev-admin-token)"
    yield f"  store:             {demo.redis_url}   manifests: {demo.manifests}   logs: {demo.logs}"
    yield ""
    yield "Sample keys (deploy/models/samples, SAMPLE values only):"
    yield "  admin-key-12345                          admin                   enterprise"
    yield "  SAMPLE-free-user-key-not-a-secret        sample-free-user        free (5 requests / 2m, 100 tokens / 1m)"
    yield "  SAMPLE-premium-user-key-not-a-secret     sample-premium-user     premium"
    yield "  SAMPLE-enterprise-user-key-not-a-secret  sample-enterprise-user  enterprise"
    yield ""
    yield "Try (the seed guide's Step 6):"
    yield (
        f"  curl -H 'Authorization: APIKEY admin-key-12345' -H 'Content-Type: application/json' -d "
        f'\'{{"model":"qwen3-0-6b-instruct","messages":[{{"role":"user","content":"Hello!"}}]}}\' '
        f"{base}/qwen3/v1/chat/completions"
    )
    yield f"  curl -i {base}/qwen3/v1/chat/completions          # no key: 401 at once"
    yield (
        f"  curl -N -H 'Authorization: Bearer admin-key-12345' -H 'Content-Type: application/json' -d "
        f'\'{{"model":"qwen3-0-6b-instruct","stream":true,"messages":[{{"role":"user","content":"Hi"}}]}}\' '
        f"{base}/qwen3/v1/chat/completions"
    )
    yield f"  curl -H 'Authorization: APIKEY admin-key-12345' {base}/v1/models"
    yield f"  curl -H 'Authorization: APIKEY admin-key-12345' {base}/v1/me"
    yield f"  curl -H 'Authorization: Bearer maas-dev-admin-token' {admin}/admin/v1/keys"
    yield f"  curl {admin}/openapi.json"
    yield "Ctrl-C stops everything."


def _prefix(model: str) -> str:
    return {"qwen3-0-6b-instruct": "qwen3", "granite-code": "granite", "nomic-embed": "nomic"}.get(model, model)


def _taken(host: str, port: int) -> bool:
    """Whether something listens on ``host:port`` already (a bind fails)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        return False  # an unknown host: the part that binds it says so
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(address)
            except OSError:
                return True
    return False


def run(args: argparse.Namespace) -> int:
    started = time.monotonic()
    if args.port == args.admin_port:
        print(f"maas demo: --port and --admin-port are both {args.port}; give them different ports", file=sys.stderr)
        return 2
    envoy.envoy_binary()  # before anything starts: without Envoy (the 'demo' extra) say so, naming the extra
    for flag, port in (("--port", args.port), ("--admin-port", args.admin_port)):
        if _taken(args.host, port):
            print(
                f"maas demo: port {port} on {args.host} is in use (another maas demo, or another program); "
                f"choose another with {flag}",
                file=sys.stderr,
            )
            return 2
    demo = Demo(args)
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        _, models = demo.start()
        demo.wait_ready()
        for line in banner(demo, models, started):
            print(line, flush=True)
        while not stopping:
            dead = demo.dead()
            if dead is not None:
                raise ChildDied(dead)
            time.sleep(0.2)
        print("stopping", flush=True)
        return 0
    except ChildDied as exc:
        child = exc.child
        print(
            f"maas demo: {child.name} exited with status {child.popen.returncode}; last lines of its log:",
            file=sys.stderr,
        )
        print(child.tail(), file=sys.stderr)
        return 1
    finally:
        demo.stop()
        os.environ.pop("MAAS_DEMO", None)
