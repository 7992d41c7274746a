"""Process tuning of the data-path processes."""

from __future__ import annotations

import gc
import subprocess
import sys

from gateway.runtime import GC_YOUNG_THRESHOLD, tune_gc


def test_tune_gc_raises_only_the_young_threshold() -> None:
    before = gc.get_threshold()
    try:
        tune_gc()
        assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, before[1], before[2])
    finally:
        gc.set_threshold(*before)


def test_cycles_are_still_collected_after_tuning() -> None:
    script = (
        "import gc, weakref\n"
        "from gateway.runtime import tune_gc\n"
        "tune_gc()\n"
        "class Node: pass\n"
        "a = Node(); a.self = a; probe = weakref.ref(a); del a\n"
        "for _ in range(200_000): [[]]\n"  # allocations alone reach the young threshold
        "blocks = [[i] for i in range(60_000)]\n"
        "print(probe() is None)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "True"
