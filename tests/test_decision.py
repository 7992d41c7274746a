"""The pure decision: credentials, keys, routes, models, tiers. No I/O, no event loop."""

from __future__ import annotations

import json
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from controlplane.translate.secret import resolve_tier
from gateway import contract
from gateway.authz.server import Reply
from gateway.contract import EVERYONE, Limit, Limits, ModelRecord, TierRecord, parse_window
from gateway.decision import (
    Admission,
    Denial,
    HotCache,
    Policy,
    admit,
    allow_headers,
    header_lines,
    identity_block,
    rate_limited,
    ratelimit_wire,
)
from gateway.identity import H_SIGNATURE, H_TS, SIGN_WINDOW, Identity, sign, verify
from gateway.limits import BucketResult
from gateway.snapshot import Catalog, CompiledLimits, RouteTable, Snapshot, compile_record
from tests.support import platform

PEPPER = b"unit-pepper-0123456789"
POLICY = Policy(pepper=PEPPER, identity_secret=b"s" * 32, path_prefix="/check")


def make_snapshot() -> Snapshot:
    keys = dict(compile_record(k.record(PEPPER)) for k in platform.ALL_KEYS)
    catalog = Catalog.build(
        tiers=contract.DEFAULT_TIERS,
        models=[
            ModelRecord(id=platform.QWEN, ready=True),
            ModelRecord(id=platform.GRANITE, ready=True),
            ModelRecord(id=platform.MISTRAL, ready=False, reason="no GPU"),
        ],
        routes=[
            *platform.routes(platform.DEFAULT_ROUTES),
            contract.RouteRecord(id="h", host="qwen3.maas.local", prefix="/", model=platform.QWEN),
        ],
    )
    snap = Snapshot(keys=keys, catalog=catalog)
    snap.loaded = True
    return snap


SNAP = make_snapshot()


def check(
    headers: list[tuple[str, str]], *, path: str = "/check/qwen3/v1/chat/completions", host: str = "gw"
) -> Admission | Denial:
    h: CIMultiDict[str] = CIMultiDict(headers)
    return admit(SNAP, POLICY, host=host, path=path, get=h.get, count=lambda n: len(h.getall(n, ())), now=time.time())


def code(outcome: Admission | Denial) -> str:
    return outcome.code if isinstance(outcome, Denial) else "ok"


