"""The `nft -f` text of one transaction that turns the table `render_nft(old)` loaded into what
`render_nft(new)` would load, touching only what differs. Pure.

Why: `render_nft` replaces both tables whole, which costs O(services) in the kernel (seconds at
10,000 services) and resets every counter. A realserver changes one endpoint at a time; this text
changes one chain and leaves the counters of every service it keeps as they were.

Cost, measured (bench/bench_realserver.py): the kernel's work is that of the change, but nft
1.0.6 (the CLI and libnftables alike) dumps every chain, set and named counter of the ruleset
before any `add rule` or `add element`, so applying this text takes O(ruleset): about 15 ms at
500 services and nearly a second at 10,000 (80,000 named counters). Sent as raw netlink, the
same change costs the kernel's work alone.

Per family, comparing the DNAT entries of both (`dnat_entries`; identity = VIP, port, protocol,
from which every name derives, so a kept service keeps its chain and counter names):

- a removed service: its elements leave the `services` map and the counter maps (and its VIP the
  `vips` set when no other service uses it) first, then its chain and its counters go. A chain
  that a map element still jumps to cannot be deleted, hence the order.
- a new service: its counters and chain (with its rules) are added before the map elements that
  refer to them.
- a service whose local endpoints changed: its chain is flushed and its rules added again, in
  the order `render_nft` writes them (numgen turns depend on the order).

Fallback: a family whose table goes from empty to non-empty or back (`render_nft` leaves a family
without services an empty table, without base chains or maps) is replaced whole, exactly as
`render_nft` writes it; there are no counters to keep in that case. `masquerade_exempt` is one
setting for both `old` and `new`: when it changes, the base chains and sets change, and the
caller applies `render_nft(new, masquerade_exempt=...)` instead.

The text assumes the kernel holds exactly `render_nft(old)`. New objects and elements are made
with `create`, not `add`: `add` of an existing chain or counter silently succeeds (and `add rule`
then doubles the rules), while `create` fails with "File exists", as `delete` and `flush` of a
missing object fail. So a delta sent to a table that is not `render_nft(old)` fails as a whole,
nothing is changed, and the caller falls back to the full render. (Drift that no command of the
delta touches, such as a rule edited by hand in another chain, goes unnoticed: the realserver's
periodic resync is what repairs that.)
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial

from kube2ipvs.lbconfig import Family
from kube2ipvs.model import VirtualService
from kube2ipvs.names import COUNTER_KINDS
from kube2ipvs.render.nft import (
    _NFT_FAMILY,
    FAMILIES,
    TABLE,
    DnatEntry,
    _dnat_rules,
    _key,
    _table_body,
    dnat_entries,
    exempt_networks,
)

# The private helpers above are imported, not copied: the delta must write the very rules,
# keys and table bodies `render_nft` writes, or the table would drift from the full render.


def _elements(entries: Sequence[DnatEntry]) -> dict[str, list[str]]:
    """Map name -> its elements for `entries` (key : value), as `render_nft` fills the maps."""
    out: dict[str, list[str]] = {"services": [f"{_key(e)} : goto {e.name}" for e in entries]}
    for kind in COUNTER_KINDS:
        out[kind] = [f'{_key(e)} : "{e.counters[kind]}"' for e in entries if kind in e.counters]
    return out


def _keys(entries: Sequence[DnatEntry]) -> dict[str, list[str]]:
    """Map name -> the keys of `entries` in that map (what `delete element` takes)."""
    out: dict[str, list[str]] = {"services": [_key(e) for e in entries]}
    for kind in COUNTER_KINDS:
        out[kind] = [_key(e) for e in entries if kind in e.counters]
    return out


def _element_commands(verb: str, where: str, by_map: dict[str, list[str]]) -> list[str]:
    # One command per map, not per element: nft parses and commits one batch either way, and a
    # line per map keeps a 1,000-service change to a few lines.
    return [f"{verb} element {where} {name} {{ {', '.join(items)} }}" for name, items in by_map.items() if items]


_Key = tuple[str, int, str]  # canonical VIP, port, protocol: a service's identity


def _groups(services: Sequence[VirtualService], canonical: dict[str, str]) -> dict[_Key, list[VirtualService]]:
    """The services by identity. `canonical` caches each VIP's canonical text: a node's slice
    has some thousands of services over a few hundred VIPs, so this parses each VIP once."""
    out: dict[_Key, list[VirtualService]] = {}
    for vs in services:
        vip = canonical.get(vs.vip)
        if vip is None:
            vip = canonical[vs.vip] = str(ipaddress.ip_address(vs.vip))
        out.setdefault((vip, vs.port, vs.protocol), []).append(vs)
    return out


@dataclass(frozen=True, slots=True)
class _Unchanged:
    """Services present alike in old and new. Their entries are never built whole (that is the
    O(endpoints) work the delta exists to avoid); only the questions the delta asks are answered,
    each by building the entries of as few groups as it takes."""

    groups: dict[_Key, list[VirtualService]]
    by_vip: dict[str, list[_Key]]

    def has_entry(self, keys: Iterable[_Key]) -> bool:
        # A group yields no entry when none of its endpoints is of the VIP's family.
        return any(dnat_entries(self.groups[k]) for k in keys)

    def family_in_use(self, family: Family) -> bool:
        return self.has_entry(k for k in self.groups if (":" in k[0]) == (family == 6))

    def vip_in_use(self, vip: str) -> bool:
        return self.has_entry(self.by_vip.get(vip, ()))


def _family_delta(
    family: Family,
    old: Sequence[DnatEntry],
    new: Sequence[DnatEntry],
    unchanged: _Unchanged,
    full_new: Callable[[], Sequence[DnatEntry]],
    exempt: Sequence[str] | None,
) -> list[str]:
    """The commands for one family; `old` and `new` hold the entries of the changed identities only."""
    ip = _NFT_FAMILY[family]
    where = f"{ip} {TABLE}"
    if not old and not new:
        return []
    in_use = None if (old and new) else unchanged.family_in_use(family)
    if (bool(old) or bool(in_use)) != (bool(new) or bool(in_use)):
        head = f"table {where}"
        return [head, f"delete {head}", head + " {", *_table_body(family, full_new(), exempt), "}"]
    before = {(e.vip, e.port, e.protocol): e for e in old}
    after = {(e.vip, e.port, e.protocol): e for e in new}
    removed = [e for k, e in before.items() if k not in after]
    added = [e for k, e in after.items() if k not in before]
    changed = [e for k, e in after.items() if k in before and before[k].endpoints != e.endpoints]

    lines: list[str] = []
    lines += _element_commands("delete", where, _keys(removed))
    if exempt is not None:
        still = {e.vip for e in new}
        gone = [v for v in dict.fromkeys(e.vip for e in removed) if v not in still and not unchanged.vip_in_use(v)]
        lines += _element_commands("delete", where, {"vips": gone})
    for e in removed:
        lines.append(f"delete chain {where} {e.name}")
        lines += [f"delete counter {where} {name}" for name in e.counters.values()]
    for e in added:
        lines += [f"create counter {where} {name}" for name in e.counters.values()]
        lines.append(f"create chain {where} {e.name}")
        lines += [f"add rule {where} {e.name} {rule}" for rule in _dnat_rules(e)]
    for e in changed:
        lines.append(f"flush chain {where} {e.name}")
        lines += [f"add rule {where} {e.name} {rule}" for rule in _dnat_rules(e)]
    lines += _element_commands("create", where, _elements(added))
    if exempt is not None:
        had = {e.vip for e in old}
        # dict.fromkeys: unique, in the sorted order of the entries, as render_nft lists them.
        fresh = [v for v in dict.fromkeys(e.vip for e in added) if v not in had and not unchanged.vip_in_use(v)]
        lines += _element_commands("create", where, {"vips": fresh})
    return lines


def _family_entries(services: Sequence[VirtualService], family: Family) -> list[DnatEntry]:
    return [e for e in dnat_entries(services) if e.family == family]


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
    Cost: O(services) comparisons of backends, plus `dnat_entries` of the changed services only;
    building the entries of all 100,000 endpoints of a large node takes seconds.
    """
    canonical: dict[str, str] = {}
    groups_old, groups_new = _groups(old, canonical), _groups(new, canonical)
    same: dict[_Key, list[VirtualService]] = {}
    changed_old: list[VirtualService] = []
    changed_new: list[VirtualService] = []
    for key in groups_old.keys() | groups_new.keys():
        a, b = groups_old.get(key, []), groups_new.get(key, [])
        # Only the backends reach the table (with VIP, port and protocol, the key here).
        if [vs.backends for vs in a] == [vs.backends for vs in b]:
            same[key] = b
        else:
            changed_old += a
            changed_new += b
    by_vip: dict[str, list[_Key]] = {}
    for key in same:
        by_vip.setdefault(key[0], []).append(key)
    unchanged = _Unchanged(same, by_vip)
    entries_old, entries_new = dnat_entries(changed_old), dnat_entries(changed_new)
    lines: list[str] = []
    for family in FAMILIES:
        exempt = None if masquerade_exempt is None else exempt_networks(masquerade_exempt, family)
        lines += _family_delta(
            family,
            [e for e in entries_old if e.family == family],
            [e for e in entries_new if e.family == family],
            unchanged,
            partial(_family_entries, new, family),
            exempt,
        )
    return "\n".join(lines) + "\n" if lines else ""
