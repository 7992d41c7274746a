"""System tools some tests need (Debian packages `.ci/run` installs): where one is missing a test skips with a reason
naming the package, unless its ``MAAS_REQUIRE_*`` switch is set, as under `.ci/run`, where it fails instead."""

from __future__ import annotations

import asyncio
import os
import shutil

import pytest


def required_tool(name: str, *, package: str, switch: str) -> str:
    """The path of ``name``; a skip (or, with ``switch`` set in the environment, a failure) where it is missing."""
    binary = shutil.which(name)
    if binary is None:
        missing = f"{name} is not installed (apt-get install {package}; .ci/run installs it)"
        if os.environ.get(switch):
            pytest.fail(f"{missing} ({switch}=1)")
        pytest.skip(missing)
    return binary


def promtool() -> str:
    return required_tool("promtool", package="prometheus", switch="MAAS_REQUIRE_PROMTOOL")


async def check_metrics(text: bytes) -> None:
    """``promtool check metrics`` passes on an exposition."""
    proc = await asyncio.create_subprocess_exec(
        promtool(),
        "check",
        "metrics",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await proc.communicate(text)
    assert proc.returncode == 0, output.decode()