ADMIN = platform.ADMIN.plaintext


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        pytest.param([("Authorization", f"APIKEY {ADMIN}")], "ok", id="apikey"),
        pytest.param([("Authorization", f"apikey {ADMIN}")], "ok", id="apikey-lowercase"),
        pytest.param([("Authorization", f"Bearer {ADMIN}")], "ok", id="bearer"),
        pytest.param([("x-api-key", ADMIN)], "ok", id="x-api-key"),
        pytest.param([("Authorization", f"Bearer {ADMIN}"), ("x-api-key", ADMIN)], "ok", id="same-key-twice"),
        pytest.param([], "missing_api_key", id="none"),
        pytest.param([("Authorization", "")], "missing_api_key", id="empty-header"),
        pytest.param([("Authorization", "Bearer ")], "invalid_api_key", id="empty-bearer"),
        pytest.param([("Authorization", "Basic dXNlcjpwYXNz")], "invalid_api_key", id="basic"),
        pytest.param([("Authorization", f"APIKEY {ADMIN} extra")], "invalid_api_key", id="two-tokens"),
        # Envoy folds a repeated header into one, comma-joined
        pytest.param(
            [("Authorization", f"APIKEY {ADMIN},APIKEY other")], "conflicting_credentials", id="folded-duplicate"
        ),
        pytest.param([("x-api-key", f"{ADMIN},{ADMIN}")], "conflicting_credentials", id="folded-x-api-key"),
        pytest.param([("x-api-key", "")], "missing_api_key", id="empty-x-api-key"),
        pytest.param([("Authorization", f"APIKEY {ADMIN}"), ("x-api-key", " ")], "ok", id="valid-and-empty-x-api-key"),
        pytest.param([("Authorization", "APIKEY " + "k" * 600)], "invalid_api_key", id="oversized"),
        pytest.param([("Authorization", "APIKEY ключ")], "invalid_api_key", id="non-ascii"),
        pytest.param(
            [("Authorization", f"APIKEY {ADMIN}"), ("Authorization", f"APIKEY {ADMIN}")],
            "conflicting_credentials",
            id="duplicated-header",
        ),
        pytest.param(
            [("Authorization", f"Bearer {ADMIN}"), ("x-api-key", "other")], "conflicting_credentials", id="conflicting"
        ),
        pytest.param([("Authorization", f"APIKEY {platform.REVOKED.plaintext}")], "invalid_api_key", id="revoked"),
        pytest.param([("Authorization", f"APIKEY {platform.DISABLED.plaintext}")], "invalid_api_key", id="disabled"),
        pytest.param([("Authorization", f"APIKEY {platform.EXPIRED.plaintext}")], "expired_api_key", id="expired"),
    ],
)
def test_credentials(headers: list[tuple[str, str]], expected: str) -> None:
    outcome = check(headers)
    assert code(outcome) == expected
    if isinstance(outcome, Denial) and outcome.status == 401:
        assert ("www-authenticate", 'APIKEY realm="maas"') in outcome.headers


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("Basic dXNlcjpwYXNz", "scheme 'Basic'"),
        ("Token abc", "scheme 'Token'"),
        ("sk-maas-bare-key-without-a-scheme", "has no scheme"),
        ("lettersonlykey", "has no scheme"),  # a lone token is taken for a key: never echoed
    ],
)
def test_an_unsupported_scheme_says_which_forms_work(value: str, shown: str) -> None:
    outcome = check([("Authorization", value)])
    assert isinstance(outcome, Denial) and outcome.code == "invalid_api_key" and outcome.status == 401
    message = json.loads(outcome.body)["error"]["message"]
    assert shown in message and "APIKEY <key>" in message and value.split()[-1] not in message


def test_a_memoised_admission_never_answers_for_a_duplicated_or_different_credential() -> None:
    """Admissions are memoised by the credential headers as presented: the same headers again reuse it; a second
    copy of the header, or another header beside it, is judged anew."""
    first = check([("Authorization", f"APIKEY {ADMIN}")])
    assert isinstance(first, Admission)
    assert check([("Authorization", f"APIKEY {ADMIN}")]) is first
    doubled = [("Authorization", f"APIKEY {ADMIN}"), ("Authorization", "APIKEY other")]
    assert code(check(doubled)) == "conflicting_credentials"
    assert code(check([("Authorization", f"APIKEY {ADMIN}"), ("x-api-key", "other")])) == "conflicting_credentials"
    assert code(check([("Authorization", f"APIKEY {ADMIN}x")])) == "invalid_api_key"


@pytest.mark.parametrize(
    ("host", "path", "expected"),
    [
        pytest.param("gw", "/check/qwen3/v1/chat/completions", platform.QWEN, id="prefix"),
        pytest.param("gw", "/check/qwen3", platform.QWEN, id="exact"),
        pytest.param("gw", "/check/qwen3/", platform.QWEN, id="trailing-slash"),
        pytest.param("gw", "/check/qwen3?x=/granite", platform.QWEN, id="query-ignored"),
        pytest.param("gw", "/check/qwen3x/v1", None, id="not-a-segment-match"),
        pytest.param("gw", "/check/granite/v1/completions", platform.GRANITE, id="other-model"),
        pytest.param("QWEN3.maas.local:8000", "/check/v1/chat/completions", platform.QWEN, id="host-route"),
        pytest.param("gw", "/check/nowhere", None, id="unknown"),
    ],
)
def test_routes(host: str, path: str, expected: str | None) -> None:
    outcome = check([("x-api-key", ADMIN)], host=host, path=path)
    if expected is None:
        assert code(outcome) == "route_not_found"
        assert isinstance(outcome, Denial) and outcome.status == 404
    else:
        assert isinstance(outcome, Admission) and outcome.model == expected


