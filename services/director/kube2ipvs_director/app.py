"""The director loop: cluster state -> desired IPVS -> plan against the kernel -> apply.

One event loop: a task hands each new complete state from the subscriber to the app (the newest
wins, so a burst coalesces into one reconcile); the reconcile task runs on each new state,
every `resync_interval` seconds (drift repair), when a drain deadline falls, and sooner (with
backoff) after a failure. Kernel work runs in a worker thread, one reconcile at a time, so
/healthz and /metrics answer while 10,000 services load. Before the first complete state nothing
is touched; while NATS is away the subscriber hands over nothing and the kernel stays exactly as
it is (resyncs go on against the last state, so an `ipvsadm -d` by hand is still repaired).

What a reconcile does, in order:

    settings     IPVS timeouts (tcp, tcpfin, udp) and net.ipv4.vs.* sysctls, set when they differ
    VIPs         the addresses of served VIPs on the VIP device, added before their services
    IPVS         plan(desired, observed) applied: edits in place, new real servers before old
                 ones leave, drained real servers removed once idle or after the drain timeout
    VIPs         addresses of VIPs no longer served removed after their services
    readiness    the applied generation and health published for the bgp-speaker

The full IPVS dump (all services and real servers) is read on the first reconcile, on resyncs,
after a failure and while real servers drain; on the path of a change the kernel is taken to
hold what the last successful apply left (`observed_after`), which keeps a one-endpoint change
cheap at 10,000 services.

Ownership: the services of configured VIPs, and of VIPs this director served before they left
the configuration (remembered in its state file until their services are gone), so a VIP
removed from the ConfigMap is drained and deleted rather than forgotten in the kernel.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final, Generic, ParamSpec, Protocol, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kube2ipvs.ipvs import IpvsService, Mode, desired_service
from kube2ipvs.model import ClusterState, VirtualService
from kube2ipvs.render.ipvsadm import service_lines
from kube2ipvs.statusserver import (
    ConfigRequestError,
    ConfigResponse,
    Health,
    SubscriberStatus,
    json_response,
    source_detail,
    text_response,
)
from kube2ipvs.workers import KernelThread, OnDemandReading
from kube2ipvs_director.garp import GarpSchedule
from kube2ipvs_director.kernel import ApplyError, Ipvs, KernelError, ServiceStats
from kube2ipvs_director.plan import (
    CanonicalVips,
    DelService,
    DestId,
    Observed,
    ObservedService,
    Op,
    Plan,
    ServiceId,
    Timeouts,
    canonical_ip,
    canonical_vips,
    cleanup_plan,
    observed_after,
    observed_as_desired,
    plan,
    service_id,
    service_order,
)
from kube2ipvs_director.stats import ConntrackUsage

log = logging.getLogger("kube2ipvs.director")

FORMATS: Final = ("ipvsadm", "desired", "json")
DEFAULT_STATE_FILE: Final = "/run/kube2ipvs/director.json"

P = ParamSpec("P")
T = TypeVar("T")


class _SameInputs(Generic[P, T]):
    """`fn`'s last result, returned again while it is called with the very same objects (not
    merely equal ones: telling two sets of 10,000 VIPs apart is the work this saves a change).
    The last call's inputs and result are kept in one attribute, replaced together."""

    __slots__ = ("_fn", "_last")

    def __init__(self, fn: Callable[P, T]) -> None:
        self._fn = fn
        self._last: tuple[tuple[object, ...], T] | None = None

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> T:
        last = self._last
        if last is not None and not kwargs and len(args) == len(last[0]) \
                and all(a is b for a, b in zip(args, last[0], strict=True)):
            return last[1]
        value = self._fn(*args, **kwargs)
        self._last = (args, value)
        return value


def _owned_vips(configured: CanonicalVips, remembered: frozenset[str]) -> CanonicalVips:
    return CanonicalVips(configured | remembered)


def _intersection(a: frozenset[str], b: frozenset[str]) -> frozenset[str]:
    return a & b


def _union(a: frozenset[str], b: frozenset[str]) -> frozenset[str]:
    return a | b


def _sorted(vips: frozenset[str]) -> tuple[str, ...]:
    return tuple(sorted(vips))


class StateSource(SubscriberStatus, Protocol):
    @property
    def connected(self) -> bool: ...

    def states(self) -> AsyncIterator[ClusterState]: ...


class Host(Protocol):
    """The host side of a director: VIP addresses on the VIP device, and net.ipv4.vs sysctls."""

    def vip_addresses(self) -> tuple[frozenset[str], frozenset[str]]:
        """(ours, foreign): canonical addresses on the VIP device."""
        ...

    def add_vip(self, address: str) -> None: ...

    def delete_vip(self, address: str) -> None: ...

    def vs_sysctls(self) -> Mapping[str, int | str]: ...

    def set_vs_sysctl(self, name: str, value: int) -> None: ...


class Readiness(Protocol):
    async def publish(self, status: Mapping[str, Any]) -> None: ...


class Leadership(Protocol):
    """An expiring exclusive lease (natskv.Lease): ARP directors hold VIPs only while they hold it."""

    ttl: float

    async def hold(self) -> bool: ...

    async def release(self) -> None: ...


