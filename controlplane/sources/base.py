"""The source interface: where cluster objects come from (the API server, or a directory of manifests).

A source lists and watches one ``Stream`` at a time (a kind, optionally one namespace, a label and a field
selector), with Kubernetes semantics: a listing carries a resourceVersion; a watch from it yields every change
after it, in order, and raises ``GoneError`` when that version is too old. Secrets and ConfigMaps can also be
written (``apply``/``delete``): the admin API stores admin-issued keys as Secrets holding only the digest.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal, Protocol

from controlplane.kinds import Kind, Obj

EventType = Literal["ADDED", "MODIFIED", "DELETED", "BOOKMARK"]


@dataclass(frozen=True, slots=True)
class Stream:
    kind: Kind
    namespace: str | None = None
    label_selector: str = ""
    field_selector: str = ""

    @property
    def name(self) -> str:
        parts = [self.kind.plural, self.namespace or "*"]
        if self.label_selector:
            parts.append(self.label_selector)
        if self.field_selector:
            parts.append(self.field_selector)
        return "/".join(parts)


@dataclass(frozen=True, slots=True)
class Listing:
    items: list[Obj]
    resource_version: str


@dataclass(frozen=True, slots=True)
class WatchEvent:
    type: EventType
    obj: Obj = field(default_factory=dict)
    resource_version: str = ""


class Source(Protocol):
    async def list(self, stream: Stream) -> Listing: ...

    def watch(self, stream: Stream, *, resource_version: str) -> AsyncIterator[WatchEvent]:
        """Changes after ``resource_version``; may end (server-side timeout): the caller watches again from the
        last version it saw. Raises ``GoneError`` when the version is too old, ``SourceError`` on failure."""
        ...

    async def get(self, kind: Kind, namespace: str, name: str) -> Obj | None: ...

    async def apply(self, obj: Obj) -> Obj:
        """Write the Secret or ConfigMap; returns the stored object. Without ``metadata.resourceVersion`` it is
        created: ``ConflictError`` if it exists already (another writer's object is never written over unread).
        With it (as ``get`` returned it) the object is replaced, conditionally where the source keeps versions (the
        Kubernetes API): ``ConflictError`` if the object changed or went away since."""
        ...

    async def delete(self, kind: Kind, namespace: str, name: str, *, resource_version: str = "") -> bool:
        """True if the object existed. With ``resource_version`` the delete is conditional where the source keeps
        versions: ``ConflictError`` if the object changed since."""
        ...

    async def report(self, obj: Obj, *, reason: str, message: str) -> None:
        """Tell the object's owner about a problem (a Kubernetes Warning Event, where there is an API server)."""
        ...

    async def close(self) -> None: ...
