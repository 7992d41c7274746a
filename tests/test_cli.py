"""The ``maas`` command as a process: bad usage is exit code 2 with a clear message, before anything starts."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.support.procs import maas_argv


def _maas(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MAAS_")}
    return subprocess.run(
        maas_argv(*args), env={**clean, **(env or {})}, capture_output=True, text=True, timeout=60, check=False
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(["--port", "70000"], "argument --port: a port is a number from 1 to 65535", id="port-too-big"),
        pytest.param(["--admin-port", "-1"], "argument --admin-port: a port is a number", id="negative-port"),
        pytest.param(["--port", "27040", "--admin-port", "27040"], "give them different ports", id="same-port"),
        pytest.param(["--ready-timeout", "nan"], "argument --ready-timeout: must be a finite number", id="nan"),
    ],
)
def test_demo_refuses_bad_ports_before_starting_anything(args: list[str], message: str) -> None:
    done = _maas("demo", *args)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and "envoy" not in done.stderr.lower(), done.stderr


def test_demo_help_shows_its_defaults() -> None:
    text = " ".join(_maas("demo", "--help").stdout.split())
    assert "default 8000" in text and "default 8001" in text and "default 127.0.0.1" in text


def test_version_and_unknown_subcommand() -> None:
    version = _maas("--version")
    assert version.returncode == 0 and version.stdout.startswith("maas ")
    unknown = _maas("bogus")
    assert unknown.returncode == 2 and "invalid choice: 'bogus'" in unknown.stderr