class Announcer(Protocol):
    """Gratuitous ARP / unsolicited NA sender (garp.GarpSender): blocking, one frame per VIP."""

    def announce(self, vips: Iterable[str]) -> int: ...


@dataclass(frozen=True, slots=True)
class StatsSnapshot:
    services: tuple[ServiceStats, ...] = ()
    conn_states: Mapping[tuple[str, str], int] | None = None  # (protocol, TCP state) -> entries
    conntrack: ConntrackUsage = field(default_factory=lambda: ConntrackUsage(None, None))


class StatsSource(Protocol):
    """Reads what /metrics shows; called from a thread of its own, never during a reconcile's
    kernel calls on the same socket (give it its own IPVS socket)."""

    def read(self) -> StatsSnapshot: ...


class DirectorStats(Collector):
    """Prometheus series from the last stats snapshot, for the owned services only."""

    def __init__(self, app: DirectorApp) -> None:
        self._app = app

    def collect(self) -> Iterable[Metric]:
        p = "kube2ipvs_director_"
        snap, owned = self._app.stats, self._app.owned_vips
        states = GaugeMetricFamily(p + "ipvs_connections", "IPVS connection entries by protocol and TCP state "
                                   "(/proc/net/ip_vs_conn)", labels=["protocol", "state"])
        for (protocol, state), n in sorted((snap.conn_states or {}).items()):
            states.add_metric([protocol, state], n)
        labels = ["vip", "port", "protocol"]
        active = GaugeMetricFamily(p + "vs_active_connections", "Active (established) connections of a VIP:port",
                                   labels=labels)
        inactive = GaugeMetricFamily(p + "vs_inactive_connections", "Other connection entries of a VIP:port",
                                     labels=labels)
        conns = CounterMetricFamily(p + "vs_connections", "Connections IPVS scheduled for a VIP:port", labels=labels)
        packets = CounterMetricFamily(p + "vs_packets", "Packets of a VIP:port (out: only with NAT)",
                                      labels=[*labels, "direction"])
        octets = CounterMetricFamily(p + "vs_bytes", "Bytes of a VIP:port (out: only with NAT)",
                                     labels=[*labels, "direction"])
        for svc in snap.services:
            if svc.id.vip not in owned:
                continue
            key = [svc.id.vip, str(svc.id.port), svc.id.protocol]
            active.add_metric(key, sum(d.active for d in svc.dests))
            inactive.add_metric(key, sum(d.inactive for d in svc.dests))
            conns.add_metric(key, svc.counters.connections)
            packets.add_metric([*key, "in"], svc.counters.packets_in)
            packets.add_metric([*key, "out"], svc.counters.packets_out)
            octets.add_metric([*key, "in"], svc.counters.bytes_in)
            octets.add_metric([*key, "out"], svc.counters.bytes_out)
        out: list[Metric] = [states, active, inactive, conns, packets, octets]
        if snap.conntrack.count is not None:
            out.append(GaugeMetricFamily(p + "conntrack_entries", "netfilter conntrack entries in use",
                                         value=snap.conntrack.count))
        if snap.conntrack.max is not None:
            out.append(GaugeMetricFamily(p + "conntrack_max", "netfilter conntrack table size",
                                         value=snap.conntrack.max))
        return out


def default_vs_sysctls(mode: Mode) -> dict[str, int]:
    """net.ipv4.vs.* values a director sets (each overridable with --vs-sysctl NAME=VALUE):

    conntrack=0          IPVS keeps its own connection table; netfilter conntrack entries for
                         direct-routed flows only fill the conntrack table (the guide's
                         "table full, dropping packet")
    expire_nodest_conn=1 a connection to a real server that is gone is dropped at its next
                         packet, so the client retries at once instead of timing out
    sloppy_tcp=1 (bgp)   a mid-connection packet that routers re-hashed to this director gets a
                         connection entry (and, with mh, the same real server) instead of a RST
                         (DESIGN.md 4.1); off in ARP mode, where one director sees every packet
    """
    return {"conntrack": 0, "expire_nodest_conn": 1, "sloppy_tcp": 1 if mode == "bgp" else 0}


@dataclass(frozen=True, slots=True)
class DirectorSettings:
    mode: Mode = "bgp"
    drain_timeout: float = 300.0
    # tcpfin: how long IPVS keeps a connection in FIN_WAIT. A director sees only the client's
    # half of a teardown, so entries pile up there (the guide); IPVS' default is 120 s.
    timeouts: Timeouts = field(default_factory=lambda: Timeouts(tcp=900, tcpfin=30, udp=300))
    vs_sysctls: Mapping[str, int] = field(default_factory=lambda: default_vs_sysctls("bgp"))
    resync_interval: float = 10.0
    retry_min: float = 0.5
    state_file: Path | None = None  # remembers the VIPs we own across restarts (None: not kept)
    # Connection states (/proc/net/ip_vs_conn, a million lines on a busy director) and IPVS
    # counters are read this often, by a task of their own.
    stats_max_age: float = 2.0  # a scrape within this of the last reading shows that reading
    garp_period: float = 2.0  # ARP mode: every served VIP is announced at least this often


