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
from collections.abc import Callable, ItemsView, Iterable, Iterator, KeysView, Mapping, Sequence, ValuesView
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any, Final, TypeAlias, TypeVar

from kube2ipvs.chunked import Chunked
from kube2ipvs.lbconfig import canonical_address
from kube2ipvs.model import VirtualService
from kube2ipvs.protocol import NodeSlice
from kube2ipvs.render.nft import TABLE, DnatEntry, dnat_entries, render_entries, table_chains_of_classes
from kube2ipvs.render.nftdelta import EntryKey, entry_order, render_entries_delta

SysctlKey: TypeAlias = tuple[str, str]  # (device, name) under net/ipv4/conf
NftChains: TypeAlias = frozenset[tuple[str, str]]  # (nft family, chain name) of our tables
# (VIP, port, protocol): the keys of the tables' `class` maps, the services DNATed
NftServices: TypeAlias = AbstractSet[tuple[str, int, str]]

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


_KEY_BUCKETS: Final = 256


class EntryKeys(AbstractSet[EntryKey]):
    """The keys of a Desired's entries (its `class` maps' keys, `NftTables.services`) as a set
    that the next build shares but for the buckets its added or removed keys fall in: each
    bucket a frozenset of about 1/256 of the keys, chosen by hash. A frozenset of them all would
    be a copy of every key whenever a service comes or goes. Equal to any set of the same keys."""

    __slots__ = ("_buckets", "_len")

    def __init__(self, buckets: tuple[frozenset[EntryKey], ...] = (frozenset(),) * _KEY_BUCKETS) -> None:
        self._buckets = buckets
        self._len = sum(map(len, buckets))

    @classmethod
    def of(cls, keys: Iterable[EntryKey]) -> EntryKeys:
        split: list[set[EntryKey]] = [set() for _ in range(_KEY_BUCKETS)]
        for key in keys:
            split[hash(key) % _KEY_BUCKETS].add(key)
        return cls(tuple(map(frozenset, split)))

    def changed(self, added: Iterable[EntryKey], removed: Iterable[EntryKey]) -> EntryKeys:
        """These keys with `added` and without `removed`."""
        touched: dict[int, set[EntryKey]] = {}
        for key in removed:
            b = hash(key) % _KEY_BUCKETS
            touched.setdefault(b, set(self._buckets[b])).discard(key)
        for key in added:
            b = hash(key) % _KEY_BUCKETS
            touched.setdefault(b, set(self._buckets[b])).add(key)
        if not touched:
            return self
        buckets = list(self._buckets)
        for b, keys in touched.items():
            buckets[b] = frozenset(keys)
        return EntryKeys(tuple(buckets))

    @classmethod
    def _from_iterable(cls, it: Iterable[Any]) -> frozenset[Any]:  # what set operators return
        return frozenset(it)

    def __contains__(self, key: object) -> bool:
        try:
            return key in self._buckets[hash(key) % _KEY_BUCKETS]
        except TypeError:  # unhashable: not a key
            return False

    def __iter__(self) -> Iterator[EntryKey]:
        return itertools.chain.from_iterable(self._buckets)

    def __len__(self) -> int:
        return self._len

    def __eq__(self, other: object) -> bool:
        if isinstance(other, EntryKeys):  # bucket by bucket: those the two share compare by identity
            return self._len == other._len and self._buckets == other._buckets
        return super().__eq__(other)

    def __hash__(self) -> int:
        return self._hash()

    def __repr__(self) -> str:
        return f"EntryKeys({sorted(self)!r})"


class StaleDesiredError(RuntimeError):
    """The entries of a Desired were read after a newer Desired was built from it: they are that
    one's now (see Desired)."""


