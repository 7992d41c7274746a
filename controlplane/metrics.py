"""The control plane's Prometheus metrics, on a registry of their own (one per control plane instance)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

PREFIX = "maas_controlplane"
LAG_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.events = Counter(
            f"{PREFIX}_watch_events", "Object changes seen, by kind and event type", ["kind", "type"], registry=r
        )
        self.objects = Gauge(f"{PREFIX}_objects", "Objects currently known, by kind", ["kind"], registry=r)
        self.records = Gauge(f"{PREFIX}_records", "Records desired in the store, by record kind", ["kind"], registry=r)
        self.watch_restarts = Counter(
            f"{PREFIX}_watch_restarts",
            "Watches restarted, by kind and reason (timeout, gone, error)",
            ["kind", "reason"],
            registry=r,
        )
        self.warning_events = Counter(
            f"{PREFIX}_warning_events",
            "Kubernetes Warning Events about skipped objects, by result (sent, failed, dropped: the queue was full)",
            ["result"],
            registry=r,
        )
        for result in ("sent", "failed", "dropped"):
            self.warning_events.labels(result=result)  # at 0 from the start, for rate() and increase()
        self.sync_lag = Histogram(
            f"{PREFIX}_sync_lag_seconds",
            "Time from an object change being seen to its records being written",
            buckets=LAG_BUCKETS,
            registry=r,
        )
        self.writes = Counter(
            f"{PREFIX}_record_writes", "Record puts and deletes written to the store", ["op"], registry=r
        )
        self.write_errors = Counter(f"{PREFIX}_store_errors", "Failed store writes or reads", registry=r)
        self.last_full_sync = Gauge(
            f"{PREFIX}_last_full_sync_timestamp_seconds", "Unix time of the last completed full sync", registry=r
        )
        self.full_syncs = Counter(f"{PREFIX}_full_syncs", "Completed full syncs", registry=r)
        self.clock_offset = Gauge(
            f"{PREFIX}_clock_offset_seconds", "Redis's clock minus this replica's (TIME every 30 s)", registry=r
        )
        self.leader = Gauge(f"{PREFIX}_leader", "1 while this instance holds the lease and writes", registry=r)
        self.skipped = Counter(
            f"{PREFIX}_skipped_objects",
            "Objects skipped as malformed, by kind and reason",
            ["kind", "reason"],
            registry=r,
        )
