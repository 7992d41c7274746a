"""The ext_authz HTTP handler: Envoy asks, we answer 200 (allow, with headers) or a denial.

A low-level aiohttp server (no router, no middlewares, access log off): every path is a check, so routing would be
wasted work. Only status 200 allows; a 5xx makes Envoy answer ``statusOnError`` with an empty body.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from aiohttp import web

from gateway.authz.follower import SnapshotFollower
from gateway.authz.metrics import AuthzMetrics
from gateway.decision import (
    STORE_DOWN,
    Admission,
    Denial,
    Policy,
    admit,
    allow_headers,
    error_body,
    rate_limited,
)
from gateway.errors import StoreError
from gateway.limits import BucketOp, BucketResult
from gateway.logs import RateLimitedLog
from gateway.store.base import Store
from gateway.store.batching import BucketBatcher
from gateway.store.memory import MemoryStore

log = logging.getLogger("maas.authz")

STORE_RETRY_AFTER = 0.5
"""After a store failure, checks skip the store for this long (seconds) and follow the failure policy."""

NOT_READY = Denial(
    status=503,
    code="not_ready",
    body=error_body("The gateway has not loaded its keys yet.", error_type="server_error", code="not_ready"),
)
INTERNAL = Denial(
    status=503,
    code="internal_error",
    body=error_body("The gateway failed to check this request.", error_type="server_error", code="internal_error"),
)
JSON = "application/json"


class AuthzHandler:
    def __init__(
        self,
        *,
        follower: SnapshotFollower,
        store: Store,
        policy: Policy,
        metrics: AuthzMetrics,
        on_store_error: str = "deny",
        max_inflight: int = 2,
    ) -> None:
        self._follower = follower
        self._policy = policy
        self._metrics = metrics
        self._on_store_error = on_store_error
        self._batcher = BucketBatcher(store, max_inflight=max_inflight, on_batch=metrics.batch_size.observe)
        self._local = MemoryStore()
        self._store_down_until = 0.0
        self._store_log = RateLimitedLog(log, interval=10.0)
        self._observe = metrics.check_seconds.observe

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        started = time.perf_counter()
        try:
            response = await self._check(request)
        except Exception:
            log.exception("ext_authz check failed")
            response = self._deny(INTERNAL, "", "")
        self._observe(time.perf_counter() - started)
        return response

    async def _check(self, request: web.BaseRequest) -> web.Response:
        snapshot = self._follower.snapshot
        if not snapshot.loaded:
            return self._deny(NOT_READY, "", "")
        headers = request.headers
        now = time.time()
        outcome = admit(
            snapshot,
            self._policy,
            host=headers.get("host", ""),
            path=request.raw_path,
            get=headers.get,
            count=lambda name: len(headers.getall(name, ())),
            now=now,
        )
        if isinstance(outcome, Denial):
            return self._deny(outcome, "", "")
        results: list[BucketResult] | None = None
        if outcome.ops:
            results = await self._limits(outcome.ops)
            if results is None:
                return self._deny(STORE_DOWN, *_labels(outcome))
            if not results[0].allowed:
                return self._deny(rate_limited(outcome, results), *_labels(outcome), key=outcome)
        tier, model = _labels(outcome)
        self._metrics.decision("allow", "ok", tier, model).inc()
        key = outcome.key
        self._metrics.key_requests.get(key.key_id, key.user, tier, "allow").inc()
        return web.Response(status=200, headers=allow_headers(outcome, results, self._policy, now=now))

    async def _limits(self, ops: Sequence[BucketOp]) -> list[BucketResult] | None:
        """Bucket results from the store, or from the failure policy; None means deny."""
        if time.monotonic() >= self._store_down_until:
            try:
                results = await self._batcher.check(ops)
            except StoreError as exc:
                self._store_down_until = time.monotonic() + STORE_RETRY_AFTER
                self._metrics.store_error("buckets", exc.code)
                self._store_log.warning(
                    "store unavailable, limits follow --on-store-error=%s: %s", self._on_store_error, exc
                )
            else:
                self._metrics.store_up.set(1)
                return results
        self._metrics.policy_applied.labels(self._on_store_error).inc()
        if self._on_store_error == "allow":
            return [BucketResult(True, op.limit, op.limit, 0, 0, 0) for op in ops]
        if self._on_store_error == "local":
            (results,) = await self._local.check_buckets([ops])
            return results
        return None

    def _deny(self, denial: Denial, tier: str, model: str, *, key: Admission | None = None) -> web.Response:
        self._metrics.decision("deny", denial.code, tier, model).inc()
        if key is not None:
            self._metrics.key_requests.get(key.key.key_id, key.key.user, tier, "deny").inc()
        headers = {"content-type": JSON}
        headers.update(denial.headers)
        return web.Response(status=denial.status, body=denial.body, headers=headers)


def _labels(admission: Admission) -> tuple[str, str]:
    return (admission.tier.name if admission.tier is not None else "", admission.model or "")
