"""Logging setup: JSON lines with stable keys (or plain text), and a rate-limited logger for the hot path."""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from typing import Any

from aiohttp.http_exceptions import HttpProcessingError

_RESERVED = set(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RESERVED and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup(*, fmt: str = "json", level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.getLogger("aiohttp.server").addFilter(MalformedRequestFilter())


class MalformedRequestFilter(logging.Filter):
    """aiohttp logs a client's malformed HTTP (a 64 KiB header, bytes that are not HTTP) as an error with a
    traceback; it is the client's fault and already answered with a 4xx, so log one warning line instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.msg, record.args = "rejected malformed request (%s): %s", (exc.code, str(exc.message)[:200])
            record.exc_info = None
            record.exc_text = None
        return True


class RateLimitedLog:
    """Logs at most one line per ``interval`` seconds, with the number of lines suppressed since the last one."""

    def __init__(self, logger: logging.Logger, *, interval: float = 10.0) -> None:
        self._logger = logger
        self._interval = interval
        self._last = -math.inf  # the first line logs even within ``interval`` of boot (the monotonic clock's 0)
        self._suppressed = 0

    def warning(self, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last < self._interval:
            self._suppressed += 1
            return
        self._last = now
        suppressed, self._suppressed = self._suppressed, 0
        self._logger.warning(msg + " (%d similar suppressed)", *args, suppressed)
