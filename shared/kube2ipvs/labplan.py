"""The lab's plan, pure: what `kube2ipvs lab` builds from a directory of cluster objects.

The lab is the whole system on one host, in network namespaces (`kube2ipvs.lab` builds it):

    client 203.0.113.2 ── router 203.0.113.1 / br0 10.99.0.1 (FRR: zebra + bgpd, AS 64500, ECMP)
                               │ fabric 10.99.0.0/24 (a bridge in the router's namespace)
          ┌────────────────────┼───────────────────────┬──────────────────────────┐
     ctl 10.99.0.5        dir1 10.99.0.11          dir2 10.99.0.12        node-N (the Nodes' InternalIPs)
     nats-server,         gobgpd (AS 64512) +      the same                realserver; its pods, one
     watcher (files)      bgp-speaker + director                           namespace each (/32 routes)

Everything here is derived from the cluster files (`read_cluster`) and fixed addresses, so the
runtime can compare what runs with what should, and tests can check the plan without root.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from kube2ipvs.kube import ObjectFileError, load_objects_text, parse_endpointslices, parse_nodes, parse_services
from kube2ipvs.lbconfig import ConfigError, DefaultService, LBConfig, load_config_document, with_default_service
from kube2ipvs.model import ClusterState, EndpointSlice, Node
from kube2ipvs.normalize import normalize

FABRIC: Final = ipaddress.ip_network("10.99.0.0/24")
ROUTER: Final = "10.99.0.1"
CTL: Final = "10.99.0.5"
DIRECTORS: Final = {"dir1": "10.99.0.11", "dir2": "10.99.0.12"}
CLIENT: Final = "203.0.113.2"
CLIENT_GATEWAY: Final = "203.0.113.1"
ROUTER_AS: Final = 64500
DIRECTOR_AS: Final = 64512
NATS_PORT: Final = 4222
GOBGPD_API: Final = "127.0.0.1:50051"
CONFIGMAP: Final = ("platform-load-balancer", "kube2ipvs")
DEFAULT_SERVICE: Final = "default/unicorns:http"
SUFFIXES: Final = (".json", ".yaml", ".yml")
RESERVED: Final = frozenset({ROUTER, CTL, *DIRECTORS.values()})


class LabError(ValueError):
    """The cluster files cannot make a lab (the message names the file or object)."""


@dataclass(frozen=True, slots=True, order=True)
class LabNode:
    name: str
    address: str  # its fabric address (the Node's IPv4 InternalIP)


@dataclass(frozen=True, slots=True, order=True)
class LabPod:
    address: str
    name: str
    node: str
    tcp_ports: tuple[int, ...] = ()
    udp_ports: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True, order=True)
class LabVip:
    vip: str
    port: int
    protocol: str  # tcp, udp

    def url(self) -> str:
        return f"http://{self.vip}:{self.port}/" if self.protocol == "tcp" else f"udp://{self.vip}:{self.port}"


@dataclass(frozen=True, slots=True)
class LabWorld:
    nodes: tuple[LabNode, ...]
    pods: tuple[LabPod, ...]
    vips: tuple[LabVip, ...]  # every VIP:port/protocol with a backend
    state: ClusterState = field(repr=False, compare=False)
    skipped: tuple[str, ...] = ()  # endpoints that get no pod, with why
    objects: tuple[dict[str, object], ...] = field(default=(), repr=False, compare=False)  # as read


def feed(objects: Iterable[Mapping[str, object]], serving: Iterable[str]) -> str:
    """The objects the lab's watcher reads: the cluster files' objects, with every EndpointSlice
    listing only the endpoints whose pod serves (as Kubernetes lists a pod once it is ready and
    takes it out before it stops). A JSON List, in a stable order."""
    up = set(serving)
    items = []
    for obj in objects:
        item = dict(obj)
        endpoints = obj.get("endpoints")
        if obj.get("kind") == "EndpointSlice" and isinstance(endpoints, list):
            item["endpoints"] = [ep for ep in endpoints if _serving(ep, up)]
        items.append(item)
    return json.dumps({"apiVersion": "v1", "kind": "List", "items": items}, sort_keys=True, indent=1) + "\n"


def _serving(endpoint: object, up: set[str]) -> bool:
    addresses = endpoint.get("addresses") if isinstance(endpoint, dict) else None
    return isinstance(addresses, list) and bool(addresses) and _canonical(addresses[0]) in up


def _canonical(value: object) -> str | None:
    try:
        return str(ipaddress.ip_address(str(value)))
    except ValueError:
        return None


def _objects(directory: Path) -> list[dict[str, object]]:
    try:
        paths = sorted(p for p in directory.iterdir() if p.suffix in SUFFIXES and p.is_file())
    except OSError as exc:
        raise LabError(f"{directory}: {exc.strerror or exc}") from None
    found: list[dict[str, object]] = []
    for path in paths:
        try:
            found += load_objects_text(path.read_bytes(), source=str(path))
        except (OSError, ObjectFileError) as exc:
            raise LabError(str(exc)) from None
    return found


def _config(objects: Iterable[Mapping[str, object]], directory: Path) -> LBConfig:
    namespace, name = CONFIGMAP
    for obj in objects:
        meta = obj.get("metadata")
        if obj.get("kind") == "ConfigMap" and isinstance(meta, dict) and \
                (meta.get("namespace"), meta.get("name")) == (namespace, name):
            try:
                config, _ = load_config_document(json.dumps(obj).encode(), None)
            except ConfigError as exc:
                raise LabError(f"ConfigMap {namespace}/{name}: " + "; ".join(str(i) for i in exc.issues)) from None
            return with_default_service(config, DefaultService.parse(DEFAULT_SERVICE, 70))
    raise LabError(f"{directory}: no ConfigMap {namespace}/{name}")


def _lab_nodes(nodes: Sequence[Node]) -> tuple[LabNode, ...]:
    out = []
    seen: dict[str, str] = {}
    for node in sorted(nodes, key=lambda n: n.name):
        v4 = [a for a in node.internal_ips if ":" not in a]
        if not v4:
            raise LabError(f"Node {node.name}: no IPv4 InternalIP (the lab puts nodes on {FABRIC})")
        address = v4[0]
        if ipaddress.ip_address(address) not in FABRIC or address in RESERVED or address.endswith(".0") \
                or address == str(FABRIC.broadcast_address):
            raise LabError(f"Node {node.name}: InternalIP {address} is not a free address of {FABRIC} "
                           f"({', '.join(sorted(RESERVED))} are the lab's own)")
        if address in seen:
            raise LabError(f"Node {node.name}: InternalIP {address} is also node {seen[address]}'s")
        seen[address] = node.name
        out.append(LabNode(node.name, address))
    return tuple(out)


def _pod_names(objects: Iterable[Mapping[str, object]]) -> dict[str, str]:
    """Endpoint address -> the name of the Pod its targetRef names (the model keeps no names)."""
    names: dict[str, str] = {}
    for obj in objects:
        endpoints = obj.get("endpoints")
        if obj.get("kind") != "EndpointSlice" or not isinstance(endpoints, list):
            continue
        for ep in endpoints:
            if not isinstance(ep, dict) or not isinstance(ep.get("targetRef"), dict):
                continue
            name, addresses = ep["targetRef"].get("name"), ep.get("addresses")
            if isinstance(name, str) and isinstance(addresses, list) and addresses:
                try:
                    names.setdefault(str(ipaddress.ip_address(str(addresses[0]))), name)
                except ValueError:
                    continue
    return names


def _lab_pods(slices: Sequence[EndpointSlice], nodes: Mapping[str, LabNode], names: Mapping[str, str]
              ) -> tuple[tuple[LabPod, ...], tuple[str, ...]]:
    ports: dict[str, tuple[str, str, set[int], set[int]]] = {}
    skipped: list[str] = []
    for s in slices:
        if s.family != 4:
            skipped.append(f"EndpointSlice {s.namespace}/{s.name}: the lab runs IPv4 pods only")
            continue
        for ep in s.endpoints:
            if ep.node_name not in nodes:
                skipped.append(f"{ep.address} ({s.namespace}/{s.name}): no lab node {ep.node_name!r}")
                continue
            try:
                ip = ipaddress.ip_address(ep.address)
            except ValueError:
                skipped.append(f"{ep.address} ({s.namespace}/{s.name}): not an address")
                continue
            if ip in FABRIC or str(ip) == CLIENT or ip.is_loopback or ip.is_multicast:
                skipped.append(f"{ep.address} ({s.namespace}/{s.name}): an address the lab uses itself")
                continue
            name = names.get(ep.address, f"pod-{ep.address}")
            entry = ports.setdefault(ep.address, (name, ep.node_name or "", set(), set()))
            if entry[1] != ep.node_name:
                skipped.append(f"{ep.address}: on nodes {entry[1]} and {ep.node_name}; kept on {entry[1]}")
                continue
            for p in s.ports:
                (entry[2] if p.protocol.upper() == "TCP" else entry[3]).add(p.port)
    pods = tuple(sorted(LabPod(a, n, node, tuple(sorted(t)), tuple(sorted(u)))
                        for a, (n, node, t, u) in ports.items()))
    return pods, tuple(skipped)


def read_cluster(directory: Path) -> LabWorld:
    """The lab these files describe; LabError naming the offending file or object otherwise."""
    objects = _objects(directory)
    config = _config(objects, directory)
    try:
        nodes, _ = parse_nodes(o for o in objects if o.get("kind") == "Node")
        services, _ = parse_services(o for o in objects if o.get("kind") == "Service")
        slices, _ = parse_endpointslices(o for o in objects if o.get("kind") == "EndpointSlice")
    except ObjectFileError as exc:
        raise LabError(str(exc)) from None
    lab_nodes = _lab_nodes(nodes)
    pods, skipped = _lab_pods(slices, {n.name: n for n in lab_nodes}, _pod_names(objects))
    state = normalize(nodes, services, slices, config)
    vips = tuple(sorted({LabVip(vs.vip, vs.port, vs.protocol) for vs in state.services
                         if vs.backends and vs.family == 4}))
    return LabWorld(lab_nodes, pods, vips, state, skipped, tuple(objects))


def frr_config(neighbours: Mapping[str, str] = DIRECTORS) -> str:
    """The router's FRR configuration: eBGP with every director, ECMP over them."""
    lines = [
        "frr defaults traditional",
        "hostname kube2ipvs-lab-router",
        "log stdout informational",
        f"router bgp {ROUTER_AS}",
        f" bgp router-id {ROUTER}",
        " no bgp ebgp-requires-policy",
        " no bgp network import-check",
        " timers bgp 3 9",
    ]
    for address in neighbours.values():
        lines += [f" neighbor {address} remote-as {DIRECTOR_AS}", f" neighbor {address} timers connect 1"]
    lines += [" address-family ipv4 unicast", "  maximum-paths 8"]
    lines += [f"  neighbor {address} activate" for address in neighbours.values()]
    lines += [" exit-address-family", ""]
    return "\n".join(lines)


def veth_name(prefix: str, address: str) -> str:
    """A per-pod interface name on its node (at most 15 characters): prefix + the address in hex."""
    return prefix + ipaddress.ip_address(address).packed.hex()
