"""Keeps the authz snapshot equal to the store: full load at start, then change events.

Order of a (re)load: read the generation F, subscribe, then read the generation G and scan every record. Events
with a generation in (F, G] were published between the subscribe and the scan: already in it, skipped. Later ones
are applied in order (records are whole, so re-applying one is harmless). Once one is applied, an event at or below
the snapshot's generation means the store lost its data and counts again: reload. A gap in generations or a lost
subscription means events were missed: reload too. A store found empty (generation 0, Redis restarted without its
data) does not replace a loaded snapshot: the snapshot keeps serving until the control plane writes again (its
first event is then a generation gone back, and the reload reads what it wrote).

During a rolling upgrade the store may hold what another version wrote. A record of another schema version is
skipped and counted (a key is then unknown here: refused, never read as this version's record). A change event this
version cannot read is treated as missed events: a reload, with the pause between such reloads growing to 5 s so a
newer writer's every event does not cost a full load; changes of a record kind it does not know are left out.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import random
import time
from typing import Any, TypeVar

from pydantic import ValidationError

from gateway import contract
from gateway.authz.metrics import AuthzMetrics
from gateway.contract import ChangeEvent, ModelRecord, RecordKind, RouteRecord, TierRecord
from gateway.errors import StoreError
from gateway.logs import RateLimitedLog
from gateway.snapshot import Catalog, KeyEntry, Snapshot, compile_key
from gateway.store.base import Store

log = logging.getLogger("maas.authz.snapshot")

R = TypeVar("R", TierRecord, ModelRecord, RouteRecord)

RELOAD_SLICE = 500
"""Key records decoded between two yields to the event loop during a full load (~5 ms of work here)."""


def _release_memory() -> None:
    """A full load leaves the previous index and the parsing garbage behind: collect it and hand the freed pages
    back to the OS (glibc's malloc_trim), so RSS tracks what the snapshot really holds. Then freeze the survivors:
    the garbage collector no longer walks millions of long-lived key entries (a pause on the hot path); they hold no
    reference cycles, so reference counting still frees them when a later load replaces them."""
    gc.collect()
    gc.freeze()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class SnapshotFollower:
    def __init__(self, store: Store, *, metrics: AuthzMetrics, snapshot: Snapshot | None = None) -> None:
        self.store = store
        self.snapshot = snapshot or Snapshot()
        self._metrics = metrics
        self._tiers: dict[str, TierRecord] = {}
        self._models: dict[str, ModelRecord] = {}
        self._routes: dict[str, RouteRecord] = {}
        self.connected = False
        self._skip = (0, 0)
        """Events with a generation in (low, high] are already in the last load (see ``run``); empty once an event
        is applied."""
        self._unavailable = RateLimitedLog(log)
        """While Redis is down the follower retries every few seconds: one warning per 10 s, as for bucket checks."""
        self._unreadable = RateLimitedLog(log)
        """Records or events another version wrote can come by the million (a full load): one warning per 10 s."""

    async def run(self) -> None:
        backoff = 0.1
        reason = "start"
        while True:
            try:
                # read before subscribing: events above it and at or below the load's generation were published
                # between the subscribe and the load (already loaded); one at or below it means a store reset
                floor = await self.store.generation()
                async with self.store.subscribe() as subscription:
                    await self.reload(reason=reason, floor=floor)
                    self.connected = True
                    if reason != "unreadable_event":
                        backoff = 0.1
                    async for event in subscription:
                        if not self.apply_event(event):
                            reason = "generation_gap"
                            break
                    else:
                        reason = "subscription_ended"
            except StoreError as exc:
                self._unavailable.warning("change events unavailable, will reload: %s", exc)
                self._metrics.store_error("subscribe", exc.code)
                reason = "reconnect"
            except contract.EventFormatError as exc:
                self._unreadable.warning("%s (another version's writer?): reloading", exc)
                reason = "unreadable_event"
            except Exception:  # a bug must not stop the snapshot from following the store: log it, reload
                log.exception("snapshot follower failed; reloading")
                reason = "error"
            self.connected = False
            await asyncio.sleep(backoff * (0.5 + random.random()))
            backoff = min(backoff * 2, 5.0)

    async def reload(self, *, reason: str, floor: int | None = None) -> None:
        """Load every record; with ``floor`` (the generation read before subscribing), events published between the
        subscribe and this load are skipped when they arrive."""
        started = time.monotonic()
        generation = await self.store.generation()
        self._skip = (0, 0)
        if generation == 0 and self.snapshot.loaded and self.snapshot.generation > 0:
            # an empty snapshot would answer 401 to every key until the control plane writes the store again
            log.warning(
                "the store is empty (generation 0: Redis lost its data?); serving the snapshot of generation %d "
                "until the control plane writes it again",
                self.snapshot.generation,
            )
            return
        keys: dict[bytes, KeyEntry] = {}
        decoded = 0
        async for batch in self.store.scan_records(RecordKind.KEY):
            for ident, raw in batch:
                entry = self._decode_key(ident, raw)
                if entry is not None:
                    keys[entry[0]] = entry[1]
                decoded += 1
                if decoded % RELOAD_SLICE == 0:
                    # a reload while serving (after a reconnect) must not hold the loop for a whole page: checks are
                    # answered from the previous snapshot in between
                    await asyncio.sleep(0)
        self._tiers = await self._load(RecordKind.TIER, TierRecord)
        self._models = await self._load(RecordKind.MODEL, ModelRecord)
        self._routes = await self._load(RecordKind.ROUTE, RouteRecord)
        self.snapshot.keys = keys
        self.snapshot.catalog = self._catalog()
        self.snapshot.generation = generation
        self.snapshot.loaded = True
        if floor is not None:
            self._skip = (min(floor, generation), generation)
        del keys
        _release_memory()
        self._metrics.snapshot_reloads.labels(reason).inc()
        self._update_gauges()
        log.info(
            "snapshot loaded",
            extra={
                "reason": reason,
                "generation": generation,
                "keys": len(self.snapshot.keys),
                "routes": len(self._routes),
                "models": len(self._models),
                "tiers": len(self._tiers),
                "seconds": round(time.monotonic() - started, 3),
            },
        )

    async def _load(self, kind: RecordKind, cls: type[R]) -> dict[str, R]:
        out: dict[str, R] = {}
        async for batch in self.store.scan_records(kind):
            for ident, raw in batch:
                record = self._decode(kind, raw)
                if isinstance(record, cls):
                    out[ident] = record
        return out

    def _decode(self, kind: RecordKind, raw: bytes | str) -> object | None:
        try:
            record: object = contract.decode_record(kind, raw)
        except (ValidationError, ValueError) as exc:
            self._skip_unreadable(kind, exc)
            return None
        return record

    def _decode_key(self, ident: str, raw: bytes | str) -> tuple[bytes, KeyEntry] | None:
        try:
            fields = contract.decode_key_fields(raw)
            if fields["digest"] != ident:
                self._metrics.snapshot_skipped.labels("key", "digest_mismatch").inc()
                return None
            return compile_key(fields)
        except (ValidationError, ValueError) as exc:  # a limit's window is checked by compile_key
            self._skip_unreadable(RecordKind.KEY, exc)
            return None

    def _skip_unreadable(self, kind: RecordKind, exc: ValueError) -> None:
        reason = "schema_version" if isinstance(exc, contract.RecordVersionError) else "malformed"
        self._metrics.snapshot_skipped.labels(kind.value, reason).inc()
        self._unreadable.warning("skipping unreadable %s record: %s", kind.value, str(exc).splitlines()[0])

    @property
    def _tables(self) -> dict[RecordKind, dict[str, Any]]:
        return {RecordKind.TIER: self._tiers, RecordKind.MODEL: self._models, RecordKind.ROUTE: self._routes}

    def _catalog(self) -> Catalog:
        return Catalog.build(tiers=self._tiers.values(), models=self._models.values(), routes=self._routes.values())

    def apply_event(self, event: ChangeEvent) -> bool:
        """Apply one event; False when events were missed or the store went back, and a reload is needed."""
        current = self.snapshot.generation
        if event.gen <= current:
            low, high = self._skip
            if low < event.gen <= high:
                return True  # published between our subscribe and our load: already loaded
            log.warning("generation went back from %d to %d (store reset?): reloading", current, event.gen)
            return False
        if event.gen != current + 1:
            log.warning("change events missed (at %d, got %d): reloading", current, event.gen)
            return False
        if event.left_out:
            self._metrics.snapshot_skipped.labels("unknown", "unknown_kind").inc(event.left_out)
        catalog_changed = False
        keys = self.snapshot.keys
        for change in event.changes:
            if change.kind is RecordKind.KEY:
                digest = bytes.fromhex(change.id) if len(change.id) == 64 else None
                if digest is None:
                    self._metrics.snapshot_skipped.labels("key", "malformed").inc()
                    continue
                if change.value is None:
                    keys.pop(digest, None)
                    continue
                entry = self._decode_key(change.id, change.value)
                if entry is None:
                    keys.pop(digest, None)
                else:
                    keys[digest] = entry[1]
                continue
            catalog_changed = True
            table: dict[str, Any] = self._tables[change.kind]
            if change.value is None:
                table.pop(change.id, None)
                continue
            record = self._decode(change.kind, change.value)
            if record is None:
                table.pop(change.id, None)
            else:
                table[change.id] = record
        if catalog_changed:
            self.snapshot.catalog = self._catalog()
        self.snapshot.generation = event.gen
        self._skip = (0, 0)  # events come in order: none from before the load can follow this one
        self._metrics.snapshot_events.inc()
        self._update_gauges()
        return True

    def _update_gauges(self) -> None:
        m = self._metrics
        m.snapshot_generation.set(self.snapshot.generation)
        m.snapshot_records.labels("key").set(len(self.snapshot.keys))
        m.snapshot_records.labels("tier").set(len(self._tiers))
        m.snapshot_records.labels("model").set(len(self._models))
        m.snapshot_records.labels("route").set(len(self._routes))
