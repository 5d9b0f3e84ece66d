"""A strict in-process fake of kube-apiserver that speaks the real list/watch protocol over HTTP.

`FakeKubeAPI` is an aiohttp application served on 127.0.0.1 and an ephemeral port inside the test's
own event loop (`async with FakeKubeAPI() as api:`). The real kubernetes-asyncio client reaches it
through a kubeconfig that `write_kubeconfig` produces (plain http; a bearer token only when asked).

What it does the way kube-apiserver does:
- One global resourceVersion that every write bumps; objects carry it in `metadata.resourceVersion`,
  `uid` and `creationTimestamp` are stamped on create and kept on update.
- LIST returns a `<Kind>List` whose items have no kind/apiVersion (as typed lists are served), with
  `limit`/`continue` paging over a consistent snapshot; a continue token older than the compacted
  history is 410 Expired.
- WATCH (`watch=true`) is a chunked stream of JSON lines `{"type", "object"}`. Without a
  resourceVersion (or "0") it starts with synthetic ADDED events for what exists; with one it replays
  the bounded history after it. A resourceVersion older than the history yields one ERROR event
  carrying a Status with code 410 (or, with `gone_as="http"`, an HTTP 410 as older servers did).
  BOOKMARKs go only to watches that asked for them, from `send_bookmarks()` and just before a watch's
  `timeoutSeconds` ends it cleanly. An object that stops (starts) matching a label selector is
  DELETED (ADDED) for that watch.
- Single objects: GET, POST, PUT (optimistic concurrency on resourceVersion: 409 Conflict; Leases
  refuse an update without one: 422), merge PATCH, DELETE; 404/409/422/400 Statuses with the real
  reasons where a client could misuse the API (a name that does not match the URL, an invalid name, a
  Lease time not in MicroTime format, an Event whose namespace differs from its involvedObject's, ...).
- Field selectors on metadata.name/metadata.namespace (and a few per-resource fields); equality and
  existence label selectors. Anything else the real server would accept is a 400 here, so a test
  never passes by accident on a request the fake does not understand.

Test controls: `create`/`update`/`modify`/`delete`/`apply` objects (each bumps the resourceVersion and
feeds open watches), `compact` the history, `send_bookmarks`, `drop_watches` (abort the TCP
connections mid-stream), `end_watches` (a clean end, as at timeoutSeconds), `fail_next` (the next N
matching requests get a 5xx Status), `go_down`/`come_up`/`outage` (connection refused, or 503).
Every request is recorded in `requests`; `wait_until` awaits a condition over the fake's state.

Concurrency: each HTTP request runs in its own task of the test's loop. The test controls are
synchronous, so each is atomic with respect to requests: `drop_watches(); modify(...); compact()`
all happen before any client can reconnect. Each open watch owns a queue that writes feed
synchronously; its handler task drains the queue to the socket. A watch whose client disconnects
is cancelled by aiohttp and unregisters itself; `stop()` ends every watch and closes every connection.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import itertools
import json
import re
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Literal, Self

from aiohttp import web

JSON = dict[str, Any]


@dataclass(frozen=True, slots=True)
class ResourceType:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    # The registry strategy flags kube-apiserver has for each resource.
    allow_create_on_update: bool = False
    allow_unconditional_update: bool = True
    # Field selector labels beyond metadata.name / metadata.namespace.
    field_labels: tuple[str, ...] = ()

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def group_resource(self) -> str:
        return f"{self.plural}.{self.group}" if self.group else self.plural


RESOURCES: Final[tuple[ResourceType, ...]] = (
    ResourceType("", "v1", "nodes", "Node", namespaced=False, field_labels=("spec.unschedulable",)),
    ResourceType("", "v1", "services", "Service", namespaced=True, allow_create_on_update=True,
                 field_labels=("spec.clusterIP", "spec.type")),
    ResourceType("discovery.k8s.io", "v1", "endpointslices", "EndpointSlice", namespaced=True),
    ResourceType("", "v1", "configmaps", "ConfigMap", namespaced=True),
    ResourceType("coordination.k8s.io", "v1", "leases", "Lease", namespaced=True, allow_create_on_update=True,
                 allow_unconditional_update=False),
    ResourceType("", "v1", "events", "Event", namespaced=True, allow_create_on_update=True,
                 field_labels=("involvedObject.kind", "involvedObject.namespace", "involvedObject.name",
                               "involvedObject.uid", "involvedObject.apiVersion", "reason", "type",
                               "source")),
)
_BY_PATH: Final = {(r.group, r.version, r.plural): r for r in RESOURCES}
_BY_KIND: Final = {(r.api_version, r.kind): r for r in RESOURCES}

_REASONS: Final = {400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound",
                   405: "MethodNotAllowed", 409: "Conflict", 410: "Expired", 415: "UnsupportedMediaType",
                   422: "Invalid", 429: "TooManyRequests", 500: "InternalError", 503: "ServiceUnavailable",
                   504: "Timeout"}
_DNS1123_SUBDOMAIN: Final = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
# metav1.MicroTime is parsed with Go's layout "2006-01-02T15:04:05.000000Z07:00": exactly six digits.
_MICROTIME: Final = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}(Z|[+-]\d{2}:\d{2})$")
_RFC3339: Final = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?(Z|[+-]\d{2}:\d{2})$")
_GO_BOOLS: Final = {"1": True, "t": True, "T": True, "true": True, "TRUE": True, "True": True,
                    "0": False, "f": False, "F": False, "false": False, "FALSE": False, "False": False}
_DEFAULT_WATCH_TIMEOUT: Final = 1800
_MAX_SNAPSHOTS: Final = 64

Verb = Literal["list", "watch", "get", "create", "update", "patch", "delete", ""]
EventType = Literal["ADDED", "MODIFIED", "DELETED"]


class APIError(Exception):
    """A request the real server would refuse; rendered as a `Status` with the real reason."""

    def __init__(self, code: int, message: str, *, reason: str | None = None,
                 details: JSON | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason or _REASONS.get(code, "Unknown")
        self.message = message
        self.details = details

    def status(self) -> JSON:
        body: JSON = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                      "message": self.message, "reason": self.reason, "code": self.code}
        if self.details is not None:
            body["details"] = self.details
        return body

    def response(self) -> web.Response:
        return web.json_response(self.status(), status=self.code)


@dataclass(slots=True)
class RecordedRequest:
    method: str
    path: str
    query: dict[str, str]
    verb: Verb = ""
    resource: str = ""
    namespace: str | None = None
    name: str | None = None
    status: int | None = None


@dataclass(slots=True)
class _Failure:
    remaining: int
    code: int
    verb: Verb | None
    resource: str | None

    def matches(self, rec: RecordedRequest) -> bool:
        return (self.remaining > 0 and self.verb in (None, rec.verb)
                and self.resource in (None, rec.resource))


@dataclass(frozen=True, slots=True)
class _Change:
    rv: int
    resource: ResourceType
    type: EventType
    obj: JSON
    previous: JSON | None


@dataclass(frozen=True, slots=True)
class _Requirement:
    key: str
    op: Literal["=", "!=", "exists", "!exists"]
    value: str = ""


def _field_value(obj: Mapping[str, Any], path: str) -> str:
    cur: Any = obj
    for part in path.split("."):
        if not isinstance(cur, Mapping):
            return ""
        cur = cur.get(part)
    if isinstance(cur, bool):
        return "true" if cur else "false"
    return "" if cur is None else str(cur)


@dataclass(frozen=True, slots=True)
class _Selector:
    fields: tuple[_Requirement, ...] = ()
    labels: tuple[_Requirement, ...] = ()

    def matches(self, obj: Mapping[str, Any]) -> bool:
        for req in self.fields:
            if (_field_value(obj, req.key) == req.value) != (req.op == "="):
                return False
        meta = obj.get("metadata")
        labels = meta.get("labels") if isinstance(meta, Mapping) else None
        labels = labels if isinstance(labels, Mapping) else {}
        for req in self.labels:
            present = req.key in labels
            ok = {"=": present and labels[req.key] == req.value,
                  "!=": not present or labels[req.key] != req.value,
                  "exists": present, "!exists": not present}[req.op]
            if not ok:
                return False
        return True


def _parse_field_selector(text: str, res: ResourceType) -> tuple[_Requirement, ...]:
    reqs: list[_Requirement] = []
    for term in filter(None, (t.strip() for t in text.split(","))):
        match = re.fullmatch(r"([^=!]+)(==|=|!=)(.*)", term)
        if match is None:
            raise APIError(400, f'invalid field selector: "{term}": unable to parse requirement')
        key, op, value = match.groups()
        if key not in ("metadata.name", "metadata.namespace", *res.field_labels):
            raise APIError(400, f'field label not supported: {key}')
        reqs.append(_Requirement(key, "!=" if op == "!=" else "=", value))
    return tuple(reqs)


def _parse_label_selector(text: str) -> tuple[_Requirement, ...]:
    reqs: list[_Requirement] = []
    for term in filter(None, (t.strip() for t in text.split(","))):
        if re.search(r"\s(in|notin)\s*\(", term):
            raise APIError(400, f"fake kube-apiserver: set-based label selector {term!r} is not supported")
        match = re.fullmatch(r"(!?)([A-Za-z0-9._/-]+)(?:(==|=|!=)([A-Za-z0-9._-]*))?", term)
        if match is None:
            raise APIError(400, f'unable to parse requirement: "{term}"')
        bang, key, op, value = match.groups()
        if bang and op:
            raise APIError(400, f'unable to parse requirement: "{term}"')
        if op is None:
            reqs.append(_Requirement(key, "!exists" if bang else "exists"))
        else:
            reqs.append(_Requirement(key, "!=" if op == "!=" else "=", value))
    return tuple(reqs)


def _parse_bool(query: Mapping[str, str], key: str) -> bool:
    raw = query.get(key)
    if raw is None or raw == "":
        return False
    try:
        return _GO_BOOLS[raw]
    except KeyError:
        raise APIError(400, f'{key}: Invalid value: "{raw}": strconv.ParseBool: invalid syntax') from None


def _parse_int(query: Mapping[str, str], key: str) -> int | None:
    raw = query.get(key)
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise APIError(400, f'{key}: Invalid value: "{raw}": strconv.ParseInt: invalid syntax') from None


def _parse_rv(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise APIError(400, f'resourceVersion: Invalid value: "{raw}": must be a non-negative integer')
    return value


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _line(event_type: str, obj: JSON) -> bytes:
    return json.dumps({"type": event_type, "object": obj}, separators=(",", ":")).encode() + b"\n"


def _merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386. For the scalar fields clients patch here, a strategic merge patch means the same."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = _merge_patch(out.get(key), value)
    return out


@dataclass(eq=False, slots=True)
class _Watch:
    resource: ResourceType
    namespace: str | None
    selector: _Selector
    bookmarks: bool
    transport: asyncio.Transport | None
    # bytes: a line to write; None: end the stream cleanly.
    queue: asyncio.Queue[bytes | None] = field(default_factory=asyncio.Queue)

    def _sees(self, obj: JSON | None) -> bool:
        if obj is None:
            return False
        ns = obj.get("metadata", {}).get("namespace", "")
        return (self.namespace is None or ns == self.namespace) and self.selector.matches(obj)

    def translate(self, change: _Change) -> bytes | None:
        if change.resource is not self.resource:
            return None
        now, before = self._sees(change.obj), self._sees(change.previous)
        if change.type == "MODIFIED" and now != before:
            # A watch with a selector sees objects enter and leave it, as the watch cache reports them.
            return _line("ADDED" if now else "DELETED", change.obj)
        if not now:
            return None
        return _line(change.type, change.obj)


class FakeKubeAPI:
    """The fake server. Start it with `async with FakeKubeAPI(...) as api:` (or `start()`/`stop()`)."""

    def __init__(self, *, history_limit: int = 1000, start_resource_version: int = 1000,
                 gone_as: Literal["event", "http"] = "event", token: str | None = None) -> None:
        self.requests: list[RecordedRequest] = []
        self._history_limit = history_limit
        self._gone_as = gone_as
        self._token = token
        self._rv = start_resource_version
        # A watch may resume from any resourceVersion >= this: every change after it is in _history.
        self._oldest_resumable = start_resource_version
        self._history: deque[_Change] = deque()
        self._objects: dict[str, dict[tuple[str, str], JSON]] = {r.plural: {} for r in RESOURCES}
        self._watches: set[_Watch] = set()
        self._snapshots: dict[str, tuple[int, ResourceType, str, list[JSON]]] = {}
        self._snapshot_ids = itertools.count(1)
        self._failures: list[_Failure] = []
        self._unavailable = False
        self._changed = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._port = 0

    # ---- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # handler_cancellation: a watch whose client went away is cancelled at once rather than
        # lingering until its timeoutSeconds.
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        await self._listen()

    async def stop(self) -> None:
        self.end_watches()
        self._abort_connections()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
            self._site = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    async def _listen(self) -> None:
        assert self._runner is not None
        self._site = web.TCPSite(self._runner, "127.0.0.1", self._port)
        await self._site.start()
        self._port = int(self._runner.addresses[0][1])

    def _abort_connections(self) -> None:
        server = self._runner.server if self._runner is not None else None
        for conn in server.connections if server is not None else []:
            if conn.transport is not None:
                conn.transport.abort()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    def write_kubeconfig(self, path: Path) -> Path:
        """A kubeconfig for the real client (JSON is YAML): one context pointing at this server."""
        user: JSON = {"token": self._token} if self._token else {}
        doc = {"apiVersion": "v1", "kind": "Config", "current-context": "fake",
               "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
               "users": [{"name": "fake", "user": user}],
               "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}]}
        path.write_text(json.dumps(doc, indent=2))
        return path

    # ---- objects (test side) ---------------------------------------------------------------------

    @property
    def resource_version(self) -> int:
        return self._rv

    def create(self, obj: Mapping[str, Any]) -> JSON:
        """Store a new object (kind and apiVersion say where); returns it as the server holds it."""
        res, ns, name = self._identify(obj)
        if (ns, name) in self._objects[res.plural]:
            raise ValueError(f"{res.kind} {ns}/{name} already exists")
        return self._write(res, "ADDED", copy.deepcopy(dict(obj)))

    def update(self, obj: Mapping[str, Any]) -> JSON:
        """Replace an existing object whole (its resourceVersion in `obj` is ignored)."""
        res, ns, name = self._identify(obj)
        if (ns, name) not in self._objects[res.plural]:
            raise KeyError(f"{res.kind} {ns}/{name} does not exist")
        return self._write(res, "MODIFIED", copy.deepcopy(dict(obj)))

    def apply(self, obj: Mapping[str, Any]) -> JSON:
        res, ns, name = self._identify(obj)
        return self.update(obj) if (ns, name) in self._objects[res.plural] else self.create(obj)

    def modify(self, kind: str, name: str, mutate: Callable[[JSON], None], *, namespace: str = "") -> JSON:
        """Change an object in place through `mutate(copy)`; one MODIFIED event."""
        res = self._resource_of_kind(kind)
        current = self._objects[res.plural].get((namespace, name))
        if current is None:
            raise KeyError(f"{kind} {namespace}/{name} does not exist")
        changed = copy.deepcopy(current)
        mutate(changed)
        return self._write(res, "MODIFIED", changed)

    def delete(self, kind: str, name: str, *, namespace: str = "") -> JSON:
        res = self._resource_of_kind(kind)
        if (namespace, name) not in self._objects[res.plural]:
            raise KeyError(f"{kind} {namespace}/{name} does not exist")
        return self._remove(res, namespace, name)

    def get(self, kind: str, name: str, *, namespace: str = "") -> JSON | None:
        obj = self._objects[self._resource_of_kind(kind).plural].get((namespace, name))
        return copy.deepcopy(obj) if obj is not None else None

    def objects(self, kind: str) -> list[JSON]:
        """Every object of a kind as the server holds it, in the server's (namespace, name) order."""
        store = self._objects[self._resource_of_kind(kind).plural]
        return [copy.deepcopy(store[k]) for k in sorted(store)]

    def events(self) -> list[JSON]:
        """The core/v1 Events clients have posted."""
        return self.objects("Event")

    def _resource_of_kind(self, kind: str) -> ResourceType:
        for res in RESOURCES:
            if res.kind == kind:
                return res
        raise KeyError(f"fake kube-apiserver does not serve kind {kind}")

    def _identify(self, obj: Mapping[str, Any]) -> tuple[ResourceType, str, str]:
        res = _BY_KIND.get((str(obj.get("apiVersion")), str(obj.get("kind"))))
        if res is None:
            raise ValueError(f"unknown apiVersion/kind {obj.get('apiVersion')}/{obj.get('kind')}")
        meta = obj.get("metadata")
        if not isinstance(meta, Mapping) or not meta.get("name"):
            raise ValueError("metadata.name is required")
        ns = str(meta.get("namespace") or "")
        if res.namespaced != bool(ns):
            raise ValueError(f"{res.kind} {'needs' if res.namespaced else 'takes no'} metadata.namespace")
        return res, ns, str(meta["name"])

    # ---- storage: every write goes through here ---------------------------------------------------

    def _write(self, res: ResourceType, event_type: EventType, obj: JSON) -> JSON:
        meta = obj.setdefault("metadata", {})
        key = (str(meta.get("namespace") or ""), str(meta["name"]))
        previous = self._objects[res.plural].get(key)
        self._rv += 1
        obj["kind"], obj["apiVersion"] = res.kind, res.api_version
        if previous is not None:
            meta["uid"] = previous["metadata"]["uid"]
            meta["creationTimestamp"] = previous["metadata"]["creationTimestamp"]
        else:
            meta["uid"] = str(uuid.uuid4())
            meta["creationTimestamp"] = _now()
        meta["resourceVersion"] = str(self._rv)
        self._objects[res.plural][key] = obj
        self._record(_Change(self._rv, res, event_type, obj, previous))
        return copy.deepcopy(obj)

    def _remove(self, res: ResourceType, ns: str, name: str) -> JSON:
        previous = self._objects[res.plural].pop((ns, name))
        self._rv += 1
        # The DELETED event carries the object's last state at the deletion's resourceVersion.
        gone = copy.deepcopy(previous)
        gone["metadata"]["resourceVersion"] = str(self._rv)
        self._record(_Change(self._rv, res, "DELETED", gone, previous))
        return copy.deepcopy(gone)

    def _record(self, change: _Change) -> None:
        self._history.append(change)
        while len(self._history) > self._history_limit:
            self._oldest_resumable = self._history.popleft().rv
        for watch in self._watches:
            line = watch.translate(change)
            if line is not None:
                watch.queue.put_nowait(line)
        self._changed.set()

    # ---- protocol controls -----------------------------------------------------------------------

    def compact(self) -> None:
        """Forget the history up to now: resuming a watch (or a list's continue) from an older
        resourceVersion is 410 Gone from here on, as after an etcd compaction."""
        self._history.clear()
        self._oldest_resumable = self._rv

    def send_bookmarks(self) -> int:
        """A BOOKMARK at the current resourceVersion to every watch that allowed them; how many."""
        sent = 0
        for watch in self._watches:
            if watch.bookmarks:
                watch.queue.put_nowait(self._bookmark(watch.resource))
                sent += 1
        return sent

    def drop_watches(self, resource: str | None = None) -> int:
        """Abort the TCP connection of every open watch (of one resource), mid-stream; how many."""
        dropped = [w for w in self._watches if resource in (None, w.resource.plural)]
        for watch in dropped:
            self._watches.discard(watch)
            if watch.transport is not None:
                watch.transport.abort()
        self._changed.set()
        return len(dropped)

    def end_watches(self) -> int:
        """End every open watch cleanly (terminating chunk), as its timeoutSeconds would; how many."""
        ended = list(self._watches)
        for watch in ended:
            watch.queue.put_nowait(None)
        self._watches.clear()
        self._changed.set()
        return len(ended)

    def fail_next(self, count: int, *, status: int = 500, verb: Verb | None = None,
                  resource: str | None = None) -> None:
        """The next `count` requests matching verb/resource (plural) get an error Status `status`."""
        self._failures.append(_Failure(count, status, verb, resource))

    async def go_down(self, mode: Literal["refused", "unavailable"] = "refused") -> None:
        """Become unreachable: stop listening and reset every connection ("refused"), or answer
        every request with 503 ("unavailable"). Open watches break either way."""
        self.drop_watches()
        if mode == "unavailable":
            self._unavailable = True
            return
        if self._site is not None:
            await self._site.stop()
            self._site = None
        self._abort_connections()

    async def come_up(self) -> None:
        self._unavailable = False
        if self._site is None and self._runner is not None:
            await self._listen()
        self._changed.set()

    async def outage(self, seconds: float, mode: Literal["refused", "unavailable"] = "refused") -> None:
        await self.go_down(mode)
        await asyncio.sleep(seconds)
        await self.come_up()

    # ---- observation -----------------------------------------------------------------------------

    def open_watches(self, resource: str | None = None) -> int:
        return sum(1 for w in self._watches if resource in (None, w.resource.plural))

    def requests_for(self, verb: Verb, resource: str | None = None) -> list[RecordedRequest]:
        return [r for r in self.requests if r.verb == verb and resource in (None, r.resource)]

    async def wait_until(self, predicate: Callable[[], bool], *, timeout: float = 5.0, what: str = "") -> None:
        """Wait until `predicate()` holds; it is re-checked after every request and every write."""
        try:
            async with asyncio.timeout(timeout):
                while not predicate():
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            raise AssertionError(f"fake kube-apiserver: timed out after {timeout}s waiting for "
                                 f"{what or predicate}") from None

    # ---- HTTP ------------------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        rec = RecordedRequest(request.method, request.path, dict(request.query))
        self.requests.append(rec)
        self._changed.set()
        try:
            response = await self._dispatch(request, rec)
        except APIError as err:
            response = err.response()
        rec.status = response.status
        self._changed.set()
        return response

    async def _dispatch(self, request: web.Request, rec: RecordedRequest) -> web.StreamResponse:
        if self._token is not None and request.headers.get("Authorization") != f"Bearer {self._token}":
            raise APIError(401, "Unauthorized")
        if self._unavailable:
            raise APIError(503, "fake kube-apiserver is unavailable")
        res = self._route(request, rec)
        for failure in self._failures:
            if failure.matches(rec):
                failure.remaining -= 1
                raise APIError(failure.code, f"injected failure ({failure.code}) of {rec.verb} {rec.resource}")
        query = rec.query
        if rec.verb == "list":
            return self._list(res, rec.namespace, query)
        if rec.verb == "watch":
            return await self._watch(request, rec, res, query)
        ns = rec.namespace or ""
        if rec.verb == "create":
            return web.json_response(self._api_create(res, ns, await self._body(request, res)), status=201)
        assert rec.name is not None
        if rec.verb == "get":
            return web.json_response(self._existing(res, ns, rec.name))
        if rec.verb == "delete":
            self._existing(res, ns, rec.name)
            return web.json_response(self._remove(res, ns, rec.name))
        body = await self._body(request, res)
        if rec.verb == "update":
            return self._api_update(res, ns, rec.name, body)
        content_type = request.headers.get("Content-Type", "")
        if content_type.split(";")[0].strip() not in ("application/merge-patch+json",
                                                      "application/strategic-merge-patch+json"):
            raise APIError(415, f"fake kube-apiserver: patch type {content_type!r} is not supported; "
                                "use a merge patch")
        merged = _merge_patch(self._existing(res, ns, rec.name), body)
        return self._api_update(res, ns, rec.name, merged)

    def _route(self, request: web.Request, rec: RecordedRequest) -> ResourceType:
        not_found = APIError(404, "the server could not find the requested resource")
        parts = [p for p in request.path.split("/") if p]
        if parts[:2] == ["api", "v1"]:
            group, version, rest = "", "v1", parts[2:]
        elif len(parts) >= 3 and parts[0] == "apis":
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            raise not_found
        namespace: str | None = None
        if len(rest) >= 3 and rest[0] == "namespaces":
            namespace, rest = rest[1], rest[2:]
        if not 1 <= len(rest) <= 2:
            raise not_found
        res = _BY_PATH.get((group, version, rest[0]))
        if res is None or (namespace is not None and not res.namespaced):
            raise not_found
        name = rest[1] if len(rest) == 2 else None
        if name is not None and res.namespaced and namespace is None:
            raise not_found
        rec.resource, rec.namespace, rec.name = res.plural, namespace, name
        method = request.method
        if method == "GET":
            rec.verb = "get" if name else ("watch" if _parse_bool(rec.query, "watch") else "list")
        elif method == "POST" and name is None and (namespace is not None or not res.namespaced):
            rec.verb = "create"
        elif method in ("PUT", "PATCH", "DELETE") and name is not None:
            rec.verb = {"PUT": "update", "PATCH": "patch", "DELETE": "delete"}[method]  # type: ignore[assignment]
        else:
            raise APIError(405, f"the server does not allow this method on the requested resource ({method})")
        return res

    async def _body(self, request: web.Request, res: ResourceType) -> JSON:
        raw = await request.read()
        try:
            body = json.loads(raw)
        except ValueError:
            raise APIError(400, "couldn't get version/kind; json parse error: invalid JSON body") from None
        if not isinstance(body, dict):
            raise APIError(400, "couldn't get version/kind; json parse error: expected an object")
        kind, api_version = body.get("kind"), body.get("apiVersion")
        # The server defaults a missing kind/apiVersion from the URL, but refuses a different one.
        if kind not in (None, res.kind) or api_version not in (None, res.api_version):
            raise APIError(400, f"the API version in the data ({api_version}) does not match the expected "
                                f"API version ({res.api_version})" if api_version != res.api_version else
                           f"the kind in the data ({kind}) does not match the expected kind ({res.kind})")
        meta = body.get("metadata")
        if meta is None:
            body["metadata"] = {}
        elif not isinstance(meta, dict):
            raise APIError(400, "json: cannot unmarshal metadata into Go struct field ObjectMeta")
        return body

    def _existing(self, res: ResourceType, ns: str, name: str) -> JSON:
        obj = self._objects[res.plural].get((ns, name))
        if obj is None:
            raise APIError(404, f'{res.group_resource} "{name}" not found',
                           details={"name": name, "group": res.group, "kind": res.plural})
        return obj

    # ---- writes through the API ------------------------------------------------------------------

    def _api_create(self, res: ResourceType, ns: str, body: JSON) -> JSON:
        meta = body["metadata"]
        if res.namespaced:
            if meta.get("namespace") not in (None, "", ns):
                raise APIError(400, "the namespace of the provided object does not match the namespace sent "
                                    "on the request")
            meta["namespace"] = ns
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = f"{meta['generateName']}{uuid.uuid4().hex[:5]}"
        if meta.get("resourceVersion"):
            raise APIError(500, "resourceVersion should not be set on objects to be created")
        self._validate(res, body, ns)
        name = meta["name"]
        if (ns, name) in self._objects[res.plural]:
            raise APIError(409, f'{res.group_resource} "{name}" already exists', reason="AlreadyExists",
                           details={"name": name, "group": res.group, "kind": res.plural})
        return self._write(res, "ADDED", body)

    def _api_update(self, res: ResourceType, ns: str, name: str, body: JSON) -> web.Response:
        meta = body["metadata"]
        if meta.get("name") not in (None, name):
            raise APIError(400, f"the name of the object ({meta.get('name')}) does not match the name on the URL "
                                f"({name})")
        meta["name"] = name
        if res.namespaced:
            if meta.get("namespace") not in (None, "", ns):
                raise APIError(400, "the namespace of the provided object does not match the namespace sent "
                                    "on the request")
            meta["namespace"] = ns
        current = self._objects[res.plural].get((ns, name))
        wanted_rv = meta.get("resourceVersion") or ""
        if current is None:
            if not res.allow_create_on_update or wanted_rv:
                self._existing(res, ns, name)
            meta.pop("resourceVersion", None)
            self._validate(res, body, ns)
            return web.json_response(self._write(res, "ADDED", body), status=201)
        if not wanted_rv and not res.allow_unconditional_update:
            raise self._invalid(res, name, [("metadata.resourceVersion", "Invalid value: 0x0: must be specified "
                                                                         "for an update")])
        if wanted_rv and wanted_rv != current["metadata"]["resourceVersion"]:
            raise APIError(409, f'Operation cannot be fulfilled on {res.group_resource} "{name}": the object has '
                                "been modified; please apply your changes to the latest version and try again",
                           details={"name": name, "group": res.group, "kind": res.plural})
        self._validate(res, body, ns)
        return web.json_response(self._write(res, "MODIFIED", body))

    @staticmethod
    def _invalid(res: ResourceType, name: str, causes: list[tuple[str, str]]) -> APIError:
        text = ", ".join(f"{f}: {m}" for f, m in causes)
        return APIError(422, f'{res.kind} "{name}" is invalid: {text}',
                        details={"name": name, "group": res.group, "kind": res.kind,
                                 "causes": [{"reason": "FieldValueInvalid", "message": m, "field": f}
                                            for f, m in causes]})

    def _validate(self, res: ResourceType, obj: JSON, ns: str) -> None:
        meta = obj["metadata"]
        name = meta.get("name")
        causes: list[tuple[str, str]] = []
        if not isinstance(name, str) or not name:
            causes.append(("metadata.name", "Required value: name or generateName is required"))
        elif len(name) > 253 or not _DNS1123_SUBDOMAIN.match(name):
            causes.append(("metadata.name", f'Invalid value: "{name}": a lowercase RFC 1123 subdomain must '
                                            "consist of lower case alphanumeric characters, '-' or '.'"))
        if res.kind == "Lease":
            causes += self._lease_causes(obj)
        elif res.kind == "Event":
            causes += self._event_causes(obj, ns)
        elif res.kind == "ConfigMap":
            data = obj.get("data") or {}
            if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
                raise APIError(400, "json: cannot unmarshal into Go struct field ConfigMap.data of type string")
        if causes:
            raise self._invalid(res, str(name), causes)

    @staticmethod
    def _lease_causes(obj: JSON) -> list[tuple[str, str]]:
        spec = obj.get("spec") or {}
        if not isinstance(spec, dict):
            raise APIError(400, "json: cannot unmarshal into Go struct field Lease.spec of type v1.LeaseSpec")
        causes: list[tuple[str, str]] = []
        for key in ("leaseDurationSeconds", "leaseTransitions"):
            value = spec.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise APIError(400, f"json: cannot unmarshal into Go struct field LeaseSpec.spec.{key} of type int32")
        if spec.get("leaseDurationSeconds") is not None and spec["leaseDurationSeconds"] <= 0:
            causes.append(("spec.leaseDurationSeconds", f"Invalid value: {spec['leaseDurationSeconds']}: must be "
                                                        "greater than 0"))
        if spec.get("leaseTransitions") is not None and spec["leaseTransitions"] < 0:
            causes.append(("spec.leaseTransitions", "Invalid value: must be greater than or equal to 0"))
        holder = spec.get("holderIdentity")
        if holder is not None and not isinstance(holder, str):
            raise APIError(400, "json: cannot unmarshal into Go struct field LeaseSpec.spec.holderIdentity of "
                                "type string")
        for key in ("acquireTime", "renewTime"):
            value = spec.get(key)
            if value is not None and (not isinstance(value, str) or not _MICROTIME.match(value)):
                raise APIError(400, f'parsing time "{value}" as "2006-01-02T15:04:05.000000Z07:00": cannot parse '
                                    f"spec.{key} as a MicroTime")
        return causes

    @staticmethod
    def _event_causes(obj: JSON, ns: str) -> list[tuple[str, str]]:
        involved = obj.get("involvedObject")
        if not isinstance(involved, dict):
            raise APIError(400, "json: cannot unmarshal into Go struct field Event.involvedObject")
        for key in ("firstTimestamp", "lastTimestamp"):
            value = obj.get(key)
            if value is not None and (not isinstance(value, str) or not _RFC3339.match(value)):
                raise APIError(400, f'parsing time "{value}" as "2006-01-02T15:04:05Z07:00": cannot parse {key}')
        count = obj.get("count")
        if count is not None and (isinstance(count, bool) or not isinstance(count, int)):
            raise APIError(400, "json: cannot unmarshal into Go struct field Event.count of type int32")
        involved_ns = involved.get("namespace") or ""
        # Legacy (core/v1) event validation: the event lives in its involved object's namespace.
        if (involved_ns and involved_ns != ns) or (not involved_ns and ns not in ("", "default")):
            return [("involvedObject.namespace", f'Invalid value: "{involved_ns}": does not match event.namespace')]
        return []

    # ---- list and watch --------------------------------------------------------------------------

    def _selector(self, res: ResourceType, query: Mapping[str, str]) -> _Selector:
        return _Selector(_parse_field_selector(query.get("fieldSelector", ""), res),
                         _parse_label_selector(query.get("labelSelector", "")))

    def _matching(self, res: ResourceType, namespace: str | None, selector: _Selector) -> list[JSON]:
        store = self._objects[res.plural]
        return [store[k] for k in sorted(store)
                if (namespace is None or k[0] == namespace) and selector.matches(store[k])]

    def _list(self, res: ResourceType, namespace: str | None, query: Mapping[str, str]) -> web.Response:
        limit = _parse_int(query, "limit") or 0
        token = query.get("continue", "")
        rv_param = query.get("resourceVersion", "")
        rv_match = query.get("resourceVersionMatch", "")
        selector = self._selector(res, query)
        scope = f"{namespace or ''}?{query.get('fieldSelector', '')}&{query.get('labelSelector', '')}"
        if token:
            if rv_param:
                raise APIError(400, "specifying resource version is not allowed when using continue")
            snapshot = self._snapshots.pop(token, None)
            if snapshot is None or snapshot[1] is not res or snapshot[2] != scope:
                raise APIError(400, "continue key is not valid: unknown or reused continue token")
            rv, _, _, items = snapshot
            if rv < self._oldest_resumable:
                raise APIError(410, "The provided continue parameter is too old to display a consistent list "
                                    "result. You can start a new list without the continue parameter.")
        else:
            if rv_match and not rv_param:
                raise APIError(422, "resourceVersionMatch: Forbidden: resourceVersionMatch is forbidden unless "
                                    "resourceVersion is provided")
            if rv_match not in ("", "NotOlderThan", "Exact"):
                raise APIError(422, f'resourceVersionMatch: Unsupported value: "{rv_match}"')
            if rv_param and rv_param != "0":
                wanted = _parse_rv(rv_param)
                if wanted > self._rv:
                    raise APIError(504, f"Too large resource version: {wanted}, current: {self._rv}",
                                   reason="Timeout")
                if rv_match == "Exact" and wanted != self._rv:
                    raise APIError(500, "fake kube-apiserver: lists at an exact past resourceVersion are not "
                                        "supported")
            rv, items = self._rv, [self._item(o) for o in self._matching(res, namespace, selector)]
        meta: JSON = {"resourceVersion": str(rv)}
        if 0 < limit < len(items):
            rest = items[limit:]
            items = items[:limit]
            token = base64.urlsafe_b64encode(json.dumps(
                {"v": "meta.k8s.io/v1", "rv": rv, "id": next(self._snapshot_ids)}).encode()).decode()
            self._snapshots[token] = (rv, res, scope, rest)
            while len(self._snapshots) > _MAX_SNAPSHOTS:
                del self._snapshots[next(iter(self._snapshots))]
            meta["continue"] = token
            meta["remainingItemCount"] = len(rest)
        return web.json_response({"kind": f"{res.kind}List", "apiVersion": res.api_version,
                                  "metadata": meta, "items": items})

    @staticmethod
    def _item(obj: JSON) -> JSON:
        # Items of a typed list are served without kind/apiVersion.
        item = copy.deepcopy(obj)
        item.pop("kind", None)
        item.pop("apiVersion", None)
        return item

    def _bookmark(self, res: ResourceType) -> bytes:
        return _line("BOOKMARK", {"kind": res.kind, "apiVersion": res.api_version,
                                  "metadata": {"resourceVersion": str(self._rv)}})

    async def _watch(self, request: web.Request, rec: RecordedRequest, res: ResourceType,
                     query: Mapping[str, str]) -> web.StreamResponse:
        timeout = _parse_int(query, "timeoutSeconds")
        timeout = _DEFAULT_WATCH_TIMEOUT if timeout is None or timeout <= 0 else timeout
        watch = _Watch(res, rec.namespace, self._selector(res, query),
                       _parse_bool(query, "allowWatchBookmarks"), request.transport)
        rv_param = query.get("resourceVersion", "")
        error: APIError | None = None
        if rv_param in ("", "0"):
            # No resourceVersion: "get state and start at most recent", as synthetic ADDED events.
            for obj in self._matching(res, rec.namespace, watch.selector):
                watch.queue.put_nowait(_line("ADDED", obj))
        else:
            rv = _parse_rv(rv_param)
            if rv < self._oldest_resumable:
                error = APIError(410, f"too old resource version: {rv} ({self._oldest_resumable})")
                if self._gone_as == "http":
                    raise APIError(410, error.message, reason="Gone")
            elif rv > self._rv:
                error = APIError(504, f"Too large resource version: {rv}, current: {self._rv}", reason="Timeout")
            else:
                for change in self._history:
                    line = watch.translate(change) if change.rv > rv else None
                    if line is not None:
                        watch.queue.put_nowait(line)
        if error is None:
            # Registered before the first await, so no write can fall between the replay and the live feed.
            self._watches.add(watch)
        response = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        rec.status = 200
        try:
            await response.prepare(request)
            self._changed.set()
            if error is not None:
                await response.write(_line("ERROR", error.status()))
            else:
                await self._pump(watch, response, timeout)
            await response.write_eof()
        finally:
            if watch in self._watches:
                self._watches.discard(watch)
                self._changed.set()
        return response

    async def _pump(self, watch: _Watch, response: web.StreamResponse, timeout: int) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (remaining := deadline - loop.time()) > 0:
            try:
                line = await asyncio.wait_for(watch.queue.get(), remaining)
            except TimeoutError:
                break
            if line is None:
                return
            await response.write(line)
        # The real server sends a last bookmark as a watch reaches its timeout, so the client resumes
        # from as recent a resourceVersion as possible.
        if watch.bookmarks:
            await response.write(self._bookmark(watch.resource))


def realistic_objects(*files: Path) -> Iterable[JSON]:
    """The items of `kubectl get -o json` files, ready for `FakeKubeAPI.create`."""
    for path in files:
        doc = json.loads(path.read_text())
        yield from doc.get("items", [doc])
