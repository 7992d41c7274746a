"""``maas keys``: the admin API from the shell. Reads ``MAAS_ADMIN_URL`` (default ``http://127.0.0.1:8700``) and
``MAAS_ADMIN_TOKEN``; prints a table, or the API's JSON with ``--output json``. Exit codes: 0 ok, 1 the API
answered an error (its message is printed), 2 bad usage, the API cannot be reached or what answers is not the API
(no JSON, or a 401 that is not the admin API's: the model gateway's port), 74 the output could not be written (a
full disk), 141 the reader of the output went away (``| head``), as for a program killed by SIGPIPE. A key created
or rotated whose output was lost is named on stderr, so it can be revoked: its plaintext is shown only once.

A change the API answers with ``"synced": false`` (it had not reached Redis, so maas authz, in time) is done, so the
exit code is 0, and a warning on stderr says what that means for the key."""

from __future__ import annotations

import argparse
import json
import os
import sys
import unicodedata
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from typing import Any

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_URL = "http://127.0.0.1:8700"
TIMEOUT = 30.0
KEY_COLUMNS = ("key_id", "user", "name", "tier", "status", "expires_at", "source")
USAGE_GROUPS = ("key_id", "user", "model", "day")
USAGE_COLUMNS = (*USAGE_GROUPS, "requests", "prompt_tokens", "completion_tokens", "total_tokens")
EXIT_BROKEN_PIPE = 128 + 13
"""128 + SIGPIPE: what a shell reports for a program the signal ended."""
EXIT_OUTPUT_FAILED = 74
"""sysexits' EX_IOERR: the answer could not be written (a full disk, a closed descriptor)."""
ADMIN_401_CODES = frozenset({"missing_admin_token", "invalid_admin_token"})
"""The admin API's 401 codes; any other 401 comes from something else at the URL (maas authz in front of a model)."""
UNSYNCED = {
    "create": "the key is stored, but maas authz refuses it until the control plane's next sync writes it to Redis",
    "rotate": "the change is stored, but until the control plane's next sync writes it to Redis maas authz refuses "
    "the new key, and the old one works on past the end of its grace period",
    "revoke": "the key is revoked in the cluster, but maas authz admits it until the control plane's next sync "
    "writes that to Redis",
}
"""What ``"synced": false`` means for each change (the write did not reach Redis within the API's write timeout)."""


class KeysSettings(BaseSettings):
    """The client's settings: the environment only (the token is never a flag); an empty variable is unset."""

    model_config = SettingsConfigDict(env_prefix="MAAS_", env_ignore_empty=True, frozen=True)

    admin_url: str = Field(DEFAULT_URL, description="admin API base URL")
    admin_token: SecretStr = Field(SecretStr(""), description="admin API token")


def _token_problem(token: str) -> str | None:
    """What is wrong with the admin token, without repeating it: one that cannot go in a header made urllib fail
    with a traceback that printed it."""
    if not token:
        return "set MAAS_ADMIN_TOKEN to an admin API token"
    if not all("!" <= ch <= "~" for ch in token):
        return "MAAS_ADMIN_TOKEN holds a space, a control character or a character that is not ASCII"
    return None


def _url_problem(base: str) -> str | None:
    """What is wrong with the admin URL, without repeating it (user info would hold a password)."""
    try:
        parts = urllib.parse.urlsplit(base)
        port = parts.port
    except ValueError:  # an unclosed IPv6 bracket, a port that is not a number from 0 to 65535
        return "the admin URL is malformed (an unclosed '[', or a port that is not a number from 1 to 65535)"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "the admin URL must look like http://host:8700"
    if port == 0:
        return "the admin URL's port must be a number from 1 to 65535"
    if "@" in parts.netloc:
        return "the admin URL must not hold user info (user:password@): the token goes in MAAS_ADMIN_TOKEN"
    return None


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: object = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class NotTheApi(Exception):
    """An answer that is not the admin API's JSON: the URL points at some other server."""


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=None, help=f"admin API base URL [env MAAS_ADMIN_URL, default {DEFAULT_URL}]")
    parser.add_argument("--output", "-o", choices=("table", "json"), default="table", help="output format")
    parser.epilog = (
        "The admin token comes from the environment, MAAS_ADMIN_TOKEN (never a flag: it would show in the process "
        "list and the shell history); a read-only token is enough for list, show and usage."
    )
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    create = sub.add_parser("create", help="issue a key (prints the key once)")
    create.add_argument("--user", required=True)
    create.add_argument("--name", default="")
    create.add_argument("--group", action="append", default=[], help="repeatable")
    create.add_argument("--tier")
    create.add_argument("--model", action="append", default=[], help="allowed model, repeatable")
    create.add_argument("--expires-in", help="e.g. 30d")
    create.add_argument("--request-limit", type=int)
    create.add_argument("--token-limit", type=int)
    create.add_argument("--window", help="window of the limit overrides, e.g. 1m")
    listing = sub.add_parser("list", help="list keys")
    listing.add_argument("--user")
    listing.add_argument("--tier")
    listing.add_argument("--status", choices=("active", "disabled", "revoked", "expired"))
    listing.add_argument("--limit", type=int, default=100, help="page size")
    listing.add_argument("--all", action="store_true", help="follow the cursor through every page")
    for name, text in (("show", "show a key"), ("revoke", "revoke a key")):
        sub.add_parser(name, help=text).add_argument("key_id")
    rotate = sub.add_parser("rotate", help="issue a replacement key; the old one works for the grace period")
    rotate.add_argument("key_id")
    rotate.add_argument("--grace-period", default="1h")
    usage = sub.add_parser("usage", help="usage report")
    for flag in ("key-id", "user", "tier", "model", "from", "to", "group-by"):
        usage.add_argument(f"--{flag}", dest=flag.replace("-", "_"))


