"""The RESP pipe against a real redis-server: replies reach their own callers in order, a caller that gives up
does not shift the others' replies, a hung or dead Redis fails every waiter by its deadline, and the callback path
of the bucket check survives Redis losing its scripts."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import hiredis
import pytest
import redis as sync_redis

from gateway.contract import bucket_key
from gateway.errors import StoreError, StoreTimeout
from gateway.limits import BucketMode, BucketOp, BucketResult
from gateway.meter import accounting, quota
from gateway.meter.accounting import UsageBacklog
from gateway.meter.metrics import MeterMetrics
from gateway.store.base import UsageDelta
from gateway.store.batching import BucketBatcher
from gateway.store.redis import RedisStore
from gateway.store.resp import RespPipe, command
from tests.support.procs import RedisServer, free_port, redis_server
from tests.support.tools import required_tool


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A Redis of this test's own: these tests pause and kill it."""
    with redis_server() as server:
        yield server


@contextlib.asynccontextmanager
async def fake_server(answer: Callable[[int], bytes | None]) -> AsyncIterator[int]:
    """A server that parses RESP commands and answers the n-th one of each connection with ``answer(n)`` (None:
    no answer); yields its port."""
    writers: list[asyncio.StreamWriter] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        parser = hiredis.Reader()
        seen = 0
        while data := await reader.read(65536):
            parser.feed(data)
            while parser.gets() is not False:
                reply = answer(seen)
                seen += 1
                if reply is not None:
                    writer.write(reply)

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for writer in writers:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        await server.wait_closed()


def echo(value: str) -> bytes:
    return command(b"ECHO", value.encode())


async def test_concurrent_callers_get_their_own_replies_even_when_one_gives_up(redis_url: str) -> None:
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    pipe = RespPipe(host="127.0.0.1", port=port, timeout=2.0)
    try:
        calls = [asyncio.ensure_future(pipe.call(echo(f"v{i}"))) for i in range(50)]
        calls[7].cancel()
        replies = await asyncio.gather(*calls, return_exceptions=True)
        assert isinstance(replies[7], asyncio.CancelledError)
        assert [r for i, r in enumerate(replies) if i != 7] == [f"v{i}".encode() for i in range(50) if i != 7]
        # an error reply fails only its caller and leaves the pipe in step
        with pytest.raises(StoreError, match="unknown command"):
            await pipe.call(command(b"NOSUCHCOMMAND"))
        assert await pipe.call_many(echo("a") + echo("b"), 2) == [b"a", b"b"]
    finally:
        await pipe.close()