def test_longest_prefix_wins() -> None:
    table = RouteTable(platform.routes({"/a": "short", "/a/b": "long", "/": "root"}))
    assert table.lookup("h", "/a/b/c").model == "long"  # type: ignore[union-attr]
    assert table.lookup("h", "/a/bc").model == "short"  # type: ignore[union-attr]
    assert table.lookup("h", "/z").model == "root"  # type: ignore[union-attr]


def test_wildcard_hostnames_match_subdomains_between_exact_hosts_and_any_host() -> None:
    """Gateway API's *.example.com matches any subdomain (it was stored as written and matched nothing: 404)."""
    route = contract.RouteRecord
    table = RouteTable(
        [
            route(id="1", host="*.models.maas.local", prefix="/mistral", model="wild"),
            route(id="2", host="*.maas.local", prefix="/mistral", model="wider"),
            route(id="3", host="exact.models.maas.local", prefix="/mistral", model="exact"),
            route(id="4", host="*", prefix="/", model="any"),
        ]
    )
    assert table.lookup("mistral.models.maas.local", "/mistral/v1").model == "wild"  # type: ignore[union-attr]
    assert table.lookup("a.b.models.maas.local", "/mistral").model == "wild"  # type: ignore[union-attr]
    assert table.lookup("other.maas.local", "/mistral").model == "wider"  # type: ignore[union-attr]
    assert table.lookup("exact.models.maas.local", "/mistral").model == "exact"  # type: ignore[union-attr]
    assert table.lookup("models.maas.local", "/mistral").model == "wider"  # type: ignore[union-attr]
    assert table.lookup("maas.local", "/mistral").model == "any"  # type: ignore[union-attr]
    assert table.lookup("mistral.models.maas.local", "/x").model == "any"  # type: ignore[union-attr]


def test_model_checks() -> None:
    granite_only = [("x-api-key", platform.GRANITE_ONLY.plaintext)]
    denied = check(granite_only)
    assert isinstance(denied, Denial) and (denied.status, denied.code) == (403, "model_not_allowed")
    assert code(check(granite_only, path="/check/granite/v1")) == "ok"
    not_ready = check([("x-api-key", ADMIN)], path="/check/mistral/v1")
    assert isinstance(not_ready, Denial) and (not_ready.status, not_ready.code) == (503, "model_not_ready")
    assert b"no GPU" in not_ready.body


def test_tier_from_groups_and_limits_from_overrides() -> None:
    premium = check([("x-api-key", platform.PREMIUM.plaintext)])
    assert isinstance(premium, Admission)
    assert premium.tier is not None and premium.tier.name == "premium"
    assert [(op.dimension, op.limit, op.window_ms) for op in premium.ops] == [
        ("requests", 20, 120_000),
        ("tokens", 50_000, 60_000),
    ]
    big = check([("x-api-key", platform.BIG.plaintext)])
    assert isinstance(big, Admission)
    assert [(op.dimension, op.limit) for op in big.ops] == [("requests", 1_000_000_000), ("tokens", 100_000)]


def test_equal_key_limits_compile_to_one_shared_object_and_different_ones_apart() -> None:
    """Keys' own limits are compiled once per distinct value (a million keys, one object); any field that differs,
    the window as written included, gets its own."""
    hour = Limits(requests=Limit(limit=5, window="1h"), tokens=Limit(limit=100, window="1m"))
    same = Limits(requests=Limit(limit=5, window="1h"), tokens=Limit(limit=100, window="1m"))
    a, b = CompiledLimits.of(hour), CompiledLimits.of(same)
    assert a is b and a is not None and a.requests == (5, 3_600_000) and a.tokens == (100, 60_000)
    for other in (
        Limits(requests=Limit(limit=5, window="60m"), tokens=Limit(limit=100, window="1m")),
        Limits(requests=Limit(limit=6, window="1h"), tokens=Limit(limit=100, window="1m")),
        Limits(requests=Limit(limit=5, window="1h")),
        Limits(tokens=Limit(limit=5, window="1h")),
    ):
        compiled = CompiledLimits.of(other)
        assert compiled is not a and compiled is not None
        assert (compiled.requests, compiled.tokens) == (
            (other.requests.limit, parse_window(other.requests.window)) if other.requests else None,
            (other.tokens.limit, parse_window(other.tokens.window)) if other.tokens else None,
        )
    assert CompiledLimits.of(None) is None
    with pytest.raises(ValueError, match="invalid window"):
        parse_window("5 fortnights")  # a memoised parser still refuses, every time
    with pytest.raises(ValueError, match="invalid window"):
        parse_window("5 fortnights")


