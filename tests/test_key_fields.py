"""The authz full load validates key records as plain fields (``decode_key_fields``), not as ``KeyRecord`` models:
both must accept and refuse the same records and compile them to the same index entry."""

from __future__ import annotations

import json
from typing import Any

import pytest
import redis.asyncio as aioredis
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, TypeAdapter, ValidationError

from gateway import contract
from gateway.authz.follower import SnapshotFollower
from gateway.authz.metrics import AuthzMetrics
from gateway.contract import KeyFields, KeyRecord, Limit, LimitFields, Limits, LimitsFields, RecordKind
from gateway.snapshot import compile_key, compile_record
from gateway.store.redis import RedisStore

DIGESTS = ["ab" * 32, "0" * 64, "AB" * 32, "ab" * 31, "zz" * 32]

_text = st.text(alphabet="abcdefgh ,:-", max_size=12)
_window = st.sampled_from(["1m", "30s", " 2m ", "1m30s", "250ms", "0s", "367d", "1 m", "2x", "", "m1", 60])
_limit = st.fixed_dictionaries(
    {},
    optional={
        "limit": st.one_of(st.integers(-3, 3), st.integers(0, 10**12), st.sampled_from(["5", "x", 1.5, None])),
        "window": _window,
        "other": st.just(1),
    },
)
_limits = st.one_of(
    st.none(),
    st.fixed_dictionaries(
        {}, optional={"requests": st.one_of(st.none(), _limit), "tokens": st.one_of(st.none(), _limit)}
    ),
    st.sampled_from([[], "1m", 3]),
)
_field_values: dict[str, st.SearchStrategy[Any]] = {
    "v": st.sampled_from([1, 2, 0, "1", None]),
    "key_id": st.one_of(_text, st.sampled_from([None, 5])),
    "digest": st.one_of(st.sampled_from(DIGESTS), st.sampled_from([None, 5])),
    "user": st.one_of(_text, st.sampled_from([None, 7])),
    "groups": st.one_of(st.lists(_text, max_size=3), st.sampled_from(["g", None, [1]])),
    "tier": st.one_of(st.none(), _text, st.just(3)),
    "models": st.one_of(st.lists(st.sampled_from(["qwen3", "llama", ""]), max_size=3), st.sampled_from(["m", None])),
    "status": st.sampled_from(["active", "disabled", "revoked", "suspended", None, 1]),
    "expires_at": st.one_of(st.none(), st.floats(allow_nan=False, allow_infinity=False), st.sampled_from(["1", "x"])),
    "limits": _limits,
    "name": st.one_of(_text, st.just(None)),
    "source": st.one_of(_text, st.just(None)),
    "created_at": st.one_of(st.none(), st.integers(0, 2**40), st.just("soon")),
    "ip_allowlist": st.just(["10.0.0.0/8"]),  # a field a newer writer added: ignored by both
}
_valid_limit = st.fixed_dictionaries({"limit": st.integers(0, 10**12), "window": st.sampled_from(["1m", "30s", "1h"])})
_valid_values: dict[str, st.SearchStrategy[Any]] = {
    "v": st.just(1),
    "key_id": _text,
    "digest": st.sampled_from(DIGESTS[:2]),
    "user": _text,
    "groups": st.lists(_text, max_size=3),
    "tier": st.one_of(st.none(), _text),
    "models": st.lists(st.sampled_from(["qwen3", "llama"]), max_size=3),
    "status": st.sampled_from(["active", "disabled", "revoked"]),
    "expires_at": st.one_of(st.none(), st.floats(0, 2e9)),
    "limits": st.one_of(
        st.none(), st.fixed_dictionaries({}, optional={"requests": _valid_limit, "tokens": _valid_limit})
    ),
    "name": _text,
    "source": _text,
    "created_at": st.one_of(st.none(), st.integers(0, 2**40)),
}
_REQUIRED = ("key_id", "digest", "user")
_valid_records = st.fixed_dictionaries(
    {name: _valid_values[name] for name in _REQUIRED},
    optional={name: value for name, value in _valid_values.items() if name not in _REQUIRED},
)
_LEFT_OUT = object()


def _outcome(decode: Any, payload: str) -> tuple[str, object]:
    """What a full load makes of ``payload``: the compiled entry, or why it is skipped."""
    try:
        digest, entry = decode(payload)
    except contract.RecordVersionError:
        return "schema_version", None
    except (ValidationError, ValueError):
        return "malformed", None
    return "loaded", (digest, *(getattr(entry, name) for name in type(entry).__slots__))


def _as_model(payload: str) -> object:
    return compile_record(contract.decode_record(RecordKind.KEY, payload))


