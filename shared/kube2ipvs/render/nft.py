"""A realserver's rules as `nft -f` text: one owned table per family. Pure.

Input is one node's slice of the cluster state (`ClusterState.for_node`): each virtual service
carries that node's backend, whose endpoints are the local pods. The text always holds both
`table ip kube2ipvs` and `table ip6 kube2ipvs`, each as `table` / `delete table` / `table {...}`,
so one `nft -f` run replaces both atomically whatever was there before (the first line makes the
delete succeed when the table is absent). Replacing the table keeps established connections:
their NAT bindings live in conntrack, not in the rules. It does reset the counters.

Inside a table (empty when the family has no service with a local endpoint), with K the key
`VIP . l4proto . port`:

    set pkts_in, pkts_out, syn_in, synack_out, fin_in, fin_out, rst_in, rst_out
                    K, with per-element counters (`counter` flag): one element per service in
                    each set of its kinds (the TCP flag sets hold TCP services only)
    map class       K : goto dnat_<N>, N = the service's number of local endpoints
    map slots_<N>   K . slot : endpoint address . port, slots 0..N-1, one per endpoint
    chain dnat_<N>  dnat to `K . numgen random mod N` looked up in slots_<N>, so each endpoint
                    gets 1/N of the new connections; N = 1..64 always exist, larger ones while used
    chain prerouting_dnat   nat prerouting (dstnat)   remote clients: vmap @class
    chain output_dnat       nat output (-100)         local clients:  vmap @class
    chain prerouting_count  filter prerouting (raw)   client -> VIP, before conntrack and DNAT,
    chain output_count      filter output (raw)       so the destination is still the VIP
    chain postrouting_count filter postrouting (300)  VIP -> client, after the reply was
    chain input_count       filter input (300)        un-DNATed (srcnat 100), so its source is the VIP
    chain count_in, count_out   the counting rules both pairs of hooks jump to

Why this shape (measured at 10,000 services and 94,000 endpoints, docs/design/realserver-nft-
layout.md): every change of a service's endpoints is a change of map and set ELEMENTS only, no
chain or rule is added after the first load, and nft's cache holds a few dozen objects, so one
endpoint change costs about 3 ms in-process instead of a second. `random`, not `inc`: one
`numgen inc` counter shared by every service of a class locks services into fixed endpoints.

With `masquerade_exempt`, also `set vips`, `set masquerade_exempt` and a nat postrouting chain
that masquerades connections DNATed from a VIP unless their source is exempt. It matches the
connection's conntrack status and original destination, never a packet mark: the original
system borrowed a mark bit Calico also uses, and connections were reset.

`counter_names` (`kube2ipvs.names`) are the readable per-kind names the iptables rendering
uses as rule comments; in nft a counter is addressed by its set (the kind) and K.

Everything is sorted by VIP, port and protocol, and endpoints by address and port, so the text
does not depend on the order of the input.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, TypeAlias

from kube2ipvs.lbconfig import Family, Protocol
from kube2ipvs.model import PodEndpoint, VirtualService
from kube2ipvs.names import COUNTER_KINDS, nft_service_name, service_counter_names

TABLE: Final = "kube2ipvs"
FAMILIES: Final[tuple[Family, ...]] = (4, 6)

_IP: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
_NFT_FAMILY: Final[dict[Family, str]] = {4: "ip", 6: "ip6"}
_ADDR_TYPE: Final[dict[Family, str]] = {4: "ipv4_addr", 6: "ipv6_addr"}

# Which packets each counter kind counts: the direction (which key expression looks the
# counter up) and the TCP flag test. Every packet counts in pkts_*; the flag kinds only
# exist for TCP, so their maps hold TCP services only.
_COUNTER_MATCH: Final[dict[str, tuple[str, str]]] = {
    "pkts_in": ("in", ""),
    "pkts_out": ("out", ""),
    "syn_in": ("in", "tcp flags & (syn | ack) == syn "),
    "synack_out": ("out", "tcp flags & (syn | ack) == syn | ack "),
    "fin_in": ("in", "tcp flags & fin == fin "),
    "fin_out": ("out", "tcp flags & fin == fin "),
    "rst_in": ("in", "tcp flags & rst == rst "),
    "rst_out": ("out", "tcp flags & rst == rst "),
}

# Base chains: name, hook spec, the one rule. `{ip}` is `ip` or `ip6`.
CLASS_MAP: Final = "class"
# Classes 1..FIXED_CLASSES always exist, so a service changing its number of endpoints moves
# between fixed chains; a larger class is declared while some service needs it.
FIXED_CLASSES: Final = 64
_DNAT: Final = "{ip} daddr . meta l4proto . th dport vmap @" + CLASS_MAP
_BASE_CHAINS: Final = (
    ("prerouting_dnat", "type nat hook prerouting priority dstnat", _DNAT),
    # nft 1.0.6 knows the `dstnat` keyword for prerouting only; -100 is its value.
    ("output_dnat", "type nat hook output priority -100", _DNAT),
    ("prerouting_count", "type filter hook prerouting priority raw", "jump count_in"),
    ("output_count", "type filter hook output priority raw", "jump count_in"),
    ("postrouting_count", "type filter hook postrouting priority 300", "jump count_out"),
    ("input_count", "type filter hook input priority 300", "jump count_out"),
)
_KEY: Final = {"in": "{ip} daddr . meta l4proto . th dport", "out": "{ip} saddr . meta l4proto . th sport"}

# Per-VIP MTU (mtuConfig) as TCP MSS clamping: the client's SYN (to the VIP, before DNAT) and the
# pod's SYN-ACK (from the VIP, after un-DNAT) carry an MSS no larger than the VIP's MTU less the
# IP and TCP headers, so neither side sends a segment that does not fit. Lowered only: a smaller
# MSS someone advertised stays. Element-only like the rest: `mss_clamp` holds VIP . (MSS+1)-65535
# (which advertised sizes are too large), `mss` VIP : MSS.
MSS_OVERHEAD: Final[dict[Family, int]] = {4: 40, 6: 60}
MSS_CHAINS: Final = (
    ("prerouting_mss", "type filter hook prerouting priority mangle",
     "tcp flags & (syn | rst) == syn {ip} daddr . tcp option maxseg size @mss_clamp "
     "tcp option maxseg size set {ip} daddr map @mss"),
    ("postrouting_mss", "type filter hook postrouting priority 300",
     "tcp flags & (syn | ack | rst) == syn | ack {ip} saddr . tcp option maxseg size @mss_clamp "
     "tcp option maxseg size set {ip} saddr map @mss"),
)


@dataclass(frozen=True, slots=True)
class DnatEntry:
    """One VIP:port/protocol this node DNATs, with its local endpoints (sorted, at least one)."""

    vip: str
    family: Family
    port: int
    protocol: Protocol
    endpoints: tuple[PodEndpoint, ...]
    name: str  # nft_service_name
    counters: Mapping[str, str]  # kind -> counter name, as counter_names gives them
    mtu: int | None = None  # the VIP's MTU (mtuConfig): TCP MSS of its connections clamped to fit


def dnat_entries(services: Iterable[VirtualService]) -> tuple[DnatEntry, ...]:
    """The services to DNAT, merged by identity, canonical and sorted.

    The endpoints of every backend given count (a node's slice has one backend). An endpoint of
    the other family cannot be DNATed to and is left out; a service left without endpoints is
    left out too. Raises ValueError on a string that is not an IP address (the model never
    holds one), so no text of the input reaches the output unparsed.
    """
    merged: dict[tuple[_IP, int, Protocol], set[tuple[_IP, int]]] = {}
    mtus: dict[_IP, int] = {}
    for vs in services:
        vip = ipaddress.ip_address(vs.vip)
        if vs.mtu is not None:
            mtus[vip] = min(vs.mtu, mtus.get(vip, vs.mtu))  # one per VIP in the config; the least if not
        bucket = merged.setdefault((vip, vs.port, vs.protocol), set())
        for backend in vs.backends:
            for ep in backend.endpoints:
                address = ipaddress.ip_address(ep.address)
                if address.version == vip.version:
                    bucket.add((address, ep.port))
    entries = []
    for (vip, port, protocol), eps in sorted(merged.items(), key=lambda item: (item[0][0].version, item[0])):
        if not eps:
            continue
        family: Family = 6 if vip.version == 6 else 4
        text = str(vip)
        entries.append(DnatEntry(
            text, family, port, protocol, tuple(PodEndpoint(str(a), p) for a, p in sorted(eps)),
            nft_service_name(text, port, protocol), service_counter_names(text, port, protocol), mtus.get(vip),
        ))
    return tuple(entries)


def counter_names(vs: VirtualService) -> dict[str, str]:
    """Counter kind -> nft counter name for `vs`, e.g. `syn_in` -> `svc_192.0.2.10_8080_tcp_syn_in`.

    Kinds: pkts_in, pkts_out, syn_in, synack_out, fin_in, fin_out, rst_in, rst_out; UDP has
    pkts_in and pkts_out only. Each counter holds packets and bytes. A name is
    `svc_<vip>_<port>_<protocol>_<kind>`, IPv6 colons written as `-` (nft identifiers allow no
    `:` before digits); at most 70 characters against nft's 255 (budget beside
    `kube2ipvs.names.nft_service_name`).
    """
    return service_counter_names(vs.vip, vs.port, vs.protocol)


def _key(e: DnatEntry) -> str:
    return f"{e.vip} . {e.protocol} . {e.port}"


def dnat_class(e: DnatEntry) -> int:
    """The class of `e`: its number of endpoints. Class N is one fixed chain `dnat_N` picking
    one of N slots of the map `slots_N` at random."""
    return len(e.endpoints)


def classes_of(entries: Iterable[DnatEntry]) -> list[int]:
    """The classes a table declares: 1..FIXED_CLASSES always, larger ones while in use."""
    return sorted(set(range(1, FIXED_CLASSES + 1)) | {dnat_class(e) for e in entries})


def vip_mtus(entries: Iterable[DnatEntry]) -> dict[str, int]:
    """VIP -> MTU of the entries whose VIP has one."""
    return {e.vip: e.mtu for e in entries if e.mtu is not None}


def mss_of(vip: str, mtu: int) -> int:
    return mtu - MSS_OVERHEAD[6 if ":" in vip else 4]


def mss_elements(vip: str, mtu: int) -> tuple[str, str]:
    """(`mss_clamp` element, `mss` element) of a VIP with this MTU."""
    mss = mss_of(vip, mtu)
    return f"{vip} . {mss + 1}-65535", f"{vip} : {mss}"


def class_element(e: DnatEntry) -> str:
    return f"{_key(e)} : goto {class_chain(dnat_class(e))}"


def slot_keys(e: DnatEntry) -> list[str]:
    key = _key(e)
    return [f"{key} . {i}" for i in range(len(e.endpoints))]


def slot_elements(e: DnatEntry) -> list[str]:
    """Slot i of the service's N slots holds its i-th endpoint (sorted), so each gets 1/N."""
    key = _key(e)
    return [f"{key} . {i} : {ep.address} . {ep.port}" for i, ep in enumerate(e.endpoints)]


