"""The `nft -f` text of one transaction that turns the table `render_nft(old)` loaded into what
`render_nft(new)` would load, touching only what differs. Pure.

Why: `render_nft` replaces both tables whole, which costs O(services) in the kernel (seconds at
10,000 services) and resets every counter. A realserver changes one endpoint at a time; with the
table layout of `render_nft`, this text changes only map and set elements, and leaves the
counters of every service it keeps as they were. Measured (bench/bench_realserver.py): a few
milliseconds through libnftables at 10,000 services, whatever the table's size.

Per family, comparing the DNAT entries of both (`dnat_entries`; identity = VIP, port, protocol):

- a removed service: its `class` element, its slots and its counter-set elements (and its VIP in
  the `vips` set when no other service uses it) are deleted.
- a new service: its slots and counter-set elements are created before the `class` element that
  sends traffic to them.
- a service whose local endpoints changed: its `class` element and old slots are deleted and the
  new slots and `class` element created, in the same transaction, so no packet sees a half-made
  service. Its counters stay.
- a class above the fixed ones (`FIXED_CLASSES`) that the change starts or stops using: its map
  and chain are created before the elements that use them and deleted after the last one goes.

Fallback: a family whose table goes from empty to non-empty or back (`render_nft` leaves a family
without services an empty table, without base chains or maps) is replaced whole, exactly as
`render_nft` writes it; there are no counters to keep in that case. `masquerade_exempt` is one
setting for both `old` and `new`: when it changes, the base chains and sets change, and the
caller applies `render_nft(new, masquerade_exempt=...)` instead.

The text assumes the kernel holds exactly `render_nft(old)`. New objects and elements are made
with `create`, not `add`: `add` of an existing element or chain silently succeeds, while `create`
fails with "File exists", as `delete` of a missing one fails. So a delta sent to a table that is
not `render_nft(old)` (in what the delta touches) fails as a whole, nothing is changed, and the
caller falls back to the full render. Drift elsewhere goes unnoticed: the realserver's periodic
resync is what repairs that.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence

from kube2ipvs.lbconfig import Family
from kube2ipvs.model import VirtualService
from kube2ipvs.render.nft import (
    _NFT_FAMILY,
    CLASS_MAP,
    FAMILIES,
    FIXED_CLASSES,
    TABLE,
    DnatEntry,
    _key,
    _table_body,
    class_chain,
    class_element,
    class_rules,
    dnat_class,
    dnat_entries,
    exempt_networks,
    mss_elements,
    mss_of,
    slot_elements,
    slot_keys,
    slot_map,
    slot_map_declaration,
)

# The helpers above are imported, not copied: the delta must write the very elements, rules and
# table bodies `render_nft` writes, or the table would drift from the full render.


def _element_commands(verb: str, where: str, by_map: dict[str, list[str]]) -> list[str]:
    # One command per map, not per element: nft parses and commits one batch either way, and a
    # line per map keeps a 1,000-service change to a few lines.
    return [f"{verb} element {where} {name} {{ {', '.join(items)} }}" for name, items in by_map.items() if items]


def _counter_keys(entries: Sequence[DnatEntry]) -> dict[str, list[str]]:
    """Counter set -> the keys of `entries` in it."""
    out: dict[str, list[str]] = {}
    for e in entries:
        for kind in e.counters:
            out.setdefault(kind, []).append(_key(e))
    return out


def _slots(entries: Sequence[DnatEntry], items: Callable[[DnatEntry], list[str]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for e in entries:
        out.setdefault(slot_map(dnat_class(e)), []).extend(items(e))
    return out


EntryKey = tuple[str, int, str]  # canonical VIP, port, protocol: a service's identity


def entry_key(e: DnatEntry) -> EntryKey:
    return (e.vip, e.port, e.protocol)


def entry_order(e: DnatEntry) -> tuple[int, ipaddress.IPv4Address | ipaddress.IPv6Address, int, str]:
    return (e.family, ipaddress.ip_address(e.vip), e.port, e.protocol)  # as dnat_entries sorts


def _vip_order(item: tuple[str, int]) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(item[0])


def _mss_changes(
    old: Mapping[EntryKey, DnatEntry], new: Mapping[EntryKey, DnatEntry],
    before: Sequence[DnatEntry], after: Sequence[DnatEntry], vip_entries: Mapping[str, int] | None,
) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """(elements to delete, to create) of `mss_clamp` and `mss`: the VIPs of the changed entries
    whose MTU (or whether they have one) differs. A VIP's MTU is that of any of its entries.

    With `vip_entries` (entries of `new` per VIP) a VIP that keeps an unchanged entry keeps its
    MTU, and the others' are in the changed entries alone: no pass over every entry."""
    touched = {e.vip for e in before} | {e.vip for e in after}
    if vip_entries is not None:
        changed_after = Counter(e.vip for e in after)
        touched = {v for v in touched if vip_entries.get(v, 0) == changed_after[v]}  # no unchanged entry
        old_side: Iterable[DnatEntry] = before
        new_side: Iterable[DnatEntry] = after
    else:
        old_side, new_side = old.values(), new.values()
    mtu_before = {e.vip: e.mtu for e in old_side if e.vip in touched and e.mtu is not None}
    mtu_after = {e.vip: e.mtu for e in new_side if e.vip in touched and e.mtu is not None}
    gone = [(v, m) for v, m in sorted(mtu_before.items(), key=_vip_order) if mtu_after.get(v) != m]
    came = [(v, m) for v, m in sorted(mtu_after.items(), key=_vip_order) if mtu_before.get(v) != m]
    return ({"mss_clamp": [f"{v} . {mss_of(v, m) + 1}-65535" for v, m in gone], "mss": [v for v, _ in gone]},
            {"mss_clamp": [mss_elements(v, m)[0] for v, m in came], "mss": [mss_elements(v, m)[1] for v, m in came]})


