"""The watcher's Kubernetes adapter: the only module of the watcher that imports kubernetes_asyncio.

- `KubeSource` lists and watches Nodes, Services, EndpointSlices (discovery.k8s.io/v1) and the one LB
  ConfigMap, and puts `Resync` / `ObjectEvent` items (see `source.py`) on a sink.
- `LeaderElector` holds a coordination.k8s.io/v1 Lease so that one replica publishes.
- `EventRecorder` reports rejected or held-back configs as core/v1 Events on the ConfigMap.
- `kube2ipvs.kubeclient.load_api_client` finds the cluster the way kubectl does.

Every request goes through the real client's generated methods with `_preload_content=False`, so
objects stay the API's JSON (camelCase) and are never turned into the client's models; status codes
are checked here, and errors are translated into "expired: relist" (410), "retry with backoff"
(other statuses, connection errors, timeouts, malformed responses), or, for the elector and the
recorder, "this round failed".

Concurrency and cancellation:
- `KubeSource.run` runs one supervised task per kind in a TaskGroup. Each task lists, puts a Resync,
  then watches from the list's resourceVersion; items of one kind are therefore always in order, and
  an ObjectEvent of a kind never precedes that kind's Resync. A task that returns or raises
  unexpectedly is logged and restarted, from a fresh list. Cancelling `run` cancels the tasks; an
  in-flight request is closed and nothing more is put on the sink.
- `LeaderElector.run` is one loop of acquire-or-renew rounds, each bounded so that the leader steps
  down before its lease can expire for the others. Cancelling it releases the Lease (bounded by
  `release_timeout`) if this replica holds it, so a successor takes over at its next round.
- `EventRecorder` methods run in the caller's task, one at a time (a lock keeps aggregation exact);
  API errors are logged, never raised, since an Event is best effort. Cancellation propagates.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import socket
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any, Final

import aiohttp
from kubernetes_asyncio import client
from kubernetes_asyncio.client import ApiClient

from kube2ipvs.backoff import Backoff
from kube2ipvs_watcher.source import EventType, Kind, ObjectEvent, Resync, Sink

log = logging.getLogger(__name__)

JSON = dict[str, Any]
ListMethod = Callable[..., Awaitable[Any]]

_EVENT_TYPES: Final[dict[str, EventType]] = {"ADDED": "ADDED", "MODIFIED": "MODIFIED", "DELETED": "DELETED"}
# A watch that ends cleanly this soon without delivering anything is treated as a failure (as
# client-go's reflector does), so a server that closes watches at once is not hammered.
_SHORT_WATCH_SECONDS: Final = 1.0
# A watch that stayed up this long was healthy even if it was quiet: its failure restarts the backoff.
_HEALTHY_WATCH_SECONDS: Final = 30.0
# The server ends a watch after timeoutSeconds; the client's read timeout only catches a dead peer.
_WATCH_READ_GRACE_SECONDS: Final = 30.0
_EVENT_MESSAGE_LIMIT: Final = 1024


class KubeAPIError(Exception):
    """The API server answered with an error Status."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message


class _GoneError(KubeAPIError):
    """410: the resourceVersion (or continue token) is older than the server's history."""


class _ProtocolError(ValueError):
    """A response that is not what the list/watch protocol promises (bad JSON, missing fields)."""


# Everything a list or watch can fail with that a later retry may not.
_TRANSIENT: Final = (KubeAPIError, aiohttp.ClientError, TimeoutError, OSError, _ProtocolError)


def _status_error(status: int, body: bytes | JSON) -> KubeAPIError:
    doc: object = body
    if isinstance(body, bytes):
        try:
            doc = json.loads(body)
        except ValueError:
            doc = {}
    reason, message = "", ""
    if isinstance(doc, dict):
        reason, message = str(doc.get("reason") or ""), str(doc.get("message") or "")
    if status == 410:
        return _GoneError(status, reason or "Gone", message)
    return KubeAPIError(status, reason or "Error", message)


async def _call(method: Callable[..., Awaitable[Any]], /, *args: Any, **kwargs: Any) -> aiohttp.ClientResponse:
    """Call a generated API method for its raw response: the body stays the API's JSON."""
    response = await method(*args, _preload_content=False, **kwargs)
    if not isinstance(response, aiohttp.ClientResponse):
        raise TypeError(f"kubernetes_asyncio returned {type(response).__name__}, not the raw aiohttp response")
    return response


