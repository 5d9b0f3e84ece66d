"""The cluster-state protocol on NATS JetStream key-value (docs/protocol.md). Pure.

The watcher writes one bucket; consumers watch it. Keys:

    state.meta                        manifest: version, generation, content hash, number of
                                      services, digests of state.vips and state.nodes
    state.vips                        every configured VIP (JSON list)
    state.nodes                       every node's eligibility (for /config and operators)
    vs.<vip>.<port>.<proto>           one virtual service with all its backends (directors)
    node.<node>.<vip>.<port>.<proto>  that service as one node sees it: only its own backend
                                      (realservers watch `node.<node>.>`)

In keys, '.' and ':' of addresses become '-', and '.' of node names becomes '_' (node names are
DNS names, which never hold '_'), so every key splits into its tokens unambiguously.

The content hash is sha256 over `state.vips`, the number of `vs.` values and the sum of their
digests (version 2; version 1 hashed every digest in service order, which cost the whole state on
every change), so a director that holds values whose hash equals the manifest's holds exactly
the published state; until then it keeps what it applied before. Writes go changed values first,
deletions second, the manifest last. A realserver's keys are independent of each other: each is
one complete service, applied as it comes. A one-endpoint change rewrites one `vs.` value, the
`node.` value of each node whose backend changed, and a manifest of about 200 bytes.
"""

from __future__ import annotations

import functools
import ipaddress
import itertools
import json
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final, TypeAlias

from kube2ipvs.chunked import SortedChunks
from kube2ipvs.lbconfig import (
    MTU_MAX,
    MTU_MIN,
    SCHEDULERS,
    THRESHOLD_MAX,
    Forwarding,
    Protocol,
    address_sort_key,
    canonical_address,
    usable_as_vip,
)
from kube2ipvs.model import (
    Backend,
    ClusterState,
    NodeStatus,
    PodEndpoint,
    StateDelta,
    VirtualService,
    compact_json,
    content_hash_of_sum,
    content_hash_v1,
    digest,
    new_lineage,
    node_status_to_dict,
    service_value,
    vips_value,
)

VERSION: Final = 2
VERSIONS_READ: Final = (1, 2)  # what this build reads (version 1: from a watcher not yet upgraded)
META_KEY: Final = "state.meta"
VIPS_KEY: Final = "state.vips"
NODES_KEY: Final = "state.nodes"
SERVICE_PREFIX: Final = "vs."
NODE_PREFIX: Final = "node."


class ProtocolError(ValueError):
    """A value in the bucket does not follow this protocol version (consumers skip it and say why)."""


def _service_token(vip: str, port: int, protocol: str) -> str:
    return f"{vip.replace('.', '-').replace(':', '-')}.{port}.{protocol}"


def service_key(vip: str, port: int, protocol: str) -> str:
    """`vs.192-0-2-10.8080.tcp`, `vs.2001-db8--10.80.tcp`."""
    return SERVICE_PREFIX + _service_token(vip, port, protocol)


def node_prefix(node: str) -> str:
    """`node.ip-10-0-0-1_ec2_internal.`: every key of one node's services starts with it."""
    return f"{NODE_PREFIX}{node.replace('.', '_')}."


def node_service_key(node: str, vip: str, port: int, protocol: str) -> str:
    return node_prefix(node) + _service_token(vip, port, protocol)


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


def encoded_from_values(values: Mapping[str, bytes]) -> Encoded:
    """What is in the bucket now, as an Encoded (to diff against after a restart or a reconnect)."""
    return Encoded(values=dict(values), digests={k: digest(v) for k, v in values.items()})


def same_content(previous: Encoded | None, new: Encoded) -> bool:
    """True when `new` differs from `previous` at most in its generation number."""
    if previous is None or META_KEY not in previous.values or len(previous.digests) != len(new.digests):
        return False
    if any(previous.digests.get(k) != d for k, d in new.digests.items() if k != META_KEY):
        return False
    try:
        old, fresh = decode_meta(previous.meta), decode_meta(new.meta)
    except ProtocolError:
        return False
    return (old.hash, old.services, old.vips_digest, old.nodes_digest) == \
        (fresh.hash, fresh.services, fresh.vips_digest, fresh.nodes_digest)


