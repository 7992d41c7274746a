"""The contract between the control plane and the data path.

Everything that crosses Redis is defined here: the records (API keys, tiers, models, routes), how a key is
hashed, how Redis keys are named, and the change-event format. Nothing here knows about Kubernetes.

Redis layout (``SCHEMA_VERSION`` 1). Configuration lives under one Redis Cluster hash tag, ``{maas}``, so one
script can write a batch of records, bump the generation and publish the change event atomically:

- ``{maas}:v1:keys``    hash  digest (hex) -> key record JSON
- ``{maas}:v1:tiers``   hash  tier name -> tier record JSON
- ``{maas}:v1:models``  hash  model id -> model record JSON
- ``{maas}:v1:routes``  hash  route id -> route record JSON
- ``{maas}:v1:gen``     int   generation, +1 per published change event
- ``maas:v1:events``    pub/sub channel of change events

Per-key data shares the hash tag ``{k:<key_id>}`` so all buckets of one key sit in one cluster slot:

- ``maas:b:{k:<key_id>}:<dimension>``   token bucket (string ``<tokens> <ms timestamp>``; earlier versions kept a
  hash ``{t, ts}``, still read)
- ``maas:u:{k:<key_id>}:<YYYYMMDD>``    usage ledger (hash: ``<model>|requests``, ``<model>|prompt``,
  ``<model>|completion``)

Index of the ledger, so usage reports over all keys never scan the keyspace:

- ``maas:ui:<YYYYMMDD>``   set of the key ids with usage on that day (no hash tag: in a cluster it sits apart from
  the rows, and the meter adds a key to it again until it lands)

Processes of two versions share one Redis during a rolling upgrade, so the contract changes only in ways the other
version reads safely. Records ignore fields they do not know (``extra="ignore"``): a new *optional* field whose
absence means what older versions do anyway may be added under the same ``SCHEMA_VERSION`` (its default is what a
record of an older writer gets). A change a reader must not ignore (a new way to deny a key, a changed meaning) bumps
``SCHEMA_VERSION``, which moves every configuration key and the channel: a record or an event of another version
is never read as one of this version (``RecordVersionError``, ``EventFormatError``). A change event's changes of a
record kind this version does not know are left out, as a full load leaves out the hashes it does not know. A
bucket's state that the script cannot read counts as a full bucket (as a missing one does) and the next take
rewrites it, so another layout never fails the checks of other keys in the same script call; a new bucket layout
must still be read by the previous release (or take new key names), or their buckets reset each other.
"""

from __future__ import annotations

import hmac
import json
import re
import time
from collections.abc import Sequence
from enum import StrEnum
from functools import lru_cache
from typing import Annotated, Any, Literal, Required

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    TypeAdapter,
    ValidationError,
    field_validator,
    with_config,
)
from typing_extensions import TypedDict

SCHEMA_VERSION = 1

KEY_ID_LENGTH = 16
"""Hex characters of the digest used as the public key id (64 bits: collisions are not a practical concern)."""

CONFIG_TAG = "{maas}"
KEYS_HASH = f"{CONFIG_TAG}:v{SCHEMA_VERSION}:keys"
TIERS_HASH = f"{CONFIG_TAG}:v{SCHEMA_VERSION}:tiers"
MODELS_HASH = f"{CONFIG_TAG}:v{SCHEMA_VERSION}:models"
ROUTES_HASH = f"{CONFIG_TAG}:v{SCHEMA_VERSION}:routes"
GENERATION_KEY = f"{CONFIG_TAG}:v{SCHEMA_VERSION}:gen"
EVENTS_CHANNEL = f"maas:v{SCHEMA_VERSION}:events"

REQUESTS = "requests"
TOKENS = "tokens"
Dimension = Literal["requests", "tokens"]


class RecordKind(StrEnum):
    KEY = "key"
    TIER = "tier"
    MODEL = "model"
    ROUTE = "route"


KIND_HASHES: dict[RecordKind, str] = {
    RecordKind.KEY: KEYS_HASH,
    RecordKind.TIER: TIERS_HASH,
    RecordKind.MODEL: MODELS_HASH,
    RecordKind.ROUTE: ROUTES_HASH,
}


def bucket_key(key_id: str, dimension: str) -> str:
    return f"maas:b:{{k:{key_id}}}:{dimension}"


def ledger_key(key_id: str, day: str) -> str:
    return f"maas:u:{{k:{key_id}}}:{day}"


