"""Helpers shared by the translators."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from controlplane.errors import TranslateError
from controlplane.kinds import Obj


def as_dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def spec(obj: Obj) -> dict[str, Any]:
    return as_dict(obj.get("spec"))


def parse_time(value: Any) -> float | None:
    """RFC 3339 (``2024-05-01T10:00:00Z``) or epoch seconds, as epoch seconds; None when absent or unreadable."""
    if value is None or value == "":
        return None
    if isinstance(value, int | float):
        return float(value)
    text = str(value).strip()
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


MAX_LIMIT = 10**15
"""The largest request or token limit taken (as the admin API's): bucket arithmetic and the rate-limit headers stay
exact below it (a limit of 10**23 had answered x-ratelimit-remaining-requests: -9223372036854775808)."""


def parse_int(value: Any, *, what: str, reason: str, maximum: int | None = None) -> int:
    try:
        number = int(str(value).strip())
    except ValueError as exc:
        raise TranslateError(f"{what} is not an integer: {value!r}", reason=reason) from exc
    if number < 0:
        raise TranslateError(f"{what} is negative: {value!r}", reason=reason)
    if maximum is not None and number > maximum:
        raise TranslateError(f"{what} is above {maximum}: {value!r}", reason=reason)
    return number


def csv(value: str | None) -> tuple[str, ...]:
    if not value:
        return ()
    return tuple(dict.fromkeys(part.strip() for part in value.split(",") if part.strip()))
