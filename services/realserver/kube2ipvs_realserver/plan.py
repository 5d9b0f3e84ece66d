"""What the realserver wants in its node's kernel, and the ops that get it there. Pure.

`desired_state(slice, settings)` turns the node's slice into three things: the VIP addresses
(/32, /128) to hold on the VIP device, the `nft -f` text of the owned table (`render_nft`), and
the ARP sysctls direct routing needs. `plan(desired, observed)` compares that with what the
kernel adapter observed and returns the ops, in the order they must run:

    set sysctls      first, so a VIP never sits on lo while the node still answers ARP for it
    replace table    one `nft -f` transaction, only when the text differs from what was last
                     applied or the kernel's table no longer has the chains that text makes;
                     a delta from the last applied state when the kernel still holds it
    add addresses    ours that are missing
    delete addresses ours that are no longer wanted (never one we did not add)

The nft check is deliberately cheap: the adapter remembers the digest of the text it last
applied and lists the table's chains; a rule edited inside a chain is not seen (a full
`nft -j list table` would cost hundreds of ms at 10,000 services, every resync).
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, TypeAlias

from kube2ipvs.model import VirtualService
from kube2ipvs.protocol import NodeSlice
from kube2ipvs.render.nft import render_nft
from kube2ipvs.render.nftdelta import render_nft_delta

SysctlKey: TypeAlias = tuple[str, str]  # (device, name) under net/ipv4/conf
NftChains: TypeAlias = frozenset[tuple[str, str]]  # (nft family, chain name) of our tables

OWNED_TABLE: Final = "kube2ipvs"
NFT_FAMILIES: Final = ("ip", "ip6")
_TABLE_RE: Final = re.compile(r"^table (ip6?) kube2ipvs \{\n(.*?)^\}$", re.M | re.S)
_CHAIN_RE: Final = re.compile(r"^\tchain (\S+) \{$", re.M)


@dataclass(frozen=True, slots=True)
class Settings:
    device: str = "lo"
    interface: str | None = None  # the primary interface; None: lo only
    arp_ignore: int = 1
    arp_announce: int = 2
    masquerade_exempt: tuple[str, ...] | None = None  # None: no masquerade, client IPs kept
    # IPIP mode (forwarding "i"): the director's packets arrive decapsulated on this device with
    # the client as source, which strict reverse-path filtering drops (the route back to the
    # client is not through the tunnel). The effective value is max(all, device), so loose (2)
    # on the tunnel device alone is enough, whatever `all` holds.
    tunnel_device: str = "tunl0"
    tunnel_rp_filter: int = 2


@dataclass(frozen=True, slots=True)
class NftTables:
    """Our tables as the kernel shows them: their chains, and the families that have any."""

    tables: frozenset[str] = frozenset()  # nft families whose `kube2ipvs` table has chains
    chains: NftChains = frozenset()


@dataclass(frozen=True, slots=True)
class Desired:
    vips: frozenset[str]  # canonical addresses (ipaddress str), /32 or /128 by family
    nft: str
    sysctls: Mapping[SysctlKey, int]
    services: tuple[VirtualService, ...]
    skipped: tuple[str, ...] = ()  # services left out, with the reason
    # Derived from `nft` once here, not in every resync's plan: parsing 10 MB of text for its
    # chains takes about 0.3 s at 10,000 services.
    nft_digest: str = ""
    nft_tables: NftTables = field(default_factory=NftTables)
    masquerade_exempt: tuple[str, ...] | None = None  # what `nft` was rendered with


@dataclass(frozen=True, slots=True)
class Observed:
    ours: frozenset[str]  # VIP addresses on the device that carry our mark
    foreign: frozenset[str]  # every other address on the device (never touched)
    nft_digest: str | None  # digest of the text we last applied; None: none recorded
    nft: NftTables = field(default_factory=NftTables)
    sysctls: Mapping[SysctlKey, int | None] = field(default_factory=dict)  # None: no such device


@dataclass(frozen=True, slots=True)
class SetSysctl:
    key: SysctlKey
    value: int


@dataclass(frozen=True, slots=True)
class ReplaceTable:
    """Make our tables hold `text`. With `delta`, the kernel is believed to hold the text last
    applied, and `delta` (one transaction, `render_nft_delta`) turns it into `text` touching only
    what changed, keeping the other services' counters; the adapter falls back to `text` when
    the kernel refuses the delta."""

    text: str
    delta: str | None = None


@dataclass(frozen=True, slots=True)
class DeleteTables:
    """Delete our tables in both families (`--cleanup`)."""


@dataclass(frozen=True, slots=True)
class AddAddress:
    address: str
    prefixlen: int


@dataclass(frozen=True, slots=True)
class DeleteAddress:
    address: str
    prefixlen: int


Op: TypeAlias = SetSysctl | ReplaceTable | DeleteTables | AddAddress | DeleteAddress


def nft_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def host_prefixlen(address: str) -> int:
    return 128 if ":" in address else 32


def expected_tables(text: str) -> NftTables:
    """The chains loading `text` (as `render_nft` writes it) leaves in the kernel, and the
    families whose table has any. The adapter sees tables only through their chains (the cheap
    read), so an empty table counts as absent on both sides."""
    chains: set[tuple[str, str]] = set()
    for m in _TABLE_RE.finditer(text):
        chains.update((m[1], name) for name in _CHAIN_RE.findall(m[2]))
    return NftTables(frozenset(f for f, _ in chains), frozenset(chains))


def desired_sysctls(settings: Settings, *, ipip: bool = False) -> dict[SysctlKey, int]:
    devices = dict.fromkeys([settings.device, "lo", *([settings.interface] if settings.interface else [])])
    wanted = {(dev, name): value for dev in devices
              for name, value in (("arp_ignore", settings.arp_ignore), ("arp_announce", settings.arp_announce))}
    if ipip:
        wanted[(settings.tunnel_device, "rp_filter")] = settings.tunnel_rp_filter
    return wanted


def _checked(services: Sequence[VirtualService]) -> tuple[list[VirtualService], list[str]]:
    """The services whose VIP is an address of the family they claim; the others, with why."""
    good, skipped = [], []
    for vs in services:
        try:
            vip = ipaddress.ip_address(vs.vip)
        except ValueError:
            skipped.append(f"{vs.vip}:{vs.port}/{vs.protocol}: VIP is not an IP address")
            continue
        if vip.version != vs.family:
            skipped.append(f"{vs.vip}:{vs.port}/{vs.protocol}: VIP is not an IPv{vs.family} address")
            continue
        good.append(vs)
    return good, skipped


def desired_state(node_slice: NodeSlice, settings: Settings) -> Desired:
    """What the kernel should hold for this slice. Never raises on a bad service: it is skipped."""
    services, skipped = _checked(node_slice.services)
    text = render_nft(services, masquerade_exempt=settings.masquerade_exempt)
    # A VIP is held only while some service of it DNATs here: an address without rules would
    # accept the director's packets and answer them with RSTs from the node itself.
    served = {str(ipaddress.ip_address(vs.vip)) for vs in services
              if any(ep for b in vs.backends for ep in b.endpoints)}
    ipip = any(vs.forwarding == "i" for vs in services)
    return Desired(vips=frozenset(served), nft=text, sysctls=desired_sysctls(settings, ipip=ipip),
                   services=tuple(services), skipped=tuple(skipped), nft_digest=nft_digest(text),
                   nft_tables=expected_tables(text), masquerade_exempt=settings.masquerade_exempt)


def wrong_sysctls(desired: Desired, observed: Observed) -> dict[str, str]:
    """`dev/name` -> "want W, have H" for every sysctl (ARP, rp_filter) not at its desired value."""
    return {f"{dev}/{name}": f"want {want}, have {observed.sysctls.get((dev, name))}"
            for (dev, name), want in sorted(desired.sysctls.items()) if observed.sysctls.get((dev, name)) != want}


def _address_order(address: str) -> tuple[int, ipaddress.IPv4Address | ipaddress.IPv6Address]:
    ip = ipaddress.ip_address(address)
    return ip.version, ip


def plan(desired: Desired, observed: Observed, *, applied: Desired | None = None) -> list[Op]:
    """The ops that make `observed` into `desired`; `[]` when they already agree.

    `applied`: what this process last applied successfully. While the kernel still shows it
    (same digest, same chains), the table is changed by a delta from it instead of whole.
    """
    # A device that does not exist (None) cannot be set; health reports it instead.
    ops: list[Op] = [SetSysctl(key, value) for key, value in sorted(desired.sysctls.items())
                     if key in observed.sysctls and observed.sysctls[key] not in (value, None)]
    if observed.nft_digest != desired.nft_digest or observed.nft != desired.nft_tables:
        delta = None
        if applied is not None and observed.nft_digest == applied.nft_digest and observed.nft == applied.nft_tables \
                and applied.masquerade_exempt == desired.masquerade_exempt:
            delta = render_nft_delta(applied.services, desired.services, masquerade_exempt=desired.masquerade_exempt)
        ops.append(ReplaceTable(desired.nft, delta))
    # A desired VIP that someone else already put on the device is left alone: it works as it
    # is, and taking it over would make us delete it later.
    missing = desired.vips - observed.ours - observed.foreign
    ops += [AddAddress(a, host_prefixlen(a)) for a in sorted(missing, key=_address_order)]
    ops += [DeleteAddress(a, host_prefixlen(a)) for a in sorted(observed.ours - desired.vips, key=_address_order)]
    return ops


def cleanup_plan(observed: Observed) -> list[Op]:
    """Remove everything we own: our tables and our addresses (the sysctls stay as they are).

    The tables are deleted even when none was seen: an empty one has no chains to be seen by.
    """
    ops: list[Op] = [DeleteTables()]
    ops += [DeleteAddress(a, host_prefixlen(a)) for a in sorted(observed.ours, key=_address_order)]
    return ops
