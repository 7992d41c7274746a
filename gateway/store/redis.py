"""Redis store: redis-py asyncio (hiredis parser), one connection pool, Lua scripts by EVALSHA with a NOSCRIPT
fallback, a timeout on every call. Works against a single Redis and against Redis Cluster (``redis+cluster://``,
one or more seed nodes: ``redis+cluster://host1:6379,host2:6379/0``).

Only this module touches ``redis.exceptions``; everything leaves it as ``StoreError``/``StoreTimeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from importlib import resources
from types import TracebackType
from typing import Any, Self, TypeVar
from urllib.parse import urlsplit

import redis.asyncio as aioredis
import redis.exceptions as rexc
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot

from gateway import contract
from gateway.contract import Change, ChangeEvent, RecordKind
from gateway.errors import StoreError, StoreNotSent, StoreTimeout
from gateway.limits import BucketOp, BucketResult
from gateway.store.base import (
    LEDGER_WRITE_TTL_SECONDS,
    RESERVATION_TTL_MS,
    BucketsDone,
    GroupsFailed,
    UsageDelta,
    UsageNotWritten,
    UsageRow,
    outcome_into,
)
from gateway.store.resp import NoScript, RespPipe, bulk, command
from gateway.store.urls import node_url, seed_urls

T = TypeVar("T")

APPLY_SCRIPT = """
local hashes = {key = KEYS[1], tier = KEYS[2], model = KEYS[3], route = KEYS[4]}
local changes = cjson.decode(ARGV[1])
for _, c in ipairs(changes) do
  local h = hashes[c.kind]
  if not h then return redis.error_reply('unknown record kind ' .. tostring(c.kind)) end
  if c.value == cjson.null or c.value == nil then
    redis.call('HDEL', h, c.id)
  else
    redis.call('HSET', h, c.id, c.value)
  end
end
local gen = redis.call('INCR', KEYS[5])
redis.call('PUBLISH', ARGV[2], '{"v":' .. ARGV[3] .. ',"gen":' .. gen .. ',"changes":' .. ARGV[1] .. '}')
return gen
"""

BUCKET_SCRIPT = resources.files("gateway.store").joinpath("buckets.lua").read_text()
RESERVE_SCRIPT = (
    resources.files("gateway.store").joinpath("reserve.lua").read_text().replace("--BUCKETS--", BUCKET_SCRIPT)
)
LEDGER_SCRIPT = resources.files("gateway.store").joinpath("ledger.lua").read_text()

_COUNTS = tuple(b"%d" % i for i in range(16))
APPLY_CHUNK = 500
SCAN_PAGE_TIMEOUT = 10.0
"""Seconds one page of a full load's scan may take. The store's timeout (250 ms by default) is for the request path;
a page is read while the caller decodes the one before it, and with the machine busy that took over 250 ms: the
load (a million keys, ~10 s) started again from the beginning."""
SINGLE_PAYLOADS = 10_000
USAGE_TTL_SECONDS = 400 * 86400
_ERRORS = (rexc.RedisError, rexc.RedisClusterException, OSError)
_REFUSED = (
    rexc.AuthenticationError,  # the connection's setup was refused: nothing after it ran
    rexc.AuthorizationError,
    rexc.MaxConnectionsError,
    rexc.MaxClientsReachedError,
    rexc.BusyLoadingError,
    rexc.ClusterDownError,  # and MASTERDOWN
    rexc.TryAgainError,
    rexc.SlotNotCoveredError,
    rexc.OutOfMemoryError,  # a write Redis rejected before running it
    rexc.ReadOnlyError,
)
"""redis-py's errors that say the command was certainly not run (they become ``StoreNotSent``)."""


class _Script:
    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()
        self.sha_bulk = bulk(self.sha.encode())