async def test_a_paused_redis_fails_every_waiter_by_the_deadline_and_the_pipe_reconnects(
    own_redis: RedisServer,
) -> None:
    pipe = RespPipe(host="127.0.0.1", port=own_redis.port, timeout=0.3)
    try:
        assert await pipe.call(echo("up")) == b"up"
        os.kill(own_redis.proc.popen.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            results = await asyncio.wait_for(
                asyncio.gather(*(pipe.call(echo(str(i))) for i in range(5)), return_exceptions=True), 5
            )
            waited = time.monotonic() - started
        finally:
            os.kill(own_redis.proc.popen.pid, signal.SIGCONT)
        assert all(isinstance(r, StoreTimeout) for r in results), results
        assert waited < 3  # the deadline is 0.3 s; generous for a loaded machine, far below "hangs"
        assert await pipe.call(echo("back")) == b"back"
    finally:
        await pipe.close()


async def test_redis_dying_mid_call_fails_the_waiters_at_once(own_redis: RedisServer) -> None:
    pipe = RespPipe(host="127.0.0.1", port=own_redis.port, timeout=30.0)
    try:
        assert await pipe.call(echo("up")) == b"up"
        slow = asyncio.ensure_future(pipe.call(command(b"BLPOP", b"pipe-nothing", b"10")))
        await asyncio.sleep(0.1)
        own_redis.proc.popen.kill()
        with pytest.raises(StoreError, match="closed"):
            await asyncio.wait_for(slow, 5)  # far below the pipe's own 30 s deadline
    finally:
        await pipe.close()


async def test_bucket_callbacks_survive_redis_forgetting_its_scripts(redis_url: str) -> None:
    store = RedisStore(redis_url, timeout=2.0)
    op = BucketOp(key_id="pipe-noscript", dimension="requests", limit=3, window_ms=60_000, cost=1)
    try:
        await store.reset_buckets(op.key_id, [op.dimension])
        ((first,),) = await store.check_buckets([[op]])  # connects the pipe and loads the script
        assert first.allowed and first.remaining == 2
        await store._client.script_flush()
        got: asyncio.Future[list[list[BucketResult]]] = asyncio.get_running_loop().create_future()

        def done(results: list[list[BucketResult]] | None, error: BaseException | None) -> None:
            if error is not None:
                got.set_exception(error)
            else:
                got.set_result(results or [])

        assert store.submit_buckets([[op], [op]], done)
        (second,), (third,) = await asyncio.wait_for(got, 5)
        assert (second.allowed, second.remaining, third.allowed, third.remaining) == (True, 1, True, 0)
        ((fourth,),) = await store.check_buckets([[op]])
        assert not fourth.allowed
    finally:
        await store.close()


async def test_a_bucket_reply_of_the_wrong_shape_is_a_store_error_not_a_hang() -> None:
    """A server that answers every command with +OK (a proxy in the way, a wrong port): each path of the bucket
    check (connecting, and the connected callback path) fails with StoreError, and the batcher's callers hear it."""

    async with fake_server(lambda n: b"+OK\r\n") as port:
        await _expect_unexpected_replies(port)


async def _expect_unexpected_replies(port: int) -> None:
    store = RedisStore(f"redis://127.0.0.1:{port}/0", timeout=2.0)
    op = BucketOp(key_id="odd", dimension="requests", limit=3, window_ms=60_000, cost=1)
    try:
        for _ in range(2):  # the first call connects (the slow path), the second goes through the callback
            with pytest.raises(StoreError, match="unexpected reply"):
                await asyncio.wait_for(store.check_buckets([[op]]), 5)
        batcher = BucketBatcher(store)
        with pytest.raises(StoreError, match="unexpected reply"):
            await asyncio.wait_for(batcher.check([op]), 5)
        with pytest.raises(StoreError, match="unexpected reply"):  # the batcher is not stuck after a failed batch
            await asyncio.wait_for(batcher.check([op]), 5)
    finally:
        await store.close()


async def test_each_send_keeps_its_own_deadline_when_earlier_ones_were_answered() -> None:
    """One timer watches the oldest waiter: after an answered send, a later one that gets no reply still fails at
    its own deadline (not at the first send's, and not never)."""
    async with fake_server(lambda n: b"+first\r\n" if n == 0 else None) as port:
        pipe = RespPipe(host="127.0.0.1", port=port, timeout=0.4)
        try:
            assert await pipe.call(echo("a")) == b"first"
            await asyncio.sleep(0.25)  # past most of the first send's deadline window
            started = time.monotonic()
            with pytest.raises(StoreTimeout, match="second timed out"):
                await asyncio.wait_for(pipe.call(echo("b"), "second"), 5)
            waited = time.monotonic() - started
            assert 0.35 <= waited < 3, waited  # its own 0.4 s, give or take the timer's millisecond
        finally:
            await pipe.close()


async def test_a_lone_check_is_sent_with_its_own_ops_not_a_remembered_command(redis_url: str) -> None:
    """Commands of single-group checks are remembered by their ops (the hot path memoises ops per key and limits):
    ops with new limits for the same key, or a new group equal to an old one, are checked as they are."""
    store = RedisStore(redis_url, timeout=2.0)
    generous = (BucketOp(key_id="pipe-memo", dimension="requests", limit=5, window_ms=60_000, cost=1),)
    strict = (BucketOp(key_id="pipe-memo", dimension="requests", limit=2, window_ms=60_000, cost=1),)
    try:
        await store.reset_buckets("pipe-memo", ["requests"])
        await store.check_buckets([generous])  # connects the pipe

        async def lone(ops: tuple[BucketOp, ...]) -> BucketResult:
            got: asyncio.Future[list[list[BucketResult]]] = asyncio.get_running_loop().create_future()
            assert store.submit_buckets([ops], lambda r, e: got.set_exception(e) if e else got.set_result(r or []))
            ((result,),) = await asyncio.wait_for(got, 5)
            return result

        first = await lone(generous)
        assert (first.allowed, first.limit, first.remaining) == (True, 5, 3)
        tighter = await lone(strict)  # the limit went down to 2: the bucket holds at most 2, one taken
        assert (tighter.allowed, tighter.limit, tighter.remaining) == (True, 2, 1)
        again = await lone(tuple(generous))  # an equal group built anew: limit 5 again, the one left taken
        assert (again.allowed, again.limit, again.remaining) == (True, 5, 0)
    finally:
        await store.close()


async def test_a_unix_socket_url_takes_the_pipe_too(tmp_path: Path) -> None:
    """``unix://`` (Redis on the same host): bucket checks go through the pipe over the socket, callbacks
    included, as they do over TCP; a socket that is not there is a StoreError naming it, not a hang."""
    socket_path = tmp_path / "redis.sock"
    with redis_server(extra=["--unixsocket", str(socket_path), "--unixsocketperm", "700"]):
        store = RedisStore(f"unix://{socket_path}?db=3", timeout=2.0)
        op = BucketOp(key_id="pipe-unix", dimension="requests", limit=2, window_ms=60_000, cost=1)
        try:
            ((first,),) = await store.check_buckets([[op]])  # connects the pipe and loads the script
            assert store._pipe is not None and store._pipe.current is not None
            got: asyncio.Future[list[list[BucketResult]]] = asyncio.get_running_loop().create_future()
            assert store.submit_buckets(
                [[op], [op]], lambda r, e: got.set_exception(e) if e else got.set_result(r or [])
            )
            (second,), (third,) = await asyncio.wait_for(got, 5)
            assert [(r.allowed, r.remaining) for r in (first, second, third)] == [(True, 1), (True, 0), (False, 0)]
            # the buckets are in the database the URL names
            assert await store._client.exists(f"maas:b:{{k:{op.key_id}}}:{op.dimension}") == 1
        finally:
            await store.close()
    missing = RedisStore(f"unix://{tmp_path / 'nothing.sock'}", timeout=0.5)
    try:
        with pytest.raises(StoreError, match=r"nothing\.sock"):
            await asyncio.wait_for(missing.check_buckets([[op]]), 5)
    finally:
        await missing.close()


def _self_signed(folder: Path) -> Path:
    cert, key = folder / "cert.pem", folder / "key.pem"
    names = "subjectAltName=DNS:localhost,IP:127.0.0.1"
    argv = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert)]
    subprocess.run(
        [*argv, "-days", "1", "-subj", "/CN=localhost", "-addext", names],
        check=True,
        capture_output=True,
    )
    return folder


