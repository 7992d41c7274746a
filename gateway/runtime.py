"""Process-wide tuning shared by the data-path processes (``maas authz``, ``maas meter``)."""

from __future__ import annotations

import gc

GC_YOUNG_THRESHOLD = 50_000
"""Net new container objects between two young-generation collections (CPython's default is 700)."""


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