class _RedisSubscription:
    """Pub/sub on a connection of its own, with no automatic reconnect: a lost connection must surface so the
    consumer reloads (events published while it was away are gone). Entering tries ``urls`` in turn and keeps the
    first that subscribes: in a cluster every node carries every event, so any node that answers will do."""

    def __init__(
        self, urls: Sequence[str], *, timeout: float, on_subscribed: Callable[[str], None] | None = None
    ) -> None:
        self._urls = urls
        self._timeout = timeout
        self._on_subscribed = on_subscribed
        self._idle_ping = 5.0
        self._client: aioredis.Redis | None = None
        self._pubsub: Any = None

    async def __aenter__(self) -> Self:
        failures: list[str] = []
        timed_out = 0
        for url in self._urls:
            client = aioredis.Redis.from_url(url, retry=Retry(NoBackoff(), 0))
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                async with asyncio.timeout(max(self._timeout, 1.0)):
                    await pubsub.subscribe(contract.EVENTS_CHANNEL)
            except TimeoutError:
                timed_out += 1
                failures.append(f"{_where(url)}: timed out")
            except _ERRORS as exc:
                failures.append(f"{_where(url)}: {exc}")
            else:
                self._client, self._pubsub = client, pubsub
                if self._on_subscribed is not None:
                    self._on_subscribed(url)
                return self
            await _close_pubsub(client, pubsub)
        if timed_out == len(self._urls):
            raise StoreTimeout(f"timed out subscribing to change events ({'; '.join(failures)})")
        raise StoreError(f"cannot subscribe to change events: {'; '.join(failures)}")

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._client is not None:
            await _close_pubsub(self._client, self._pubsub)
            self._client = self._pubsub = None

    def __aiter__(self) -> AsyncIterator[ChangeEvent]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[ChangeEvent]:
        pubsub = self._pubsub
        if pubsub is None:
            raise StoreError("the change-event subscription is not entered")
        idle_since = time.monotonic()
        task = asyncio.current_task()
        while True:
            if task is not None and task.cancelling():
                # a cancel that redis-py's own read timeout swallowed (a cancel landing as that timeout expires,
                # CPython 3.11): without this the consumer would not stop until its stopper gave up waiting
                raise asyncio.CancelledError
            try:
                message = await pubsub.get_message(timeout=1.0)
                if message is None:
                    if time.monotonic() - idle_since > self._idle_ping:
                        async with asyncio.timeout(max(self._timeout, 1.0)):
                            await pubsub.ping()
                        idle_since = time.monotonic()
                    continue
            except TimeoutError as exc:
                raise StoreTimeout("change-event connection stopped answering") from exc
            except _ERRORS as exc:
                raise StoreError(f"change-event connection lost: {exc}") from exc
            idle_since = time.monotonic()
            if message.get("type") != "message":
                continue
            yield contract.decode_event(message["data"])


async def _close_pubsub(client: aioredis.Redis, pubsub: Any) -> None:
    with contextlib.suppress(*_ERRORS):
        await pubsub.aclose()
    with contextlib.suppress(*_ERRORS):
        await client.aclose()


def _where(url: str) -> str:
    parts = urlsplit(url)
    return parts.path if parts.scheme == "unix" else f"{parts.hostname}:{parts.port}"


def _with_node(url: str, host: str, port: int) -> str:
    """``url`` pointing at another node: the same credentials, database and options."""
    return node_url(url, f"[{host}]:{port}" if ":" in host else f"{host}:{port}")


def _seed_node(url: str) -> ClusterNode:
    params = parse_url(url)
    return ClusterNode(str(params.get("host", "127.0.0.1")), int(params.get("port", 6379)))


