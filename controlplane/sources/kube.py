"""The ``kubernetes`` source: kubernetes-asyncio's ApiClient (in-cluster config or a kubeconfig) speaking the
list/watch protocol directly, so objects stay plain dicts exactly as the API server sends them.

Lists and watches, writes (Events, admin-issued Secrets and tiers) and the leader-election Lease each have a
connection pool of their own: a watch holds its connection for minutes, and the Lease must never wait for one.

Only this module catches aiohttp's and kubernetes-asyncio's exceptions; they leave it as ``SourceError``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import time
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from typing import Any, Self

import aiohttp
from kubernetes_asyncio import client as k8s
from kubernetes_asyncio import config as k8s_config

from controlplane.errors import ConflictError, GoneError, NotFoundError, SourceError, ThrottledError
from controlplane.kinds import EVENT, Kind, Obj, key_of, kind_of, meta
from controlplane.sources.base import Listing, Stream, WatchEvent

log = logging.getLogger("maas.controlplane.kube")

PAGE_SIZE = 500
REQUEST_TIMEOUT = 30.0
STREAM_POOL_HEADROOM = 4
"""Connections beyond one per stream (a reflector lists or watches, one request at a time)."""
WRITE_POOL = 16
LEASE_POOL = 2
COMPONENT = "maas-controlplane"
THROTTLE_RETRIES = 3
"""Retries of a request the API server answered 429 (it did not run it), each after its ``Retry-After``."""
THROTTLE_WAIT_MAX = 2.0
"""Cap of one wait, seconds (a missing or unreadable ``Retry-After`` waits 1 s)."""


def micro_time(epoch: float | None = None) -> str:
    moment = datetime.fromtimestamp(time.time() if epoch is None else epoch, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class KubeSource:
    def __init__(
        self,
        api: k8s.ApiClient,
        *,
        watch_timeout: int = 290,
        writes: k8s.ApiClient | None = None,
        lease: KubeSource | None = None,
    ) -> None:
        self._api = api
        """Lists and watches."""
        self._writes = writes or api
        """Everything else: gets and writes."""
        self.lease_client = lease or self
        """The leader election's client (on a pool of its own)."""
        self._watch_timeout = watch_timeout

    @classmethod
    async def connect(cls, *, kubeconfig: str | None = None, watch_timeout: int = 290, streams: int = 1) -> Self:
        """``streams``: how many streams will be listed and watched at once (the size of their pool)."""
        configuration = k8s.Configuration()
        try:
            if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
                k8s_config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
            else:
                await k8s_config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
        except (k8s_config.ConfigException, OSError, ValueError) as exc:
            raise SourceError(f"cannot load Kubernetes configuration: {exc}") from exc

        def client(pool: int) -> k8s.ApiClient:
            configuration.connection_pool_maxsize = pool  # read when the client's connector is made
            return k8s.ApiClient(configuration)

        lease = cls(client(LEASE_POOL), watch_timeout=watch_timeout)
        streams_api = client(streams + STREAM_POOL_HEADROOM)
        return cls(streams_api, watch_timeout=watch_timeout, writes=client(WRITE_POOL), lease=lease)

    async def close(self) -> None:
        await self._api.close()
        if self._writes is not self._api:
            await self._writes.close()
        if self.lease_client is not self:
            await self.lease_client.close()

    async def _open(
        self,
        method: str,
        path: str,
        *,
        query: Sequence[tuple[str, str]] = (),
        body: Obj | None = None,
        limit: aiohttp.ClientTimeout | float = REQUEST_TIMEOUT,
        api: k8s.ApiClient | None = None,
    ) -> aiohttp.ClientResponse:
        try:
            response: aiohttp.ClientResponse = await (api or self._writes).call_api(
                path,
                method,
                query_params=list(query),
                header_params={"Accept": "application/json", "Content-Type": "application/json"},
                body=body,
                auth_settings=["BearerToken"],
                _preload_content=False,
                _request_timeout=limit,
            )
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise SourceError(f"{method} {path}: {type(exc).__name__}: {exc}") from exc
        return response

    async def _call(
        self,
        method: str,
        path: str,
        *,
        query: Sequence[tuple[str, str]] = (),
        body: Obj | None = None,
        api: k8s.ApiClient | None = None,
    ) -> Obj:
        for attempt in range(THROTTLE_RETRIES + 1):
            response = await self._open(method, path, query=query, body=body, api=api)
            try:
                async with response:
                    text = await response.text()
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                raise SourceError(f"{method} {path}: {type(exc).__name__}: {exc}") from exc
            if response.status != 429:
                break
            wait = retry_after(response.headers.get("Retry-After"))
            if attempt == THROTTLE_RETRIES:
                raise ThrottledError(f"{method} {path}: HTTP 429: {text[:300]}", retry_after=wait)
            log.info("%s %s: throttled by the API server, retrying in %.1fs", method, path, wait)
            await asyncio.sleep(wait)
        _raise_for_status(response.status, text, what=f"{method} {path}")
        try:
            value = json.loads(text) if text else {}
        except ValueError as exc:
            raise SourceError(f"{method} {path}: response is not JSON") from exc
        return value if isinstance(value, dict) else {}

    async def list(self, stream: Stream) -> Listing:
        items: list[Obj] = []
        token = ""
        while True:
            query = [*_selectors(stream), ("limit", str(PAGE_SIZE))]
            if token:
                query.append(("continue", token))
            page = await self._call("GET", stream.kind.base_path(stream.namespace), query=query, api=self._api)
            for item in page.get("items") or []:
                item.setdefault("kind", stream.kind.name)
                item.setdefault("apiVersion", stream.kind.api_version)
                items.append(item)
            list_meta = page.get("metadata") or {}
            token = str(list_meta.get("continue") or "")
            if not token:
                return Listing(items=items, resource_version=str(list_meta.get("resourceVersion") or ""))

    async def watch(self, stream: Stream, *, resource_version: str) -> AsyncIterator[WatchEvent]:
        query = [
            *_selectors(stream),
            ("watch", "true"),
            ("resourceVersion", resource_version),
            ("allowWatchBookmarks", "true"),
            ("timeoutSeconds", str(self._watch_timeout)),
        ]
        # The server ends the watch after timeoutSeconds; a connection that stays silent longer is dead. ``connect``
        # bounds the wait for a free connection too: a watch starved of one fails (logged, counted, retried).
        timeout = aiohttp.ClientTimeout(
            total=None, connect=REQUEST_TIMEOUT, sock_connect=REQUEST_TIMEOUT, sock_read=self._watch_timeout + 30
        )
        path = stream.kind.base_path(stream.namespace)
        response = await self._open("GET", path, query=query, limit=timeout, api=self._api)
        async with response:
            if response.status != 200:
                _raise_for_status(response.status, await _safe_text(response), what=f"watch {stream.name}")
            try:
                async for line in response.content:
                    if line.strip():
                        yield _event(line, stream)
            except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
                raise SourceError(f"watch {stream.name} broke: {type(exc).__name__}: {exc}") from exc

    async def get(self, kind: Kind, namespace: str, name: str) -> Obj | None:
        try:
            return await self._call("GET", f"{kind.base_path(namespace)}/{name}")
        except NotFoundError:
            return None

    async def create(self, obj: Obj) -> Obj:
        kind = _kind(obj)
        namespace, _ = key_of(obj)
        return await self._call("POST", kind.base_path(namespace), body=obj)

    async def replace(self, obj: Obj) -> Obj:
        kind = _kind(obj)
        namespace, name = key_of(obj)
        return await self._call("PUT", f"{kind.base_path(namespace)}/{name}", body=obj)

    async def apply(self, obj: Obj) -> Obj:
        """A create, or a replace conditional on the resourceVersion ``obj`` carries; never a replace of a version
        this writer has not read: an object another writer created in between (409 AlreadyExists) is its content,
        and the caller reads it and redoes its change on top of it (or draws another name)."""
        kind = _kind(obj)
        namespace, name = key_of(obj)
        if not meta(obj).get("resourceVersion"):
            try:
                return await self.create(obj)
            except ConflictError as exc:
                raise ConflictError(f"{kind.name} {namespace}/{name} exists already: {exc}") from exc
        try:
            return await self.replace(obj)  # conditional: the API server refuses a stale resourceVersion
        except NotFoundError as exc:
            raise ConflictError(f"{kind.name} {namespace}/{name} was deleted while being changed") from exc

    async def delete(self, kind: Kind, namespace: str, name: str, *, resource_version: str = "") -> bool:
        options: Obj | None = None
        if resource_version:  # the API server answers 409 if the object is at another version
            preconditions = {"resourceVersion": resource_version}
            options = {"apiVersion": "v1", "kind": "DeleteOptions", "preconditions": preconditions}
        try:
            await self._call("DELETE", f"{kind.base_path(namespace)}/{name}", body=options)
        except NotFoundError:
            return False
        return True

    async def report(self, obj: Obj, *, reason: str, message: str) -> None:
        namespace, name = key_of(obj)
        # The API server takes a core Event only in its involved object's namespace, or, for a cluster-scoped
        # object, in `default`. The sync reports namespaced objects only (a ClusterServingRuntime's problem is
        # reported on the InferenceService using it), so deploy/ grants Events in the watched namespaces alone.
        namespace = namespace or "default"
        now = micro_time()
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{name}.", "namespace": namespace},
            "involvedObject": {
                "apiVersion": obj.get("apiVersion", ""),
                "kind": obj.get("kind", ""),
                "name": name,
                "namespace": key_of(obj)[0],
                "uid": meta(obj).get("uid", ""),
                "resourceVersion": meta(obj).get("resourceVersion", ""),
            },
            "reason": reason,
            "message": message[:1000],
            "type": "Warning",
            "source": {"component": COMPONENT},
            "reportingComponent": COMPONENT,
            "reportingInstance": COMPONENT,
            "firstTimestamp": now[:19] + "Z",
            "lastTimestamp": now[:19] + "Z",
            "count": 1,
        }
        await self._call("POST", EVENT.base_path(namespace), body=event)


