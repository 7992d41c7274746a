"""Settings of ``maas authz``."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr, model_validator

from gateway.settings import CommonSettings, check_secret, secret_file

DEV_IDENTITY_SECRET = "maas-development-identity-secret"


class AuthzSettings(CommonSettings):
    port: int = Field(8500, ge=0, le=65535, description="ext_authz HTTP port (a catch-all: every path is a check)")
    ops_port: int = Field(9500, ge=0, le=65535, description="ops port: /healthz, /readyz, /metrics")
    ops_host: str = Field(
        "",
        description="address the ops port listens on (empty: --host); lets the check port listen on 127.0.0.1 "
        "while probes and Prometheus reach the ops port",
    )
    identity_secret: SecretStr | None = Field(
        None,
        description="HMAC secret signing the identity headers for maas meter (at least 16 characters); required "
        "unless --dev",
    )
    identity_secret_file: str | None = secret_file("identity_secret")
    path_prefix: str = Field("", description="Istio pathPrefix of the provider, stripped before routing")
    on_store_error: Literal["deny", "allow", "local"] = Field(
        "deny", description="limits while Redis is unreachable: deny (503), allow, or local in-process buckets"
    )
    metrics_max_keys: int = Field(1000, ge=0, description='distinct key_id series; more go to key_id="_other"')
    default_tier: str = Field("free", description="tier of a key with no tier and no group that maps to one")
    allow_unrouted: bool = Field(
        False,
        description="admit valid keys on paths no route matches (no model checks; the key's limits still apply)",
    )
    forward_api_key: bool = Field(False, description="keep the API key on the upstream request")
    request_credits: int = Field(
        8,
        ge=0,
        le=1000,
        description="most request tokens of one key a replica takes from Redis ahead of its requests (fewer for a "
        "slower key, at most a hundredth of its limit): a key whose requests come within --request-credit-ms of each "
        "other then skips the round trip on most of them; unspent ones are given back; 0 turns it off (every limited "
        "request is checked in Redis)",
    )
    request_credit_ms: int = Field(
        250,
        ge=1,
        le=10_000,
        description="how long request credits are held before they are given back, and how close a key's requests "
        "must come to earn them",
    )
    bucket_max_inflight: int = Field(2, ge=1, le=64, description="concurrent bucket batches in flight to Redis")
    max_header_bytes: int = Field(65536, ge=8190, le=1 << 20, description="largest request header accepted")
    max_connections: int = Field(
        8192,
        ge=1,
        le=1_000_000,
        description="most client connections open on the check port; past it a new one is answered 503 and closed "
        "(Envoy holds one per check in flight per worker thread, hundreds even at tens of thousands of checks a "
        "second; 8192 idle ones take ~25 MB, and the ops port and Redis keep their descriptors)",
    )
    http_server: Literal["fast", "aiohttp"] = Field(
        "fast", description="HTTP layer of the check port: fast (httptools protocol) or aiohttp (low-level server)"
    )

    @model_validator(mode="after")
    def _identity_secret_required(self) -> AuthzSettings:
        if self.identity_secret is None and not self.dev:
            raise ValueError(
                "identity_secret is required (--identity-secret-file / MAAS_IDENTITY_SECRET_FILE or --identity-secret "
                "/ MAAS_IDENTITY_SECRET), or --dev"
            )
        check_secret("identity_secret", self.identity_secret)
        if self.path_prefix and not self.path_prefix.startswith("/"):
            raise ValueError("path_prefix must start with '/'")
        return self

    @property
    def ops_listen_host(self) -> str:
        return self.ops_host or self.host

    @property
    def identity_key(self) -> bytes:
        if self.identity_secret is not None:
            return self.identity_secret.get_secret_value().encode()
        return DEV_IDENTITY_SECRET.encode()
