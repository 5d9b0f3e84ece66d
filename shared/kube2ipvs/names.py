"""Deterministic names for what kube2ipvs creates in the kernel. Pure.

A virtual service's identity is its VIP, port and protocol; every name below is a function of
that identity alone, so the same service gets the same chain and counter names on every node
and across restarts, and anyone holding the identity (the realserver reading its counters, an
operator with `nft list counters`) can compute the name without looking anything up.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
from typing import Final

# Kinds of kernel counter kept per VIP:port/protocol, in a fixed order. UDP has no flags, so only
# the packet (and byte) counters.
COUNTER_KINDS: Final = ("pkts_in", "pkts_out", "syn_in", "synack_out", "fin_in", "fin_out", "rst_in", "rst_out")
UDP_COUNTER_KINDS: Final = ("pkts_in", "pkts_out")

# The kernel's NFT_NAME_MAXLEN (tables, chains, sets, objects) is 256 including the NUL.
NFT_NAME_MAX: Final = 255
# iptables chain names: XT_EXTENSION_MAXNAMELEN (29) minus the NUL; `iptables -N` rejects longer.
IPTABLES_CHAIN_MAX: Final = 28
HASH_CHARS: Final = 16


def service_identity(vip: str, port: int, protocol: str) -> str:
    """`192.0.2.10:8080/tcp`, `[2001:db8::10]:80/tcp`: the text hashed into short names.

    The address is canonicalized first so that `2001:DB8::10` and `2001:db8::10` are one service.
    """
    ip = ipaddress.ip_address(vip)
    host = f"[{ip}]" if ip.version == 6 else str(ip)
    return f"{host}:{port}/{protocol}"


def nft_service_name(vip: str, port: int, protocol: str) -> str:
    """`svc_192.0.2.10_8080_tcp`, `svc_2001-db8--10_80_tcp`: readable, unhashed.

    nft identifiers must start with a letter and may hold `[A-Za-z0-9_./-]`; a `:` followed by
    digits breaks the parser, so IPv6 colons become `-` (unambiguous: a canonical IPv6 address
    holds no `-`). Length budget, against NFT_NAME_MAX = 255: `svc_` 4 + address ≤ 45 (the
    longest IPv6 text form) + `_65535` 6 + `_tcp` 4 = 59, plus ≤ 11 for a counter suffix
    (`_synack_out`) = 70.
    """
    address = str(ipaddress.ip_address(vip)).replace(":", "-")
    return f"svc_{address}_{port}_{protocol}"


def service_counter_names(vip: str, port: int, protocol: str) -> dict[str, str]:
    """Counter kind -> name, e.g. `syn_in` -> `svc_192.0.2.10_8080_tcp_syn_in`. UDP: packets only."""
    base = nft_service_name(vip, port, protocol)
    kinds = COUNTER_KINDS if protocol == "tcp" else UDP_COUNTER_KINDS
    return {kind: f"{base}_{kind}" for kind in kinds}


def short_hash(identity: str, chars: int = HASH_CHARS) -> str:
    """The first `chars` base32 characters (A-Z, 2-7) of sha256(identity).

    16 characters carry 80 bits: a collision among even a million services has a probability
    around 1e-12, and the alphabet is valid in iptables chain names and nft identifiers.
    """
    digest = hashlib.sha256(identity.encode()).digest()
    return base64.b32encode(digest).decode()[:chars]


def iptables_chain_name(prefix: str, identity: str) -> str:
    """`prefix` + 16-character hash of `identity`, e.g. `K2I-SVC-` + `MZXW6YTBOI2DKNZQ`.

    Budget, against IPTABLES_CHAIN_MAX = 28: the hash takes 16, leaving 12 for the prefix
    (`K2I-SVC-` uses 8). A longer prefix is a programming error and raises ValueError rather
    than producing a name iptables would reject at load time.
    """
    name = prefix + short_hash(identity)
    if len(name) > IPTABLES_CHAIN_MAX:
        raise ValueError(f"iptables chain name {name!r} is longer than {IPTABLES_CHAIN_MAX} characters")
    return name


def iptables_service_chain(vip: str, port: int, protocol: str) -> str:
    """The per-service DNAT chain, `K2I-SVC-` + hash of service_identity (24 characters)."""
    return iptables_chain_name("K2I-SVC-", service_identity(vip, port, protocol))