class _Build:
    """The working state of incremental builds (`desired_state`), updated in place by each one
    and owned by the Desired it made last (`owner`: that one's serial; 0 while a build runs).

    Every service of the slice by id() (the objects are held here, so their ids stay theirs)
    with its identity, or None when skipped, and the reason; the services of each identity; the
    entries, each one's hash; the entries by (family, number of endpoints) and by VIP, which the
    table's chains and the VIPs follow; and the set of the entries' keys."""

    __slots__ = ("classes", "entries", "groups", "hashes", "keys", "members", "owner", "skips", "vips")

    def __init__(self) -> None:
        self.owner = 0
        self.members: dict[int, tuple[EntryKey | None, VirtualService]] = {}
        self.skips: dict[int, str] = {}
        self.groups: dict[EntryKey, tuple[VirtualService, ...]] = {}
        self.entries: dict[EntryKey, DnatEntry] = {}
        self.hashes: dict[EntryKey, int] = {}
        self.classes: dict[tuple[int, int], int] = {}
        self.vips: dict[str, int] = {}
        self.keys = EntryKeys()

    def update(self, gone: Iterable[VirtualService], came: Iterable[VirtualService]) -> _Update:
        """Take the services `gone` out and those that `came` in, building again the entries of
        the identities they have."""
        members, skips, groups, entries, hashes = self.members, self.skips, self.groups, self.entries, self.hashes
        out = _Update()
        held_before: dict[str, bool] = {}  # VIPs whose count changed: whether they had any before

        def count(e: DnatEntry, step: int) -> None:
            _bump(self.classes, (e.family, len(e.endpoints)), step)
            held_before.setdefault(e.vip, e.vip in self.vips)
            _bump(self.vips, e.vip, step)

        affected: dict[EntryKey, list[VirtualService]] = {}
        gone_ids = set()
        for vs in gone:
            gone_ids.add(id(vs))
            key, _ = members.pop(id(vs))
            skips.pop(id(vs), None)
            if key is not None:
                out.ipip -= vs.forwarding == "i"
                affected.setdefault(key, [])
        for vs in came:
            key, reason = _skip_reason(vs)
            members[id(vs)] = (key, vs)
            if key is None:
                skips[id(vs)] = reason
                continue
            out.ipip += vs.forwarding == "i"
            affected.setdefault(key, []).append(vs)
        for key, arriving in affected.items():
            group = tuple(vs for vs in groups.get(key, ()) if id(vs) not in gone_ids) + tuple(arriving)
            if group:
                groups[key] = group
            else:
                groups.pop(key, None)
            out.total -= hashes.pop(key, 0)
            out.replaced[key] = old = entries.pop(key, None)
            if old is not None:
                count(old, -1)
            for e in dnat_entries(group):  # one entry, or none when no endpoint is of the VIP's family
                entries[key], hashes[key] = e, _entry_hash(e)
                out.total += hashes[key]
                count(e, +1)
        self.keys = self.keys.changed(
            added=[k for k, old in out.replaced.items() if old is None and k in entries],
            removed=[k for k, old in out.replaced.items() if old is not None and k not in entries])
        out.vips_moved = any((vip in self.vips) != held for vip, held in held_before.items())
        return out


@dataclass(slots=True)
class _Update:
    """What one `_Build.update` changed."""

    replaced: dict[EntryKey, DnatEntry | None] = field(default_factory=dict)  # key -> entry before (None: none)
    total: int = 0  # of the hash total
    ipip: int = 0  # of the count of IPIP services
    vips_moved: bool = False  # whether a VIP came or went


class _Entries(Mapping[EntryKey, DnatEntry]):
    """A Desired's entries: the build state's, read only while that Desired owns it."""

    __slots__ = ("_build", "_serial")

    def __init__(self, build: _Build, serial: int) -> None:
        self._build, self._serial = build, serial

    def _dict(self) -> dict[EntryKey, DnatEntry]:
        if self._build.owner != self._serial:
            raise StaleDesiredError("a newer Desired was built from this one and holds its entries now")
        return self._build.entries

    def __getitem__(self, key: EntryKey) -> DnatEntry:
        return self._dict()[key]

    def get(self, key: EntryKey, default: Any = None) -> Any:  # (Mapping.get's overloads, in short)
        return self._dict().get(key, default)

    def __contains__(self, key: object) -> bool:
        return key in self._dict()

    def __iter__(self) -> Iterator[EntryKey]:
        return iter(self._dict())

    def __len__(self) -> int:
        return len(self._dict())

    def keys(self) -> KeysView[EntryKey]:  # the dict's own views: C-speed iteration for the renderers
        return self._dict().keys()

    def values(self) -> ValuesView[DnatEntry]:
        return self._dict().values()

    def items(self) -> ItemsView[EntryKey, DnatEntry]:
        return self._dict().items()


class _Before(Mapping[EntryKey, DnatEntry]):
    """The entries as they were before a build: its `replaced` ones over the current ones (read
    only while the Desired it made holds them). A key costs a lookup; a pass over them all, a copy
    of the current ones first (a C-speed copy: the pass itself is the cost)."""

    __slots__ = ("_all", "_now", "_replaced")

    def __init__(self, now: _Entries, replaced: Mapping[EntryKey, DnatEntry | None]) -> None:
        self._now, self._replaced = now, replaced
        self._all: dict[EntryKey, DnatEntry] | None = None

    def __getitem__(self, key: EntryKey) -> DnatEntry:
        if key in self._replaced:
            old = self._replaced[key]
            if old is None:
                raise KeyError(key)
            return old
        return self._now[key]

    def _everything(self) -> dict[EntryKey, DnatEntry]:
        if self._all is None:
            everything = dict(self._now._dict())
            for key, old in self._replaced.items():
                if old is None:
                    everything.pop(key, None)
                else:
                    everything[key] = old
            self._all = everything
        return self._all

    def __iter__(self) -> Iterator[EntryKey]:
        return iter(self._everything())

    def __len__(self) -> int:
        return len(self._everything())

    def values(self) -> ValuesView[DnatEntry]:
        return self._everything().values()

    def items(self) -> ItemsView[EntryKey, DnatEntry]:
        return self._everything().items()


