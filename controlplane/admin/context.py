"""What every admin handler needs, held by the aiohttp application, and the request parsing they share."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from controlplane.admin.auth import Principal, TokenBook
from controlplane.admin.errors import (
    Conflict,
    InvalidDuration,
    InvalidJSON,
    InvalidRequest,
    PartialChange,
    PartialChangeConflict,
    SourceUnavailable,
    UndecodableBody,
    UnsupportedMediaType,
)
from controlplane.admin.state import AdminState
from controlplane.errors import ConflictError, SourceError, ThrottledError
from controlplane.kinds import Kind, Obj
from controlplane.reflector import Backoff
from controlplane.sources.base import Source
from gateway.contract import TierRecord, WindowError, parse_window

log = logging.getLogger("maas.controlplane.admin")

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")

MAX_BODY_BYTES = 64 * 1024
_DURATION = re.compile(r"(?:[0-9]+(?:ms|s|m|h|d))+")
"""The documented grammar, which Kuadrant reads too: ASCII digits, no spaces (``parse_window``, which also reads
what the cluster holds, takes any digits and spaces)."""
_ZERO = re.compile(r"0+(?:ms|s|m|h|d)?")


WRITE_ATTEMPTS = 5
"""Read-modify-write attempts of one admin change when the object keeps changing under it (another replica)."""
CONFLICT_WAIT = 0.05
"""Seconds before the first start-over of a change that lost a race; each next wait doubles, and each is drawn
between half and all of its value: at most 0.05 + 0.1 + 0.2 + 0.4 = 0.75 s over ``WRITE_ATTEMPTS``."""


class Locks:
    """One lock per name, alive while someone holds or waits for it: an admin change reads an object, edits it and
    writes it back under its lock, so two changes to one object in this replica never overwrite each other (across
    replicas the write carries the resourceVersion it read, and a conflict starts the change over)."""

    def __init__(self) -> None:
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()

    def __call__(self, name: str) -> asyncio.Lock:
        lock = self._locks.get(name)
        if lock is None:
            lock = self._locks[name] = asyncio.Lock()
        return lock


@dataclass(frozen=True, slots=True)
class AdminContext:
    state: AdminState
    source: Source
    tokens: TokenBook
    pepper: bytes
    identity_secret: bytes | None
    key_namespace: str
    tier_namespace: Callable[[], str]
    tier_configmap: str
    tier_limits_configmap: str
    write_timeout: float
    window_borrowers: Callable[[TierRecord], list[str]]
    """Key ids of the active keys that take a limit's window from their tier and would find none were this tier
    written (the sync path's view of the Secrets)."""
    now: Callable[[], float] = time.time
    """Now on Redis's clock as this process knows it (``ClockOffset.now``): the clock key expiry, identity stamps,
    the buckets and the ledger's days are all judged by, whatever each node's own clock says."""
    locks: Locks = field(default_factory=Locks)
    changes: set[asyncio.Future[None]] = field(default_factory=set)
    """One future per write request in flight, done when its handler has ended (``finish_undoing`` waits for
    them)."""
    undoing: set[asyncio.Future[None]] = field(default_factory=set)
    """Undos of half-done changes whose request was cancelled, still running: the server waits for them when it
    stops (``finish_undoing``)."""


ADMIN = web.AppKey("admin", AdminContext)
PRINCIPAL = web.RequestKey("maas_admin_principal", Principal)


def context(request: web.Request) -> AdminContext:
    return request.app[ADMIN]


def principal(request: web.Request) -> Principal:
    return request[PRINCIPAL]


async def read_body(request: web.Request, model: type[M], *, optional: bool = False) -> M:
    """The JSON body as ``model``: 415 unless JSON, 400 ``invalid_json`` or ``invalid_request``; 413 above the cap
    (aiohttp enforces ``client_max_size``, decompressed)."""
    try:
        raw = await request.read()
    except web.RequestPayloadError as exc:  # a gzip or deflate body that does not decompress, broken chunking
        # the rest of the body is not read (aiohttp would read on to reuse the connection, and fail, logging a
        # traceback): the answer closes the connection instead
        request.content.feed_eof()
        encoding = request.headers.get("content-encoding")
        what = f"decompressed (Content-Encoding: {encoding})" if encoding else "read"
        raise UndecodableBody(f"The body cannot be {what}.") from exc
    if not raw.strip() and optional:
        return model()
    if request.content_type != "application/json":
        raise UnsupportedMediaType("Send the body as JSON with 'Content-Type: application/json'.")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidJSON(f"The body is not valid JSON: {exc}") from exc
    except RecursionError:
        raise InvalidJSON("The body is nested too deeply.") from None
    if not isinstance(data, dict):
        raise InvalidJSON("The body must be a JSON object.")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from exc


def validation_error(exc: ValidationError) -> InvalidRequest:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or None
    if first["type"] == "extra_forbidden":
        return InvalidRequest(f"Unknown field '{where}'.", param=where)
    return InvalidRequest(f"Invalid value for '{where}': {first['msg']}.", param=where)


def check_query(request: web.Request, allowed: Iterable[str]) -> None:
    known = set(allowed)
    for name in request.query:
        if name not in known:
            raise InvalidRequest(f"Unknown query parameter '{name}'.", param=name)
    for name in known:
        if len(request.query.getall(name, [])) > 1:
            raise InvalidRequest(f"Query parameter '{name}' given more than once.", param=name)


def duration_seconds(text: str, *, param: str, allow_zero: bool = False) -> float:
    if allow_zero and _ZERO.fullmatch(text):
        return 0.0
    try:
        if _DURATION.fullmatch(text) is None:
            raise WindowError(f"invalid duration {text!r}")
        return parse_window(text) / 1000.0
    except WindowError as exc:
        advice = "it must be between 1ms and 366d" if exc.out_of_range else "use a number and a unit, like '30d'"
        raise InvalidDuration(f"Invalid duration {text!r} for '{param}': {advice}.", param=param) from exc


def epoch_of(moment: datetime) -> float:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def expiry(expires_in: str | None, expires_at: datetime | None, *, now: float | None = None) -> float | None:
    """Absolute expiry from ``expires_in`` (a duration) or ``expires_at`` (a time); at most one may be given."""
    if expires_in is not None and expires_at is not None:
        raise InvalidRequest("Give either 'expires_in' or 'expires_at', not both.", param="expires_in")
    now = time.time() if now is None else now
    if expires_in is not None:
        return now + duration_seconds(expires_in, param="expires_in")
    if expires_at is not None:
        try:
            epoch = epoch_of(expires_at)
        except (OverflowError, ValueError, OSError) as exc:
            raise InvalidRequest("'expires_at' is out of range.", param="expires_at") from exc
        if rfc3339(epoch) is None:  # 9999-12-31T23:59:59-12:00 is in year 10000 in UTC, which no stamp can hold
            raise InvalidRequest("'expires_at' is out of range (after 9999-12-31 in UTC).", param="expires_at")
        return epoch
    return None


def rfc3339(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    try:
        return datetime.fromtimestamp(epoch, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, ValueError, OSError):
        return None


def json_model(model: BaseModel, *, status: int = 200) -> web.Response:
    return web.json_response(text=model.model_dump_json(by_alias=True), status=status)


async def retry_conflicts(
    change: Callable[[int], Awaitable[T]],
    *,
    what: str,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> T:
    """Run ``change`` (given its attempt number, from 0) until it does not lose a race (``ConflictError``), at most
    ``WRITE_ATTEMPTS`` times. Each start-over waits a jittered, doubling pause: writers that collided (replicas, a
    ``kubectl edit``) would collide again if they read and wrote back at once. A race lost every time is 409
    ``conflict`` (``what`` kept changing); any other failure of the cluster store is 503."""
    backoff = Backoff(base=CONFLICT_WAIT, cap=CONFLICT_WAIT * 2 ** (WRITE_ATTEMPTS - 2))
    attempt = 0
    while True:
        try:
            return await change(attempt)
        except ConflictError as exc:
            attempt += 1
            if attempt == WRITE_ATTEMPTS:
                raise Conflict(
                    f"{what} kept changing while this change was written ({WRITE_ATTEMPTS} attempts); retry: {exc}"
                ) from exc
        except SourceError as exc:
            raise source_failed(exc) from exc
        wait = backoff.next()
        log.info(
            "%s changed under this change (attempt %d of %d); starting over in %.3fs",
            what,
            attempt,
            WRITE_ATTEMPTS,
            wait,
        )
        await sleep(wait)


def source_failed(exc: SourceError) -> SourceUnavailable:
    if isinstance(exc, ThrottledError):  # the API server's own advice, for the caller's retry
        return SourceUnavailable(
            f"The cluster's API server is throttling this control plane; retry later: {exc}",
            headers={"Retry-After": str(max(1, math.ceil(exc.retry_after)))},
        )
    return SourceUnavailable(f"The cluster store did not accept the change: {exc}")


def undo_failed(exc: SourceError, describe: Callable[[str], str]) -> PartialChange | PartialChangeConflict:
    """The answer to a change of two objects left half done because taking the written one back failed with
    ``exc``: 409 when another writer has changed it since (its version is kept), 503 when the API server failed.
    ``describe`` turns why the undo was not possible into the message (what each object holds, what to do), which
    is also logged at error level: an operator has to act on it."""
    conflict = isinstance(exc, ConflictError)
    why = "another writer has changed it since, and its version was kept" if conflict else f"that failed ({exc})"
    message = describe(why)
    log.error("%s", message)
    return PartialChangeConflict(message) if conflict else PartialChange(message)


async def landed(ctx: AdminContext, kind: Kind, namespace: str, name: str, holds: Callable[[Obj], bool]) -> Obj | None:
    """The object as it now stands when a write to it that failed (its answer lost: a timeout, a 5xx after serving)
    was applied all the same, as ``holds`` tells from its content; None when it holds something else, is gone, or
    cannot be read to tell."""
    try:
        now = await ctx.source.get(kind, namespace, name)
    except SourceError:
        return None
    return now if now is not None and holds(now) else None