@dataclass(frozen=True, slots=True)
class Delta:
    """What changed between two successive `Encoder.update` calls (the manifest aside)."""

    puts: tuple[Write, ...]  # sorted by key
    deletes: tuple[Write, ...]  # sorted by key

    def __bool__(self) -> bool:
        return bool(self.puts or self.deletes)

    def writes(self, meta: bytes) -> list[Write]:
        return [*self.puts, *self.deletes, Write(META_KEY, meta)]


class Encoder:
    """Keeps the encoding of the newest state and says what each new state changed in it.

    `update()` costs one digest comparison per service plus the encoding of what changed: a
    service value is re-encoded only when its digest changed, and a node's value of a service only
    when that node's backend in it changed. `snapshot()` copies the whole encoding (for the rare
    full comparison against what a bucket holds).
    """

    def __init__(self) -> None:
        self._services: dict[str, tuple[str, VirtualService]] = {}  # vs key -> (digest, vs)
        self._values: dict[str, bytes] = {}
        self._digests: dict[str, str] = {}
        self._nodes: tuple[NodeStatus, ...] | None = None
        self._hash = ""
        self._count = 0
        self._last: tuple[int, int] | None = None  # (lineage, seq) of the state last encoded
        self.total_bytes = 0  # of every value but the manifest, kept up to date on each change
        self._keys: dict[tuple[str, int, str], str] = {}  # service_key() memo
        self._vips_of: tuple[str, ...] | None = None
        self._vips_value = b""

    def update(self, state: ClusterState) -> Delta:
        changed: dict[str, bytes | None] = {}
        d = state.delta
        if d is not None and self._last == (d.lineage, d.seq - 1):
            # The direct successor of what we encoded: its delta names every service that may differ.
            for k, item in d.changed.items():
                self._service_changed(self._key(k), item, changed)
        else:
            seen: set[str] = set()
            for vs, vs_digest in zip(state.services, state.service_digests, strict=True):
                key = self._key(vs.key)
                seen.add(key)
                self._service_changed(key, (vs, vs_digest), changed)
            for key in [k for k in self._services if k not in seen]:
                self._service_changed(key, None, changed)
        self._last = (d.lineage, d.seq) if d is not None else None

        if state.vips is not self._vips_of:  # the same tuple, state after state, until the config changes
            self._vips_of, self._vips_value = state.vips, vips_value(state.vips)
        changed[VIPS_KEY] = self._vips_value
        if self._nodes != state.nodes:
            self._nodes = state.nodes
            changed[NODES_KEY] = compact_json([node_status_to_dict(n) for n in state.nodes])

        puts: list[Write] = []
        deletes: list[Write] = []
        for key in sorted(changed):
            value = changed[key]
            if value is None:
                if (gone := self._values.pop(key, None)) is not None:
                    self._digests.pop(key, None)
                    self.total_bytes -= len(gone)
                    deletes.append(Write(key, None))
                continue
            value_digest = digest(value)
            if self._digests.get(key) != value_digest:
                self.total_bytes += len(value) - len(self._values.get(key, b""))
                self._values[key] = value
                self._digests[key] = value_digest
                puts.append(Write(key, value))
        self._hash = state.content_hash
        self._count = len(state.services)
        return Delta(puts=tuple(puts), deletes=tuple(deletes))

    def _key(self, k: tuple[str, int, str]) -> str:
        key = self._keys.get(k)
        if key is None:
            key = self._keys[k] = service_key(*k)
        return key

    def _service_changed(
        self, key: str, item: tuple[VirtualService, str] | None, changed: dict[str, bytes | None]
    ) -> None:
        old = self._services.get(key)
        if item is None:
            if old is not None:
                del self._services[key]
                changed[key] = None
                self._node_values(old[1], None, changed)
            return
        vs, vs_digest = item
        if old is not None and old[0] == vs_digest:
            return
        self._services[key] = (vs_digest, vs)
        changed[key] = service_value(vs)
        self._node_values(old[1] if old is not None else None, vs, changed)

    @staticmethod
    def _node_values(old: VirtualService | None, new: VirtualService | None, out: dict[str, bytes | None]) -> None:
        before = {b.node: b for b in old.backends} if old is not None else {}
        after = {b.node: b for b in new.backends} if new is not None else {}
        ref = new or old
        assert ref is not None
        for node in before.keys() | after.keys():
            backend = after.get(node)
            if backend is not None and before.get(node) == backend and old is not None and new is not None \
                    and _same_but_backends(old, new):
                continue  # this node's view of the service did not change
            key = node_service_key(node, ref.vip, ref.port, ref.protocol)
            out[key] = None if backend is None or new is None else service_value(replace(new, backends=(backend,)))

    def meta(self, generation: int) -> bytes:
        return compact_json({
            "version": VERSION, "generation": generation, "hash": self._hash, "services": self._count,
            "vips": self._digests.get(VIPS_KEY, ""), "nodes": self._digests.get(NODES_KEY, ""),
        })

    def snapshot(self, generation: int) -> Encoded:
        meta = self.meta(generation)
        return Encoded(values={**self._values, META_KEY: meta}, digests={**self._digests, META_KEY: digest(meta)})