def reservation_key(key_id: str, dimension: str, reservation: str) -> str:
    """The marker of one meter reservation (what it took, or that it was released): beside its key's bucket, in the
    same hash slot, so one script reads both on Redis Cluster."""
    return f"maas:r:{{k:{key_id}}}:{dimension}:{reservation}"


def ledger_write_key(key_id: str, write_id: str) -> str:
    """The marker of one ledger write that landed (so a write made again is not counted twice): in its ledger row's
    hash slot."""
    return f"maas:uw:{{k:{key_id}}}:{write_id}"


def ledger_index_key(day: str) -> str:
    return f"maas:ui:{day}"


def ledger_day(epoch_seconds: float | None = None) -> str:
    return time.strftime("%Y%m%d", time.gmtime(time.time() if epoch_seconds is None else epoch_seconds))


# --- hashing -------------------------------------------------------------------------------------------------

DEV_PEPPER = "maas-development-pepper-do-not-use-in-production"


def digest_key(api_key: str | bytes, pepper: bytes) -> str:
    """HMAC-SHA256 of the key under the server-side pepper, as hex. The only form in which keys are stored."""
    raw = api_key.encode() if isinstance(api_key, str) else api_key
    return hmac.digest(pepper, raw, "sha256").hex()


def key_id_of(digest: str) -> str:
    return digest[:KEY_ID_LENGTH]


# --- windows -------------------------------------------------------------------------------------------------

_WINDOW_RE = re.compile(r"(?:\d+\s*(?:ms|s|m|h|d)\s*)+")
_WINDOW_PART = re.compile(r"(\d+)\s*(ms|s|m|h|d)")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
MAX_WINDOW_MS = 366 * 86_400_000


class WindowError(ValueError):
    """A window string that is not ``<n><unit>`` (or several, ``1m30s``) with unit ``ms``, ``s``, ``m``, ``h`` or
    ``d``, or one out of range (``out_of_range``)."""

    def __init__(self, message: str, *, out_of_range: bool = False) -> None:
        super().__init__(message)
        self.out_of_range = out_of_range


@lru_cache(maxsize=1024)
def parse_window(text: str) -> int:
    """Kuadrant-style window (``30s``, ``2m``, ``1h``, ``1d``, or parts in a row as Kuadrant's ``1m30s``) to
    milliseconds (memoised: a full load of a million keys with their own limits validates two windows per key, out
    of a handful of distinct ones)."""
    compact = text.strip()
    if len(compact) > 64 or _WINDOW_RE.fullmatch(compact) is None:
        raise WindowError(f"invalid window {text!r}: expected a number and a unit (ms, s, m, h, d), like '2m', '1m30s'")
    value = sum(int(n) * _UNIT_MS[unit] for n, unit in _WINDOW_PART.findall(compact))
    if value <= 0 or value > MAX_WINDOW_MS:
        raise WindowError(f"invalid window {text!r}: must be between 1ms and 366d", out_of_range=True)
    return value