async def _read_json(response: aiohttp.ClientResponse) -> JSON:
    try:
        raw = await response.read()
    finally:
        response.release()
    if not 200 <= response.status < 300:
        raise _status_error(response.status, raw)
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise _ProtocolError(f"response is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise _ProtocolError(f"response is a JSON {type(doc).__name__}, not an object")
    return doc


def _resource_version(obj: JSON) -> str:
    meta = obj.get("metadata")
    rv = meta.get("resourceVersion") if isinstance(meta, dict) else None
    return rv if isinstance(rv, str) else ""


def _micro_time(now: datetime) -> str:
    # metav1.MicroTime: the server parses exactly six fractional digits.
    return now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _seconds_time(now: datetime) -> str:
    return now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _utcnow() -> datetime:
    return datetime.now(UTC)


# ---- configuration ---------------------------------------------------------------------------------


# ---- list and watch --------------------------------------------------------------------------------


@dataclass(slots=True)
class KubeSourceStats:
    """Counters the watcher exports as metrics; keys are kinds (and event types)."""

    watch_events: Counter[tuple[str, str]] = field(default_factory=Counter)  # (kind, ADDED|...|BOOKMARK)
    lists: Counter[str] = field(default_factory=Counter)  # every complete list, the first one included
    relists: Counter[str] = field(default_factory=Counter)  # lists after the first (410, restarts)
    reconnects: Counter[str] = field(default_factory=Counter)  # watches re-opened after a failure
    restarts: Counter[str] = field(default_factory=Counter)  # supervised tasks restarted after a bug


@dataclass(frozen=True, slots=True)
class _Resource:
    kind: Kind
    api_version: str
    list: ListMethod  # a generated list_* method with its fixed arguments bound


@dataclass(slots=True)
class _WatchProgress:
    resource_version: str
    received: int = 0


class KubeSource:
    """Lists and watches the four kinds; `run(sink)` runs until cancelled (see the module docstring)."""

    def __init__(self, api_client: ApiClient, *, configmap_namespace: str, configmap_name: str,
                 configmap_selector: tuple[tuple[str, str], ...] | None = None,
                 backoff_initial: float = 0.2, backoff_max: float = 30.0, watch_timeout_seconds: int = 300,
                 list_page_size: int = 500, request_timeout: float = 60.0, connect_timeout: float = 10.0,
                 stats: KubeSourceStats | None = None, rng: random.Random | None = None) -> None:
        if backoff_initial <= 0 or backoff_max < backoff_initial:
            raise ValueError("need 0 < backoff_initial <= backoff_max")
        if watch_timeout_seconds < 1 or list_page_size < 1:
            raise ValueError("watch_timeout_seconds and list_page_size must be at least 1")
        core = client.CoreV1Api(api_client)
        discovery = client.DiscoveryV1Api(api_client)
        self._resources: tuple[_Resource, ...] = (
            _Resource("Node", "v1", core.list_node),
            _Resource("Service", "v1", core.list_service_for_all_namespaces),
            _Resource("EndpointSlice", "discovery.k8s.io/v1", discovery.list_endpoint_slice_for_all_namespaces),
            _Resource("ConfigMap", "v1", partial(core.list_namespaced_config_map, configmap_namespace,
                                                 field_selector=f"metadata.name={configmap_name}")
                      if configmap_selector is None else
                      partial(core.list_namespaced_config_map, configmap_namespace,
                              label_selector=",".join(f"{k}={v}" for k, v in configmap_selector))),
        )
        self._backoff_initial, self._backoff_max = backoff_initial, backoff_max
        self._watch_timeout = watch_timeout_seconds
        self._page_size = list_page_size
        self._list_timeout = aiohttp.ClientTimeout(total=request_timeout, connect=connect_timeout)
        self._watch_timeout_client = aiohttp.ClientTimeout(
            total=None, connect=connect_timeout, sock_read=watch_timeout_seconds + _WATCH_READ_GRACE_SECONDS)
        self._rng = rng or random.Random()  # noqa: S311 (jitter, not secrets)
        self.stats = stats or KubeSourceStats()
        self._resource_versions: dict[Kind, str] = {}

    def resource_version(self, kind: Kind) -> str | None:
        """The last resourceVersion this source has seen for a kind (list, event or bookmark)."""
        return self._resource_versions.get(kind)

    async def run(self, sink: Sink) -> None:
        async with asyncio.TaskGroup() as group:
            for res in self._resources:
                group.create_task(self._supervise(res, sink), name=f"kube-source-{res.kind}")

    async def _supervise(self, res: _Resource, sink: Sink) -> None:
        backoff = self._backoff()
        while True:
            started = time.monotonic()
            try:
                await self._list_and_watch(res, sink)
                log.error("kind=%s event=task_returned: the list/watch loop ended on its own (a bug); restarting",
                          res.kind)
            except Exception:
                log.exception("kind=%s event=task_failed: the list/watch loop raised (a bug); restarting", res.kind)
            self.stats.restarts[res.kind] += 1
            if time.monotonic() - started > self._backoff_max:
                backoff.reset()
            await asyncio.sleep(backoff.next())

    def _backoff(self) -> Backoff:
        return Backoff(initial=self._backoff_initial, maximum=self._backoff_max, rng=self._rng)

    async def _list_and_watch(self, res: _Resource, sink: Sink) -> None:
        backoff = self._backoff()
        resource_version: str | None = None
        while True:
            if resource_version is None:
                try:
                    objects, resource_version = await self._list(res)
                except _TRANSIENT as exc:
                    await self._pause(res, "list", exc, backoff)
                    continue
                if self.stats.lists[res.kind]:
                    self.stats.relists[res.kind] += 1
                self.stats.lists[res.kind] += 1
                self._resource_versions[res.kind] = resource_version
                sink.put_nowait(Resync(res.kind, objects))
            progress = _WatchProgress(resource_version)
            started = time.monotonic()
            try:
                await self._watch(res, progress, sink)
            except _GoneError as exc:
                log.info("kind=%s event=watch_expired resource_version=%s error=%s: relisting",
                         res.kind, progress.resource_version, exc)
                resource_version = None
                # A 410 on a fresh resourceVersion would otherwise loop list/watch without pause.
                if not progress.received:
                    await asyncio.sleep(backoff.next())
                continue
            except _TRANSIENT as exc:
                resource_version = progress.resource_version
                if progress.received or time.monotonic() - started >= _HEALTHY_WATCH_SECONDS:
                    backoff.reset()
                self.stats.reconnects[res.kind] += 1
                await self._pause(res, "watch", exc, backoff)
                continue
            resource_version = progress.resource_version
            if progress.received or time.monotonic() - started >= _SHORT_WATCH_SECONDS:
                backoff.reset()
            else:
                self.stats.reconnects[res.kind] += 1
                await self._pause(res, "watch", _ProtocolError("very short watch with no events"), backoff)

    async def _pause(self, res: _Resource, op: str, exc: BaseException, backoff: Backoff) -> None:
        delay = backoff.next()
        # Authorization and missing resources need an operator; everything else usually heals itself.
        level = logging.ERROR if isinstance(exc, KubeAPIError) and exc.status in (401, 403, 404) else logging.WARNING
        log.log(level, "kind=%s op=%s event=retry error=%s retry_in=%.2fs", res.kind, op,
                str(exc) or type(exc).__name__, delay)
        await asyncio.sleep(delay)

    async def _list(self, res: _Resource) -> tuple[tuple[JSON, ...], str]:
        """The complete list, page by page from one snapshot; its resourceVersion is the first page's."""
        items: list[JSON] = []
        token: str | None = None
        resource_version = ""
        while True:
            doc = await _read_json(await _call(res.list, limit=self._page_size, _continue=token,
                                               _request_timeout=self._list_timeout))
            meta = doc.get("metadata")
            meta = meta if isinstance(meta, dict) else {}
            if token is None:
                resource_version = str(meta.get("resourceVersion") or "")
            page = doc.get("items")
            for item in page if isinstance(page, list) else []:
                if isinstance(item, dict):
                    items.append(self._typed(res, item))
            token = meta.get("continue") or None
            if not token:
                break
        if not resource_version:
            raise _ProtocolError("list response without metadata.resourceVersion")
        return tuple(items), resource_version

    @staticmethod
    def _typed(res: _Resource, obj: JSON) -> JSON:
        # Typed lists serve items without kind/apiVersion; watch events carry them. Make both alike.
        obj.setdefault("kind", res.kind)
        obj.setdefault("apiVersion", res.api_version)
        return obj

    async def _watch(self, res: _Resource, progress: _WatchProgress, sink: Sink) -> None:
        """One watch request, until the server ends it (returns) or it fails (raises)."""
        response = await _call(res.list, watch=True, resource_version=progress.resource_version,
                               allow_watch_bookmarks=True, timeout_seconds=self._watch_timeout,
                               _request_timeout=self._watch_timeout_client)
        try:
            if response.status != 200:
                raise _status_error(response.status, await response.read())
            while line := await response.content.readline():
                if line.strip():
                    self._on_event(res, progress, sink, line)
        finally:
            # Closed rather than released: a stream ended mid-way cannot be reused for another request.
            response.close()

    def _on_event(self, res: _Resource, progress: _WatchProgress, sink: Sink, line: bytes) -> None:
        try:
            event = json.loads(line)
        except ValueError as exc:
            raise _ProtocolError(f"watch event is not JSON: {exc}") from None
        obj = event.get("object") if isinstance(event, dict) else None
        if not isinstance(obj, dict):
            raise _ProtocolError("watch event without an object")
        raw_type = event.get("type")
        if raw_type == "ERROR":
            code = obj.get("code")
            raise _status_error(code if isinstance(code, int) else 500, obj)
        self.stats.watch_events[res.kind, str(raw_type)] += 1
        resource_version = _resource_version(obj)
        if raw_type == "BOOKMARK":
            progress.received += 1
            if resource_version:
                progress.resource_version = resource_version
                self._resource_versions[res.kind] = resource_version
            return
        event_type = _EVENT_TYPES.get(str(raw_type))
        if event_type is None:
            log.warning("kind=%s event=unknown_watch_event type=%s: ignored", res.kind, raw_type)
            return
        sink.put_nowait(ObjectEvent(res.kind, event_type, self._typed(res, obj)))
        progress.received += 1
        if resource_version:
            progress.resource_version = resource_version
            self._resource_versions[res.kind] = resource_version


# ---- leader election -------------------------------------------------------------------------------


def default_identity() -> str:
    """A holder identity unique to this process: the host (the pod's name in a pod) and a random suffix."""
    return f"{socket.gethostname()}_{uuid.uuid4().hex[:8]}"


class LeaderElector:
    """Leader election on a coordination.k8s.io/v1 Lease, with client-go's semantics.

    A candidate takes the Lease when it is free (no holder: released) or when its record has not
    changed for `leaseDurationSeconds` of this process's own clock (renewTime is not trusted across
    clocks). The leader renews every `retry_period`; when it has not renewed for `renew_deadline`
    (< lease_duration) it steps down, before anyone else can consider the Lease expired. Writes use the
    Lease's resourceVersion, so of two racing candidates exactly one wins (the other gets 409).
    """

    def __init__(self, api_client: ApiClient, *, namespace: str, name: str, identity: str | None = None,
                 lease_duration: float = 15.0, renew_deadline: float = 10.0, retry_period: float = 2.0,
                 release_timeout: float = 5.0, rng: random.Random | None = None,
                 on_change: Callable[[bool], None] | None = None) -> None:
        if not lease_duration > renew_deadline > retry_period > 0:
            raise ValueError("need lease_duration > renew_deadline > retry_period > 0")
        self._api = client.CoordinationV1Api(api_client)
        self._namespace, self._name = namespace, name
        self.identity = identity or default_identity()
        self._lease_seconds = max(1, math.ceil(lease_duration))
        self._renew_deadline = renew_deadline
        self._retry_period = retry_period
        self._release_timeout = release_timeout
        self._rng = rng or random.Random()  # noqa: S311 (jitter, not secrets)
        self._on_change = on_change
        self._leading, self._following = asyncio.Event(), asyncio.Event()
        self._following.set()
        # Replaced at every change: whoever waits holds the old one, which is set.
        self._changed = asyncio.Event()
        self._leader = False
        self._last_renew = -math.inf
        self._lease: JSON | None = None  # the Lease as last written by us
        self._observed_rv = ""
        self._observed_at = -math.inf

    @property
    def is_leader(self) -> bool:
        # Also bounded by the deadline, so a stalled loop cannot make a stale leader answer yes.
        return self._leader and time.monotonic() - self._last_renew < self._renew_deadline

    async def wait_for(self, leader: bool) -> None:
        """Return once this replica is (leader=True) or is not (leader=False) the leader."""
        await (self._leading if leader else self._following).wait()

    async def wait_changed(self) -> None:
        """Return at the next change of leadership (either way); then read `is_leader`."""
        await self._changed.wait()

    async def run(self) -> None:
        try:
            while True:
                await self._round()
                # Candidates spread their attempts (client-go's jitter 1.2); the leader renews on time.
                jitter = 0.0 if self._leader else self._rng.uniform(0, 0.2 * self._retry_period)
                await asyncio.sleep(self._retry_period + jitter)
        except asyncio.CancelledError:
            if self._leader:
                try:
                    async with asyncio.timeout(self._release_timeout):
                        await self._release()
                except _TRANSIENT as exc:
                    log.warning("lease=%s/%s event=release_failed error=%s", self._namespace, self._name, exc)
            raise
        finally:
            self._set_leader(False)

    async def _round(self) -> None:
        started = time.monotonic()
        # The round may not outlive the leader's deadline: a hung request must not keep a stale leader.
        budget = self._last_renew + self._renew_deadline - started if self._leader else self._renew_deadline
        holds: bool | None = None
        if budget > 0:
            try:
                async with asyncio.timeout(budget):
                    holds = await self._try_acquire_or_renew()
            except _TRANSIENT as exc:
                log.log(logging.WARNING if self._leader else logging.DEBUG,
                        "lease=%s/%s event=round_failed error=%s", self._namespace, self._name,
                        str(exc) or type(exc).__name__)
        if holds:
            self._last_renew = started
            self._set_leader(True)
        elif holds is False or (self._leader and time.monotonic() - self._last_renew >= self._renew_deadline):
            self._set_leader(False)

    def _set_leader(self, leader: bool) -> None:
        if leader == self._leader:
            return
        self._leader = leader
        (self._leading if leader else self._following).set()
        (self._following if leader else self._leading).clear()
        self._changed.set()
        self._changed = asyncio.Event()
        log.info("lease=%s/%s identity=%s event=%s", self._namespace, self._name, self.identity,
                 "became_leader" if leader else "stopped_leading")
        if self._on_change is not None:
            self._on_change(leader)

    def _observe(self, lease: JSON) -> None:
        resource_version = _resource_version(lease)
        if resource_version != self._observed_rv:
            self._observed_rv, self._observed_at = resource_version, time.monotonic()

    async def _try_acquire_or_renew(self) -> bool:
        """True: we hold the Lease now. False: someone else validly holds it. Raises when the round failed."""
        now = _micro_time(_utcnow())
        response = await _call(self._api.read_namespaced_lease, self._name, self._namespace)
        if response.status == 404:
            response.release()
            body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": self._name, "namespace": self._namespace},
                    "spec": {"holderIdentity": self.identity, "leaseDurationSeconds": self._lease_seconds,
                             "acquireTime": now, "renewTime": now, "leaseTransitions": 0}}
            created = await _read_json(await _call(self._api.create_namespaced_lease, self._namespace, body))
            self._observe(created)
            self._lease = created
            return True
        lease = await _read_json(response)
        self._observe(lease)
        spec = lease.get("spec")
        spec = dict(spec) if isinstance(spec, dict) else {}
        holder = spec.get("holderIdentity") or ""
        duration = spec.get("leaseDurationSeconds")
        duration = duration if isinstance(duration, int) and duration > 0 else self._lease_seconds
        if holder and holder != self.identity and time.monotonic() < self._observed_at + duration:
            return False
        transitions = spec.get("leaseTransitions")
        transitions = transitions if isinstance(transitions, int) else 0
        if holder != self.identity:
            log.info("lease=%s/%s event=acquiring previous_holder=%s", self._namespace, self._name, holder or "-")
            spec.update(acquireTime=now, leaseTransitions=transitions + 1)
        spec.update(holderIdentity=self.identity, leaseDurationSeconds=self._lease_seconds, renewTime=now)
        spec.setdefault("acquireTime", now)
        lease["spec"] = spec
        # The body carries metadata.resourceVersion: if anyone wrote the Lease since our read, 409.
        updated = await _read_json(await _call(self._api.replace_namespaced_lease, self._name, self._namespace,
                                               lease))
        self._observe(updated)
        self._lease = updated
        return True

    async def _release(self) -> None:
        """Give the Lease up (empty holder, 1 s duration) so a candidate takes it at its next round."""
        lease = self._lease
        for attempt in range(2):
            spec = lease.get("spec") if lease is not None else None
            if lease is None or not isinstance(spec, dict) or spec.get("holderIdentity") != self.identity:
                return
            now = _micro_time(_utcnow())
            spec = {**spec, "holderIdentity": "", "leaseDurationSeconds": 1, "renewTime": now, "acquireTime": now}
            try:
                self._lease = await _read_json(await _call(self._api.replace_namespaced_lease, self._name,
                                                           self._namespace, {**lease, "spec": spec}))
            except KubeAPIError as exc:
                # A renewal cancelled mid-flight may have landed: re-read, and release if still ours.
                if exc.status != 409 or attempt:
                    raise
                lease = await _read_json(await _call(self._api.read_namespaced_lease, self._name, self._namespace))
                continue
            log.info("lease=%s/%s identity=%s event=released", self._namespace, self._name, self.identity)
            return