def load_owned_vips(path: Path | None) -> frozenset[str]:
    """The VIPs the state file says we own; none when there is no (readable) file."""
    if path is None:
        return frozenset()
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return frozenset()
    vips = doc.get("owned_vips") if isinstance(doc, dict) else None
    if not isinstance(vips, list):
        return frozenset()
    return frozenset(canonical_ip(v) for v in vips if isinstance(v, str))


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        p = "kube2ipvs_director_"
        self.reconciles = Counter(p + "reconciles_total", "Reconciles, by trigger", ["trigger"], registry=registry)
        self.reconcile_seconds = Histogram(p + "reconcile_seconds", "Time of a reconcile (plan and apply)",
                                           buckets=(0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30),
                                           registry=registry)
        self.ops = Counter(p + "ops_total", "IPVS and address changes applied, by kind", ["op"], registry=registry)
        self.drift_repairs = Counter(p + "drift_repairs_total",
                                     "Changes a resync made although the desired state had not changed "
                                     "(someone changed IPVS, an address or a setting by hand)", registry=registry)
        self.apply_errors = Counter(p + "apply_errors_total", "Reconciles that failed", registry=registry)
        self.generation_desired = Gauge(p + "generation_desired", "Generation of the newest cluster state received",
                                        registry=registry)
        self.generation_applied = Gauge(p + "generation_applied", "Generation of the cluster state in the kernel",
                                        registry=registry)
        self.services = Gauge(p + "virtual_services", "Owned IPVS virtual services in the kernel", registry=registry)
        self.real_servers = Gauge(p + "real_servers", "Real servers of owned virtual services", registry=registry)
        self.draining = Gauge(p + "real_servers_draining", "Real servers at weight 0 waiting for their connections",
                              registry=registry)
        self.settings_ok = Gauge(p + "settings_ok", "1 while the IPVS timeouts and sysctls have their values",
                                 registry=registry)
        self.garp_sent = Counter(p + "garp_sent_total", "Gratuitous ARPs and unsolicited NAs sent", registry=registry)
        self.garp_errors = Counter(p + "garp_errors_total", "Announcement rounds that failed", registry=registry)
        self.active = Gauge(p + "active", "1 while this director holds its VIPs (ARP mode: holds the lease)",
                            registry=registry)
        self.active.set(1)
        self.garp_max_interval = Gauge(p + "garp_max_interval_seconds",
                                       "Largest time between two announcements of one VIP so far",
                                       registry=registry)


@dataclass
class _Applied:
    generation: int
    content_hash: str
    at: float


