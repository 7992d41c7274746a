"""Settings of ``maas controlplane``: every field is a ``--flag`` and a ``MAAS_*`` environment variable."""

from __future__ import annotations

import os
import socket

from pydantic import Field, SecretStr, field_validator, model_validator

from controlplane.selectors import split_union
from gateway.settings import CommonSettings, check_secret, secret_file, split_csv

DEV_IDENTITY_SECRET = "maas-development-identity-secret"
"""Equal to ``maas authz --dev``'s identity secret, so the self-service API trusts the dev gateway."""

DEFAULT_SECRET_SELECTORS = (
    "authorino.kuadrant.io/managed-by=authorino;kuadrant.io/auth-secret=true;app=llm-gateway;kuadrant.io/apikeys-by;"
    "maas.io/api-key=true"
)


class ControlPlaneSettings(CommonSettings):
    port: int = Field(8700, ge=0, le=65535, description="main port: admin API, self-service API, sync status")
    ops_port: int = Field(9700, ge=0, le=65535, description="ops port: /healthz, /readyz, /metrics")
    source: str = Field("kubernetes", description="where objects come from: 'kubernetes' or 'dir:PATH'")
    kubeconfig: str | None = Field(None, description="kubeconfig file (default: in-cluster, else ~/.kube/config)")
    namespaces: str = Field("", description="comma-separated namespaces to watch (empty: all namespaces)")
    resync_period: float = Field(300.0, gt=0, description="seconds between full resyncs against Redis")
    secret_selectors: str = Field(
        DEFAULT_SECRET_SELECTORS,
        description="label selectors of API-key Secrets, ';'-separated; a Secret matching any one is a key",
    )
    gateways: str = Field(
        "kuadrant-gateway",
        description="comma-separated Gateways (name or namespace/name) maas authz guards: HTTPRoutes attached to "
        "others are skipped (empty: every route counts)",
    )
    tier_configmap: str = Field("tier-to-group-mapping", description="name of the tier mapping ConfigMap")
    tier_limits_configmap: str = Field("maas-tier-limits", description="name of the tier limits ConfigMap")
    default_tier: str = Field("free", description="tier of a key whose groups match no tier")
    leader_election: bool | None = Field(
        None, description="elect a leader with a Lease before writing (default: on with --source kubernetes)"
    )
    lease_name: str = Field("maas-controlplane", description="name of the leader-election Lease")
    lease_namespace: str = Field("default", description="namespace of the leader-election Lease")
    lease_duration: float = Field(15.0, gt=0, description="seconds a lease is valid without renewal")
    renew_deadline: float = Field(10.0, gt=0, description="seconds the leader keeps trying to renew before it stops")
    retry_period: float = Field(2.0, gt=0, description="seconds between lease acquire/renew attempts")
    identity: str = Field("", description="leader-election identity (default: hostname-pid)")
    watch_timeout: int = Field(290, ge=1, description="server-side watch timeout, seconds (dead connections)")
    backoff_max: float = Field(30.0, gt=0, description="cap of the reconnect backoff, seconds")
    dir_poll_interval: float = Field(1.0, gt=0, description="seconds between directory scans with --source dir:")
    admin_token_file: str | None = Field(
        None, description="admin API tokens, one '[<role> [<name>]] <token>' per line (reloaded on change)"
    )
    key_namespace: str = Field(
        "", description="namespace of admin-issued key Secrets (default: the first of --namespaces, else default)"
    )
    tier_namespace: str = Field(
        "",
        description="namespace whose tier ConfigMaps count when several hold them, and where new ones go (default: "
        "the first by name that holds them, else the key namespace)",
    )
    admin_write_timeout: float = Field(
        10.0, gt=0, le=120, description="seconds an admin write waits for its record to reach Redis"
    )
    identity_secret: SecretStr | None = Field(
        None,
        description="secret of maas authz's identity headers (self-service through the gateway; at least 16 "
        "characters); dev default",
    )
    identity_secret_file: str | None = secret_file("identity_secret")

    @field_validator("source")
    @classmethod
    def _check_source(cls, value: str) -> str:
        if value != "kubernetes" and not (value.startswith("dir:") and len(value) > 4):
            raise ValueError("must be 'kubernetes' or 'dir:PATH'")
        return value

    @field_validator("secret_selectors")
    @classmethod
    def _check_selectors(cls, value: str) -> str:
        if not split_union(value):
            raise ValueError("at least one selector is required")
        return value

    @model_validator(mode="after")
    def _check_identity_secret(self) -> ControlPlaneSettings:
        check_secret("identity_secret", self.identity_secret)
        return self

    @model_validator(mode="after")
    def _check_election_timing(self) -> ControlPlaneSettings:
        # as client-go: a leader must give up (renew deadline) before others may take over (lease duration), and
        # must get more than one renewal attempt (retry period) within its deadline
        if self.renew_deadline >= self.lease_duration:
            raise ValueError(
                f"--renew-deadline / MAAS_RENEW_DEADLINE ({self.renew_deadline:g}) must be less than "
                f"--lease-duration / MAAS_LEASE_DURATION ({self.lease_duration:g})"
            )
        if self.retry_period >= self.renew_deadline:
            raise ValueError(
                f"--retry-period / MAAS_RETRY_PERIOD ({self.retry_period:g}) must be less than "
                f"--renew-deadline / MAAS_RENEW_DEADLINE ({self.renew_deadline:g})"
            )
        return self

    @property
    def namespace_list(self) -> tuple[str, ...]:
        return split_csv(self.namespaces)

    @property
    def selector_list(self) -> tuple[str, ...]:
        return split_union(self.secret_selectors)

    @property
    def directory(self) -> str | None:
        return self.source[4:] if self.source.startswith("dir:") else None

    @property
    def elect(self) -> bool:
        if self.leader_election is None:
            return self.directory is None
        return self.leader_election

    @property
    def key_namespace_name(self) -> str:
        return self.key_namespace or (self.namespace_list[0] if self.namespace_list else "default")

    @property
    def identity_key(self) -> bytes | None:
        """The authz identity secret; the development one with --dev; None: identity headers are not accepted."""
        if self.identity_secret is not None:
            return self.identity_secret.get_secret_value().encode()
        return DEV_IDENTITY_SECRET.encode() if self.dev else None

    @property
    def holder_identity(self) -> str:
        return self.identity or f"{socket.gethostname()}-{os.getpid()}"
