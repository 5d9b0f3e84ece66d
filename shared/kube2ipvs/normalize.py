"""normalize(nodes, services, endpointslices, lbconfig) -> ClusterState. Pure.

DESIGN.md 3.2. A node is a backend when it is Ready, carries every label of the config, has an
InternalIP of the VIP's family (the first one is its address) and, when `exclude_cordoned` is
set, is schedulable. An endpoint counts when its `ready` condition is not false and it names a
node; its port is the slice port named like the entry's `portName`. Headless services are
skipped. Nothing here raises on odd input: what cannot be used is left out with a `Skip`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import chain

from kube2ipvs.bulk import gc_paused
from kube2ipvs.chunked import HoleyChunks
from kube2ipvs.lbconfig import Family, LBConfig, PortConfig, Protocol, address_sort_key
from kube2ipvs.model import (
    Backend,
    ClusterState,
    EndpointSlice,
    Node,
    NodeStatus,
    PodEndpoint,
    Service,
    Skip,
    SlicePort,
    StateDelta,
    VirtualService,
    content_hash_of_sum,
    hostport,
    new_lineage,
    service_digest,
    vips_value,
)


@dataclass(frozen=True, slots=True)
class _Eligible:
    name: str
    address: dict[Family, str]


def _node_status(
    node: Node, labels: tuple[tuple[str, str], ...], exclude_cordoned: bool
) -> tuple[NodeStatus, _Eligible | None]:
    reason = ""
    if not node.ready:
        reason = "not Ready"
    elif missing := [f"{k}={v}" for k, v in labels if node.labels.get(k) != v]:
        reason = "lacks label " + ", ".join(missing)
    elif not node.internal_ips:
        reason = "has no InternalIP"
    elif exclude_cordoned and node.unschedulable:
        reason = "cordoned"
    status = NodeStatus(node.name, node.internal_ips, not reason, reason)
    if reason:
        return status, None
    addresses: dict[Family, str] = {}
    for family in (4, 6):
        address = node.address(family)
        if address is not None:
            addresses[family] = address
    return status, _Eligible(node.name, addresses)


def _slice_port(slice_: EndpointSlice, port_name: str, protocol: Protocol) -> SlicePort | None:
    """The slice port named `port_name`, preferring the one of the same protocol.

    Ravel matched the port by name alone, so a config entry serving TCP and UDP on one port names
    one Service port; its target port then serves both protocols.
    """
    wanted = protocol.upper()
    fallback: SlicePort | None = None
    for p in slice_.ports:
        if p.name == port_name:
            if p.protocol == wanted:
                return p
            fallback = fallback or p
    return fallback


def _resolve_port_name(service: Service, port_name: str) -> str | None:
    """The Service port name that the entry's portName designates, or None when there is none.

    Ravel configs sometimes give the port *number* as portName (e.g. "8080"); when no port carries
    that name, a Service port with that number is meant.
    """
    if any(p.name == port_name for p in service.ports):
        return port_name
    if port_name.isdigit():
        for p in service.ports:
            if p.port == int(port_name):
                return p.name
    return None


def normalize(
    nodes: Iterable[Node],
    services: Iterable[Service],
    endpointslices: Iterable[EndpointSlice],
    config: LBConfig,
    *,
    generation: int = 0,
    exclude_cordoned: bool = False,
    skipped: Sequence[Skip] = (),
) -> ClusterState:
    """The cluster state these objects and this config describe (a one-shot Normalizer)."""
    normalizer = Normalizer(config, exclude_cordoned=exclude_cordoned, track_digests=False)
    normalizer.replace_all(nodes, services, endpointslices)
    return normalizer.state(generation=generation, skipped=skipped)


ServiceRef = tuple[str, str]  # (namespace, name)
ServiceKey = tuple[str, int, Protocol]  # (vip, port, protocol)


class Normalizer:
    """normalize(), kept up to date object by object.

    Holds the parsed objects and the virtual service computed for every config entry. A change
    marks only the Kubernetes services it touches as dirty, and `state()` recomputes just those:
    one EndpointSlice update costs one service's work, not the cluster's. A node update costs
    nothing unless it changes the node's eligibility or addresses. Not thread-safe; the watcher
    calls it from its one event loop.
    """

    def __init__(self, config: LBConfig, *, exclude_cordoned: bool = False, track_digests: bool = True) -> None:
        self._exclude_cordoned = exclude_cordoned
        self._track_digests = track_digests
        self._nodes: dict[str, Node] = {}
        self._statuses: dict[str, NodeStatus] = {}
        self._eligible: dict[str, _Eligible] = {}
        self._services: dict[ServiceRef, Service] = {}
        self._slices: dict[ServiceRef, EndpointSlice] = {}  # by (namespace, slice name)
        self._slices_of: dict[ServiceRef, dict[str, EndpointSlice]] = defaultdict(dict)
        self._dirty: set[ServiceRef] = set()
        self._all_dirty = True
        self._node_tuple: tuple[NodeStatus, ...] | None = None  # sorted statuses, until one changes
        self._lineage = new_lineage()
        self._seq = 0
        self._changed: dict[ServiceKey, tuple[VirtualService, str] | None] | None = None  # None: everything
        self.set_config(config)

    @property
    def config(self) -> LBConfig:
        return self._config

    # -- inputs ---------------------------------------------------------------------------------

    def set_config(self, config: LBConfig) -> None:
        self._config = config
        self._vips = config.vips()
        self._mtu = dict(config.mtu)
        self._order: list[tuple[PortConfig, Protocol]] = [(e, p) for e in config.entries for p in e.protocols]
        # Per position of `_order` (config order is service order): the service, its digest, its skips.
        self._position = {(e.vip, e.port, p): i for i, (e, p) in enumerate(self._order)}
        self._vs_at: list[VirtualService | None] = [None] * len(self._order)
        self._digest_at: list[str | None] = [None] * len(self._order)
        # What state() hands out is shared chunk by chunk with the state before; and the content
        # hash is kept as a count and a sum of digests: a change costs what it changed.
        self._vs_chunks: HoleyChunks[VirtualService] = HoleyChunks(len(self._order))
        self._digest_chunks: HoleyChunks[str] = HoleyChunks(len(self._order))
        self._count = 0
        self._sum = 0
        self._vips_value = vips_value(self._vips)
        self._skips_at: dict[int, tuple[Skip, ...]] = {}
        self._skips: tuple[Skip, ...] | None = None  # every _skips_at in order; None: to gather again
        self._entries_of: dict[ServiceRef, list[tuple[PortConfig, Protocol]]] = defaultdict(list)
        for entry, protocol in self._order:
            self._entries_of[(entry.namespace, entry.service)].append((entry, protocol))
        self._mark_all()

    def replace_all(
        self, nodes: Iterable[Node], services: Iterable[Service], endpointslices: Iterable[EndpointSlice]
    ) -> None:
        self.replace_nodes(nodes)
        self.replace_services(services)
        self.replace_endpointslices(endpointslices)

    def replace_nodes(self, nodes: Iterable[Node]) -> None:
        self._nodes = {n.name: n for n in nodes}
        self._mark_all()

    def replace_services(self, services: Iterable[Service]) -> None:
        self._services = {(s.namespace, s.name): s for s in services}
        self._mark_all()

    def replace_endpointslices(self, endpointslices: Iterable[EndpointSlice]) -> None:
        self._slices = {}
        self._slices_of = defaultdict(dict)
        for es in endpointslices:
            self._add_slice(es)
        self._mark_all()

    def upsert_node(self, node: Node) -> None:
        self._nodes[node.name] = node
        self._node_changed(node.name)

    def delete_node(self, name: str) -> None:
        if self._nodes.pop(name, None) is not None:
            self._node_changed(name)

    def upsert_service(self, service: Service) -> None:
        ref = (service.namespace, service.name)
        if self._services.get(ref) != service:
            self._services[ref] = service
            self._dirty.add(ref)

    def delete_service(self, namespace: str, name: str) -> None:
        if self._services.pop((namespace, name), None) is not None:
            self._dirty.add((namespace, name))

    def upsert_endpointslice(self, es: EndpointSlice) -> None:
        old = self._slices.get((es.namespace, es.name))
        if old == es:
            return
        if old is not None:
            self._remove_slice(old)
        self._add_slice(es)

    def delete_endpointslice(self, namespace: str, name: str) -> None:
        old = self._slices.get((namespace, name))
        if old is not None:
            self._remove_slice(old)

    # -- output ---------------------------------------------------------------------------------

    def state(self, *, generation: int = 0, skipped: Sequence[Skip] = ()) -> ClusterState:
        """The current state; costs one pass at C speed over the services, plus what changed."""
        with gc_paused():
            self._recompute()
        if self._node_tuple is None:
            self._node_tuple = tuple(self._statuses[name] for name in sorted(self._statuses))
        if self._skips is None:  # a sort of every position with skips: only after they changed
            self._skips = tuple(chain.from_iterable(self._skips_at[i] for i in sorted(self._skips_at)))
        skips = (*skipped, *self._skips)
        self._seq += 1
        delta = None
        if self._track_digests and self._changed is not None:
            delta = StateDelta(self._lineage, self._seq, self._changed)
        self._changed = {}
        track = self._track_digests
        return ClusterState(
            generation=generation,
            vips=self._vips,
            services=self._vs_chunks.snapshot(self._vs_at),  # config entries are sorted by VIP and port; tcp first
            nodes=self._node_tuple,
            skipped=tuple(skips),
            known_digests=self._digest_chunks.snapshot(self._digest_at) if track else None,
            delta=delta,
            known_hash=content_hash_of_sum(self._vips_value, self._count, self._sum) if track else None,
        )

    # -- internals ------------------------------------------------------------------------------

    def _mark_all(self) -> None:
        self._all_dirty = True
        self._dirty.clear()

    def _set_status(self, node: Node) -> None:
        status, eligible = _node_status(node, self._config.labels, self._exclude_cordoned)
        if self._statuses.get(node.name) != status:
            self._node_tuple = None
        self._statuses[node.name] = status
        if eligible is None:
            self._eligible.pop(node.name, None)
        else:
            self._eligible[node.name] = eligible

    def _node_changed(self, name: str) -> None:
        before = (self._statuses.get(name), self._eligible.get(name))
        node = self._nodes.get(name)
        if node is None:
            self._statuses.pop(name, None)
            self._eligible.pop(name, None)
            self._node_tuple = None
        else:
            self._set_status(node)
        if (self._statuses.get(name), self._eligible.get(name)) == before or self._all_dirty:
            return
        # Eligibility or addresses changed: every service with an endpoint on the node is affected.
        for es in self._slices.values():
            if es.service_name is not None and any(ep.node_name == name for ep in es.endpoints):
                self._dirty.add((es.namespace, es.service_name))

    def _add_slice(self, es: EndpointSlice) -> None:
        self._slices[(es.namespace, es.name)] = es
        if es.service_name is not None and es.family is not None:
            self._slices_of[(es.namespace, es.service_name)][es.name] = es
            self._dirty.add((es.namespace, es.service_name))

    def _remove_slice(self, es: EndpointSlice) -> None:
        self._slices.pop((es.namespace, es.name), None)
        if es.service_name is not None:
            ref = (es.namespace, es.service_name)
            self._slices_of.get(ref, {}).pop(es.name, None)
            self._dirty.add(ref)

    def _recompute(self) -> None:
        if self._all_dirty:
            self._statuses.clear()  # the config's labels decide eligibility
            self._eligible.clear()
            self._node_tuple = None
            for node in self._nodes.values():
                self._set_status(node)
            self._changed = None
            todo: Iterable[tuple[PortConfig, Protocol]] = self._order
        else:
            todo = [item for ref in self._dirty for item in self._entries_of.get(ref, ())]
        for entry, protocol in todo:
            ref = (entry.namespace, entry.service)
            skips: list[Skip] = []
            vs = _virtual_service(entry, protocol, self._mtu, self._services.get(ref),
                                  self._slices_of.get(ref, {}).values(), self._eligible, skips)
            key = (entry.vip, entry.port, protocol)
            i = self._position[key]
            old = self._vs_at[i]
            if old != vs:  # an equal one stays the very object it was (consumers compare by identity)
                old_digest = self._digest_at[i]
                digest = service_digest(vs) if vs is not None and self._track_digests else None
                if self._changed is not None:
                    self._changed[key] = (vs, digest) if vs is not None and digest is not None else None
                self._vs_at[i] = vs
                self._digest_at[i] = digest
                self._vs_chunks.touch(i)
                self._digest_chunks.touch(i)
                self._count += (vs is not None) - (old is not None)
                self._sum += (int(digest, 16) if digest else 0) - (int(old_digest, 16) if old_digest else 0)
            now = tuple(skips)
            if self._skips_at.get(i, ()) != now:
                self._skips = None
                if now:
                    self._skips_at[i] = now
                else:
                    del self._skips_at[i]
        self._all_dirty = False
        self._dirty.clear()


def _virtual_service(
    entry: PortConfig,
    protocol: Protocol,
    mtu_by_vip: dict[str, int],
    service: Service | None,
    slices: Iterable[EndpointSlice],
    eligible: dict[str, _Eligible],
    skips: list[Skip],
) -> VirtualService | None:
    family = entry.family
    subject = f"{hostport(entry.vip, entry.port)}/{protocol}"
    ref = f"{entry.namespace}/{entry.service}"
    if service is None:
        skips.append(Skip(subject, f"service {ref} not found"))
        return None
    if service.headless:
        skips.append(Skip(subject, f"service {ref} is headless"))
        return None
    port_name = _resolve_port_name(service, entry.port_name)
    if port_name is None:
        names = ", ".join(sorted(p.name or '""' for p in service.ports)) or "none"
        skips.append(Skip(subject, f"service {ref} has no port named {entry.port_name!r} (it has: {names})"))
        return None

    per_node: dict[str, set[tuple[str, int]]] = defaultdict(set)
    unready = 0
    off_nodes: dict[str, int] = defaultdict(int)  # node (or "no node") -> ready endpoints left out
    for es in slices:
        if es.family != family:
            continue
        port = _slice_port(es, port_name, protocol)
        if port is None:
            continue
        for ep in es.endpoints:
            if not ep.ready:
                unready += 1
            elif ep.node_name is None or ep.node_name not in eligible:
                off_nodes[ep.node_name or "no node"] += 1
            else:
                per_node[ep.node_name].add((ep.address, port.port))

    backends: list[Backend] = []
    for node_name, endpoints in per_node.items():
        address = eligible[node_name].address.get(family)
        if address is None:  # eligible, but without an address of the VIP's family
            off_nodes[node_name] += len(endpoints)
            continue
        ordered = sorted(endpoints, key=lambda e: (*address_sort_key(e[0]), e[1]))
        backends.append(Backend(node_name, address, tuple(PodEndpoint(a, p) for a, p in ordered)))
    backends.sort(key=lambda b: address_sort_key(b.address))
    left_out = sum(off_nodes.values())
    where = ", ".join(sorted(off_nodes))
    if not backends:
        detail = []
        if unready:
            detail.append(f"{unready} not ready")
        if left_out:
            detail.append(f"{left_out} on nodes that are not IPv{family} backends: {where}")
        skips.append(Skip(subject, f"service {ref} has no usable endpoints" +
                          (f" ({'; '.join(detail)})" if detail else "")))
    elif left_out:
        skips.append(Skip(subject, f"{left_out} ready endpoint(s) of {ref} left out, on nodes that are not "
                                   f"IPv{family} backends: {where}"))

    ipvs = entry.ipvs
    return VirtualService(
        vip=entry.vip, family=family, port=entry.port, protocol=protocol,
        namespace=entry.namespace, service=entry.service, port_name=entry.port_name,
        scheduler=ipvs.scheduler, forwarding=ipvs.forwarding,
        u_threshold=ipvs.u_threshold, l_threshold=ipvs.l_threshold, flags=ipvs.flags,
        mtu=mtu_by_vip.get(entry.vip), backends=tuple(backends),
    )
