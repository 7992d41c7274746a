"""Clocks of different machines meeting, and a wall clock that steps: what each part tolerates (README, "Clocks").

Skews between two parts are simulated with the clock seams the code has (``now=`` arguments, injected clocks,
``gateway.clock.wall``), a Redis clock that was ahead by a bucket state stamped in its future (or by a store whose
``TIME`` reads shifted), and a wall-clock step by patching ``time.time``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry, Gauge

from controlplane.admin import selfservice
from controlplane.kinds import LEASE, Kind, Obj
from controlplane.leader import LeaseElector
from controlplane.ports import free_port
from controlplane.sources.kube import micro_time
from gateway import clock, contract
from gateway.authz.main import serve as serve_authz
from gateway.authz.settings import AuthzSettings
from gateway.clock import ClockOffset, SharedClock
from gateway.identity import SIGN_WINDOW, Identity, StaleIdentity, sign, verify
from gateway.limits import BucketMode, BucketOp
from gateway.logs import RateLimitedLog
from gateway.meter import proxy
from gateway.meter.app import build_meter, serving
from gateway.meter.settings import MeterSettings
from gateway.settings import load
from gateway.store.memory import MemoryStore
from gateway.store.redis import RedisStore
from tests.conftest import PEPPER
from tests.support import platform
from tests.support.admin_api import admin_settings, running
from tests.support.k8s_emulator import eventually
from tests.support.stack import IDENTITY_SECRET
from tests.test_meter_stack import MODEL, SECRET, running_stack

IDENTITY = Identity(key_id="k1", user="u", groups="free", tier="free", model=MODEL, token_limit=9, token_window_ms=60)
MAX_AGE = 60.0
START = 1_800_000_000.0  # the first second of a signing window


def _across(skew: float, phase: float) -> Identity:
    """Signed by an authz at ``phase`` seconds into a signing window, verified by a meter ``skew`` seconds ahead."""
    headers = sign(IDENTITY, b"s" * 16, now=START + phase)
    return verify(headers, b"s" * 16, max_age=MAX_AGE, now=START + phase + skew)


@pytest.mark.parametrize("skew", [2.0, -2.0, 30.0, -30.0, MAX_AGE, -MAX_AGE], ids=lambda s: f"meter{s:+g}s")
def test_an_identity_passes_between_clocks_up_to_max_age_apart_at_any_moment_of_a_window(skew: float) -> None:
    for phase in (0.0, 0.5, SIGN_WINDOW / 2, SIGN_WINDOW - 0.01):
        assert _across(skew, phase) == IDENTITY


@pytest.mark.parametrize("skew", [75.0, -75.0, 600.0, -600.0], ids=lambda s: f"meter{s:+g}s")
def test_beyond_max_age_an_identity_is_refused_as_stale_naming_the_clocks(skew: float) -> None:
    for phase in (0.0, SIGN_WINDOW / 2, SIGN_WINDOW - 0.01):
        with pytest.raises(StaleIdentity) as caught:
            _across(skew, phase)
        assert caught.value.code == "stale_identity"
        assert "clock skew" in str(caught.value)
        assert (caught.value.offset > 0) == (skew > 0)  # positive: dated before the verifier's clock


@pytest.mark.redis
async def test_the_meter_refuses_a_skewed_identity_counted_and_logged_once(
    redis_url: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An authz ten minutes ahead or behind: every request gets 401 ``stale_identity`` saying why, each is counted,
    and the log says it once (not once per request)."""
    monkeypatch.setattr(proxy, "_skewed", RateLimitedLog(proxy.log))
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    async with running_stack(redis_url) as stack, aiohttp.ClientSession() as session:
        for skew in (600, -600, 600):
            headers = sign(IDENTITY, SECRET.encode(), now=time.time() + skew)
            with caplog.at_level(logging.WARNING, logger="maas.meter"):
                async with session.post(stack.meter_url + "/v1/chat/completions", json=body, headers=headers) as resp:
                    answer = await resp.json()
            assert resp.status == 401 and answer["error"]["code"] == "stale_identity"
            assert "clock skew" in answer["error"]["message"]
        async with session.get(stack.ops_url + "/metrics") as resp:
            metrics = await resp.text()
    assert 'maas_meter_rejected_total{reason="stale_identity"} 3.0' in metrics
    warnings = [r.getMessage() for r in caplog.records if r.name == "maas.meter" and "NTP" in r.getMessage()]
    assert len(warnings) == 1 and "k1" in warnings[0] and "after this server's clock" in warnings[0]


