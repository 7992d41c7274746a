"""The sync loop: keeps Redis equal to the desired records, writing only what differs.

Changes from the reflectors mark Secrets, tiers or models dirty and wake the loop; the loop recomputes the
desired records for what is dirty, diffs them against its mirror of Redis, and writes the differences in one
``store.apply`` (pipelined in chunks by the store; each chunk bumps the generation and publishes a change event).
Changes that arrive while a write is in flight are batched into the next one; each object's latest state wins.

A full sync (at start, every ``resync_period``, after a store error, and on becoming leader) reloads the mirror
from Redis and diffs every record, so records whose objects are gone, or that someone else changed, are fixed.
Only the leader writes; followers keep the desired records warm.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Hashable

from controlplane import kinds
from controlplane.desired import Desired
from controlplane.errors import TranslateError
from controlplane.events import EventQueue
from controlplane.kinds import Kind, Obj, ObjKey, key_of, meta
from controlplane.metrics import Metrics
from controlplane.reflector import Backoff, Reflector
from controlplane.sources.base import Source
from gateway.contract import Change, RecordKind
from gateway.errors import StoreError
from gateway.store import Store

log = logging.getLogger("maas.controlplane.sync")

MODEL_KINDS = frozenset({kinds.ISVC.name, kinds.RUNTIME.name, kinds.CLUSTER_RUNTIME.name, kinds.HTTPROUTE.name})
REPORTED_CAP = 50_000
SKIPPED_CAP = 1000
"""Skipped objects remembered for ``/v1/sync`` at most (the log, the metric and the Events have every one)."""
PROBE_SECONDS = 5.0
"""How often the leader checks that the store still holds what it wrote (its generation did not go back)."""


class Syncer:
    def __init__(
        self,
        *,
        store: Store,
        source: Source,
        metrics: Metrics,
        is_leader: Callable[[], bool],
        resync_period: float,
        pepper: bytes,
        default_tier: str = "free",
        tier_configmap: str = "tier-to-group-mapping",
        tier_limits_configmap: str = "maas-tier-limits",
        tier_namespace: str = "",
        gateways: frozenset[str] = frozenset(),
    ) -> None:
        self._store = store
        self._source = source
        self._metrics = metrics
        self._is_leader = is_leader
        self._resync_period = resync_period
        self.reflectors: dict[str, list[Reflector]] = {}
        self.desired = Desired(
            objects=self.objects,
            report=self.report,
            pepper=pepper,
            default_tier=default_tier,
            tier_configmap=tier_configmap,
            tier_limits_configmap=tier_limits_configmap,
            tier_namespace=tier_namespace,
            gateways=gateways,
            clear=self._clear_skipped,
        )
        self.skipped: dict[tuple[str, ObjKey], dict[str, str]] = {}
        """What was last reported about each object still skipped (``/v1/sync`` lists them)."""
        self.ready = asyncio.Event()
        self.generation = 0
        self._mirror: dict[RecordKind, dict[str, str]] | None = None
        self._dirty_secrets: set[ObjKey] = set()
        self._tiers_dirty = True
        self._models_dirty = True
        self._full_due = True
        self._touched: dict[RecordKind, set[str]] = {k: set() for k in RecordKind}
        self._pending_since: float | None = None
        self._wake = asyncio.Event()
        self._logged: set[tuple[str, ObjKey, str, str]] = set()
        self._reported: set[Hashable] = set()
        """Problems whose Event the leader queued or sent."""
        self.events = EventQueue(source=source, metrics=metrics, lost=self._reported.discard)
        """Its ``run`` sends the Events (the control plane runs it as a task of its own)."""

    # --- inputs --------------------------------------------------------------------------------------------

    def add(self, reflector: Reflector) -> None:
        self.reflectors.setdefault(reflector.stream.kind.name, []).append(reflector)

    def objects(self, kind: Kind) -> dict[ObjKey, Obj]:
        """The union of what every reflector of this kind holds (a Secret may match several selectors)."""
        streams = self.reflectors.get(kind.name, [])
        if len(streams) == 1:
            return streams[0].items
        merged: dict[ObjKey, Obj] = {}
        for reflector in streams:
            for key, obj in reflector.items.items():
                merged.setdefault(key, obj)
        return merged

    def _clear_skipped(self, kind: Kind, key: ObjKey) -> None:
        self.skipped.pop((kind.name, key), None)

    def skipped_now(self) -> list[dict[str, str]]:
        """The objects skipped (or with parts left out) as reported, of those the reflectors still hold."""
        out = []
        for (kind_name, (namespace, name)), report in sorted(self.skipped.items()):
            if any((namespace, name) in r.items for r in self.reflectors.get(kind_name, ())):
                out.append({"kind": kind_name, "namespace": namespace, "name": name, **report})
        return out

    def count(self, kind_name: str) -> int:
        """How many distinct objects of a kind the reflectors hold (a Secret matched by two selectors is one)."""
        streams = self.reflectors.get(kind_name, [])
        if len(streams) == 1:
            return len(streams[0].items)
        return len(set().union(*(r.items.keys() for r in streams)))

    def on_change(self, kind: Kind, key: ObjKey, event_type: str) -> None:
        if kind.name == kinds.SECRET.name:
            self._dirty_secrets.add(key)
        elif kind.name == kinds.CONFIGMAP.name:
            self._tiers_dirty = True
        elif kind.name in MODEL_KINDS:
            self._models_dirty = True
        if event_type == "DELETED":
            self.desired.forget(kind, key)
        if self._pending_since is None:
            self._pending_since = time.monotonic()
        self._wake.set()

    def request_full(self) -> None:
        self._full_due = True
        self._wake.set()

    def report(self, kind: Kind, obj: Obj, error: TranslateError) -> None:
        """A malformed object: a warning log and a metric once per version, and a Kubernetes Event once per version
        by the leader (a problem seen as a follower is sent on becoming leader: that brings a full sync, which
        reports every current problem again)."""
        key = key_of(obj)
        if len(self.skipped) < SKIPPED_CAP or (kind.name, key) in self.skipped:
            self.skipped[(kind.name, key)] = {"reason": error.reason, "message": str(error)}
        ident = (kind.name, key, str(meta(obj).get("resourceVersion") or ""), error.reason)
        if ident not in self._logged:
            if len(self._logged) > REPORTED_CAP:
                self._logged.clear()
            self._logged.add(ident)
            self._metrics.skipped.labels(kind=kind.name, reason=error.reason).inc()
            log.warning(
                "skipping %s %s (%s): %s",
                kind.name,
                "/".join(p for p in key if p),
                error.reason,
                error,
                extra={"reason": error.reason},
            )
        if ident in self._reported or not self._is_leader():
            return
        if len(self._reported) > REPORTED_CAP:
            self._reported.clear()
        self._reported.add(ident)  # taken back by the queue if the Event is dropped or fails: a full sync retries
        self.events.submit(ident, obj, reason=f"MaasSkipped{_camel(error.reason)}", message=str(error))

    # --- the loop ------------------------------------------------------------------------------------------

    async def run(self) -> None:
        await asyncio.gather(*(r.synced.wait() for streams in self.reflectors.values() for r in streams))
        backoff = Backoff(base=0.1, cap=5.0)
        next_full = time.monotonic()
        next_probe = time.monotonic() + PROBE_SECONDS
        while True:
            timeout = max(0.0, min(next_full, next_probe) - time.monotonic())
            if not self._wake.is_set():
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=timeout)
                except TimeoutError:
                    if time.monotonic() >= next_probe:
                        next_probe = time.monotonic() + PROBE_SECONDS
                        if not await self._store_went_back():
                            continue
                    self._full_due = True
            self._wake.clear()
            full = self._full_due or time.monotonic() >= next_full
            try:
                await self._reconcile(full=full)
            except StoreError as exc:
                self._metrics.write_errors.inc()
                delay = backoff.next()
                log.warning("store write failed: %s; full sync in %.2fs", exc, delay)
                self._mirror = None
                self._full_due = True
                self._wake.set()
                await asyncio.sleep(delay)
                continue
            backoff.reset()
            if full:
                next_full = time.monotonic() + self._resync_period

    async def _store_went_back(self) -> bool:
        """Whether the store's generation is below the last one written here: Redis lost its data (restarted without
        persistence, flushed, restored from an old backup). Then a full sync rewrites it at once, instead of at the
        next ``resync_period`` (until then maas authz knew no key)."""
        if not self._is_leader() or self.generation <= 0:
            return False
        try:
            current = await self._store.generation()
        except StoreError:
            return False  # unreachable: the next write fails and brings the full sync
        if current >= self.generation:
            return False
        log.warning("the store's generation went back from %d to %d (data lost?): full sync", self.generation, current)
        self.generation = current
        return True

    def _update_desired(self, *, full: bool) -> None:
        if self._tiers_dirty or full:
            self._tiers_dirty = False
            self._dirty_secrets |= self.desired.update_tiers()
            self._touched[RecordKind.TIER].update(self.desired.records[RecordKind.TIER])
        if full:
            self._dirty_secrets |= self.desired.all_secrets()
        if self._dirty_secrets:
            dirty, self._dirty_secrets = self._dirty_secrets, set()
            self._touched[RecordKind.KEY] |= self.desired.update_secrets(dirty)
        if self._models_dirty or full:
            self._models_dirty = False
            self.desired.update_models()
        for kind in RecordKind:
            self._metrics.records.labels(kind=kind.value).set(len(self.desired.records[kind]))
        for name in self.reflectors:
            self._metrics.objects.labels(kind=name).set(self.count(name))

    async def _load_mirror(self) -> dict[RecordKind, dict[str, str]]:
        self.generation = await self._store.generation()  # what the store holds now (the probe compares with it)
        mirror: dict[RecordKind, dict[str, str]] = {}
        for kind in RecordKind:
            table: dict[str, str] = {}
            async for batch in self._store.scan_records(kind):
                table.update((ident, value.decode()) for ident, value in batch)
            mirror[kind] = table
        return mirror

    def _diff(self, mirror: dict[RecordKind, dict[str, str]], *, full: bool) -> list[Change]:
        changes: list[Change] = []
        for kind in RecordKind:
            want = self.desired.records[kind]
            have = mirror[kind]
            # Tiers, models and routes are small and recomputed whole: always diff them in full.
            idents = set(want) | set(have) if full or kind is not RecordKind.KEY else self._touched[kind]
            for ident in sorted(idents):
                value = want.get(ident)
                if value != have.get(ident):
                    changes.append(Change(kind=kind, id=ident, value=value))
        return changes

    async def _reconcile(self, *, full: bool) -> None:
        self._full_due = False
        self._update_desired(full=full)
        if not self._is_leader():
            self._mirror = None
            self._touched = {k: set() for k in RecordKind}
            self._pending_since = None
            self.ready.set()
            return
        if full or self._mirror is None:
            self._mirror = await self._load_mirror()
            full = True
        changes = self._diff(self._mirror, full=full)
        if changes and self._is_leader():
            self.generation = await self._store.apply(changes)
            for change in changes:
                table = self._mirror[change.kind]
                if change.value is None:
                    table.pop(change.id, None)
                else:
                    table[change.id] = change.value
            puts = sum(1 for c in changes if c.value is not None)
            self._metrics.writes.labels(op="put").inc(puts)
            self._metrics.writes.labels(op="delete").inc(len(changes) - puts)
            log.info("wrote %d record changes (generation %d)", len(changes), self.generation)
        self._touched = {k: set() for k in RecordKind}
        if self._pending_since is not None:
            self._metrics.sync_lag.observe(time.monotonic() - self._pending_since)
            self._pending_since = None
        if full:
            self._metrics.last_full_sync.set(time.time())
            self._metrics.full_syncs.inc()
            if not self.ready.is_set():
                log.info("first full sync done: %s", {k.value: len(v) for k, v in self.desired.records.items()})
            self.ready.set()


def _camel(reason: str) -> str:
    return "".join(part.capitalize() for part in reason.split("_"))
