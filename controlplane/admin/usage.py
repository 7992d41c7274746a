"""Quota state from the live buckets (``/admin/v1/keys/{id}/quota``) and usage reports from the ledger
(``/admin/v1/usage``, JSON or CSV; text cells that a spreadsheet would run as formulas get a ``'`` in front).

The ledger is per key, model and UTC day. Filters ``user`` and ``tier`` use each key's current user and tier.
Without ``key_id`` the report reads the per-day index of keys with usage, never the whole keyspace.
"""

from __future__ import annotations

import asyncio
import csv
import io
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, date, datetime, timedelta

from aiohttp import web

from controlplane.admin.auth import audit
from controlplane.admin.context import AdminContext, check_query, context, json_model, principal
from controlplane.admin.errors import InvalidRequest, NotAcceptable, StoreUnavailable
from controlplane.admin.keys import find_key
from controlplane.admin.models import Quota, QuotaDimension, UsageReport, UsageRowView
from controlplane.admin.views import effective_limits
from gateway.contract import REQUESTS, TOKENS, KeyRecord, Limit
from gateway.errors import StoreError
from gateway.limits import BucketMode, BucketOp
from gateway.store.base import UsageRow

MAX_DAYS = 366
DEFAULT_DAYS = 30
GROUPS = ("key", "user", "model", "day")
READ_CONCURRENCY = 32
CSV_FIELDS = ("key_id", "user", "model", "day", "requests", "prompt_tokens", "completion_tokens", "total_tokens")
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
"""A spreadsheet reads a cell starting with one of these as a formula: such a text cell gets a ``'`` in front."""


async def quota_of(ctx: AdminContext, record: KeyRecord) -> Quota:
    tier = ctx.state.tier_of(record)
    limits = effective_limits(record, tier)
    dims: list[tuple[str, Limit]] = [
        (d, lim) for d, lim in ((REQUESTS, limits.requests), (TOKENS, limits.tokens)) if lim is not None
    ]
    ops = [BucketOp(record.key_id, d, lim.limit, lim.window_ms, 0, BucketMode.GATE) for d, lim in dims]
    out: dict[str, QuotaDimension] = {}
    if ops:
        try:
            (results,) = await ctx.state.store.check_buckets([ops])
        except StoreError as exc:
            raise StoreUnavailable(f"Quota state cannot be read right now: {exc}") from exc
        for (dimension, lim), result in zip(dims, results, strict=True):
            out[dimension] = QuotaDimension(
                limit=lim.limit, window=lim.window, remaining=result.remaining, reset_seconds=result.reset_ms / 1000
            )
    return Quota(
        key_id=record.key_id,
        tier=tier.name if tier is not None else None,
        requests=out.get(REQUESTS),
        tokens=out.get(TOKENS),
    )


async def get_quota(request: web.Request) -> web.Response:
    ctx = context(request)
    return json_model(await quota_of(ctx, find_key(ctx, request.match_info["key_id"])))


async def reset_quota(request: web.Request) -> web.Response:
    ctx = context(request)
    record = find_key(ctx, request.match_info["key_id"])
    try:
        await ctx.state.store.reset_buckets(record.key_id, [REQUESTS, TOKENS])
    except StoreError as exc:
        raise StoreUnavailable(f"Quota cannot be reset right now: {exc}") from exc
    audit(principal(request), "key.quota_reset", key_id=record.key_id)
    return json_model(await quota_of(ctx, record))