class RedisStore:
    def __init__(self, url: str, *, timeout: float = 0.25, max_connections: int = 64) -> None:
        self._timeout = timeout
        self.cluster = "+cluster://" in url
        url = url.replace("+cluster://", "://")
        self._seeds = seed_urls(url) if self.cluster else [url]
        """One URL per seed node of a cluster (the URL's node list), else the URL itself."""
        self._url = self._seeds[0]
        self._seed_names = ", ".join(_where(seed) for seed in self._seeds) if self.cluster else ""
        common: dict[str, Any] = {
            # No socket_timeout: redis-py would wrap every read in asyncio.wait_for (a task per read); every call
            # here is bounded by asyncio.timeout in _call instead, and a cancelled read drops its connection.
            "socket_timeout": None,
            "socket_connect_timeout": max(timeout, 0.05) * 4,
            "retry": Retry(NoBackoff(), 1),
        }
        self._client: Any
        if self.cluster:
            # every seed, so the client starts from any one that answers (it tries them all, in random order)
            seeds = [_seed_node(seed) for seed in self._seeds]
            self._client = RedisCluster.from_url(
                self._url, startup_nodes=seeds, max_connections=max_connections, **common
            )
        else:
            self._client = aioredis.Redis.from_url(self._url, max_connections=max_connections, **common)
        self._apply = _Script(APPLY_SCRIPT)
        self._buckets = _Script(BUCKET_SCRIPT)
        self._reserve = _Script(RESERVE_SCRIPT)
        self._ledger = _Script(LEDGER_SCRIPT)
        self._pipe: RespPipe | None = None
        if not self.cluster and self._url.startswith(("redis://", "rediss://", "unix://")):
            params = parse_url(self._url)
            self._pipe = RespPipe(
                host=str(params.get("host", "127.0.0.1")),
                port=int(params.get("port", 6379)),
                path=params.get("path"),
                db=int(params.get("db", 0)),
                username=params.get("username"),
                password=params.get("password"),
                tls=tls_context(params) if self._url.startswith("rediss://") else None,
                timeout=timeout,
            )
        self._events_url = ""
        """In a cluster, the node the last change-event subscription was made on (tried first next time)."""
        self._fallbacks: set[asyncio.Task[None]] = set()
        self._single: dict[int, tuple[Sequence[BucketOp], bytes]] = {}
        """EVALSHA commands of single-group batches by the identity of their ops (held, so the id stays theirs)."""

    async def _call(self, what: str, make: Callable[[], Awaitable[T]], *, seconds: float | None = None) -> T:
        """``make()`` within ``seconds`` (the store's timeout unless given)."""
        limit = self._timeout if seconds is None else seconds
        try:
            async with asyncio.timeout(limit):
                return await make()
        except TimeoutError as exc:
            raise StoreTimeout(f"redis {what} timed out after {limit:g}s") from exc
        except _ERRORS as exc:
            raise _store_error(what, exc, seeds=self._seed_names) from exc

    async def _evalsha(self, script: _Script, keys: Sequence[str | bytes], args: Sequence[Any]) -> Any:
        try:
            return await self._client.evalsha(script.sha, len(keys), *keys, *args)
        except rexc.NoScriptError:
            return await self._client.eval(script.source, len(keys), *keys, *args)

    async def ping(self) -> None:
        await self._call("ping", self._client.ping)

    async def server_time(self) -> float:
        """Redis's clock (``TIME``), in seconds since the epoch: the one clock every part shares. In a cluster, the
        client's default node's (the nodes' clocks are kept in step like any other servers')."""
        seconds, micros = await self._call("time", self._client.time)
        return int(seconds) + int(micros) / 1e6

    async def close(self) -> None:
        if self._pipe is not None:
            await self._pipe.close()
        with contextlib.suppress(*_ERRORS):
            await self._client.aclose()

    async def generation(self) -> int:
        value = await self._call("get generation", lambda: self._client.get(contract.GENERATION_KEY))
        return int(value or 0)

    async def scan_records(self, kind: RecordKind, *, batch: int = 5000) -> AsyncIterator[list[tuple[str, bytes]]]:
        """Pages of HSCAN, each next page asked for before this one is handed over: Redis finds and sends it while
        the caller decodes this one (a million keys: ~200 pages). A page has ``SCAN_PAGE_TIMEOUT``, not the store's
        timeout: its ~2 MB are read in the loop turns the caller's decoding leaves, and one page timed out restarts
        the whole load."""
        name = contract.KIND_HASHES[kind]

        def fetch(cursor: int) -> asyncio.Future[tuple[int, dict[bytes, bytes]]]:
            return asyncio.ensure_future(
                self._call(
                    "hscan",
                    lambda: self._client.hscan(name, cursor=cursor, count=batch),
                    seconds=max(self._timeout, SCAN_PAGE_TIMEOUT),
                )
            )

        pending = fetch(0)
        try:
            while True:
                cursor, items = await pending
                if cursor != 0:
                    pending = fetch(cursor)
                    await asyncio.sleep(0)  # one loop turn puts the request on the wire
                if items:
                    yield [(k.decode(), v) for k, v in items.items()]
                if cursor == 0:
                    return
        finally:
            if not pending.done():
                pending.cancel()

    async def get_record(self, kind: RecordKind, ident: str) -> bytes | None:
        value = await self._call("hget", lambda: self._client.hget(contract.KIND_HASHES[kind], ident))
        return value if value is None else bytes(value)

    async def apply(self, changes: Sequence[Change]) -> int:
        keys = [*(contract.KIND_HASHES[k] for k in RecordKind), contract.GENERATION_KEY]
        gen = 0
        chunks = [changes[i : i + APPLY_CHUNK] for i in range(0, len(changes), APPLY_CHUNK)] or [[]]
        for chunk in chunks:
            payload = contract.encode_changes(chunk)
            args = (payload, contract.EVENTS_CHANNEL, contract.SCHEMA_VERSION)
            gen = int(await self._call("apply", lambda a=args: self._evalsha(self._apply, keys, a)))  # type: ignore[misc]
        return gen

    def subscribe(self) -> _RedisSubscription:
        if not self.cluster:
            return _RedisSubscription([self._url], timeout=self._timeout)
        return _RedisSubscription(self._event_urls(), timeout=self._timeout, on_subscribed=self._subscribed_at)

    def _event_urls(self) -> list[str]:
        """Where to subscribe in a cluster, where PUBLISH reaches every node: the node that served last, the URL's
        seeds, then every other node the cluster client knows (so the events survive the failure of any one node,
        and a process starts while a seed is down)."""
        urls = dict.fromkeys([self._events_url, *self._seeds])
        for node in self._client.get_nodes():
            urls[_with_node(self._url, node.host, node.port)] = None
        return [url for url in urls if url]

    def _subscribed_at(self, url: str) -> None:
        self._events_url = url

    async def check_buckets(self, groups: Sequence[Sequence[BucketOp]]) -> list[list[BucketResult]]:
        if not groups:
            return []
        future: asyncio.Future[list[list[BucketResult]]] = asyncio.get_running_loop().create_future()
        if self.submit_buckets(groups, outcome_into(future)):
            return await future
        if self.cluster:
            return await self._check_cluster(groups)
        return _results(groups, await self._call("buckets", lambda: self._run_buckets(groups)))

    def submit_buckets(self, groups: Sequence[Sequence[BucketOp]], done: BucketsDone) -> bool:
        """The bucket script sent on the connected RESP pipe now, its results handed to ``done`` in the loop turn
        the reply arrives in (a timeout or a lost connection arrives the same way, as the error). False when the
        pipe is not connected yet or this is Redis Cluster: use ``check_buckets``."""
        pipe = self._pipe
        if pipe is None or pipe.current is None or not groups:
            return False

        def reply(flat: Any, error: StoreError | None) -> None:
            if isinstance(error, NoScript):
                # the script is gone (Redis restarted or was flushed): the slow path loads it and retries
                task = asyncio.get_running_loop().create_task(self._reload_and_check(groups, done))
                self._fallbacks.add(task)
                task.add_done_callback(self._fallbacks.discard)
                return
            if error is None:
                try:
                    results = _results(groups, flat)
                except StoreError as exc:  # never leave a caller without an answer
                    error = exc
                else:
                    done(results, None)
                    return
            done(None, error)

        if len(groups) == 1:  # a lone check (low load): its ops are memoised by the caller, so is their command
            ops = groups[0]
            held = self._single.get(id(ops))
            if held is not None and held[0] is ops:
                payload = held[1]
            else:
                if len(self._single) >= SINGLE_PAYLOADS:
                    self._single.clear()
                payload = self._encode_buckets(groups)
                self._single[id(ops)] = (ops, payload)
        else:
            payload = self._encode_buckets(groups)
        return pipe.send(payload, [reply], "buckets")

    async def _reload_and_check(self, groups: Sequence[Sequence[BucketOp]], done: BucketsDone) -> None:
        try:
            results = _results(groups, await self._call("buckets", lambda: self._run_buckets(groups)))
        except StoreError as exc:
            done(None, exc)
        else:
            done(results, None)

    async def _run_buckets(self, groups: Sequence[Sequence[BucketOp]]) -> list[int]:
        if self._pipe is not None:
            return await self._run_buckets_resp(self._pipe, groups)
        return await self._run_buckets_redispy(groups)

    def _encode_buckets(self, groups: Sequence[Sequence[BucketOp]]) -> bytes:
        keys: list[bytes] = []
        args: list[bytes] = [bulk(b"%d" % len(groups))]
        for ops in groups:
            args.append(bulk(b"%d" % len(ops)))
            for op in ops:
                key, op_args = op.resp
                keys.append(key)
                args.append(op_args)
        n_args = 1 + sum(1 + len(ops) * 5 for ops in groups)
        head = b"*%d\r\n$7\r\nEVALSHA\r\n" % (3 + len(keys) + n_args) + self._buckets.sha_bulk + bulk(b"%d" % len(keys))
        return head + b"".join(keys) + b"".join(args)

    async def _run_buckets_resp(self, pipe: RespPipe, groups: Sequence[Sequence[BucketOp]]) -> list[int]:
        payload = self._encode_buckets(groups)
        try:
            result: list[int] = await pipe.call(payload, "buckets")
        except NoScript:
            await self._client.script_load(self._buckets.source)
            result = await pipe.call(payload, "buckets")
        return result

    async def _run_buckets_redispy(self, groups: Sequence[Sequence[BucketOp]]) -> list[int]:
        keys: list[bytes] = []
        args: list[bytes] = [b"%d" % len(groups)]
        for ops in groups:
            args.append(_COUNTS[len(ops)] if len(ops) < len(_COUNTS) else b"%d" % len(ops))
            for op in ops:
                key, wire = op.wire
                keys.append(key)
                args += wire
        result: list[int] = await self._evalsha(self._buckets, keys, args)
        return result

    async def _check_cluster(self, groups: Sequence[Sequence[BucketOp]]) -> list[list[BucketResult]]:
        """One script call per slot, each with its own deadline: a slot whose node fails fails only its groups."""
        by_slot: dict[int, list[int]] = {}
        for index, ops in enumerate(groups):
            by_slot.setdefault(key_slot(contract.bucket_key(ops[0].key_id, "").encode()), []).append(index)

        async def run(idx: list[int]) -> list[list[BucketResult]]:
            part = [groups[i] for i in idx]
            return _results(part, await self._call("buckets", lambda: self._run_buckets_redispy(part)))

        slots = list(by_slot.values())
        outcomes = await asyncio.gather(*(run(idx) for idx in slots), return_exceptions=True)
        out: list[list[BucketResult]] = [[] for _ in groups]
        errors: dict[int, BaseException] = {}
        for idx, outcome in zip(slots, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                if not isinstance(outcome, Exception):
                    raise outcome  # a cancel
                errors.update(dict.fromkeys(idx, outcome))
                continue
            for i, results in zip(idx, outcome, strict=True):
                out[i] = results
        if len(errors) == len(groups):
            raise next(iter(errors.values()))
        if errors:
            raise GroupsFailed(out, errors)
        return out

    @property
    def sharded(self) -> bool:
        return self.cluster

    def shard_of(self, key_id: str) -> str:
        return self._node_of(contract.bucket_key(key_id, "").encode()) if self.cluster else ""

    async def reserve(self, op: BucketOp, reservation: str) -> BucketResult:
        [[result]] = _results([[op]], await self._reservation(op, reservation, b"reserve"))
        return result

    def submit_reserve(self, op: BucketOp, reservation: str, done: BucketsDone) -> bool:
        """``reserve`` on the connected RESP pipe, as ``submit_buckets``."""
        pipe = self._pipe
        if pipe is None or pipe.current is None:
            return False
        keys, args = _reservation_call(op, reservation, b"reserve")

        def reply(flat: Any, error: StoreError | None) -> None:
            if isinstance(error, NoScript):  # not run: the slow path loads the script and makes it
                task = asyncio.get_running_loop().create_task(self._reserve_slowly(op, reservation, done))
                self._fallbacks.add(task)
                task.add_done_callback(self._fallbacks.discard)
                return
            if error is None:
                try:
                    results = _results([[op]], flat)
                except StoreError as exc:
                    error = exc
                else:
                    done(results, None)
                    return
            done(None, error)

        payload = command(b"EVALSHA", self._reserve.sha.encode(), b"2", *keys, *args)
        return pipe.send(payload, [reply], "reserve")

    async def _reserve_slowly(self, op: BucketOp, reservation: str, done: BucketsDone) -> None:
        try:
            result = await self.reserve(op, reservation)
        except StoreError as exc:
            done(None, exc)
        else:
            done([[result]], None)

    async def release(self, op: BucketOp, reservation: str) -> None:
        await self._reservation(op, reservation, b"release")

    async def commit(self, op: BucketOp, reservation: str) -> None:
        await self._reservation(op, reservation, b"commit")

    async def _reservation(self, op: BucketOp, reservation: str, action: bytes) -> Any:
        """The reservation script, on the RESP pipe when there is one (a commit per metered request)."""
        keys, args = _reservation_call(op, reservation, action)
        what, pipe = action.decode(), self._pipe
        if pipe is None:
            return await self._call(what, lambda: self._evalsha(self._reserve, keys, args))
        payload = command(b"EVALSHA", self._reserve.sha.encode(), b"2", *keys, *args)

        async def run() -> Any:
            try:
                return await pipe.call(payload, what)
            except NoScript:
                await self._client.script_load(self._reserve.source)
                return await pipe.call(payload, what)

        return await self._call(what, run)

    async def reset_buckets(self, key_id: str, dimensions: Sequence[str]) -> None:
        names = [contract.bucket_key(key_id, d) for d in dimensions]
        if names:
            await self._call("del", lambda: self._client.delete(*names))

    async def add_usage(self, deltas: Sequence[UsageDelta]) -> None:
        """Each row's counters and each day's index entry land or fail on their own (in a cluster the index sits on
        another node than the rows): what did not land is raised as ``UsageNotWritten``. A row is counted once per
        ``write_id`` (the ledger script), so one whose outcome was unknown can be written again."""
        if not deltas:
            return
        write = _UsageWrite(deltas, self._ledger)
        outcomes = await self._each(write.commands)
        again = [i for i, outcome in enumerate(outcomes) if isinstance(outcome, NoScript)]
        if again:  # Redis lost the script (restarted or flushed): those rows did not run; sent with its source
            for i, outcome in zip(again, await self._each([write.with_source(i) for i in again]), strict=True):
                outcomes[i] = outcome
        write.check(outcomes)

    async def _each(self, commands: Sequence[_Command]) -> list[StoreError | None]:
        if self._pipe is not None:
            return await self._each_resp(self._pipe, commands)
        return await self._each_redispy(commands)

    async def _each_resp(self, pipe: RespPipe, commands: Sequence[_Command]) -> list[StoreError | None]:
        payload = b"".join(command(*parts) for _, parts in commands)
        try:
            return [error for _, error in await pipe.call_each(payload, len(commands), "usage")]
        except StoreError as exc:  # nothing was sent
            return [exc] * len(commands)

    async def _each_redispy(self, commands: Sequence[_Command]) -> list[StoreError | None]:
        """One pipeline per node (by the cluster client's slot map), so a node that fails fails only its commands."""
        by_node: dict[str, list[int]] = {}
        for i, (key, _) in enumerate(commands):
            by_node.setdefault(self._node_of(key), []).append(i)
        outcomes: list[StoreError | None] = [None] * len(commands)

        async def run(indexes: list[int]) -> None:
            async def send() -> list[Any]:
                pipe = self._client.pipeline(transaction=False)
                for i in indexes:
                    parts = commands[i][1]
                    pipe.execute_command(parts[0].decode(), *parts[1:])
                result: list[Any] = await pipe.execute(raise_on_error=False)
                return result

            try:
                replies = await self._call("usage", send)
            except StoreError as exc:
                replies = [exc] * len(indexes)
            for i, reply in zip(indexes, replies, strict=True):
                if isinstance(reply, StoreError):
                    outcomes[i] = reply
                elif isinstance(reply, BaseException):
                    outcomes[i] = _store_error("usage", reply)

        await asyncio.gather(*(run(indexes) for indexes in by_node.values()))
        return outcomes

    def _node_of(self, key: bytes) -> str:
        """The name of the node serving ``key`` in a cluster, as far as the client knows ("" when it does not)."""
        if not self.cluster:
            return ""
        try:
            node = self._client.get_node_from_key(key)
        except _ERRORS:
            return ""
        return "" if node is None else str(node.name)

    async def read_usage(self, key_id: str, days: Sequence[str]) -> list[UsageRow]:
        async def run() -> list[dict[bytes, bytes]]:
            pipe = self._client.pipeline(transaction=False)
            for day in days:
                pipe.hgetall(contract.ledger_key(key_id, day))
            result: list[dict[bytes, bytes]] = await pipe.execute()
            return result

        rows: list[UsageRow] = []
        for day, fields in zip(days, await self._call("read usage", run), strict=True):
            per_model: dict[str, list[int]] = {}
            for raw_field, raw_value in fields.items():
                model, _, what = raw_field.decode().rpartition("|")
                slot = {"requests": 0, "prompt": 1, "completion": 2}.get(what)
                if slot is not None:  # a counter this version does not know (another version's) is not summed
                    per_model.setdefault(model, [0, 0, 0])[slot] += _counter(key_id, day, raw_field, raw_value)
            rows += [
                UsageRow(key_id=key_id, model=m, day=day, requests=v[0], prompt_tokens=v[1], completion_tokens=v[2])
                for m, v in sorted(per_model.items())
            ]
        return rows

    async def usage_key_ids(self, day: str) -> list[str]:
        members = await self._call("usage index", lambda: self._client.smembers(contract.ledger_index_key(day)))
        return sorted(m.decode() if isinstance(m, bytes) else str(m) for m in members)


def _counter(key_id: str, day: str, field: bytes, value: bytes) -> int:
    """A ledger counter; a value that is not an integer (not one HINCRBY wrote) fails the read with the row named,
    rather than a report that leaves it out."""
    try:
        return int(value)
    except ValueError:
        raise StoreError(
            f"usage ledger {contract.ledger_key(key_id, day)} field {field.decode(errors='replace')!r} holds "
            f"{value[:40]!r}, not an integer"
        ) from None


def _store_error(what: str, exc: BaseException, *, seeds: str = "") -> StoreError:
    """Ours for redis-py's ``exc``: ``StoreNotSent`` when the command certainly did not run (it can be made again
    without running twice), else ``StoreError`` (a timeout or a connection lost after sending: it may have run).
    A cluster no seed of which answered is named by its ``seeds``: redis-py's message names the last one only."""
    text = f"redis {what} failed: {type(exc).__name__}: {exc}"
    if isinstance(exc, rexc.NoScriptError):
        return NoScript(text)
    if seeds and isinstance(exc, rexc.RedisClusterUnreachableError):
        text += f" (seeds: {seeds})"
    return StoreNotSent(text) if _not_run(exc) else StoreError(text)


def _not_run(exc: BaseException) -> bool:
    if isinstance(exc, _REFUSED):
        return True
    if isinstance(exc, rexc.RedisClusterUnreachableError):  # no node reachable: as the last attempt's error says
        cause = exc.__cause__ or exc.__context__
        return cause is not None and _not_run(cause)
    if isinstance(exc, rexc.TimeoutError | rexc.ConnectionError):
        # redis-py's connect failures ("Error 111 connecting to host:port", "Timeout connecting to server"): the
        # command was never written. A connection lost or a read timed out after writing says otherwise.
        return "connecting to" in str(exc) or isinstance(exc.__cause__, ConnectionRefusedError)
    return False


def tls_context(params: Mapping[str, Any]) -> ssl.SSLContext:
    """The TLS settings of a ``rediss://`` URL's query, as redis-py reads them (``ssl_ca_certs``, ``ssl_ca_path``,
    ``ssl_cert_reqs=none|optional|required``, ``ssl_check_hostname``, ``ssl_certfile``/``ssl_keyfile``), so the hot
    path's connection trusts what redis-py's does (a private CA had failed every bucket check while /readyz said
    ready)."""
    context = ssl.create_default_context(cafile=params.get("ssl_ca_certs"), capath=params.get("ssl_ca_path"))
    reqs = params.get("ssl_cert_reqs")
    mode = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}.get(
        str(reqs).lower() if isinstance(reqs, str) else "", reqs if isinstance(reqs, ssl.VerifyMode) else None
    )
    if params.get("ssl_check_hostname") is False or mode == ssl.CERT_NONE:
        context.check_hostname = False
    if mode is not None:
        context.verify_mode = mode
    certfile = params.get("ssl_certfile")
    if certfile:
        context.load_cert_chain(certfile, params.get("ssl_keyfile"), password=params.get("ssl_password"))
    return context


