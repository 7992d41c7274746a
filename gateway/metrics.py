"""Prometheus helpers shared by the data-path processes: latency buckets and capped per-key series."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

LATENCY_BUCKETS = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
)
OTHER_KEY = "_other"


class CappedChildren:
    """Label children of ``metric`` (labels: ``key_id``, then ``identity`` labels such as user and tier, then
    bounded labels such as model), bound once per label set. At most ``cap`` distinct key ids get series of their
    own; the rest share the ``key_id="_other"`` series, whose identity labels are empty."""

    def __init__(self, metric: Any, *, cap: int, identity: int) -> None:
        self._metric = metric
        self._cap = cap
        self._identity = identity
        self._blank = ("",) * identity
        self._children: dict[tuple[str, ...], Any] = {}
        self._keys: set[str] = set()

    def get(self, key_id: str, *labels: str) -> Any:
        full = (key_id, *labels)
        child = self._children.get(full)
        if child is not None:
            return child
        if key_id not in self._keys:
            if len(self._keys) >= self._cap:
                full = (OTHER_KEY, *self._blank, *labels[self._identity :])
                child = self._children.get(full)
                if child is None:
                    child = self._children[full] = self._metric.labels(*full)
                return child
            self._keys.add(key_id)
        child = self._children[full] = self._metric.labels(*full)
        return child


def render(registry: CollectorRegistry) -> tuple[bytes, str]:
    return generate_latest(registry), CONTENT_TYPE_LATEST