def test_highest_tier_level_wins() -> None:
    key = platform.Key("sk-two-groups", "zed", ("free", "premium"))
    _, entry = compile_record(key.record(PEPPER))
    assert SNAP.catalog.tier_of(entry, "free").name == "premium"  # type: ignore[union-attr]
    nobody = platform.Key("sk-no-groups", "zed")
    _, entry = compile_record(nobody.record(PEPPER))
    assert SNAP.catalog.tier_of(entry, "free").name == "free"  # type: ignore[union-attr]


def test_an_unknown_own_tier_falls_back_to_the_groups_tier_never_to_no_limits() -> None:
    """A misspelt maas/tier (or a tier deleted since) had left the key with no limits and no model allow-list."""
    typo = platform.Key("sk-typo-tier", "zed", ("premium",), tier="fre")
    _, entry = compile_record(typo.record(PEPPER))
    assert SNAP.catalog.tier_of(entry, "free").name == "premium"  # type: ignore[union-attr]
    alone = platform.Key("sk-typo-alone", "zed", tier="fre")
    _, entry = compile_record(alone.record(PEPPER))
    assert SNAP.catalog.tier_of(entry, "free").name == "free"  # type: ignore[union-attr]
    tiers = [TierRecord(name="free", level=0), TierRecord(name="premium", level=1, groups=("premium",))]
    assert resolve_tier(explicit="fre", groups=["premium"], tiers=tiers, default="free") == tiers[1]
    assert resolve_tier(explicit="fre", groups=[], tiers=tiers, default="free") == tiers[0]


def test_every_key_is_in_system_authenticated_and_a_key_of_no_tier_is_refused_not_unlimited() -> None:
    """A mapping without the default tier had left keys without groups with no limits and no allow-list at all."""
    basic = TierRecord(
        name="basic", level=0, groups=("basic", EVERYONE), limits=Limits(requests=Limit(limit=1, window="1m"))
    )
    pro = TierRecord(name="pro", level=1, groups=("pro",))
    nobody = platform.Key("sk-nobody", "zed")
    pro_key = platform.Key("sk-pro", "zed", ("pro",))
    keys = dict(compile_record(k.record(PEPPER)) for k in (nobody, pro_key))
    routes = [*platform.routes({"/qwen3": platform.QWEN}), contract.RouteRecord(id="me", prefix="/v1/me", model=None)]

    def outcome(tiers: list[TierRecord], key: platform.Key, path: str = "/check/qwen3") -> Admission | Denial:
        catalog = Catalog.build(tiers=tiers, models=[ModelRecord(id=platform.QWEN, ready=True)], routes=routes)
        snap = Snapshot(keys=keys, catalog=catalog)
        h: CIMultiDict[str] = CIMultiDict([("x-api-key", key.plaintext)])
        return admit(snap, POLICY, host="", path=path, get=h.get, count=lambda n: 1, now=time.time())

    caught = outcome([basic, pro], nobody)
    assert isinstance(caught, Admission) and caught.tier is not None and caught.tier.name == "basic"
    assert resolve_tier(explicit=None, groups=[], tiers=[basic, pro], default="free") == basic
    got = outcome([basic, pro], pro_key)  # a higher tier of its own groups still wins
    assert isinstance(got, Admission) and got.tier is not None and got.tier.name == "pro"
    alone = TierRecord(name="basic", level=0, groups=("basic",))
    refused = outcome([alone, pro], nobody)
    assert isinstance(refused, Denial) and (refused.status, refused.code) == (403, "no_tier")
    assert code(outcome([alone, pro], nobody, "/check/v1/me")) == "ok"  # the self-service API needs a valid key only