def _family_delta(
    family: Family,
    old: Mapping[EntryKey, DnatEntry],
    new: Mapping[EntryKey, DnatEntry],
    changed: Sequence[EntryKey],
    exempt: Sequence[str] | None,
    vip_entries: Mapping[str, int] | None = None,
) -> list[str]:
    """The commands for one family; `changed` holds the keys (of this family) whose entry differs;
    `vip_entries`, when given, the number of entries of each VIP in `new`."""
    ip = _NFT_FAMILY[family]
    where = f"{ip} {TABLE}"
    if not changed:
        return []
    before = sorted((old[k] for k in changed if k in old), key=entry_order)
    after = sorted((new[k] for k in changed if k in new), key=entry_order)
    if not before or not after:
        # One side has none of the changed entries: if no unchanged entry of the family exists
        # either, the family's table goes from empty to non-empty or back, and is written whole.
        changed_set = set(changed)
        if not any(e.family == family for k, e in new.items() if k not in changed_set):
            head = f"table {where}"
            full = sorted((e for e in new.values() if e.family == family), key=entry_order)
            return [head, f"delete {head}", head + " {", *_table_body(family, full, exempt), "}"]
    after_keys = {entry_key(e) for e in after}
    before_keys = {entry_key(e) for e in before}
    removed = [e for e in before if entry_key(e) not in after_keys]
    added = [e for e in after if entry_key(e) not in before_keys]
    changed_old = [e for e in before if entry_key(e) in after_keys]
    changed_new = [e for e in after if entry_key(e) in before_keys]
    leaving, arriving = removed + changed_old, added + changed_new

    sizes_before = {dnat_class(e) for e in before}
    sizes_after = {dnat_class(e) for e in after}
    big = sorted(n for n in sizes_before | sizes_after if n > FIXED_CLASSES)
    kept: set[int] = set()
    if big:  # rare: a class above the fixed ones; is it used by an unchanged service?
        changed_set = set(changed)
        kept = {dnat_class(e) for k, e in new.items() if k not in changed_set and dnat_class(e) in big}
    create_classes = [n for n in big if n in sizes_after and n not in sizes_before and n not in kept]
    drop_classes = [n for n in big if n in sizes_before and n not in sizes_after and n not in kept]

    mss_gone, mss_new = _mss_changes(old, new, before, after, vip_entries)

    lines: list[str] = []
    lines += _element_commands("delete", where, mss_gone)
    lines += _element_commands("delete", where, {CLASS_MAP: [_key(e) for e in leaving]})
    lines += _element_commands("delete", where, _slots(leaving, slot_keys))
    lines += _element_commands("delete", where, _counter_keys(removed))
    if exempt is not None and removed:
        lines += _element_commands("delete", where, {"vips": _vips_gone(family, new, removed, vip_entries)})
    for n in drop_classes:
        lines += [f"delete chain {where} {class_chain(n)}", f"delete map {where} {slot_map(n)}"]
    for n in create_classes:
        lines.append(f"create map {where} {slot_map(n)} {{ {slot_map_declaration(family, n)}; }}")
        lines.append(f"create chain {where} {class_chain(n)}")
        lines += [f"add rule {where} {class_chain(n)} {rule}" for rule in class_rules(family, n)]
    lines += _element_commands("create", where, _slots(arriving, slot_elements))
    lines += _element_commands("create", where, _counter_keys(added))
    lines += _element_commands("create", where, {CLASS_MAP: [class_element(e) for e in arriving]})
    lines += _element_commands("create", where, mss_new)
    if exempt is not None and added:
        fresh = _vips_fresh(family, old, before, after, added, vip_entries)
        lines += _element_commands("create", where, {"vips": fresh})
    return lines


