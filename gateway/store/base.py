"""The store Protocol every data-path and control-plane component talks to."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Protocol, Self, TypeVar

from gateway.contract import Change, ChangeEvent, RecordKind
from gateway.errors import StoreError
from gateway.limits import BucketOp, BucketResult

RESERVATION_TTL_MS = 600_000
"""How long a reservation's marker lives after its last operation (what it took, whether it was released or
committed): a release made later than this after its reservation ran refunds nothing (the tokens come back as the
bucket refills), a reservation that reaches the store later than this after its release takes its tokens again, and
a commit made again later than this counts again."""
LEDGER_WRITE_TTL_SECONDS = 600
"""How long the marker of a ledger write that landed lives: the same write made again within it counts nothing.
Ten minutes, as a reservation's: every metered request leaves one (~150 bytes in Redis), so it is what a write whose
answer was lost can be made again in (``gateway.meter.accounting.UNCERTAIN_RETRY_SECONDS``), kept short enough for
Redis's memory (~90 MB at a sustained 1,000 requests/s)."""

BucketsDone = Callable[[list[list[BucketResult]] | None, BaseException | None], None]
"""Called once with every group's results, or with the error that failed the call (``GroupsFailed``: only some
groups failed, the others have their results)."""


class GroupsFailed(StoreError):
    """A bucket check of which some groups failed (in Redis Cluster, the node of their slot did not answer) and the
    others were checked: ``results`` holds every group's results (empty for a failed one), ``errors`` the failure of
    each failed group by its index."""

    def __init__(self, results: list[list[BucketResult]], errors: dict[int, BaseException]) -> None:
        first = next(iter(errors.values()))
        super().__init__(f"{len(errors)} of {len(results)} bucket groups failed: {first}")
        self.results = results
        self.errors = errors


T = TypeVar("T")