# ---- events ----------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Recorded:
    event_name: str
    count: int
    last_seen: float  # monotonic


class EventRecorder:
    """Writes Warning Events on the LB ConfigMap. An event identical to one recorded within
    `aggregate_window` seconds bumps that Event's count and lastTimestamp (one PATCH) instead of
    creating another, as client-go's event correlator does."""

    def __init__(self, api_client: ApiClient, *, component: str = "kube2ipvs-watcher", host: str | None = None,
                 aggregate_window: float = 600.0, clock: Callable[[], datetime] = _utcnow,
                 max_tracked: int = 256) -> None:
        self._api = client.CoreV1Api(api_client)
        self._component = component
        self._host = host or socket.gethostname()
        self._window = aggregate_window
        self._clock = clock
        self._max_tracked = max_tracked
        self._recent: OrderedDict[tuple[str, ...], _Recorded] = OrderedDict()
        self._lock = asyncio.Lock()

    async def config_rejected(self, namespace: str, name: str, reason: str, *, uid: str | None = None) -> None:
        """`reason` is the human-readable why (the Event's message); the Event's reason is ConfigRejected."""
        await self.warning(namespace, name, event_reason="ConfigRejected", message=reason, uid=uid)

    async def config_held(self, namespace: str, name: str, reason: str, *, uid: str | None = None) -> None:
        await self.warning(namespace, name, event_reason="ConfigHeld", message=reason, uid=uid)

    async def warning(self, namespace: str, name: str, *, event_reason: str, message: str, uid: str | None = None,
                      kind: str = "ConfigMap", api_version: str = "v1") -> None:
        """A Warning Event about an object. `uid` lets `kubectl describe` find the Event."""
        if len(message) > _EVENT_MESSAGE_LIMIT:
            message = message[: _EVENT_MESSAGE_LIMIT - 3] + "..."
        key = (namespace, name, uid or "", kind, event_reason, message)
        async with self._lock:
            try:
                await self._record(key, namespace, name, uid, kind, api_version, event_reason, message)
            except _TRANSIENT as exc:
                log.warning("object=%s/%s/%s event=event_not_recorded reason=%s error=%s", kind, namespace, name,
                            event_reason, exc)

    async def _record(self, key: tuple[str, ...], namespace: str, name: str, uid: str | None, kind: str,
                      api_version: str, event_reason: str, message: str) -> None:
        now, mono = self._clock(), time.monotonic()
        recent = self._recent.get(key)
        if recent is not None and mono - recent.last_seen < self._window:
            patch = {"count": recent.count + 1, "lastTimestamp": _seconds_time(now)}
            response = await _call(self._api.patch_namespaced_event, recent.event_name, namespace, patch)
            if response.status != 404:
                await _read_json(response)
                recent.count += 1
                recent.last_seen = mono
                self._recent.move_to_end(key)
                return
            # The Event expired (the server's TTL) or was deleted: start a new one.
            response.release()
        involved: JSON = {"apiVersion": api_version, "kind": kind, "namespace": namespace, "name": name}
        if uid:
            involved["uid"] = uid
        event_name = f"{name}.{time.time_ns():x}"
        body = {"apiVersion": "v1", "kind": "Event",
                "metadata": {"name": event_name, "namespace": namespace},
                "involvedObject": involved, "reason": event_reason, "message": message, "type": "Warning",
                "count": 1, "firstTimestamp": _seconds_time(now), "lastTimestamp": _seconds_time(now),
                "source": {"component": self._component, "host": self._host},
                "reportingComponent": self._component, "reportingInstance": self._host}
        await _read_json(await _call(self._api.create_namespaced_event, namespace, body))
        self._recent[key] = _Recorded(event_name, 1, mono)
        self._recent.move_to_end(key)
        while len(self._recent) > self._max_tracked:
            self._recent.popitem(last=False)
