"""API-key Secret -> KeyRecord, table-tested: Kuadrant format, maas/* labels and annotations, digest-only keys."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from controlplane import kinds
from controlplane.errors import TranslateError
from controlplane.translate.secret import resolve_tier, translate_secret
from gateway.contract import DEFAULT_TIERS, KeyStatus, Limit, Limits, RecordKind, TierRecord, digest_key
from tests.support.desired import desired_over

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
        # these had made a key that never expires, without a word
        pytest.param(
            _secret(annotations={"maas.io/expires-at": "2024-13-01T00:00:00Z"}), "invalid_expiry", id="month-13"
        ),
        pytest.param(_secret(annotations={"maas.io/expires-at": "soon"}), "invalid_expiry", id="not-a-time"),
        pytest.param(_secret(annotations={"maas.io/expires-at": "1704067200000"}), "invalid_expiry", id="epoch-ms"),
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


def test_base64_wrapped_over_lines_is_read_as_the_api_server_reads_it() -> None:
    encoded = base64.encodebytes(b"sk-" + b"x" * 80).decode()  # wrapped at 76 columns, as `base64` prints it
    assert "\n" in encoded.strip()
    record, _ = translate_secret(_secret(data={"api_key": encoded}), pepper=PEPPER)
    assert record.digest == digest_key("sk-" + "x" * 80, PEPPER)


def test_expiry_forms() -> None:
    for text in (
        "2024-01-01T00:00:00Z",
        "2024-01-01t00:00:00z",
        "2024-01-01T01:00:00+01:00",
        "1704067200",
        "2024-01-01T00:00:00",
    ):
        record, _ = translate_secret(
            _secret(annotations={"maas.io/expires-at": text}), pepper=PEPPER, tiers=DEFAULT_TIERS
        )
        assert record.expires_at == 1704067200.0, text


def test_a_limit_without_a_window_takes_the_tiers_or_is_refused() -> None:
    gold = TierRecord(name="gold", level=3, groups=("gold",))  # no limits: no window to give
    secret = _secret(annotations={"kuadrant.io/groups": "gold", "maas/token-limit": "999"})
    with pytest.raises(TranslateError) as info:
        translate_secret(secret, pepper=PEPPER, tiers=[*DEFAULT_TIERS, gold])
    assert info.value.reason == "invalid_limit"
    timed = gold.model_copy(update={"limits": Limits(tokens=Limit(limit=10, window="1h"))})
    record, depends = translate_secret(secret, pepper=PEPPER, tiers=[*DEFAULT_TIERS, timed])
    assert depends and record.limits is not None and record.limits.tokens == Limit(limit=999, window="1h")


def _gold_tier_sync(secret: dict[str, Any], *, gold: str) -> tuple[Any, dict[str, Any], list[str]]:
    """The sync path over ``secret`` and tier ConfigMaps with a ``gold`` tier of these limits, synced once: the
    desired state, the limits ConfigMap (to change) and the reasons reported."""
    mapping = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "tier-to-group-mapping", "namespace": "llm"},
        "data": {"tiers": "- {name: free, level: 0, groups: [x]}\n- {name: gold, level: 3, groups: [gold]}\n"},
    }
    limits: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "maas-tier-limits", "namespace": "llm"},
        "data": {"limits": f"free: {{requests: {{limit: 5, window: 2m}}}}\ngold: {gold}\n"},
    }
    objects = {
        kinds.SECRET: {("llm", "alice-key"): secret},
        kinds.CONFIGMAP: {("llm", "tier-to-group-mapping"): mapping, ("llm", "maas-tier-limits"): limits},
    }
    reported: list[str] = []
    desired = desired_over(objects, lambda kind, obj, exc: reported.append(exc.reason), pepper=PEPPER)
    desired.update_tiers()
    desired.update_secrets(desired.all_secrets())
    return desired, limits, reported


def test_a_refused_window_less_limit_is_taken_once_its_tier_gets_the_window() -> None:
    """The control plane retranslates such a Secret when the tiers change, though it was refused before."""
    secret = _secret(annotations={"kuadrant.io/groups": "gold", "maas/token-limit": "999"})
    desired, limits, reported = _gold_tier_sync(secret, gold="{requests: {limit: 9, window: 1m}}")
    assert reported == ["invalid_limit"] and not desired.records[RecordKind.KEY]
    limits["data"] = {"limits": "free: {requests: {limit: 5, window: 2m}}\ngold: {tokens: {limit: 9, window: 1h}}\n"}
    desired.update_secrets(desired.update_tiers())
    [raw] = desired.records[RecordKind.KEY].values()
    assert '"tokens":{"limit":999,"window":"1h"}' in raw.replace(" ", "")


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        pytest.param("revoked", KeyStatus.REVOKED, id="revoked"),
        pytest.param("disabled", KeyStatus.DISABLED, id="disabled"),
        pytest.param("inactive", KeyStatus.DISABLED, id="inactive"),
    ],
)
def test_a_denied_key_is_read_whatever_its_limits_say(status: str, expected: KeyStatus) -> None:
    """Its tier lost the limit the key took its window from: the Secret was refused, and the last good record, still
    active, kept the key admitted; a revoked or disabled key needs no limits to be denied."""
    gold = TierRecord(name="gold", level=3, groups=("gold",))
    for limit in ({"maas/token-limit": "999"}, {"maas/request-limit": "many"}):
        secret = _secret(annotations={"kuadrant.io/groups": "gold", "maas/status": status, **limit})
        record, _ = translate_secret(secret, pepper=PEPPER, tiers=[*DEFAULT_TIERS, gold])
        assert (record.status, record.limits) == (expected, None)
    active = _secret(annotations={"kuadrant.io/groups": "gold", "maas/token-limit": "999"})
    with pytest.raises(TranslateError):
        translate_secret(active, pepper=PEPPER, tiers=[*DEFAULT_TIERS, gold])


def test_revoking_a_key_whose_tier_lost_its_window_reaches_the_store() -> None:
    """Through the sync path: the revoked Secret replaces the last good, active record."""
    secret = _secret(annotations={"maas/tier": "gold", "maas/token-limit": "999"})
    desired, limits, reported = _gold_tier_sync(secret, gold="{tokens: {limit: 9, window: 1h}}")
    limits["data"] = {"limits": "free: {requests: {limit: 5, window: 2m}}\ngold: {requests: {limit: 9, window: 1m}}\n"}
    desired.update_secrets(desired.update_tiers())
    [raw] = desired.records[RecordKind.KEY].values()
    assert reported == ["invalid_limit"] and '"status":"active"' in raw.replace(" ", "")  # the last good record
    secret["metadata"]["annotations"]["maas/status"] = "revoked"
    desired.update_secrets([("llm", "alice-key")])
    [raw] = desired.records[RecordKind.KEY].values()
    assert '"status":"revoked"' in raw.replace(" ", "") and '"limits":null' in raw.replace(" ", "")
