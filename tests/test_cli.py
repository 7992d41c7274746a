"""The ``maas`` command as a process: a bad setting is one line on stderr naming the flag and the variable, exit code
2, no traceback and no secret; ``--help`` shows each flag's variable and default but never a secret."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.support.procs import maas_argv

PASSWORD = "hunter2-hunter2-hunter2"
PEPPER = "p" * 16


def _maas(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MAAS_")}
    return subprocess.run(
        maas_argv(*args), env={**clean, **(env or {})}, capture_output=True, text=True, timeout=60, check=False
    )


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        pytest.param(
            ["authz", "--dev", "--redis-url", f"redis://default:{PASSWORD}@127.0.0.1:abc/0"],
            {},
            "--redis-url / MAAS_REDIS_URL",
            id="authz-redis-port",
        ),
        pytest.param(
            ["controlplane", "--dev", "--source", "dir:/nonexistent"],
            {"MAAS_REDIS_URL": f"redis+cluster://default:{PASSWORD}@10.0.0.1:6379,,10.0.0.2:6379/0"},
            "--redis-url / MAAS_REDIS_URL: node 2 of 3 in the node list is empty",
            id="controlplane-cluster-seeds",
        ),
        pytest.param(
            ["authz", "--dev"],
            {"MAAS_REDIS_URL": f"http://default:{PASSWORD}@127.0.0.1/0"},
            "--redis-url / MAAS_REDIS_URL",
            id="authz-redis-scheme",
        ),
        pytest.param(
            ["meter", "--dev", "--upstream", f"http://user:{PASSWORD}@127.0.0.1:99999"],
            {},
            "--upstream / MAAS_UPSTREAM",
            id="meter-upstream-port",
        ),
        pytest.param(
            ["controlplane", "--source", "dir:/nonexistent"],
            {"MAAS_DEV": "1", "MAAS_KEY_PEPPER": PASSWORD},
            "--dev / MAAS_DEV cannot be combined with --key-pepper / MAAS_KEY_PEPPER",
            id="controlplane-dev-with-pepper",
        ),
        pytest.param(
            ["authz", "--key-pepper", PEPPER],
            {"MAAS_IDENTITY_SECRET": ""},
            "--identity-secret / MAAS_IDENTITY_SECRET",
            id="authz-empty-identity-secret",
        ),
    ],
)
def test_a_bad_setting_is_one_line_and_exit_2(args: list[str], env: dict[str, str], named: str) -> None:
    done = _maas(*args, env=env)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and PASSWORD not in done.stderr + done.stdout, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0], done.stderr


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


@pytest.mark.parametrize("command", ["authz", "meter", "controlplane"])
def test_help_shows_variables_and_defaults_but_no_secret(command: str) -> None:
    done = _maas(command, "--help", env={"MAAS_KEY_PEPPER": PASSWORD, "MAAS_IDENTITY_SECRET": PASSWORD})
    text = " ".join(done.stdout.split())  # argparse wraps lines
    assert done.returncode == 0 and PASSWORD not in text
    assert "[env MAAS_REDIS_URL, default redis://127.0.0.1:6379/0]" in text
    assert "[env MAAS_STORE_TIMEOUT, default 0.25]" in text
    assert "[env MAAS_DEV, default off]" in text
    assert "[env MAAS_KEY_PEPPER]" in text  # a secret: no default shown


def test_demo_help_shows_its_defaults() -> None:
    text = " ".join(_maas("demo", "--help").stdout.split())
    assert "default 8000" in text and "default 8001" in text and "default 127.0.0.1" in text


def test_version_and_unknown_subcommand() -> None:
    version = _maas("--version")
    assert version.returncode == 0 and version.stdout.startswith("maas ")
    unknown = _maas("bogus")
    assert unknown.returncode == 2 and "invalid choice: 'bogus'" in unknown.stderr