class StepClock:
    def __init__(self) -> None:
        self.ms = 5_000_000.0

    def __call__(self) -> float:
        return self.ms


@pytest.mark.parametrize("mode", [BucketMode.TAKE, BucketMode.GATE], ids=["take", "gate"])
async def test_a_bucket_stamped_by_a_clock_that_was_ahead_refills_from_now(mode: BucketMode) -> None:
    """The clock steps back ten minutes after a bucket was emptied: it refills one window later, not ten minutes
    and a window later."""
    clock = StepClock()
    store = MemoryStore(clock_ms=clock)
    spend = BucketOp(key_id="k", dimension="tokens", limit=10, window_ms=1_000, cost=15, mode=BucketMode.FORCE)
    check = BucketOp(key_id="k", dimension="tokens", limit=10, window_ms=1_000, cost=1, mode=mode)
    await store.check_buckets([[spend]])  # in debt: -5
    clock.ms -= 600_000
    ((denied,),) = await store.check_buckets([[check]])
    assert not denied.allowed and denied.retry_ms == 600
    clock.ms += 600
    ((again,),) = await store.check_buckets([[check]])
    assert again.allowed


@pytest.mark.redis
@pytest.mark.parametrize("mode", [BucketMode.TAKE, BucketMode.GATE], ids=["take", "gate"])
async def test_a_redis_bucket_stamped_in_redis_future_refills_from_now(redis_url: str, mode: BucketMode) -> None:
    """A state written by a Redis primary whose clock was ten minutes ahead, read after a failover (or a step
    back of Redis's clock): the key is refused for what its retry-after says, not for ten minutes more."""
    store = RedisStore(redis_url, timeout=2.0)
    raw = aioredis.Redis.from_url(redis_url)
    seconds, micros = await raw.time()
    now_ms = seconds * 1000 + micros // 1000
    await raw.set(contract.bucket_key("ahead", "tokens"), f"-5 {now_ms + 600_000}", px=700_000)
    check = BucketOp(key_id="ahead", dimension="tokens", limit=10, window_ms=100, cost=1, mode=mode)
    try:
        ((denied,),) = await store.check_buckets([[check]])
        assert not denied.allowed and 0 < denied.retry_ms <= 100
        await asyncio.sleep(denied.retry_ms / 1000 + 0.1)
        ((again,),) = await store.check_buckets([[check]])
        assert again.allowed
    finally:
        await raw.aclose()
        await store.close()


def test_in_process_buckets_ignore_a_wall_clock_step_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    """``memory://`` and the authz ``local`` policy: an hour's step of the wall clock refills no bucket."""
    store = MemoryStore()
    take = BucketOp(key_id="k", dimension="requests", limit=1, window_ms=3_600_000, cost=1)
    ((first,),) = store.check_now([[take]])
    wall = time.time()
    monkeypatch.setattr(time, "time", lambda: wall + 3_600)
    ((second,),) = store.check_now([[take]])
    assert first.allowed and not second.allowed


async def test_in_process_buckets_refill_across_a_wall_clock_step_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """A step back of the wall clock stalls no bucket: it refills as time passes."""
    store = MemoryStore()
    take = BucketOp(key_id="k", dimension="requests", limit=1, window_ms=100, cost=1)
    ((first,),) = store.check_now([[take]])
    wall = time.time()
    monkeypatch.setattr(time, "time", lambda: wall - 600)
    await asyncio.sleep(0.2)
    ((second,),) = store.check_now([[take]])
    assert first.allowed and second.allowed