class DirectorApp:
    def __init__(
        self,
        ipvs: Ipvs,
        host: Host,
        *,
        source: StateSource | None,
        settings: DirectorSettings | None = None,
        readiness: Readiness | None = None,
        stats: StatsSource | None = None,
        announcer: Announcer | None = None,
        leadership: Leadership | None = None,
        registry: CollectorRegistry | None = None,
        describe: Mapping[str, Any] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ipvs = ipvs
        self.host = host
        self._source = source
        self.settings = settings or DirectorSettings()
        self._readiness = readiness
        self.registry = registry or CollectorRegistry()
        self.metrics = Metrics(self.registry)
        if leadership is not None:
            self.metrics.active.set(0)
        self._stats_source = stats
        # Kernel calls on one thread each (kube2ipvs.workers): the reconcile's, and the stats'
        # (read when /metrics is scraped, not on a timer).
        self._kernel_thread = KernelThread("director-kernel")
        self._stats = OnDemandReading("director-stats", stats.read if stats is not None else StatsSnapshot,
                                      StatsSnapshot(), max_age=self.settings.stats_max_age, event="stats_unread",
                                      clock=clock)
        # ARP mode: the served VIPs announced at once when they appear, then every garp_period.
        self._announcer = announcer
        self._garp_thread = KernelThread("director-garp")
        self.garp = GarpSchedule(period=self.settings.garp_period)
        self._garp_kick = asyncio.Event()
        # With a lease (ARP mode with standbys): VIP addresses and announcements only while we
        # hold it; IPVS is programmed either way, so a takeover only adds addresses and announces.
        self._leadership = leadership
        self.active = leadership is None
        self._held_at: float | None = None
        self.registry.register(DirectorStats(self))
        self._describe = dict(describe or {})
        self._clock = clock
        self.state: ClusterState | None = None
        self._desired_for: ClusterState | None = None
        self._init_holdings()
        self.applied: _Applied | None = None
        self.draining: Mapping[DestId, float] = {}
        self.wake_at: float | None = None
        self.owned_vips: CanonicalVips = CanonicalVips()
        self._remembered: frozenset[str] = load_owned_vips(self.settings.state_file)
        self._remembered_from: tuple[frozenset[str], frozenset[str]] | None = None  # (configured, still held)
        self.served_vips: frozenset[str] = frozenset()
        # The VIP sets a change leaves as they were are not built, compared or sorted again: each
        # is derived from the very objects it was derived from last time, or built anew.
        self._configured = _SameInputs(canonical_vips)
        self._owned = _SameInputs(_owned_vips)
        self._still = _SameInputs(_intersection)
        self._serving = _SameInputs(_union)
        self._sorted_vips = _SameInputs(_sorted)
        # (served, served_vips, ours, foreign) after the last reconcile's address changes: while
        # they are the same objects, no address is missing and none is left over.
        self._addresses_for: tuple[frozenset[str], ...] | None = None
        self.last_ops: list[Op | str] = []
        self.apply_error: str | None = None
        self.settings_wrong: dict[str, str] = {}
        self.skipped: tuple[str, ...] = ()
        self.last_apply_at: float | None = None
        self._needs_dump = True
        self._kick = asyncio.Event()
        self.reconciled = asyncio.Event()

    # -- what the director holds -----------------------------------------------------------

    def _init_holdings(self) -> None:
        # The desired service of each cluster service (by its VIP, port, protocol), the state
        # (lineage, seq) it reflects, and the services the last change touched (None: unknown).
        # A state whose delta follows that one costs the work of what changed, not of all.
        self._memo: dict[tuple[str, int, str], tuple[VirtualService, IpvsService, ServiceId]] = {}
        self._memo_seq: tuple[int, int] | None = None
        self._touched: set[ServiceId] | None = None
        self._desired_cache: tuple[IpvsService, ...] | None = ()
        self._desired_vips: collections.Counter[str] = collections.Counter()  # desired services per VIP
        self._desired_vip_set: frozenset[str] | None = None  # its keys (None: they changed)
        # The desired services as last planned: what a change is compared with; and the desired
        # tuple of the last whole plan (a resync with nothing new needs no plan).
        self._want: dict[ServiceId, IpvsService] = {}
        self._planned: tuple[IpvsService, ...] | None = None
        self._ours: frozenset[str] | None = None  # our VIP addresses as of the last reconcile
        self._foreign: frozenset[str] | None = None
        # IPVS after the last successful reconcile, by service, and counted per VIP (services,
        # real servers), so that a change updates them for what it touched.
        self._observed: dict[ServiceId, ObservedService] | None = None
        self._observed_cache: Observed | None = None
        # (A VIP is in _observed_vips only while IPVS holds a service of it.) The totals over
        # the owned VIPs are what the metrics show; recounted only when the owned VIPs change.
        self._observed_vips: collections.Counter[str] = collections.Counter()
        self._observed_dests: collections.Counter[str] = collections.Counter()
        self._observed_vip_set: frozenset[str] | None = None  # _observed_vips' keys (None: they changed)
        self._owned_services = 0
        self._owned_dests = 0

    @property
    def desired(self) -> tuple[IpvsService, ...]:
        """The desired IPVS services of the newest state (built once per change, on demand)."""
        if self._desired_cache is None:  # in state order, whatever order changes came in
            self._desired_cache = tuple(svc for _, svc, _ in sorted(self._memo.values(), key=lambda e: e[0].sort_key()))
        return self._desired_cache

    @property
    def observed(self) -> Observed | None:
        """IPVS as the last successful reconcile left it (sorted, built on demand)."""
        if self._observed is None:
            return None
        if self._observed_cache is None:
            self._observed_cache = Observed(tuple(self._observed[k] for k in sorted(self._observed,
                                                                                   key=service_order)))
        return self._observed_cache

    @observed.setter
    def observed(self, value: Observed | None) -> None:
        self._observed, self._observed_cache = None, None
        self._observed_vips.clear()
        self._observed_dests.clear()
        self._observed_vip_set = None
        self._owned_services = self._owned_dests = 0
        if value is not None:
            self._observed = {}
            self._set_observed(value.services)

    def _set_observed(self, services: Iterable[ObservedService], gone: Iterable[ServiceId] = ()) -> None:
        assert self._observed is not None
        for sid in gone:
            old = self._observed.pop(sid, None)
            if old is not None:
                self._count(sid.vip, -1, -len(old.dests))
        for svc in services:
            old = self._observed.get(svc.id)
            if old is not None:
                self._count(svc.id.vip, 0, len(svc.dests) - len(old.dests))
            else:
                self._count(svc.id.vip, 1, len(svc.dests))
            self._observed[svc.id] = svc
        self._observed_cache = None

    def _count(self, vip: str, services: int, dests: int) -> None:
        """Services and real servers IPVS holds for `vip`, and for the owned VIPs together."""
        held = self._observed_vips[vip] + services
        if (held > 0) != (vip in self._observed_vips):
            self._observed_vip_set = None
        self._observed_dests[vip] += dests
        if held > 0:
            self._observed_vips[vip] = held
        else:
            del self._observed_vips[vip]
            del self._observed_dests[vip]
        if vip in self.owned_vips:
            self._owned_services += services
            self._owned_dests += dests

    def _own(self, owned: CanonicalVips) -> None:
        """The VIPs owned from now on; what IPVS holds of them recounted."""
        self.owned_vips = owned
        self._owned_services = sum(n for vip, n in self._observed_vips.items() if vip in owned)
        self._owned_dests = sum(n for vip, n in self._observed_dests.items() if vip in owned)

    def _held_vips(self) -> frozenset[str]:
        """The VIPs IPVS holds a service of (whoever owns them)."""
        if self._observed_vip_set is None:
            self._observed_vip_set = frozenset(self._observed_vips)
        return self._observed_vip_set

    def _desired_vip_keys(self) -> frozenset[str]:
        """The VIPs with a desired service."""
        if self._desired_vip_set is None:
            self._desired_vip_set = frozenset(self._desired_vips)
        return self._desired_vip_set

    # -- running --------------------------------------------------------------------------

    def close(self) -> None:
        self._kernel_thread.close()
        self._stats.close()
        self._garp_thread.close()

    def offer(self, state: ClusterState) -> None:
        self.state = state
        self.metrics.generation_desired.set(state.generation)
        self._kick.set()

    async def run(self) -> None:
        """Runs until cancelled."""
        async with asyncio.TaskGroup() as tg:
            if self._source is not None:
                tg.create_task(self._consume())
            tg.create_task(self._loop())
            if self._announcer is not None:
                tg.create_task(self._garp_loop())
            if self._leadership is not None:
                tg.create_task(self._lease_loop())

    async def _consume(self) -> None:
        assert self._source is not None
        async for state in self._source.states():
            log.info("event=state generation=%d services=%d vips=%d", state.generation, len(state.services),
                     len(state.vips))
            self.offer(state)

    async def _loop(self) -> None:
        retry = self.settings.retry_min
        while True:
            wait = self.settings.resync_interval if self.apply_error is None else retry
            if self.wake_at is not None:
                wait = max(0.0, min(wait, self.wake_at - self._clock()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kick.wait(), wait)
            self._kick.clear()
            await self.reconcile_once()
            retry = self.settings.retry_min if self.apply_error is None else \
                min(retry * 2, self.settings.resync_interval)

    async def _lease_loop(self) -> None:
        assert self._leadership is not None
        every = self._leadership.ttl / 3
        while True:
            await self.check_lease()
            await asyncio.sleep(every)

    async def check_lease(self) -> bool:
        """Renew or take the lease; we count as active while the last success is younger than
        its ttl (after that another director may hold it). Returns whether we are active."""
        assert self._leadership is not None
        try:
            async with asyncio.timeout(self._leadership.ttl / 3):
                if await self._leadership.hold():
                    self._held_at = self._clock()
        except Exception as exc:  # NATS away: we cannot renew, and step down when the lease runs out
            log.warning("event=lease_unrenewed error=%r", exc)
        active = self._held_at is not None and self._clock() - self._held_at < self._leadership.ttl
        if active != self.active:
            self.active = active
            log.warning("event=%s", "became_active" if active else "became_standby")
            self.metrics.active.set(1 if active else 0)
            if active and self.applied is not None:
                # IPVS is programmed already: take the addresses and announce them at once,
                # without waiting for a reconcile (whose resync reads every service).
                await self._kernel_thread.run(self._claim_vips)
            self._kick.set()  # and reconcile (a standby drops its addresses there)
            self._garp_kick.set()
        return active

    def _claim_vips(self) -> None:
        served = self._desired_vip_keys()
        ours, foreign = self.host.vip_addresses()
        for vip in sorted(served - ours - foreign):
            self.host.add_vip(vip)
        self._ours, self._foreign = ours | (served - foreign), foreign
        self.served_vips = self.served_vips | served

    async def _garp_loop(self) -> None:
        while True:
            await self.announce_due()
            wake = self.garp.wake_at()
            wait = 1.0 if wake is None else min(1.0, max(0.0, wake - self._clock()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._garp_kick.wait(), wait)
            self._garp_kick.clear()

    async def announce_due(self) -> int:
        """Announce the served VIPs that are due (all new ones at once); the count sent."""
        if self._announcer is None:
            return 0
        self.garp.update(self.served_vips if self.applied is not None and self.active else (), self._clock())
        due = self.garp.due(self._clock())
        if not due:
            return 0
        try:
            sent = await self._garp_thread.run(self._announcer.announce, due)
        except OSError as exc:  # the interface went away: report, try again next time
            self.metrics.garp_errors.inc()
            log.warning("event=garp_failed error=%s", exc)
            return 0
        self.garp.sent(due, self._clock())
        self.metrics.garp_sent.inc(sent)
        self.metrics.garp_max_interval.set(self.garp.max_interval)
        return sent

    @property
    def stats(self) -> StatsSnapshot:
        """The last stats reading (what /metrics shows)."""
        return self._stats.value

    async def read_stats(self) -> None:
        """Before /metrics answers: a new reading unless the last is younger than stats_max_age."""
        if self._stats_source is not None:
            await self._stats.refresh()

    async def reconcile_once(self) -> list[Op | str]:
        """Plan and apply against the newest state; nothing at all before the first one."""
        state = self.state
        if state is None:
            return []
        changed = state is not self._desired_for
        if changed:
            await self._kernel_thread.run(self._desired_of, state)
            self._desired_for = state
        trigger = "change" if changed else "resync"
        self.metrics.reconciles.labels(trigger).inc()
        done: list[Op | str] = []
        started = time.perf_counter()
        try:
            await self._kernel_thread.run(self._reconcile, state, done, dump=self._needs_dump or not changed)
        except Exception as exc:  # the kernel refused: report, retry with backoff, re-read first
            self.apply_error = f"{type(exc).__name__}: {exc}"
            self._needs_dump = True
            self._ours = None
            self.metrics.apply_errors.inc()
            log.warning("event=apply_failed error=%s", self.apply_error)
        else:
            self.apply_error = None
            # A drain ends on connection counts: the next reconcile re-reads the draining real
            # servers' services (or everything, where the adapter cannot read one service).
            self._needs_dump = bool(self.draining) and not hasattr(self.ipvs, "observe_dests")
            self.applied = _Applied(state.generation, state.content_hash, time.time())
            self.last_apply_at = self.applied.at
            self.metrics.generation_applied.set(state.generation)
        self.metrics.reconcile_seconds.observe(time.perf_counter() - started)
        self.last_ops = done
        for op in done:
            kind = op.split(" ", 1)[0] if isinstance(op, str) else type(op).__name__
            self.metrics.ops.labels(kind).inc()
            log.info("event=kernel_changed op=%s", op)
        if done and not changed and self.apply_error is None:
            self.metrics.drift_repairs.inc(len(done))
        await self._publish_readiness()
        if self._announcer is not None and self.served_vips - self.garp.next_due.keys():
            self._garp_kick.set()  # a VIP to attract: announce it now, not at the next tick
        self.reconciled.set()
        return done

    def _desired_of(self, state: ClusterState) -> None:
        """The desired IPVS services of `state` into the memo. When `state.delta` follows the
        state the memo reflects, only the services it names are looked at (and `_touched` says
        which desired services changed); otherwise every service is, reusing the result of each
        that is the very object it was (the subscriber keeps unchanged services)."""
        d = state.delta
        if d is not None and self._memo_seq == (d.lineage, d.seq - 1):
            touched: set[ServiceId] = set()
            for key, item in d.changed.items():
                hit = self._memo.get(key)
                if hit is not None and item is not None and hit[0] is item[0]:
                    continue
                if hit is not None:
                    self._forget(key, hit)
                    touched.add(hit[2])
                if item is not None and item[0].backends:
                    entry = self._remember_desired(item[0])
                    touched.add(entry[2])
            self._touched = touched
        else:
            fresh: dict[tuple[str, int, str], tuple[VirtualService, IpvsService, ServiceId]] = {}
            self._desired_vips.clear()
            self._desired_vip_set = None
            for vs in state.services:
                if not vs.backends:
                    continue
                hit = self._memo.get(vs.key)
                if hit is None or hit[0] is not vs:
                    svc = desired_service(vs, self.settings.mode)
                    hit = (vs, svc, service_id(svc))
                fresh[vs.key] = hit
                self._desired_vips[hit[2].vip] += 1
            self._memo = fresh
            self._touched = None
        self._memo_seq = (d.lineage, d.seq) if d is not None else None
        self._desired_cache = None

    def _forget(self, key: tuple[str, int, str], hit: tuple[VirtualService, IpvsService, ServiceId]) -> None:
        del self._memo[key]
        self._desired_vips[hit[2].vip] -= 1
        if self._desired_vips[hit[2].vip] <= 0:
            del self._desired_vips[hit[2].vip]
            self._desired_vip_set = None

    def _remember_desired(self, vs: VirtualService) -> tuple[VirtualService, IpvsService, ServiceId]:
        svc = desired_service(vs, self.settings.mode)
        entry = (vs, svc, service_id(svc))
        self._memo[vs.key] = entry
        if entry[2].vip not in self._desired_vips:
            self._desired_vip_set = None
        self._desired_vips[entry[2].vip] += 1
        return entry

    def _reconcile(self, state: ClusterState, done: list[Op | str], *, dump: bool) -> None:
        """One reconcile on the kernel thread. With `dump` (resyncs, the first one, after a
        failure, while draining) everything is read from the kernel and planned; otherwise only
        the services whose desired state changed are planned, against what the last apply left,
        at a cost that follows the change, not the number of services."""
        full = dump or self._observed is None or self._ours is None
        if full:
            self._settle_settings(done)
            self._ours, self._foreign = self.host.vip_addresses()
        assert self._ours is not None
        assert self._foreign is not None
        configured = self._configured(state.vips)  # the same tuple while the VIPs are unchanged
        owned = self._owned(configured, self._remembered)
        if owned is not self.owned_vips:
            self._own(owned)
        served = self._desired_vip_keys() if self.active else frozenset()
        settled = self._addresses_for
        if settled is None or served is not settled[0] or self._ours is not settled[2] \
                or self._foreign is not settled[3]:
            for vip in sorted(served - self._ours - self._foreign):
                self.host.add_vip(vip)
                self._ours = self._ours | {vip}
                done.append(f"AddVip {vip}")
        observed, result, draining = self._plan_all() if full else self._plan_change()
        self._touched = set()  # planned: the next change starts from here
        if result.ops:
            try:
                self.ipvs.apply(result.ops)
            except ApplyError as exc:
                done.extend(result.ops[i] for i in exc.applied)  # in the kernel; the next reconcile re-reads it
                raise
            done.extend(result.ops)
        after = observed_after(observed, result.ops) if result.ops else observed
        if full and after is not self._observed_cache:
            self.observed = after
        elif not full:
            self._set_observed(after.services, gone=(op.service for op in result.ops
                                                     if isinstance(op, DelService)))
        self.draining = draining
        self.wake_at = min(start + self.settings.drain_timeout for start in draining.values()) if draining else None
        # Addresses of VIPs whose services are gone (drained real servers keep theirs until then).
        still = self._still(self._held_vips(), self.owned_vips)
        self.served_vips = self._serving(served, still) if self.active else frozenset()
        if settled is None or self.served_vips is not settled[1] or self._ours is not settled[2]:
            for vip in sorted(self._ours - self.served_vips):
                self.host.delete_vip(vip)
                self._ours = self._ours - {vip}
                done.append(f"DeleteVip {vip}")
        self._addresses_for = (served, self.served_vips, self._ours, self._foreign)
        self._remember(configured, still)
        self.metrics.services.set(self._owned_services)
        self.metrics.real_servers.set(self._owned_dests)
        self.metrics.draining.set(len(self.draining))

    def _plan_all(self) -> tuple[Observed, Plan, dict[DestId, float]]:
        """Everything read from the kernel and planned; nothing at all when the adapter knows
        nothing was committed since our last apply (`unchanged`: the nftables dataplane's
        generation) and the desired state is the one last planned whole."""
        observed = self.ipvs.observe()
        current = self.observed
        if getattr(self.ipvs, "unchanged", False) and not self.draining and current is not None \
                and self._planned is self.desired:
            return current, Plan(ops=()), {}
        self._want = {sid: svc for _, svc, sid in self._memo.values()}
        result = plan(self.desired, observed, owned_vips=self.owned_vips, draining=self.draining, now=self._clock(),
                      drain_timeout=self.settings.drain_timeout)
        self.skipped = result.skipped
        self._planned = self.desired
        return observed, result, dict(result.draining)

    def _plan_change(self) -> tuple[Observed, Plan, dict[DestId, float]]:
        """Only what changed since the last plan, against what the last apply left; the drains of
        other services are kept as they are."""
        assert self._observed is not None
        touched = self._touched if self._touched is not None else self._compare_want()
        recheck = {k[0] for k in self.draining}
        if recheck:  # their connection counts, now: a drain ends on them
            touched = touched | recheck
            read = getattr(self.ipvs, "observe_dests")  # noqa: B009  (only adapters that have it get here)
            for sid in recheck:
                dests = read(sid)
                if dests is None:  # not readable now: this reconcile fails, the next reads everything
                    raise KernelError(f"could not read the real servers of {sid}")
                if sid in self._observed:
                    self._set_observed((replace(self._observed[sid], dests=dests),))
        for sid in touched:
            self._want.pop(sid, None)
        for key in {(sid.vip, sid.port, sid.protocol) for sid in touched}:
            hit = self._memo.get(key)
            if hit is not None:
                self._want[hit[2]] = hit[1]
        order = sorted(touched, key=service_order)
        observed = Observed(tuple(self._observed[sid] for sid in order if sid in self._observed))
        result = plan([self._want[sid] for sid in order if sid in self._want], observed, owned_vips=self.owned_vips,
                      now=self._clock(), drain_timeout=self.settings.drain_timeout,
                      draining={k: v for k, v in self.draining.items() if k[0] in touched})
        draining = {k: v for k, v in self.draining.items() if k[0] not in touched} | dict(result.draining)
        return observed, result, draining

    def _compare_want(self) -> set[ServiceId]:
        """The services whose desired state is not what was last planned (the whole comparison,
        when the state did not say what changed)."""
        want = {sid: svc for _, svc, sid in self._memo.values()}
        before = self._want
        return {sid for sid in want.keys() | before.keys() if want.get(sid) is not before.get(sid)}

    def _settle_settings(self, done: list[Op | str]) -> None:
        """Timeouts and sysctls to their values; what cannot be set is reported by health."""
        wrong: dict[str, str] = {}
        want = self.settings.timeouts
        have = self.ipvs.timeouts()
        pairs = (("tcp", want.tcp, have.tcp), ("tcpfin", want.tcpfin, have.tcpfin), ("udp", want.udp, have.udp))
        if any(w and w != h for _, w, h in pairs):
            self.ipvs.set_timeouts(want)
            done.append(f"SetTimeouts tcp={want.tcp} tcpfin={want.tcpfin} udp={want.udp}")
            have = self.ipvs.timeouts()
            pairs = (("tcp", want.tcp, have.tcp), ("tcpfin", want.tcpfin, have.tcpfin),
                     ("udp", want.udp, have.udp))
        wrong.update({f"timeout {n}": f"want {w}, have {h}" for n, w, h in pairs if w and w != h})
        current = self.host.vs_sysctls()
        for name, value in sorted(self.settings.vs_sysctls.items()):
            if name not in current:
                wrong[f"net.ipv4.vs.{name}"] = "no such sysctl"
                continue
            if current[name] != value:
                self.host.set_vs_sysctl(name, value)
                done.append(f"SetSysctl net.ipv4.vs.{name}={value}")
                now = self.host.vs_sysctls().get(name)
                if now != value:
                    wrong[f"net.ipv4.vs.{name}"] = f"want {value}, have {now}"
        self.settings_wrong = wrong
        self.metrics.settings_ok.set(0 if wrong else 1)

    # -- ownership that outlives the configuration ----------------------------------------

    def _remember(self, configured: frozenset[str], still_in_kernel: frozenset[str]) -> None:
        """Keep owning every VIP configured now or whose services we still hold."""
        last = self._remembered_from
        if last is not None and configured is last[0] and still_in_kernel is last[1]:
            return  # remembered from these very sets last time
        self._remembered_from = (configured, still_in_kernel)
        remembered = configured | still_in_kernel
        if remembered == self._remembered:
            return
        self._remembered = remembered
        path = self.settings.state_file
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"owned_vips": sorted(remembered)}) + "\n")
        os.replace(tmp, path)

    # -- readiness for the bgp-speaker ------------------------------------------------------

    def readiness(self) -> dict[str, Any]:
        health = self.health()
        return {
            "version": 1,
            "role": "director",
            "mode": self.settings.mode,
            "active": self.active,
            "healthy": health.ok,
            "reason": health.reason,
            "generation": self.applied.generation if self.applied else None,
            "content_hash": self.applied.content_hash if self.applied else None,
            "vips": list(self._sorted_vips(self.served_vips)),
            "at": time.time(),
        }

    async def _publish_readiness(self) -> None:
        if self._readiness is None:
            return
        try:
            await self._readiness.publish(self.readiness())
        except Exception as exc:  # NATS away: the next reconcile publishes again
            log.warning("event=readiness_not_published error=%s", exc)

    # -- status -----------------------------------------------------------------------------

    def health(self) -> Health:
        detail: dict[str, Any] = {
            "mode": self.settings.mode,
            "active": self.active,
            "nats_connected": self._source.connected if self._source is not None else None,
            **source_detail(self._source),
            "generation_desired": self.state.generation if self.state else None,
            "generation_applied": self.applied.generation if self.applied else None,
            "virtual_services": len(self._memo),
            "vips": list(self._sorted_vips(self.served_vips)),
            "draining": len(self.draining),
            "settings_wrong": self.settings_wrong,
            "last_apply_at": self.last_apply_at,
        }
        if self.state is None:
            return Health(False, "no cluster state received yet", detail)
        if self.apply_error is not None:
            return Health(False, f"last apply failed: {self.apply_error}", detail)
        if self.applied is None:
            return Health(False, "not reconciled yet", detail)
        if self.settings_wrong:
            return Health(False, "IPVS settings wrong: " + ", ".join(f"{k} {v}" for k, v in
                                                                    sorted(self.settings_wrong.items())), detail)
        return Health(True, "", detail)

    async def _kernel_rules(self) -> ConfigResponse:
        """The owned services as the kernel holds them at this moment (read on the kernel thread,
        between reconciles), so a change made by hand shows before the next resync repairs it."""
        try:
            observed = await self._kernel_thread.run(self.ipvs.observe)
        except Exception as exc:  # the kernel could not be read: say so, the role goes on
            return text_response(f"could not read the kernel: {type(exc).__name__}: {exc}\n", 503)
        lines = service_lines(observed_as_desired(observed, self.owned_vips))
        return text_response("\n".join(lines) + ("\n" if lines else ""))

    def config(self, query: Mapping[str, str]) -> ConfigResponse | Awaitable[ConfigResponse]:
        fmt = query.get("format")
        if fmt is None:
            return json_response({
                "role": "director",
                "settings": self._describe,
                "generation_applied": self.applied.generation if self.applied else None,
                "virtual_services": len(self._memo),
                "vips": list(self._sorted_vips(self.served_vips)),
                "skipped": list(self.skipped),
                "apply_error": self.apply_error,
                "formats": list(FORMATS),
            })
        if fmt not in FORMATS:
            raise ConfigRequestError(f"format must be one of {', '.join(FORMATS)}")
        if self.observed is None:
            return text_response("not reconciled yet\n", 503)
        if fmt == "ipvsadm":  # what the kernel holds now, owned services only
            return self._kernel_rules()
        if fmt == "desired":
            lines = service_lines(self.desired)
        else:
            return text_response(json.dumps({"draining": [f"{sid} {addr}:{port}" for sid, addr, port in
                                                           sorted(self.draining)]}, indent=2) + "\n")
        return text_response("\n".join(lines) + ("\n" if lines else ""))


def cleanup(ipvs: Ipvs, host: Host, state_file: Path | None) -> list[Op | str]:
    """Remove what we own (blocking): the virtual services of the VIPs our addresses and our
    state file name, and our VIP addresses. Services of any other VIP stay."""
    done: list[Op | str] = []
    ours, _ = host.vip_addresses()
    ops = cleanup_plan(ipvs.observe(), owned_vips=ours | load_owned_vips(state_file))
    if ops:
        ipvs.apply(ops)
        done += ops
    for vip in sorted(ours):
        host.delete_vip(vip)
        done.append(f"DeleteVip {vip}")
    return done