@dataclass(frozen=True)
class Desired:
    """What the kernel should hold. Built incrementally from the previous one (`desired_state`),
    so a one-endpoint change costs about the same at 30,000 services as at 10: the build takes
    over the previous one's working state (dicts updated in place, not copied) and records the
    entries it replaced; the table's text (10 MB at 10,000 services, about a second to render)
    is rendered only when something asks for it, a whole load or `/config`.

    Once a newer Desired was built from this one, reading its `entries` (or `nft`, when not
    rendered yet) raises StaleDesiredError: they are the newer one's now. The rest stays valid.
    Its builds run on one thread; readers on others use `nft_from_services`.
    """

    vips: frozenset[str]  # canonical addresses (ipaddress str), /32 or /128 by family
    sysctls: Mapping[SysctlKey, int]
    services: Sequence[VirtualService]  # the slice's (the very sequence when none is skipped)
    skipped: tuple[str, ...] = ()  # services left out, with the reason
    # Of the table's content (`content_digest`), kept in the adapter's state file; it stands for
    # the entries when Desireds are compared.
    nft_digest: str = ""
    nft_tables: NftTables = field(default_factory=NftTables)
    masquerade_exempt: tuple[str, ...] | None = None  # what the table is rendered with
    hash_total: int = field(default=0, repr=False, compare=False)  # the entries' hashes, summed
    ipip_services: int = field(default=0, repr=False, compare=False)
    # What changed since the Desired this one was built from (`base`, by serial): each key whose
    # entry was built again, with the entry it had before (None: none). The planner computes the
    # delta from those keys alone, and the entries as they were from these and the current ones.
    serial: int = field(default=0, compare=False)
    base: int | None = field(default=None, compare=False)
    replaced: Mapping[EntryKey, DnatEntry | None] = field(default_factory=dict, repr=False, compare=False)
    # (lineage, seq) of the slice built from, when it had a delta: the next build follows from it.
    slice_seq: tuple[int, int] | None = field(default=None, repr=False, compare=False)
    build: _Build = field(default_factory=_Build, repr=False, compare=False)

    @property
    def current(self) -> bool:
        """Whether this still holds its entries (no newer Desired was built from it)."""
        return self.build.owner == self.serial

    @property
    def entries(self) -> Mapping[EntryKey, DnatEntry]:
        """What the table DNATs, by identity."""
        return _Entries(self.build, self.serial)

    def entries_before(self) -> Mapping[EntryKey, DnatEntry]:
        """The entries of the Desired this one was built from (`base`), as they were."""
        return _Before(_Entries(self.build, self.serial), self.replaced)

    @cached_property
    def nft(self) -> str:
        """The `nft -f` text of the whole table (`render_nft` of the services)."""
        return render_entries(sorted(self.entries.values(), key=entry_order), masquerade_exempt=self.masquerade_exempt)

    def render(self) -> str:
        return self.nft

    def nft_from_services(self) -> str:
        """`nft`, for a reader on another thread than the builds' (`/config`): the text already
        rendered, or rendered from the services, which never change, and not from the entries,
        which the next build may be updating right now. The same text, made the way a build
        from scratch makes the entries."""
        text: str | None = self.__dict__.get("nft")
        if text is not None:
            return text
        groups: dict[EntryKey, list[VirtualService]] = {}
        for vs in self.services:
            key, _ = _skip_reason(vs)
            if key is not None:
                groups.setdefault(key, []).append(vs)
        entries = [e for group in groups.values() for e in dnat_entries(group)]
        return render_entries(sorted(entries, key=entry_order), masquerade_exempt=self.masquerade_exempt)


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


def table_chains(class_counts: Mapping[tuple[int, int], int], *,
                 masquerade: bool) -> tuple[frozenset[str], NftChains]:
    """The nft families and the chains `render_entries` makes for entries of these classes (the
    count of entries by family and number of endpoints), as `expected_tables` reads them back."""
    families = {4: "ip", 6: "ip6"}
    sizes: dict[str, set[int]] = {}
    for (family, size), count in class_counts.items():
        if count > 0:
            sizes.setdefault(families[family], set()).add(size)
    chains = frozenset((f, name) for f, used in sizes.items()
                       for name in table_chains_of_classes(used, masquerade=masquerade))
    return frozenset(sizes), chains


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


