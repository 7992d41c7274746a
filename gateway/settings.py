"""Process settings: one pydantic-settings object per process, from flags and ``MAAS_*`` environment variables.

Every field ``foo_bar`` is the flag ``--foo-bar`` and the variable ``MAAS_FOO_BAR``; a flag wins over the
variable, the variable over the default. Validation happens once, at start; an error names the setting. A secret
setting also has a ``*_file`` twin (``secret_file``) naming a file that holds its value, as a mounted Secret: a
variable's value shows in /proc/PID/environ and in tools that print a pod's environment.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal, TypeVar, get_args, get_origin
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_core import PydanticUndefined
from pydantic_settings import BaseSettings, SettingsConfigDict

from gateway import contract
from gateway.errors import ConfigError
from gateway.store.urls import CLUSTER_SCHEMES, node_url, url_nodes

log = logging.getLogger("maas.settings")

S = TypeVar("S", bound=BaseSettings)

MIN_SECRET_LENGTH = 16
STORE_SCHEMES = ("redis", "rediss", "unix", "redis+cluster", "rediss+cluster", "memory")
_QUERY_SECRET = re.compile(r"(?i)([?&][a-z_]*(?:password|passwd|secret|token)=)[^&#]*")


def redact_url(url: str) -> str:
    """``url`` fit for a log line or an error message: no user info, no password in the query."""
    scheme, sep, rest = url.partition("://")
    if sep:
        # up to the last '@' before the query: a password may hold '/' (unix:// puts the path right after the '@')
        head, mark, query = rest.partition("?")
        if "@" in head:
            head = "***@" + head.rsplit("@", 1)[1]
        url = f"{scheme}{sep}{head}{mark}{query}"
    return _QUERY_SECRET.sub(r"\1***", url)


def check_secret(name: str, value: SecretStr | None) -> None:
    """A secret that is given must be long enough to be one (an empty variable is not "no secret")."""
    if value is not None and len(value.get_secret_value()) < MIN_SECRET_LENGTH:
        flag = name.replace("_", "-")
        raise ValueError(f"--{flag} / MAAS_{name.upper()} must be at least {MIN_SECRET_LENGTH} characters")


def secret_file(name: str) -> Any:
    """The field naming the file that holds the secret setting ``name``: the way to give it without an
    environment variable or a flag (both show to anyone who can list the process)."""
    flag = name.replace("_", "-")
    return Field(
        None,
        description=f"file holding --{flag} (a mounted Secret; a trailing newline is dropped), instead of --{flag}",
        json_schema_extra={"secret_file_of": name},
    )


def secret_files(cls: type[BaseSettings]) -> dict[str, str]:
    """The secret settings of ``cls`` that may come from a file: {secret setting: its file setting}."""
    out = {}
    for name, field in cls.model_fields.items():
        extra = field.json_schema_extra
        if isinstance(extra, dict) and isinstance(extra.get("secret_file_of"), str):
            out[str(extra["secret_file_of"])] = name
    return out


def _both(name: str) -> str:
    return f"--{name.replace('_', '-')} / MAAS_{name.upper()}"


def read_secret_file(setting: str, path: str) -> str:
    """The value in ``path`` without its trailing newline. An error names the setting and the file, never what the
    file holds."""
    where = f"{_both(setting)}: {path}"
    try:
        with open(path, encoding="utf-8") as f:
            value = f.read().rstrip("\r\n")
    except UnicodeDecodeError:
        raise ValueError(f"{where} is not UTF-8 text") from None
    except OSError as exc:
        raise ValueError(f"{where} cannot be read: {exc.strerror or type(exc).__name__}") from None
    if not value:
        raise ValueError(f"{where} is empty")
    return value


def resolve_secret_files(cls: type[BaseSettings], data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with each secret given as a file read into its setting. Giving both the value and the file is
    refused: which one wins would be a guess, and a stale variable left beside a rotated file would win in
    silence."""
    out = dict(data)
    for name, file_name in secret_files(cls).items():
        path = out.get(file_name)
        if path is None:
            continue
        if out.get(name) is not None:
            raise ValueError(f"{_both(name)} and {_both(file_name)} are both set: give one of them")
        out[name] = read_secret_file(file_name, str(path))
    return out


