"""The control plane process: a store, a source, one reflector per stream, the sync loop, leader election and
the HTTP ports, as named tasks whose failures are logged. Used by ``maas controlplane`` and by tests."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from aiohttp import web

from controlplane import kinds
from controlplane.admin.app import main_app
from controlplane.admin.auth import TokenBook
from controlplane.admin.context import AdminContext
from controlplane.admin.state import AdminState
from controlplane.leader import AlwaysLeader, LeaseElector
from controlplane.metrics import Metrics
from controlplane.ops import ApiRunner, Parts, ops_app
from controlplane.reflector import Reflector
from controlplane.settings import ControlPlaneSettings
from controlplane.sources import Source, Stream, open_source
from controlplane.sources.directory import DirSource
from controlplane.sources.kube import KubeSource
from controlplane.sync import Syncer
from controlplane.tasks import spawn
from gateway.clock import ClockOffset, SharedClock
from gateway.errors import ConfigError
from gateway.settings import split_csv
from gateway.store import Store, open_store

log = logging.getLogger("maas.controlplane")

TASK_STOP_SECONDS = 5.0
"""How long the background tasks (watches, sync, leader election) may take to stop once cancelled."""
LEASE_RELEASE_SECONDS = 3.0
"""How long handing the Lease back may take; past it the Lease expires on its own."""
PORT_STOP_SECONDS = 3.0
"""How long stopping each HTTP port may take."""
STOP_SECONDS = TASK_STOP_SECONDS + LEASE_RELEASE_SECONDS + 2 * PORT_STOP_SECONDS
"""The longest a stop takes (the main and the ops port stop one after the other) before the connections to the API
server and Redis close: what the pod's termination grace must leave after its preStop."""
REQUEST_GRACE_SECONDS = 1.0
"""How long a request in flight may go on once the process stops, before it is cancelled: a third of
``PORT_STOP_SECONDS``, so that what a cancelled request undoes (a rotation's new key withdrawn) has the rest. aiohttp's
own default (60 s) outlasted the port's stop: the requests were never cancelled, just dropped with the process."""


def streams(settings: ControlPlaneSettings) -> list[Stream]:
    namespaces: tuple[str | None, ...] = settings.namespace_list or (None,)
    out: list[Stream] = []
    for ns in namespaces:
        out += [Stream(kinds.SECRET, ns, label_selector=sel) for sel in settings.selector_list]
        for name in dict.fromkeys((settings.tier_configmap, settings.tier_limits_configmap)):
            out.append(Stream(kinds.CONFIGMAP, ns, field_selector=f"metadata.name={name}"))
        out += [Stream(kinds.ISVC, ns), Stream(kinds.RUNTIME, ns), Stream(kinds.HTTPROUTE, ns)]
    out.append(Stream(kinds.CLUSTER_RUNTIME))
    return out


