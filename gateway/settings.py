"""Process settings: one pydantic-settings object per process, from flags and ``MAAS_*`` environment variables.

Every field ``foo_bar`` is the flag ``--foo-bar`` and the variable ``MAAS_FOO_BAR``; a flag wins over the
variable, the variable over the default. Validation happens once, at start; an error names the setting.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from typing import Any, Literal, TypeVar, get_args, get_origin

from pydantic import Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from gateway import contract
from gateway.errors import ConfigError

log = logging.getLogger("maas.settings")

S = TypeVar("S", bound=BaseSettings)


class CommonSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MAAS_", extra="forbid", frozen=True)

    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        description=(
            "store: redis://, rediss://, unix:// (a Redis socket on this host: unix:///run/redis/redis.sock?db=0), "
            "redis+cluster://, or memory:// (one process only)"
        ),
    )
    store_timeout: float = Field(0.25, gt=0, le=30, description="timeout of every store call, seconds")
    key_pepper: SecretStr | None = Field(
        None,
        description="HMAC pepper for API-key digests (shared by all processes, at least 16 characters); required "
        "unless --dev",
    )
    dev: bool = Field(False, description="development mode: a fixed, loudly logged pepper and secrets")
    log_format: Literal["json", "text"] = Field("json", description="log line format")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")
    host: str = Field("0.0.0.0", description="address to listen on")

    @model_validator(mode="after")
    def _pepper_required(self) -> CommonSettings:
        if self.key_pepper is None and not self.dev:
            raise ValueError("key_pepper is required (set --key-pepper or MAAS_KEY_PEPPER), or run with --dev")
        if self.key_pepper is not None and len(self.key_pepper.get_secret_value()) < 16:
            raise ValueError("key_pepper must be at least 16 characters")
        return self

    @property
    def pepper(self) -> bytes:
        if self.key_pepper is not None:
            return self.key_pepper.get_secret_value().encode()
        return contract.DEV_PEPPER.encode()

    def redacted(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, value in self.model_dump().items():
            out[name] = "**********" if isinstance(value, SecretStr) and value else value
        if "://" in str(out.get("redis_url", "")) and "@" in str(out["redis_url"]):
            scheme, rest = str(out["redis_url"]).split("://", 1)
            out["redis_url"] = f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
        return out


def _flag_type(annotation: Any) -> tuple[Any, list[Any] | None, bool]:
    """(argparse type, choices, is_bool) for a field annotation."""
    origin = get_origin(annotation)
    args = [a for a in get_args(annotation) if a is not type(None)]
    if origin is Literal:
        return str, list(get_args(annotation)), False
    if annotation is bool:
        return None, None, True
    if args and origin is not list and origin is not tuple:
        return _flag_type(args[0])
    if annotation in (int, float):
        return annotation, None, False
    return str, None, False


def add_flags(parser: argparse.ArgumentParser, cls: type[BaseSettings]) -> None:
    for name, field in cls.model_fields.items():
        flag = "--" + name.replace("_", "-")
        kind, choices, is_bool = _flag_type(field.annotation)
        env = f"MAAS_{name.upper()}"
        help_text = f"{field.description or ''} [env {env}]"
        if is_bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parser.add_argument(flag, dest=name, type=kind, choices=choices, default=None, help=help_text)


def load(cls: type[S], namespace: argparse.Namespace | None = None, **overrides: Any) -> S:
    """Build and validate the settings; raise ConfigError naming the offending setting."""
    values = {
        k: v for k, v in vars(namespace or argparse.Namespace()).items() if k in cls.model_fields and v is not None
    }
    values.update(overrides)
    try:
        return cls(**values)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "settings"
            flag = f"--{where.replace('_', '-')} / MAAS_{where.upper()}" if where != "settings" else where
            problems.append(f"{flag}: {err['msg']}")
        raise ConfigError("invalid settings: " + "; ".join(problems)) from exc


def split_csv(value: str | Sequence[str] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else list(value)
    return tuple(i.strip() for i in items if i.strip())