def _store_url_problem(value: str) -> str | None:
    """What is wrong with a store URL, without repeating it (it may hold a password)."""
    scheme, sep, _ = value.partition("://")
    if not sep or scheme not in STORE_SCHEMES:
        named = f"{scheme}://" if sep and scheme else "none"
        return f"scheme must be one of {', '.join(s + '://' for s in STORE_SCHEMES)} (got {named})"
    if scheme == "memory":
        return None
    try:
        nodes = url_nodes(value)
    except ValueError:
        return "malformed URL: check the brackets of an IPv6 address"
    if scheme in CLUSTER_SCHEMES:
        return _seeds_problem(scheme, value, nodes)
    if len(nodes) > 1:
        return f"several nodes need {' or '.join(s + '://' for s in CLUSTER_SCHEMES)} (got {scheme}://)"
    return _node_problem(scheme, value)


def _seeds_problem(scheme: str, value: str, nodes: Sequence[str]) -> str | None:
    """A cluster URL's node list: every seed well-formed, none twice. A seed is named by its ``host:port`` (the
    password sits before the last '@', never in the list)."""
    if len(nodes) == 1:
        return _node_problem(scheme, value)
    seen: set[tuple[str, int]] = set()
    for number, node in enumerate(nodes, 1):
        where = f"node {number} of {len(nodes)} in the node list"
        if not node:
            return f"{where} is empty: list the seed nodes as {scheme}://HOST:PORT,HOST:PORT/DB"
        seed = node_url(value, node)
        problem = _node_problem(scheme, seed)
        if problem is not None:
            return f"{where} ({node}): {problem}"
        parts = urlsplit(seed)
        address = (str(parts.hostname), parts.port or 6379)
        if address in seen:
            return f"{where} ({node}) is listed twice"
        seen.add(address)
    return None


def _node_problem(scheme: str, value: str) -> str | None:
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number from 0 to 65535
    except ValueError:
        return "malformed URL: the port must be a number from 1 to 65535"
    if scheme == "unix":
        return None if parts.path else "unix:// needs the socket's path: unix:///run/redis/redis.sock"
    if not parts.hostname:
        return f"{scheme}:// needs a host: {scheme}://HOST:PORT/DB"
    if parts.port == 0:
        return "the port must be a number from 1 to 65535"
    db = parts.path.strip("/")
    if db and not db.isdigit():
        return "the path must be a database number: /0"
    return None


class CommonSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MAAS_", extra="forbid", frozen=True)

    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        description=(
            "store: redis://, rediss://, unix:// (a Redis socket on this host: unix:///run/redis/redis.sock?db=0), "
            "redis+cluster:// or rediss+cluster:// (one or more seed nodes, comma-separated: "
            "redis+cluster://user:pass@host1:6379,host2:6379,host3:6379/0), or memory:// (one process only)"
        ),
    )
    redis_url_file: str | None = secret_file("redis_url")
    store_timeout: float = Field(0.25, gt=0, le=30, description="timeout of every store call, seconds")
    key_pepper: SecretStr | None = Field(
        None,
        description="HMAC pepper for API-key digests (shared by all processes, at least 16 characters); required "
        "unless --dev",
    )
    key_pepper_file: str | None = secret_file("key_pepper")
    dev: bool = Field(
        False, description="development mode: a fixed, loudly logged pepper and secrets (refused with --key-pepper)"
    )
    log_format: Literal["json", "text"] = Field("json", description="log line format")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")
    host: str = Field("0.0.0.0", description="address to listen on")

    @model_validator(mode="before")
    @classmethod
    def _read_secret_files(cls, data: Any) -> Any:
        return resolve_secret_files(cls, data) if isinstance(data, dict) else data

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: str) -> str:
        problem = _store_url_problem(value)
        if problem is not None:
            raise ValueError(problem)
        return value

    @model_validator(mode="after")
    def _pepper_required(self) -> CommonSettings:
        if self.key_pepper is None and not self.dev:
            raise ValueError(
                "key_pepper is required (set --key-pepper-file / MAAS_KEY_PEPPER_FILE or --key-pepper / "
                "MAAS_KEY_PEPPER), or run with --dev"
            )
        if self.key_pepper is not None and self.dev:
            # --dev turns on public development secrets (the controlplane's admin token among them): with a real
            # pepper that is a production process with a back door, so refuse rather than guess which was meant
            raise ValueError(
                "--dev / MAAS_DEV cannot be combined with --key-pepper / MAAS_KEY_PEPPER: development mode uses "
                "fixed, public secrets; drop one of them"
            )
        check_secret("key_pepper", self.key_pepper)
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
        if "redis_url" in out:
            out["redis_url"] = redact_url(str(out["redis_url"]))
        return out


