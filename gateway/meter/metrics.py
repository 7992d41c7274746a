"""The meter's Prometheus metrics, on a registry of its own. Label children are bound once: fixed label sets at
start, per-key and per-model children on first use into bounded caches (overflow goes to ``_other``)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from gateway.meter.quota import Outcome
from gateway.metrics import KEY_IDLE_SECONDS, IdleKeys, child_value, connection_metrics

OTHER = "_other"
UNKNOWN = "_unknown"
OPERATIONS = {"chat": "chat", "completion": "text_completion", "embeddings": "embeddings"}
UPSTREAM_REASONS = (
    "connect",
    "connect_timeout",
    "first_byte_timeout",
    "pool_timeout",
    "idle_timeout",
    "broken",
    "status_5xx",
    "no_usage",
)
# OpenTelemetry GenAI semantic conventions: explicit bucket boundaries for the two histograms
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
OVERHEAD_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)

K = TypeVar("K")
C = TypeVar("C")


class BoundedChildren(Generic[K, C]):
    """Label children made on first use for at most ``cap`` distinct keys; later keys share the overflow child."""

    def __init__(self, make: Callable[[K], C], *, cap: int, overflow: K) -> None:
        self._make = make
        self._cap = cap
        self._overflow = overflow
        self._children: dict[K, C] = {}

    def get(self, key: K) -> C:
        child = self._children.get(key)
        if child is None:
            if len(self._children) >= self._cap:
                key = self._overflow
                child = self._children.get(key)
            if child is None:
                child = self._make(key)
                self._children[key] = child
        return child

    def __len__(self) -> int:
        return len(self._children)

    def items(self) -> list[tuple[K, C]]:
        return list(self._children.items())

    def drop(self, key: K) -> None:
        self._children.pop(key, None)


class TokenChildren:
    __slots__ = ("completion", "prompt")

    def __init__(self, counter: Counter, labels: tuple[str, str, str, str]) -> None:
        self.prompt = counter.labels(*labels, "prompt")
        self.completion = counter.labels(*labels, "completion")


class ModelChildren:
    """Everything labelled by model (and operation) only."""

    __slots__ = ("_model", "_requests", "completion_hist", "prompt_hist", "status", "ttft")

    def __init__(self, metrics: MeterMetrics, model: str, operation: str) -> None:
        self.prompt_hist = metrics.token_usage.labels(operation, model, "input")
        self.completion_hist = metrics.token_usage.labels(operation, model, "output")
        self.ttft = metrics.ttft.labels(operation, model)
        self.status: dict[int, Counter] = {}
        self._requests = metrics.requests
        self._model = model

    def requests(self, status: int) -> Counter:
        child = self.status.get(status)
        if child is None:
            child = self._requests.labels(self._model, str(status if 100 <= status < 600 else 0))
            if len(self.status) < 64:
                self.status[status] = child
        return child


ALERTED_REJECTIONS = ("missing_identity", "invalid_identity", "stale_identity", "store_unavailable", "upstream_busy")
"""Refusals shown at zero from the start: the alerts (deploy/base/alerts.yaml) watch their increase, which a series
that appears only with its first increment never shows for that one."""


class MeterMetrics:
    def __init__(self, *, max_keys: int, max_models: int = 64, clock: Callable[[], float] = time.monotonic) -> None:
        self.registry = r = CollectorRegistry()
        self.tokens = Counter(
            "maas_tokens",
            "LLM tokens served, per key (capped) and model",
            ["key_id", "user", "tier", "model", "type"],
            registry=r,
        )
        self.requests = Counter(
            "maas_meter_requests", "Metered requests by model and HTTP status", ["model", "status"], registry=r
        )
        self.token_usage = Histogram(
            "gen_ai_client_token_usage",
            "Tokens per request (OpenTelemetry GenAI gen_ai.client.token.usage)",
            ["gen_ai_operation_name", "gen_ai_request_model", "gen_ai_token_type"],
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "gen_ai_server_time_to_first_token_seconds",
            "Time from request to the first streamed token (gen_ai.server.time_to_first_token)",
            ["gen_ai_operation_name", "gen_ai_request_model"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        reservations = Counter("maas_meter_reservations", "Token reservations by outcome", ["outcome"], registry=r)
        self.reservations = {o: reservations.labels(o.value) for o in Outcome}
        upstream = Counter("maas_meter_upstream_errors", "Upstream failures by reason", ["reason"], registry=r)
        self.upstream_errors = {reason: upstream.labels(reason) for reason in UPSTREAM_REASONS}
        adjust = Counter("maas_meter_commit_tokens", "Tokens settled after responses", ["direction"], registry=r)
        self.refunded = adjust.labels("refund")
        self.debited = adjust.labels("debit")
        store = Counter("maas_meter_store_errors", "Store calls that failed", ["operation"], registry=r)
        self.store_errors = {op: store.labels(op) for op in ("reserve", "commit", "ledger")}
        rejected = Counter("maas_meter_rejected", "Requests refused before forwarding", ["reason"], registry=r)
        self._rejected = rejected
        self.rejected_children: dict[str, Counter] = {}
        for code in ALERTED_REJECTIONS:
            self.rejected(code)
        self.disconnects = Counter("maas_meter_client_disconnects", "Streams the client left early", registry=r)
        self.client_connections, self.connections_refused = connection_metrics("meter", "proxy port", r)
        self.in_flight = Gauge("maas_meter_requests_in_flight", "Metered requests being served", registry=r)
        self.upstream_queued = Gauge(
            "maas_meter_upstream_queued_requests",
            "Requests (metered and passthrough) waiting for a free upstream connection",
            registry=r,
        )
        self.clock_offset = Gauge(
            "maas_meter_clock_offset_seconds",
            "Redis's clock minus this meter's (TIME every 30 s); usage is filed by Redis's day",
            registry=r,
        )
        self.backlog = Gauge(
            "maas_meter_ledger_backlog_rows",
            "Usage ledger rows and bucket debits waiting for the store to come back",
            registry=r,
        )
        self.overhead = Histogram(
            "maas_meter_overhead_seconds",
            "Time the meter spends before forwarding (body, identity, reservation)",
            buckets=OVERHEAD_BUCKETS,
            registry=r,
        )
        self.keys = BoundedChildren[tuple[str, str, str, str], TokenChildren](
            lambda labels: TokenChildren(self.tokens, labels), cap=max_keys * 4, overflow=(OTHER, OTHER, OTHER, OTHER)
        )
        self._key_ids: set[str] = set()
        self._max_keys = max_keys
        self._idle_keys = IdleKeys(idle=KEY_IDLE_SECONDS, clock=clock)
        self.models = BoundedChildren[tuple[str, str], ModelChildren](
            lambda k: ModelChildren(self, k[0], k[1]), cap=max_models * 3, overflow=(OTHER, OTHER)
        )

    def rejected(self, code: str) -> Counter:
        child = self.rejected_children.get(code)
        if child is None:
            child = self._rejected.labels(code)
            self.rejected_children[code] = child
        return child

    def key(self, *, key_id: str, user: str, tier: str, model: str) -> TokenChildren:
        """The token counters of one key and model; at most ``max_keys`` distinct keys get their own series (when
        they are all taken, those of keys idle for ``KEY_IDLE_SECONDS`` are dropped to make room)."""
        if key_id not in self._key_ids:
            if len(self._key_ids) >= self._max_keys and not self._evict_idle():
                return self.keys.get((OTHER, OTHER, OTHER, model))
            self._key_ids.add(key_id)
        return self.keys.get((key_id, user, tier, model))

    def _evict_idle(self) -> bool:
        """Drop the series of idle keys; True when that made room."""
        gone = set(self._idle_keys.look(self._totals))
        if not gone:
            return False
        for labels, _ in self.keys.items():
            if labels[0] in gone:
                self.keys.drop(labels)
                self.tokens.remove(*labels, "prompt")
                self.tokens.remove(*labels, "completion")
        self._key_ids -= gone
        return len(self._key_ids) < self._max_keys

    def _totals(self) -> Iterator[tuple[str, float]]:
        totals: dict[str, float] = dict.fromkeys(self._key_ids, 0.0)
        for labels, children in self.keys.items():
            if labels[0] in totals:
                totals[labels[0]] += child_value(children.prompt) + child_value(children.completion)
        return iter(totals.items())
