"""Entry point: ``python -m benchmarks {authz,controlplane,meter,all} [--quick] [...]``.

Each benchmark module exposes ``main(argv: list[str]) -> int``."""

from __future__ import annotations

import importlib
import sys

SUITES = ("authz", "controlplane", "meter", "admin", "reload", "report")


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: python -m benchmarks {{{','.join(SUITES)},all}} [--quick] [options]")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name == "all":
        name = "report"
    if name not in SUITES:
        print(f"unknown benchmark {name!r}; choose one of {', '.join(SUITES)} or all", file=sys.stderr)
        return 2
    module = importlib.import_module(f"benchmarks.{name}")
    code: int = module.main(rest)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
