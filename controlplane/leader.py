"""Leader election with a ``coordination.k8s.io/v1`` Lease, as client-go does it.

The holder renews the Lease every ``retry_period``; others take it over when it has not changed for
``lease_duration`` (measured on their own monotonic clock, so clock skew between nodes does not matter). The
leader stops writing at once when a renewal has not succeeded within ``renew_deadline``: ``is_leader`` checks that
deadline on every call, not only when the renew loop notices. On shutdown the leader releases the Lease so a
follower takes over without waiting for it to expire.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from controlplane.errors import ConflictError, SourceError
from controlplane.kinds import LEASE, Kind, Obj, meta
from controlplane.sources.kube import micro_time

log = logging.getLogger("maas.controlplane.leader")


class LeaseClient(Protocol):
    async def get(self, kind: Kind, namespace: str, name: str) -> Obj | None: ...

    async def create(self, obj: Obj) -> Obj: ...

    async def replace(self, obj: Obj) -> Obj: ...


class AlwaysLeader:
    """No election (a single instance, or the directory source): this instance always writes."""

    def is_leader(self) -> bool:
        return True

    async def run(self) -> None:
        await asyncio.Event().wait()

    async def release(self) -> None:
        return None


class LeaseElector:
    def __init__(
        self,
        *,
        client: LeaseClient,
        name: str,
        namespace: str,
        identity: str,
        lease_duration: float = 15.0,
        renew_deadline: float = 10.0,
        retry_period: float = 2.0,
        on_change: Callable[[bool], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._name = name
        self._namespace = namespace
        self.identity = identity
        self._duration = lease_duration
        self._deadline = min(renew_deadline, lease_duration)
        self._retry = retry_period
        self._on_change = on_change
        self._clock = clock
        self._renewed_at: float | None = None
        self._observed: tuple[str, float] | None = None
        self._leading = False

    def is_leader(self) -> bool:
        if self._renewed_at is None:
            return False
        return self._clock() - self._renewed_at < self._deadline

    def _set_leading(self, leading: bool) -> None:
        if leading != self._leading:
            self._leading = leading
            log.info("%s leadership of lease %s/%s", "acquired" if leading else "lost", self._namespace, self._name)
            if self._on_change is not None:
                self._on_change(leading)

    def _spec(self, *, transitions: int, acquired: str) -> dict[str, Any]:
        return {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": max(1, round(self._duration)),
            "acquireTime": acquired,
            "renewTime": micro_time(),
            "leaseTransitions": transitions,
        }

    async def _try(self) -> bool:
        """One acquire-or-renew attempt; True if this instance holds the lease afterwards."""
        now = self._clock()
        lease = await self._client.get(LEASE, self._namespace, self._name)
        if lease is None:
            body = {
                "apiVersion": LEASE.api_version,
                "kind": LEASE.name,
                "metadata": {"name": self._name, "namespace": self._namespace},
                "spec": self._spec(transitions=0, acquired=micro_time()),
            }
            await self._client.create(body)
            self._renewed_at = now
            return True
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity") or ""
        record = f"{holder}|{spec.get('renewTime')}|{meta(lease).get('resourceVersion')}"
        if self._observed is None or self._observed[0] != record:
            self._observed = (record, now)
        duration = float(spec.get("leaseDurationSeconds") or self._duration)
        if holder and holder != self.identity and now - self._observed[1] < duration:
            return False
        transitions = int(spec.get("leaseTransitions") or 0)
        if holder == self.identity:
            new_spec = self._spec(transitions=transitions, acquired=str(spec.get("acquireTime") or micro_time()))
        else:
            new_spec = self._spec(transitions=transitions + 1, acquired=micro_time())
        await self._client.replace({**lease, "spec": new_spec})
        self._renewed_at = now
        return True

    async def run(self) -> None:
        while True:
            try:
                leading = await self._try()
            except ConflictError:
                leading = False
            except SourceError as exc:
                log.warning("lease %s/%s: %s", self._namespace, self._name, exc)
                leading = self.is_leader()
            if not leading and self._leading:
                self._renewed_at = None
            self._set_leading(leading and self.is_leader())
            await asyncio.sleep(self._retry)

    async def release(self) -> None:
        """Give the lease up (graceful shutdown), so a follower does not wait for it to expire."""
        if not self._leading:
            return
        self._renewed_at = None
        self._set_leading(False)
        try:
            lease = await self._client.get(LEASE, self._namespace, self._name)
            if lease is not None and (lease.get("spec") or {}).get("holderIdentity") == self.identity:
                spec = {**lease["spec"], "holderIdentity": "", "leaseDurationSeconds": 1}
                await self._client.replace({**lease, "spec": spec})
        except SourceError as exc:
            log.warning("cannot release lease %s/%s: %s", self._namespace, self._name, exc)
