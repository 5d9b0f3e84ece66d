"""The director's nftables dataplane, pure part: what its one nft table holds for a set of virtual
services, and the element transaction from one set to the next. No I/O.

What it is for: hosts whose kernel has no IPVS (`--dataplane nftables`, chosen automatically
there). It forwards like IPVS direct routing, statelessly: a packet to VIP:port leaves the same
interface unchanged (destination still VIP:port, TTL as it came) towards the chosen node's MAC,
and the node answers the client directly. The node is chosen by a Maglev lookup table
(`kube2ipvs.maglev`) indexed by a hash of the flow's source address and port, so

- every packet of a flow goes to the same node without any per-flow state on the director;
- every director with the same table size and hash seed computes the same table and the same
  hash, so a flow that the routers re-hash to another director (ECMP) still reaches its node;
- a change of one node moves only about 1/N of the flows (see bench_maglev for the figures).

The table (`render_table`), in the netdev family so that it runs at ingress, before routing and
before conntrack (these flows never get a conntrack entry, so nothing has to `notrack` them, and
the director needs neither `ip_forward` nor any connection table):

    map svc4, svc6     VIP . protocol . port -> Maglev table id (0: no live node); a counter each
    map slots4, slots6 table id . slot       -> node address
    map dests4, dests6 VIP . protocol . port . node -> weight (the real servers as IPVS would
                       list them: what the adapter reads back to observe)
    chain ingress      hook ingress on the interface, frames to this host's MAC only (a switch
                       flooding another director's frames must not make two directors forward
                       them): mark := svc lookup, then goto dsr4/dsr6
    chain dsr4, dsr6   fwd to slots[mark . jhash(source address . source port) mod size seed S]
                       out of the same interface; drop what has no live node

One Maglev table serves every service with the same live nodes and weights (the several ports of
a Service, several VIPs of one): the number of slot elements is the number of distinct node sets
times the table size. A change that leaves a table with its only service is applied in place,
element by element, so it costs the slots that change (about size/N), not the whole table.

What IPVS holds but a stateless dataplane cannot: schedulers, scheduler flags and connection
thresholds have no effect here (the adapter remembers them, so the planner stays content); a
real server at weight 0 (draining) leaves the Maglev table at once, so the connections it
carried move to other nodes, where they are reset: without connection state there is no
graceful drain. Only direct routing ("g") to the service's own port is possible.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Final, TypeAlias

from kube2ipvs.lbconfig import Family, address_sort_key
from kube2ipvs.maglev import DEFAULT_SIZE, is_prime, maglev_table
from kube2ipvs_director.plan import ObservedDest, ObservedService, ServiceId

DEFAULT_TABLE: Final = "kube2ipvs_dsr"
DEFAULT_SEED: Final = 0x6B326970  # "k2ip"; every director of a group must use the same
MAX_SEED: Final = 2**32 - 1
MAX_TABLE_ID: Final = 2**32 - 1
CHUNK: Final = 4096  # elements per `add element` statement in a full load

# A Maglev table's identity: the family and the live (weight > 0) nodes with their weights.
TableKey: TypeAlias = tuple[Family, tuple[tuple[str, int], ...]]


class DsrError(ValueError):
    """A service the nftables dataplane cannot hold (`service` names it)."""

    def __init__(self, service: ServiceId, message: str) -> None:
        self.service = service
        super().__init__(f"{service}: {message}")


@dataclass(frozen=True, slots=True)
class DsrSettings:
    interface: str
    table_size: int = DEFAULT_SIZE  # prime; slots per Maglev table
    seed: int = DEFAULT_SEED  # jhash seed: without one the kernel picks a random one per rule
    table: str = DEFAULT_TABLE

    def __post_init__(self) -> None:
        if not self.interface or len(self.interface) > 15 or any(c in self.interface for c in ' "/\\\n\t'):
            raise ValueError(f"interface {self.interface!r} is not a network interface name")
        if not is_prime(self.table_size):
            raise ValueError(f"Maglev table size {self.table_size} is not a prime")
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"hash seed {self.seed} is not a 32-bit number")


@dataclass(frozen=True, slots=True)
class Table:
    key: TableKey
    slots: tuple[str, ...]  # slot -> node address
    users: frozenset[ServiceId]


def table_key(svc: ObservedService) -> TableKey | None:
    """The Maglev table a service needs; None when no real server has a positive weight."""
    live = tuple(sorted(((d.address, d.weight) for d in svc.dests if d.weight > 0),
                        key=lambda aw: address_sort_key(aw[0])))
    return (svc.id.family, live) if live else None


@lru_cache(maxsize=4096)
def slots_of(key: TableKey, size: int) -> tuple[str, ...]:
    return maglev_table(dict(key[1]), size)


def table_check(key: TableKey, settings: DsrSettings) -> int:
    """What map `tables` holds for a Maglev table: a 32-bit digest of its nodes and weights, the
    table size and the hash seed. Written in the transaction that writes the table's slots, so a
    restarted director can tell which tables it may keep as they are."""
    text = f"{settings.table_size}|{settings.seed}|{key[0]}|" + ",".join(f"{a}={w}" for a, w in key[1])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big")


def check_service(svc: ObservedService, size: int) -> None:
    """Raise DsrError for what this dataplane cannot forward as asked."""
    for d in svc.dests:
        if d.forwarding != "g":
            raise DsrError(svc.id, f"real server {d.address}: the nftables dataplane forwards by direct routing "
                                   f"only, not {d.forwarding!r}")
        if d.port != svc.id.port:
            raise DsrError(svc.id, f"real server {d.address}:{d.port}: direct routing keeps the service's port "
                                   f"{svc.id.port}")
        if (":" in d.address) != (svc.id.family == 6):
            raise DsrError(svc.id, f"real server {d.address} is not of the VIP's family")
    live = sum(1 for d in svc.dests if d.weight > 0)
    if live > size:
        raise DsrError(svc.id, f"{live} real servers do not fit a Maglev table of {size} slots; "
                               "use a larger --maglev-size")


@dataclass(slots=True)
class Layout:
    """What the table holds: the services, their Maglev table ids, and the tables."""

    services: dict[ServiceId, ObservedService] = field(default_factory=dict)
    table_of: dict[ServiceId, int] = field(default_factory=dict)  # only services with a table
    tables: dict[int, Table] = field(default_factory=dict)
    by_key: dict[TableKey, int] = field(default_factory=dict)

    def copy(self) -> Layout:
        return Layout(dict(self.services), dict(self.table_of), dict(self.tables), dict(self.by_key))


@dataclass(frozen=True, slots=True)
class Change:
    """A transaction and the layout the table holds once it went through."""

    text: str  # nft commands; "" when nothing changes
    layout: Layout
    elements: int  # element adds and deletes in `text`


def _free_id(tables: Mapping[int, Table], hint: int) -> int:
    tid = hint
    while tid in tables or tid == 0:
        tid = tid + 1 if tid < MAX_TABLE_ID else 1
    return tid


def _release(layout: Layout, sid: ServiceId, tid: int) -> None:
    table = layout.tables[tid]
    users = table.users - {sid}
    if users:
        layout.tables[tid] = replace(table, users=users)
    else:
        del layout.tables[tid]
        del layout.by_key[table.key]


def next_layout(before: Layout, updates: Mapping[ServiceId, ObservedService | None], size: int) -> Layout:
    """The layout once `updates` (service -> its new state, None: gone) are applied. Raises DsrError."""
    after = before.copy()
    for sid, svc in sorted(updates.items(), key=lambda kv: kv[0]):
        if svc is not None:
            check_service(svc, size)
        old_tid = after.table_of.get(sid, 0)
        key = table_key(svc) if svc is not None else None
        if svc is None:
            after.services.pop(sid, None)
        else:
            after.services[sid] = svc
        if old_tid and key is not None and after.tables[old_tid].key == key:
            continue  # same nodes, same weights: the table stays
        if key is None:
            if old_tid:
                del after.table_of[sid]
                _release(after, sid, old_tid)
            continue
        shared = after.by_key.get(key)
        if shared is not None:
            after.tables[shared] = replace(after.tables[shared], users=after.tables[shared].users | {sid})
            after.table_of[sid] = shared
            if old_tid:
                _release(after, sid, old_tid)
        elif old_tid and after.tables[old_tid].users == {sid}:
            # Its own table: re-fill it in place, so only the slots that change are rewritten.
            old = after.tables[old_tid]
            del after.by_key[old.key]
            after.tables[old_tid] = Table(key, slots_of(key, size), old.users)
            after.by_key[key] = old_tid
        else:
            # Never an id freed in this same change: its old slots are deleted in the same
            # transaction, maybe from the other family's map.
            tid = _free_id(after.tables, max(max(before.tables, default=0), max(after.tables, default=0)) + 1)
            after.tables[tid] = Table(key, slots_of(key, size), frozenset({sid}))
            after.by_key[key] = tid
            after.table_of[sid] = tid
            if old_tid:
                _release(after, sid, old_tid)
    return after


# -- text -------------------------------------------------------------------------------------

def _fam(family: Family) -> str:
    return "6" if family == 6 else "4"


def _svc_key(sid: ServiceId) -> str:
    return f"{sid.vip} . {sid.protocol} . {sid.port}"


def _dest_entries(svc: ObservedService) -> dict[str, str]:
    return {f"{_svc_key(svc.id)} . {d.address}": str(d.weight) for d in svc.dests}


@dataclass(slots=True)
class _Elements:
    """Element deletes and adds per map, rendered as one transaction: deletes first."""

    table: str
    deletes: dict[str, list[str]] = field(default_factory=dict)
    adds: dict[str, list[str]] = field(default_factory=dict)

    def diff(self, map_name: str, old: Mapping[str, str], new: Mapping[str, str]) -> None:
        for k, v in old.items():
            if new.get(k) != v:
                self.deletes.setdefault(map_name, []).append(k)
        for k, v in new.items():
            if old.get(k) != v:
                self.adds.setdefault(map_name, []).append(f"{k} : {v}")

    def count(self) -> int:
        return sum(map(len, self.deletes.values())) + sum(map(len, self.adds.values()))

    def text(self) -> str:
        lines = []
        for verb, per_map in (("delete", self.deletes), ("add", self.adds)):
            for name in sorted(per_map):
                items = per_map[name]
                for i in range(0, len(items), CHUNK):
                    lines.append(f"{verb} element netdev {self.table} {name} {{ {', '.join(items[i:i + CHUNK])} }}")
        return "".join(line + "\n" for line in lines)


def _slot_entries(tid: int, slots: Iterable[str]) -> dict[str, str]:
    return {f"{tid} . {i}": addr for i, addr in enumerate(slots)}


def change(before: Layout, updates: Mapping[ServiceId, ObservedService | None], settings: DsrSettings) -> Change:
    """The element transaction that takes the table from `before` to `before` + `updates`."""
    after = next_layout(before, updates, settings.table_size)
    out = _Elements(settings.table)
    tids: set[int] = set()
    for sid in updates:
        old_svc, new_svc = before.services.get(sid), after.services.get(sid)
        fam = _fam(sid.family)
        old_tid, new_tid = before.table_of.get(sid), after.table_of.get(sid)
        out.diff(f"svc{fam}",
                 {_svc_key(sid): str(old_tid or 0)} if old_svc is not None else {},
                 {_svc_key(sid): str(new_tid or 0)} if new_svc is not None else {})
        out.diff(f"dests{fam}", _dest_entries(old_svc) if old_svc else {}, _dest_entries(new_svc) if new_svc else {})
        tids.update(t for t in (old_tid, new_tid) if t)
    for tid in sorted(tids):
        old_table, new_table = before.tables.get(tid), after.tables.get(tid)
        if old_table is not None and new_table is not None and old_table.slots is new_table.slots:
            continue
        old_map = f"slots{_fam(old_table.key[0])}" if old_table is not None else None
        new_map = f"slots{_fam(new_table.key[0])}" if new_table is not None else None
        if old_table is not None and new_table is not None and old_map == new_map:
            out.diff(f"slots{_fam(old_table.key[0])}", _slot_entries(tid, old_table.slots),
                     _slot_entries(tid, new_table.slots))
        else:  # gone, new, or (never with fresh ids, but safe) another family's table under this id
            if old_table is not None:
                out.diff(f"slots{_fam(old_table.key[0])}", _slot_entries(tid, old_table.slots), {})
            if new_table is not None:
                out.diff(f"slots{_fam(new_table.key[0])}", {}, _slot_entries(tid, new_table.slots))
        out.diff("tables", {str(tid): str(table_check(old_table.key, settings))} if old_table else {},
                 {str(tid): str(table_check(new_table.key, settings))} if new_table else {})
    return Change(out.text(), after, out.count())


def layout_of(services: Iterable[ObservedService], size: int) -> Layout:
    """The layout of a full load: tables numbered from 1 in service order."""
    return next_layout(Layout(), {s.id: s for s in services}, size)


def element_count(layout: Layout) -> int:
    """The elements a full load of `layout` writes."""
    return (len(layout.services) + sum(len(s.dests) for s in layout.services.values())
            + sum(len(t.slots) + 1 for t in layout.tables.values()))


def _definitions(settings: DsrSettings, *, ingress: bool) -> str:
    t, dev, m, seed = settings.table, settings.interface, settings.table_size, settings.seed
    return f"""table netdev {t} {{
  comment "kube2ipvs director: stateless direct routing by Maglev tables of {m} slots, hash seed {seed:#x}"
  map svc4 {{ type ipv4_addr . inet_proto . inet_service : mark; counter; }}
  map svc6 {{ type ipv6_addr . inet_proto . inet_service : mark; counter; }}
  map slots4 {{ typeof meta mark . numgen inc mod {m} : ip daddr; }}
  map slots6 {{ typeof meta mark . numgen inc mod {m} : ip6 daddr; }}
  map tables {{ type mark : mark; }}
  map dests4 {{ type ipv4_addr . inet_proto . inet_service . ipv4_addr : mark; }}
  map dests6 {{ type ipv6_addr . inet_proto . inet_service . ipv6_addr : mark; }}
  chain dsr4 {{
    fwd ip to meta mark . jhash ip saddr . th sport mod {m} seed {seed:#x} map @slots4 device "{dev}"
    drop
  }}
  chain dsr6 {{
    fwd ip6 to meta mark . jhash ip6 saddr . th sport mod {m} seed {seed:#x} map @slots6 device "{dev}"
    drop
  }}
{_ingress(settings) if ingress else ""}}}
"""


def _ingress(settings: DsrSettings) -> str:
    return f"""  chain ingress {{
    type filter hook ingress device "{settings.interface}" priority 0; policy accept;
    meta pkttype host meta mark set ip daddr . meta l4proto . th dport map @svc4 goto dsr4
    meta pkttype host meta mark set ip6 daddr . meta l4proto . th dport map @svc6 goto dsr6
  }}
"""


def _table_elements(out: _Elements, tid: int, table: Table, settings: DsrSettings) -> None:
    out.diff(f"slots{_fam(table.key[0])}", {}, _slot_entries(tid, table.slots))
    out.diff("tables", {}, {str(tid): str(table_check(table.key, settings))})


def _service_elements(out: _Elements, layout: Layout, sid: ServiceId) -> None:
    fam = _fam(sid.family)
    out.diff(f"svc{fam}", {}, {_svc_key(sid): str(layout.table_of.get(sid, 0))})
    out.diff(f"dests{fam}", {}, _dest_entries(layout.services[sid]))


def render_table(layout: Layout, settings: DsrSettings) -> str:
    """The whole table, replacing whatever table of that name there was, in one transaction."""
    t = settings.table
    out = _Elements(t)
    for sid in sorted(layout.services):
        _service_elements(out, layout, sid)
    for tid in sorted(layout.tables):
        _table_elements(out, tid, layout.tables[tid], settings)
    return f"add table netdev {t}\ndelete table netdev {t}\n" + _definitions(settings, ingress=True) + out.text()


LOAD_CHUNK: Final = 10_000  # elements per first-load transaction: at 10,000 VIP:ports, 50,000
# took the same 19.3 s with a peak RSS 78 MB higher (+158.8 against +81.1 MB, bench_dsr.py)


def render_load(layout: Layout, settings: DsrSettings, *, chunk: int = LOAD_CHUNK) -> Iterator[str]:
    """The whole table as a series of transactions of about `chunk` elements each, for a host
    that has no such table yet: the definitions first (without the ingress hook, so no packet
    meets a half-written table), then each Maglev table with its check, then the services, and
    the ingress hook last. Bounded memory for nft's parser, whatever the size; a table whose
    check is in the kernel has all its slots there, should the load be cut short."""
    t = settings.table
    yield f"add table netdev {t}\n" + _definitions(settings, ingress=False)
    out = _Elements(t)
    for tid in sorted(layout.tables):
        _table_elements(out, tid, layout.tables[tid], settings)
        if out.count() >= chunk:
            yield out.text()
            out = _Elements(t)
    for sid in sorted(layout.services):
        _service_elements(out, layout, sid)
        if out.count() >= chunk:
            yield out.text()
            out = _Elements(t)
    yield out.text() + f"table netdev {t} {{\n{_ingress(settings)}}}\n"


def adopt(services: Mapping[ServiceId, ObservedService], table_ids: Mapping[ServiceId, int],
          checks: Mapping[int, int], settings: DsrSettings) -> Layout | None:
    """The layout a table read back from the kernel holds, when every Maglev table it uses is
    one this size and seed would write for its services' nodes and weights (its check says so);
    None otherwise (then the table is loaded again)."""
    layout = Layout()
    for sid, svc in services.items():
        layout.services[sid] = svc
        tid = table_ids.get(sid, 0)
        key = table_key(svc)
        if (key is None) != (tid == 0):
            return None
        if key is None:
            continue
        if checks.get(tid) != table_check(key, settings):
            return None
        table = layout.tables.get(tid)
        if table is None:
            if key in layout.by_key:
                return None  # two tables for one node set: not what this code writes
            layout.tables[tid] = Table(key, slots_of(key, settings.table_size), frozenset({sid}))
            layout.by_key[key] = tid
        elif table.key != key:
            return None
        else:
            layout.tables[tid] = replace(table, users=table.users | {sid})
        layout.table_of[sid] = tid
    if set(checks) != set(layout.tables):
        return None  # tables no service uses (or used tables without a check)
    return layout


def as_observed(svc: ObservedService, dests: Iterable[tuple[str, int]], remembered: ObservedService | None
                ) -> ObservedService:
    """A service read back from the table (`dests`: node, weight), with what the table does not
    hold (scheduler, flags, thresholds) as last applied, if it was."""
    known = {d.address: d for d in remembered.dests} if remembered is not None else {}
    out = []
    for address, weight in sorted(dests, key=lambda aw: address_sort_key(aw[0])):
        was = known.get(address)
        out.append(ObservedDest(address, svc.id.port, "g", weight,
                                was.u_threshold if was else 0, was.l_threshold if was else 0))
    base = remembered if remembered is not None else svc
    return replace(base, dests=tuple(out))
