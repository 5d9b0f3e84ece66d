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
applied, lists the tables' chains and reads the keys of their `class` maps (which services are
DNATed at all) by a netlink dump; a rule edited inside a chain or a slot element changed by
hand is not seen (a full `nft -j list table` would cost seconds at 10,000 services, every
resync).
"""

from __future__ import annotations

import hashlib
import ipaddress
import itertools
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Final, TypeAlias, TypeVar

from kube2ipvs.lbconfig import canonical_address
from kube2ipvs.model import VirtualService
from kube2ipvs.protocol import NodeSlice
from kube2ipvs.render.nft import TABLE, DnatEntry, dnat_entries, render_entries, table_chains_of_classes
from kube2ipvs.render.nftdelta import EntryKey, entry_order, render_entries_delta

SysctlKey: TypeAlias = tuple[str, str]  # (device, name) under net/ipv4/conf
NftChains: TypeAlias = frozenset[tuple[str, str]]  # (nft family, chain name) of our tables
# (VIP, port, protocol): the keys of the tables' `class` maps, the services DNATed
NftServices: TypeAlias = frozenset[tuple[str, int, str]]

OWNED_TABLE: Final = TABLE
# The table layout `render_nft` writes; part of the content digest, so a state file written for
# another layout (an older realserver's) never passes for the current table.
NFT_LAYOUT: Final = "class-slots-v1"
NFT_FAMILIES: Final = ("ip", "ip6")
_TABLE_RE: Final = re.compile(r"^table (ip6?) kube2ipvs \{\n(.*?)^\}$", re.M | re.S)
_CHAIN_RE: Final = re.compile(r"^\tchain (\S+) \{$", re.M)
_CLASS_MAP_RE: Final = re.compile(r"^\tmap class \{\n(.*?)^\t\}$", re.M | re.S)
_CLASS_ELEMENT_RE: Final = re.compile(r"^\t\t\t(\S+) \. (tcp|udp) \. (\d+) : goto ", re.M)


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
    """Our tables as the kernel shows them: their chains, the families that have any, and the
    services their `class` maps send to a DNAT chain."""

    tables: frozenset[str] = frozenset()  # nft families whose `kube2ipvs` table has chains
    chains: NftChains = frozenset()
    services: NftServices = frozenset()


@dataclass(frozen=True)
class Desired:
    """What the kernel should hold. Built incrementally from the previous one (`desired_state`),
    so a one-endpoint change costs about the same at 10,000 services as at 10: the table's text
    (10 MB at that size, about a second to render) is rendered only when something asks for it,
    a whole load or `/config`."""

    vips: frozenset[str]  # canonical addresses (ipaddress str), /32 or /128 by family
    sysctls: Mapping[SysctlKey, int]
    services: tuple[VirtualService, ...]
    entries: Mapping[EntryKey, DnatEntry]  # what the table DNATs, by identity
    skipped: tuple[str, ...] = ()  # services left out, with the reason
    nft_digest: str = ""  # of the table's content (`content_digest`), kept in the adapter's state file
    nft_tables: NftTables = field(default_factory=NftTables)
    masquerade_exempt: tuple[str, ...] | None = None  # what the table is rendered with
    # For the next incremental build (`desired_state`): every service of the slice by id() (the
    # objects are held here, so their ids stay theirs) with its identity, or None when skipped
    # and the reason; the services of each identity; each entry's hash and their sum.
    members: Mapping[int, tuple[EntryKey | None, VirtualService]] = field(default_factory=dict, repr=False,
                                                                           compare=False)
    skip_reasons: Mapping[int, str] = field(default_factory=dict, repr=False, compare=False)
    groups: Mapping[EntryKey, tuple[VirtualService, ...]] = field(default_factory=dict, repr=False, compare=False)
    entry_hashes: Mapping[EntryKey, int] = field(default_factory=dict, repr=False, compare=False)
    hash_total: int = field(default=0, repr=False, compare=False)
    ipip_services: int = field(default=0, repr=False, compare=False)
    # Entries by (family, number of endpoints), and by VIP: the table's chains and VIPs follow.
    class_counts: Mapping[tuple[int, int], int] = field(default_factory=dict, repr=False, compare=False)
    vip_counts: Mapping[str, int] = field(default_factory=dict, repr=False, compare=False)
    # What changed since the Desired this one was built from (`base`, by serial): the planner
    # then computes the delta from those keys alone.
    serial: int = field(default=0, compare=False)
    base: int | None = field(default=None, compare=False)
    changed: frozenset[EntryKey] = field(default=frozenset(), repr=False, compare=False)

    @cached_property
    def nft(self) -> str:
        """The `nft -f` text of the whole table (`render_nft` of the services)."""
        return render_entries(sorted(self.entries.values(), key=entry_order), masquerade_exempt=self.masquerade_exempt)

    def render(self) -> str:
        return self.nft


@dataclass(frozen=True, slots=True)
class Observed:
    ours: frozenset[str]  # VIP addresses on the device that carry our mark
    foreign: frozenset[str]  # every other address on the device (never touched)
    nft_digest: str | None  # content digest of the table we last applied; None: none recorded
    nft: NftTables = field(default_factory=NftTables)
    sysctls: Mapping[SysctlKey, int | None] = field(default_factory=dict)  # None: no such device


@dataclass(frozen=True, slots=True)
class SetSysctl:
    key: SysctlKey
    value: int


def _no_text() -> str:
    raise ValueError("this ReplaceTable carries no table text")


@dataclass(frozen=True, slots=True)
class ReplaceTable:
    """Make our tables hold the table whose content digest is `digest`. With `delta`, the kernel
    is believed to hold the table last applied, and `delta` (one transaction,
    `render_entries_delta`) turns it into the new one touching only what changed, keeping the
    other services' counters; the adapter falls back to the whole text, `render()`, when the
    kernel refuses the delta. The text is rendered only then (or for a whole load)."""

    digest: str
    delta: str | None = None
    render: Callable[[], str] = field(default=_no_text, compare=False, repr=False)

    @property
    def text(self) -> str:
        return self.render()


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


def host_prefixlen(address: str) -> int:
    return 128 if ":" in address else 32


def expected_tables(text: str) -> NftTables:
    """What loading `text` (as `render_nft` writes it) leaves in the kernel, as the adapter
    reads it back. The adapter sees tables only through their chains (the cheap read), so an
    empty table counts as absent on both sides."""
    chains: set[tuple[str, str]] = set()
    services: set[tuple[str, int, str]] = set()
    for m in _TABLE_RE.finditer(text):
        chains.update((m[1], name) for name in _CHAIN_RE.findall(m[2]))
        if (cls := _CLASS_MAP_RE.search(m[2])) is not None:
            services.update((vip, int(port), proto) for vip, proto, port in _CLASS_ELEMENT_RE.findall(cls[1]))
    return NftTables(frozenset(f for f, _ in chains), frozenset(chains), frozenset(services))


def entries_tables(entries: Mapping[EntryKey, DnatEntry], *, masquerade: bool,
                   class_counts: Mapping[tuple[int, int], int] | None = None) -> NftTables:
    """`expected_tables(render_entries(entries, ...))`, from the entries (no text to parse).
    `class_counts`: the entries by (family, endpoint count), when the caller keeps them."""
    if class_counts is None:
        counted: dict[tuple[int, int], int] = {}
        for e in entries.values():
            counted[(e.family, len(e.endpoints))] = counted.get((e.family, len(e.endpoints)), 0) + 1
        class_counts = counted
    families = {4: "ip", 6: "ip6"}
    sizes: dict[str, set[int]] = {}
    for (family, size), count in class_counts.items():
        if count > 0:
            sizes.setdefault(families[family], set()).add(size)
    chains = frozenset((f, name) for f, used in sizes.items()
                       for name in table_chains_of_classes(used, masquerade=masquerade))
    return NftTables(frozenset(sizes), chains, frozenset(entries))


def desired_sysctls(settings: Settings, *, ipip: bool = False) -> dict[SysctlKey, int]:
    devices = dict.fromkeys([settings.device, "lo", *([settings.interface] if settings.interface else [])])
    wanted = {(dev, name): value for dev in devices
              for name, value in (("arp_ignore", settings.arp_ignore), ("arp_announce", settings.arp_announce))}
    if ipip:
        wanted[(settings.tunnel_device, "rp_filter")] = settings.tunnel_rp_filter
    return wanted


def _entry_hash(e: DnatEntry) -> int:
    text = f"{e.vip} {e.port} {e.protocol} {e.mtu} " + " ".join(f"{ep.address}/{ep.port}" for ep in e.endpoints)
    return int.from_bytes(hashlib.sha256(text.encode()).digest(), "big")


def content_digest(hash_total: int, masquerade_exempt: tuple[str, ...] | None) -> str:
    """The table's identity: a hash of the multiset of its entries (the sum of their hashes, so it
    is updated without sorting anything) and of the masquerade setting; with the layout version,
    so a table of another layout never counts as ours-and-current."""
    total = hash_total % (1 << 256)
    return hashlib.sha256(f"{NFT_LAYOUT} {masquerade_exempt!r} {total:064x}".encode()).hexdigest()


_serials = itertools.count(1)
K = TypeVar("K")


def _bump(counts: dict[K, int], key: K, step: int) -> None:
    left = counts.get(key, 0) + step
    if left:
        counts[key] = left
    else:
        counts.pop(key, None)


def _skip_reason(vs: VirtualService) -> tuple[EntryKey | None, str]:
    vip = canonical_address(vs.vip)
    if vip is None:
        return None, f"{vs.vip}:{vs.port}/{vs.protocol}: VIP is not an IP address"
    if (6 if ":" in vip else 4) != vs.family:
        return None, f"{vs.vip}:{vs.port}/{vs.protocol}: VIP is not an IPv{vs.family} address"
    return (vip, vs.port, vs.protocol), ""


def desired_state(node_slice: NodeSlice, settings: Settings, previous: Desired | None = None) -> Desired:
    """What the kernel should hold for this slice. Never raises on a bad service: it is skipped.

    Built from `previous` (when given and rendered with the same masquerade setting): the
    services of the slice are compared with the previous slice's by identity (the NATS subscriber
    hands unchanged services over as the same objects), and only the identities (VIP, port,
    protocol) of services that came or went get their entries built again. So a one-endpoint
    change costs a few set operations over the services plus the work of that one service.
    """
    base = previous if previous is not None and previous.masquerade_exempt == settings.masquerade_exempt else None
    members = dict(base.members) if base is not None else {}
    skips = dict(base.skip_reasons) if base is not None else {}
    groups = dict(base.groups) if base is not None else {}
    entries = dict(base.entries) if base is not None else {}
    hashes = dict(base.entry_hashes) if base is not None else {}
    total = base.hash_total if base is not None else 0
    ipip = base.ipip_services if base is not None else 0
    classes = dict(base.class_counts) if base is not None else {}
    vips = dict(base.vip_counts) if base is not None else {}

    def count(e: DnatEntry, step: int) -> None:
        _bump(classes, (e.family, len(e.endpoints)), step)
        _bump(vips, e.vip, step)

    incoming = {id(vs): vs for vs in node_slice.services}
    gone = [i for i in members if i not in incoming]
    came = [vs for i, vs in incoming.items() if i not in members]
    affected: dict[EntryKey, list[VirtualService]] = {}
    gone_ids = set(gone)
    for i in gone:
        key, vs = members.pop(i)
        skips.pop(i, None)
        ipip -= vs.forwarding == "i"
        if key is not None:
            affected.setdefault(key, [])
    for vs in came:
        key, reason = _skip_reason(vs)
        members[id(vs)] = (key, vs)
        if key is None:
            skips[id(vs)] = reason
            continue
        ipip += vs.forwarding == "i"
        affected.setdefault(key, []).append(vs)
    for key, arriving in affected.items():
        group = tuple(vs for vs in groups.get(key, ()) if id(vs) not in gone_ids) + tuple(arriving)
        if group:
            groups[key] = group
        else:
            groups.pop(key, None)
        total -= hashes.pop(key, 0)
        if (old := entries.pop(key, None)) is not None:
            count(old, -1)
        for e in dnat_entries(group):  # one entry, or none when no endpoint is of the VIP's family
            entries[key], hashes[key] = e, _entry_hash(e)
            total += hashes[key]
            count(e, +1)
    services = tuple(node_slice.services) if not skips else \
        tuple(vs for vs in node_slice.services if members[id(vs)][0] is not None)
    # A VIP is held only while some service of it DNATs here: an address without rules would
    # accept the director's packets and answer them with RSTs from the node itself.
    served = base.vips if base is not None and not affected else frozenset(vips)
    tables = base.nft_tables if base is not None and not affected else \
        entries_tables(entries, masquerade=settings.masquerade_exempt is not None, class_counts=classes)
    return Desired(
        vips=served, sysctls=desired_sysctls(settings, ipip=ipip > 0), services=services, entries=entries,
        skipped=tuple(skips.values()), nft_digest=content_digest(total, settings.masquerade_exempt),
        nft_tables=tables, masquerade_exempt=settings.masquerade_exempt, members=members, skip_reasons=skips,
        groups=groups, entry_hashes=hashes, hash_total=total, ipip_services=ipip, class_counts=classes,
        vip_counts=vips, serial=next(_serials),
        base=base.serial if base is not None else None, changed=frozenset(affected),
    )


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
        still_applied = applied is not None and observed.nft_digest == applied.nft_digest \
            and observed.nft == applied.nft_tables and applied.masquerade_exempt == desired.masquerade_exempt
        if applied is not None and still_applied:
            changed = desired.changed if desired.base == applied.serial else None  # None: compare every key
            delta = render_entries_delta(applied.entries, desired.entries, masquerade_exempt=desired.masquerade_exempt,
                                         changed=changed)
        ops.append(ReplaceTable(desired.nft_digest, delta, desired.render))
    # A desired VIP that someone else already put on the device is left alone: it works as it
    # is, and taking it over would make us delete it later.
    missing = desired.vips - observed.ours - observed.foreign
    ops += [AddAddress(a, host_prefixlen(a)) for a in sorted(missing, key=_address_order)]
    ops += [DeleteAddress(a, host_prefixlen(a)) for a in sorted(observed.ours - desired.vips, key=_address_order)]
    return ops


def observed_after(observed: Observed, ops: Iterable[Op], desired: Desired) -> Observed:
    """What observing the kernel again would show after `ops` (planned for `desired`) all
    succeeded; saves a second read of the kernel on the path of each change."""
    ours, sysctls = set(observed.ours), dict(observed.sysctls)
    nft_digest, nft = observed.nft_digest, observed.nft
    for op in ops:
        if isinstance(op, SetSysctl):
            sysctls[op.key] = op.value
        elif isinstance(op, ReplaceTable):
            nft_digest, nft = op.digest, desired.nft_tables
        elif isinstance(op, DeleteTables):
            nft_digest, nft = None, NftTables()
        elif isinstance(op, AddAddress):
            ours.add(op.address)
        else:
            ours.discard(op.address)
    return replace(observed, ours=frozenset(ours), nft_digest=nft_digest, nft=nft, sysctls=sysctls)


def cleanup_plan(observed: Observed) -> list[Op]:
    """Remove everything we own: our tables and our addresses (the sysctls stay as they are).

    The tables are deleted even when none was seen: an empty one has no chains to be seen by.
    """
    ops: list[Op] = [DeleteTables()]
    ops += [DeleteAddress(a, host_prefixlen(a)) for a in sorted(observed.ours, key=_address_order)]
    return ops
