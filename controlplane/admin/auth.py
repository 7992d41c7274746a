"""Admin bearer tokens: the token file, its reload on change, the constant-time check, and the audit log.

Token file format (``--admin-token-file``, ``MAAS_ADMIN_TOKEN_FILE``): one token a line, blank lines and ``#``
comments ignored (a comment starts at a ``#`` that begins a line or follows a space or tab, so a trailing comment
is fine and a token may hold a ``#``). A line is ``<token>`` (an admin token), ``<role> <token>`` or
``<role> <name> <token>``, where role is ``admin`` (read and write) or ``read-only`` (``GET`` only) and name is what
the audit log calls the token (default ``<role>-<line number>``). Tokens must be at least 16 characters. The file is
re-read when its modification time or size changes (checked at most once a second), so a rotated Kubernetes Secret
applies without a restart; a file that fails to parse keeps the previous tokens and logs an error, and a file that
is gone revokes every token.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import time
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from controlplane.admin.errors import InvalidToken, MissingToken, ReadOnlyToken

log = logging.getLogger("maas.controlplane.admin")
audit_log = logging.getLogger("maas.audit")

DEV_ADMIN_TOKEN = "maas-dev-admin-token"
MIN_TOKEN_LENGTH = 16
MAX_TOKEN_FILE_BYTES = 1 << 20
RELOAD_CHECK_SECONDS = 1.0
_COMMENT = re.compile(r"(?:^|[ \t])#.*")


class Role(StrEnum):
    ADMIN = "admin"
    READ_ONLY = "read-only"


_ROLES = {"admin": Role.ADMIN, "read-only": Role.READ_ONLY, "readonly": Role.READ_ONLY, "read_only": Role.READ_ONLY}


@dataclass(frozen=True, slots=True)
class Principal:
    name: str
    role: Role


@dataclass(frozen=True, slots=True)
class _Token:
    digest: bytes
    principal: Principal


class TokenFileError(ValueError):
    """A token file line that is not ``[<role> [<name>]] <token>``."""


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


def parse_tokens(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = _COMMENT.sub("", raw, count=1).strip()
        if not line:
            continue
        fields = line.split()
        if len(fields) > 3:
            raise TokenFileError(f"line {number}: expected '[<role> [<name>]] <token>'")
        role = Role.ADMIN
        if len(fields) > 1:
            found = _ROLES.get(fields[0].lower())
            if found is None:
                raise TokenFileError(f"line {number}: unknown role {fields[0]!r} (use admin or read-only)")
            role = found
        name = fields[1] if len(fields) == 3 else f"{role.value}-{number}"
        token = fields[-1]
        if len(token) < MIN_TOKEN_LENGTH:
            raise TokenFileError(f"line {number}: token shorter than {MIN_TOKEN_LENGTH} characters")
        tokens.append(_Token(digest=_digest(token), principal=Principal(name=name, role=role)))
    return tokens


class TokenBook:
    """The accepted tokens. ``check`` compares the presented token against every token in constant time."""

    def __init__(self, *, path: str | None, dev: bool) -> None:
        self._path = Path(path) if path else None
        self._signature: tuple[int, int] | None = None
        self._checked = 0.0
        self._tokens: list[_Token] = []
        if self._path is None:
            if dev:
                log.warning(
                    "DEVELOPMENT MODE: the admin API accepts the fixed token %r; never use in production",
                    DEV_ADMIN_TOKEN,
                )
                self._tokens = [_Token(_digest(DEV_ADMIN_TOKEN), Principal(name="dev-admin", role=Role.ADMIN))]
            else:
                log.warning("no --admin-token-file: the admin API refuses every request (self-service still works)")
        else:
            self._reload(force=True)

    def _reload(self, *, force: bool = False) -> None:
        assert self._path is not None
        try:
            stat = os.stat(self._path)
            signature = (stat.st_mtime_ns, stat.st_size)
            if not force and signature == self._signature:
                return
            if stat.st_size > MAX_TOKEN_FILE_BYTES:
                raise TokenFileError(f"larger than {MAX_TOKEN_FILE_BYTES} bytes")
            tokens = parse_tokens(self._path.read_text())
        except FileNotFoundError:
            self._gone(force=force)
            return
        except (OSError, UnicodeDecodeError, TokenFileError) as exc:
            log.error("cannot read admin token file %s: %s (keeping %d tokens)", self._path, exc, len(self._tokens))
            return
        self._signature = signature
        self._tokens = tokens
        log.info("admin tokens loaded", extra={"path": str(self._path), "tokens": len(tokens)})
        if stat.st_mode & 0o007:
            log.warning(
                "admin token file %s is readable by every user of this host (mode %o): make it 0600 or 0440",
                self._path,
                stat.st_mode & 0o777,
            )

    def _gone(self, *, force: bool) -> None:
        """No file: no token. Removing the file (or its key from the mounted Secret) is how every token is revoked
        at once, say after a leak; keeping the last ones loaded would leave a leaked token working until a restart.
        Logged once; a file put back is loaded whatever its modification time and size."""
        if force or self._signature is not None:
            log.error("admin token file %s is missing: the admin API refuses every call until it is back", self._path)
        self._signature = None
        self._tokens = []

    def maybe_reload(self, *, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if self._path is not None and now - self._checked >= RELOAD_CHECK_SECONDS:
            self._checked = now
            self._reload()

    def check(self, authorization: str | None, *, write: bool) -> Principal:
        """The principal of a ``Bearer`` token; MissingToken, InvalidToken or ReadOnlyToken otherwise."""
        self.maybe_reload()
        if not authorization:
            raise MissingToken(
                "No admin token provided. Send 'Authorization: Bearer <admin token>'.",
                headers={"www-authenticate": 'Bearer realm="maas-admin"'},
            )
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise InvalidToken(
                "Malformed admin credentials: expected 'Authorization: Bearer <admin token>'.",
                headers={"www-authenticate": 'Bearer realm="maas-admin"'},
            )
        presented = _digest(token.strip())
        found: Principal | None = None
        for candidate in self._tokens:
            if hmac.compare_digest(candidate.digest, presented):
                found = candidate.principal
        if found is None:
            raise InvalidToken("Incorrect admin token.", headers={"www-authenticate": 'Bearer realm="maas-admin"'})
        if write and found.role is not Role.ADMIN:
            raise ReadOnlyToken("This admin token is read-only; changes need an admin token.")
        return found


def audit(principal: Principal, action: str, **fields: object) -> None:
    """One line per mutation: who (token name and role), what, and on which key or tier; never a plaintext key."""
    details = " ".join(f"{k}={v}" for k, v in fields.items() if v is not None)
    audit_log.info(
        "audit: %s by %s (%s) %s",
        action,
        principal.name,
        principal.role.value,
        details,
        extra={"who": principal.name, "role": principal.role.value, "action": action, **fields},
    )