_Command = tuple[bytes, tuple[bytes, ...]]
"""A command of a ledger write: the key that places it (the node of its slot, in a cluster) and its parts."""


class _UsageWrite:
    """A ledger write as commands: per row with counts, the ledger script (counting it once per write id); per day,
    the key index (SADD) and its TTL. ``check`` turns the commands' outcomes into what did not land."""

    COUNTERS = ((b"requests", "requests"), (b"prompt", "prompt_tokens"), (b"completion", "completion_tokens"))

    def __init__(self, deltas: Sequence[UsageDelta], script: _Script) -> None:
        ttl = b"%d" % USAGE_TTL_SECONDS
        self.deltas = deltas
        self._script = script
        self.commands: list[_Command] = []
        self.rows: list[int | None] = []
        """Per row: the index of its script call (None for a row with no counts, only indexed)."""
        for d in deltas:
            if not d.counts:
                self.rows.append(None)
                continue
            name = contract.ledger_key(d.key_id, d.day).encode()
            marker = contract.ledger_write_key(d.key_id, d.write_id).encode()
            model = d.model.encode()
            args = [b"%d" % LEDGER_WRITE_TTL_SECONDS, ttl]
            for field, attr in self.COUNTERS:
                value = getattr(d, attr)
                if value:
                    args += [model + b"|" + field, b"%d" % value]
            self.rows.append(len(self.commands))
            self.commands.append((name, (b"EVALSHA", script.sha.encode(), b"2", name, marker, *args)))
        self.index: dict[str, int] = {}
        """Day -> the index of its SADD."""
        for day, key_ids in _by_day(deltas).items():
            index = contract.ledger_index_key(day).encode()
            self.index[day] = len(self.commands)
            self.commands.append((index, (b"SADD", index, *(k.encode() for k in key_ids))))
            self.commands.append((index, (b"EXPIRE", index, ttl)))

    def with_source(self, i: int) -> _Command:
        """Command ``i`` (a script call) with the script's source, for a Redis that does not have it."""
        key, parts = self.commands[i]
        return key, (b"EVAL", self._script.source.encode(), *parts[2:])

    def check(self, outcomes: Sequence[StoreError | None]) -> None:
        errors = [e for e in outcomes if e is not None]
        if not errors:
            return
        unsent: list[UsageDelta] = []
        uncertain: list[UsageDelta] = []
        for d, i in zip(self.deltas, self.rows, strict=True):
            error = None if i is None else outcomes[i]
            if isinstance(error, StoreNotSent):
                unsent.append(d)
            elif error is not None:
                uncertain.append(d)
        unindexed = [d for d in self.deltas if outcomes[self.index[d.day]] is not None]
        if unsent or uncertain or unindexed:
            raise UsageNotWritten(
                f"usage ledger write incomplete: {errors[0]}", unsent=unsent, uncertain=uncertain, unindexed=unindexed
            )