def outcome_into(future: asyncio.Future[list[T]]) -> Callable[[list[T] | None, BaseException | None], None]:
    """A results-or-error callback that settles ``future`` (once; a cancelled future stays cancelled)."""

    def done(results: list[T] | None, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(results or [])

    return done


_checks: set[asyncio.Task[None]] = set()
"""Bucket checks running as tasks (stores without a callback path): held here until done."""


def send_buckets(store: Store, groups: Sequence[Sequence[BucketOp]], done: BucketsDone) -> None:
    """Check ``groups`` and hand the outcome to ``done`` (exactly once): sent at once when the store can
    (``submit_buckets``), else ``check_buckets`` runs as a task."""
    if store.submit_buckets(groups, done):
        return

    async def check() -> None:
        try:
            results = await store.check_buckets(groups)
        except asyncio.CancelledError:
            done(None, StoreError("bucket check cancelled"))
            raise
        except Exception as exc:  # the caller must hear about the failure, whatever it is
            done(None, exc)
        else:
            done(results, None)

    task = asyncio.get_running_loop().create_task(check(), name="bucket-check")
    _checks.add(task)
    task.add_done_callback(_checks.discard)


def new_id() -> str:
    """A random id for one store operation that may be made more than once (16 characters, 96 bits)."""
    return secrets.token_urlsafe(12)


def send_reserve(store: Store, op: BucketOp, reservation: str, done: BucketsDone) -> None:
    """``send_buckets`` for a reservation: ``store.reserve`` of ``op`` under ``reservation``."""
    if store.submit_reserve(op, reservation, done):
        return

    async def check() -> None:
        try:
            result = await store.reserve(op, reservation)
        except asyncio.CancelledError:
            done(None, StoreError("reservation cancelled"))
            raise
        except Exception as exc:  # the caller must hear about the failure, whatever it is
            done(None, exc)
        else:
            done([[result]], None)

    task = asyncio.get_running_loop().create_task(check(), name="reserve")
    _checks.add(task)
    task.add_done_callback(_checks.discard)


@dataclass(frozen=True, slots=True)
class UsageDelta:
    """Add to the ledger of one key, model and day (``YYYYMMDD``, UTC). ``write_id`` makes the write idempotent:
    the store counts a row of a given id once, however often it is written (within ``LEDGER_WRITE_TTL_SECONDS``)."""

    key_id: str
    model: str
    day: str
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    write_id: str = field(default_factory=new_id, compare=False)

    @property
    def counts(self) -> bool:
        return bool(self.requests or self.prompt_tokens or self.completion_tokens)


class UsageNotWritten(StoreError):
    """A usage-ledger write that did not all land. ``unsent``: rows certainly not counted (they may be merged with
    others and written again); ``uncertain``: rows that may or may not have been counted (written again only with
    their own ``write_id``, which the store counts once); ``unindexed``: rows whose key is not known to be in its
    day's index (adding it again is harmless, and ``add_usage`` of a row with no counts does just that)."""

    def __init__(
        self,
        message: str,
        *,
        unsent: Sequence[UsageDelta] = (),
        uncertain: Sequence[UsageDelta] = (),
        unindexed: Sequence[UsageDelta] = (),
    ) -> None:
        super().__init__(message)
        self.unsent = list(unsent)
        self.uncertain = list(uncertain)
        self.unindexed = [UsageDelta(key_id=d.key_id, model=d.model, day=d.day) for d in unindexed]


@dataclass(frozen=True, slots=True)
class UsageRow:
    key_id: str
    model: str
    day: str
    requests: int
    prompt_tokens: int
    completion_tokens: int


class Subscription(Protocol):
    """Change events, from the moment the subscription was entered. Iteration raises ``StoreError`` when the
    connection is lost; events published meanwhile are gone, so the consumer must reload."""

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...

    def __aiter__(self) -> AsyncIterator[ChangeEvent]: ...


class Store(Protocol):
    async def ping(self) -> None: ...

    async def close(self) -> None: ...

    # configuration records
    async def generation(self) -> int: ...

    def scan_records(self, kind: RecordKind, *, batch: int = 5000) -> AsyncIterator[list[tuple[str, bytes]]]: ...

    async def get_record(self, kind: RecordKind, ident: str) -> bytes | None: ...

    async def apply(self, changes: Sequence[Change]) -> int:
        """Write the changes, bump the generation, publish one change event; return the new generation."""
        ...

    def subscribe(self) -> Subscription: ...

    # buckets
    @property
    def sharded(self) -> bool:
        """True when keys' buckets live on several nodes that fail apart (Redis Cluster): see ``shard_of``."""
        ...

    def shard_of(self, key_id: str) -> str:
        """The node that holds ``key_id``'s buckets as far as the store knows ("" for a store of one node, or when
        it does not know): a failure of one node's checks says nothing of another's."""
        ...

    async def check_buckets(self, groups: Sequence[Sequence[BucketOp]]) -> list[list[BucketResult]]:
        """Each group is the buckets of one key, checked all-or-nothing; groups are independent (when only some fail,
        ``GroupsFailed`` carries the others' results)."""
        ...

    def submit_buckets(self, groups: Sequence[Sequence[BucketOp]], done: BucketsDone) -> bool:
        """``check_buckets`` without a coroutine: sent now, the outcome handed to ``done`` later. False when this
        store cannot do that right now (nothing was sent): call ``check_buckets`` instead."""
        ...

    async def reset_buckets(self, key_id: str, dimensions: Sequence[str]) -> None: ...

    # the meter's reservations: a RESERVE that runs at most once and can be released
    async def reserve(self, op: BucketOp, reservation: str) -> BucketResult:
        """``op`` (one ``RESERVE`` of one bucket) under the id ``reservation``: what it takes is recorded for a
        ``release``; after a release or the commit of the same id it takes nothing (it reached the store too late), and
        made again before either it answers what it took the first time (a client's retry after a broken
        connection)."""
        ...

    def submit_reserve(self, op: BucketOp, reservation: str, done: BucketsDone) -> bool:
        """``reserve`` without a coroutine (as ``submit_buckets``; ``done`` gets ``[[result]]``). False when nothing
        was sent: call ``reserve`` instead."""
        ...

    async def release(self, op: BucketOp, reservation: str) -> None:
        """Give back what the reservation ``reservation`` made with ``op`` took, once however often it is called,
        and keep it from taking anything if it has not run yet: for a reservation whose answer was lost. Made again
        until the store answers (it is idempotent)."""
        ...

    async def commit(self, op: BucketOp, reservation: str) -> None:
        """``op`` (a ``FORCE``: the real usage less what was reserved) once per reservation id, however often it is
        called: for a commit whose answer was lost."""
        ...

    # usage ledger
    async def add_usage(self, deltas: Sequence[UsageDelta]) -> None:
        """Add the deltas to the ledger and their keys to their days' index. Raises ``UsageNotWritten`` for what did
        not land when that is known (``StoreNotSent``: none of it did; another ``StoreError``: it may have)."""
        ...

    async def read_usage(self, key_id: str, days: Sequence[str]) -> list[UsageRow]: ...

    async def usage_key_ids(self, day: str) -> list[str]:
        """The key ids with usage on ``day`` (``YYYYMMDD``), sorted."""
        ...
