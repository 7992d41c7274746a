"""The ``dir:PATH`` source: a directory of YAML/JSON manifests (multi-document files allowed, subdirectories
included, dotfiles ignored), rescanned every ``poll_interval`` seconds, so the product runs without a cluster.

Objects are normalised the way the API server would store them: namespaced objects without a namespace go to
``default`` and Secrets' ``stringData`` is folded into base64 ``data``; so the translators see the same objects
as from the ``kubernetes`` source. A file that fails to parse, or holds an object the API server would refuse (no
``metadata.name``), keeps its last good content and is reported.
``apply`` writes ``maas-<kind>-<namespace>-<name>.yaml`` into the directory (such a managed file wins over a user
manifest of the same object, so the admin API can edit a tier ConfigMap that came from a user file) and wakes the
watches at once; ``delete`` removes such a file. Files keep no versions: a write that carries a resourceVersion
replaces whatever is there, one without creates and, as on the API server, finds a conflict if the object exists.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import math
import os
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import yaml

from controlplane.errors import ConflictError, GoneError, SourceError
from controlplane.kinds import Kind, Obj, key_of, kind_of, labels_of, meta
from controlplane.selectors import compile_selector
from controlplane.sources.base import Listing, Stream, WatchEvent

log = logging.getLogger("maas.controlplane.dir")

SUFFIXES = (".yaml", ".yml", ".json")
SNAPSHOTS = 32
ObjId = tuple[str, str, str]
"""(kind name, namespace, name)"""


def _plain(value: Any) -> Any:
    """YAML as JSON would carry it: mapping keys as strings (``2025-01-01:`` and ``8080:`` are keys a ConfigMap may
    hold), dates and other scalars JSON lacks as text."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


def _normalise(doc: Obj, kind: Kind) -> Obj:
    obj: Obj = _plain(doc)
    if not isinstance(obj.get("metadata"), dict):
        obj["metadata"] = {}  # "metadata:" with nothing under it
    metadata = obj["metadata"]
    if not metadata.get("name") or not isinstance(metadata["name"], str):
        raise ValueError(f"a {kind.name} without metadata.name")  # the API server would not take it either
    if kind.namespaced:
        metadata["namespace"] = metadata.get("namespace") or "default"
    else:
        metadata.pop("namespace", None)
    if kind.name == "Secret" and isinstance(obj.get("stringData"), dict):
        if not isinstance(obj.get("data"), dict):
            obj["data"] = {}
        data = obj["data"]
        for field, value in obj.pop("stringData").items():
            text = "" if value is None else str(value)  # "api_key:" with nothing after it is empty, not "None"
            data[field] = base64.b64encode(text.encode()).decode()
    digest = hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()
    metadata["resourceVersion"] = digest[:16]
    metadata.setdefault("uid", hashlib.sha256(f"{kind.name}/{key_of(obj)}".encode()).hexdigest()[:32])
    return obj


def _field_matcher(selector: str) -> Callable[[Obj], bool]:
    wanted: dict[str, str] = {}
    for part in (p.strip() for p in selector.split(",") if p.strip()):
        name, _, value = part.partition("=")
        wanted[name.strip()] = value.lstrip("=").strip()

    def match(obj: Obj) -> bool:
        fields = {"metadata.name": key_of(obj)[1], "metadata.namespace": key_of(obj)[0]}
        return all(fields.get(k) == v for k, v in wanted.items())

    return match