class Leases:
    """A Lease API of one object, each write bumping its resourceVersion, as the API server does."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.lease: Obj = {"metadata": {"name": "l", "namespace": "ns", "resourceVersion": "1"}, "spec": spec}

    async def get(self, kind: Kind, namespace: str, name: str) -> Obj | None:
        assert kind is LEASE
        return self.lease

    async def create(self, obj: Obj) -> Obj:
        raise AssertionError("the Lease exists")

    async def replace(self, obj: Obj) -> Obj:
        version = int(self.lease["metadata"]["resourceVersion"]) + 1
        self.lease = {**obj, "metadata": {**obj["metadata"], "resourceVersion": str(version)}}
        return self.lease

    def renew(self, renew_time: str) -> None:
        """The holder renews, from a node whose clock is wherever ``renew_time`` says."""
        version = int(self.lease["metadata"]["resourceVersion"]) + 1
        self.lease = {
            "metadata": {**self.lease["metadata"], "resourceVersion": str(version)},
            "spec": {**self.lease["spec"], "renewTime": renew_time},
        }


@pytest.mark.parametrize("remote", [-600.0, 600.0], ids=["holder-10m-behind", "holder-10m-ahead"])
async def test_leader_election_reads_no_remote_clock(remote: float) -> None:
    """The holder's renewTime comes from its node's clock: a follower measures the lease on its own monotonic clock
    from when it saw the Lease change, so a holder's clock far behind does not lose it the lease while it renews,
    and one far ahead does not keep it once it stops."""
    spec = {"holderIdentity": "other", "leaseDurationSeconds": 15, "renewTime": micro_time(time.time() + remote)}
    leases = Leases(spec)
    clock = StepClock()
    elector = LeaseElector(client=leases, name="l", namespace="ns", identity="me", clock=lambda: clock.ms / 1000)
    for second in range(40):  # the holder renews every 2 s
        if second % 2 == 0:
            leases.renew(micro_time(time.time() + remote + second))
        assert not await elector._try()
        clock.ms += 1_000
    stopped = clock.ms - 2_000  # the last renewal, seen at second 38; the lease is 15 s on this clock
    while clock.ms - stopped < 15_000:
        assert not await elector._try()
        clock.ms += 500
    assert await elector._try()
    assert leases.lease["spec"]["holderIdentity"] == "me" and elector.is_leader()


@pytest.mark.redis
async def test_self_service_refuses_a_skewed_identity_and_logs_it_once(
    tmp_path: Path, redis_url: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The control plane checks authz's identity headers too (self-service through the gateway)."""
    monkeypatch.setattr(selfservice, "_skewed", RateLimitedLog(selfservice.log))
    settings = admin_settings(tmp_path, redis_url, identity_secret=IDENTITY_SECRET)
    async with running(settings) as (_, api):
        for _ in range(3):
            headers = sign(IDENTITY, IDENTITY_SECRET.encode(), now=time.time() - 600)
            with caplog.at_level(logging.WARNING, logger=selfservice.log.name):
                async with api.session.get(api.base + "/v1/me", headers=headers) as resp:
                    answer = await resp.json()
            assert resp.status == 401 and "clock skew" in answer["error"]["message"]
    warnings = [r.getMessage() for r in caplog.records if r.name == selfservice.log.name]
    assert len(warnings) == 1 and "before this server's clock" in warnings[0] and "NTP" in warnings[0]