def _kind(obj: Obj) -> Kind:
    kind = kind_of(obj)
    if kind is None:
        raise SourceError(f"unsupported object kind {obj.get('apiVersion')}/{obj.get('kind')}")
    return kind


def _selectors(stream: Stream) -> list[tuple[str, str]]:
    query = []
    if stream.label_selector:
        query.append(("labelSelector", stream.label_selector))
    if stream.field_selector:
        query.append(("fieldSelector", stream.field_selector))
    return query


async def _safe_text(response: aiohttp.ClientResponse) -> str:
    try:
        return await response.text()
    except (aiohttp.ClientError, TimeoutError, OSError):
        return ""


def retry_after(header: str | None) -> float:
    """Seconds to wait before retrying a 429: its ``Retry-After`` in seconds (an HTTP date counts as 1 s), at most
    ``THROTTLE_WAIT_MAX``."""
    try:
        seconds = float(header) if header is not None else 1.0
    except ValueError:
        seconds = 1.0
    return min(max(seconds, 0.0), THROTTLE_WAIT_MAX) if math.isfinite(seconds) else 1.0


def _raise_for_status(status: int, text: str, *, what: str) -> None:
    if 200 <= status < 300:
        return
    message = f"{what}: HTTP {status}: {text[:300]}"
    if status == 410:
        raise GoneError(message)
    if status == 409:
        raise ConflictError(message)
    if status == 404:
        raise NotFoundError(message)
    raise SourceError(message)


def _event(line: bytes, stream: Stream) -> WatchEvent:
    try:
        data: dict[str, Any] = json.loads(line)
    except ValueError as exc:
        raise SourceError(f"watch {stream.name}: undecodable event") from exc
    kind = data.get("type")
    obj = data.get("object") if isinstance(data.get("object"), dict) else {}
    assert isinstance(obj, dict)
    if kind == "ERROR":
        code = obj.get("code")
        message = f"watch {stream.name}: {obj.get('reason', '')} {obj.get('message', '')}".strip()
        raise GoneError(message) if code == 410 else SourceError(message)
    if kind not in ("ADDED", "MODIFIED", "DELETED", "BOOKMARK"):
        raise SourceError(f"watch {stream.name}: unknown event type {kind!r}")
    obj.setdefault("kind", stream.kind.name)
    obj.setdefault("apiVersion", stream.kind.api_version)
    return WatchEvent(type=kind, obj=obj, resource_version=str(meta(obj).get("resourceVersion") or ""))