def test_tier_models_restrict_access() -> None:
    catalog = Catalog.build(
        tiers=[TierRecord(name="free", limits=Limits(requests=Limit(limit=1, window="1m")), models=("granite-code",))],
        models=[ModelRecord(id=platform.QWEN, ready=True)],
        routes=platform.routes({"/qwen3": platform.QWEN}),
    )
    snap = Snapshot(keys=SNAP.keys, catalog=catalog)
    h: CIMultiDict[str] = CIMultiDict([("x-api-key", platform.FREE.plaintext)])
    outcome = admit(snap, POLICY, host="", path="/check/qwen3", get=h.get, count=lambda n: 1, now=time.time())
    assert code(outcome) == "model_not_allowed"
    assert isinstance(outcome, Denial) and outcome.error_type == "permission_error"  # as maas meter's 403 says


def test_allow_headers_are_signed_and_remove_the_key() -> None:
    outcome = check([("x-api-key", ADMIN)])
    assert isinstance(outcome, Admission)
    results = [BucketResult(True, 50, 49, 2400, 0, 1), BucketResult(True, 100_000, 100_000, 0, 0, 0)]
    headers = dict(allow_headers(outcome, results, POLICY, now=time.time()))
    assert headers["x-envoy-auth-headers-to-remove"] == "authorization,x-api-key"
    assert headers["x-ratelimit-remaining-requests"] == "49"
    assert headers["x-ratelimit-reset-requests"] == "3s"
    identity = verify(headers, POLICY.identity_secret)
    assert (identity.user, identity.tier, identity.model) == ("admin", "enterprise", platform.QWEN)


def test_a_key_without_a_token_limit_has_a_client_sent_token_limit_removed() -> None:
    """The signed identity carries no x-maas-token-limit then; Envoy sets only the headers the answer carries, so
    the client's own x-maas-token-limit would have reached the upstream (which then refused the identity)."""
    catalog = Catalog.build(
        tiers=[TierRecord(name="free", limits=Limits(requests=Limit(limit=9, window="1m")))],
        models=[ModelRecord(id=platform.QWEN, ready=True)],
        routes=platform.routes({"/qwen3": platform.QWEN}),
    )
    snap = Snapshot(keys=SNAP.keys, catalog=catalog)
    h: CIMultiDict[str] = CIMultiDict([("x-api-key", platform.FREE.plaintext)])
    outcome = admit(snap, POLICY, host="", path="/check/qwen3", get=h.get, count=lambda n: 1, now=time.time())
    assert isinstance(outcome, Admission)
    headers = dict(allow_headers(outcome, [BucketResult(True, 9, 8, 0, 0, 1)], POLICY, now=time.time()))
    assert "x-maas-token-limit" not in headers
    assert headers["x-envoy-auth-headers-to-remove"] == "authorization,x-api-key,x-maas-token-limit"


def test_the_wire_form_of_an_allow_is_the_header_list_encoded() -> None:
    """The HTTP/1.1 server writes an allow from the identity block's wire form and ``ratelimit_wire``; those bytes
    are exactly the encoded header list (which the aiohttp server and these tests read), and back."""
    outcome = check([("x-api-key", ADMIN)])
    assert isinstance(outcome, Admission)
    now = time.time()
    for results in (
        [BucketResult(True, 50, 49, 2400, 0, 1), BucketResult(True, 100_000, 99_000, 0, 0, 0)],
        [BucketResult(True, 7, 0, 3_725_000, 0, 1), BucketResult(True, 1, 1, 999, 0, 0)],
    ):
        listed = allow_headers(outcome, results, POLICY, now=now)
        block = identity_block(outcome, POLICY, now=now)
        wire = ratelimit_wire(outcome, results)
        assert block.wire + wire == header_lines(listed)
        assert Reply(200, list(block.headers), shared=block, wire=wire).header_list() == listed


