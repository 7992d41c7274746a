"""The ``maas`` command. Each subcommand lives in its own module, imported only when it runs, and exposes
``configure(parser)`` (its flags) and ``run(args) -> int``."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from gateway import __version__
from gateway.errors import ConfigError

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "authz": ("gateway.authz.main", "Envoy ext_authz service: API keys and token-bucket limits"),
    "meter": ("gateway.meter.main", "metering reverse proxy in front of vLLM"),
    "sim": ("gateway.sim.main", "vLLM-compatible OpenAI simulator"),
    "controlplane": ("controlplane.main", "sync cluster objects into Redis and serve the admin API"),
    "demo": ("controlplane.demo", "the whole stack locally, with a real Envoy"),
    "keys": ("controlplane.keys_cli", "admin client for API keys"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only the module of ``command`` is imported (a server's flags come from its settings)."""
    parser = argparse.ArgumentParser(prog="maas", description="maas-gateway: Models-as-a-Service gateway")
    parser.add_argument("--version", action="version", version=f"maas {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        child = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            importlib.import_module(module).configure(child)
            child.set_defaults(_module=module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in SUBCOMMANDS else None)
    args = parser.parse_args(argv)
    if not getattr(args, "_module", None):
        parser.print_help()
        return 2
    try:
        code: int = importlib.import_module(args._module).run(args)
    except ConfigError as exc:
        print(f"maas {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