def _moves(node_slice: NodeSlice, base: Desired) -> tuple[list[VirtualService], list[VirtualService]] | None:
    """(gone, came): the services of `base`'s slice not in `node_slice`, and the reverse, from
    the slice's delta; None when it does not reach back to `base`'s slice."""
    delta, seen = node_slice.delta, base.slice_seq
    changes = delta.since(*seen) if delta is not None and seen is not None else None
    if changes is None:
        return None
    gone = [old for old, _ in changes.values() if old is not None]
    came = [new for _, new in changes.values() if new is not None]
    members = base.build.members
    if any(id(vs) not in members for vs in gone) or any(id(vs) in members for vs in came):
        return None  # not what `base` holds after all: compare the services instead
    return gone, came


def desired_state(node_slice: NodeSlice, settings: Settings, previous: Desired | None = None) -> Desired:
    """What the kernel should hold for this slice. Never raises on a bad service: it is skipped.

    Built from `previous` when given, rendered with the same masquerade setting and current (no
    other Desired was built from it yet; else from scratch): the services that came and went
    since its slice are read from the slice's delta when that reaches back to its slice
    (NodeSliceAssembler), else found by comparing the services with the previous slice's by
    identity (the NATS subscriber hands unchanged services over as the same objects). Only the
    identities (VIP, port, protocol) of services that came or went get their entries built
    again, in the working state `previous` hands over (see Desired). So a one-endpoint change
    costs the work of that one service, plus a pass over the services when they are compared.
    """
    base = previous if previous is not None and previous.masquerade_exempt == settings.masquerade_exempt \
        and previous.current else None
    build = base.build if base is not None else _Build()
    moves = _moves(node_slice, base) if base is not None else None
    if moves is None:
        members = build.members
        incoming = {id(vs): vs for vs in node_slice.services}
        gone = [vs for i, (_, vs) in members.items() if i not in incoming]
        came = [vs for i, vs in incoming.items() if i not in members]
    else:
        gone, came = moves
    build.owner = 0  # under way: neither `previous` nor the new Desired holds it until done
    change = build.update(gone, came)
    total = change.total + (base.hash_total if base is not None else 0)
    ipip = change.ipip + (base.ipip_services if base is not None else 0)

    families, chains = table_chains(build.classes, masquerade=settings.masquerade_exempt is not None)
    tables = NftTables(families, chains, build.keys)
    if base is not None and base.nft_tables == tables:  # (cheap: the keys compare bucket by bucket)
        tables = base.nft_tables  # the same object: what observed_after left compares by identity
    # A VIP is held only while some service of it DNATs here: an address without rules would
    # accept the director's packets and answer them with RSTs from the node itself.
    served = base.vips if base is not None and not change.vips_moved else frozenset(build.vips)
    services: Sequence[VirtualService] = node_slice.services if isinstance(node_slice.services, tuple | Chunked) \
        else tuple(node_slice.services)
    skipped: tuple[str, ...] = ()
    if build.skips:  # rare (the protocol's decoder refuses what `_skip_reason` skips): a pass over the services
        services = tuple(vs for vs in node_slice.services if build.members[id(vs)][0] is not None)
        skipped = tuple(build.skips[id(vs)] for vs in node_slice.services if id(vs) in build.skips)
    delta = node_slice.delta
    desired = Desired(
        vips=served, sysctls=desired_sysctls(settings, ipip=ipip > 0), services=services, skipped=skipped,
        nft_digest=content_digest(total, settings.masquerade_exempt), nft_tables=tables,
        masquerade_exempt=settings.masquerade_exempt, hash_total=total, ipip_services=ipip,
        serial=next(_serials), base=base.serial if base is not None else None, replaced=change.replaced,
        slice_seq=(delta.lineage, delta.seq) if delta is not None else None, build=build,
    )
    build.owner = desired.serial
    return desired


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
            delta = table_delta(desired, applied)
        ops.append(ReplaceTable(desired.nft_digest, delta, desired.render))
    # A desired VIP that someone else already put on the device is left alone: it works as it
    # is, and taking it over would make us delete it later.
    missing = desired.vips - observed.ours - observed.foreign
    ops += [AddAddress(a, host_prefixlen(a)) for a in sorted(missing, key=_address_order)]
    ops += [DeleteAddress(a, host_prefixlen(a)) for a in sorted(observed.ours - desired.vips, key=_address_order)]
    return ops


def table_delta(desired: Desired, applied: Desired) -> str | None:
    """`render_entries_delta` from the entries of `applied` to those of `desired`: from the keys
    `desired` replaced when built from `applied`, else comparing every key while `applied` still
    holds its entries; None when they are gone (moved on to a Desired other than `desired`)."""
    if desired.base == applied.serial:
        return render_entries_delta(desired.entries_before(), desired.entries,
                                    masquerade_exempt=desired.masquerade_exempt, changed=desired.replaced.keys(),
                                    vip_entries=desired.build.vips if desired.current else None)
    if applied.current:
        return render_entries_delta(applied.entries, desired.entries, masquerade_exempt=desired.masquerade_exempt)
    return None


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
