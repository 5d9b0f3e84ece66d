"""A realserver's rules as `nft -f` text: one owned table per family. Pure.

Input is one node's slice of the cluster state (`ClusterState.for_node`): each virtual service
carries that node's backend, whose endpoints are the local pods. The text always holds both
`table ip kube2ipvs` and `table ip6 kube2ipvs`, each as `table` / `delete table` / `table {...}`,
so one `nft -f` run replaces both atomically whatever was there before (the first line makes the
delete succeed when the table is absent). Replacing the table keeps established connections:
their NAT bindings live in conntrack, not in the rules. It does reset the counters.

Inside a table (empty when the family has no service with a local endpoint):

    counter svc_<vip>_<port>_<proto>_<kind>      one per kind of `counter_names`
    map services    VIP . l4proto . port : goto svc_<vip>_<port>_<proto>
    map pkts_in, pkts_out, syn_in, synack_out, fin_in, fin_out, rst_in, rst_out
                    VIP . l4proto . port : counter name (flag maps hold TCP services only)
    chain prerouting_dnat   nat prerouting (dstnat)   remote clients: vmap @services
    chain output_dnat       nat output (-100)         local clients:  vmap @services
    chain svc_<...>         dnat to the local endpoints, each in turn (numgen inc) when several
    chain prerouting_count  filter prerouting (raw)   client -> VIP, before conntrack and DNAT,
    chain output_count      filter output (raw)       so the destination is still the VIP
    chain postrouting_count filter postrouting (300)  VIP -> client, after the reply was
    chain input_count       filter input (300)        un-DNATed (srcnat 100), so its source is the VIP
    chain count_in, count_out   the counting rules both pairs of hooks jump to

With `masquerade_exempt`, also `set vips`, `set masquerade_exempt` and a nat postrouting chain
that masquerades connections DNATed from a VIP unless their source is exempt. It matches the
connection's conntrack status and original destination, never a packet mark: the original
system borrowed a mark bit Calico also uses, and connections were reset.

Names are those of `kube2ipvs.names` (readable, derived from VIP, port and protocol only).
Everything is sorted by VIP, port and protocol, and endpoints by address and port, so the text
does not depend on the order of the input.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, TypeAlias

from kube2ipvs.lbconfig import Family, Protocol
from kube2ipvs.model import PodEndpoint, VirtualService, hostport
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
_DNAT: Final = "{ip} daddr . meta l4proto . th dport vmap @services"
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


def dnat_entries(services: Iterable[VirtualService]) -> tuple[DnatEntry, ...]:
    """The services to DNAT, merged by identity, canonical and sorted.

    The endpoints of every backend given count (a node's slice has one backend). An endpoint of
    the other family cannot be DNATed to and is left out; a service left without endpoints is
    left out too. Raises ValueError on a string that is not an IP address (the model never
    holds one), so no text of the input reaches the output unparsed.
    """
    merged: dict[tuple[_IP, int, Protocol], set[tuple[_IP, int]]] = {}
    for vs in services:
        vip = ipaddress.ip_address(vs.vip)
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
            nft_service_name(text, port, protocol), service_counter_names(text, port, protocol),
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


def _dnat_rules(e: DnatEntry) -> list[str]:
    """Endpoint i of n is taken by a rule holding its own `numgen inc mod (n - i)`, which sees
    only the connections the rules before it let through and takes every (n - i)th of them:
    each endpoint gets exactly its turn, 1/n of the connections, without a set per service.
    (One anonymous `numgen ... map { }` per service is what one would write first, but the
    kernel's cost of adding anonymous sets grows quadratically with their number: measured on
    nft 1.0.6 / Linux 6.18, 2,000 services loaded in 0.8 s, 4,000 in 2.4 s (mostly system
    time) and 10,000 with their counters in about 100 s, against about 4 s this way.)"""
    # The L4 match is what lets nft accept a port in the DNAT target; the vmap only sends this
    # protocol here, so it always matches. NAT rules see only a connection's first packet, so
    # `inc` counts connections.
    n = len(e.endpoints)
    rules = []
    for i, ep in enumerate(e.endpoints):
        turn = f"numgen inc mod {n - i} == 0 " if i < n - 1 else ""
        rules.append(f"meta l4proto {e.protocol} {turn}dnat {_NFT_FAMILY[e.family]} to {hostport(ep.address, ep.port)}")
    return rules


def _map(name: str, key_type: str, value_type: str, elements: Sequence[str]) -> list[str]:
    lines = [f"\tmap {name} {{", f"\t\ttype {key_type} : {value_type}"]
    if elements:  # nft rejects an empty `elements = { }`
        lines.append("\t\telements = {")
        lines += [f"\t\t\t{el}," for el in elements[:-1]] + [f"\t\t\t{elements[-1]}"]
        lines.append("\t\t}")
    lines.append("\t}")
    return lines


def _set(name: str, key_type: str, elements: Sequence[str], *, interval: bool = False) -> list[str]:
    lines = [f"\tset {name} {{", f"\t\ttype {key_type}"]
    if interval:
        lines.append("\t\tflags interval")
    if elements:
        lines.append("\t\telements = { " + ", ".join(elements) + " }")
    lines.append("\t}")
    return lines


def _chain(name: str, rules: Sequence[str], hook: str | None = None) -> list[str]:
    lines = [f"\tchain {name} {{"]
    if hook is not None:
        lines.append(f"\t\t{hook}; policy accept;")
    lines += [f"\t\t{rule}" for rule in rules]
    lines.append("\t}")
    return lines


def _table_body(
    family: Family, entries: Sequence[DnatEntry], exempt: Sequence[str] | None
) -> list[str]:
    if not entries:
        return []
    ip = _NFT_FAMILY[family]
    key_type = f"{_ADDR_TYPE[family]} . inet_proto . inet_service"
    blocks: list[list[str]] = []
    for e in entries:
        blocks += [[f"\tcounter {name} {{ }}"] for name in e.counters.values()]
    blocks.append(_map("services", key_type, "verdict", [f"{_key(e)} : goto {e.name}" for e in entries]))
    for kind in COUNTER_KINDS:
        elements = [f'{_key(e)} : "{e.counters[kind]}"' for e in entries if kind in e.counters]
        blocks.append(_map(kind, key_type, "counter", elements))
    if exempt is not None:
        vips = list(dict.fromkeys(e.vip for e in entries))  # entries are sorted by VIP
        blocks.append(_set("vips", _ADDR_TYPE[family], vips))
        blocks.append(_set("masquerade_exempt", _ADDR_TYPE[family], exempt, interval=True))
    for name, hook, rule in _BASE_CHAINS:
        blocks.append(_chain(name, [rule.format(ip=ip)], hook))
    if exempt is not None:
        blocks.append(_chain(
            "postrouting_masquerade",
            [f"ct status dnat ct original {ip} daddr @vips {ip} saddr != @masquerade_exempt masquerade"],
            "type nat hook postrouting priority srcnat",
        ))
    for direction in ("in", "out"):
        rules = [
            f"{flags}counter name {_KEY[direction].format(ip=ip)} map @{kind}"
            for kind, (d, flags) in _COUNTER_MATCH.items() if d == direction
        ]
        blocks.append(_chain(f"count_{direction}", rules))
    blocks += [_chain(e.name, _dnat_rules(e)) for e in entries]
    lines: list[str] = []
    for block in blocks:
        lines += block
    return lines


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
    entries = dnat_entries(services)
    lines: list[str] = []
    for family in FAMILIES:
        exempt = None if masquerade_exempt is None else exempt_networks(masquerade_exempt, family)
        head = f"table {_NFT_FAMILY[family]} {TABLE}"
        lines += [head, f"delete {head}", head + " {"]
        lines += _table_body(family, [e for e in entries if e.family == family], exempt)
        lines.append("}")
    return "\n".join(lines) + "\n"