async def test_a_rediss_url_with_a_private_ca_reaches_the_hot_path_connection_too(tmp_path: Path) -> None:
    """The bucket connection took only 'TLS or not' from the URL: with a private CA every check failed (503)
    while the snapshot, on redis-py, loaded and /readyz said ready."""
    required_tool("openssl", package="openssl", switch="MAAS_REQUIRE_OPENSSL")
    folder = _self_signed(tmp_path)
    tls_port = free_port()
    tls = ["--tls-port", str(tls_port), "--tls-cert-file", str(folder / "cert.pem")]
    tls += ["--tls-key-file", str(folder / "key.pem"), "--tls-ca-cert-file", str(folder / "cert.pem")]
    tls += ["--tls-auth-clients", "no", "--requirepass", "pw"]
    with redis_server(extra=tls):
        url = f"rediss://:pw@127.0.0.1:{tls_port}/3?ssl_ca_certs={folder / 'cert.pem'}"
        for query in (url, url.replace("ssl_ca_certs=", "ssl_cert_reqs=none&x=")):
            store = RedisStore(query, timeout=5.0)
            try:
                op = BucketOp("tls-key", "requests", 5, 60_000, 1)
                assert (await store.check_buckets([[op]]))[0][0].allowed
                arrived: asyncio.Future[list[list[BucketResult]] | None] = asyncio.get_running_loop().create_future()
                assert store.submit_buckets([[op]], lambda results, error, into=arrived: into.set_result(results))
                results = await arrived
                assert results is not None and results[0][0].remaining == 3
            finally:
                await store.close()
            # the buckets are in database 3, where the URL points
            client = sync_redis.Redis(
                host="127.0.0.1", port=tls_port, password="pw", db=3, ssl=True, ssl_ca_certs=str(folder / "cert.pem")
            )
            assert client.exists(bucket_key("tls-key", "requests"))
            client.flushall()
            client.close()


