"""Frozen model of the Kubernetes inputs and of the normalized cluster state. Pure.

Identity of a virtual service is (vip, port, protocol); everything else is an attribute that
planners update in place. Every tuple in a ClusterState is sorted, so two states built from the
same inputs in any order compare (and hash) equal.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any, Final

from kube2ipvs.lbconfig import Family, Forwarding, Protocol, address_sort_key

# ---------------------------------------------------------------------------------------------
# Kubernetes inputs (what normalize reads; built by kube.py from API objects)


@dataclass(frozen=True, slots=True)
class Node:
    name: str
    ready: bool
    unschedulable: bool
    labels: Mapping[str, str]
    internal_ips: tuple[str, ...]  # in the order the API lists them

    def address(self, family: Family) -> str | None:
        """The node's first InternalIP of `family`: where the director sends VIP traffic."""
        for ip in self.internal_ips:
            if (6 if ":" in ip else 4) == family:
                return ip
        return None


@dataclass(frozen=True, slots=True)
class ServicePort:
    name: str
    port: int
    protocol: str  # TCP, UDP, SCTP


@dataclass(frozen=True, slots=True)
class Service:
    namespace: str
    name: str
    headless: bool
    ports: tuple[ServicePort, ...]


@dataclass(frozen=True, slots=True)
class SliceEndpoint:
    address: str
    ready: bool  # conditions.ready is not false
    node_name: str | None


@dataclass(frozen=True, slots=True)
class SlicePort:
    name: str
    port: int
    protocol: str


@dataclass(frozen=True, slots=True)
class EndpointSlice:
    namespace: str
    name: str
    service_name: str | None  # label kubernetes.io/service-name
    family: Family | None  # None: addressType FQDN (never used)
    ports: tuple[SlicePort, ...]
    endpoints: tuple[SliceEndpoint, ...]


# ---------------------------------------------------------------------------------------------
# Normalized cluster state (what the watcher publishes and every service consumes)


@dataclass(frozen=True, slots=True)
class PodEndpoint:
    """A ready pod address and its target port: where a realserver DNATs to."""

    address: str
    port: int


@dataclass(frozen=True, slots=True)
class Backend:
    """One real server of a virtual service: a node and its ready local endpoints."""

    node: str
    address: str  # the node's InternalIP of the VIP's family
    endpoints: tuple[PodEndpoint, ...]  # sorted, at least one

    @property
    def weight(self) -> int:
        return len(self.endpoints)


@dataclass(frozen=True, slots=True)
class VirtualService:
    vip: str
    family: Family
    port: int
    protocol: Protocol
    namespace: str
    service: str
    port_name: str
    scheduler: str | None  # None: the director's mode default
    forwarding: Forwarding
    u_threshold: int
    l_threshold: int
    flags: tuple[int, ...]
    mtu: int | None
    backends: tuple[Backend, ...]  # sorted by node address

    @property
    def key(self) -> tuple[str, int, Protocol]:
        return (self.vip, self.port, self.protocol)

    @property
    def service_ref(self) -> str:
        return f"{self.namespace}/{self.service}:{self.port_name}"

    @property
    def total_weight(self) -> int:
        return sum(b.weight for b in self.backends)

    def sort_key(self) -> tuple[int, int, int, str]:
        return (*address_sort_key(self.vip), self.port, self.protocol)


@dataclass(frozen=True, slots=True)
class NodeStatus:
    name: str
    addresses: tuple[str, ...]
    eligible: bool
    reason: str  # why not eligible ("" when eligible)


@dataclass(frozen=True, slots=True)
class Skip:
    """Something normalize left out, and why (shown by `rules`, `/config` and logs)."""

    subject: str
    reason: str


_LINEAGES = itertools.count(1)


def new_lineage() -> int:
    """A lineage number no other producer of states in this process has (a Normalizer, an
    Assembler): a consumer follows a delta only from the state just before it in its lineage."""
    return next(_LINEAGES)


@dataclass(frozen=True, slots=True)
class StateDelta:
    """How a state differs from the one its producer made just before it (lineage, seq - 1).

    `changed` maps each (vip, port, protocol) whose service may differ to (service, digest), or
    to None when it is gone. Consumers that saw the previous state (an Encoder) can update in
    proportion to the change; anyone else ignores this and looks at the whole state.
    """

    lineage: int
    seq: int
    changed: Mapping[tuple[str, int, Protocol], tuple[VirtualService, str] | None]


