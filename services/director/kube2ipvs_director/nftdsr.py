"""The nftables dataplane's adapter: the director's `Ipvs` port on one owned nft table (the layout
and its rationale are in `kube2ipvs_director.dsr`).

It holds the layout its last successful transaction left. `observe()` reads the services and
real servers back from the kernel (three netlink set dumps, `kube2ipvs.nfsets`) and compares
them with that layout; `apply(ops)` turns the ops into the services' new states and writes

- only the elements that change, on a long-lived libnftables context, while the kernel agrees
  with the layout it holds;
- the whole table otherwise: replacing the old one in one transaction after a failed
  transaction or when `observe()` found the kernel different from what it wrote and not
  adoptable (someone deleted an element); or, when there is no table yet, in transactions of
  about 10,000 elements with the ingress hook added last (`dsr.render_load`: bounded memory for
  nft's parser). The Maglev tables depend only on the nodes and weights, so reloading an
  unchanged configuration moves no flow.

A new process adopts the table it finds when every Maglev table in it carries the check this
table size and seed give its services' nodes and weights (`dsr.adopt`): a restarted director
changes nothing in the kernel and parses no table text.

A resync costs one netlink request while nothing was committed: the nf_tables generation of
the namespace (`nfsets.SetReader.generation`) is where our last transaction or read left it.
One observe in FULL_READ_EVERY reads the table anyway, for a commit that came between ours and
our look at the generation. `stats()` reads the services' counters only.

Each transaction is atomic: when nft refuses it, nothing of it is in the kernel
(`ApplyError.applied` is empty).

Every method blocks; the app calls them from its kernel thread. `netns` (tests) names the
network namespace the sockets are opened in.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import sys
from collections.abc import Iterator, Sequence
from typing import Final

from kube2ipvs import libnft
from kube2ipvs.lbconfig import Family, Protocol, canonical_address
from kube2ipvs.nfsets import NetlinkError, SetReader, service_key
from kube2ipvs_director.dsr import (
    DsrError,
    DsrSettings,
    Layout,
    adopt,
    as_observed,
    change,
    element_count,
    layout_of,
    render_load,
    render_table,
)
from kube2ipvs_director.kernel import ApplyError, IpvsCounters, KernelError, ServiceStats
from kube2ipvs_director.plan import Observed, ObservedDest, ObservedService, Op, ServiceId, Timeouts, observed_after

log = logging.getLogger("kube2ipvs.director")
FULL_READ_EVERY: Final = 6  # observes: at the director's 10 s resync, a full read at least once a minute


def _mark(data: bytes | None) -> int:
    return int.from_bytes(data, sys.byteorder) if data else 0


class NftDsr:
    def __init__(self, settings: DsrSettings, *, netns: str | None = None) -> None:
        self.settings = settings
        self.netns = netns
        self.layout = Layout()
        self._trusted = False  # False: the kernel may differ from `layout`; the next apply loads everything
        self._present = False  # whether observe() found the table
        self.adoptions = 0
        # The nf_tables generation after our last transaction or full read: while it has not
        # moved, nobody committed anything, and a resync needs no read (but one in FULL_READ_EVERY
        # reads anyway: a commit between ours and our look at the generation goes unseen).
        self._generation: int | None = None
        self._quiet_observes = 0
        self.reads = 0  # full reads of the table (resyncs that found the generation moved, and others)
        self._observed: Observed | None = Observed()  # None: the layout's services (sorted on demand)
        self._nft: libnft.Nft | None = None
        self._reader: SetReader | None = None
        self.full_loads = 0
        self.deltas = 0
        self.last_elements = 0  # element adds and deletes of the last transaction

    def close(self) -> None:
        if self._nft is not None:
            self._nft.close()
            self._nft = None
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    @contextlib.contextmanager
    def _in_netns(self) -> Iterator[None]:
        if self.netns is None:
            yield
            return
        from pyroute2 import netns

        netns.pushns(self.netns)  # sockets belong to the namespace of the thread that opens them
        try:
            yield
        finally:
            netns.popns()

    # -- reading ----------------------------------------------------------------------------

    def _elements(self, name: str) -> list[tuple[bytes, bytes | None, int | None, int | None]]:
        if self._reader is None:
            with self._in_netns():
                self._reader = SetReader()
        try:
            return [(e.key, e.data, e.packets, e.octets)
                    for e in self._reader.elements("netdev", self.settings.table, name)]
        except NetlinkError:
            raise
        except OSError as exc:
            self._reader.close()
            self._reader = None
            raise KernelError(f"nft table netdev {self.settings.table}: {exc}") from exc

    def _read(self) -> tuple[dict[ServiceId, tuple[int, list[tuple[str, int]], int, int]], dict[int, int]] | None:
        """(service -> (table id, [(node, weight)], packets, bytes), table id -> check) as the
        kernel holds them; None when the table is not there."""
        found: dict[ServiceId, tuple[int, list[tuple[str, int]], int, int]] = {}
        checks: dict[int, int] = {}
        try:
            families: tuple[tuple[Family, str, int], ...] = ((4, "ip", 4), (6, "ip6", 16))
            for fam, kind, size in families:
                for key, data, packets, octets in self._elements(f"svc{fam}"):
                    parsed = service_key(kind, key)
                    if parsed is None:
                        continue
                    vip, port, proto = parsed
                    found[ServiceId(vip, fam, port, _protocol(proto))] = (_mark(data), [], packets or 0, octets or 0)
                for key, data, _, _ in self._elements(f"dests{fam}"):
                    parsed = service_key(kind, key)
                    node = canonical_address(_address(key[size + 8:size + 8 + size]))
                    if parsed is None or node is None:
                        continue
                    vip, port, proto = parsed
                    entry = found.get(ServiceId(vip, fam, port, _protocol(proto)))
                    if entry is not None:
                        entry[1].append((node, _mark(data)))
            checks = {_mark(key): _mark(data) for key, data, _, _ in self._elements("tables")}
        except NetlinkError as exc:
            if exc.errno == errno.ENOENT:
                return None
            raise KernelError(f"nft table netdev {self.settings.table}: {exc}") from exc
        return found, checks

    def _current_generation(self) -> int | None:
        if self._reader is None:
            with self._in_netns():
                self._reader = SetReader()
        try:
            return self._reader.generation()
        except OSError:
            return None

    @property
    def unchanged(self) -> bool:
        """The last observe() read nothing: nothing was committed since our last transaction or
        read, so the kernel holds exactly the layout (the director then plans nothing)."""
        return self._trusted and self._quiet_observes > 0

    def _current_observed(self) -> Observed:
        if self._observed is None:
            self._observed = Observed(tuple(self.layout.services[k] for k in sorted(self.layout.services)))
        return self._observed

    def _hooked(self) -> bool:
        """Whether the table's ingress chain is there (a first load cut short has none)."""
        if self._reader is None:
            with self._in_netns():
                self._reader = SetReader()
        try:
            return self._reader.has_chain("netdev", self.settings.table, "ingress")
        except OSError:
            return False

    def observe(self) -> Observed:
        """The services and real servers the table holds (none when there is no table).

        A process that does not know the table yet (just started, or after a failure or drift)
        adopts it when it is what this code writes for these services with this table size and
        seed (`dsr.adopt`): a restart then changes nothing in the kernel."""
        generation = self._current_generation()
        if self._trusted and generation is not None and generation == self._generation \
                and self._quiet_observes < FULL_READ_EVERY - 1:
            self._quiet_observes += 1
            return self._current_observed()
        self._quiet_observes = 0
        self.reads += 1
        read = self._read()
        self._generation = generation
        if read is None:
            self._trusted = self._present = False
            self._observed = Observed()
            return self._observed
        self._present = True
        found, checks = read
        services = []
        same = found.keys() == self.layout.services.keys()
        for sid in sorted(found):
            tid, dests, _, _ = found[sid]
            remembered = self.layout.services.get(sid)
            svc = as_observed(ObservedService(sid, ""), dests, remembered)
            services.append(svc)
            if same and (remembered is None or tid != self.layout.table_of.get(sid, 0)
                         or {(d.address, d.weight) for d in remembered.dests} != set(dests)):
                same = False
        if not same:
            self._trusted = False
        self._observed = Observed(tuple(services))
        if not self._trusted and self._hooked():
            adopted = adopt({s.id: s for s in services}, {sid: found[sid][0] for sid in found}, checks,
                            self.settings)
            if adopted is not None:
                self.layout, self._trusted = adopted, True
                self.adoptions += 1
        return self._observed

    def observe_dests(self, sid: ServiceId) -> tuple[ObservedDest, ...] | None:
        """What the table holds for one service (no connection counts: stateless)."""
        svc = self.layout.services.get(sid)  # what we last wrote
        return svc.dests if svc is not None else ()

    def stats(self) -> tuple[ServiceStats, ...]:
        """Packets and bytes to each service (the forwarded direction; replies bypass the
        director). Stateless: no connection counts."""
        found = self._counters()
        return tuple(ServiceStats(sid, IpvsCounters(packets_in=packets, bytes_in=octets))
                     for sid, (packets, octets) in sorted(found.items()))

    def _counters(self) -> dict[ServiceId, tuple[int, int]]:
        """The services' counters alone: two map dumps, not the real servers' and tables'."""
        found: dict[ServiceId, tuple[int, int]] = {}
        try:
            for fam, kind in ((4, "ip"), (6, "ip6")):
                for key, _, packets, octets in self._elements(f"svc{fam}"):
                    parsed = service_key(kind, key)
                    if parsed is not None:
                        vip, port, proto = parsed
                        family: Family = 6 if fam == 6 else 4
                        found[ServiceId(vip, family, port, _protocol(proto))] = (packets or 0, octets or 0)
        except NetlinkError as exc:
            if exc.errno == errno.ENOENT:
                return {}
            raise KernelError(f"nft table netdev {self.settings.table}: {exc}") from exc
        return found

    # -- writing ----------------------------------------------------------------------------

    def _context(self) -> libnft.Nft:
        if self._nft is None:
            try:
                with self._in_netns():
                    self._nft = libnft.Nft()
            except libnft.NftError as exc:
                raise KernelError(f"libnftables: {exc}") from exc
        return self._nft

    def apply(self, ops: Sequence[Op]) -> None:
        if not ops:
            return
        touched = {op.service for op in ops}
        # Trusted: only the touched services matter (a change costs what it touches, not the
        # table); otherwise everything observed is reloaded.
        base = Observed(tuple(self.layout.services[k] for k in sorted(touched) if k in self.layout.services)) \
            if self._trusted else self._current_observed()
        after = {s.id: s for s in observed_after(base, ops).services}
        try:
            if self._trusted:
                delta = change(self.layout, {sid: after.get(sid) for sid in touched}, self.settings)
                if delta.text:
                    self._context().cmd(delta.text)
                self.layout, self.last_elements = delta.layout, delta.elements
                self.deltas += 1
            else:
                layout = layout_of(after.values(), self.settings.table_size)
                with self._in_netns():
                    if self._present:  # replace it whole, in one transaction: no packet sees a half
                        libnft.run_once(render_table(layout, self.settings))
                    else:  # nothing to replace: in bounded transactions, hooked in last
                        for text in render_load(layout, self.settings):
                            libnft.run_once(text)
                self.layout, self._trusted, self.last_elements = layout, True, element_count(layout)
                self._present = True
                self.full_loads += 1
        except DsrError as exc:
            index = next(i for i, op in enumerate(ops) if op.service == exc.service)
            raise ApplyError(ops[index], index, errno.EINVAL, str(exc), applied=()) from exc
        except (libnft.NftError, KernelError) as exc:
            self._trusted = False  # refused whole; re-read, and load everything next time
            raise ApplyError(ops[0], 0, errno.EIO, f"nft: {exc}", applied=()) from exc
        self._observed = None  # the layout's services, sorted when someone asks (observe() with nothing new)
        self._generation = self._current_generation()  # ours: what the kernel holds is the layout
        self._quiet_observes = 0

    def remove_table(self) -> bool:
        """Delete the owned table (`--cleanup`); True when there was one."""
        try:
            with self._in_netns():
                libnft.run_once(f"delete table netdev {self.settings.table}")
        except libnft.NftError:
            return False
        self.layout, self._trusted = Layout(), False
        return True

    # -- IPVS settings, which this dataplane does not have ------------------------------------

    def timeouts(self) -> Timeouts:
        return Timeouts()

    def set_timeouts(self, timeouts: Timeouts) -> None:
        """Stateless: there are no connection timeouts to set."""



def _protocol(name: str) -> Protocol:
    return "udp" if name == "udp" else "tcp"  # service_key() reports only these two


def _address(raw: bytes) -> str:
    if len(raw) == 4:
        return str(ipaddress.IPv4Address(raw))
    if len(raw) == 16:
        return str(ipaddress.IPv6Address(raw))
    return ""