def test_an_admission_reuses_its_identity_block_within_a_signing_window_only() -> None:
    outcome = check([("x-api-key", ADMIN)])
    assert isinstance(outcome, Admission)
    start = 1_800_000_000.0  # the first second of a signing window

    def signed(now: float) -> tuple[str, str]:
        headers = dict(allow_headers(outcome, None, POLICY, now=now))
        verify(headers, POLICY.identity_secret, now=now)
        return headers[H_TS], headers[H_SIGNATURE]

    first = signed(start)
    assert signed(start + SIGN_WINDOW - 1) == first  # same window: the block is reused
    later = signed(start + SIGN_WINDOW)
    assert later[0] == str(int(start) + SIGN_WINDOW) and later != first  # next window: signed anew
    assert signed(start + SIGN_WINDOW + 5) == later


def test_rate_limited_names_the_exhausted_dimension() -> None:
    outcome = check([("x-api-key", platform.FREE.plaintext)])
    assert isinstance(outcome, Admission)
    results = [BucketResult(False, 5, 3, 48_000, 0, 0), BucketResult(False, 100, 0, 70_000, 10_500, 0)]
    denial = rate_limited(outcome, results)
    headers = dict(denial.headers)
    assert denial.status == 429 and denial.error_type == "tokens"
    assert headers["retry-after"] == "11"
    assert headers["x-ratelimit-reset-tokens"] == "1m10s"


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["authorization", "x-api-key", "Authorization", "X-Api-Key", "other"]),
            st.text(max_size=80),
        ),
        max_size=4,
    ),
    st.text(max_size=100),
    st.text(max_size=40),
)
def test_any_input_gets_a_4xx_or_an_admission(headers: list[tuple[str, str]], path: str, host: str) -> None:
    outcome = check(headers, path=path, host=host)
    if isinstance(outcome, Denial):
        assert 400 <= outcome.status < 500
        assert outcome.body.startswith(b'{"error": {')


def admitted(snapshot: Snapshot, policy: Policy, headers: CIMultiDict[str], *, path: str, now: float) -> str:
    """The outcome code of one check of host ``gw``."""
    outcome = admit(
        snapshot,
        policy,
        host="gw",
        path=path,
        get=headers.get,
        count=lambda n: len(headers.getall(n, ())),
        now=now,
    )
    return code(outcome)


def test_memoised_admissions_follow_every_change_of_the_snapshot() -> None:
    """The admission of (key, host, path) is memoised per snapshot generation: a catalog change, a key change and
    a reload are all seen by the next check."""
    policy = Policy(pepper=PEPPER, identity_secret=b"s" * 32, path_prefix="/check")
    snap = make_snapshot()
    headers: CIMultiDict[str] = CIMultiDict([("Authorization", f"APIKEY {ADMIN}")])

    def outcome(snapshot: Snapshot) -> str:
        return admitted(snapshot, policy, headers, path="/check/qwen3/v1/chat/completions?x=1", now=time.time())

    assert outcome(snap) == outcome(snap) == "ok"
    snap.catalog = Catalog.build(
        tiers=contract.DEFAULT_TIERS, models=[ModelRecord(id=platform.QWEN, ready=False, reason="scaled to zero")],
        routes=platform.routes(platform.DEFAULT_ROUTES),
    )  # fmt: skip
    snap.generation += 1
    assert outcome(snap) == "model_not_ready"
    fresh = make_snapshot()  # a reload: a new snapshot, whatever its generation
    fresh.generation = snap.generation
    assert outcome(fresh) == "ok"
    digest = next(d for d, k in fresh.keys.items() if k.user == platform.ADMIN.user)
    fresh.keys.pop(digest)  # revoked by a change event
    fresh.generation += 1
    assert outcome(fresh) == "invalid_api_key"


