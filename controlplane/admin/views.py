"""Records to response bodies."""

from __future__ import annotations

from controlplane.admin.context import rfc3339
from controlplane.admin.keysecret import is_managed
from controlplane.admin.models import KeyView, LimitsView, LimitView, ModelView, TierView
from controlplane.admin.state import AdminState
from gateway.contract import KeyRecord, KeyStatus, Limit, Limits, ModelRecord, TierRecord


def limit_view(limit: Limit | None) -> LimitView | None:
    return LimitView(limit=limit.limit, window=limit.window) if limit is not None else None


def limits_view(limits: Limits | None) -> LimitsView | None:
    if limits is None:
        return None
    return LimitsView(requests=limit_view(limits.requests), tokens=limit_view(limits.tokens))


def effective_limits(record: KeyRecord, tier: TierRecord | None) -> Limits:
    base = tier.limits if tier is not None else Limits()
    own = record.limits or Limits()
    return Limits(requests=own.requests or base.requests, tokens=own.tokens or base.tokens)


def status_of(record: KeyRecord, *, now: float) -> str:
    if record.status is KeyStatus.ACTIVE and record.expires_at is not None and record.expires_at <= now:
        return "expired"
    return record.status.value


def key_view(record: KeyRecord, state: AdminState, *, namespace: str, now: float) -> KeyView:
    managed = is_managed(record, namespace)
    tier = state.tier_of(record)
    return KeyView(
        key_id=record.key_id,
        name=record.name,
        user=record.user,
        groups=list(record.groups),
        tier=tier.name if tier is not None else record.tier,
        tier_explicit=record.tier is not None,
        models=list(record.models),
        status=status_of(record, now=now),
        expires_at=rfc3339(record.expires_at),
        created_at=rfc3339(record.created_at),
        limits=limits_view(record.limits),
        source="admin" if managed else record.source,
        read_only=not managed,
    )


def tier_view(tier: TierRecord) -> TierView:
    return TierView(
        name=tier.name,
        display_name=tier.display_name,
        level=tier.level,
        groups=list(tier.groups),
        limits=limits_view(tier.limits) or LimitsView(),
        models=list(tier.models),
    )


def model_view(model: ModelRecord) -> ModelView:
    return ModelView(
        id=model.id,
        namespace=model.namespace,
        ready=model.ready,
        reason=model.reason,
        url=model.url,
        runtime=model.runtime,
        model_format=model.model_format,
        storage_uri=model.storage_uri,
        gpus=model.gpus,
        min_replicas=model.min_replicas,
        max_replicas=model.max_replicas,
        max_model_len=model.max_model_len,
        routes=list(model.routes),
    )
