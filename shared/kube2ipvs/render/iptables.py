"""A realserver's rules as iptables-save text, for hosts and operators still on iptables. Pure.

The same rules as `render_nft` (see there for what each part is for), in two documents: an IPv4
one for `iptables-restore`, then an IPv6 one for `ip6tables-restore`, each introduced by a
comment line. Each document holds the raw, mangle and nat tables with their built-in chains, so
restoring it replaces those tables whole; where other software keeps rules in them, restore the
`K2I-*` chains with `--noflush` and keep the jumps from the built-in chains in place yourself.

    *raw     K2I-COUNT-IN   (from PREROUTING, OUTPUT) client -> VIP, before conntrack and DNAT
    *mangle  K2I-COUNT-OUT  (from POSTROUTING, INPUT) VIP -> client replies
    *nat     K2I-SERVICES   (from PREROUTING, OUTPUT) VIP:port -> K2I-SVC-<hash>
             K2I-SVC-<hash> DNAT to the local endpoints, kube-proxy's `statistic random` cascade
             K2I-POSTROUTING (with masquerade_exempt) RETURN for exempt sources, then MASQUERADE
    *mangle  K2I-MSS        (from PREROUTING, when a VIP has an MTU) TCPMSS clamping, as in nft

`K2I-SVC-` names carry a hash of the service identity (`kube2ipvs.names.iptables_chain_name`:
iptables allows 28 characters); the jump to each carries the readable nft name as a comment.
Tables, chains, rules, comments and probabilities are written the way iptables-save prints
them, so what the kernel dumps back compares equal, table by table, to this text.

Counting rules have no target: the kernel's per-rule counters are the counters, and each rule's
comment is the nft counter name of the same kind (`kube2ipvs.names.service_counter_names`), so
`iptables-save -c` reads like `nft list counters`. The mangle hooks run before the reply is
un-DNATed (that happens at srcnat, and no iptables table hooks later), so outbound packets are
recognized by their connection's original destination rather than by their source address.
Masquerading matches the conntrack DNAT status and original destination, never a mark.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Final

from kube2ipvs.lbconfig import Family
from kube2ipvs.model import VirtualService, hostport
from kube2ipvs.names import iptables_service_chain
from kube2ipvs.render.nft import FAMILIES, DnatEntry, dnat_entries, exempt_networks, mss_of, vip_mtus

COUNT_IN: Final = "K2I-COUNT-IN"
COUNT_OUT: Final = "K2I-COUNT-OUT"
SERVICES: Final = "K2I-SERVICES"
POSTROUTING: Final = "K2I-POSTROUTING"
MSS: Final = "K2I-MSS"

_BUILTIN: Final[dict[str, tuple[str, ...]]] = {
    "raw": ("PREROUTING", "OUTPUT"),
    "mangle": ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"),
    "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
}
_HEADER: Final[dict[Family, str]] = {
    4: "# kube2ipvs IPv4 rules: iptables-restore input",
    6: "# kube2ipvs IPv6 rules: ip6tables-restore input",
}
_TCP_FLAGS: Final[dict[str, str]] = {
    "pkts_in": "", "pkts_out": "",
    "syn_in": " --tcp-flags SYN,ACK SYN", "synack_out": " --tcp-flags SYN,ACK SYN,ACK",
    "fin_in": " --tcp-flags FIN FIN", "fin_out": " --tcp-flags FIN FIN",
    "rst_in": " --tcp-flags RST RST", "rst_out": " --tcp-flags RST RST",
}


def _host(address: str) -> str:
    return f"{address}/{128 if ':' in address else 32}"


def probability(n: int) -> str:
    """`--probability` for the first of `n` remaining endpoints, as iptables-save prints it.

    xt_statistic stores the probability as a 31-bit fraction (rounded like C's lround) and
    prints it with 11 decimals, so the rendering uses that stored value and reads back
    unchanged from `iptables-save`.
    """
    stored = math.floor(0x80000000 / n + 0.5)
    return f"{stored / 0x80000000:.11f}"


def _comment(text: str) -> str:
    # iptables-save quotes a comment unless it is all [A-Za-z0-9_-]; do the same so that the
    # rendering and the kernel's dump are the same text.
    if text and all(c.isascii() and (c.isalnum() or c in "_-") for c in text):
        return f"-m comment --comment {text}"
    return f'-m comment --comment "{text}"'


def _count_rules(e: DnatEntry) -> tuple[list[str], list[str]]:
    match_in = f"-d {_host(e.vip)} -p {e.protocol} -m {e.protocol} --dport {e.port}"
    # conntrack prints a full-length mask as a bare address, so the dump reads the same.
    origin = f"-m conntrack --ctorigdst {e.vip} --ctorigdstport {e.port} --ctdir REPLY"
    rules_in: list[str] = []
    rules_out: list[str] = []
    for kind, name in e.counters.items():
        flags = _TCP_FLAGS[kind]
        if kind.endswith("_in"):
            rules_in.append(f"-A {COUNT_IN} {match_in}{flags} {_comment(name)}")
        else:
            tcp = f" -m tcp{flags}" if flags else ""
            rules_out.append(f"-A {COUNT_OUT} -p {e.protocol}{tcp} {origin} {_comment(name)}")
    return rules_in, rules_out


def _dnat_rules(e: DnatEntry, chain: str) -> list[str]:
    rules = []
    n = len(e.endpoints)
    for i, ep in enumerate(e.endpoints):
        # The cascade picks endpoint i with probability 1/(n-i) among those left, so each of
        # the n gets 1/n of the new connections; the last one takes whatever is left.
        pick = f" -m statistic --mode random --probability {probability(n - i)}" if i < n - 1 else ""
        rules.append(f"-A {chain} -p {e.protocol}{pick} -j DNAT --to-destination {hostport(ep.address, ep.port)}")
    return rules


def _table(name: str, rules: Mapping[str, Sequence[str]]) -> list[str]:
    """One table as iptables-save prints it: built-in chains in hook order, then ours sorted
    by name, then every chain's rules in that same chain order."""
    chains = [*_BUILTIN[name], *sorted(c for c in rules if c not in _BUILTIN[name])]
    lines = [f"*{name}"]
    lines += [f":{c} ACCEPT [0:0]" if c in _BUILTIN[name] else f":{c} - [0:0]" for c in chains]
    for c in chains:
        lines += rules.get(c, ())
    lines.append("COMMIT")
    return lines


def _document(family: Family, entries: Sequence[DnatEntry], exempt: Sequence[str] | None) -> list[str]:
    lines = [_HEADER[family]]
    if not entries:
        return lines + [line for table in _BUILTIN for line in _table(table, {})]
    raw: dict[str, list[str]] = {"PREROUTING": [f"-A PREROUTING -j {COUNT_IN}"],
                                 "OUTPUT": [f"-A OUTPUT -j {COUNT_IN}"], COUNT_IN: []}
    mangle: dict[str, list[str]] = {"INPUT": [f"-A INPUT -j {COUNT_OUT}"],
                                    "POSTROUTING": [f"-A POSTROUTING -j {COUNT_OUT}"], COUNT_OUT: []}
    nat: dict[str, list[str]] = {"PREROUTING": [f"-A PREROUTING -j {SERVICES}"],
                                 "OUTPUT": [f"-A OUTPUT -j {SERVICES}"], SERVICES: []}
    for e in entries:
        rules_in, rules_out = _count_rules(e)
        raw[COUNT_IN] += rules_in
        mangle[COUNT_OUT] += rules_out
        chain = iptables_service_chain(e.vip, e.port, e.protocol)
        nat[SERVICES].append(f"-A {SERVICES} -d {_host(e.vip)} -p {e.protocol} -m {e.protocol} --dport {e.port}"
                             f" {_comment(e.name)} -j {chain}")
        nat[chain] = _dnat_rules(e, chain)
    if mtus := vip_mtus(entries):
        # Per-VIP MTU as MSS clamping (see render_nft): at mangle PREROUTING the client's SYN still
        # goes to the VIP, and the pod's SYN-ACK is a reply of a connection to it.
        mangle["PREROUTING"] = [f"-A PREROUTING -j {MSS}"]
        mangle[MSS] = []
        for vip, mtu in mtus.items():
            mss = mss_of(vip, mtu)
            clamp = f"-m tcpmss --mss {mss + 1}:65535 -j TCPMSS --set-mss {mss}"
            mangle[MSS] += [
                f"-A {MSS} -d {_host(vip)} -p tcp -m tcp --tcp-flags SYN,RST SYN {clamp}",
                f"-A {MSS} -p tcp -m tcp --tcp-flags SYN,RST,ACK SYN,ACK -m conntrack --ctorigdst {vip} "
                f"--ctdir REPLY {clamp}",
            ]
    if exempt is not None:
        nat["POSTROUTING"] = [f"-A POSTROUTING -j {POSTROUTING}"]
        vips = list(dict.fromkeys(e.vip for e in entries))  # entries are sorted by VIP
        nat[POSTROUTING] = [
            *(f"-A {POSTROUTING} -s {cidr} -j RETURN" for cidr in exempt),
            *(f"-A {POSTROUTING} -m conntrack --ctstate DNAT --ctorigdst {v} -j MASQUERADE" for v in vips),
        ]
    return lines + _table("raw", raw) + _table("mangle", mangle) + _table("nat", nat)


def render_iptables(
    services: Sequence[VirtualService], *, masquerade_exempt: Sequence[str] | None = None
) -> str:
    """iptables-save text of the realserver rules: the IPv4 document, then the IPv6 one.

    `masquerade_exempt` as for `render_nft`: None keeps client addresses; a sequence (possibly
    empty) masquerades VIP traffic from every source outside those CIDRs.
    """
    entries = dnat_entries(services)
    lines: list[str] = []
    for family in FAMILIES:
        exempt = None if masquerade_exempt is None else exempt_networks(masquerade_exempt, family)
        lines += _document(family, [e for e in entries if e.family == family], exempt)
    return "\n".join(lines) + "\n"
