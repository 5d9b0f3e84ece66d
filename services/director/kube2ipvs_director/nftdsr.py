"""The nftables dataplane's adapter: the director's `Ipvs` port on one owned nft table (the layout
and its rationale are in `kube2ipvs_director.dsr`).

It holds the layout its last successful transaction left. `observe()` reads the services and
real servers back from the kernel (three netlink set dumps, `kube2ipvs.nfsets`) and compares
them with that layout; `apply(ops)` turns the ops into the services' new states and writes

- only the elements that change, on a long-lived libnftables context, while the kernel agrees
  with the layout it holds;
- the whole table, replacing the old one in one transaction, otherwise: on the first apply of a
  process, after a failed transaction, and when `observe()` found the kernel different (someone
  deleted an element or the table). The Maglev tables depend only on the nodes and weights, so
  reloading an unchanged configuration moves no flow.

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

from kube2ipvs import libnft
from kube2ipvs.lbconfig import Family, Protocol, canonical_address
from kube2ipvs.nfsets import NetlinkError, SetReader, service_key
from kube2ipvs_director.dsr import (
    DsrError,
    DsrSettings,
    Layout,
    as_observed,
    change,
    element_count,
    layout_of,
    render_table,
)
from kube2ipvs_director.kernel import ApplyError, IpvsCounters, KernelError, ServiceStats
from kube2ipvs_director.plan import Observed, ObservedService, Op, ServiceId, Timeouts, observed_after

log = logging.getLogger("kube2ipvs.director")


def _mark(data: bytes | None) -> int:
    return int.from_bytes(data, sys.byteorder) if data else 0


class NftDsr:
    def __init__(self, settings: DsrSettings, *, netns: str | None = None) -> None:
        self.settings = settings
        self.netns = netns
        self.layout = Layout()
        self._trusted = False  # False: the kernel may differ from `layout`; the next apply loads everything
        self._observed: Observed = Observed()
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

    def _read(self) -> dict[ServiceId, tuple[int, list[tuple[str, int]], int, int]] | None:
        """service -> (table id, [(node, weight)], packets, bytes) as the kernel holds them;
        None when the table is not there."""
        found: dict[ServiceId, tuple[int, list[tuple[str, int]], int, int]] = {}
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
        except NetlinkError as exc:
            if exc.errno == errno.ENOENT:
                return None
            raise KernelError(f"nft table netdev {self.settings.table}: {exc}") from exc
        return found

    def observe(self) -> Observed:
        """The services and real servers the table holds (none when there is no table)."""
        found = self._read()
        if found is None:
            self._trusted = False
            self._observed = Observed()
            return self._observed
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
        return self._observed

    def stats(self) -> tuple[ServiceStats, ...]:
        """Packets and bytes to each service (the forwarded direction; replies bypass the
        director). Stateless: no connection counts."""
        found = self._read() or {}
        return tuple(ServiceStats(sid, IpvsCounters(packets_in=packets, bytes_in=octets))
                     for sid, (_, _, packets, octets) in sorted(found.items()))

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
        base = Observed(tuple(self.layout.services[k] for k in sorted(self.layout.services))) \
            if self._trusted else self._observed
        after = {s.id: s for s in observed_after(base, ops).services}
        touched = {op.service for op in ops}
        try:
            if self._trusted:
                delta = change(self.layout, {sid: after.get(sid) for sid in touched}, self.settings)
                if delta.text:
                    self._context().cmd(delta.text)
                self.layout, self.last_elements = delta.layout, delta.elements
                self.deltas += 1
            else:
                layout = layout_of(after.values(), self.settings.table_size)
                text = render_table(layout, self.settings)
                with self._in_netns():
                    libnft.run_once(text)
                self.layout, self._trusted, self.last_elements = layout, True, element_count(layout)
                self.full_loads += 1
        except DsrError as exc:
            index = next(i for i, op in enumerate(ops) if op.service == exc.service)
            raise ApplyError(ops[index], index, errno.EINVAL, str(exc), applied=()) from exc
        except (libnft.NftError, KernelError) as exc:
            self._trusted = False  # refused whole; re-read, and load everything next time
            raise ApplyError(ops[0], 0, errno.EIO, f"nft: {exc}", applied=()) from exc
        self._observed = Observed(tuple(self.layout.services[k] for k in sorted(self.layout.services)))

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
