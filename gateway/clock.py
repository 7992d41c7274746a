"""This process's wall clock against Redis's, the one clock every part shares (the token buckets run on it).

Every time one part sets and another judges goes by it: key expiry (the control plane sets it, authz judges it),
the identity's stamp (authz signs, the meter and the self-service API check), the ledger's day and the admin API's
"today". So the parts' own clocks may disagree by any amount as long as each can read Redis's.

A process on a Redis store reads ``TIME`` once at start and every ``PERIOD`` seconds, between two reads of its own
wall clock: the offset (Redis's time minus the midpoint) is kept when the round trip was short enough to bound its
error, exported as a gauge, and warned about past ``WARN_OFFSET``. The meter files usage under the UTC day of
``ClockOffset.now`` (Redis's time), so meters whose clocks disagree still agree on midnight. On the in-memory store
(one process, no other clock to agree with) the offset stays 0 and nothing is read.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Protocol, runtime_checkable

from prometheus_client import Gauge

from gateway.errors import StoreError
from gateway.logs import RateLimitedLog

PERIOD = 30.0
"""Seconds between two measurements: a clock drifts by far less than a millisecond in that time, but steps (a
resumed VM, chrony correcting a large error) are seen within it."""
MAX_ROUND_TRIP = 0.05
"""Seconds: a reading is kept only when ``TIME`` answered within this, so the offset is off by less than half of it
(a slow answer, under load or across a congested network, would put the midpoint anywhere in a long interval)."""
ATTEMPTS = 3
"""Reads per measurement, until one answers within ``MAX_ROUND_TRIP``: the first read of a fresh connection also
pays for its setup (TCP, TLS, AUTH)."""
WARN_OFFSET = 10.0
"""Seconds off Redis's clock past which the process warns. The meter refuses authz's identity headers once their
clocks differ by more than ``--identity-max-age`` (60 s); two parts each within 10 s of Redis are within 20 s of
each other, so the warning comes well before the first 401 ``stale_identity``, and while key expiry is still off
by no more than a few seconds."""
WARN_INTERVAL = 600.0
"""Seconds between two warnings about the same clock: one a measurement would be every 30 s."""


def wall() -> float:
    """The local wall clock (a seam: tests move it to play a node whose clock is off)."""
    return time.time()


@runtime_checkable
class SharedClock(Protocol):
    """A store whose clock every part of the system reads: Redis (in a cluster, any one node's)."""

    async def server_time(self) -> float:
        """The store's time, in seconds since the epoch."""
        ...


class ClockOffset:
    """How far this process's wall clock is from Redis's, kept fresh by ``run``."""

    def __init__(self, gauge: Gauge, *, logger: logging.Logger) -> None:
        self.offset = 0.0
        """Seconds to add to this process's wall clock to read Redis's (negative: this clock is ahead)."""
        self._gauge = gauge
        self._log = logger
        self._warn = RateLimitedLog(logger, interval=WARN_INTERVAL)

    def now(self) -> float:
        """Redis's time as this process knows it: its wall clock corrected by the last offset measured."""
        return wall() + self.offset

    async def run(self, source: SharedClock) -> None:
        """Measure at once, then every ``PERIOD`` seconds, for as long as the process runs."""
        while True:
            await self.measure(source)
            await asyncio.sleep(PERIOD)

    async def measure(self, source: SharedClock) -> None:
        """One measurement; the last offset stays when no read answered in time or the store failed."""
        for _ in range(ATTEMPTS):
            before = wall()
            started = time.monotonic()  # the round trip on the monotonic clock: a step of the wall would fake one
            try:
                remote = await source.server_time()
            except StoreError as exc:
                self._log.debug("reading Redis's clock failed: %s", exc)
                return
            round_trip = time.monotonic() - started
            if round_trip < MAX_ROUND_TRIP:
                self._set(remote - (before + wall()) / 2)
                return

    def _set(self, offset: float) -> None:
        self.offset = offset
        self._gauge.set(offset)
        if abs(offset) > WARN_OFFSET:
            self._warn.warning(
                "this node's clock is %.1f s %s Redis's (more than %g s): check its time sync (NTP, chrony); this "
                "process goes by Redis's clock, corrected every 30 s, and a step of this clock in between shifts "
                "key expiry and identity stamps by the step until the next reading",
                abs(offset),
                "ahead of" if offset < 0 else "behind",
                WARN_OFFSET,
            )