async def test_auth_and_select_go_before_anything_sent_while_they_are_answered() -> None:
    """SELECT was sent only once AUTH's reply came: a bucket check sent in between ran in database 0."""
    order: list[bytes] = []
    handlers: list[asyncio.Task[Any]] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.append(task)
        parser = hiredis.Reader()
        try:
            while data := await reader.read(65536):
                parser.feed(data)
                while (cmd := parser.gets()) is not False:
                    order.append(cmd[0])
                    await asyncio.sleep(0.05)  # a slow answer: others send meanwhile
                    writer.write(b"+OK\r\n")
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    pipe = RespPipe(host="127.0.0.1", port=server.sockets[0].getsockname()[1], password="pw", db=3, timeout=2.0)
    try:
        connecting = asyncio.create_task(pipe.connect())
        await asyncio.sleep(0.02)  # connected, AUTH's answer not in yet
        answered: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        assert pipe.send(echo("check"), [lambda reply, error: answered.set_result(reply)], "check")
        await connecting
        await answered
        assert order == [b"AUTH", b"SELECT", b"ECHO"]
    finally:
        await pipe.close()
        server.close()
        await asyncio.wait(handlers, timeout=5)
        await server.wait_closed()


async def test_a_refused_password_holds_ledger_rows_until_redis_takes_it() -> None:
    """A refused AUTH (nothing sent on the connection ran) had dropped the row as a failed write."""
    with redis_server() as server:
        store = RedisStore(f"redis://:right@127.0.0.1:{server.port}/0", timeout=1.0)
        metrics = MeterMetrics(max_keys=10)
        backlog = UsageBacklog(metrics)
        row = UsageDelta(key_id="k1", model="m", day="20250101", requests=1, prompt_tokens=3, completion_tokens=4)
        try:
            await accounting._ledger(store, metrics, row, backlog)
            assert len(backlog) == 1
            assert metrics.registry.get_sample_value("maas_meter_store_errors_total", {"operation": "ledger"}) == 0
            admin = sync_redis.Redis(port=server.port)
            admin.config_set("requirepass", "right")
            admin.close()
            assert await backlog.flush(store)
            (landed,) = await store.read_usage("k1", ["20250101"])
            assert (landed.requests, landed.prompt_tokens, landed.completion_tokens) == (1, 3, 4)
            assert await store.usage_key_ids("20250101") == ["k1"]
        finally:
            await store.close()


async def test_a_ledger_write_redis_refuses_for_memory_is_held() -> None:
    """OOM: Redis rejected the write before running it, so it can be made again without counting twice."""
    with redis_server(extra=("--maxmemory", "1")) as server:
        store = RedisStore(server.url, timeout=1.0)
        metrics = MeterMetrics(max_keys=10)
        backlog = UsageBacklog(metrics)
        row = UsageDelta(key_id="k1", model="m", day="20250101", requests=1, prompt_tokens=3)
        try:
            await accounting._ledger(store, metrics, row, backlog)
            assert len(backlog) == 1
            admin = sync_redis.Redis(port=server.port)
            admin.config_set("maxmemory", "0")
            admin.close()
            assert await backlog.flush(store)
            (landed,) = await store.read_usage("k1", ["20250101"])
            assert (landed.requests, landed.prompt_tokens) == (1, 3)
        finally:
            await store.close()