def _vips_gone(family: Family, new: Mapping[EntryKey, DnatEntry], removed: Sequence[DnatEntry],
               vip_entries: Mapping[str, int] | None) -> list[str]:
    """The VIPs of `removed` entries that no entry of `new` has (the masquerade's `vips` set)."""
    if vip_entries is not None:
        return [v for v in dict.fromkeys(e.vip for e in removed) if not vip_entries.get(v)]
    vips_after = {e.vip for e in new.values() if e.family == family}
    return [v for v in dict.fromkeys(e.vip for e in removed) if v not in vips_after]


def _vips_fresh(family: Family, old: Mapping[EntryKey, DnatEntry], before: Sequence[DnatEntry],
                after: Sequence[DnatEntry], added: Sequence[DnatEntry],
                vip_entries: Mapping[str, int] | None) -> list[str]:
    """The VIPs of `added` entries that no entry of `old` had; in the sorted order of the
    entries (dict.fromkeys), as render_nft lists them."""
    if vip_entries is not None:  # the entries a VIP had: those it has, less what came, plus what left
        had = Counter(e.vip for e in before)
        had.subtract(Counter(e.vip for e in after))
        return [v for v in dict.fromkeys(e.vip for e in added) if vip_entries.get(v, 0) + had[v] <= 0]
    vips_before = {e.vip for e in old.values() if e.family == family}
    return [v for v in dict.fromkeys(e.vip for e in added) if v not in vips_before]


def render_entries_delta(
    old: Mapping[EntryKey, DnatEntry],
    new: Mapping[EntryKey, DnatEntry],
    *,
    masquerade_exempt: Sequence[str] | None = None,
    changed: Iterable[EntryKey] | None = None,
    vip_entries: Mapping[str, int] | None = None,
) -> str:
    """`render_nft_delta` of the DNAT entries by key (`entries_by_key`), for callers that keep
    them: the cost is that of the changed entries plus a few passes over the keys, so a change
    at 10,000 services costs about a millisecond of Python. `changed`: the keys whose entries
    may differ, when the caller knows them (else every key is compared). `vip_entries`: the number
    of entries of each VIP in `new`, when the caller keeps it: then nothing passes over every
    entry, and a change costs what it changed."""
    candidates = changed if changed is not None else old.keys() | new.keys()
    # `is` first: a caller that keeps its entries hands over the very same objects when unchanged.
    keys = [k for k in candidates if (a := old.get(k)) is not (b := new.get(k)) and a != b]
    lines: list[str] = []
    for family in FAMILIES:
        exempt = None if masquerade_exempt is None else exempt_networks(masquerade_exempt, family)
        mine = [k for k in keys if (":" in k[0]) == (family == 6)]
        lines += _family_delta(family, old, new, mine, exempt, vip_entries)
    return "\n".join(lines) + "\n" if lines else ""


def entries_by_key(entries: Iterable[DnatEntry]) -> dict[EntryKey, DnatEntry]:
    return {entry_key(e): e for e in entries}


def render_nft_delta(
    old: Sequence[VirtualService],
    new: Sequence[VirtualService],
    *,
    masquerade_exempt: Sequence[str] | None = None,
) -> str:
    """`nft -f` text of one transaction turning `render_nft(old, masquerade_exempt=...)` into
    `render_nft(new, masquerade_exempt=...)`; "" when nothing differs.

    Counters of services present in both keep their values. See the module docstring for the
    order of the commands and the one fallback (a family's table becoming empty or non-empty).
    Cost: building the entries of both sides, O(endpoints); a caller that keeps its entries
    uses `render_entries_delta` instead.
    """
    return render_entries_delta(entries_by_key(dnat_entries(old)), entries_by_key(dnat_entries(new)),
                                masquerade_exempt=masquerade_exempt)
