"""Process tuning of the data-path processes."""

from __future__ import annotations

import gc
import subprocess
import sys

import pytest

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


@pytest.mark.parametrize(
    ("hard", "needed", "soft_after", "warned"),
    [
        pytest.param(4096, 2000, 2000, False, id="raised-to-what-is-needed"),
        pytest.param(1500, 2000, 1500, True, id="hard-limit-below-warns"),
        pytest.param(4096, 300, 512, False, id="never-lowered"),
    ],
)
def test_the_soft_descriptor_limit_is_raised_for_the_connection_cap(
    hard: int, needed: int, soft_after: int, warned: bool
) -> None:
    """A container runtime's soft limit of 1024 descriptors is below --max-connections: the cap was never reached,
    and client connections took every descriptor again, the ops port's with them."""
    script = (
        "import logging, resource\n"
        "from gateway.runtime import raise_descriptor_limit\n"
        "logging.basicConfig()\n"
        f"resource.setrlimit(resource.RLIMIT_NOFILE, (512, {hard}))\n"
        f"raise_descriptor_limit({needed})\n"
        "print(resource.getrlimit(resource.RLIMIT_NOFILE)[0])\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert int(done.stdout) == soft_after
    assert ("--max-connections" in done.stderr) is warned
