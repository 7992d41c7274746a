"""Request and response bodies of the admin and self-service APIs. Inputs forbid unknown fields and are strict: a
value of the wrong JSON type is refused, not converted (``"5"`` for 5, ``"yes"`` for true)."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, Strict, StringConstraints

MAX_LIST_ITEMS = 256
Name = Annotated[str, StringConstraints(min_length=1, max_length=253, pattern=r"^[A-Za-z0-9._:@/+\-]+$")]
"""User ids, group names, tier names and model ids: printable, no spaces or commas (they end up in annotations)."""
Label = Annotated[str, StringConstraints(max_length=253, pattern=r"^[^\x00-\x1f\x7f]*$")]
Duration = Annotated[str, StringConstraints(min_length=1, max_length=32)]
Count = Annotated[int, Field(ge=0, le=10**15)]
_RFC3339 = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]+)?"  # date and time
    r"(?:[Zz]|[+-][0-9]{2}:[0-9]{2})"  # offset
)


def _rfc3339(value: object) -> object:
    """Only an RFC 3339 string, offset included, is a time here (pydantic would also read epoch numbers, dates
    alone and times without an offset)."""
    if value is not None and (not isinstance(value, str) or _RFC3339.fullmatch(value) is None):
        raise ValueError("expected an RFC 3339 time with its offset, like '2025-06-30T00:00:00Z'")
    return value


Time = Annotated[datetime, Strict(False), BeforeValidator(_rfc3339)]
"""Strict JSON has no time type: the string is checked here, then read into a datetime."""


class Input(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class Output(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LimitOverrides(Input):
    """Per-key overrides of the tier's limits (the ``maas/request-limit``, ``maas/token-limit`` and
    ``maas/time-window`` annotations): one shared window, else each dimension keeps its tier's window."""

    requests: Count | None = None
    tokens: Count | None = None
    window: Duration | None = None


class KeyCreate(Input):
    user: Name
    name: Label = ""
    groups: Annotated[list[Name], Field(max_length=MAX_LIST_ITEMS)] = []
    tier: Name | None = None
    models: Annotated[list[Name], Field(max_length=MAX_LIST_ITEMS)] = []
    expires_in: Duration | None = None
    expires_at: Time | None = None
    limits: LimitOverrides | None = None


class KeyPatch(Input):
    name: Label | None = None
    tier: Name | None = None
    models: Annotated[list[Name], Field(max_length=MAX_LIST_ITEMS)] | None = None
    limits: LimitOverrides | None = None
    expires_in: Duration | None = None
    expires_at: Time | None = None
    disabled: bool | None = None


class RotateRequest(Input):
    grace_period: Duration = "1h"


class LimitBody(Input):
    limit: Count
    window: Duration


class LimitsBody(Input):
    requests: LimitBody | None = None
    tokens: LimitBody | None = None


class TierPut(Input):
    display_name: Label = ""
    level: Annotated[int, Field(ge=0, le=1000)] = 0
    groups: Annotated[list[Name], Field(max_length=MAX_LIST_ITEMS)] = []
    limits: LimitsBody = Field(description="the tier's limits, required as a PUT replaces the tier ({}: none)")
    models: Annotated[list[Name], Field(max_length=MAX_LIST_ITEMS)] = []


# --- responses -----------------------------------------------------------------------------------------------


class LimitView(Output):
    limit: int
    window: str


class LimitsView(Output):
    requests: LimitView | None = None
    tokens: LimitView | None = None


KeyState = Literal["active", "disabled", "revoked", "expired"]


class KeyView(Output):
    key_id: str
    name: str
    user: str
    groups: list[str]
    tier: str | None = Field(description="the effective tier: the key's own, else by its groups, else the default")
    tier_explicit: bool
    models: list[str]
    status: KeyState
    expires_at: str | None
    created_at: str | None
    limits: LimitsView | None = Field(description="per-key overrides of the tier's limits")
    source: str = Field(description="'admin' for keys issued by this API, else 'secret:<namespace>/<name>'")
    read_only: bool


class KeyCreated(KeyView):
    key: str = Field(description="the API key; shown only in this response")
    synced: bool = Field(description="whether the key had reached Redis (and so every maas authz) before answering")


class KeyUpdated(KeyView):
    synced: bool


class KeyPage(Output):
    object: Literal["list"] = "list"
    data: list[KeyView]
    has_more: bool
    next_cursor: str | None


class Rotated(Output):
    key: str = Field(description="the new API key; shown only in this response")
    key_id: str
    new: KeyView
    old: KeyView
    grace_period_ends_at: str
    synced: bool


class TierView(Output):
    name: str
    display_name: str
    level: int
    groups: list[str]
    limits: LimitsView
    models: list[str]


class TierList(Output):
    object: Literal["list"] = "list"
    data: list[TierView]


class TierUpdated(TierView):
    synced: bool


class Deleted(Output):
    id: str
    deleted: bool


class TierDeleted(Deleted):
    synced: bool


class QuotaDimension(Output):
    limit: int
    window: str
    remaining: int
    reset_seconds: float = Field(description="seconds until the bucket is full again")


class Quota(Output):
    key_id: str
    tier: str | None
    requests: QuotaDimension | None
    tokens: QuotaDimension | None


class UsageRowView(Output):
    key_id: str | None = None
    user: str | None = None
    model: str | None = None
    day: str | None = None
    requests: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class UsageReport(Output):
    object: Literal["usage"] = "usage"
    from_date: str = Field(alias="from", serialization_alias="from")
    to_date: str = Field(alias="to", serialization_alias="to")
    group_by: list[str]
    data: list[UsageRowView]
    total: UsageRowView

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ModelView(Output):
    id: str
    namespace: str
    ready: bool
    reason: str
    url: str | None
    runtime: str | None
    model_format: str | None
    storage_uri: str | None
    gpus: int
    min_replicas: int | None
    max_replicas: int | None
    max_model_len: int | None
    routes: list[str]


class ModelList(Output):
    object: Literal["list"] = "list"
    data: list[ModelView]


class OpenAIModel(Output):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    ready: bool


class OpenAIModelList(Output):
    object: Literal["list"] = "list"
    data: list[OpenAIModel]


class Usage(Output):
    period: str
    from_date: str = Field(alias="from", serialization_alias="from")
    to_date: str = Field(alias="to", serialization_alias="to")
    requests: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Me(Output):
    key_id: str
    name: str
    user: str
    groups: list[str]
    tier: str | None
    models: list[str] = Field(description="models this key may use (empty: every model)")
    expires_at: str | None
    limits: LimitsView = Field(description="effective limits: the key's overrides over its tier's")
    quota: Quota
    usage: Usage


class ErrorBody(Output):
    message: str
    type: str
    param: str | None
    code: str


class ErrorEnvelope(Output):
    error: ErrorBody