class DirSource:
    def __init__(self, path: str | Path, *, poll_interval: float = 1.0) -> None:
        self.path = Path(path)
        self._poll = poll_interval
        self._files: dict[Path, tuple[tuple[int, int], list[tuple[Kind, Obj]]]] = {}
        self._snapshots: OrderedDict[str, dict[ObjId, Obj]] = OrderedDict()
        self._scan_lock = asyncio.Lock()
        self._built: tuple[str, dict[ObjId, Obj]] | None = None
        """The objects of the last scan, kept while no file changes (thousands of Secrets are not re-normalised
        and re-hashed every poll)."""
        self._last_at = -math.inf
        """When the last scan ended: the streams (one per kind, selector and namespace) share a scan made in the
        last half poll interval instead of each walking the folder ..."""
        self._writes = 0
        self._scanned_writes = -1
        """... unless a write through ``apply``/``delete`` came since that scan began (a read-modify-write must read
        what was just written, not a scan that was already under way)."""
        self._wakers: set[asyncio.Event] = set()
        self.on_bad_file: Callable[[Path, str], None] | None = None
        """Called with a file that failed to parse (the control plane counts it as a skipped object)."""

    async def close(self) -> None:
        self._snapshots.clear()

    def _read(self, file: Path) -> list[tuple[Kind, Obj]]:
        """The file's objects of the kinds we read, normalised (a file that fails here keeps its last good content)."""
        text = file.read_text()
        docs = list(yaml.safe_load_all(text)) if file.suffix != ".json" else [json.loads(text)]
        found: list[Obj] = []
        for doc in docs:
            if isinstance(doc, dict) and doc.get("kind") == "List":
                found += [d for d in doc.get("items") or [] if isinstance(d, dict)]
            elif isinstance(doc, dict):
                found.append(doc)
        out: list[tuple[Kind, Obj]] = []
        for doc in found:
            kind = kind_of(doc)
            if kind is not None:
                out.append((kind, _normalise(doc, kind)))
        return out

    def _scan_sync(self) -> tuple[str, dict[ObjId, Obj]]:
        if not self.path.is_dir():
            raise SourceError(f"manifest directory {self.path} does not exist")
        seen: dict[Path, tuple[tuple[int, int], list[tuple[Kind, Obj]]]] = {}
        changed = False
        for root, dirs, files in os.walk(self.path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(files):
                file = Path(root) / name
                if name.startswith(".") or file.suffix not in SUFFIXES:
                    continue
                try:
                    stat = file.stat()
                except OSError:
                    continue
                signature = (stat.st_mtime_ns, stat.st_size)
                cached = self._files.get(file)
                if cached is not None and cached[0] == signature:
                    seen[file] = cached
                    continue
                changed = True
                try:
                    seen[file] = (signature, self._read(file))
                except (OSError, ValueError, TypeError, AttributeError, yaml.YAMLError) as exc:
                    log.warning("skipping unreadable manifest file %s: %s", file, exc)
                    if self.on_bad_file is not None:
                        self.on_bad_file(file, str(exc))
                    seen[file] = (signature, cached[1] if cached else [])
        if not changed and self._built is not None and seen.keys() == self._files.keys():
            return self._built
        self._files = seen
        objects: dict[ObjId, Obj] = {}
        # Managed files (written by ``apply``) last, so they override a user manifest of the same object.
        ordered = sorted(seen.items(), key=lambda item: self._is_managed(item[0]))
        for _, (_, found) in ordered:
            for kind, obj in found:
                objects[(kind.name, *key_of(obj))] = obj
        version = hashlib.sha256(
            json.dumps(sorted((k, meta(o)["resourceVersion"]) for k, o in objects.items())).encode()
        ).hexdigest()[:16]
        self._built = (version, objects)
        return version, objects

    async def _scan(self) -> tuple[str, dict[ObjId, Obj]]:
        async with self._scan_lock:
            recent = time.monotonic() - self._last_at < self._poll / 2
            if self._built is not None and recent and self._scanned_writes == self._writes:
                version = self._built[0]
                if version in self._snapshots:
                    return version, self._snapshots[version]
            writes = self._writes
            version, objects = await asyncio.to_thread(self._scan_sync)
            self._last_at, self._scanned_writes = time.monotonic(), writes
            if version not in self._snapshots:
                self._snapshots[version] = objects
                while len(self._snapshots) > SNAPSHOTS:
                    self._snapshots.popitem(last=False)
            return version, self._snapshots[version]

    @staticmethod
    def _select(objects: dict[ObjId, Obj], stream: Stream) -> dict[ObjId, Obj]:
        label_match = compile_selector(stream.label_selector)
        field_match = _field_matcher(stream.field_selector)
        return {
            k: o
            for k, o in objects.items()
            if k[0] == stream.kind.name
            and (stream.namespace is None or k[1] == stream.namespace)
            and label_match(labels_of(o))
            and field_match(o)
        }

    async def list(self, stream: Stream) -> Listing:
        version, objects = await self._scan()
        return Listing(items=list(self._select(objects, stream).values()), resource_version=version)

    async def watch(self, stream: Stream, *, resource_version: str) -> AsyncIterator[WatchEvent]:
        previous = self._snapshots.get(resource_version)
        if previous is None:
            raise GoneError(f"directory snapshot {resource_version} is gone")
        before = self._select(previous, stream)
        waker = asyncio.Event()
        self._wakers.add(waker)
        try:
            async for event in self._changes(stream, before=before, resource_version=resource_version, waker=waker):
                yield event
        finally:
            self._wakers.discard(waker)

    async def _changes(
        self, stream: Stream, *, before: dict[ObjId, Obj], resource_version: str, waker: asyncio.Event
    ) -> AsyncIterator[WatchEvent]:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(waker.wait(), timeout=self._poll)
            waker.clear()
            version, objects = await self._scan()
            if version == resource_version:
                continue
            after = self._select(objects, stream)
            for ident, obj in after.items():
                old = before.get(ident)
                if old is None:
                    yield WatchEvent(type="ADDED", obj=obj, resource_version=version)
                elif meta(old)["resourceVersion"] != meta(obj)["resourceVersion"]:
                    yield WatchEvent(type="MODIFIED", obj=obj, resource_version=version)
            for ident, obj in before.items():
                if ident not in after:
                    yield WatchEvent(type="DELETED", obj=obj, resource_version=version)
            yield WatchEvent(type="BOOKMARK", resource_version=version)
            before, resource_version = after, version

    async def get(self, kind: Kind, namespace: str, name: str) -> Obj | None:
        _, objects = await self._scan()
        return objects.get((kind.name, namespace if kind.namespaced else "", name))

    def _managed_file(self, kind: Kind, namespace: str, name: str) -> Path:
        return self.path / f"maas-{kind.name.lower()}-{namespace or 'cluster'}-{name}.yaml"

    def _is_managed(self, file: Path) -> bool:
        return file.parent == self.path and file.name.startswith(("maas-secret-", "maas-configmap-"))

    def _wake(self) -> None:
        self._writes += 1  # the next scan reads the folder again
        for waker in self._wakers:
            waker.set()

    async def apply(self, obj: Obj) -> Obj:
        kind = kind_of(obj)
        if kind is None or kind.name not in ("Secret", "ConfigMap"):
            raise SourceError(f"cannot write {obj.get('kind')!r} objects to a manifest directory")
        normal = _normalise(obj, kind)
        namespace, name = key_of(normal)
        if not meta(obj).get("resourceVersion") and await self.get(kind, namespace, name) is not None:
            raise ConflictError(f"{kind.name} {namespace}/{name} exists already")
        target = self._managed_file(kind, namespace, name)
        clean: dict[str, Any] = {k: v for k, v in obj.items() if k != "status"}
        clean["metadata"] = {k: v for k, v in meta(obj).items() if k not in ("resourceVersion", "uid")}
        clean["metadata"]["namespace"] = namespace
        # a temporary file of its own per write: concurrent writes of one object must not rename each other's
        tmp = self.path / f".{target.name}.{secrets.token_hex(6)}.tmp"
        try:
            await asyncio.to_thread(tmp.write_text, yaml.safe_dump(clean, sort_keys=True))
            await asyncio.to_thread(os.replace, tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        self._wake()
        return normal

    async def delete(self, kind: Kind, namespace: str, name: str, *, resource_version: str = "") -> bool:
        """Files keep no versions (as in ``apply``): ``resource_version`` is not checked."""
        target = self._managed_file(kind, namespace, name)
        if target.exists():
            await asyncio.to_thread(target.unlink)
            self._wake()
            return True
        if await self.get(kind, namespace, name) is not None:
            raise SourceError(f"{kind.name} {namespace}/{name} is defined by a user manifest; edit that file")
        return False

    async def report(self, obj: Obj, *, reason: str, message: str) -> None:
        """No API server to hold an Event: the warning log and the metric are the report."""
