"""Prometheus helpers shared by the data-path processes: latency buckets and capped per-key series."""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

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
OVERFLOW_MEMO = 100_000
"""Label sets of over-the-cap keys remembered, so their requests skip the cap check (a few MB at most)."""
KEY_IDLE_SECONDS = 600.0
"""A key's series is dropped, once the cap is full and a new key comes, after it has not moved for this long (at
least two scrapes of any usual interval): revoked, deleted and rotated keys used to hold their places under the cap
for the life of the process, so after enough key churn every new key was counted under ``_other`` only."""


def connection_metrics(process: str, port: str, registry: CollectorRegistry) -> tuple[Gauge, Counter]:
    """The open-connection gauge and the refusal counter of a listener with a connection cap
    (``gateway.connections``): ``maas_<process>_client_connections`` and ``..._refused_total``."""
    gauge = Gauge(f"maas_{process}_client_connections", f"Client connections open on the {port}", registry=registry)
    refused = Counter(
        f"maas_{process}_client_connections_refused",
        f"Connections to the {port} refused (503) at --max-connections",
        registry=registry,
    )
    return gauge, refused


def child_value(child: Any) -> float:
    """The value of a counter child: a ``Cell``'s, or a prometheus_client child's."""
    return float(child.value) if isinstance(child, Cell) else float(child._value.get())


class IdleKeys:
    """Finds the keys whose series have not moved between two looks at least ``idle`` seconds apart. Nothing runs
    per request: ``look`` is called only when the cap is full and a key without a series of its own comes, and
    does its work at most once per ``idle`` seconds (a pass over the capped series, no more than ``cap`` keys)."""

    def __init__(self, *, idle: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._idle = idle
        self._clock = clock
        self._last = clock()
        self._seen: dict[str, float] = {}

    def look(self, totals: Callable[[], Iterable[tuple[str, float]]]) -> list[str]:
        """The keys whose total is what it was at the last look (none on the first look, or within ``idle``)."""
        now = self._clock()
        if now - self._last < self._idle:
            return []
        self._last = now
        seen, self._seen = self._seen, {}
        idle: list[str] = []
        for key, total in totals():
            if seen.get(key) == total:
                idle.append(key)
            else:
                self._seen[key] = total
        return idle


class CappedChildren:
    """Label children of ``metric`` (labels: ``key_id``, then ``identity`` labels such as user and tier, then
    bounded labels such as model), bound once per label set. At most ``cap`` distinct key ids get series of their
    own; the rest share the ``key_id="_other"`` series, whose identity labels are empty. When the cap is full, the
    series of keys idle for ``KEY_IDLE_SECONDS`` are dropped to make room (``on_evict`` is told, so that whoever
    holds children bound earlier binds them again)."""

    def __init__(self, metric: Any, *, cap: int, identity: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._metric = metric
        self._cap = cap
        self._identity = identity
        self._blank = ("",) * identity
        self._children: dict[tuple[str, ...], Any] = {}
        self._keys: set[str] = set()
        self._overflow: dict[tuple[str, ...], Any] = {}
        """Label sets of keys past the cap, mapped to their ``_other`` child (bounded; rebuilt when full)."""
        self._idle = IdleKeys(idle=KEY_IDLE_SECONDS, clock=clock)
        self.on_evict: Callable[[], None] | None = None

    def get(self, key_id: str, *labels: str) -> Any:
        full = (key_id, *labels)
        child = self._children.get(full) or self._overflow.get(full)
        if child is not None:
            return child
        if key_id not in self._keys:
            if len(self._keys) >= self._cap and not self._evict_idle():
                other = (OTHER_KEY, *self._blank, *labels[self._identity :])
                child = self._children.get(other)
                if child is None:
                    child = self._children[other] = self._metric.labels(*other)
                if len(self._overflow) >= OVERFLOW_MEMO:
                    self._overflow.clear()
                self._overflow[full] = child
                return child
            self._keys.add(key_id)
        child = self._children[full] = self._metric.labels(*full)
        return child

    def _evict_idle(self) -> bool:
        """Drop the series of idle keys; True when that made room."""
        idle = self._idle.look(self._totals)
        if not idle:
            return False
        gone = set(idle)
        for labels in [labels for labels in self._children if labels[0] in gone]:
            del self._children[labels]
            self._metric.remove(*labels)
        self._keys -= gone
        self._overflow.clear()  # keys sent to _other may have a series of their own now
        if self.on_evict is not None:
            self.on_evict()
        return len(self._keys) < self._cap

    def _totals(self) -> Iterator[tuple[str, float]]:
        totals: dict[str, float] = dict.fromkeys(self._keys, 0.0)
        for labels, child in self._children.items():
            if labels[0] in totals:
                totals[labels[0]] += child_value(child)
        return iter(totals.items())


def render(registry: CollectorRegistry) -> tuple[bytes, str]:
    return generate_latest(registry), CONTENT_TYPE_LATEST


class Cell:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class LoopCounter(Collector):
    """A labelled counter for a hot path that runs on one event loop: plain floats, no lock per increment, read
    at scrape time (the scrape runs on the same loop). ``labels(...)`` returns a child with ``inc()``, like
    prometheus_client's, so ``CappedChildren`` works on it too."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], *, registry: CollectorRegistry):
        self._name = name
        self._doc = documentation
        self._labelnames = tuple(labelnames)
        self._cells: dict[tuple[str, ...], Cell] = {}
        registry.register(self)

    def labels(self, *values: str) -> Cell:
        cell = self._cells.get(values)
        if cell is None:
            if len(values) != len(self._labelnames):
                raise ValueError(f"{self._name} takes labels {self._labelnames}, got {values}")
            cell = self._cells[values] = Cell()
        return cell

    def remove(self, *values: str) -> None:
        self._cells.pop(values, None)

    def describe(self) -> Iterator[Metric]:
        yield CounterMetricFamily(self._name, self._doc, labels=self._labelnames)

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self._name, self._doc, labels=self._labelnames)
        for values, cell in list(self._cells.items()):
            family.add_metric(values, cell.value)
        yield family


class LoopHistogram(Collector):
    """An unlabelled histogram for a hot path on one event loop (see ``LoopCounter``): ``observe`` is a bisect
    and two additions."""

    def __init__(self, name: str, documentation: str, *, buckets: Sequence[float], registry: CollectorRegistry):
        self._name = name
        self._doc = documentation
        self._bounds = tuple(sorted(buckets))
        self._counts = [0] * (len(self._bounds) + 1)
        self._sum = 0.0
        registry.register(self)

    def observe(self, value: float) -> None:
        self._counts[bisect.bisect_left(self._bounds, value)] += 1
        self._sum += value

    def describe(self) -> Iterator[Metric]:
        yield HistogramMetricFamily(self._name, self._doc)

    def collect(self) -> Iterator[Metric]:
        cumulative: list[tuple[str, float]] = []
        total = 0
        for bound, count in zip((*self._bounds, float("inf")), self._counts, strict=True):
            total += count
            cumulative.append((floatToGoString(bound), total))  # type: ignore[no-untyped-call]
        family = HistogramMetricFamily(self._name, self._doc)
        family.add_metric([], cumulative, sum_value=self._sum)
        yield family
