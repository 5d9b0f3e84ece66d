"""The watcher service: source -> WatcherCore -> (coalesce) -> NATS, plus its status server.

Concurrency, in one event loop: the source task fills a queue; the leadership task (when there is
one) keeps the Lease; the main loop drains the queue, applies items to the core and publishes,
at most once per `min_interval` (bursts coalesce: only the newest state is published). Publishing
happens only while this replica leads. A new leader first reads what the bucket holds and
publishes only differences — nothing at all when the content is the same, so consumers see no
churn. After a failed publish it re-reads the bucket and retries with capped backoff.
Cancellation (SIGTERM) stops the loop between publishes; the leadership is released last.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from kube2ipvs.backoff import Backoff
from kube2ipvs.ipvs import MODES, Mode
from kube2ipvs.lbconfig import Protocol as L4Protocol
from kube2ipvs.model import ClusterState
from kube2ipvs.protocol import (
    SERVICE_PREFIX,
    Encoded,
    Encoder,
    Write,
    decode_meta,
    decode_service,
    encoded_from_values,
    plan_writes,
    same_content,
)
from kube2ipvs.render import FORMATS, RenderError, render_format
from kube2ipvs.statusserver import ConfigRequestError, ConfigResponse, Health, json_response, text_response
from kube2ipvs_watcher.core import ConfigHeld, ConfigRejected, Notice, WatcherCore
from kube2ipvs_watcher.source import ObjectEvent, Resync, SourceItem
from kube2ipvs_watcher.ui import Rejection

log = logging.getLogger("kube2ipvs.watcher")


class Source(Protocol):
    async def run(self, sink: asyncio.Queue[SourceItem]) -> None: ...


class Publisher(Protocol):
    @property
    def connected(self) -> bool: ...

    async def publish(self, writes: Sequence[Write]) -> int: ...

    async def read_all(self) -> dict[str, bytes]: ...


class Leadership(Protocol):
    @property
    def is_leader(self) -> bool: ...

    async def wait_changed(self) -> None: ...

    async def run(self) -> None:
        """Keep (or wait for) the leadership until cancelled; cancelling releases it."""


class EventSink(Protocol):
    async def config_rejected(self, namespace: str, name: str, reason: str, *, uid: str | None = None) -> None: ...

    async def config_held(self, namespace: str, name: str, reason: str, *, uid: str | None = None) -> None: ...


class AlwaysLeader:
    """Leadership of a single replica (file source, or leader election turned off)."""

    is_leader = True

    async def wait_changed(self) -> None:
        await asyncio.Event().wait()

    async def run(self) -> None:
        await asyncio.Event().wait()


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        p = "kube2ipvs_watcher_"
        self.source_items = Counter(p + "source_items_total", "Items from the source, by kind and type",
                                    ["kind", "type"], registry=registry)
        self.relists = Counter(p + "relists_total", "Complete lists (initial and after 410/reconnect)",
                               ["kind"], registry=registry)
        self.publishes = Counter(p + "publishes_total", "States published", registry=registry)
        self.publish_errors = Counter(p + "publish_errors_total", "Failed publish attempts", registry=registry)
        self.publish_bytes = Counter(p + "publish_bytes_total", "Bytes written to the bucket", registry=registry)
        self.publish_seconds = Histogram(
            p + "publish_seconds", "From the first unpublished change to its publish completing",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=registry)
        self.config_rejections = Counter(p + "config_rejections_total", "LB configs rejected as invalid",
                                         registry=registry)
        self.config_held = Gauge(p + "config_held", "1 while a config is held by the mass-removal guard",
                                 registry=registry)
        self.config_rejected = Gauge(p + "config_rejected", "1 while the newest config is rejected",
                                     registry=registry)
        self.leader = Gauge(p + "leader", "1 while this replica publishes", registry=registry)
        self.generation = Gauge(p + "generation", "Generation of the state last published", registry=registry)
        self.services = Gauge(p + "state_services", "Virtual services in the desired state", registry=registry)
        self.endpoints = Gauge(p + "state_endpoints", "Pod endpoints in the desired state", registry=registry)
        self.state_bytes = Gauge(p + "state_bytes", "Bytes of every value of the state (the bucket's size)",
                                 registry=registry)


@dataclass(frozen=True, slots=True)
class AppSettings:
    min_interval: float = 0.2  # seconds between publishes; bursts within it coalesce
    retry_max: float = 10.0
    stale_after: float = 120.0  # /healthz fails when a change waited longer than this unpublished
    rejections_kept: int = 20  # recent config rejections and holds the status page lists


class WatcherApp:
    def __init__(
        self,
        core: WatcherCore,
        *,
        source: Source,
        publisher: Publisher,
        leadership: Leadership | None = None,
        events: EventSink | None = None,
        settings: AppSettings | None = None,
        registry: CollectorRegistry | None = None,
        describe: dict[str, Any] | None = None,
    ) -> None:
        self.core = core
        self._source = source
        self._publisher = publisher
        self._leadership = leadership or AlwaysLeader()
        self._events = events
        self.settings = settings or AppSettings()
        self.registry = registry or CollectorRegistry()
        self.metrics = Metrics(self.registry)
        self._encoder = Encoder()
        # Computed when scraped, not on every publish: they walk the whole state.
        self.metrics.services.set_function(lambda: len(self.last_state.services) if self.last_state else 0)
        self.metrics.endpoints.set_function(lambda: sum(
            len(b.endpoints) for vs in self.last_state.services for b in vs.backends) if self.last_state else 0)
        self.metrics.state_bytes.set_function(lambda: self._encoder.total_bytes)
        self._describe = describe or {}
        self._queue: asyncio.Queue[SourceItem] = asyncio.Queue()
        self._kick = asyncio.Event()
        self._in_sync = False  # the bucket holds exactly what the encoder last produced
        self._generation = 0
        self.last_state: ClusterState | None = None  # last state published (or found published)
        self.last_publish_at: float | None = None
        self.pending_since: float | None = None  # first change not yet published
        self.publish_error: str | None = None
        self.publish_error_since: float | None = None
        self._was_leader = False
        self._epoch = 0  # bumped on every NATS reconnect
        self.published_event = asyncio.Event()  # set after every successful publish (tests await it)
        self._background: set[asyncio.Task[None]] = set()  # Event posts in flight (the loop keeps weak refs)
        self.rejections: collections.deque[Rejection] = collections.deque(maxlen=self.settings.rejections_kept)

    # -- running --------------------------------------------------------------------------------

    def nats_reconnected(self) -> None:
        """NATS came back (maybe a new server with an empty store): re-read the bucket, republish.

        Called from the NATS client's callback, in this event loop.
        """
        self._epoch += 1
        self._in_sync = False
        self.core.changed = True
        self._kick.set()

    async def run(self) -> None:
        """Runs until cancelled."""
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._forever("source", self._source.run(self._queue)))
            tg.create_task(self._forever("leadership-watch", self._watch_leadership()))
            tg.create_task(self._forever("consume", self._consume()))
            tg.create_task(self._forever("publish", self._publish_loop()))

    async def _forever(self, name: str, coro: Any) -> None:
        await coro
        log.error("task %s returned; it should run until cancelled (bug)", name)  # pragma: no cover

    async def _watch_leadership(self) -> None:
        while True:
            await self._leadership.wait_changed()
            self._kick.set()

    async def _load_baseline(self) -> None:
        """Read what the bucket serves before deciding any config: the mass-removal guard's baseline.

        Items from the source wait in the queue meanwhile, so no config is judged without it.
        """
        backoff = Backoff(initial=0.1, maximum=self.settings.retry_max)
        while True:
            try:
                bucket = encoded_from_values(await self._publisher.read_all())
                break
            except Exception as exc:
                delay = backoff.next()
                log.warning("event=baseline-read-failed error=%r retry_in=%.1fs", exc, delay)
                await asyncio.sleep(delay)
        self._generation = self._published_generation(bucket)
        self.core.set_in_force_keys(_service_keys(bucket))

    async def _consume(self) -> None:
        await self._load_baseline()
        while True:
            item = await self._queue.get()
            self._apply(item)
            while not self._queue.empty():  # drain the burst before publishing
                self._apply(self._queue.get_nowait())
            self._kick.set()

    def _apply(self, item: SourceItem) -> None:
        if isinstance(item, Resync):
            self.metrics.relists.labels(item.kind).inc()
            log.info("event=resync kind=%s objects=%d", item.kind, len(item.objects))
        elif isinstance(item, ObjectEvent):
            self.metrics.source_items.labels(item.kind, item.type).inc()
        if self.pending_since is None:
            self.pending_since = time.monotonic()
        for notice in self.core.apply(item):
            self._notice(notice)

    def _notice(self, notice: Notice) -> None:
        s = self.core.settings
        if isinstance(notice, ConfigRejected):
            self.metrics.config_rejections.inc()
            self.rejections.appendleft(Rejection(time.time(), "rejected", notice.reason, notice.errors))
            log.warning("event=config-rejected reason=%s", notice.reason)
            if self._events is not None:
                self._spawn(self._event(
                    self._events.config_rejected, s.configmap_namespace, notice.name or s.configmap_name,
                    notice.reason, notice.uid))
        elif isinstance(notice, ConfigHeld):
            self.rejections.appendleft(Rejection(time.time(), "held", notice.reason))
            log.warning("event=config-held reason=%s", notice.reason)
            if self._events is not None:
                self._spawn(self._event(
                    self._events.config_held, s.configmap_namespace, notice.name or s.configmap_name,
                    notice.reason, notice.uid))
        else:
            log.info("event=config-accepted entries=%d warnings=%d", notice.entries, len(notice.warnings))
            for warning in notice.warnings:
                log.warning("event=config-warning reason=%s", warning)
        self.metrics.config_held.set(1 if self.core.config_status.held else 0)
        self.metrics.config_rejected.set(1 if self.core.config_status.rejected else 0)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _event(self, call: Any, namespace: str, name: str, reason: str, uid: str | None) -> None:
        try:
            await call(namespace, name, reason, uid=uid)
        except Exception as exc:  # an Event is a courtesy; never let it stop the watcher
            log.warning("event=kubernetes-event-failed error=%r", exc)

    async def _publish_loop(self) -> None:
        backoff = Backoff(initial=max(self.settings.min_interval, 0.05), maximum=self.settings.retry_max)
        while True:
            await self._kick.wait()
            self._kick.clear()
            leader = self._leadership.is_leader
            self.metrics.leader.set(1 if leader else 0)
            if leader and not self._was_leader:
                self._in_sync = False  # a new leader starts from what the bucket holds
            self._was_leader = leader
            if not leader or not self.core.ready or (not self.core.changed and self._in_sync):
                continue
            wait = (self.last_publish_at or 0.0) + self.settings.min_interval - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)  # coalesce: items arriving meanwhile join this publish
            try:
                await self.publish_once()
                backoff.reset()
            except Exception as exc:
                self.metrics.publish_errors.inc()
                if self.publish_error is None:
                    self.publish_error_since = time.time()
                self.publish_error = f"{type(exc).__name__}: {exc}"
                self._in_sync = False  # re-read the bucket before the next attempt
                delay = backoff.next()
                log.warning("event=publish-failed error=%s retry_in=%.1fs", self.publish_error, delay)
                await asyncio.sleep(delay)
                self.core.changed = True
                self._kick.set()

    async def publish_once(self) -> int:
        """Publish the newest state if it differs from what the bucket holds. Returns bytes written.

        In sync (the bucket holds what we last published), only the encoder's delta is written.
        Otherwise (start, new leader, failure, reconnect) the bucket is read and compared in full.
        """
        started = self.pending_since
        epoch = self._epoch
        state = self.core.state(generation=self._generation)
        delta = self._encoder.update(state)
        writes: list[Write] = []
        full = not self._in_sync
        if full:
            bucket = encoded_from_values(await self._publisher.read_all())
            self._generation = max(self._generation, self._published_generation(bucket))
            if not same_content(bucket, self._encoder.snapshot(self._generation)):
                self._generation += 1
                writes = plan_writes(bucket, self._encoder.snapshot(self._generation))
        elif delta:
            self._generation += 1
            writes = delta.writes(self._encoder.meta(self._generation))
        written = 0
        if writes:
            self._in_sync = False  # until the writes are acknowledged
            written = await self._publisher.publish(writes)
            self.metrics.publishes.inc()
            self.metrics.publish_bytes.inc(written)
            log.info("event=published generation=%d hash=%s writes=%d bytes=%d", self._generation,
                     state.content_hash, len(writes), written)
        # A reconnect meanwhile may have lost values written before it: then compare again.
        self._in_sync = epoch == self._epoch
        if full:
            # The state just built is long-lived: keep the collector's full passes off it, or each
            # one (hundreds of ms at 100,000 endpoints) lands in some change's publish latency.
            gc.freeze()
        self.last_state = replace(state, generation=self._generation, known_digests=state.service_digests)
        self.last_publish_at = time.monotonic()
        if started is not None:
            self.metrics.publish_seconds.observe(self.last_publish_at - started)
        self.pending_since = None
        self.publish_error = self.publish_error_since = None
        self.metrics.generation.set(self._generation)
        self.published_event.set()
        return written

    @staticmethod
    def _published_generation(published: Encoded) -> int:
        try:
            return decode_meta(published.meta).generation if published.values else 0
        except (KeyError, ValueError):
            return 0

    # -- status ---------------------------------------------------------------------------------

    def health(self) -> Health:
        detail: dict[str, Any] = {
            "leader": self._leadership.is_leader,
            "nats_connected": self._publisher.connected,
            "generation": self._generation,
            "hash": self.last_state.content_hash if self.last_state else None,
        }
        if not self.core.ready:
            problem = self.core.config_status.problem or "waiting for " + ", ".join(self.core.waiting_for)
            return Health(False, problem, detail)
        if self.core.config_status.problem:
            return Health(False, self.core.config_status.problem, detail)
        if self._leadership.is_leader:
            if not self._publisher.connected:
                return Health(False, "nats disconnected", detail)
            if self.publish_error is not None:
                since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.publish_error_since or 0))
                return Health(False, f"publish failing since {since}: {self.publish_error}", detail)
            if self.pending_since is not None and time.monotonic() - self.pending_since > self.settings.stale_after:
                return Health(False, f"a change has waited over {self.settings.stale_after:.0f}s to be published",
                              detail)
        return Health(True, "", detail)

    def config(self, query: Mapping[str, str]) -> ConfigResponse:
        fmt = query.get("format")
        state = self.last_state
        if fmt is None:
            status = self.core.config_status
            return json_response({
                "role": "watcher",
                "settings": self._describe,
                "leader": self._leadership.is_leader,
                "ready": self.core.ready,
                "generation": self._generation,
                "hash": state.content_hash if state else None,
                "config": {
                    "problem": status.problem or None,
                    "warnings": list(status.warnings),
                    "entries": len(self.core.config.entries),
                    "vips": len(self.core.config.vips()),
                },
                "state": None if state is None else {
                    "services": len(state.services),
                    "services_with_backends": sum(1 for vs in state.services if vs.backends),
                    "endpoints": sum(len(b.endpoints) for vs in state.services for b in vs.backends),
                    "nodes": len(state.nodes),
                    "eligible_nodes": sum(1 for n in state.nodes if n.eligible),
                    "skipped": [f"{s.subject}: {s.reason}" for s in state.skipped],
                },
                "formats": list(FORMATS),
            })
        if state is None:
            return text_response("no state published yet\n", 503)
        mode = query.get("mode", "arp")
        if mode not in MODES:
            raise ConfigRequestError(f"mode must be one of {', '.join(MODES)}")
        try:
            mode_: Mode = "bgp" if mode == "bgp" else "arp"
            return text_response(render_format(state, fmt, node=query.get("node"), mode=mode_))
        except RenderError as exc:
            if exc.problem == "format":
                raise ConfigRequestError(f"format must be one of {', '.join(FORMATS)}") from None
            if exc.problem == "node required":
                raise ConfigRequestError(f"format {fmt} needs ?node= (nodes: {exc.nodes})") from None
            raise ConfigRequestError(f"no such node {exc.node} (nodes: {exc.nodes})") from None


def _service_keys(published: Encoded) -> frozenset[tuple[str, int, L4Protocol]]:
    keys: set[tuple[str, int, L4Protocol]] = set()
    for key, value in published.values.items():
        if key.startswith(SERVICE_PREFIX):
            try:
                vs = decode_service(json.loads(value))
            except (ValueError, RecursionError):  # not ours to read (a foreign or corrupt value)
                continue
            keys.add(vs.key)
    return frozenset(keys)