def _same_but_backends(a: VirtualService, b: VirtualService) -> bool:
    return replace(a, backends=()) == replace(b, backends=())


def encode_state(state: ClusterState) -> Encoded:
    encoder = Encoder()
    encoder.update(state)
    return encoder.snapshot(state.generation)


# ---------------------------------------------------------------------------------------------
# Decoding (consumers)


def _get(doc: Mapping[str, Any], key: str, kind: type) -> Any:
    value = doc.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ProtocolError(f"field {key!r} missing or not {kind.__name__}")
    return value


def _address(doc: Mapping[str, Any], key: str) -> str:
    """An IP address field, in canonical form (what the kernel reports back, so that desired and
    read state compare equal whatever spelling a publisher used). A zone index ("%eth0") is
    refused: the text after % is free-form and would reach nft text and netlink verbatim."""
    value: str = _get(doc, key, str)
    canonical = None if "%" in value else canonical_address(value)
    if canonical is None:
        raise ProtocolError(f"field {key!r}: {value[:60]!r} is not an IP address")
    return canonical


def _vip(value: object) -> str | None:
    """The VIP in canonical form, or None when it is not an address a VIP can have."""
    return _vip_text(value) if isinstance(value, str) else None


@functools.lru_cache(maxsize=1 << 16)
def _vip_text(value: str) -> str | None:
    """Cached: the same VIPs come in every service value and every `state.vips`."""
    if "%" in value or canonical_address(value) is None:
        return None
    ip = ipaddress.ip_address(value)
    return str(ip) if usable_as_vip(ip) else None


def _int_in(doc: Mapping[str, Any], key: str, low: int, high: int, default: int | None = None) -> int:
    if default is not None and doc.get(key) is None:
        return default
    value: int = _get(doc, key, int)
    if not low <= value <= high:
        raise ProtocolError(f"field {key!r}: {value if value.bit_length() < 64 else 'a huge number'} "
                            f"is outside {low}-{high}")
    return value


