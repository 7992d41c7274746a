"""One reflector per stream: list, then watch from the list's resourceVersion; re-list on 410 Gone; reconnect
with capped exponential backoff and jitter. It keeps the stream's objects and tells the sync loop about every
change, in the order the source delivered them. A re-list is diffed against what it had, so objects deleted
while the watch was down are reported as deleted and nothing is reported twice; an object found under a name it
held with another uid was deleted and recreated meanwhile, and is reported as such (DELETED, then ADDED)."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable

from controlplane.errors import GoneError, NotFoundError, SourceError
from controlplane.kinds import Kind, Obj, ObjKey, key_of, meta
from controlplane.metrics import Metrics
from controlplane.sources.base import Source, Stream

log = logging.getLogger("maas.controlplane.reflector")

OnChange = Callable[[Kind, ObjKey, str], None]
"""(kind, object key, event type) after the reflector's items were updated."""

SHORT_WATCH_SECONDS = 1.0
"""A watch that ends sooner than this without a single event (bookmarks count) failed, as client-go sees it: the
next one waits for the backoff, or a server that ends every watch at once would be asked again and again."""


class Backoff:
    def __init__(self, *, base: float = 0.2, cap: float = 30.0) -> None:
        self._base = base
        self._cap = cap
        self._attempt = 0

    def reset(self) -> None:
        self._attempt = 0

    def next(self) -> float:
        delay = min(self._cap, self._base * 2**self._attempt)
        self._attempt = min(self._attempt + 1, 30)
        return float(delay * random.uniform(0.5, 1.0))


class Reflector:
    def __init__(
        self, *, source: Source, stream: Stream, on_change: OnChange, metrics: Metrics, backoff_max: float = 30.0
    ) -> None:
        self.source = source
        self.stream = stream
        self.items: dict[ObjKey, Obj] = {}
        self.synced = asyncio.Event()
        self._on_change = on_change
        self._metrics = metrics
        self._backoff = Backoff(cap=backoff_max)
        self._backoff_max = backoff_max
        self._kind = stream.kind.name
        # the series a dashboard or an alert watches exist at 0 from the start: rate() and increase() see no
        # first restart of a series that appears only with it
        for reason in ("timeout", "gone", "error", "not_found"):
            metrics.watch_restarts.labels(kind=self._kind, reason=reason)

    def _set(self, obj: Obj, kind: str) -> None:
        key = key_of(obj)
        if kind == "DELETED":
            if self.items.pop(key, None) is None:
                return
        else:
            old = self.items.get(key)
            if old is not None and meta(old).get("resourceVersion") == meta(obj).get("resourceVersion"):
                return
            if old is not None and meta(old).get("uid") != meta(obj).get("uid"):
                # Deleted and recreated under the same name: nothing of the old object (its last good records
                # above all) may carry over to the new one.
                self._set(old, "DELETED")
                kind = "ADDED"
            self.items[key] = obj
        self._metrics.events.labels(kind=self._kind, type=kind).inc()
        self._on_change(self.stream.kind, key, kind)

    async def _relist(self) -> str:
        listing = await self.source.list(self.stream)
        fresh = {key_of(o): o for o in listing.items}
        for key in [k for k in self.items if k not in fresh]:
            self._set(self.items[key], "DELETED")
        for obj in fresh.values():
            self._set(obj, "MODIFIED" if key_of(obj) in self.items else "ADDED")
        self.synced.set()
        log.info("listed %s: %d objects at resourceVersion %s", self.stream.name, len(fresh), listing.resource_version)
        return listing.resource_version

    def _drop_all(self) -> None:
        for key in list(self.items):
            self._set(self.items[key], "DELETED")

    async def run(self) -> None:
        version: str | None = None
        gone_in_a_row = 0
        """410s with no event in between: the first re-lists at once, the next ones only after the backoff."""
        while True:
            try:
                if version is None:
                    version = await self._relist()
                started, seen = time.monotonic(), 0
                async for event in self.source.watch(self.stream, resource_version=version):
                    seen += 1
                    gone_in_a_row = 0
                    self._backoff.reset()
                    if event.type != "BOOKMARK":
                        self._set(event.obj, event.type)
                    version = event.resource_version or version
                if seen == 0 and time.monotonic() - started < SHORT_WATCH_SECONDS:
                    delay = self._backoff.next()
                    log.warning("watch %s ended at once with no event; retrying in %.2fs", self.stream.name, delay)
                    self._metrics.watch_restarts.labels(kind=self._kind, reason="error").inc()
                    await asyncio.sleep(delay)
                else:
                    self._metrics.watch_restarts.labels(kind=self._kind, reason="timeout").inc()
            except NotFoundError as exc:
                # The kind is not served (its CRD is not installed, or was removed): it has no objects; look again
                # later.
                log.warning("cannot list %s (%s); retrying in %.0fs", self.stream.name, exc, self._backoff_max)
                self._metrics.watch_restarts.labels(kind=self._kind, reason="not_found").inc()
                self._drop_all()
                self.synced.set()
                version = None
                await asyncio.sleep(self._backoff_max)
            except GoneError as exc:
                self._metrics.watch_restarts.labels(kind=self._kind, reason="gone").inc()
                version = None
                gone_in_a_row += 1
                if gone_in_a_row == 1:
                    log.info("watch %s expired (%s): re-listing", self.stream.name, exc)
                else:
                    delay = self._backoff.next()
                    log.warning("watch %s expired again (%s): re-listing in %.2fs", self.stream.name, exc, delay)
                    await asyncio.sleep(delay)
            except SourceError as exc:
                delay = self._backoff.next()
                log.warning("watch %s failed: %s; retrying in %.2fs", self.stream.name, exc, delay)
                self._metrics.watch_restarts.labels(kind=self._kind, reason="error").inc()
                await asyncio.sleep(delay)
