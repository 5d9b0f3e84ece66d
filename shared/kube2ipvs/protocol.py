"""The cluster-state protocol on NATS JetStream key-value (docs/protocol.md). Pure.

The watcher writes one bucket; consumers watch it. Keys:

    state.meta                  manifest: version, generation, content hash, count of services,
                                digests of state.vips and state.nodes
    state.vips                  every configured VIP (JSON list)
    state.nodes                 every node's eligibility (for /config and operators)
    vs.<vip>.<port>.<proto>     one virtual service with all its backends (directors)
    node.<name>                 one node's slice: its VIPs and the services with endpoints on it,
                                each with only that node's backend (realservers)

The content hash is sha256 over `state.vips` and the digest of every `vs.` value in service
order, so a consumer that holds values whose hash equals the manifest's holds exactly the
published state; until then it keeps what it applied before. Writes go changed values first,
deletions second, the manifest last, so consumers converge the moment the manifest arrives.
A one-endpoint change rewrites one `vs.` value, the `node.` values of the nodes involved and a
manifest of about 200 bytes: bytes in proportion to the change.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Final

from kube2ipvs.lbconfig import Forwarding, Protocol, address_sort_key
from kube2ipvs.model import (
    Backend,
    ClusterState,
    NodeStatus,
    PodEndpoint,
    VirtualService,
    compact_json,
    content_hash,
    digest,
    node_status_to_dict,
    service_to_dict,
    service_value,
    vips_value,
)

VERSION: Final = 1
META_KEY: Final = "state.meta"
VIPS_KEY: Final = "state.vips"
NODES_KEY: Final = "state.nodes"
SERVICE_PREFIX: Final = "vs."
NODE_PREFIX: Final = "node."


class ProtocolError(ValueError):
    """A value in the bucket does not follow this protocol version (consumers skip it and say why)."""


def service_key(vip: str, port: int, protocol: str) -> str:
    """`vs.192-0-2-10.8080.tcp`, `vs.2001-db8--10.80.tcp`: KV keys allow no ':' and '.' separates tokens."""
    return f"{SERVICE_PREFIX}{vip.replace('.', '-').replace(':', '-')}.{port}.{protocol}"


def node_key(node: str) -> str:
    return f"{NODE_PREFIX}{node}"


@dataclass(frozen=True, slots=True)
class Encoded:
    """One published state: every key's value (the manifest included) and each value's digest."""

    values: Mapping[str, bytes]
    digests: Mapping[str, str]

    @property
    def meta(self) -> bytes:
        return self.values[META_KEY]


@dataclass(frozen=True, slots=True)
class Write:
    key: str
    value: bytes | None  # None: delete


def plan_writes(previous: Encoded | None, new: Encoded) -> list[Write]:
    """Changed values, then deletions, then the manifest; nothing at all when nothing changed."""
    old = previous.digests if previous is not None else {}
    puts = [Write(k, new.values[k]) for k in sorted(new.values)
            if k != META_KEY and old.get(k) != new.digests[k]]
    deletes = [Write(k, None) for k in sorted(old) if k not in new.values]
    if not puts and not deletes and old.get(META_KEY) == new.digests[META_KEY]:
        return []
    return [*puts, *deletes, Write(META_KEY, new.meta)]


def restamp(encoded: Encoded, generation: int) -> Encoded:
    """The same state under another generation number (only the manifest changes)."""
    meta = json.loads(encoded.meta)
    meta["generation"] = generation
    value = compact_json(meta)
    return Encoded(values={**encoded.values, META_KEY: value}, digests={**encoded.digests, META_KEY: digest(value)})


def same_content(previous: Encoded | None, new: Encoded) -> bool:
    """True when `new` differs from `previous` at most in its generation number."""
    if previous is None or META_KEY not in previous.values:
        return False
    if any(previous.digests.get(k) != d for k, d in new.digests.items() if k != META_KEY):
        return False
    if len(previous.digests) != len(new.digests):
        return False
    try:
        old, fresh = decode_meta(previous.meta), decode_meta(new.meta)
    except ProtocolError:
        return False
    return (old.hash, old.services, old.vips_digest, old.nodes_digest) == \
        (fresh.hash, fresh.services, fresh.vips_digest, fresh.nodes_digest)


def encoded_from_values(values: Mapping[str, bytes]) -> Encoded:
    """What is in the bucket now, as an Encoded (a new leader diffs against it)."""
    return Encoded(values=dict(values), digests={k: digest(v) for k, v in values.items()})


def _node_slice_value(node: str, services: Iterable[VirtualService]) -> bytes:
    mine = list(services)
    vips = sorted({vs.vip for vs in mine}, key=address_sort_key)
    return compact_json({"version": VERSION, "node": node, "vips": vips,
                         "services": [service_to_dict(vs) for vs in mine]})


class Encoder:
    """Encodes successive states, re-encoding only what changed since the previous one.

    Service values are reused while their digest is unchanged, and a node's slice is rebuilt
    only when a service with a backend on that node (before or after) changed.
    """

    def __init__(self) -> None:
        self._services: dict[str, tuple[str, bytes, VirtualService]] = {}  # key -> (digest, value, vs)
        self._on_node: dict[str, dict[str, Backend]] = {}  # node -> service key -> its backend there
        self._node_values: dict[str, bytes] = {}
        self._nodes_value: tuple[tuple[NodeStatus, ...], bytes] | None = None

    def encode(self, state: ClusterState) -> Encoded:
        new_services: dict[str, tuple[str, bytes, VirtualService]] = {}
        touched: set[str] = set()
        for vs, vs_digest in zip(state.services, state.service_digests, strict=True):
            key = service_key(vs.vip, vs.port, vs.protocol)
            old = self._services.get(key)
            if old is not None and old[0] == vs_digest:
                new_services[key] = old
                continue
            new_services[key] = (vs_digest, service_value(vs), vs)
            if old is not None:
                self._unindex(key, old[2], touched)
            self._index(key, vs, touched)
        for key, old in self._services.items():
            if key not in new_services:
                self._unindex(key, old[2], touched)
        self._services = new_services

        order = {key: i for i, key in enumerate(new_services)}
        for node in touched:
            backends = self._on_node.get(node)
            if not backends:
                self._on_node.pop(node, None)
                self._node_values.pop(node, None)
                continue
            keys = sorted(backends, key=order.__getitem__)
            self._node_values[node] = _node_slice_value(
                node, (replace(new_services[k][2], backends=(backends[k],)) for k in keys))

        vips = vips_value(state.vips)
        if self._nodes_value is None or self._nodes_value[0] != state.nodes:
            self._nodes_value = (state.nodes, compact_json([node_status_to_dict(n) for n in state.nodes]))
        nodes = self._nodes_value[1]

        values: dict[str, bytes] = {VIPS_KEY: vips, NODES_KEY: nodes}
        digests: dict[str, str] = {VIPS_KEY: digest(vips), NODES_KEY: digest(nodes)}
        for key, (vs_digest, value, _vs) in new_services.items():
            values[key] = value
            digests[key] = vs_digest
        for node, value in self._node_values.items():
            values[node_key(node)] = value
            digests[node_key(node)] = digest(value)
        meta = compact_json({
            "version": VERSION, "generation": state.generation,
            "hash": content_hash(vips, (d for d, _v, _s in new_services.values())),
            "services": len(new_services), "vips": digests[VIPS_KEY], "nodes": digests[NODES_KEY],
        })
        values[META_KEY] = meta
        digests[META_KEY] = digest(meta)
        return Encoded(values=values, digests=digests)

    def _index(self, key: str, vs: VirtualService, touched: set[str]) -> None:
        for b in vs.backends:
            self._on_node.setdefault(b.node, {})[key] = b
            touched.add(b.node)

    def _unindex(self, key: str, vs: VirtualService, touched: set[str]) -> None:
        for b in vs.backends:
            self._on_node.get(b.node, {}).pop(key, None)
            touched.add(b.node)


def encode_state(state: ClusterState) -> Encoded:
    return Encoder().encode(state)


# ---------------------------------------------------------------------------------------------
# Decoding (consumers)


def _get(doc: Mapping[str, Any], key: str, kind: type) -> Any:
    value = doc.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ProtocolError(f"field {key!r} missing or not {kind.__name__}")
    return value


def _load(data: bytes, what: str) -> Any:
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"{what}: not JSON: {exc}") from None


def _load_object(data: bytes, what: str) -> dict[str, Any]:
    doc = _load(data, what)
    if not isinstance(doc, dict):
        raise ProtocolError(f"{what}: not a JSON object")
    if doc.get("version", VERSION) != VERSION:
        raise ProtocolError(f"{what}: protocol version {doc.get('version')!r}; this build speaks {VERSION}")
    return doc


def decode_service(doc: Mapping[str, Any]) -> VirtualService:
    try:
        svc = _get(doc, "service", dict)
        ipvs = _get(doc, "ipvs", dict)
        protocol: Protocol = "udp" if doc.get("protocol") == "udp" else "tcp"
        forwarding: Forwarding = "i" if ipvs.get("forwarding") == "i" else "g"
        vip = _get(doc, "vip", str)
        backends = tuple(
            Backend(
                node=_get(b, "node", str),
                address=_get(b, "address", str),
                endpoints=tuple(PodEndpoint(_get(e, "address", str), _get(e, "port", int))
                                for e in _get(b, "endpoints", list)),
            )
            for b in _get(doc, "backends", list)
        )
        scheduler = ipvs.get("scheduler")
        mtu = doc.get("mtu")
        return VirtualService(
            vip=vip, family=6 if ":" in vip else 4, port=_get(doc, "port", int), protocol=protocol,
            namespace=_get(svc, "namespace", str), service=_get(svc, "name", str),
            port_name=_get(svc, "portName", str),
            scheduler=scheduler if isinstance(scheduler, str) else None,
            forwarding=forwarding,
            u_threshold=int(ipvs.get("uThreshold") or 0), l_threshold=int(ipvs.get("lThreshold") or 0),
            flags=tuple(int(f) for f in ipvs.get("flags") or ()),
            mtu=mtu if isinstance(mtu, int) and not isinstance(mtu, bool) else None,
            backends=backends,
        )
    except (AttributeError, TypeError, ValueError) as exc:
        raise ProtocolError(f"bad service value: {exc}") from None


@dataclass(frozen=True, slots=True)
class Manifest:
    generation: int
    hash: str
    services: int
    vips_digest: str
    nodes_digest: str


def decode_meta(data: bytes) -> Manifest:
    doc = _load_object(data, META_KEY)
    return Manifest(
        generation=_get(doc, "generation", int), hash=_get(doc, "hash", str),
        services=_get(doc, "services", int),
        vips_digest=_get(doc, "vips", str), nodes_digest=_get(doc, "nodes", str),
    )


def decode_nodes(data: bytes) -> tuple[NodeStatus, ...]:
    doc = _load(data, NODES_KEY)
    if not isinstance(doc, list):
        raise ProtocolError(f"{NODES_KEY}: not a JSON list")
    try:
        return tuple(NodeStatus(_get(n, "name", str), tuple(str(a) for a in _get(n, "addresses", list)),
                                bool(n.get("eligible")), str(n.get("reason", ""))) for n in doc)
    except AttributeError:
        raise ProtocolError(f"{NODES_KEY}: bad node entry") from None


@dataclass(frozen=True, slots=True)
class NodeSlice:
    node: str
    vips: tuple[str, ...]
    services: tuple[VirtualService, ...]


def decode_node_slice(data: bytes) -> NodeSlice:
    doc = _load_object(data, NODE_PREFIX + "*")
    return NodeSlice(
        node=_get(doc, "node", str),
        vips=tuple(str(v) for v in _get(doc, "vips", list)),
        services=tuple(decode_service(s) for s in _get(doc, "services", list)),
    )


class Assembler:
    """Builds complete states from bucket updates, for consumers that need every service.

    Feed it every put/delete it sees, in any order; `complete()` returns the state the newest
    manifest describes once the values held hash to the manifest's content hash, and None while
    the picture is partial (mid-publish, or after a reconnect before the resync finished).
    Level-triggered: only the latest manifest matters. A value that does not decode is kept out
    (and reported by `problems`), which keeps the state incomplete rather than wrong.
    """

    def __init__(self) -> None:
        self._services: dict[str, tuple[str, VirtualService]] = {}  # key -> (digest, decoded)
        self._vips: bytes | None = None
        self._nodes: tuple[str, tuple[NodeStatus, ...]] | None = None
        self._manifest: Manifest | None = None
        self.problems: dict[str, str] = {}

    def update(self, key: str, value: bytes | None) -> None:
        self.problems.pop(key, None)
        try:
            if key == META_KEY:
                self._manifest = decode_meta(value) if value is not None else None
            elif key == VIPS_KEY:
                self._vips = value
            elif key == NODES_KEY:
                self._nodes = (digest(value), decode_nodes(value)) if value is not None else None
            elif key.startswith(SERVICE_PREFIX):
                self._services.pop(key, None)
                if value is not None:
                    self._services[key] = (digest(value), decode_service(_load_object(value, key)))
        except ProtocolError as exc:
            self.problems[key] = str(exc)

    @property
    def manifest(self) -> Manifest | None:
        return self._manifest

    def missing(self) -> list[str]:
        """Why the held values are not (yet) a complete state; [] when they are."""
        m = self._manifest
        if m is None:
            return [f"no {META_KEY}"]
        reasons = [f"{k}: {p}" for k, p in sorted(self.problems.items())]
        if self._vips is None or digest(self._vips) != m.vips_digest:
            reasons.append(f"{VIPS_KEY} not current")
        if self._nodes is None or self._nodes[0] != m.nodes_digest:
            reasons.append(f"{NODES_KEY} not current")
        if len(self._services) != m.services:
            reasons.append(f"holding {len(self._services)} services, manifest has {m.services}")
        return reasons

    def complete(self) -> ClusterState | None:
        m = self._manifest
        if m is None or self.missing() or self._vips is None or self._nodes is None:
            return None
        ordered = sorted(self._services.values(), key=lambda item: item[1].sort_key())
        digests = tuple(d for d, _vs in ordered)
        if content_hash(self._vips, digests) != m.hash:
            return None
        vips = _load(self._vips, VIPS_KEY)
        return ClusterState(
            generation=m.generation,
            vips=tuple(str(v) for v in vips) if isinstance(vips, list) else (),
            services=tuple(vs for _d, vs in ordered),
            nodes=self._nodes[1],
            known_digests=digests,
        )