def _day(text: str, *, param: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError as exc:
        raise InvalidRequest(f"'{param}' must be a date like 2025-01-31.", param=param) from exc


def day_range(start: str | None, end: str | None, *, now: float) -> list[date]:
    """The days from ``start`` to ``end`` (ISO dates; by default the last ``DEFAULT_DAYS`` up to the UTC day of
    ``now``)."""
    today = datetime.fromtimestamp(now, tz=UTC).date()
    last = _day(end, param="to") if end is not None else today
    if start is not None:
        first = _day(start, param="from")
    else:  # the default span, cut at the first day there is (to=0001-01-05)
        first = last - timedelta(days=min(DEFAULT_DAYS - 1, (last - date.min).days))
    if first > last:
        raise InvalidRequest("'from' is after 'to'.", param="from")
    span = (last - first).days + 1
    if span > MAX_DAYS:
        raise InvalidRequest(f"A usage report covers at most {MAX_DAYS} days.", param="from")
    return [first + timedelta(days=i) for i in range(span)]


async def read_rows(ctx: AdminContext, *, key_ids: Sequence[str] | None, days: Sequence[date]) -> list[UsageRow]:
    """Ledger rows of these keys (None: every key with usage) on these days."""
    rows: list[UsageRow] = []
    async for batch in iter_rows(ctx, key_ids=key_ids, days=days):
        rows += batch
    return rows


async def iter_rows(
    ctx: AdminContext, *, key_ids: Sequence[str] | None, days: Sequence[date]
) -> AsyncIterator[list[UsageRow]]:
    """The ledger rows of ``read_rows`` a few keys at a time, so a report over every key and a year is summed as it is
    read instead of held whole (millions of rows for 10,000 keys over 366 days)."""
    store = ctx.state.store
    names = [d.strftime("%Y%m%d") for d in days]
    try:
        if key_ids is None:
            per_key: dict[str, list[str]] = {}
            for name in names:
                for key_id in await store.usage_key_ids(name):
                    per_key.setdefault(key_id, []).append(name)
        else:
            per_key = {k: names for k in key_ids}
        items = list(per_key.items())
        for start in range(0, len(items), READ_CONCURRENCY):
            chunk = items[start : start + READ_CONCURRENCY]
            batch: list[UsageRow] = []
            for result in await asyncio.gather(*(store.read_usage(k, d) for k, d in chunk)):
                batch += result
            yield batch
    except StoreError as exc:
        raise StoreUnavailable(f"Usage cannot be read right now: {exc}") from exc


def _group_by(text: str | None) -> list[str]:
    if not text:
        return []
    groups = [g.strip() for g in text.split(",") if g.strip()]
    for group in groups:
        if group not in GROUPS:
            raise InvalidRequest(f"'group_by' takes {', '.join(GROUPS)} (comma-separated).", param="group_by")
    return list(dict.fromkeys(groups))


def _wants_csv(request: web.Request) -> bool:
    """CSV when the first acceptable type listed in Accept is CSV (quality values are not weighed)."""
    accept = request.headers.get("accept", "").strip()
    if not accept:
        return False
    for part in accept.split(","):
        media = part.split(";")[0].strip().lower()
        if media in ("text/csv", "text/*"):
            return True
        if media in ("application/json", "application/*", "*/*"):
            return False
    raise NotAcceptable("Usage is available as application/json or text/csv.")


async def get_usage(request: web.Request) -> web.StreamResponse:
    ctx = context(request)
    check_query(request, ("key_id", "user", "tier", "model", "from", "to", "group_by"))
    query = {name: value for name, value in request.query.items() if value}  # an empty parameter filters nothing
    as_csv = _wants_csv(request)
    days = day_range(query.get("from"), query.get("to"), now=ctx.now())
    groups = _group_by(query.get("group_by"))
    key_id = query.get("key_id")
    user, tier, model = query.get("user"), query.get("tier"), query.get("model")
    totals: dict[tuple[str | None, ...], list[int]] = {}
    grand = [0, 0, 0]
    async for batch in iter_rows(ctx, key_ids=[key_id] if key_id else None, days=days):
        _add(ctx, batch, groups=groups, user=user, tier=tier, model=model, totals=totals, grand=grand)
    data = [_row(groups, ident, v) for ident, v in sorted(totals.items(), key=lambda item: str(item[0]))]
    report = UsageReport(
        from_date=days[0].isoformat(),
        to_date=days[-1].isoformat(),
        group_by=groups,
        data=data,
        total=_row([], (), grand),
    )
    if as_csv:
        return _csv(report)
    return json_model(report)


def _add(
    ctx: AdminContext,
    rows: Sequence[UsageRow],
    *,
    groups: Sequence[str],
    user: str | None,
    tier: str | None,
    model: str | None,
    totals: dict[tuple[str | None, ...], list[int]],
    grand: list[int],
) -> None:
    """Add the rows that pass the filters to their group's totals and to the grand total."""
    keys = ctx.state.keys
    for row in rows:
        record = keys.get(row.key_id)
        owner = record.user if record is not None else None
        if user is not None and owner != user:
            continue
        if tier is not None:
            found = ctx.state.tier_of(record) if record is not None else None
            if found is None or found.name != tier:
                continue
        if model is not None and row.model != model:
            continue
        values = {"key": row.key_id, "user": owner, "model": row.model, "day": _iso(row.day)}
        bucket = totals.setdefault(tuple(values[g] for g in groups), [0, 0, 0])
        for i, amount in enumerate((row.requests, row.prompt_tokens, row.completion_tokens)):
            bucket[i] += amount
            grand[i] += amount


def _iso(day: str) -> str:
    return f"{day[:4]}-{day[4:6]}-{day[6:]}" if len(day) == 8 else day


def _row(groups: Sequence[str], ident: tuple[str | None, ...], values: Sequence[int]) -> UsageRowView:
    named = dict(zip(groups, ident, strict=True))
    return UsageRowView(
        key_id=named.get("key"),
        user=named.get("user"),
        model=named.get("model"),
        day=named.get("day"),
        requests=values[0],
        prompt_tokens=values[1],
        completion_tokens=values[2],
        total_tokens=values[1] + values[2],
    )


def _csv(report: UsageReport) -> web.Response:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    columns = [c for c in CSV_FIELDS if c in ("key_id", "user", "model", "day") and _grouped(report, c)]
    columns += ["requests", "prompt_tokens", "completion_tokens", "total_tokens"]
    writer.writerow(columns)
    for row in report.data:
        values = row.model_dump()
        writer.writerow([_cell(values[c]) for c in columns])
    name = f"usage-{report.from_date}-{report.to_date}.csv"
    return web.Response(
        text=buffer.getvalue(),
        content_type="text/csv",
        headers={"content-disposition": f'attachment; filename="{name}"'},
    )


def _cell(value: object) -> object:
    """A CSV cell; user names and model ids come from outside, and one like ``=HYPERLINK(...)`` or ``@SUM(...)``
    would run as a formula where the file is opened."""
    if value is None:
        return ""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def _grouped(report: UsageReport, column: str) -> bool:
    return {"key_id": "key", "user": "user", "model": "model", "day": "day"}[column] in report.group_by


def add_routes(app: web.Application) -> None:
    app.router.add_get("/admin/v1/keys/{key_id}/quota", get_quota, allow_head=False)
    app.router.add_post("/admin/v1/keys/{key_id}/quota/reset", reset_quota)
    app.router.add_get("/admin/v1/usage", get_usage, allow_head=False)


def today_days(now: float) -> list[date]:
    """The days of ``now``'s UTC month up to its day (the self-service usage period)."""
    today = datetime.fromtimestamp(now, tz=UTC).date()
    return [today.replace(day=d) for d in range(1, today.day + 1)]
