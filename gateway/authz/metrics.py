"""Metrics of ``maas authz``: decisions, check latency, store health, snapshot state, per-key requests."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from gateway.metrics import LATENCY_BUCKETS, CappedChildren, Cell, LoopCounter, LoopHistogram, connection_metrics


class AuthzMetrics:
    def __init__(self, *, max_keys: int, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        # the per-check series are loop counters (no lock per increment, no checks per call): prometheus_client's
        # thread-safe ones cost a tenth of a check's Python time for three updates
        self._decisions = LoopCounter(
            "maas_authz_decisions_total",
            "ext_authz decisions by decision, reason, tier and model",
            ("decision", "reason", "tier", "model"),
            registry=r,
        )
        self.check_seconds = LoopHistogram(
            "maas_authz_check_duration_seconds",
            "time to answer one ext_authz check",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self._store_errors = Counter(
            "maas_store_errors_total", "failed or timed-out store calls", ("operation", "code"), registry=r
        )
        self.store_up = Gauge("maas_store_up", "1 while the last store call succeeded", registry=r)
        self.store_up.set(1)
        self._store_is_up = True
        self.clock_offset = Gauge(
            "maas_authz_clock_offset_seconds", "Redis's clock minus this replica's (TIME every 30 s)", registry=r
        )
        self.policy_applied = Counter(
            "maas_authz_store_policy_total",
            "checks answered by the --on-store-error policy while the store was unreachable",
            ("policy",),
            registry=r,
        )
        # the series a dashboard or an alert waits for exist at 0 from the start (they had appeared at the first
        # error, so `rate(...)` or `increase(...)` saw nothing before it)
        for operation in ("buckets", "subscribe"):
            for code in ("store_unavailable", "store_timeout"):
                self._store_errors.labels(operation, code)
        for policy in ("deny", "allow", "local"):
            self.policy_applied.labels(policy)
        self.snapshot_records = Gauge("maas_snapshot_records", "records in the snapshot", ("kind",), registry=r)
        self.snapshot_generation = Gauge("maas_snapshot_generation", "generation the snapshot is at", registry=r)
        self.snapshot_reloads = Counter(
            "maas_snapshot_reloads_total", "full snapshot reloads by reason", ("reason",), registry=r
        )
        self.snapshot_skipped = Counter(
            "maas_snapshot_skipped_records_total", "records skipped as unreadable", ("kind", "reason"), registry=r
        )
        self.snapshot_events = Counter("maas_snapshot_events_total", "change events applied", registry=r)
        self.batch_size = LoopHistogram(
            "maas_authz_bucket_batch_size",
            "checks coalesced into one store call",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=r,
        )
        self.request_credits = Counter(
            "maas_authz_request_credits_total",
            "request credits (a busy key's next admission taken ahead) by outcome: taken, used, refunded (given back "
            "unspent), lost (the give-back failed: the token stays spent)",
            ("outcome",),
            registry=r,
        )
        for outcome in ("taken", "used", "refunded", "lost"):
            self.request_credits.labels(outcome)
        self.client_connections, self.connections_refused = connection_metrics("authz", "check port", r)
        key_requests = LoopCounter(
            "maas_key_requests_total",
            "checks per API key by decision",
            ("key_id", "user", "tier", "decision"),
            registry=r,
        )
        self.key_requests = CappedChildren(key_requests, cap=max_keys, identity=2)

    def decision(self, decision: str, reason: str, tier: str, model: str) -> Cell:
        return self._decisions.labels(decision, reason, tier, model)

    def store_error(self, operation: str, code: str) -> None:
        self._store_errors.labels(operation, code).inc()
        self.store_up.set(0)
        self._store_is_up = False

    def store_ok(self) -> None:
        """A store call succeeded (called per check: the gauge is only written when it changes)."""
        if not self._store_is_up:
            self._store_is_up = True
            self.store_up.set(1)
