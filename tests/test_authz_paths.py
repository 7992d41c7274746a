"""The route the check admits is the route Envoy takes, whatever the request target and Host look like.

A real Envoy, rendered as Istio programs the gateway (``normalize_path``, ``host`` and ``host:*`` domains, the
provider's ``pathPrefix``), sends two models' routes to two echo upstreams and model-less paths to a third; two keys
may each use one model only. For every request that reaches an upstream, the upstream must be the one of the model
``maas authz`` checked (the ``x-maas-model`` it set; the client sends a forged one that Envoy must overwrite), so a
key never reaches the model it may not use. Requests Envoy or the check refuse are fine.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controlplane import envoy
from gateway.contract import Limit, Limits
from gateway.identity import H_KEY_ID, H_MODEL
from tests.conftest import PEPPER
from tests.support import platform
from tests.support.procs import RedisServer
from tests.support.stack import authz_process, echo_process, envoy_process

pytestmark = [pytest.mark.redis, pytest.mark.envoy]

PREFIX = "/ext-authz"
GRANITE_HOST = "granite.maas.local"
QWEN_WILDCARD = "*.qwen.maas.local"
GRANITE_UNDER_WILDCARD = "g.qwen.maas.local"
"""A host of its own beneath the wildcard: Envoy prefers ``*.qwen.maas.local:<port>`` to its ``host:*``."""

UNLIMITED = Limits(requests=Limit(limit=1_000_000_000, window="1m"))
QWEN_ONLY = platform.Key(
    "sk-paths-qwen-only-0001", "quinn", tier="enterprise", models=(platform.QWEN,), limits=UNLIMITED
)
GRANITE_ONLY = platform.Key(
    "sk-paths-granite-only-0001", "gus", tier="enterprise", models=(platform.GRANITE,), limits=UNLIMITED
)
KEYS = (QWEN_ONLY, GRANITE_ONLY)
UPSTREAM_MODEL = {"qwen": platform.QWEN, "granite": platform.GRANITE, "plain": ""}
"""The model each echo upstream serves ("plain": the model-less routes, the self-service API)."""


@dataclass
class Gateway:
    port: int

    def send(self, target: str, host: str, key: platform.Key) -> tuple[int, Any]:
        """One HTTP/1.1 request written as is (any request target, any Host), and its status and JSON body."""
        head = (
            f"GET {target} HTTP/1.1\r\nHost: {host}\r\nAuthorization: APIKEY {key.plaintext}\r\n"
            f"{H_MODEL}: forged\r\nConnection: close\r\n\r\n"
        )
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
            sock.sendall(head.encode("utf-8", "surrogateescape"))
            answer = _read_response(sock)
        status_line, _, rest = answer.partition(b"\r\n")
        try:
            parsed: Any = json.loads(rest.partition(b"\r\n\r\n")[2])
        except ValueError:
            parsed = None
        return int(status_line.split(b" ")[1]), parsed


def _read_response(sock: socket.socket) -> bytes:
    """The response read up to its content-length: after refusing a request it cannot parse, Envoy waits for the
    client to close first (its delayed close, a second), so reading until it closes took that long."""
    answer = b""
    while b"\r\n\r\n" not in answer and (chunk := sock.recv(65536)):
        answer += chunk
    head = answer.partition(b"\r\n\r\n")[0].lower()
    length = next((int(line[15:]) for line in head.split(b"\r\n") if line.startswith(b"content-length:")), None)
    while (length is None or len(answer) - len(head) - 4 < length) and (chunk := sock.recv(65536)):
        answer += chunk
    return answer


@pytest.fixture(scope="module")
def gateway(redis_session: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    log_dir = tmp_path_factory.mktemp("paths")
    hosts = {GRANITE_HOST: platform.GRANITE, QWEN_WILDCARD: platform.QWEN, GRANITE_UNDER_WILDCARD: platform.GRANITE}
    platform.seed_afresh(redis_session.url, PEPPER, keys=KEYS, hosts=hosts)
    with (
        authz_process(
            redis_url=redis_session.url, pepper=PEPPER, log_dir=log_dir, args=["--path-prefix", PREFIX]
        ) as authz,
        echo_process(log_dir=log_dir, name="qwen") as qwen,
        echo_process(log_dir=log_dir, name="granite") as granite,
        echo_process(log_dir=log_dir, name="plain") as plain,
    ):
        clusters = [envoy.Cluster("qwen", qwen), envoy.Cluster("granite", granite), envoy.Cluster("plain", plain)]
        routes = [
            envoy.Route("/", "granite", hosts=(GRANITE_HOST,)),
            envoy.Route("/", "qwen", hosts=(QWEN_WILDCARD,)),
            envoy.Route("/", "granite", hosts=(GRANITE_UNDER_WILDCARD,)),
            envoy.Route("/qwen3", "qwen", rewrite="/"),
            envoy.Route("/granite", "granite", rewrite="/v1"),
            envoy.Route("/mistral", "granite", rewrite="/"),
            envoy.Route("/v1/models", "plain"),
            envoy.Route("/", "plain"),  # a catch-all the check must not open (no --allow-unrouted)
        ]
        with envoy_process(
            routes=routes, clusters=clusters, authz_port=authz.port, log_dir=log_dir, path_prefix=PREFIX
        ) as proxy:
            yield Gateway(proxy.port)
        assert "Traceback" not in authz.proc.log(), authz.proc.log()


def assert_where_admitted(gateway: Gateway, target: str, host: str, key: platform.Key) -> int:
    """Send the request; if it reached an upstream, it is the one of the model the check admitted, which the key
    may use. Returns the status."""
    status, body = gateway.send(target, host, key)
    if isinstance(body, dict) and "upstream" in body:
        upstream = body["upstream"]
        checked = body["headers"].get(H_MODEL)
        assert checked == UPSTREAM_MODEL[upstream], (target, host, key.user, upstream, checked)
        assert body["headers"][H_KEY_ID] == key.key_id(PEPPER)
        assert checked in ("", *key.models), (target, host, key.user, upstream, checked)
    return status


SEGMENTS = st.sampled_from(
    [
        "qwen3",
        "granite",
        "mistral",
        "QWEN3",
        "Granite",
        "qwen3x",
        "granite.",
        "v1",
        "models",
        "chat",
        ".",
        "..",
        "%2E%2E",
        "%2e",
        ".%2E",
        "",
        "%2F",
        "qwen3%2Fgranite",
        "qwen3%2f..%2fgranite",
        "granite;x",
        "qwen3;",
        "..;",
        "%71wen3",
        "%67ranite",
        "ext-authz",
        "x",
    ]
)
SEPARATORS = st.sampled_from(["/", "/", "/", "//", "\\", "%5C", "/./", "/../"])
TAILS = st.sampled_from(["", "", "?", "?a=/granite", "?/../qwen3", "#/../granite", "?x#/../qwen3", "/", "/."])
HOSTS = st.sampled_from(
    [
        "gw.example",
        "gw.example:{port}",
        GRANITE_HOST,
        GRANITE_HOST.upper(),
        f"{GRANITE_HOST}.",
        f"{GRANITE_HOST}:80",
        f"{GRANITE_HOST}:{{port}}",
        f"{GRANITE_HOST}:",
        f"{GRANITE_HOST}:x",
        f"{GRANITE_HOST}:1:2",
        f"{GRANITE_HOST}:+80",
        f"{GRANITE_HOST}.:80",
        f"user@{GRANITE_HOST}",
        f"[x].{GRANITE_HOST}",
        "b.qwen.maas.local",
        "b.qwen.maas.local:{port}",
        "b.qwen.maas.local:81",
        "b.qwen.maas.local:",
        "B.QWEN.MAAS.LOCAL.",
        GRANITE_UNDER_WILDCARD,
        f"{GRANITE_UNDER_WILDCARD}:{{port}}",
        f"{GRANITE_UNDER_WILDCARD}:81",
        "[::1].qwen.maas.local",
        "[::1]:{port}",
        "\u212a.qwen.maas.local",
        "qwen.maas.local",
    ]
)


@st.composite
def targets(draw: st.DrawFn) -> str:
    """A request target: segments of the routes' prefixes and of path tricks, joined by slashes and look-alikes,
    with a query or fragment, sometimes in absolute form (whose authority Envoy takes for the host)."""
    segments = draw(st.lists(SEGMENTS, min_size=1, max_size=5))
    path = draw(st.sampled_from(["/", "/", "//", "/./", "/../", f"{PREFIX}/"]))
    for segment in segments[:-1]:
        path += segment + draw(SEPARATORS)
    path += segments[-1] + draw(TAILS)
    if draw(st.integers(0, 5)) == 0:
        return f"http://{draw(st.sampled_from(['gw.example', GRANITE_HOST, 'b.qwen.maas.local']))}{path}"
    return path


@settings(max_examples=600, deadline=None)
@given(target=targets(), host=HOSTS, key=st.sampled_from(KEYS))
def test_a_request_reaches_only_the_upstream_of_the_model_checked(
    gateway: Gateway, target: str, host: str, key: platform.Key
) -> None:
    assert_where_admitted(gateway, target, host.format(port=gateway.port), key)


@pytest.mark.parametrize(
    ("target", "host", "key"),
    [
        # host:* matches a non-empty anything after the colon: `host:1:2` was routed as granite's host but checked
        # as `host:1` (split at the last colon), `host:` routed to the routes for any host but checked as granite's;
        # `host:x` goes where it was checked here, but not where a gateway strips numeric ports (Envoy keeps `:x`)
        pytest.param("/qwen3/v1/chat/completions", f"{GRANITE_HOST}:", GRANITE_ONLY, id="empty-port"),
        pytest.param("/qwen3/v1/chat/completions", f"{GRANITE_HOST}:x", GRANITE_ONLY, id="port-not-digits"),
        pytest.param("/qwen3/v1/chat/completions", f"{GRANITE_HOST}:1:2", QWEN_ONLY, id="two-ports"),
        pytest.param("/granite/v1/chat/completions", "b.qwen.maas.local:", QWEN_ONLY, id="wildcard-empty-port"),
        # Envoy takes *.qwen.maas.local:<listener port> for that port only, and before a host's own host:*
        pytest.param("/granite/v1/chat/completions", "b.qwen.maas.local:81", QWEN_ONLY, id="wildcard-other-port"),
        pytest.param(
            "/qwen3/v1/chat/completions", f"{GRANITE_UNDER_WILDCARD}:{{port}}", GRANITE_ONLY, id="wildcard-over-host"
        ),
        # a bracket is no IPv6 literal here: Envoy matched *.qwen.maas.local, the check took it for [::1]
        pytest.param("/granite/v1/chat/completions", "[::1].qwen.maas.local", GRANITE_ONLY, id="bracket-prefix"),
    ],
)
def test_a_host_envoy_might_route_otherwise_is_refused(
    gateway: Gateway, target: str, host: str, key: platform.Key
) -> None:
    status = assert_where_admitted(gateway, target, host.format(port=gateway.port), key)
    assert status == 400


@pytest.mark.parametrize(
    ("host", "upstream"),
    [
        pytest.param(f"{GRANITE_HOST}:8443", "granite", id="named-host-any-port"),
        pytest.param("b.qwen.maas.local", "qwen", id="wildcard"),
        pytest.param(GRANITE_UNDER_WILDCARD, "granite", id="host-beneath-wildcard"),
        pytest.param("[::1]:{port}", "plain", id="ipv6"),
    ],
)
def test_hosts_envoy_and_the_check_agree_on_are_served(gateway: Gateway, host: str, upstream: str) -> None:
    target = "/v1/models" if upstream == "plain" else "/qwen3/v1/models"
    key = GRANITE_ONLY if upstream == "granite" else QWEN_ONLY
    status, body = gateway.send(target, host.format(port=gateway.port), key)
    assert status == 200 and body["upstream"] == upstream, body
    assert body["headers"][H_MODEL] == UPSTREAM_MODEL[upstream]
