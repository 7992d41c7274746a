"""``maas meter`` settings: the common options plus the upstream, identity, body, quota and timeout options."""

from __future__ import annotations

import logging
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator

from gateway.settings import CommonSettings, check_secret, secret_file, split_csv

log = logging.getLogger("maas.meter")

DEV_IDENTITY_SECRET = "maas-development-identity-secret"  # the same as maas authz uses in --dev


class MeterSettings(CommonSettings):
    upstream: str = Field(
        ...,
        description="URL of the OpenAI-compatible server (vLLM), e.g. http://127.0.0.1:8080 (a path prefix may follow; "
        "no user info, query or fragment)",
    )
    port: int = Field(8600, ge=0, le=65535, description="port of the proxy")
    ops_port: int = Field(9600, ge=0, le=65535, description="port of /healthz, /readyz and /metrics")
    identity_secret: SecretStr | None = Field(
        None,
        description="secret shared with maas authz to verify identity headers; required unless --dev or "
        "--trust-identity-headers",
    )
    identity_secret_file: str | None = secret_file("identity_secret")
    identity_max_age: float = Field(
        60.0,
        gt=0,
        le=3600,
        description="seconds an identity's stamp may be off this meter's reading of Redis's clock (authz stamps by its "
        "own reading): up to this much ahead of it, or this much plus the 10 s signing window behind it, is accepted",
    )
    trust_identity_headers: bool = Field(False, description="accept identity headers without a valid signature")
    check_model: bool = Field(True, description="refuse a body model other than the one authz routed to (403)")
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024, le=1 << 30, description="largest request body (413 above)")
    max_response_bytes: int = Field(
        64 * 1024 * 1024, ge=1024, le=1 << 31, description="largest non-streaming upstream response read"
    )
    max_event_bytes: int = Field(1 << 20, ge=1024, le=1 << 28, description="largest single SSE event from upstream")
    unknown_fields: Literal["reject", "allow"] = Field(
        "reject", description="request fields neither OpenAI nor vLLM define: reject (400) or allow (passed on)"
    )
    passthrough_posts: str = Field(
        "/tokenize,/detokenize",
        description="paths besides the metered ones that take POST and the like, passed to the upstream unmetered "
        "(comma-separated, each starting with /; others get 404: vLLM's /v1/responses, /invocations, /pooling or "
        "LoRA loading would go unmetered or unguarded)",
    )
    clamp_max_tokens: bool = Field(True, description="lower max_tokens to what the key's token quota can still pay")
    default_max_tokens: int = Field(
        4096,
        ge=1,
        le=10_000_000,
        description="completion tokens reserved (and set) for chat requests without max_tokens when the model's "
        "context length is unknown",
    )
    estimate_bytes_per_token: float = Field(
        1.0, gt=0, le=16, description="prompt estimate: UTF-8 bytes per token (1.0 is an upper bound)"
    )
    estimate_overhead: int = Field(8, ge=0, le=1024, description="prompt estimate: tokens added per message")
    store_failure_policy: Literal["allow", "deny"] = Field(
        "allow", description="when the store fails at reservation: forward unmetered by quota (allow) or 503 (deny)"
    )
    metrics_max_keys: int = Field(1000, ge=1, le=1_000_000, description="distinct key_id series; more go to _other")
    upstream_connect_timeout: float = Field(2.0, gt=0, le=300, description="upstream connect timeout, seconds")
    upstream_first_byte_timeout: float = Field(
        300.0, gt=0, le=3600, description="upstream response headers timeout, seconds"
    )
    upstream_idle_timeout: float = Field(60.0, gt=0, le=3600, description="longest silence inside a response, seconds")
    upstream_max_connections: int = Field(1024, ge=1, le=100_000, description="upstream connection pool size")
    upstream_max_queue: int = Field(
        128,
        ge=0,
        le=100_000,
        description="metered requests that may wait for a free upstream connection when all --upstream-max-connections "
        "are in use (passthrough requests have as many connections and as long a queue of their own); one more gets "
        "503 upstream_busy with retry-after at once (0: none wait). 128: with every "
        "connection busy, vLLM already queues most of those requests itself, so waiting here adds latency while "
        "holding each request's body and reserved tokens; a short queue rides out a burst while streams end, and the "
        "rest can retry at once on another replica instead of waiting out --upstream-first-byte-timeout",
    )
    upstream_keepalive: float = Field(
        4.0,
        ge=0,
        le=3600,
        description="seconds an idle upstream connection is kept for reuse; keep it below the upstream's own idle "
        "timeout (vLLM: 5 s); 0 opens a connection per request",
    )
    max_connections: int = Field(
        4096,
        ge=1,
        le=1_000_000,
        description="most client connections open on the proxy port; past it a new one is answered 503 and closed "
        "(4 x --upstream-max-connections: every request the upstream pool can carry, plus the gateways' idle pooled "
        "connections; 4096 idle ones take ~25 MB, and the ops port, Redis and vLLM keep their descriptors)",
    )
    readiness_timeout: float = Field(1.0, gt=0, le=60, description="timeout of the upstream /health probe, seconds")
    shutdown_grace: float = Field(
        25.0, ge=0, le=3600, description="on SIGTERM, seconds requests in flight get to finish before they are cut"
    )

    @field_validator("upstream")
    @classmethod
    def _url(cls, value: str) -> str:
        # the messages never repeat the value: a URL with user info holds a password
        try:
            parts = urlsplit(value)
            port = parts.port
        except ValueError:
            raise ValueError("malformed URL: the port must be a number from 1 to 65535") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http(s) URL with a host, e.g. http://127.0.0.1:8080")
        if port == 0:
            raise ValueError("the port must be a number from 1 to 65535")
        if "@" in parts.netloc:
            raise ValueError("must not hold user info (user:password@): the meter sends no credentials upstream")
        if parts.query or parts.fragment or value.endswith(("?", "#")):
            raise ValueError("must not have a query or a fragment (a path prefix is fine: http://host:8080/base)")
        return value.rstrip("/")

    @field_validator("passthrough_posts")
    @classmethod
    def _paths(cls, value: str) -> str:
        # matched against the request path as is: an entry without its '/' (or a JSON list) would never match
        if any(not path.startswith("/") for path in split_csv(value)):
            raise ValueError("each path must start with '/' (comma-separated: /tokenize,/detokenize)")
        return value

    @model_validator(mode="after")
    def _secret_required(self) -> MeterSettings:
        if self.identity_secret is None and not (self.dev or self.trust_identity_headers):
            raise ValueError(
                "identity_secret is required (set --identity-secret-file / MAAS_IDENTITY_SECRET_FILE or "
                "--identity-secret / MAAS_IDENTITY_SECRET, shared with maas authz), "
                "or run with --dev or --trust-identity-headers"
            )
        check_secret("identity_secret", self.identity_secret)
        return self

    @property
    def secret(self) -> bytes:
        if self.identity_secret is not None:
            return self.identity_secret.get_secret_value().encode()
        return DEV_IDENTITY_SECRET.encode()