def test_a_rate_limited_log_logs_its_first_line_even_just_after_boot(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The monotonic clock starts near 0 at boot: a 10-minute interval must not swallow the first warning of a node
    that booted 5 s ago."""
    monkeypatch.setattr(time, "monotonic", lambda: 5.0)
    with caplog.at_level(logging.WARNING, logger="maas.test.clock"):
        RateLimitedLog(logging.getLogger("maas.test.clock"), interval=600).warning("clock off")
    assert [r.getMessage() for r in caplog.records] == ["clock off (0 similar suppressed)"]


def _offset_clock() -> tuple[ClockOffset, CollectorRegistry]:
    registry = CollectorRegistry()
    gauge = Gauge("maas_test_clock_offset_seconds", "offset", registry=registry)
    return ClockOffset(gauge, logger=logging.getLogger("maas.test.clock")), registry


@pytest.mark.redis
@pytest.mark.parametrize("where", ["redis", "redis-cluster"])
async def test_the_offset_to_a_local_redis_reads_about_zero(request: pytest.FixtureRequest, where: str) -> None:
    store = RedisStore(request.getfixturevalue("redis_url" if where == "redis" else "redis_cluster_url"), timeout=2.0)
    offset, registry = _offset_clock()
    try:
        assert isinstance(store, SharedClock)
        assert abs(await store.server_time() - time.time()) < 1.0
        await offset.measure(store)
    finally:
        await store.close()
    assert abs(offset.offset) < 1.0
    assert registry.get_sample_value("maas_test_clock_offset_seconds") == offset.offset


@pytest.mark.redis
@pytest.mark.parametrize("skew", [600.0, -600.0], ids=["10m-ahead", "10m-behind"])
async def test_a_clock_off_redis_shows_in_the_gauge_and_is_warned_once(
    redis_url: str, skew: float, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(clock, "wall", lambda: time.time() + skew)
    monkeypatch.setattr(clock, "MAX_ROUND_TRIP", 10.0)  # every reading counts, however busy the machine
    store = RedisStore(redis_url, timeout=2.0)
    offset, registry = _offset_clock()
    try:
        with caplog.at_level(logging.WARNING, logger="maas.test.clock"):
            for _ in range(3):
                await offset.measure(store)
    finally:
        await store.close()
    gauge = registry.get_sample_value("maas_test_clock_offset_seconds")
    assert gauge is not None and abs(gauge + skew) < 1.0
    assert abs(offset.now() - time.time()) < 1.0
    warnings = [r.getMessage() for r in caplog.records if r.name == "maas.test.clock"]
    assert len(warnings) == 1 and ("ahead of" if skew > 0 else "behind") in warnings[0] and "NTP" in warnings[0]


class SlowClock:
    """A store whose ``TIME`` answers after ``delay`` seconds, ten minutes ahead."""

    def __init__(self, delay: float) -> None:
        self.delay = delay

    async def server_time(self) -> float:
        await asyncio.sleep(self.delay)
        return time.time() + 600


async def test_a_reading_of_a_slow_round_trip_is_not_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    """Its midpoint could be anywhere in the round trip: the last offset stays."""
    monkeypatch.setattr(clock, "MAX_ROUND_TRIP", 0.01)
    offset, registry = _offset_clock()
    await offset.measure(SlowClock(0.05))
    assert offset.offset == 0.0 and registry.get_sample_value("maas_test_clock_offset_seconds") == 0.0
    await offset.measure(SlowClock(0.0))
    assert abs(offset.offset - 600) < 1.0


async def test_on_the_memory_store_the_meter_reads_no_clock() -> None:
    """``memory://``: one process, no other clock to agree with; the offset stays 0 and no task reads one."""
    settings = load(MeterSettings, upstream="http://127.0.0.1:9", redis_url="memory://", identity_secret=SECRET)
    meter = build_meter(settings)
    assert not isinstance(meter.store, SharedClock)
    async with serving(meter, host="127.0.0.1", port=0, ops_port=0, max_connections=10, shutdown_grace=0.1):
        assert "meter-clock" not in {task.get_name() for task in asyncio.all_tasks()}
        assert meter.clock.offset == 0.0


class RedisAt(RedisStore):
    """Redis whose ``TIME`` reads ``shift`` seconds from its clock (the tests cannot set redis-server's)."""

    shift = 0.0

    async def server_time(self) -> float:
        return await super().server_time() + self.shift


@pytest.mark.redis
async def test_a_meter_ten_minutes_ahead_files_a_request_before_midnight_under_redis_day(
    redis_url: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The request ends at 23:59:30 or so by Redis's clock, 00:09:30 the next day by the meter node's (its
    ``time.time``): it counts on Redis's day, as it does for every other meter, whatever their clocks say. The
    identity is stamped by Redis's clock, as authz stamps it, and the meter ten minutes ahead takes it."""
    store = RedisAt(redis_url, timeout=2.0)
    monkeypatch.setattr(clock, "MAX_ROUND_TRIP", 10.0)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    real, now = time.time, time.time()
    meter_now = (now // 86400 + 1) * 86400 + 570  # 00:09:30 UTC
    monkeypatch.setattr(time, "time", lambda: real() + meter_now - now)
    store.shift = meter_now - 600 - now  # Redis's clock reads 23:59:30 UTC
    redis_day, meter_day = contract.ledger_day(meter_now - 600), contract.ledger_day(meter_now)
    caplog.set_level(logging.WARNING, logger="maas.meter")
    async with running_stack(redis_url, store=store) as stack, aiohttp.ClientSession() as session:
        await eventually(lambda: stack.meter.clock.offset < -599)  # measured as the meter starts
        async with session.post(
            stack.meter_url + "/v1/chat/completions",
            json=body,
            headers=stack.headers(key_id="midnight", now=meter_now - 600),
        ) as resp:
            assert resp.status == 200
        rows = await eventually(lambda: store.read_usage("midnight", [redis_day, meter_day]))
        metrics = await stack.metrics()
    assert [(row.day, row.requests) for row in rows] == [(redis_day, 1)]
    assert abs(metrics[("maas_meter_clock_offset_seconds", ())] + 600) < 1.0
    warnings = [r.getMessage() for r in caplog.records if r.name == "maas.meter" and "NTP" in r.getMessage()]
    assert len(warnings) == 1 and "600" in warnings[0] and "ahead of Redis's" in warnings[0]


@pytest.mark.redis
async def test_authz_and_the_control_plane_export_their_offset_to_redis(
    tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both read Redis's ``TIME`` from the start: a replica two minutes behind shows +120 s."""
    monkeypatch.setattr(clock, "wall", lambda: time.time() - 120)
    monkeypatch.setattr(clock, "MAX_ROUND_TRIP", 10.0)
    authz = load(AuthzSettings, dev=True, key_pepper=None, port=free_port(), ops_port=free_port(), redis_url=redis_url)
    stop = asyncio.Event()
    task = asyncio.create_task(serve_authz(authz, stop=stop))

    async def authz_offset() -> float:
        try:
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"http://127.0.0.1:{authz.ops_port}/metrics") as resp,
            ):
                text = await resp.text()
        except aiohttp.ClientConnectionError:
            return 0.0
        return float(text.split("\nmaas_authz_clock_offset_seconds ")[1].split()[0])

    try:
        assert abs(await eventually(authz_offset) - 120) < 1.0
        async with running(admin_settings(tmp_path, redis_url)) as (plane, _):
            registry = plane.metrics.registry
            offset = await eventually(lambda: registry.get_sample_value("maas_controlplane_clock_offset_seconds"))
            assert abs(offset - 120) < 1.0
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def _offset_of(url: str, metric: str) -> float | None:
    """A process's measured offset to Redis from its /metrics (None until it answers)."""
    try:
        async with aiohttp.ClientSession() as session, session.get(url + "/metrics") as resp:
            text = await resp.text()
    except aiohttp.ClientConnectionError:
        return None
    return float(text.split(f"\n{metric} ")[1].split()[0])


@pytest.mark.redis
@pytest.mark.parametrize("skew", [600.0, -600.0], ids=["authz+10m", "authz-10m"])
async def test_authz_judges_expiry_and_stamps_identities_by_redis_clock(
    redis_url: str, monkeypatch: pytest.MonkeyPatch, skew: float
) -> None:
    """An authz node ten minutes off: a key with two minutes left by Redis's clock (the control plane's, below) is
    let in and one two minutes past its expiry is kept out, whichever way the node is off; the identity it signs is
    stamped by Redis's clock, so a meter on the right time takes it (its own clock would be stale by ten minutes)."""
    real = time.time
    started = real()
    live = platform.Key("sk-clock-live-0001", "live", tier="enterprise", expires_at=started + 120)
    dead = platform.Key("sk-clock-dead-0001", "dead", tier="enterprise", expires_at=started - 120)
    store = RedisStore(redis_url, timeout=2.0)
    await platform.seed(store, PEPPER, keys=(live, dead))
    await store.close()
    monkeypatch.setattr(clock, "MAX_ROUND_TRIP", 10.0)
    monkeypatch.setattr(time, "time", lambda: real() + skew)
    settings = load(
        AuthzSettings,
        key_pepper=PEPPER.decode(),
        identity_secret=IDENTITY_SECRET,
        port=free_port(),
        ops_port=free_port(),
        redis_url=redis_url,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(serve_authz(settings, stop=stop))
    ops = f"http://127.0.0.1:{settings.ops_port}"
    try:
        offset = await eventually(lambda: _offset_of(ops, "maas_authz_clock_offset_seconds"))
        assert abs(offset + skew) < 1.0
        async with aiohttp.ClientSession() as session:
            answers = {}
            for key in (live, dead):
                headers = {"authorization": f"APIKEY {key.plaintext}"}
                url = f"http://127.0.0.1:{settings.port}/qwen3/v1/chat/completions"
                async with session.get(url, headers=headers) as resp:
                    answers[key.user] = (resp.status, {k.lower(): v for k, v in resp.headers.items()})
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
    assert answers["live"][0] == 200 and answers["dead"][0] == 401
    identity = verify(answers["live"][1], IDENTITY_SECRET.encode(), max_age=MAX_AGE, now=real())
    assert identity.user == "live"
    assert abs(int(answers["live"][1]["x-maas-identity-ts"]) - real()) <= SIGN_WINDOW + 1


@pytest.mark.redis
async def test_the_admin_api_sets_expiry_by_redis_clock(
    tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A control plane an hour ahead gives a key ``expires_in: 10m`` ten minutes of Redis's clock (authz judges by
    it), not ten minutes of its own (which every authz would see as 50 minutes past), and calls it active; its
    self-service API takes an identity authz stamped by Redis's clock."""
    real = time.time
    monkeypatch.setattr(clock, "MAX_ROUND_TRIP", 10.0)
    monkeypatch.setattr(time, "time", lambda: real() + 3600)
    settings = admin_settings(tmp_path, redis_url, identity_secret=IDENTITY_SECRET)
    async with running(settings) as (plane, api):
        registry = plane.metrics.registry
        offset = await eventually(lambda: registry.get_sample_value("maas_controlplane_clock_offset_seconds"))
        assert abs(offset + 3600) < 1.0
        status, created = await api.call("POST", "/admin/v1/keys", json={"user": "erin", "expires_in": "10m"})
        assert status == 201, created
        identity = Identity(key_id=created["key_id"], user="erin", groups="", tier="free", model=MODEL)
        headers = sign(identity, IDENTITY_SECRET.encode(), now=real())
        async with api.session.get(api.base + "/v1/me", headers=headers) as resp:
            me = await resp.json()
        assert resp.status == 200, me
        assert me["key_id"] == created["key_id"]
    expires = datetime.fromisoformat(created["expires_at"]).timestamp()
    assert abs(expires - (real() + 600)) < 5
    assert created["status"] == "active"