def _load(data: bytes, what: str) -> Any:
    try:
        return json.loads(data)
    except RecursionError:
        raise ProtocolError(f"{what}: not JSON: nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"{what}: not JSON: {exc}") from None


def _load_object(data: bytes, what: str) -> dict[str, Any]:
    doc = _load(data, what)
    if not isinstance(doc, dict):
        raise ProtocolError(f"{what}: not a JSON object")
    version = doc.get("version", VERSION)
    if type(version) is not int or version not in VERSIONS_READ:
        raise ProtocolError(f"{what}: protocol version {version!r}; this build reads versions "
                            f"{', '.join(map(str, VERSIONS_READ))}")
    return doc


def decode_service(doc: Mapping[str, Any]) -> VirtualService:
    """A `vs.`/`node.` value. Every field that reaches a kernel (addresses, ports, protocol,
    scheduler, flags, thresholds, MTU) is checked against what the watcher can publish, so a
    foreign or corrupt value is refused here instead of failing (or injecting text into) the
    consumer's whole nft transaction or IPVS batch."""
    try:
        svc = _get(doc, "service", dict)
        ipvs = _get(doc, "ipvs", dict)
        protocol: Protocol = "udp" if doc.get("protocol") == "udp" else "tcp"
        if doc.get("protocol") not in ("tcp", "udp"):
            raise ProtocolError(f"field 'protocol': {doc.get('protocol')!r} is not tcp or udp")
        if ipvs.get("forwarding", "g") not in ("g", "i"):
            raise ProtocolError(f"field 'forwarding': {ipvs.get('forwarding')!r} is not g or i")
        forwarding: Forwarding = "i" if ipvs.get("forwarding") == "i" else "g"
        given: str = _get(doc, "vip", str)
        vip = _vip(given)
        if vip is None:
            raise ProtocolError(f"field 'vip': {given[:60]!r} is not an address a VIP can have")
        backends = tuple(
            Backend(
                node=_get(b, "node", str),
                address=_address(b, "address"),
                endpoints=tuple(PodEndpoint(_address(e, "address"), _int_in(e, "port", 1, 65535))
                                for e in _get(b, "endpoints", list)),
            )
            for b in _get(doc, "backends", list)
        )
        scheduler = ipvs.get("scheduler")
        if scheduler is not None and scheduler not in SCHEDULERS:
            raise ProtocolError(f"field 'scheduler': {str(scheduler)[:40]!r} is not an IPVS scheduler")
        flags = tuple(_get(ipvs, "flags", list)) if ipvs.get("flags") is not None else ()
        if any(isinstance(f, bool) or f not in (1, 2, 3) for f in flags):
            raise ProtocolError("field 'flags': not a list of scheduler flag bits 1-3")
        mtu = doc.get("mtu")
        return VirtualService(
            vip=vip, family=6 if ":" in vip else 4, port=_int_in(doc, "port", 1, 65535), protocol=protocol,
            namespace=_get(svc, "namespace", str), service=_get(svc, "name", str),
            port_name=_get(svc, "portName", str),
            scheduler=scheduler,
            forwarding=forwarding,
            u_threshold=_int_in(ipvs, "uThreshold", 0, THRESHOLD_MAX, default=0),
            l_threshold=_int_in(ipvs, "lThreshold", 0, THRESHOLD_MAX, default=0),
            flags=flags,
            mtu=_int_in(doc, "mtu", MTU_MIN, MTU_MAX) if mtu is not None else None,
            backends=backends,
        )
    except (AttributeError, TypeError, ValueError) as exc:
        raise ProtocolError(f"bad service value: {exc}") from None


@dataclass(frozen=True, slots=True)
class Manifest:
    version: int
    generation: int
    hash: str
    services: int
    vips_digest: str
    nodes_digest: str


def decode_meta(data: bytes) -> Manifest:
    doc = _load_object(data, META_KEY)
    return Manifest(
        version=_get(doc, "version", int), generation=_get(doc, "generation", int), hash=_get(doc, "hash", str),
        services=_get(doc, "services", int),
        vips_digest=_get(doc, "vips", str), nodes_digest=_get(doc, "nodes", str),
    )


def decode_vips(data: bytes) -> tuple[str, ...]:
    """`state.vips`: a JSON list of IP addresses (without zone index: directors add them as addresses)."""
    doc = _load(data, VIPS_KEY)
    if not isinstance(doc, list):
        raise ProtocolError(f"{VIPS_KEY}: not a JSON list of IP addresses")
    vips = []
    for i, given in enumerate(doc):
        vip = _vip(given)
        if vip is None:
            raise ProtocolError(f"{VIPS_KEY}: item {i}, {str(given)[:60]!r}, is not an address a VIP can have")
        vips.append(vip)
    return tuple(vips)


def decode_nodes(data: bytes) -> tuple[NodeStatus, ...]:
    doc = _load(data, NODES_KEY)
    if not isinstance(doc, list):
        raise ProtocolError(f"{NODES_KEY}: not a JSON list")
    try:
        return tuple(NodeStatus(_get(n, "name", str), tuple(str(a) for a in _get(n, "addresses", list)),
                                bool(n.get("eligible")), str(n.get("reason", ""))) for n in doc)
    except AttributeError:
        raise ProtocolError(f"{NODES_KEY}: bad node entry") from None


SliceChange: TypeAlias = tuple[VirtualService | None, VirtualService | None]  # (old, new); None: absent
# How far back a SliceDelta reaches (`SliceDelta.since`): this many slices, as long as they
# changed this many keys in all (further back, a consumer compares the whole slice instead).
SLICE_STEPS_KEPT: Final = 64
SLICE_CHANGES_KEPT: Final = 4096


@dataclass(frozen=True, slots=True)
class SliceDelta:
    """How a node's slice differs from the slices its assembler made before it.

    `steps` holds, for each of the last few slices (at most SLICE_STEPS_KEPT, this one last), the
    keys whose service changed since the slice before, as (old, new) with the very objects the
    slices hold. A consumer that skipped slices (the subscriber and the realserver hand over only
    the newest) still follows in proportion to the change, from the slice it last saw (`since`).
    """

    lineage: int
    seq: int
    steps: tuple[Mapping[str, SliceChange], ...]

    @property
    def changed(self) -> Mapping[str, SliceChange]:
        """What changed since the slice just before this one, (lineage, seq - 1)."""
        return self.steps[-1] if self.steps else {}

    def since(self, lineage: int, seq: int) -> dict[str, SliceChange] | None:
        """Key -> (service in slice `seq`, service in this one) for every key that differs between
        them; None when that slice is not one this delta reaches back to (another lineage, a later
        one, or one older than the steps kept)."""
        behind = self.seq - seq
        if lineage != self.lineage or not 0 <= behind <= len(self.steps):
            return None
        out: dict[str, SliceChange] = {}
        for step in self.steps[len(self.steps) - behind:]:
            for key, (old, new) in step.items():
                first = out[key][0] if key in out else old
                if first is new:
                    out.pop(key, None)
                else:
                    out[key] = (first, new)
        return out


@dataclass(frozen=True, slots=True)
class NodeSlice:
    node: str
    vips: tuple[str, ...]  # the VIPs of its services, in their order: what the realserver holds on lo
    # sorted; each with only this node's backend. A tuple, or from a NodeSliceAssembler a Chunked
    # that shares its unchanged chunks with the slice before (kube2ipvs.chunked).
    services: Sequence[VirtualService]
    delta: SliceDelta | None = field(default=None, compare=False, repr=False)


def decode_node_service(data: bytes) -> VirtualService:
    return decode_service(_load_object(data, NODE_PREFIX + "*"))


_SliceEntry: TypeAlias = tuple[tuple[int, int, int, str], int, VirtualService]  # see NodeSliceAssembler
_SLICE_SERVICE: Final = operator.itemgetter(2)  # of a NodeSliceAssembler._order entry
_SLICE_VIP: Final = operator.itemgetter(1)  # of a NodeSliceAssembler._vip_order entry


class NodeSliceAssembler:
    """One node's services from its `node.<node>.*` keys; every key is complete on its own.

    A value costs its own decoding, and a slice what changed since the last one: the services
    are kept in slice order in chunks (kube2ipvs.chunked) that successive slices share, the VIPs
    as a count of services each (their tuple made again only when the set of VIPs changed), and
    each slice says what changed (`NodeSlice.delta`).
    """

    def __init__(self, node: str) -> None:
        self.node = node
        self.prefix = node_prefix(node)
        # The services in slice order, kept as values come, and each key's entry in it: (sort key,
        # arrival, service). The arrival number orders services of equal sort key (two spellings
        # of one VIP) as a stable sort of the keys in arrival order would: a key given a new value
        # keeps its place. Unique, so entries never compare their services.
        self._order: SortedChunks[_SliceEntry] = SortedChunks(_SLICE_SERVICE)
        self._services: dict[str, _SliceEntry] = {}
        self._arrivals = itertools.count()
        self.problems: dict[str, str] = {}
        self._vip_counts: dict[str, int] = {}
        self._vip_order: SortedChunks[tuple[tuple[int, int], str]] = SortedChunks(_SLICE_VIP)
        self._vips: tuple[str, ...] = ()
        self._vips_stale = False
        self._changed: dict[str, SliceChange] = {}  # since the last slice
        self._steps: tuple[Mapping[str, SliceChange], ...] = ()
        self._lineage = new_lineage()
        self._seq = 0

    def update(self, key: str, value: bytes | None) -> None:
        if not key.startswith(self.prefix):
            return
        self.problems.pop(key, None)
        if value is None:
            self._put(key, None)
            return
        try:
            vs = decode_node_service(value)
        except ProtocolError as exc:
            # The key keeps its last good value, if it had one: a value this build cannot read (a
            # newer protocol version, a foreign or corrupt write) must not take a working service
            # out of the kernel. A key that never decoded is never DNATed.
            self.problems[key] = str(exc)
            return
        self._put(key, vs)

    def _put(self, key: str, vs: VirtualService | None) -> None:
        held = self._services.pop(key, None) if vs is None else self._services.get(key)
        if held is None and vs is None:
            return
        if held is not None:
            _, arrival, old = held
            self._order.remove(held)
            self._count_vip(old.vip, -1)
        else:
            arrival, old = next(self._arrivals), None
        if vs is not None:
            self._services[key] = entry = (vs.sort_key(), arrival, vs)
            self._order.add(entry)
            self._count_vip(vs.vip, +1)
        first = self._changed[key][0] if key in self._changed else old
        if first is None and vs is None:
            del self._changed[key]  # came and went between two slices
        else:
            self._changed[key] = (first, vs)

    def _count_vip(self, vip: str, step: int) -> None:
        count = self._vip_counts.get(vip, 0) + step
        if count:
            self._vip_counts[vip] = count
        else:
            del self._vip_counts[vip]
        if count == (1 if step > 0 else 0):  # the VIP came or went
            entry = (address_sort_key(vip), vip)
            if step > 0:
                self._vip_order.add(entry)
            else:
                self._vip_order.remove(entry)
            self._vips_stale = True

    def slice(self) -> NodeSlice:
        if self._vips_stale:
            self._vips, self._vips_stale = tuple(self._vip_order.snapshot(0)), False
        self._seq += 1
        # The newest step always; older ones while few enough (the first slice's names every key).
        steps, kept, total = (*self._steps, self._changed), 1, len(self._changed)
        while kept < min(len(steps), SLICE_STEPS_KEPT) and total + len(steps[-kept - 1]) <= SLICE_CHANGES_KEPT:
            kept += 1
            total += len(steps[-kept])
        self._steps, self._changed = steps[-kept:], {}
        return NodeSlice(node=self.node, vips=self._vips, services=self._order.snapshot(0),
                         delta=SliceDelta(self._lineage, self._seq, self._steps))


_DIGEST_OF: Final = operator.itemgetter(2)  # of an Assembler._order entry
_SERVICE_OF: Final = operator.itemgetter(3)


class Assembler:
    """Builds complete states from bucket updates, for consumers that need every service.

    Feed it every put/delete it sees, in any order; `complete()` returns the state the newest
    manifest describes once the values held hash to the manifest's content hash, and None while
    the picture is partial (mid-publish, or after a reconnect before the resync finished).
    Level-triggered: only the latest manifest matters. A value that does not decode is kept out
    (and reported by `problems`), which keeps the state incomplete rather than wrong.

    A value costs its own decoding, and a complete state costs what changed since the last one:
    the services are kept in state order in chunks (kube2ipvs.chunked) that successive states
    share, and the content hash from a running count and sum of digests (protocol version 2).
    """

    def __init__(self) -> None:
        self._services: dict[str, tuple[str, VirtualService]] = {}  # key -> (digest, decoded)
        self._vips: bytes | None = None
        self._vips_digest = ""
        self._vips_decoded: tuple[str, ...] | None = None  # decoded once, when the value comes
        self._nodes: tuple[str, tuple[NodeStatus, ...]] | None = None
        self._manifest: Manifest | None = None
        self.problems: dict[str, str] = {}
        # The services in state order, kept as values come, so that assembling a state costs no
        # sort; what changed since the last assembled state, for its `delta`; and the sum of the
        # held values' digests. Entries: (sort key, KV key, digest, service).
        self._order: SortedChunks[tuple[tuple[int, int, int, str], str, str, VirtualService]] = \
            SortedChunks(_DIGEST_OF, _SERVICE_OF)
        self._sum = 0
        self._changed: dict[tuple[str, int, Protocol], tuple[VirtualService, str] | None] = {}
        self._lineage = new_lineage()
        self._seq = 0

    def _drop(self, key: str) -> None:
        old = self._services.pop(key, None)
        if old is not None:
            self._order.remove((old[1].sort_key(), key, old[0], old[1]))
            self._sum -= int(old[0], 16)
            self._changed[old[1].key] = None

    def update(self, key: str, value: bytes | None) -> None:
        self.problems.pop(key, None)
        try:
            if key == META_KEY:
                self._manifest = decode_meta(value) if value is not None else None
            elif key == VIPS_KEY:
                self._vips, self._vips_decoded = value, None
                self._vips_digest = digest(value) if value is not None else ""
                if value is not None:  # a value that does not decode keeps the state incomplete
                    self._vips_decoded = decode_vips(value)
            elif key == NODES_KEY:
                self._nodes = (digest(value), decode_nodes(value)) if value is not None else None
            elif key.startswith(SERVICE_PREFIX):
                self._drop(key)
                if value is not None:
                    vs = decode_service(_load_object(value, key))
                    value_digest = digest(value)
                    self._services[key] = (value_digest, vs)
                    self._order.add((vs.sort_key(), key, value_digest, vs))
                    self._sum += int(value_digest, 16)
                    self._changed[vs.key] = (vs, value_digest)
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
        if self._vips is None or self._vips_digest != m.vips_digest:
            reasons.append(f"{VIPS_KEY} not current")
        if self._nodes is None or self._nodes[0] != m.nodes_digest:
            reasons.append(f"{NODES_KEY} not current")
        if len(self._services) != m.services:
            reasons.append(f"holding {len(self._services)} services, manifest has {m.services}")
        return reasons

    def complete(self) -> ClusterState | None:
        """The state the held values make, when they match the manifest; None otherwise.

        Its `delta` names every service that changed since the previous state this assembler
        made (the first one names them all), so a consumer that took that one can follow in
        proportion to the change (kube2ipvs_director.app)."""
        m = self._manifest
        vips = self._vips_decoded
        if m is None or self.missing() or self._vips is None or vips is None or self._nodes is None:
            return None
        digests = self._order.snapshot(0)
        if m.version == 1:
            held = content_hash_v1(self._vips, tuple(digests))
        else:
            held = content_hash_of_sum(self._vips, len(self._order), self._sum)
        if held != m.hash:
            return None  # (equal: the state's content_hash is m.hash, computed just now)
        self._seq += 1
        delta = StateDelta(self._lineage, self._seq, self._changed)
        self._changed = {}
        return ClusterState(
            generation=m.generation,
            vips=vips,
            services=self._order.snapshot(1),
            nodes=self._nodes[1],
            known_digests=digests,
            delta=delta,
            known_hash=m.hash,
        )