def _flag_kind(annotation: Any) -> tuple[list[Any] | None, bool]:
    """(choices, is_bool) for a field annotation."""
    origin = get_origin(annotation)
    args = [a for a in get_args(annotation) if a is not type(None)]
    if origin is Literal:
        return list(get_args(annotation)), False
    if annotation is bool:
        return None, True
    if args and origin is not list and origin is not tuple:
        return _flag_kind(args[0])
    return None, False


def _help_default(value: Any) -> str:
    """The default as ``--help`` shows it; none for a secret, a required setting or an empty one."""
    if value is None or value is PydanticUndefined or value == "" or isinstance(value, SecretStr):
        return ""
    if isinstance(value, bool):
        return ", default on" if value else ", default off"
    if isinstance(value, tuple):
        value = ",".join(map(str, value))
    return f", default {value}"


def add_flags(parser: argparse.ArgumentParser, cls: type[BaseSettings]) -> None:
    for name, field in cls.model_fields.items():
        flag = "--" + name.replace("_", "-")
        choices, is_bool = _flag_kind(field.annotation)
        env = f"MAAS_{name.upper()}"
        help_text = f"{field.description or ''} [env {env}{_help_default(field.default)}]".replace("%", "%%")
        if is_bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            # the value stays a string for pydantic to check, as it checks the variable's: a bad flag is then the
            # same one-line error naming flag and variable, not argparse's usage dump naming the flag alone
            metavar = "{" + ",".join(choices) + "}" if choices else None
            parser.add_argument(flag, dest=name, metavar=metavar, default=None, help=help_text)


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
            where = ".".join(str(p) for p in err["loc"])
            message = err["msg"].removeprefix("Value error, ")
            # a check across settings names its flags in the message itself
            problems.append(f"--{where.replace('_', '-')} / MAAS_{where.upper()}: {message}" if where else message)
        raise ConfigError("invalid settings: " + "; ".join(problems)) from exc


def misspelt_variables(cls: type[BaseSettings], environ: Mapping[str, str] | None = None) -> list[tuple[str, str]]:
    """``MAAS_*`` variables that are no setting of ``cls`` but look like one of its settings: (variable, the setting's
    variable). Others are left alone: processes of one pod often share an environment with each other's settings."""
    fields = [name.upper() for name in cls.model_fields]
    out = []
    for variable in sorted(os.environ if environ is None else environ):
        name = variable.upper()
        if not name.startswith("MAAS_") or name[5:] in fields:
            continue
        close = difflib.get_close_matches(name[5:], fields, n=1, cutoff=0.85)
        if close:
            out.append((variable, f"MAAS_{close[0]}"))
    return out


def warn_misspelt_variables(cls: type[BaseSettings]) -> None:
    """Log each variable ``misspelt_variables`` finds: it is ignored, and a typo in a setting's name was silent."""
    for variable, setting in misspelt_variables(cls):
        log.warning("%s is not a setting of this process and is ignored; did you mean %s?", variable, setting)


def split_csv(value: str | Sequence[str] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else list(value)
    return tuple(i.strip() for i in items if i.strip())
