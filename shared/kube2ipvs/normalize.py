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

from kube2ipvs.bulk import gc_paused
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
    VirtualService,
    hostport,
)


@dataclass(frozen=True, slots=True)
class _Eligible:
    name: str
    address: dict[Family, str]


def _node_statuses(
    nodes: Iterable[Node], labels: tuple[tuple[str, str], ...], exclude_cordoned: bool
) -> tuple[list[NodeStatus], dict[str, _Eligible]]:
    statuses: list[NodeStatus] = []
    eligible: dict[str, _Eligible] = {}
    for node in sorted(nodes, key=lambda n: n.name):
        reason = ""
        if not node.ready:
            reason = "not Ready"
        elif missing := [f"{k}={v}" for k, v in labels if node.labels.get(k) != v]:
            reason = "lacks label " + ", ".join(missing)
        elif not node.internal_ips:
            reason = "has no InternalIP"
        elif exclude_cordoned and node.unschedulable:
            reason = "cordoned"
        statuses.append(NodeStatus(node.name, node.internal_ips, not reason, reason))
        if not reason:
            addresses: dict[Family, str] = {}
            for family in (4, 6):
                address = node.address(family)
                if address is not None:
                    addresses[family] = address
            eligible[node.name] = _Eligible(node.name, addresses)
    return statuses, eligible


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
    with gc_paused():
        return _normalize(nodes, services, endpointslices, config, generation=generation,
                          exclude_cordoned=exclude_cordoned, skipped=skipped)


def _normalize(
    nodes: Iterable[Node],
    services: Iterable[Service],
    endpointslices: Iterable[EndpointSlice],
    config: LBConfig,
    *,
    generation: int,
    exclude_cordoned: bool,
    skipped: Sequence[Skip],
) -> ClusterState:
    skips: list[Skip] = list(skipped)
    statuses, eligible = _node_statuses(nodes, config.labels, exclude_cordoned)

    by_service: dict[tuple[str, str], Service] = {(s.namespace, s.name): s for s in services}
    slices: dict[tuple[str, str], list[EndpointSlice]] = defaultdict(list)
    for es in endpointslices:
        if es.service_name is not None and es.family is not None:
            slices[(es.namespace, es.service_name)].append(es)

    mtu_by_vip = dict(config.mtu)
    out: list[VirtualService] = []
    for entry in config.entries:
        for protocol in entry.protocols:
            vs = _virtual_service(entry, protocol, mtu_by_vip, by_service, slices, eligible, skips)
            if vs is not None:
                out.append(vs)
    out.sort(key=VirtualService.sort_key)
    return ClusterState(
        generation=generation,
        vips=config.vips(),
        services=tuple(out),
        nodes=tuple(statuses),
        skipped=tuple(skips),
    )


def _virtual_service(
    entry: PortConfig,
    protocol: Protocol,
    mtu_by_vip: dict[str, int],
    by_service: dict[tuple[str, str], Service],
    slices: dict[tuple[str, str], list[EndpointSlice]],
    eligible: dict[str, _Eligible],
    skips: list[Skip],
) -> VirtualService | None:
    family = entry.family
    subject = f"{hostport(entry.vip, entry.port)}/{protocol}"
    ref = f"{entry.namespace}/{entry.service}"
    service = by_service.get((entry.namespace, entry.service))
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
    for es in slices.get((entry.namespace, entry.service), ()):
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