async def test_a_row_whose_answer_was_lost_is_made_again_within_its_markers_life_then_dropped() -> None:
    """A row whose answer was lost is made again under its write id while its marker lives in Redis (counted once
    however often it is sent); held past that, made again it could count twice, so it is dropped and counted."""
    with redis_server() as server:
        store = RedisStore(server.url, timeout=0.25)
        metrics = MeterMetrics(max_keys=10)
        backlog = UsageBacklog(metrics)
        row = UsageDelta(key_id="k1", model="m", day="20250101", requests=1, prompt_tokens=3)
        failed = {"operation": "ledger"}
        try:
            warm = UsageDelta(key_id="k0", model="m", day="20250101", requests=1)
            await store.add_usage([warm])  # connected, the ledger script loaded
            os.kill(server.proc.popen.pid, signal.SIGSTOP)
            try:
                await accounting._ledger(store, metrics, row, backlog)  # sent, its answer lost
                assert row.write_id in backlog._again  # apart, with its write id (and the day's index, held too)
                assert not await backlog.flush(store)  # made again, lost again: still held
                assert row.write_id in backlog._again
                backlog.UNCERTAIN_RETRY_SECONDS = 0.0
                await backlog.flush(store)  # too late to make again: dropped, counted
                assert row.write_id not in backlog._again
                assert metrics.registry.get_sample_value("maas_meter_store_errors_total", failed) == 1
            finally:
                os.kill(server.proc.popen.pid, signal.SIGCONT)
            assert await backlog.flush(store)  # the day's index, written
            # the sends that waited in Redis's input ran when it woke up: the row counts once
            (landed,) = await asyncio.wait_for(_read_when_landed(store), 5)
            assert (landed.requests, landed.prompt_tokens) == (1, 3)
            assert await store.usage_key_ids("20250101") == ["k0", "k1"]
        finally:
            await store.close()


async def _read_when_landed(store: RedisStore) -> list[Any]:
    while True:
        try:
            rows = await store.read_usage("k1", ["20250101"])
        except StoreError:
            rows = []
        if rows:
            return list(rows)
        await asyncio.sleep(0.05)


async def test_a_backlog_stopped_while_it_writes_holds_what_it_was_writing() -> None:
    """The meter stops its backlog task at shutdown, maybe while a flush waits for Redis: what that flush took to
    write is held again for the last flush, not lost with the cancelled task."""
    with redis_server() as server:
        store = RedisStore(server.url, timeout=0.5)
        metrics = MeterMetrics(max_keys=10)
        backlog = UsageBacklog(metrics)
        backlog.RETRY_SECONDS = 0.0
        row = UsageDelta(key_id="k1", model="m", day="20250101", requests=1, prompt_tokens=3)
        try:
            await store.add_usage([UsageDelta(key_id="k0", model="m", day="20250101", requests=1)])
            backlog.hold([row])
            os.kill(server.proc.popen.pid, signal.SIGSTOP)
            try:
                task = asyncio.create_task(backlog.run(store))
                await asyncio.wait_for(_until_taken(backlog), 5)  # by the flush, which waits for Redis
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                assert row.write_id in backlog._again  # sent, its answer lost: held apart with its write id
            finally:
                os.kill(server.proc.popen.pid, signal.SIGCONT)
            assert await backlog.flush(store)
            (landed,) = await asyncio.wait_for(_read_when_landed(store), 5)
            assert (landed.requests, landed.prompt_tokens) == (1, 3)
        finally:
            await store.close()


async def _until_taken(backlog: UsageBacklog) -> None:
    while True:
        if not len(backlog):
            return
        await asyncio.sleep(0.01)


async def test_what_the_last_flush_cannot_write_is_counted_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    """At shutdown what the backlog still holds after its last flush (Redis down) is lost with the process: each is
    counted in maas_meter_store_errors_total by its operation and the loss is logged."""
    with redis_server() as server:
        store = RedisStore(server.url, timeout=0.5)
        server.kill()
        metrics = MeterMetrics(max_keys=10)
        backlog = UsageBacklog(metrics)
        backlog.hold([UsageDelta(key_id="k1", model="m", day="20250101", requests=1, prompt_tokens=3)])
        backlog.hold_release(BucketOp(key_id="k1", dimension="tokens", limit=100, window_ms=60_000, cost=5), "r1")
        try:
            await backlog.close(store)
        finally:
            await store.close()
        for operation, lost in (("ledger", 1), ("reserve", 1), ("commit", 0)):
            labels = {"operation": operation}
            assert metrics.registry.get_sample_value("maas_meter_store_errors_total", labels) == lost
        assert "not written" in caplog.text