def class_chain(n: int) -> str:
    return f"dnat_{n}"


def slot_map(n: int) -> str:
    return f"slots_{n}"


def slot_map_declaration(family: Family, n: int) -> str:
    """The `typeof` of map `slots_N` (nft 1.0.6 accepts a `numgen` in a key only with typeof)."""
    ip = _NFT_FAMILY[family]
    return f"typeof {ip} daddr . meta l4proto . th dport . numgen random mod {n} : {ip} daddr . th dport"


def class_rules(family: Family, n: int) -> list[str]:
    """The rules of chain `dnat_N`: one per protocol, because nft accepts a port in a DNAT
    target only after a transport protocol match (the `class` map sends only TCP or UDP here)."""
    ip = _NFT_FAMILY[family]
    return [f"meta l4proto {proto} dnat {ip} to {ip} daddr . meta l4proto . th dport . numgen random mod {n} "
            f"map @{slot_map(n)}" for proto in ("tcp", "udp")]


def _elements(elements: Sequence[str], indent: str = "\t\t") -> list[str]:
    if not elements:  # nft rejects an empty `elements = { }`
        return []
    lines = [f"{indent}elements = {{"]
    lines += [f"{indent}\t{el}," for el in elements[:-1]] + [f"{indent}\t{elements[-1]}"]
    return [*lines, f"{indent}}}"]


