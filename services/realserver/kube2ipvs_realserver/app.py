"""The realserver loop: node slice -> desired state -> plan against the kernel -> apply.

Concurrency, in one event loop: one task hands each new slice from the source to the app (the
newest wins: a burst coalesces into one reconcile); the reconcile task runs on each new slice
and every `resync_interval` seconds (drift repair), and sooner after a failure. Kernel work
(netlink, `nft`) runs in a worker thread, one reconcile at a time, so /healthz and /metrics keep
answering while a 10,000-service table loads. Before the first slice nothing is touched, and
while NATS is away the source hands over nothing: the kernel stays exactly as it is (resyncs go
on against the last slice, so hand-made damage is still repaired).

Cancellation stops the loop between kernel calls of a reconcile at the worst (the worker thread
finishes its current call); the tables are replaced atomically, so none is left half-written.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from kube2ipvs.lbconfig import canonical_address
from kube2ipvs.model import service_to_dict
from kube2ipvs.protocol import NodeSlice
from kube2ipvs.render.iptables import render_iptables
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
from kube2ipvs_realserver.kernel import Counters, Kernel
from kube2ipvs_realserver.plan import (
    AddAddress,
    DeleteAddress,
    Desired,
    Observed,
    Op,
    ReplaceTable,
    SetSysctl,
    Settings,
    cleanup_plan,
    desired_state,
    observed_after,
    plan,
    wrong_sysctls,
)

log = logging.getLogger("kube2ipvs.realserver")

FORMATS: Final = ("nft", "iptables", "json")
_LABELS: Final = ("vip", "port", "protocol", "namespace", "service", "port_name")
# counter kind -> (metric, direction, tcp flag or None)
_KINDS: Final = {
    "pkts_in": ("packets", "in", None), "pkts_out": ("packets", "out", None),
    "syn_in": ("tcp_flags", "in", "syn"), "synack_out": ("tcp_flags", "out", "synack"),
    "fin_in": ("tcp_flags", "in", "fin"), "fin_out": ("tcp_flags", "out", "fin"),
    "rst_in": ("tcp_flags", "in", "rst"), "rst_out": ("tcp_flags", "out", "rst"),
}


class SliceSource(SubscriberStatus, Protocol):
    @property
    def connected(self) -> bool: ...

    def slices(self) -> AsyncIterator[NodeSlice]: ...


@dataclass(frozen=True, slots=True)
class AppSettings:
    resync_interval: float = 10.0
    retry_min: float = 0.5  # after a failed apply: retry after this, doubling up to resync_interval
    # Reading the counters costs O(services) (about 2 s at 10,000 services on one node): it is
    # done when /metrics is scraped, at most this often (scrapes in between show the last
    # reading), in its own thread and socket, so no reconcile ever waits for it; never for nobody.
    counters_interval: float = 10.0


class KernelCounters(Collector):
    """Prometheus counters from the last snapshot of the kernel's nft counters.

    Series exist only for services of the current slice, so a service's series go with it.
    Replacing the table whole resets its counters (a delta keeps those of the services it
    keeps); Prometheus' rate() treats that as a counter reset.
    """

    def __init__(self, app: RealserverApp) -> None:
        self._app = app

    def collect(self) -> Iterable[CounterMetricFamily]:
        p = "kube2ipvs_realserver_"
        packets = CounterMetricFamily(p + "packets", "Packets of a VIP:port, client to VIP (in) and back (out)",
                                      labels=[*_LABELS, "direction"])
        octets = CounterMetricFamily(p + "bytes", "Bytes of a VIP:port, client to VIP (in) and back (out)",
                                     labels=[*_LABELS, "direction"])
        flags = CounterMetricFamily(p + "tcp_flags", "TCP packets of a VIP:port with SYN, SYN-ACK, FIN or RST",
                                    labels=[*_LABELS, "flag", "direction"])
        desired, snapshot = self._app.desired, self._app.counters
        for vs in desired.services if desired is not None else ():
            kinds = snapshot.get((canonical_address(vs.vip) or vs.vip, vs.port, vs.protocol))
            if not kinds:
                continue
            labels = [vs.vip, str(vs.port), vs.protocol, vs.namespace, vs.service, vs.port_name]
            for kind, (pkts, nbytes) in kinds.items():
                metric, direction, flag = _KINDS[kind]
                if metric == "packets":
                    packets.add_metric([*labels, direction], pkts)
                    octets.add_metric([*labels, direction], nbytes)
                elif flag is not None:
                    flags.add_metric([*labels, flag, direction], pkts)
        return [packets, octets, flags]


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        p = "kube2ipvs_realserver_"
        self.reconciles = Counter(p + "reconciles_total", "Reconciles run (slice changes and resyncs)",
                                  registry=registry)
        self.apply_errors = Counter(p + "apply_errors_total", "Reconciles that failed", registry=registry)
        self.kernel_changes = Counter(p + "kernel_changes_total", "Kernel changes made, by kind", ["op"],
                                      registry=registry)
        self.vips = Gauge(p + "vips", "VIP addresses this node should hold", registry=registry)
        self.services = Gauge(p + "services", "VIP:port/protocols DNATed on this node", registry=registry)
        self.arp_ok = Gauge(p + "arp_sysctls_ok", "1 while the ARP (and rp_filter) sysctls have their desired values",
                            registry=registry)


class RealserverApp:
    def __init__(
        self,
        kernel: Kernel,
        *,
        source: SliceSource | None,
        settings: Settings | None = None,
        app_settings: AppSettings | None = None,
        registry: CollectorRegistry | None = None,
        describe: Mapping[str, Any] | None = None,
    ) -> None:
        self.kernel = kernel
        self._source = source
        self.settings = settings or Settings()
        self.app_settings = app_settings or AppSettings()
        self.registry = registry or CollectorRegistry()
        self.metrics = Metrics(self.registry)
        self.registry.register(KernelCounters(self))
        self._describe = dict(describe or {})
        self.slice: NodeSlice | None = None
        self.desired: Desired | None = None
        self.applied: Desired | None = None  # in the kernel as of the last successful reconcile
        self._desired_for: NodeSlice | None = None  # the slice `desired` was rendered from
        self.observed: Observed | None = None  # the kernel after the last reconcile
        self.last_ops: list[Op] = []
        self.apply_error: str | None = None
        self.last_apply_at: float | None = None
        self._kick = asyncio.Event()
        self.reconciled = asyncio.Event()  # set after each reconcile (tests await it)
        # Kernel calls on one thread each (kube2ipvs.workers): the reconcile's, and the counters'
        # (read when /metrics is scraped, not on a timer).
        self._kernel_thread = KernelThread("realserver-kernel")
        self._counters: OnDemandReading[Counters] = OnDemandReading(
            "realserver-counters", kernel.counters, {}, max_age=self.app_settings.counters_interval,
            event="counters_unread")

    # -- running --------------------------------------------------------------------------

    def close(self) -> None:
        self._kernel_thread.close()
        self._counters.close()

    def offer(self, node_slice: NodeSlice) -> None:
        self.slice = node_slice
        self._kick.set()

    async def run(self) -> None:
        """Runs until cancelled."""
        async with asyncio.TaskGroup() as tg:
            if self._source is not None:
                tg.create_task(self._forever("slices", self._consume()))
            tg.create_task(self._forever("reconcile", self._loop()))

    @staticmethod
    async def _forever(name: str, coro: Any) -> None:
        await coro
        log.error("event=bug reason=task-returned task=%s", name)

    async def _consume(self) -> None:
        assert self._source is not None
        async for node_slice in self._source.slices():
            log.info("event=slice node=%s services=%d vips=%d", node_slice.node, len(node_slice.services),
                     len(node_slice.vips))
            self.offer(node_slice)

    async def _loop(self) -> None:
        retry = self.app_settings.retry_min
        while True:
            wait = self.app_settings.resync_interval if self.apply_error is None else retry
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kick.wait(), wait)
            self._kick.clear()
            await self.reconcile_once()
            retry = self.app_settings.retry_min if self.apply_error is None else \
                min(retry * 2, self.app_settings.resync_interval)

    async def reconcile_once(self) -> list[Op]:
        """Observe, plan and apply against the newest slice; nothing at all before the first slice."""
        node_slice = self.slice
        if node_slice is None:
            return []
        resync = node_slice is self._desired_for and self.desired is not None
        if resync and self.desired is not None:
            desired = self.desired  # a resync: the slice is the one already rendered
        else:
            # Incremental from the last desired state (about the work of what changed); the first
            # one at 10,000 services takes a second or two: off the loop, so /healthz answers.
            desired = await self._kernel_thread.run(desired_state, node_slice, self.settings, self.desired)
            for reason in desired.skipped:
                log.warning("event=service_skipped node=%s reason=%s", node_slice.node, reason)
            self.desired, self._desired_for = desired, node_slice
        self.metrics.reconciles.inc()
        self.metrics.vips.set(len(desired.vips))
        self.metrics.services.set(len(desired.services))
        done: list[Op] = []
        try:
            await self._kernel_thread.run(self._reconcile, desired, done, resync=resync)
        except Exception as exc:  # the kernel refused: report, retry with backoff, re-read first
            self.applied = None  # unknown now: the next change replaces the table whole
            self.apply_error = f"{type(exc).__name__}: {exc}"
            self.metrics.apply_errors.inc()
            log.warning("event=apply_failed error=%s", self.apply_error)
        else:
            self.applied = desired
            self.apply_error = None
            self.last_apply_at = time.time()
        self.last_ops = done
        for op in done:
            self.metrics.kernel_changes.labels(type(op).__name__).inc()
            log.info("event=kernel_changed op=%s", _describe_op(op))
        if self.observed is not None:
            self.metrics.arp_ok.set(0 if wrong_sysctls(desired, self.observed) else 1)
        self.reconciled.set()
        return done

    @property
    def counters(self) -> Counters:
        """The last counters reading (what /metrics shows)."""
        return self._counters.value

    async def read_counters(self) -> None:
        """Before /metrics answers: a new reading of the kernel's counters unless the last is
        younger than `counters_interval`; none before a table of ours exists."""
        if self.applied is not None:
            await self._counters.refresh()

    def _reconcile(self, desired: Desired, done: list[Op], *, resync: bool) -> None:
        # The kernel is read on resyncs (the drift check: addresses, sysctls, the tables' chains
        # and the keys of their `class` maps, together 0.1-0.3 s at 10,000 services) and after a
        # failure, not on the path of each change: there it holds what the last successful
        # reconcile left, and a delta fails whole if the table is not what it assumes.
        if resync or self.applied is None or self.observed is None:
            observed = self.kernel.observe(desired.sysctls)
        else:
            observed = self.observed
        ops = plan(desired, observed, applied=self.applied)
        for op in ops:
            self.kernel.apply(op)
            done.append(op)
        self.observed = observed_after(observed, ops, desired)

    # -- status ---------------------------------------------------------------------------

    def health(self) -> Health:
        desired, observed = self.desired, self.observed
        detail: dict[str, Any] = {
            "node": self.slice.node if self.slice else None,
            "nats_connected": self._source.connected if self._source is not None else None,
            **source_detail(self._source),
            "vips": sorted(desired.vips) if desired else [],
            "services": len(desired.services) if desired else 0,
            "sysctls": {f"{d}/{n}": v for (d, n), v in sorted(observed.sysctls.items())} if observed else {},
            "last_apply_at": self.last_apply_at,
        }
        if self.slice is None:
            return Health(False, "no slice of this node received yet", detail)
        if self.apply_error is not None:
            return Health(False, f"last apply failed: {self.apply_error}", detail)
        if desired is None or observed is None:
            return Health(False, "not reconciled yet", detail)
        if wrong := wrong_sysctls(desired, observed):
            return Health(False, "sysctls wrong: " + ", ".join(f"{k} {v}" for k, v in wrong.items()), detail)
        return Health(True, "", detail)

    def config(self, query: Mapping[str, str]) -> ConfigResponse:
        fmt = query.get("format")
        desired = self.desired
        if fmt is None:
            return json_response({
                "role": "realserver",
                "settings": self._describe,
                "node": self.slice.node if self.slice else None,
                "vips": sorted(desired.vips) if desired else [],
                "services": len(desired.services) if desired else 0,
                "skipped": list(desired.skipped) if desired else [],
                "nft_digest": desired.nft_digest if desired else None,
                "last_apply_at": self.last_apply_at,
                "apply_error": self.apply_error,
                "formats": list(FORMATS),
            })
        if fmt not in FORMATS:
            raise ConfigRequestError(f"format must be one of {', '.join(FORMATS)}")
        if desired is None:
            return text_response("no slice of this node received yet\n", 503)
        if fmt == "nft":
            # Not `desired.nft`: the next build may be updating the entries it renders from, in
            # the kernel thread, right now.
            return text_response(desired.nft_from_services())
        if fmt == "iptables":
            return text_response(render_iptables(desired.services, masquerade_exempt=self.settings.masquerade_exempt))
        return text_response(json.dumps({"services": [service_to_dict(vs) for vs in desired.services]}, indent=2)
                             + "\n")


def _describe_op(op: Op) -> str:
    if isinstance(op, ReplaceTable):
        how = "whole" if op.delta is None else f"delta_bytes={len(op.delta)}"
        return f"ReplaceTable digest={op.digest[:12]} {how}"
    if isinstance(op, SetSysctl):
        return f"SetSysctl {op.key[0]}/{op.key[1]}={op.value}"
    if isinstance(op, AddAddress | DeleteAddress):
        return f"{type(op).__name__} {op.address}/{op.prefixlen}"
    return type(op).__name__


def cleanup(kernel: Kernel) -> list[Op]:
    """Delete our tables and our addresses (blocking). Returns what was removed."""
    observed = kernel.observe(())
    ops = cleanup_plan(observed)
    for op in ops:
        kernel.apply(op)
    return ops