def _reservation_call(op: BucketOp, reservation: str, action: bytes) -> tuple[list[bytes], list[bytes]]:
    """The keys and arguments of the reservation script for ``op`` under ``reservation``."""
    marker = contract.reservation_key(op.key_id, op.dimension, reservation).encode()
    args = [b"%d" % op.limit, b"%d" % op.window_ms, b"%d" % op.cost, b"%d" % op.min_cost, b"%d" % RESERVATION_TTL_MS]
    return [op.wire[0], marker], [*args, action]


def _by_day(deltas: Sequence[UsageDelta]) -> dict[str, list[str]]:
    out: dict[str, dict[str, None]] = {}
    for d in deltas:
        out.setdefault(d.day, {})[d.key_id] = None
    return {day: list(ids) for day, ids in out.items()}


def _results(groups: Sequence[Sequence[BucketOp]], flat: Any) -> list[list[BucketResult]]:
    """The bucket script's flat reply (five integers per op) as per-group results; a reply of another shape is a
    StoreError."""
    out: list[list[BucketResult]] = []
    i = 0
    try:
        for ops in groups:
            results = []
            for op in ops:
                results.append(
                    BucketResult(
                        bool(flat[i]), op.limit, int(flat[i + 1]), int(flat[i + 2]), int(flat[i + 3]), int(flat[i + 4])
                    )
                )
                i += 5
            out.append(results)
    except (TypeError, ValueError, IndexError) as exc:
        raise StoreError(f"redis buckets: unexpected reply {str(flat)[:80]!r}: {exc}") from exc
    return out