def _map(name: str, declaration: str, elements: Sequence[str]) -> list[str]:
    return [f"\tmap {name} {{", f"\t\t{declaration}", *_elements(elements), "\t}"]


def _set(name: str, key_type: str, elements: Sequence[str], *, flags: Sequence[str] = ()) -> list[str]:
    lines = [f"\tset {name} {{", f"\t\ttype {key_type}"]
    lines += [f"\t\t{flag}" for flag in flags]
    return [*lines, *_elements(elements), "\t}"]


def _chain(name: str, rules: Sequence[str], hook: str | None = None) -> list[str]:
    lines = [f"\tchain {name} {{"]
    if hook is not None:
        lines.append(f"\t\t{hook}; policy accept;")
    lines += [f"\t\t{rule}" for rule in rules]
    lines.append("\t}")
    return lines


def key_type(family: Family) -> str:
    return f"{_ADDR_TYPE[family]} . inet_proto . inet_service"


def _table_body(
    family: Family, entries: Sequence[DnatEntry], exempt: Sequence[str] | None
) -> list[str]:
    if not entries:
        return []
    ip = _NFT_FAMILY[family]
    blocks: list[list[str]] = []
    for kind in COUNTER_KINDS:
        blocks.append(_set(kind, key_type(family), [_key(e) for e in entries if kind in e.counters],
                           flags=("counter",)))
    blocks.append(_map(CLASS_MAP, f"type {key_type(family)} : verdict", [class_element(e) for e in entries]))
    by_class: dict[int, list[str]] = {}
    for e in entries:
        by_class.setdefault(dnat_class(e), []).extend(slot_elements(e))
    for n in classes_of(entries):
        blocks.append(_map(slot_map(n), slot_map_declaration(family, n), by_class.get(n, [])))
    mtus = vip_mtus(entries)  # in the entries' order: sorted by VIP
    blocks.append(["\tset mss_clamp {", f"\t\ttypeof {ip} daddr . tcp option maxseg size", "\t\tflags interval",
                   *_elements([mss_elements(v, m)[0] for v, m in mtus.items()]), "\t}"])
    blocks.append(_map("mss", f"typeof {ip} daddr : tcp option maxseg size",
                       [mss_elements(v, m)[1] for v, m in mtus.items()]))
    if exempt is not None:
        vips = list(dict.fromkeys(e.vip for e in entries))  # entries are sorted by VIP
        blocks.append(_set("vips", _ADDR_TYPE[family], vips))
        blocks.append(_set("masquerade_exempt", _ADDR_TYPE[family], exempt, flags=("flags interval",)))
    for name, hook, rule in (*_BASE_CHAINS, *MSS_CHAINS):
        blocks.append(_chain(name, [rule.format(ip=ip)], hook))
    if exempt is not None:
        blocks.append(_chain(
            "postrouting_masquerade",
            [f"ct status dnat ct original {ip} daddr @vips {ip} saddr != @masquerade_exempt masquerade"],
            "type nat hook postrouting priority srcnat",
        ))
    for direction in ("in", "out"):
        rules = [f"{flags}{_KEY[direction].format(ip=ip)} @{kind}"
                 for kind, (d, flags) in _COUNTER_MATCH.items() if d == direction]
        blocks.append(_chain(f"count_{direction}", rules))
    blocks += [_chain(class_chain(n), class_rules(family, n)) for n in classes_of(entries)]
    lines: list[str] = []
    for block in blocks:
        lines += block
    return lines