@dataclass(frozen=True)
class ClusterState:
    generation: int
    vips: tuple[str, ...]  # every configured VIP, sorted (directors hold and announce these)
    # sorted by VIP, port, protocol; a tuple, or a Chunked that shares its unchanged chunks with
    # the state before (kube2ipvs.chunked: what incremental builders hand out)
    services: Sequence[VirtualService]
    nodes: tuple[NodeStatus, ...]  # sorted by name
    skipped: tuple[Skip, ...] = field(default=(), compare=False)
    # service_digest() of each service, when the builder already knows them (incremental builds)
    known_digests: Sequence[str] | None = field(default=None, compare=False, repr=False)
    delta: StateDelta | None = field(default=None, compare=False, repr=False)
    # content_hash, when the builder computed it already (a consumer checks it against the manifest)
    known_hash: str | None = field(default=None, compare=False, repr=False)

    @cached_property
    def service_digests(self) -> Sequence[str]:
        if self.known_digests is not None and len(self.known_digests) == len(self.services):
            return self.known_digests
        return tuple(service_digest(vs) for vs in self.services)

    @cached_property
    def content_hash(self) -> str:
        """A hash of what consumers program: VIPs, services and backends. Not the generation.

        Defined over the canonical wire bytes of each part (vips_value, service_value), so a consumer
        holding the published values can check it without re-encoding anything, and so that it
        follows a change at the cost of the change (content_hash).
        """
        if self.known_hash is not None:
            return self.known_hash
        return content_hash(vips_value(self.vips), self.service_digests)

    def for_node(self, node: str) -> tuple[VirtualService, ...]:
        """The realserver's slice: services with endpoints on `node`, keeping only that backend."""
        out: list[VirtualService] = []
        for vs in self.services:
            mine = tuple(b for b in vs.backends if b.node == node)
            if mine:
                out.append(replace(vs, backends=mine))
        return tuple(out)

    def node_names(self) -> tuple[str, ...]:
        return tuple(n.name for n in self.nodes)


# ---------------------------------------------------------------------------------------------
# Canonical encodings: the JSON shapes /config and the NATS protocol use, and the content hash.


def service_to_dict(vs: VirtualService) -> dict[str, Any]:
    return {
        "vip": vs.vip,
        "port": vs.port,
        "protocol": vs.protocol,
        "service": {"namespace": vs.namespace, "name": vs.service, "portName": vs.port_name},
        "ipvs": {
            "scheduler": vs.scheduler,
            "forwarding": vs.forwarding,
            "uThreshold": vs.u_threshold,
            "lThreshold": vs.l_threshold,
            "flags": list(vs.flags),
        },
        "mtu": vs.mtu,
        "backends": [
            {
                "node": b.node,
                "address": b.address,
                "weight": b.weight,
                "endpoints": [{"address": e.address, "port": e.port} for e in b.endpoints],
            }
            for b in vs.backends
        ],
    }


def node_status_to_dict(n: NodeStatus) -> dict[str, Any]:
    return {"name": n.name, "addresses": list(n.addresses), "eligible": n.eligible, "reason": n.reason}


def compact_json(doc: object) -> bytes:
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()


def service_value(vs: VirtualService) -> bytes:
    return compact_json(service_to_dict(vs))


def vips_value(vips: tuple[str, ...]) -> bytes:
    return compact_json(list(vips))


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


def service_digest(vs: VirtualService) -> str:
    return digest(service_value(vs))


DIGEST_SPACE: Final = 1 << 128  # a service digest is 128 bits (32 hex digits)


def digest_sum(service_digests: Iterable[str]) -> int:
    """The sum of the service digests, as integers, modulo 2**128."""
    return sum(int(d, 16) for d in service_digests) % DIGEST_SPACE


def content_hash(vips: bytes, service_digests: Iterable[str]) -> str:
    """The content hash (protocol version 2) of a state: see content_hash_of_sum."""
    digests = service_digests if isinstance(service_digests, Sequence) else list(service_digests)
    return content_hash_of_sum(vips, len(digests), digest_sum(digests))


def content_hash_of_sum(vips: bytes, services: int, total: int) -> str:
    """sha256 of the VIPs value, then "\n<number of services>\n<sum of their digests mod 2**128,
    32 hex digits>". The services are unique by key, so the sum identifies the set; and it can be
    kept up to date by adding a new digest and subtracting the old one, which makes the hash of a
    one-service change cost one service, not the state (version 1 hashed every digest in order).
    It guards against torn and partial states, not against a forger: a writer that can forge
    values can write a matching hash anyway."""
    h = hashlib.sha256(vips)
    h.update(b"\n%d\n%032x" % (services, total % DIGEST_SPACE))
    return "sha256:" + h.hexdigest()


def content_hash_v1(vips: bytes, service_digests: Iterable[str]) -> str:
    """Protocol version 1's hash: sha256 of the VIPs value, then "\n" + digest for each service in
    order (a consumer still reads manifests of a watcher not yet upgraded)."""
    h = hashlib.sha256(vips)
    digests = service_digests if isinstance(service_digests, tuple | list) else list(service_digests)
    if digests:  # one join at C speed, not a generator: 30,000 digests in about a millisecond
        h.update(("\n" + "\n".join(digests)).encode())
    return "sha256:" + h.hexdigest()


def hostport(address: str, port: int) -> str:
    """`192.0.2.1:80` / `[2001:db8::1]:80`."""
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
