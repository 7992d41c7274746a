"""A Kubernetes API emulator for tests: an aiohttp server, on its own thread and event loop, that speaks enough of
the API server's REST protocol for kubernetes-asyncio and the control plane:

- list (with ``labelSelector``, ``fieldSelector`` on ``metadata.name``/``metadata.namespace``, ``limit`` and
  ``continue``), returning the collection's resourceVersion;
- watch (``watch=true``) from a resourceVersion, replaying the history after it; objects that start or stop
  matching a label selector arrive as ADDED / DELETED; ``allowWatchBookmarks``; ``timeoutSeconds``;
  a resourceVersion older than the compacted history gets an ERROR event with a 410 Status;
- get, create (``generateName`` too), replace (409 on a stale resourceVersion), delete (409 when its
  ``preconditions.resourceVersion`` is stale);
- the API server's rule for a core Event's namespace (422 otherwise): its ``involvedObject``'s namespace, or
  ``default`` for a cluster-scoped object;
- on demand: ``force_gone()`` (every open watch gets a 410 and the history is compacted),
  ``drop_watches()`` (open watch connections are cut without a clean end), ``disconnect()``/``reconnect()`` (an
  outage: watches cut, every request answered 503 until reconnected), ``uninstall()`` (a CRD removed: its kind
  answers 404), ``watch_fault`` (every watch ends at once, cleanly or with a 410), ``inject()`` (the next
  requests of one verb and resource, or of one object, answered with an error status: a 409 Conflict, a 429 with
  ``Retry-After``) and ``intercept()`` (another writer's change made just before the next such request is served);
- optionally RBAC: with ``authorize`` set (``rbac_authorizer`` evaluates rendered Roles, ClusterRoles and their
  bindings for one service account), a request its rules do not allow gets the API server's 403 Forbidden.

Mutations from the test thread are serialised with a lock; events are delivered in resourceVersion order.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import inspect
import itertools
import json
import re
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

Obj = dict[str, Any]

# (group, plural) -> (kind, namespaced)
RESOURCES: dict[tuple[str, str], tuple[str, bool]] = {
    ("", "secrets"): ("Secret", True),
    ("", "configmaps"): ("ConfigMap", True),
    ("", "events"): ("Event", True),
    ("", "services"): ("Service", True),
    ("coordination.k8s.io", "leases"): ("Lease", True),
    ("serving.kserve.io", "inferenceservices"): ("InferenceService", True),
    ("serving.kserve.io", "servingruntimes"): ("ServingRuntime", True),
    ("serving.kserve.io", "clusterservingruntimes"): ("ClusterServingRuntime", False),
    ("gateway.networking.k8s.io", "httproutes"): ("HTTPRoute", True),
}
BY_KIND = {(g, kind): plural for (g, plural), (kind, _) in RESOURCES.items()}
_GONE = object()
_DROP = object()

Authorizer = Callable[[str, str, str, str | None, str | None], bool]
"""(verb, API group, plural, namespace or None, object name or None) -> whether the caller may."""

LOST_STATUS = web.RequestKey("lost_status", int)
"""The status a served request is answered with instead of its result (``lose_answer``)."""


def rbac_authorizer(objects: Iterable[Obj], namespace: str, service_account: str) -> Authorizer:
    """What the Roles and ClusterRoles bound (RoleBinding: in its namespace; ClusterRoleBinding: everywhere) to
    the service account allow, with resourceNames honoured as the API server does (never for list, watch or
    create, whose requests name no object)."""
    objs = list(objects)
    roles = {(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]): o for o in objs}
    grants: list[tuple[str | None, Obj]] = []
    for binding in objs:
        if binding["kind"] not in {"RoleBinding", "ClusterRoleBinding"}:
            continue
        if not any(
            s["kind"] == "ServiceAccount" and s["name"] == service_account and s.get("namespace") == namespace
            for s in binding.get("subjects", [])
        ):
            continue
        ref = binding["roleRef"]
        scope = binding["metadata"].get("namespace") if binding["kind"] == "RoleBinding" else None
        role = roles.get((ref["kind"], scope if ref["kind"] == "Role" else None, ref["name"]))
        if role is not None:
            grants += [(scope, rule) for rule in role.get("rules", [])]

    def allows(verb: str, group: str, plural: str, ns: str | None, name: str | None) -> bool:
        for scope, rule in grants:
            if scope is not None and scope != ns:
                continue
            if group not in rule["apiGroups"] or plural not in rule["resources"] or verb not in rule["verbs"]:
                continue
            names = rule.get("resourceNames")
            if not names or name in names:
                return True
        return False

    return allows


def _group(api_version: str) -> str:
    return api_version.rpartition("/")[0]


def resource_of(obj: Obj) -> tuple[str, str]:
    group = _group(str(obj.get("apiVersion", "")))
    return group, BY_KIND[(group, str(obj["kind"]))]


def _label_matcher(selector: str) -> Any:
    requirements = []
    for part in re.split(r",(?![^()]*\))", selector):
        part = part.strip()
        if not part:
            continue
        m = re.match(r"^([^\s!=]+)\s+(in|notin)\s+\(([^)]*)\)$", part)
        if m:
            values = {v.strip() for v in m.group(3).split(",")}
            requirements.append((m.group(1), m.group(2), values))
        elif "!=" in part:
            key, value = part.split("!=", 1)
            requirements.append((key.strip(), "!=", value.strip()))
        elif "=" in part:
            key, value = part.replace("==", "=").split("=", 1)
            requirements.append((key.strip(), "=", value.strip()))
        elif part.startswith("!"):
            requirements.append((part[1:], "!exists", None))
        else:
            requirements.append((part, "exists", None))

    def check(labels: dict[str, str], key: str, op: str, value: Any) -> bool:
        have = labels.get(key)
        if op == "=":
            return have == value
        if op == "!=":
            return have != value
        if op == "in":
            return have is not None and have in value
        if op == "notin":
            return have is None or have not in value
        return (key in labels) == (op == "exists")

    def match(labels: dict[str, str]) -> bool:
        return all(check(labels, key, op, value) for key, op, value in requirements)

    return match


@dataclass
class _Event:
    rv: int
    type: str
    resource: tuple[str, str]
    old: Obj | None
    new: Obj


@dataclass(eq=False)
class _Filter:
    resource: tuple[str, str]
    namespace: str | None
    labels: Any
    fields: dict[str, str]

    def matches(self, obj: Obj | None) -> bool:
        if obj is None:
            return False
        meta = obj.get("metadata") or {}
        if self.namespace is not None and meta.get("namespace") != self.namespace:
            return False
        fields = {"metadata.name": meta.get("name"), "metadata.namespace": meta.get("namespace")}
        if any(fields.get(k) != v for k, v in self.fields.items()):
            return False
        return bool(self.labels(meta.get("labels") or {}))


def _event_namespace_problem(event: Obj) -> str | None:
    """As the API server validates a core/v1 Event without ``eventTime``: in its involved object's namespace, or
    for a cluster-scoped object (no namespace) in ``default`` (or none)."""
    involved = str((event.get("involvedObject") or {}).get("namespace") or "")
    namespace = str(event["metadata"].get("namespace") or "")
    allowed = {involved} if involved else {"", "default"}
    if namespace in allowed:
        return None
    name = event["metadata"].get("name") or event["metadata"].get("generateName", "")
    return f"Event {name!r} is invalid: involvedObject.namespace: does not match event.namespace"


def _verb(method: str, name: str | None, watch: bool) -> str:
    if name is None:
        return {"GET": "watch" if watch else "list", "POST": "create"}.get(method, method.lower())
    return {"GET": "get", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}.get(method, method.lower())


def _status(code: int, reason: str, message: str) -> web.Response:
    body = {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    return web.json_response(body, status=code)


class K8sEmulator:
    def __init__(self, *, bookmark_interval: float = 0.5) -> None:
        self.bookmark_interval = bookmark_interval
        self._lock = threading.RLock()
        self._objects: dict[tuple[str, str], dict[tuple[str, str], Obj]] = {r: {} for r in RESOURCES}
        self._history: list[_Event] = []
        self._rv = 1000
        self._compacted = 0
        self._watchers: set[tuple[_Filter, asyncio.Queue[Any]]] = set()
        self._pages: dict[str, list[Obj]] = {}
        self._page_ids = itertools.count(1)
        self.requests: Counter[str] = Counter()
        """``"<verb> <plural>"`` -> count (verbs: list, watch, get, create, update, delete)."""
        self.authorize: Authorizer | None = None
        """When set, requests it refuses get 403 Forbidden (and are listed in ``forbidden``)."""
        self.forbidden: list[str] = []
        self.watch_fault: str | None = None
        """``"eof"``: every watch ends at once with a clean 200 and no event; ``"gone"``: every watch gets a 410."""
        self._faults: list[tuple[str, str | None, int, int]] = []
        self._intercepts: list[tuple[str, str | None, Callable[[], object]]] = []
        self._lost: list[tuple[str, str | None, int]] = []
        self.down = False
        """During an outage (``disconnect``) every request gets 503."""
        self.unserved: set[tuple[str, str]] = set()
        """(group, plural) of kinds whose CRD was removed (``uninstall``): 404, as for an unknown resource."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self.port = 0

    # --- lifecycle -----------------------------------------------------------------------------------------

    def start(self) -> K8sEmulator:
        ready = threading.Event()

        def main() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            loop.run_until_complete(self._serve())
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._shutdown())
            loop.close()

        self._thread = threading.Thread(target=main, name="k8s-emulator", daemon=True)
        self._thread.start()
        ready.wait(10)
        return self

    async def _serve(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/api/{version}/{rest:.*}", self._handle_core)
        app.router.add_route("*", "/apis/{group}/{version}/{rest:.*}", self._handle_group)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def _shutdown(self) -> None:
        for _, queue in list(self._watchers):
            queue.put_nowait(_DROP)
        if self._runner is not None:
            await self._runner.cleanup()

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def write_kubeconfig(self, path: Path) -> Path:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "emulator", "cluster": {"server": self.url}}],
            "users": [{"name": "tester", "user": {"token": "emulator-token"}}],
            "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "tester"}}],
            "current-context": "emulator",
        }
        path.write_text(json.dumps(config))
        return path

    # --- state, callable from any thread -------------------------------------------------------------------

    def _publish(self, event: _Event) -> None:
        self._history.append(event)
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._broadcast, event)

    def _broadcast(self, event: _Event) -> None:
        for filt, queue in list(self._watchers):
            if filt.resource == event.resource:
                queue.put_nowait(event)

    def _next_rv(self) -> int:
        self._rv += 1
        return self._rv

    def create(self, obj: Obj) -> Obj:
        with self._lock:
            resource = resource_of(obj)
            namespaced = RESOURCES[resource][1]
            new = copy.deepcopy(obj)
            meta = new.setdefault("metadata", {})
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = f"{meta['generateName']}{uuid.uuid4().hex[:5]}"
            if namespaced:
                meta["namespace"] = meta.get("namespace") or "default"
            else:
                meta.pop("namespace", None)
            key = (meta.get("namespace", ""), meta["name"])
            if key in self._objects[resource]:
                raise KeyError(f"{resource[1]} {key} already exists")
            if new.get("kind") == "Secret" and isinstance(new.get("stringData"), dict):
                data = new.setdefault("data", {})
                for field, value in new.pop("stringData").items():
                    data[field] = base64.b64encode(str(value).encode()).decode()
            rv = self._next_rv()
            meta.update(
                uid=str(uuid.uuid4()),
                resourceVersion=str(rv),
                creationTimestamp=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            )
            self._objects[resource][key] = new
            self._publish(_Event(rv, "ADDED", resource, None, copy.deepcopy(new)))
            return copy.deepcopy(new)

    def replace(self, obj: Obj, *, check_version: bool = False) -> Obj:
        with self._lock:
            resource = resource_of(obj)
            meta_in = obj.get("metadata") or {}
            namespaced = RESOURCES[resource][1]
            key = ((meta_in.get("namespace") or "default") if namespaced else "", meta_in["name"])
            old = self._objects[resource].get(key)
            if old is None:
                raise LookupError(f"{resource[1]} {key} not found")
            if check_version and meta_in.get("resourceVersion") not in (None, old["metadata"]["resourceVersion"]):
                raise ValueError("conflict")
            new = copy.deepcopy(obj)
            if new.get("kind") == "Secret" and isinstance(new.get("stringData"), dict):
                data = new.setdefault("data", {})
                for field, value in new.pop("stringData").items():
                    data[field] = base64.b64encode(str(value).encode()).decode()
            rv = self._next_rv()
            meta = new.setdefault("metadata", {})
            for field in ("uid", "creationTimestamp", "namespace"):
                if field in old["metadata"]:
                    meta[field] = old["metadata"][field]
            meta["resourceVersion"] = str(rv)
            self._objects[resource][key] = new
            self._publish(_Event(rv, "MODIFIED", resource, copy.deepcopy(old), copy.deepcopy(new)))
            return copy.deepcopy(new)

    def apply(self, obj: Obj) -> Obj:
        """Create or replace (the way ``kubectl apply`` looks from a watcher)."""
        with self._lock:
            try:
                return self.create(obj)
            except KeyError:
                return self.replace(obj)

    def delete(
        self, api_version: str, kind: str, namespace: str, name: str, *, resource_version: str | None = None
    ) -> Obj:
        """With ``resource_version`` (DeleteOptions' precondition), only the object at that version."""
        with self._lock:
            group = _group(api_version)
            resource = (group, BY_KIND[(group, kind)])
            old = self._objects[resource].get((namespace, name))
            if old is None:
                raise LookupError(f"{kind} {namespace}/{name} not found")
            if resource_version not in (None, old["metadata"]["resourceVersion"]):
                raise ValueError(
                    f"Precondition failed: ResourceVersion in precondition: {resource_version}, "
                    f"ResourceVersion in object meta: {old['metadata']['resourceVersion']}"
                )
            del self._objects[resource][(namespace, name)]
            rv = self._next_rv()
            gone = copy.deepcopy(old)
            gone["metadata"]["resourceVersion"] = str(rv)
            self._publish(_Event(rv, "DELETED", resource, copy.deepcopy(old), gone))
            return gone

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> Obj | None:
        with self._lock:
            group = _group(api_version)
            found = self._objects[(group, BY_KIND[(group, kind)])].get((namespace, name))
            return copy.deepcopy(found) if found else None

    def objects(self, api_version: str, kind: str) -> list[Obj]:
        with self._lock:
            group = _group(api_version)
            return [copy.deepcopy(o) for o in self._objects[(group, BY_KIND[(group, kind)])].values()]

    def force_gone(self) -> None:
        """Compact the history and send every open watch a 410 Gone: every watcher must re-list."""
        with self._lock:
            self._compacted = self._rv
            self._history.clear()
            if self._loop is not None:
                self._loop.call_soon_threadsafe(self._signal, _GONE)

    def drop_watches(self) -> None:
        """Cut every open watch connection mid-stream."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._signal, _DROP)

    def disconnect(self) -> None:
        """An outage: open watches are cut and every request gets 503 until ``reconnect``."""
        self.down = True
        self.drop_watches()

    def reconnect(self) -> None:
        self.down = False

    def uninstall(self, api_version: str, kind: str) -> None:
        """Remove a kind's CRD: its objects go with it and its API answers 404."""
        with self._lock:
            group = _group(api_version)
            resource = (group, BY_KIND[(group, kind)])
            self._objects[resource].clear()
            self.unserved.add(resource)

    def inject(
        self, request: str, status: int, *, times: int = 1, retry_after: int = 1, name: str | None = None
    ) -> None:
        """Answer the next ``times`` requests ``request`` (``"<verb> <plural>"``, as in ``requests``; with
        ``name``, only those of that object) with ``status``: 409 as a lost resourceVersion race, 429 as API
        Priority and Fairness throttling (with ``Retry-After``), anything else as that status."""
        with self._lock:
            self._faults += [(request, name, status, retry_after)] * times

    def lose_answer(self, request: str, status: int, *, name: str | None = None) -> None:
        """Serve the next request ``request`` (of the object ``name``), then answer it ``status`` instead of its
        result: a write the API server applied whose answer the client never got (a timeout, a proxy's 504)."""
        with self._lock:
            self._lost.append((request, name, status))

    def _answer_lost(self, request: str, name: str | None) -> int | None:
        with self._lock:
            found = next((i for i, (r, n, _) in enumerate(self._lost) if r == request and n in (None, name)), None)
            return None if found is None else self._lost.pop(found)[2]

    def intercept(self, request: str, action: Callable[[], object], *, name: str | None = None) -> None:
        """Run ``action`` (on the emulator's thread) when the next request ``request`` (of the object ``name``)
        arrives, before it is served: another writer's change that lands between a client's read and its write. An
        action that returns an awaitable holds the request until it is done (an API server that hangs), while the
        emulator serves other requests."""
        with self._lock:
            self._intercepts.append((request, name, action))

    def _intercepted(self, request: str, name: str | None) -> object:
        with self._lock:
            found = next(
                (i for i, (r, n, _) in enumerate(self._intercepts) if r == request and n in (None, name)), None
            )
            if found is None:
                return None
            _, _, action = self._intercepts.pop(found)
        return action()

    def _fault(self, request: str, name: str | None) -> web.Response | None:
        with self._lock:
            found = next(
                (i for i, fault in enumerate(self._faults) if fault[0] == request and fault[1] in (None, name)), None
            )
            if found is None:
                return None
            _, _, status, retry_after = self._faults.pop(found)
        if status == 429:
            answer = _status(429, "TooManyRequests", "too many requests, please try again later")
            answer.headers["Retry-After"] = str(retry_after)
            return answer
        if status == 409:
            return _status(409, "Conflict", "the object has been modified; please apply your changes again")
        return _status(status, "InternalError", f"injected HTTP {status}")

    def _signal(self, what: object) -> None:
        for _, queue in list(self._watchers):
            queue.put_nowait(what)

    def open_watches(self) -> int:
        return len(self._watchers)

    # --- HTTP ----------------------------------------------------------------------------------------------

    async def _handle_core(self, request: web.Request) -> web.StreamResponse:
        return self._delivered(request, await self._dispatch(request, "", request.match_info["rest"]))

    async def _handle_group(self, request: web.Request) -> web.StreamResponse:
        answer = await self._dispatch(request, request.match_info["group"], request.match_info["rest"])
        return self._delivered(request, answer)

    @staticmethod
    def _delivered(request: web.Request, answer: web.StreamResponse) -> web.StreamResponse:
        lost = request.get(LOST_STATUS)
        return answer if lost is None else _status(lost, "InternalError", f"injected HTTP {lost} after serving")

    async def _dispatch(self, request: web.Request, group: str, rest: str) -> web.StreamResponse:
        if self.down:
            return _status(503, "ServiceUnavailable", "the API server is unavailable")
        parts = [p for p in rest.split("/") if p]
        namespace: str | None = None
        if len(parts) >= 2 and parts[0] == "namespaces":
            namespace, parts = parts[1], parts[2:]
        if not parts or (group, parts[0]) not in RESOURCES or (group, parts[0]) in self.unserved:
            return _status(404, "NotFound", f"the server could not find the requested resource {request.path}")
        resource = (group, parts[0])
        name = parts[1] if len(parts) > 1 else None
        if not RESOURCES[resource][1]:
            namespace = None
        method = request.method
        verb = _verb(method, name, request.query.get("watch") in ("true", "1"))
        if inspect.isawaitable(held := self._intercepted(f"{verb} {resource[1]}", name)):
            await held
        request[LOST_STATUS] = self._answer_lost(f"{verb} {resource[1]}", name)
        if (fault := self._fault(f"{verb} {resource[1]}", name)) is not None:
            self.requests[f"{verb} {resource[1]}"] += 1
            return fault
        if self.authorize is not None and not self.authorize(verb, group, resource[1], namespace, name):
            where = f' in the namespace "{namespace}"' if namespace else " at the cluster scope"
            message = (
                f'{resource[1]} "{name or ""}" is forbidden: User cannot {verb} resource "{resource[1]}" '
                f'in API group "{group}"{where}'
            )
            self.forbidden.append(f"{verb} {resource[1]} {namespace or ''}/{name or ''}")
            return _status(403, "Forbidden", message)
        if name is None and method == "GET":
            if request.query.get("watch") in ("true", "1"):
                self.requests[f"watch {resource[1]}"] += 1
                return await self._watch(request, resource, namespace)
            self.requests[f"list {resource[1]}"] += 1
            return self._list(request, resource, namespace)
        if name is None and method == "POST":
            self.requests[f"create {resource[1]}"] += 1
            body = await request.json()
            body.setdefault("metadata", {}).setdefault("namespace", namespace)
            if resource == ("", "events") and (problem := _event_namespace_problem(body)):
                return _status(422, "Invalid", problem)
            try:
                return web.json_response(self.create(body), status=201)
            except KeyError as exc:
                return _status(409, "AlreadyExists", str(exc))
        key = (namespace or "", name or "")
        if method == "GET":
            self.requests[f"get {resource[1]}"] += 1
            with self._lock:
                found = self._objects[resource].get(key)
            if found is None:
                return _status(404, "NotFound", f"{resource[1]} {name} not found")
            return web.json_response(found)
        if method == "PUT":
            self.requests[f"update {resource[1]}"] += 1
            body = await request.json()
            body.setdefault("metadata", {})["namespace"] = namespace
            try:
                return web.json_response(self.replace(body, check_version=True))
            except LookupError as exc:
                return _status(404, "NotFound", str(exc))
            except ValueError:
                return _status(409, "Conflict", "the object has been modified; please apply your changes again")
        if method == "DELETE":
            self.requests[f"delete {resource[1]}"] += 1
            kind = RESOURCES[resource][0]
            options = await request.json() if request.can_read_body else {}
            expected = (options.get("preconditions") or {}).get("resourceVersion")
            try:
                self.delete(
                    f"{group}/v" if group else "v1", kind, namespace or "", name or "", resource_version=expected
                )
            except LookupError as exc:
                return _status(404, "NotFound", str(exc))
            except ValueError as exc:
                return _status(409, "Conflict", str(exc))
            return web.json_response({"kind": "Status", "apiVersion": "v1", "status": "Success"})
        return _status(405, "MethodNotAllowed", method)

    def _filter(self, request: web.Request, resource: tuple[str, str], namespace: str | None) -> _Filter:
        fields = {}
        for part in request.query.get("fieldSelector", "").split(","):
            if "=" in part:
                key, value = part.replace("==", "=").split("=", 1)
                fields[key.strip()] = value.strip()
        return _Filter(resource, namespace, _label_matcher(request.query.get("labelSelector", "")), fields)

    def _list(self, request: web.Request, resource: tuple[str, str], namespace: str | None) -> web.Response:
        token = request.query.get("continue", "")
        limit = int(request.query.get("limit", "0") or 0)
        with self._lock:
            if token:
                items = self._pages.pop(token, None)
                if items is None:
                    return _status(410, "Expired", "the continue token has expired")
                rv = int(token.split(":")[1])
            else:
                filt = self._filter(request, resource, namespace)
                items = [copy.deepcopy(o) for o in self._objects[resource].values() if filt.matches(o)]
                rv = self._rv
        page, rest = (items[:limit], items[limit:]) if limit else (items, [])
        meta: dict[str, Any] = {"resourceVersion": str(rv)}
        if rest:
            next_token = f"{next(self._page_ids)}:{rv}"
            self._pages[next_token] = rest
            meta["continue"] = next_token
        kind = RESOURCES[resource][0]
        return web.json_response({"kind": f"{kind}List", "apiVersion": "v1", "metadata": meta, "items": page})

    @staticmethod
    def _frame(event_type: str, obj: Obj) -> bytes:
        return json.dumps({"type": event_type, "object": obj}).encode() + b"\n"

    @staticmethod
    def _translate(filt: _Filter, event: _Event) -> tuple[str, Obj] | None:
        was, now = filt.matches(event.old), filt.matches(event.new)
        if event.type == "DELETED":
            return ("DELETED", event.new) if was else None
        if was and now:
            return "MODIFIED", event.new
        if now:
            return "ADDED", event.new
        if was:
            return "DELETED", event.new
        return None

    async def _watch(
        self, request: web.Request, resource: tuple[str, str], namespace: str | None
    ) -> web.StreamResponse:
        filt = self._filter(request, resource, namespace)
        bookmarks = request.query.get("allowWatchBookmarks") in ("true", "1")
        deadline = time.monotonic() + float(request.query.get("timeoutSeconds", "1800") or 1800)
        since_text = request.query.get("resourceVersion", "")
        queue: asyncio.Queue[Any] = asyncio.Queue()
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        if self.watch_fault == "eof":
            await response.write_eof()
            return response
        with self._lock:
            if since_text in ("", "0"):
                backlog = [("ADDED", copy.deepcopy(o)) for o in self._objects[resource].values() if filt.matches(o)]
            elif self.watch_fault == "gone" or int(since_text) < self._compacted:
                status = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 410, "reason": "Expired"}
                await response.write(
                    self._frame("ERROR", {**status, "message": f"too old resource version: {since_text}"})
                )
                return response
            else:
                since = int(since_text)
                backlog = [
                    t
                    for e in self._history
                    if e.rv > since and e.resource == resource
                    for t in [self._translate(filt, e)]
                    if t
                ]
            last_rv = registered = self._rv
            entry = (filt, queue)
            self._watchers.add(entry)
        try:
            for event_type, obj in backlog:
                await response.write(self._frame(event_type, obj))
            while time.monotonic() < deadline:
                try:
                    item = await asyncio.wait_for(queue.get(), timeout=self.bookmark_interval)
                except TimeoutError:
                    if bookmarks:
                        obj = {
                            "kind": RESOURCES[resource][0],
                            "apiVersion": "v1",
                            "metadata": {"resourceVersion": str(last_rv)},
                        }
                        await response.write(self._frame("BOOKMARK", obj))
                    continue
                if item is _DROP:
                    if request.transport is not None:
                        request.transport.close()
                    return response
                if item is _GONE:
                    status = {
                        "kind": "Status",
                        "apiVersion": "v1",
                        "status": "Failure",
                        "code": 410,
                        "reason": "Expired",
                    }
                    await response.write(self._frame("ERROR", {**status, "message": "too old resource version"}))
                    return response
                last_rv = max(last_rv, item.rv)
                translated = self._translate(filt, item)
                if translated is not None and item.rv > registered:
                    await response.write(self._frame(*translated))
            await response.write_eof()
            return response
        except (ConnectionResetError, RuntimeError):
            return response
        finally:
            self._watchers.discard(entry)


# --- helpers for control-plane tests -------------------------------------------------------------------------


def load_manifests(*paths: Path) -> list[Obj]:
    """Every object in these YAML files (multi-document) or directories of them."""
    import yaml

    files: list[Path] = []
    for path in paths:
        files += sorted(p for p in path.rglob("*") if p.suffix in (".yaml", ".yml")) if path.is_dir() else [path]
    return [doc for file in files for doc in yaml.safe_load_all(file.read_text()) if isinstance(doc, dict)]


async def eventually(check: Any, *, within: float = 15.0, interval: float = 0.02) -> Any:
    """Poll ``check`` (sync or async, returning a truthy value when done) until it passes; AssertionError with
    the last value when it never does. For convergence, not for measuring speed."""
    deadline = time.monotonic() + within
    value: Any = None
    while time.monotonic() < deadline:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        await asyncio.sleep(interval)
    raise AssertionError(f"condition not met within {within}s (last value: {value!r})")
