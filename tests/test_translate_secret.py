"""API-key Secret -> KeyRecord, table-tested: Kuadrant format, maas/* labels and annotations, digest-only keys."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from controlplane.errors import TranslateError
from controlplane.translate.secret import resolve_tier, translate_secret
from gateway.contract import DEFAULT_TIERS, KeyStatus, Limit, digest_key

PEPPER = b"translate-test-pepper-0123"


def _secret(
    *,
    data: dict[str, Any] | None = None,
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": "alice-key",
            "namespace": "llm",
            "labels": labels or {"authorino.kuadrant.io/managed-by": "authorino"},
            "annotations": annotations or {},
            "creationTimestamp": "2025-01-02T03:04:05Z",
        },
        "data": {"api_key": base64.b64encode(b"sk-alice").decode()} if data is None else data,
    }


def test_kuadrant_secret() -> None:
    secret = _secret(annotations={"secret.kuadrant.io/user-id": "alice", "kuadrant.io/groups": "premium, team-a"})
    record, depends = translate_secret(secret, pepper=PEPPER)
    assert record.digest == digest_key("sk-alice", PEPPER)
    assert record.key_id == record.digest[:16]
    assert (record.user, record.groups, record.tier) == ("alice", ("premium", "team-a"), None)
    assert (record.status, record.limits, record.models) == (KeyStatus.ACTIVE, None, ())
    assert (record.name, record.source) == ("alice-key", "secret:llm/alice-key")
    assert record.created_at == 1735787045.0
    assert depends is False
    assert "sk-alice" not in record.model_dump_json()


@pytest.mark.parametrize(
    ("secret", "expected"),
    [
        pytest.param(
            _secret(labels={"maas/user-id": "bob", "maas/tier": "enterprise"}, annotations={"maas/status": "inactive"}),
            {"user": "bob", "tier": "enterprise", "status": KeyStatus.DISABLED},
            id="maas-labels-inactive",
        ),
        pytest.param(
            _secret(annotations={"maas/status": "revoked"}),
            {"status": KeyStatus.REVOKED, "user": "alice-key"},
            id="revoked-no-user",
        ),
        pytest.param(
            _secret(annotations={"maas/models-allowed": "qwen3, granite,qwen3"}),
            {"models": ("qwen3", "granite")},
            id="models-allowed",
        ),
        pytest.param(
            _secret(annotations={"maas/request-limit": "7", "maas/token-limit": "900", "maas/time-window": "1h"}),
            {"limits.requests": Limit(limit=7, window="1h"), "limits.tokens": Limit(limit=900, window="1h")},
            id="limit-overrides-with-window",
        ),
        pytest.param(
            _secret(annotations={"maas/request-limit": "7", "kuadrant.io/groups": "premium"}),
            {"limits.requests": Limit(limit=7, window="2m"), "limits.tokens": None},
            id="limit-override-uses-tier-window",
        ),
        pytest.param(
            _secret(annotations={"maas.io/expires-at": "2030-01-01T00:00:00Z", "maas.io/key-name": "ci"}),
            {"expires_at": 1893456000.0, "name": "ci"},
            id="expiry-and-name",
        ),
        pytest.param(
            _secret(data={}, labels={"maas.io/api-key": "true"}, annotations={"maas/user-id": "carol"})
            | {"data": {"digest": base64.b64encode(b"ab" * 32).decode()}},
            {"digest": "ab" * 32, "user": "carol"},
            id="admin-issued-digest-only",
        ),
        pytest.param(
            {**_secret(data={}), "stringData": {"api_key": "sk-alice"}},
            {"digest": digest_key("sk-alice", PEPPER)},
            id="string-data",
        ),
    ],
)
def test_secret_variants(secret: dict[str, Any], expected: dict[str, Any]) -> None:
    record, _ = translate_secret(secret, pepper=PEPPER, tiers=DEFAULT_TIERS)
    got = {}
    for path in expected:
        value: Any = record
        for part in path.split("."):
            value = getattr(value, part) if value is not None else None
        got[path] = value
    assert got == expected


@pytest.mark.parametrize(
    ("secret", "reason"),
    [
        pytest.param(_secret(data={}), "missing_api_key", id="no-api-key"),
        pytest.param(_secret(data={"api_key": "%%% not base64"}), "invalid_base64", id="not-base64"),
        pytest.param(_secret(data={"api_key": ""}), "empty_api_key", id="empty"),
        pytest.param(_secret(data={"api_key": base64.b64encode(b"  \n").decode()}), "empty_api_key", id="blank"),
        pytest.param(_secret(data={"digest": base64.b64encode(b"xyz").decode()}), "invalid_digest", id="bad-digest"),
        pytest.param(_secret(annotations={"maas/status": "paused"}), "invalid_status", id="unknown-status"),
        pytest.param(_secret(annotations={"maas/request-limit": "many"}), "invalid_limit", id="bad-limit"),
        pytest.param(
            _secret(annotations={"maas/request-limit": "100000000000000000000000"}), "invalid_limit", id="huge-limit"
        ),
        pytest.param(
            _secret(annotations={"maas/request-limit": "5", "maas/time-window": "soon"}),
            "invalid_limit",
            id="bad-window",
        ),
    ],
)
def test_malformed_secrets(secret: dict[str, Any], reason: str) -> None:
    with pytest.raises(TranslateError) as info:
        translate_secret(secret, pepper=PEPPER, tiers=DEFAULT_TIERS)
    assert info.value.reason == reason


@pytest.mark.parametrize(
    ("explicit", "groups", "expected"),
    [
        pytest.param("premium", ("enterprise",), "premium", id="explicit-wins"),
        pytest.param(None, ("premium", "enterprise"), "enterprise", id="highest-level-wins"),
        pytest.param(None, ("system:authenticated",), "free", id="group-of-free"),
        pytest.param(None, ("nobody",), "free", id="default-tier"),
        # an unknown own tier (a typo, a deleted tier) is passed over as maas authz does: never no limits at all
        pytest.param("gold", (), "free", id="unknown-explicit-tier"),
        pytest.param("gold", ("premium",), "premium", id="unknown-explicit-tier-with-groups"),
    ],
)
def test_resolve_tier(explicit: str | None, groups: tuple[str, ...], expected: str | None) -> None:
    tier = resolve_tier(explicit=explicit, groups=groups, tiers=DEFAULT_TIERS, default="free")
    assert (tier.name if tier else None) == expected