def test_a_memoised_admission_still_expires_on_time() -> None:
    """The memo skips the key lookup, not the key's own checks: a key past its expiry is denied at once."""
    policy = Policy(pepper=PEPPER, identity_secret=b"s" * 32, path_prefix="/check")
    snap = make_snapshot()
    entry = next(k for k in snap.keys.values() if k.user == platform.ADMIN.user)
    started = time.time()
    entry.expires_at = started + 60  # as loaded from a key record with an expiry
    headers: CIMultiDict[str] = CIMultiDict([("Authorization", f"APIKEY {ADMIN}")])

    def outcome(now: float) -> str:
        return admitted(snap, policy, headers, path="/check/qwen3/v1/chat/completions", now=now)

    assert outcome(started) == outcome(started + 1) == "ok"
    assert len(policy.cache.admissions) == 1
    assert outcome(started + 61) == "expired_api_key"


def test_a_limit_of_zero_is_refused_without_a_retry_after() -> None:
    """A bucket of 0 never refills: its retry-after (60) contradicted x-ratelimit-reset-requests (0s)."""
    outcome = check([("x-api-key", ADMIN)])
    assert isinstance(outcome, Admission)
    results = [BucketResult(False, 0, 0, 0, 60_000, 0), BucketResult(True, 100_000, 100_000, 0, 0, 0)]
    denial = rate_limited(outcome, results)
    headers = dict(denial.headers)
    assert denial.status == 429 and "retry-after" not in headers and headers["x-ratelimit-limit-requests"] == "0"
    assert "limit is 0" in json.loads(denial.body)["error"]["message"]


def test_the_memo_holds_no_long_targets_and_a_bounded_number_of_entries() -> None:
    """Any path under a routed prefix is admitted: 60 KiB paths had grown the memo past the pod's memory limit."""
    snap = make_snapshot()
    policy = Policy(pepper=PEPPER, identity_secret=b"s" * 32, path_prefix="/check")
    h: CIMultiDict[str] = CIMultiDict([("x-api-key", ADMIN)])
    long_path = "/check/qwen3/v1/" + "a" * 40_000
    outcome = admit(snap, policy, host="gw", path=long_path, get=h.get, count=lambda n: 1, now=time.time())
    assert isinstance(outcome, Admission) and not policy.cache.admissions
    for i in range(HotCache.MAX_ADMISSIONS + 10):
        admit(snap, policy, host="gw", path=f"/check/qwen3/v1/{i}", get=h.get, count=lambda n: 1, now=time.time())
    assert 0 < len(policy.cache.admissions) <= HotCache.MAX_ADMISSIONS


def test_identity_values_outside_printable_ascii_are_signed_as_sent_and_read_back() -> None:
    """A user id 'josé-日本' (or one with a newline) was signed as text but sent as UTF-8 bytes (a newline became a
    space): the meter read other bytes and refused every request of the key as forged."""
    identity = Identity(key_id="abc", user="josé-日本\nline", groups="grüne,%team", tier="free", model="m")
    headers = sign(identity, b"s" * 32)
    assert all(value.isascii() and value.isprintable() for value in headers.values())
    # the bytes as the meter's server reads them (latin-1, as HTTP allows) are the ones signed
    on_the_wire = {name: value.encode("latin-1").decode("latin-1") for name, value in headers.items()}
    got = verify(on_the_wire, b"s" * 32)
    assert (got.user, got.groups) == ("josé-日本\nline", "grüne,%team")
    plain = sign(Identity(key_id="abc", user="alice", groups="free", tier="free", model="m"), b"s" * 32)
    assert plain["x-maas-user"] == "alice"  # printable ASCII goes as it is


def test_a_path_admitted_unrouted_still_takes_from_the_keys_limits() -> None:
    policy = Policy(pepper=PEPPER, identity_secret=b"s" * 32, path_prefix="/check", allow_unrouted=True)
    h: CIMultiDict[str] = CIMultiDict([("x-api-key", platform.FREE.plaintext)])
    outcome = admit(SNAP, policy, host="gw", path="/check/nothing/here", get=h.get, count=lambda n: 1, now=time.time())
    assert isinstance(outcome, Admission) and outcome.model is None
    assert [op.dimension for op in outcome.ops] == ["requests", "tokens"]