def table_chains_of_classes(used: Collection[int], *, masquerade: bool) -> list[str]:
    """The chains `render_nft` gives a family's table whose services have these endpoint counts
    (none when the table holds no service)."""
    if not used:
        return []
    classes = sorted(set(range(1, FIXED_CLASSES + 1)) | set(used))
    return [*(name for name, _, _ in (*_BASE_CHAINS, *MSS_CHAINS)), *(["postrouting_masquerade"] if masquerade else []),
            "count_in", "count_out", *(class_chain(n) for n in classes)]


def exempt_networks(masquerade_exempt: Sequence[str], family: Family) -> list[str]:
    """The exempt CIDRs of `family`, merged where they overlap (an nft interval set rejects
    overlapping elements) and sorted. Raises ValueError on text that is not a CIDR."""
    networks = [ipaddress.ip_network(c, strict=False) for c in masquerade_exempt]
    if family == 4:
        v4 = [n for n in networks if isinstance(n, ipaddress.IPv4Network)]
        return [str(n) for n in ipaddress.collapse_addresses(v4)]
    v6 = [n for n in networks if isinstance(n, ipaddress.IPv6Network)]
    return [str(n) for n in ipaddress.collapse_addresses(v6)]


def render_nft(services: Sequence[VirtualService], *, masquerade_exempt: Sequence[str] | None = None) -> str:
    """`nft -f` text replacing `table ip kube2ipvs` and `table ip6 kube2ipvs` in one transaction.

    `masquerade_exempt=None` (the default) keeps client addresses; a sequence (possibly empty)
    turns on masquerading of VIP traffic from every source outside those CIDRs.
    """
    return render_entries(dnat_entries(services), masquerade_exempt=masquerade_exempt)


def render_entries(entries: Sequence[DnatEntry], *, masquerade_exempt: Sequence[str] | None = None) -> str:
    """`render_nft` of entries already built with `dnat_entries` (callers that need both)."""
    lines: list[str] = []
    for family in FAMILIES:
        exempt = None if masquerade_exempt is None else exempt_networks(masquerade_exempt, family)
        head = f"table {_NFT_FAMILY[family]} {TABLE}"
        lines += [head, f"delete {head}", head + " {"]
        lines += _table_body(family, [e for e in entries if e.family == family], exempt)
        lines.append("}")
    return "\n".join(lines) + "\n"