def _as_fields(payload: str) -> object:
    return compile_key(contract.decode_key_fields(payload))


@pytest.mark.parametrize("name", sorted(_field_values))
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_fields_and_the_model_accept_refuse_and_compile_alike(name: str, data: st.DataObject) -> None:
    """A valid record with field ``name`` set to any value or left out: each field's checks are met on their own,
    not behind another field's error."""
    record = data.draw(_valid_records)
    value = data.draw(st.one_of(st.just(_LEFT_OUT), _field_values[name]))
    if value is _LEFT_OUT:
        record.pop(name, None)
    else:
        record[name] = value
    payload = json.dumps(record)
    assert _outcome(_as_fields, payload) == _outcome(_as_model, payload)


@pytest.mark.parametrize(
    ("payload", "outcome"),
    [
        ('{"key_id": "k", "digest": "' + "ab" * 32 + '", "user": "u"}', "loaded"),
        (
            '{"key_id": "k", "digest": "' + "ab" * 32 + '", "user": "u", "limits": {"requests": {"limit": 5, '
            '"window": "2x"}}}',
            "malformed",
        ),
        (
            '{"v": 2, "key_id": "k", "digest": "' + "ab" * 32 + '", "user": "u", "limits": {"requests": {"limit": 5, '
            '"window": "2x"}}}',
            "schema_version",
        ),
        ('{"v": 2, "status": "suspended"}', "schema_version"),
        (
            '{"key_id": "k", "digest": "' + "ab" * 32 + '", "user": "u", "limits": {"tokens": {"limit": -1, '
            '"window": "1m"}}}',
            "malformed",
        ),
        ("{not json", "malformed"),
        ("[]", "malformed"),
    ],
)
def test_known_records_load_or_are_skipped_for_their_reason(payload: str, outcome: str) -> None:
    assert _outcome(_as_fields, payload)[0] == outcome == _outcome(_as_model, payload)[0]


@pytest.mark.parametrize(("fields", "model"), [(KeyFields, KeyRecord), (LimitsFields, Limits), (LimitFields, Limit)])
def test_the_fields_are_the_models_fields(fields: Any, model: type[BaseModel]) -> None:
    """A field added to a record must be added to its plain form too (and be as required or optional)."""
    schema = TypeAdapter(fields).core_schema  # required as pydantic reads it (the annotations are strings here)
    if schema["type"] == "definitions":
        schema = schema["schema"]
    assert schema["type"] == "typed-dict"
    required = {name: field.get("required", True) for name, field in schema["fields"].items()}
    assert required == {name: field.is_required() for name, field in model.model_fields.items()}


@pytest.mark.redis
async def test_a_full_load_and_an_event_skip_a_key_whose_window_is_not_one(redis_url: str) -> None:
    """The window of a key's own limit is checked when the key is compiled: the record is skipped as malformed
    (at a full load and in a change event), the other keys load."""
    good = KeyRecord(key_id="a" * 16, digest="a" * 64, user="good", limits=Limits(requests=Limit(limit=5, window="2m")))
    bad = json.loads(contract.encode_record(good.model_copy(update={"digest": "b" * 64, "key_id": "b" * 16})))
    bad["limits"]["requests"]["window"] = "2 fortnights"
    raw = aioredis.Redis.from_url(redis_url)
    await raw.hset(contract.KEYS_HASH, mapping={good.digest: contract.encode_record(good), "b" * 64: json.dumps(bad)})
    await raw.set(contract.GENERATION_KEY, 1)
    await raw.aclose()
    store = RedisStore(redis_url, timeout=5.0)
    metrics = AuthzMetrics(max_keys=10)
    follower = SnapshotFollower(store, metrics=metrics)
    try:
        await follower.reload(reason="start")
        assert list(follower.snapshot.keys) == [bytes.fromhex(good.digest)]
        assert follower.snapshot.keys[bytes.fromhex(good.digest)].limits.requests == (5, 120_000)  # type: ignore[union-attr]
        skipped = {"kind": "key", "reason": "malformed"}
        assert metrics.registry.get_sample_value("maas_snapshot_skipped_records_total", skipped) == 1
        # the good key rewritten with the bad window: dropped from the index, not kept with its old limits
        bad["digest"], bad["key_id"] = good.digest, good.key_id
        event = contract.ChangeEvent(
            gen=2, changes=(contract.Change(kind=RecordKind.KEY, id=good.digest, value=json.dumps(bad)),)
        )
        assert follower.apply_event(event)
        assert follower.snapshot.keys == {}
        assert metrics.registry.get_sample_value("maas_snapshot_skipped_records_total", skipped) == 2
    finally:
        await store.close()