def test_model_denials_carry_their_tier_and_model() -> None:
    refused = check([("x-api-key", platform.GRANITE_ONLY.plaintext)])
    assert isinstance(refused, Denial) and refused.code == "model_not_allowed"
    assert (refused.tier, refused.model) == ("premium", platform.QWEN)  # the labels of its decision metric


@pytest.mark.parametrize(
    ("host", "model"),
    [
        pytest.param("QWEN3.maas.local:443", platform.QWEN, id="case-and-port"),
        pytest.param("[::1]:8080", platform.GRANITE, id="ipv6"),
        # Envoy routes 'qwen3.maas.local.' to the '*' routes (the dot stays, without strip_trailing_host_dot): the
        # check must pick the route Envoy sends the request to, not the one of qwen3.maas.local
        pytest.param("qwen3.maas.local.", platform.GRANITE, id="trailing-dot-is-another-host"),
        pytest.param("qwen3.maas.local.:443", platform.GRANITE, id="trailing-dot-and-port"),
    ],
)
def test_the_host_is_matched_as_envoy_matches_it(host: str, model: str) -> None:
    outcome = check([("x-api-key", ADMIN)], path="/check/granite/v1/chat/completions", host=host)
    assert isinstance(outcome, Admission) and outcome.model == model


@pytest.mark.parametrize(
    "host",
    [
        pytest.param("qwen3.maas.local:", id="empty-port"),
        pytest.param("qwen3.maas.local:x", id="port-not-digits"),
        pytest.param("qwen3.maas.local:1:2", id="two-ports"),
        pytest.param("qwen3.maas.local:123456", id="port-too-long"),
        pytest.param("user@qwen3.maas.local", id="user-info"),
        pytest.param("[::1].qwen3.maas.local", id="bracket-prefix"),
        pytest.param("qwen3.maas.loc\u0430l", id="non-ascii"),
    ],
)
def test_a_host_envoy_might_match_otherwise_is_refused(host: str) -> None:
    """Istio's ``host:*`` domain matches whatever follows the colon: the check took ``host:1:2`` for ``host:1`` and
    ``host:`` for ``host`` (which Envoy routes to the routes for any host), so only a port of digits passes."""
    outcome = check([("x-api-key", ADMIN)], path="/check/granite/v1/chat/completions", host=host)
    assert isinstance(outcome, Denial) and (outcome.status, outcome.code) == (400, "invalid_host")


def test_a_port_on_a_host_of_a_wildcard_hostname_is_refused() -> None:
    """Istio lists ``*.example.com`` with the listener's port only (``*.example.com:80``), and Envoy prefers it to
    a host's own ``host:*``: with a port, which routes Envoy takes depends on a port the check does not know."""
    route = contract.RouteRecord
    routes = [
        route(id="1", host="*.models.maas.local", prefix="/", model=platform.QWEN),
        route(id="2", host="exact.models.maas.local", prefix="/", model=platform.GRANITE),
        route(id="3", host="*", prefix="/", model=platform.GRANITE),
    ]
    models = [ModelRecord(id=platform.QWEN, ready=True), ModelRecord(id=platform.GRANITE, ready=True)]
    snap = Snapshot(keys=SNAP.keys, catalog=Catalog.build(tiers=contract.DEFAULT_TIERS, models=models, routes=routes))

    def outcome(host: str) -> Admission | Denial:
        get = {"x-api-key": ADMIN}.get
        return admit(snap, POLICY, host=host, path="/v1", get=get, count=lambda n: 1, now=time.time())

    assert code(outcome("a.models.maas.local:80")) == "invalid_host"
    assert code(outcome("exact.models.maas.local:8080")) == "invalid_host"
    for host, model in (("a.models.maas.local", platform.QWEN), ("exact.models.maas.local", platform.GRANITE)):
        admitted = outcome(host)
        assert isinstance(admitted, Admission) and admitted.model == model, host
    admitted = outcome("other.maas.local:80")
    assert isinstance(admitted, Admission) and admitted.model == platform.GRANITE
