"""Named background tasks whose failure is logged at once (not when someone finally awaits them)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

_TASKS: set[asyncio.Task[Any]] = set()


def _done(task: asyncio.Task[Any], log: logging.Logger) -> None:
    _TASKS.discard(task)
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        log.error("task %s failed: %s", task.get_name(), exc, exc_info=exc)


def spawn(coro: Coroutine[Any, Any, Any], *, name: str, log: logging.Logger) -> asyncio.Task[Any]:
    task = asyncio.create_task(coro, name=name)
    _TASKS.add(task)
    task.add_done_callback(lambda t: _done(t, log))
    return task