class ControlPlane:
    def __init__(
        self, settings: ControlPlaneSettings, *, store: Store | None = None, source: Source | None = None
    ) -> None:
        if settings.directory is not None and settings.leader_election:
            raise ConfigError("--leader-election needs --source kubernetes (a Lease lives in the API server)")
        self.settings = settings
        self.metrics = Metrics()
        self.store = store
        self.source = source
        self.syncer: Syncer | None = None
        self.elector: LeaseElector | AlwaysLeader = AlwaysLeader()
        self.ports: dict[str, int] = {}
        self.admin: AdminState | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self.failed = asyncio.Event()
        """Set when a background task (a watch, the sync, leader election, the admin view) dies of an error: the
        process cannot do its job any more and should exit, so Kubernetes restarts it."""
        self._runners: list[web.AppRunner] = []

    async def start(self) -> None:
        settings = self.settings
        self.store = self.store or open_store(settings.redis_url, timeout=max(settings.store_timeout, 2.0))
        wanted = streams(settings)
        self.source = self.source or await open_source(settings, streams=len(wanted))
        if settings.elect:
            if not isinstance(self.source, KubeSource):
                raise ConfigError("leader election needs the kubernetes source")
            self.elector = LeaseElector(
                client=self.source.lease_client,
                name=settings.lease_name,
                namespace=settings.lease_namespace,
                identity=settings.holder_identity,
                lease_duration=settings.lease_duration,
                renew_deadline=settings.renew_deadline,
                retry_period=settings.retry_period,
                on_change=self._leadership,
            )
        syncer = self.syncer = Syncer(
            store=self.store,
            source=self.source,
            metrics=self.metrics,
            is_leader=self.elector.is_leader,
            resync_period=settings.resync_period,
            pepper=settings.pepper,
            default_tier=settings.default_tier,
            tier_configmap=settings.tier_configmap,
            tier_limits_configmap=settings.tier_limits_configmap,
            tier_namespace=settings.tier_namespace,
            gateways=frozenset(split_csv(settings.gateways)),
        )
        if isinstance(self.source, DirSource):
            self.source.on_bad_file = self._bad_file
        for stream in wanted:
            reflector = Reflector(
                source=self.source,
                stream=stream,
                on_change=syncer.on_change,
                metrics=self.metrics,
                backoff_max=settings.backoff_max,
            )
            syncer.add(reflector)
            self._tasks.append(spawn(reflector.run(), name=f"watch:{stream.name}", log=log))
        self._tasks.append(spawn(self.elector.run(), name="leader-election", log=log))
        self._tasks.append(spawn(syncer.run(), name="sync", log=log))
        self._tasks.append(spawn(syncer.events.run(), name="events", log=log))
        admin = self.admin = AdminState(self.store, default_tier=settings.default_tier)
        self._tasks.append(spawn(admin.run(), name="admin-view", log=log))
        clock = ClockOffset(self.metrics.clock_offset, logger=log)
        if isinstance(self.store, SharedClock):
            self._tasks.append(spawn(clock.run(self.store), name="clock-offset", log=log))
        for task in self._tasks:
            task.add_done_callback(self._task_ended)
        parts = Parts(syncer=syncer, metrics=self.metrics, elector=self.elector, started=time.monotonic())
        self.ports["ops"] = await self._serve(ops_app(parts), settings.ops_port)
        self.ports["main"] = await self._serve(main_app(parts, self._admin_context(admin, clock)), settings.port)
        log.info("control plane started", extra={"ports": self.ports, "source": settings.source})

    def _admin_context(self, admin: AdminState, clock: ClockOffset) -> AdminContext:
        settings = self.settings
        assert self.syncer is not None and self.source is not None
        syncer = self.syncer

        def tier_namespace() -> str:
            """Where the tiers in use live (so a write edits those), else where new ones go."""
            return syncer.desired.tier_namespace() or settings.tier_namespace or settings.key_namespace_name

        return AdminContext(
            state=admin,
            source=self.source,
            tokens=TokenBook(path=settings.admin_token_file, dev=settings.dev),
            pepper=settings.pepper,
            identity_secret=settings.identity_key,
            key_namespace=settings.key_namespace_name,
            tier_namespace=tier_namespace,
            tier_configmap=settings.tier_configmap,
            tier_limits_configmap=settings.tier_limits_configmap,
            write_timeout=settings.admin_write_timeout,
            window_borrowers=lambda tier: syncer.desired.window_borrowers(tier, now=clock.now()),
            now=clock.now,
        )

    async def _serve(self, app: web.Application, port: int) -> int:
        runner = ApiRunner(app, access_log=None, handle_signals=False, shutdown_timeout=REQUEST_GRACE_SECONDS)
        await runner.setup()
        site = web.TCPSite(runner, self.settings.host, port)
        await site.start()
        self._runners.append(runner)
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        return int(sockets[0].getsockname()[1]) if sockets else port

    def _leadership(self, leading: bool) -> None:
        self.metrics.leader.set(1 if leading else 0)
        if leading and self.syncer is not None:
            self.syncer.request_full()

    def _task_ended(self, task: asyncio.Task[Any]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.failed.set()  # the task module has logged the error with its traceback

    def _bad_file(self, path: object, message: str) -> None:
        self.metrics.skipped.labels(kind="File", reason="invalid_yaml").inc()

    async def stop(self) -> None:
        """Graceful and bounded: a task or a peer that does not answer must not keep the process from exiting
        (Kubernetes would SIGKILL it, and the Lease would only pass on after it expires)."""
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            _, stuck = await asyncio.wait(self._tasks, timeout=TASK_STOP_SECONDS)
            for task in stuck:
                log.warning("task %s did not stop within %ss", task.get_name(), TASK_STOP_SECONDS)
        self._tasks.clear()
        try:
            async with asyncio.timeout(LEASE_RELEASE_SECONDS):
                await self.elector.release()
        except TimeoutError:
            log.warning("releasing the lease timed out; it expires on its own")
        for runner in self._runners:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(PORT_STOP_SECONDS):
                    await runner.cleanup()
        self._runners.clear()
        if self.source is not None:
            await self.source.close()
        if self.store is not None:
            await self.store.close()
