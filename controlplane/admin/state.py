"""The admin API's view of Redis: every key, tier, model and route record, kept equal to the store the way
``maas authz`` keeps its snapshot (subscribe, read the generation, scan; then apply change events in order and
reload on a gap or a lost connection). Writers wait on it for read-your-writes: a record seen here is in Redis.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable

from pydantic import ValidationError

from controlplane.admin.index import Facet, KeyIndex
from controlplane.translate.secret import resolve_tier
from gateway import contract
from gateway.contract import ChangeEvent, KeyRecord, KeyStatus, ModelRecord, RecordKind, RouteRecord, TierRecord
from gateway.errors import StoreError
from gateway.logs import RateLimitedLog
from gateway.store import Store

log = logging.getLogger("maas.controlplane.admin")
_unreadable = RateLimitedLog(log)
"""Records another version wrote can come by the million (a full load): one warning per 10 s."""


class AdminState:
    def __init__(self, store: Store, *, default_tier: str) -> None:
        self.store = store
        self.default_tier = default_tier
        self.keys: dict[str, KeyRecord] = {}
        """key id -> record"""
        self.digests: dict[str, str] = {}
        """digest -> key id"""
        self.index = KeyIndex()
        self.tiers: dict[str, TierRecord] = {}
        self.models: dict[str, ModelRecord] = {}
        self.routes: dict[str, RouteRecord] = {}
        self.generation = 0
        self.loaded = asyncio.Event()
        self._skip = (0, 0)
        """Events with a generation in (low, high] were published between the subscribe and the last load (already
        in it); empty once an event is applied, as in authz's snapshot follower."""
        self._waiters: set[asyncio.Event] = set()

    # --- following the store -------------------------------------------------------------------------------

    async def run(self) -> None:
        backoff = 0.1
        unreadable = False
        while True:
            try:
                floor = await self.store.generation()
                async with self.store.subscribe() as subscription:
                    await self.reload(floor=floor)
                    if not unreadable:  # a newer writer's every event must not cost a full load at once
                        backoff = 0.1
                    unreadable = False
                    async for event in subscription:
                        if not self.apply_event(event):
                            break
            except StoreError as exc:
                log.warning("admin view lost the change events, will reload: %s", exc)
            except contract.EventFormatError as exc:  # another version's writer: reload, as authz's follower does
                _unreadable.warning("admin view: %s: reloading", exc)
                unreadable = True
            except Exception:  # as in authz's snapshot follower: a bug must not stop the view following the store
                log.exception("admin view failed; reloading")
            await asyncio.sleep(backoff * (0.5 + random.random()))
            backoff = min(backoff * 2, 5.0)

    async def reload(self, *, floor: int | None = None) -> None:
        started = time.monotonic()
        generation = await self.store.generation()
        tables: dict[RecordKind, dict[str, object]] = {}
        for kind in RecordKind:
            table: dict[str, object] = {}
            async for batch in self.store.scan_records(kind):
                for ident, raw in batch:
                    record = _decode(kind, raw)
                    if record is not None:
                        table[ident] = record
            tables[kind] = table
        self.tiers = {k: v for k, v in tables[RecordKind.TIER].items() if isinstance(v, TierRecord)}
        self.models = {k: v for k, v in tables[RecordKind.MODEL].items() if isinstance(v, ModelRecord)}
        self.routes = {k: v for k, v in tables[RecordKind.ROUTE].items() if isinstance(v, RouteRecord)}
        self.keys.clear()
        self.digests.clear()
        self.index = KeyIndex()
        for ident, record in tables[RecordKind.KEY].items():
            if isinstance(record, KeyRecord) and record.digest == ident:
                self._put_key(record)
        self.generation = generation
        self._skip = (min(floor, generation), generation) if floor is not None else (0, 0)
        if generation:  # generation 0: no sync has written Redis yet (a new install), so there is nothing to show
            self.loaded.set()
        self._notify()
        log.info(
            "admin view loaded",
            extra={"generation": generation, "keys": len(self.keys), "seconds": round(time.monotonic() - started, 3)},
        )

    def apply_event(self, event: ChangeEvent) -> bool:
        """Apply one event; False when events were missed and a reload is needed."""
        if event.gen <= self.generation:
            low, high = self._skip
            if low < event.gen <= high:
                return True  # published between the subscribe and the load: already loaded
            log.warning(
                "the store's generation went back from %d to %d (data lost?): reloading", self.generation, event.gen
            )
            return False
        if event.gen != self.generation + 1:
            log.warning("admin view missed change events (at %d, got %d): reloading", self.generation, event.gen)
            return False
        tiers_changed = False
        for change in event.changes:
            if change.kind is RecordKind.KEY:
                self._drop_digest(change.id)
                record = _decode(RecordKind.KEY, change.value) if change.value is not None else None
                if isinstance(record, KeyRecord) and record.digest == change.id:
                    self._put_key(record)
                continue
            table: dict[str, object] = {
                RecordKind.TIER: self.tiers,
                RecordKind.MODEL: self.models,
                RecordKind.ROUTE: self.routes,
            }[change.kind]  # type: ignore[assignment]
            tiers_changed = tiers_changed or change.kind is RecordKind.TIER
            decoded = _decode(change.kind, change.value) if change.value is not None else None
            if decoded is None:
                table.pop(change.id, None)
            else:
                table[change.id] = decoded
        if tiers_changed:
            for record in self.keys.values():
                self.index.put(record.key_id, self._facets(record))
        self.generation = event.gen
        self._skip = (0, 0)
        self.loaded.set()
        self._notify()
        return True

    def _drop_digest(self, digest: str) -> None:
        key_id = self.digests.pop(digest, None)
        if key_id is not None:
            self.keys.pop(key_id, None)
            self.index.remove(key_id)

    def _put_key(self, record: KeyRecord) -> None:
        previous = self.keys.get(record.key_id)
        if previous is not None and previous.digest != record.digest:
            self.digests.pop(previous.digest, None)
        self.keys[record.key_id] = record
        self.digests[record.digest] = record.key_id
        self.index.put(record.key_id, self._facets(record))

    def _facets(self, record: KeyRecord) -> tuple[Facet, ...]:
        tier = self.tier_of(record)
        facets: list[Facet] = [("user", record.user), ("status", record.status.value)]
        if tier is not None:
            facets.append(("tier", tier.name))
        return tuple(facets)

    # --- reading -------------------------------------------------------------------------------------------

    def tier_of(self, record: KeyRecord) -> TierRecord | None:
        return resolve_tier(
            explicit=record.tier, groups=record.groups, tiers=list(self.tiers.values()), default=self.default_tier
        )

    def key_by_digest(self, digest: str) -> KeyRecord | None:
        key_id = self.digests.get(digest)
        return self.keys.get(key_id) if key_id is not None else None

    def users_of_tier(self, name: str) -> int:
        """Keys not revoked whose effective tier is ``name``."""
        return sum(
            1
            for r in self.keys.values()
            if r.status is not KeyStatus.REVOKED and (t := self.tier_of(r)) is not None and t.name == name
        )

    # --- read-your-writes ----------------------------------------------------------------------------------

    def _notify(self) -> None:
        for waiter in self._waiters:
            waiter.set()

    async def catch_up(self, *, within: float) -> None:
        """Wait, at most ``within`` seconds, until this view holds every change Redis holds now. Another replica
        answers a write once its record is in Redis, so a call here after that answer sees it (read-your-writes
        across replicas behind one Service); a view that cannot catch up in time, or a Redis that does not answer,
        leaves the view as it is."""
        deadline = time.monotonic() + within
        try:
            async with asyncio.timeout(within):  # a Redis that hangs costs no more than a lagging view
                target = await self.store.generation()
        except (StoreError, TimeoutError) as exc:
            log.debug("cannot read the store's generation to catch up: %s", exc)
            return
        if self.generation < target:
            await self.wait_until(lambda: self.generation >= target, within=deadline - time.monotonic())

    async def wait_until(self, predicate: Callable[[], bool], *, within: float) -> bool:
        """True once ``predicate`` holds for this view (so for Redis); False after ``within`` seconds."""
        if predicate():
            return True
        waiter = asyncio.Event()
        self._waiters.add(waiter)
        deadline = time.monotonic() + within
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return predicate()
                try:
                    await asyncio.wait_for(waiter.wait(), timeout=remaining)
                except TimeoutError:
                    return predicate()
                waiter.clear()
                if predicate():
                    return True
        finally:
            self._waiters.discard(waiter)


def _decode(kind: RecordKind, raw: bytes | str) -> object | None:
    try:
        record: object = contract.decode_record(kind, raw)
    except (ValidationError, ValueError) as exc:
        _unreadable.warning("admin view skips an unreadable %s record: %s", kind.value, str(exc).splitlines()[0])
        return None
    return record