def format_duration(ms: float) -> str:
    """OpenAI's reset format: ``1s``, ``6m0s``, ``1h2m3s``; sub-second values as ``250ms``."""
    if ms <= 0:
        return "0s"
    if ms < 1000:
        return f"{int(ms + 0.999)}ms"
    total = int(ms / 1000 + 0.999)
    hours, rest = divmod(total, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{seconds}s"
    if minutes:
        return f"{minutes}m{seconds}s"
    return f"{seconds}s"


# --- records -------------------------------------------------------------------------------------------------


class _Record(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class Limit(_Record):
    """``limit`` units per ``window`` (a token bucket of capacity ``limit`` refilled over ``window``)."""

    limit: Annotated[int, Field(ge=0)]
    window: str

    @field_validator("window")
    @classmethod
    def _check_window(cls, value: str) -> str:
        parse_window(value)
        return value.strip()

    @property
    def window_ms(self) -> int:
        return parse_window(self.window)


class Limits(_Record):
    requests: Limit | None = None
    tokens: Limit | None = None


class KeyStatus(StrEnum):
    ACTIVE = "active"
    DISABLED = "disabled"
    REVOKED = "revoked"


class KeyRecord(_Record):
    v: int = SCHEMA_VERSION
    key_id: str
    digest: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    user: str
    groups: tuple[str, ...] = ()
    tier: str | None = None
    models: tuple[str, ...] = ()
    status: KeyStatus = KeyStatus.ACTIVE
    expires_at: float | None = None
    limits: Limits | None = None
    name: str = ""
    source: str = "admin"
    created_at: float | None = None


@with_config(ConfigDict(extra="ignore"))
class LimitFields(TypedDict):
    """A ``Limit`` as plain fields; its window is checked where it is compiled (``parse_window``)."""

    limit: Annotated[int, Field(ge=0)]
    window: str


@with_config(ConfigDict(extra="ignore"))
class LimitsFields(TypedDict, total=False):
    requests: LimitFields | None
    tokens: LimitFields | None


@with_config(ConfigDict(extra="ignore"))
class KeyFields(TypedDict, total=False):
    """A ``KeyRecord`` as plain fields, for the authz full load: a million records are validated there, and a model
    instance per record (and per limit) costs about a third of that (a field left out is the record's default).
    Kept field for field with ``KeyRecord`` (tests/test_key_fields.py checks they accept and refuse alike)."""

    v: int
    key_id: Required[str]
    digest: Required[Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]]
    user: Required[str]
    groups: tuple[str, ...]
    tier: str | None
    models: tuple[str, ...]
    status: KeyStatus
    expires_at: float | None
    limits: LimitsFields | None
    name: str
    source: str
    created_at: float | None


class TierRecord(_Record):
    v: int = SCHEMA_VERSION
    name: str
    display_name: str = ""
    level: int = 0
    groups: tuple[str, ...] = ()
    limits: Limits = Limits()
    models: tuple[str, ...] = ()


class ModelRecord(_Record):
    v: int = SCHEMA_VERSION
    id: str
    namespace: str = ""
    ready: bool = False
    reason: str = ""
    url: str | None = None
    runtime: str | None = None
    image: str | None = None
    model_format: str | None = None
    storage_uri: str | None = None
    gpus: int = 0
    min_replicas: int | None = None
    max_replicas: int | None = None
    max_model_len: int | None = None
    deployment_mode: str | None = None
    isvc: str = ""
    routes: tuple[str, ...] = ()


class RouteRecord(_Record):
    """One (host, path prefix) -> model entry. ``host`` ``*`` matches any host; ``model`` None is a route to a
    model-less service (self-service API) that needs a valid key but no model checks."""

    v: int = SCHEMA_VERSION
    id: str
    host: str = "*"
    prefix: str = "/"
    model: str | None = None
    rewrite: str | None = None
    backend: str | None = None


RECORD_TYPES: dict[RecordKind, type[_Record]] = {
    RecordKind.KEY: KeyRecord,
    RecordKind.TIER: TierRecord,
    RecordKind.MODEL: ModelRecord,
    RecordKind.ROUTE: RouteRecord,
}


def record_id(kind: RecordKind, record: _Record) -> str:
    if isinstance(record, KeyRecord):
        return record.digest
    if isinstance(record, TierRecord):
        return record.name
    if isinstance(record, ModelRecord | RouteRecord):
        return record.id
    raise TypeError(f"not a {kind} record: {type(record).__name__}")


def encode_record(record: _Record) -> str:
    return record.model_dump_json(exclude_defaults=False)


EVERYONE = "system:authenticated"
"""The group every key is in, as every authenticated identity is in Kubernetes: a tier listing it (the seed's
``free``) takes the keys of no other tier's groups."""


def normalise_prefix(prefix: str) -> str:
    """A path prefix as Gateway API matches it: a trailing ``/`` is ignored (``/abc/`` is ``/abc``)."""
    return "/" + prefix.strip("/")


def route_id(host: str, prefix: str) -> str:
    return f"{host}|{normalise_prefix(prefix)}"


DEFAULT_TIERS: tuple[TierRecord, ...] = (
    TierRecord(
        name="free",
        display_name="Free",
        level=0,
        groups=("free", "system:authenticated"),
        limits=Limits(requests=Limit(limit=5, window="2m"), tokens=Limit(limit=100, window="1m")),
    ),
    TierRecord(
        name="premium",
        display_name="Premium",
        level=1,
        groups=("premium",),
        limits=Limits(requests=Limit(limit=20, window="2m"), tokens=Limit(limit=50_000, window="1m")),
    ),
    TierRecord(
        name="enterprise",
        display_name="Enterprise",
        level=2,
        groups=("enterprise",),
        limits=Limits(requests=Limit(limit=50, window="2m"), tokens=Limit(limit=100_000, window="1m")),
    ),
)


# --- change events -------------------------------------------------------------------------------------------


class Change(_Record):
    """One put (``value`` is the record JSON) or delete (``value`` None) of one record."""

    kind: RecordKind
    id: str
    value: str | None = None


class ChangeEvent(_Record):
    """Published on ``EVENTS_CHANNEL`` after the changes are written; ``gen`` is the generation they produced.
    A consumer that sees ``gen`` other than its last generation + 1 has missed events and must reload."""

    v: int = SCHEMA_VERSION
    gen: int
    changes: tuple[Change, ...] = ()
    reset: bool = False
    _left_out: int = PrivateAttr(0)

    @property
    def left_out(self) -> int:
        """Changes of record kinds this version does not know, left out by ``decode_event`` (never on the wire)."""
        return self._left_out


def put(record: _Record) -> Change:
    kind = next(k for k, t in RECORD_TYPES.items() if isinstance(record, t))
    return Change(kind=kind, id=record_id(kind, record), value=encode_record(record))


def delete(kind: RecordKind, ident: str) -> Change:
    return Change(kind=kind, id=ident)


def encode_changes(changes: Sequence[Change]) -> str:
    """The changes as the JSON array the apply script and the in-memory store take."""
    return json.dumps([{"kind": c.kind.value, "id": c.id, "value": c.value} for c in changes])


class EventFormatError(ValueError):
    """A change event this version cannot read (another schema version, or not an event at all): what it changed is
    unknown, so the consumer reloads."""


class RecordVersionError(ValueError):
    """A record of another schema version: skipped, never read as one of this version."""


_KINDS = frozenset(k.value for k in RecordKind)


def decode_event(payload: str | bytes) -> ChangeEvent:
    """The event, without the changes of record kinds this version does not know (a newer writer's: this version
    reads no hash of theirs either); EventFormatError for anything else it cannot read."""
    try:
        event = ChangeEvent.model_validate_json(payload)
    except ValidationError as exc:
        event = _known_changes(payload, exc)
    if event.v != SCHEMA_VERSION:
        raise EventFormatError(f"change event of schema version {event.v} (expected {SCHEMA_VERSION})")
    return event


def _known_changes(payload: str | bytes, error: ValidationError) -> ChangeEvent:
    try:
        data = json.loads(payload)
        changes = data["changes"]
        known = [c for c in changes if c.get("kind") in _KINDS]
        event = ChangeEvent.model_validate({**data, "changes": known})
    except (ValueError, TypeError, KeyError, AttributeError) as exc:  # pydantic's ValidationError is a ValueError
        raise EventFormatError(f"unreadable change event: {str(error).splitlines()[0]}") from exc
    if len(known) == len(changes):
        raise EventFormatError(f"unreadable change event: {str(error).splitlines()[0]}") from error
    event._left_out = len(changes) - len(known)
    return event


def decode_record(kind: RecordKind, payload: str | bytes) -> Any:
    """Validated record; RecordVersionError for a record of another schema version (told apart first: a newer
    version's record may not validate as this version's), ValueError for a malformed one."""
    try:
        record = RECORD_TYPES[kind].model_validate_json(payload)
    except ValidationError:
        version = _version_of(payload)
        if version != SCHEMA_VERSION:
            raise RecordVersionError(f"{kind} record of schema version {version} (expected {SCHEMA_VERSION})") from None
        raise
    if getattr(record, "v", SCHEMA_VERSION) != SCHEMA_VERSION:
        raise RecordVersionError(f"{kind} record of schema version {record.v} (expected {SCHEMA_VERSION})")  # type: ignore[attr-defined]
    return record


_KEY_FIELDS: TypeAdapter[KeyFields] = TypeAdapter(KeyFields)


def decode_key_fields(payload: str | bytes) -> KeyFields:
    """A key record's fields, validated as ``decode_record`` validates a ``KeyRecord`` (same errors), except the
    windows of its limits: ``parse_window`` checks them when the key is compiled (a ``WindowError``)."""
    try:
        fields = _KEY_FIELDS.validate_json(payload)
    except ValidationError:
        version = _version_of(payload)
        if version != SCHEMA_VERSION:
            raise RecordVersionError(f"key record of schema version {version} (expected {SCHEMA_VERSION})") from None
        raise
    version = fields.get("v", SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
        raise RecordVersionError(f"key record of schema version {version} (expected {SCHEMA_VERSION})")
    return fields


def _version_of(payload: str | bytes) -> object:
    """The ``v`` of a record that did not validate (only then: a full load parses each record once)."""
    try:
        data = json.loads(payload)
    except ValueError:
        return SCHEMA_VERSION  # not JSON: malformed, whatever its version
    return data.get("v", SCHEMA_VERSION) if isinstance(data, dict) else SCHEMA_VERSION
