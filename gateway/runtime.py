"""Process-wide tuning shared by the data-path processes (``maas authz``, ``maas meter``)."""

from __future__ import annotations

import gc
import logging
import resource

log = logging.getLogger("maas.runtime")

GC_YOUNG_THRESHOLD = 50_000
"""Net new container objects between two young-generation collections (CPython's default is 700)."""
DESCRIPTOR_RESERVE = 256
"""Descriptors besides the client and upstream connections: the listening sockets, the ops port's connections, the
store's connections (one per Redis Cluster node, the change-event subscription), the process's own files."""


def tune_gc() -> None:
    """Run the cyclic garbage collector less often. The request paths create no reference cycles in normal operation
    (reference counting frees everything they allocate), yet with CPython's default threshold the collector ran
    every few hundred requests and took about a tenth of ``maas authz``'s CPU at saturation (py-spy), walking
    the per-key caches each time. Tests hold the paths to that: a closed connection and a metered request (whole,
    streamed or refused) leave nothing for the collector (tests/test_meter_cycles.py, test_authz_fasthttp.py,
    test_meter_server.py, test_meter_h1.py). Cycles that remain (an unexpected error's traceback, say) are still
    collected, only later: at most this many container objects wait, a few MB. The key index itself is frozen out
    of collections after each load (``gateway.authz.follower``)."""
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


def descriptors_needed(*, max_connections: int, backlog: int, upstream: int = 0) -> int:
    """Descriptors a process with a connection cap (gateway/connections.py) may hold at once: the connections it
    serves, as many refused ones waiting for their clients to close, a backlog accepted in one burst before any is
    refused, ``upstream`` connections of its own and the reserve."""
    return 2 * max_connections + backlog + upstream + DESCRIPTOR_RESERVE


def raise_descriptor_limit(needed: int) -> None:
    """Raise the soft limit on open descriptors to ``needed``, as far as the hard limit allows. Some container
    runtimes start processes with a soft limit of 1024, below ``--max-connections``: the cap was never reached and
    client connections took every descriptor again, the ops port's and the store's with them. A hard limit below
    ``needed`` is kept, with a warning."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if target < needed:
        log.warning(
            "open descriptors are limited to %d (the hard limit), below the %d --max-connections needs: lower "
            "--max-connections or raise the limit (ulimit -n)",
            target,
            needed,
        )