def _call(base: str, token: str, method: str, path: str, body: Any = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(base.rstrip("/") + path, data=data, method=method)
    request.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            raw = response.read()
            status, content_type = response.status, response.headers.get_content_type()
    except urllib.error.HTTPError as exc:
        code: object = None
        try:
            error = json.loads(exc.read())["error"]
            message, code = error["message"], error.get("code")
        except (ValueError, KeyError, TypeError, AttributeError):
            message = exc.reason
        if exc.code == 401 and code not in ADMIN_401_CODES:
            raise NotTheApi(f"{method} {path} answered HTTP 401 ({message}) without an admin token error") from exc
        raise ApiError(exc.code, str(message), code) from exc
    try:
        out = json.loads(raw)
    except ValueError:  # UnicodeDecodeError is one too
        out = None
    if not isinstance(out, dict):
        raise NotTheApi(f"{method} {path} answered HTTP {status} with {content_type}, not the admin API's JSON")
    return out


def _plain(value: Any) -> str:
    """A JSON value as a person reads it: lists comma-separated, a limit as ``100/1m``, no Python reprs."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ", ".join(_plain(v) for v in value)
    if isinstance(value, dict):
        if value.keys() == {"limit", "window"}:
            return f"{value['limit']}/{value['window']}"
        return ", ".join(f"{k} {_plain(v)}" for k, v in value.items() if v is not None)
    return _inert(str(value))


_BIDI = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def _inert(text: str) -> str:
    """``text`` with control characters and bidirectional overrides written as escapes (``\\x1b``): user ids and
    names come from key Secrets anyone who may write one set, and an escape sequence in them would drive the
    terminal of whoever lists the keys (clear it, rewrite lines, set its title), a bidi override reorder what it
    shows."""
    if text.isprintable():
        return text
    return "".join(
        ch.encode("unicode_escape").decode() if unicodedata.category(ch) == "Cc" or ch in _BIDI else ch for ch in text
    )


def _width(text: str) -> int:
    """Columns a terminal gives ``text``: wide (CJK, emoji) characters take two, combining marks none."""
    return sum(
        0 if unicodedata.combining(ch) else 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1 for ch in text
    )


def _pad(text: str, width: int) -> str:
    return text + " " * (width - _width(text))


def _table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    cells = [[_plain(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c), *(_width(row[i]) for row in cells)]) for i, c in enumerate(columns)]
    lines = ["  ".join(_pad(c.upper(), w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    lines += ["  ".join(_pad(v, w) for v, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    return "\n".join(lines)


def _query(values: dict[str, Any]) -> str:
    clean = {k: v for k, v in values.items() if v not in (None, "")}
    return "?" + urllib.parse.urlencode(clean) if clean else ""


def _create_body(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {"user": args.user, "name": args.name, "groups": args.group, "models": args.model}
    if args.tier:
        body["tier"] = args.tier
    if args.expires_in:
        body["expires_in"] = args.expires_in
    if args.request_limit is not None or args.token_limit is not None:
        body["limits"] = {"requests": args.request_limit, "tokens": args.token_limit, "window": args.window}
    return body


def _run(args: argparse.Namespace, base: str, token: str) -> tuple[Any, str]:
    """(the API's JSON, its table rendering)."""
    action = args.action
    if action == "create":
        out = _call(base, token, "POST", "/admin/v1/keys", _create_body(args))
        note = "\n\nThe key is shown only now; store it safely:\n" + out["key"]
        return out, _table([out], KEY_COLUMNS) + note
    if action == "list":
        query = {"user": args.user, "tier": args.tier, "status": args.status, "limit": args.limit}
        rows: list[dict[str, Any]] = []
        while True:
            page = _call(base, token, "GET", "/admin/v1/keys" + _query(query))
            rows += page["data"]
            if not (args.all and page["has_more"]):
                break
            query["cursor"] = page["next_cursor"]
        more = "" if args.all or not page["has_more"] else "\n(more: use --all)"
        listing = {"object": "list", "data": rows, "has_more": page["has_more"], "next_cursor": page.get("next_cursor")}
        return listing, _table(rows, KEY_COLUMNS) + more
    if action in ("show", "revoke"):
        method = "GET" if action == "show" else "DELETE"
        out = _call(base, token, method, f"/admin/v1/keys/{urllib.parse.quote(args.key_id)}")
        return out, "\n".join(f"{k}: {_plain(v)}" for k, v in out.items())
    if action == "rotate":
        path = f"/admin/v1/keys/{urllib.parse.quote(args.key_id)}/rotate"
        out = _call(base, token, "POST", path, {"grace_period": args.grace_period})
        text = f"new key_id: {out['key_id']}\nold key works until: {out['grace_period_ends_at']}\n"
        return out, text + "\nThe new key is shown only now; store it safely:\n" + out["key"]
    values = {
        "key_id": args.key_id,
        "user": args.user,
        "tier": args.tier,
        "model": args.model,
        "from": getattr(args, "from"),
        "to": args.to,
        "group_by": args.group_by,
    }
    out = _call(base, token, "GET", "/admin/v1/usage" + _query(values))
    groups = {"key_id" if g == "key" else g for g in out.get("group_by", [])}
    columns = [c for c in USAGE_COLUMNS if c in groups or c not in USAGE_GROUPS]
    # grouped: a TOTAL row under the groups; not grouped, the total is the one row (zeros when nothing was used)
    rows = [*out["data"], {**out["total"], columns[0]: "TOTAL"}] if groups else [out["total"]]
    text = _table(rows, columns)
    return out, f"usage {out['from']} .. {out['to']}\n{text}"


def _usage_error(args: argparse.Namespace) -> str | None:
    if args.action == "create" and args.window and args.request_limit is None and args.token_limit is None:
        return "--window is the window of --request-limit and --token-limit; give one of them with it"
    return None


def _print(text: str) -> int:
    """Print to stdout: 0, or the exit code of a write that failed (its reader went away: | head; or a full disk),
    stdout then dropped."""
    try:
        print(text)
        sys.stdout.flush()
    except OSError as exc:
        # without a stdout to write to, the interpreter's own flush at exit would fail again, loudly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        if isinstance(exc, BrokenPipeError):
            return EXIT_BROKEN_PIPE
        print(f"maas keys: cannot write the output: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_OUTPUT_FAILED
    return 0


def run(args: argparse.Namespace) -> int:
    problem = _usage_error(args)
    if problem is not None:
        print(f"maas keys {args.action}: {problem}", file=sys.stderr)
        return 2
    settings = KeysSettings()
    base = args.url or settings.admin_url
    # a Secret or file written with echo ends in a newline; no token holds whitespace (the token file splits on it)
    token = settings.admin_token.get_secret_value().strip()
    problem = _url_problem(base)
    if problem is not None:
        print(f"maas keys: {problem} (--url / MAAS_ADMIN_URL)", file=sys.stderr)
        return 2
    problem = _token_problem(token)
    if problem is not None:
        print(f"maas keys: {problem}", file=sys.stderr)
        return 2
    try:
        out, text = _run(args, base, token)
    except ApiError as exc:
        print(f"maas keys: HTTP {exc.status}: {exc}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"maas keys: cannot reach the admin API at {base}: {exc}", file=sys.stderr)
        return 2
    except NotTheApi as exc:
        print(
            f"maas keys: {base} does not answer as the admin API ({exc}); check --url / MAAS_ADMIN_URL", file=sys.stderr
        )
        return 2
    failed = _print(json.dumps(out, indent=2) if args.output == "json" else text)
    if failed:
        if args.action in ("create", "rotate"):
            print(
                f"maas keys: key {out.get('key_id')} was issued but its output was lost; revoke it: "
                f"maas keys revoke {out.get('key_id')}",
                file=sys.stderr,
            )
        return failed
    if args.action in UNSYNCED and out.get("synced") is False:
        print(f"maas keys: warning: not synced yet: {UNSYNCED[args.action]}.", file=sys.stderr)
    return 0