class _CountingStore(RedisStore):
    """A RedisStore that counts its commits and releases waiting for Redis."""

    waiting = 0
    sent = 0

    async def commit(self, op: BucketOp, reservation: str) -> None:
        await self._waiting(super().commit(op, reservation))

    async def release(self, op: BucketOp, reservation: str) -> None:
        await self._waiting(super().release(op, reservation))

    async def _waiting(self, call: Awaitable[None]) -> None:
        self.waiting += 1
        self.sent += 1
        try:
            await call
        finally:
            self.waiting -= 1


async def test_a_flush_makes_its_commits_and_releases_at_once() -> None:
    """While Redis does not answer, a flush of many held commits and releases lasts one store timeout, not one per
    write: made one after another it would outlast the pod's termination grace at shutdown, and hold writes past
    the 9 minutes they may be made again in."""
    with redis_server() as server:
        store = _CountingStore(server.url, timeout=5.0)
        metrics = MeterMetrics(max_keys=10)
        backlog = UsageBacklog(metrics)
        op = BucketOp(key_id="k1", dimension="tokens", limit=100, window_ms=60_000, cost=5, mode=BucketMode.RESERVE)
        held = [
            quota.Reservation("k1", 100, 60_000, 5, None, False, quota.Outcome.GRANTED, ident=f"c{i}") for i in range(3)
        ]
        try:
            for i, reservation in enumerate(held):
                await store.reserve(op, reservation.ident)
                backlog.hold_commit(reservation, -5)
                backlog.hold_release(op, f"r{i}")
            os.kill(server.proc.popen.pid, signal.SIGSTOP)
            try:
                flushing = asyncio.create_task(backlog.flush(store))
                await asyncio.wait_for(_until_waiting(store, 6), 4)  # all six sent before any answer
            finally:
                os.kill(server.proc.popen.pid, signal.SIGCONT)
            assert await flushing
            gate = BucketOp(key_id="k1", dimension="tokens", limit=100, window_ms=60_000, cost=0, mode=BucketMode.GATE)
            ((level,),) = await store.check_buckets([[gate]])
            assert level.remaining == 100
        finally:
            await store.close()


async def test_a_flush_the_store_does_not_answer_keeps_what_it_has_not_sent() -> None:
    """Once a write of a flush gets no answer the rest stay held for the next flush: sent anyway, a backlog of
    thousands took held / 32 store timeouts per flush, past a shutdown's grace period."""
    with redis_server() as server:
        store = _CountingStore(server.url, timeout=0.3)
        backlog = UsageBacklog(MeterMetrics(max_keys=10))
        op = BucketOp(key_id="k1", dimension="tokens", limit=1000, window_ms=60_000, cost=5, mode=BucketMode.RESERVE)
        held = [
            quota.Reservation("k1", 1000, 60_000, 5, None, False, quota.Outcome.GRANTED, ident=f"c{i}")
            for i in range(2 * UsageBacklog.FLUSH_CONCURRENCY)
        ]
        try:
            for reservation in held:
                await store.reserve(op, reservation.ident)
                backlog.hold_commit(reservation, -5)
            os.kill(server.proc.popen.pid, signal.SIGSTOP)
            try:
                assert not await backlog.flush(store)
            finally:
                os.kill(server.proc.popen.pid, signal.SIGCONT)
            assert store.sent == UsageBacklog.FLUSH_CONCURRENCY  # the first round, then nothing more
            assert len(backlog) == len(held)  # the unanswered held again, the unsent kept
            assert await backlog.flush(store)
            gate = BucketOp(key_id="k1", dimension="tokens", limit=1000, window_ms=60_000, cost=0, mode=BucketMode.GATE)
            ((level,),) = await store.check_buckets([[gate]])
            assert level.remaining == 1000  # every reservation refunded once
        finally:
            await store.close()


async def _until_waiting(store: _CountingStore, count: int) -> None:
    while True:
        if store.waiting >= count:
            return
        await asyncio.sleep(0.01)
