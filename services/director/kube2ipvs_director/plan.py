"""What the director wants in IPVS, and the ops that get it there. Pure.

`plan(desired, observed, owned_vips=..., draining=..., now=..., drain_timeout=...)` compares the
desired virtual services (`kube2ipvs.ipvs.desired_ipvs`) with what the kernel adapter observed
and returns the ops in the order they must run, plus the new draining state. No I/O, no clock
(`now` is an argument), no logging: the same inputs give the same plan.

What it owns: the virtual services whose VIP is in `owned_vips` (the configured VIPs). Every
other observed service (kube-proxy's, an operator's test service, fwmark services, which the
adapter does not even report) is never touched, whatever the desired state says.

Identity is VIP + port + protocol for a service and address + port for a real server; everything
else is an attribute changed in place with one `set` (EditService, EditDest), never delete+add:
scheduler, scheduler flags, persistence; weight, thresholds, forwarding method. Per service, the
ops run in this order:

    AddService | EditService   the service exists with the desired scheduler before any dest
    AddDest                    new real servers take traffic before old ones stop
    EditDest                   weights, thresholds, forwarding; a drain start is a set to weight 0
    DelDest                    a drained real server
    DelService                 a service no longer desired, once it has no real servers left

Graceful termination: a real server that is no longer desired (its node lost its last endpoint)
is set to weight 0, so IPVS schedules no new connection to it while established ones go on, and
is removed once it has no active connection or `drain_timeout` seconds after the drain started,
whichever comes first. A service no longer desired drains the same way, all its real servers at
once, and is deleted in the plan that deletes its last one; deleting it at once would cut every
connection it still carries, and keeping it at weight 0 everywhere serves no new connection,
which is what "not desired" means. A real server or service that becomes desired again while
draining simply gets its desired attributes back (one set).

`draining` maps each draining real server to the time its drain started. The caller keeps only
the latest `Plan.draining` (it is not persisted: after a restart, a real server found at weight 0
and not desired starts draining again, which only delays its removal). `Plan.wake_at` says when
the next drain deadline falls, so the loop re-plans by then even when nothing else changes.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Final, Literal, TypeAlias

from kube2ipvs.ipvs import IpvsDest, IpvsService
from kube2ipvs.lbconfig import Family, Protocol, canonical_address

# IPVS forwarding methods as ipvsadm names them: gatewaying (direct routing), ipip, masquerading
# (NAT); "local" and "bypass" only ever show up on services someone else made.
DestForwarding = Literal["g", "i", "m", "local", "bypass"]
SCHEDULER_FLAG_BITS: Final = (1, 2, 3)


@dataclass(frozen=True, slots=True, order=True)
class ServiceId:
    """An IPVS virtual service's identity, and everything an adapter needs to address it."""

    vip: str
    family: Family
    port: int
    protocol: Protocol

    def __str__(self) -> str:
        host = f"[{self.vip}]" if self.family == 6 else self.vip
        return f"{self.protocol}/{host}:{self.port}"


DestId: TypeAlias = tuple[ServiceId, str, int]  # a real server: its service, address and port


@dataclass(frozen=True, slots=True)
class ObservedDest:
    address: str
    port: int
    forwarding: DestForwarding
    weight: int
    u_threshold: int = 0
    l_threshold: int = 0
    active: int = 0  # established connections (ipvsadm's ActiveConn)
    inactive: int = 0  # other connection entries (InActConn)


@dataclass(frozen=True, slots=True)
class ObservedService:
    id: ServiceId
    scheduler: str
    flags: tuple[int, ...] = ()  # scheduler flag bits 1..3, sorted
    persistent: bool = False  # the service's persistence (`ipvsadm -p`); ours never has any
    timeout: int = 0  # persistence timeout in seconds (meaningful only when persistent)
    one_packet: bool = False  # `ipvsadm -o`; ours never has it
    dests: tuple[ObservedDest, ...] = ()


@dataclass(frozen=True, slots=True)
class Observed:
    """Every address-based IPVS virtual service the kernel holds, ours or not."""

    services: tuple[ObservedService, ...] = ()


@dataclass(frozen=True, slots=True)
class AddService:
    service: ServiceId
    scheduler: str
    flags: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class EditService:
    """`set` the service's scheduler and flags; persistence and one-packet scheduling are off."""

    service: ServiceId
    scheduler: str
    flags: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class DelService:
    service: ServiceId


@dataclass(frozen=True, slots=True)
class AddDest:
    service: ServiceId
    address: str
    port: int
    forwarding: DestForwarding
    weight: int
    u_threshold: int
    l_threshold: int


@dataclass(frozen=True, slots=True)
class EditDest:
    """`set` every attribute of the real server (the kernel's SET_DEST wants them all)."""

    service: ServiceId
    address: str
    port: int
    forwarding: DestForwarding
    weight: int
    u_threshold: int
    l_threshold: int


@dataclass(frozen=True, slots=True)
class DelDest:
    service: ServiceId
    address: str
    port: int


Op: TypeAlias = AddService | EditService | DelService | AddDest | EditDest | DelDest


@dataclass(frozen=True, slots=True)
class Plan:
    ops: tuple[Op, ...]
    draining: Mapping[DestId, float] = field(default_factory=dict)  # real server -> drain start
    wake_at: float | None = None  # the earliest drain deadline still ahead: re-plan by then
    skipped: tuple[str, ...] = ()  # desired services left alone, with the reason


@dataclass(frozen=True, slots=True)
class Timeouts:
    """IPVS connection timeouts in seconds (`ipvsadm --set tcp tcpfin udp`); 0 leaves one as it is."""

    tcp: int = 0
    tcpfin: int = 0
    udp: int = 0


def canonical_ip(address: str) -> str:
    """The address as `ipaddress` writes it; anything else unchanged (it then matches nothing)."""
    return canonical_address(address) or address


class CanonicalVips(frozenset[str]):
    """VIP addresses known to be canonical (made by `canonical_vips`): `plan()` takes them as
    they are, where any other collection is canonicalized address by address on every call."""

    __slots__ = ()


def canonical_vips(addresses: Iterable[str]) -> CanonicalVips:
    return CanonicalVips(canonical_ip(a) for a in addresses)


def _canonical(vips: Collection[str]) -> frozenset[str]:
    return vips if isinstance(vips, CanonicalVips) else canonical_vips(vips)


@lru_cache(maxsize=1 << 17)
def _ip_order(address: str) -> tuple[int, int, str]:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return (9, 0, address)
    return (ip.version, int(ip), "")


def service_order(sid: ServiceId) -> tuple[tuple[int, int, str], int, str]:
    return (_ip_order(sid.vip), sid.port, sid.protocol)


def service_id(svc: IpvsService) -> ServiceId:
    return ServiceId(canonical_ip(svc.vip), svc.family, svc.port, svc.protocol)


def _flags(flags: Iterable[int]) -> tuple[int, ...]:
    return tuple(sorted(set(flags)))


def _service_matches(want: IpvsService, have: ObservedService) -> bool:
    return (have.scheduler == want.scheduler and have.flags == _flags(want.flags)
            and not have.persistent and not have.one_packet)


def _dest_matches(want: IpvsDest, have: ObservedDest) -> bool:
    return (have.forwarding == want.forwarding and have.weight == want.weight
            and have.u_threshold == want.u_threshold and have.l_threshold == want.l_threshold)


def _dest_fields(want: IpvsDest) -> tuple[str, int, DestForwarding, int, int, int]:
    return (canonical_ip(want.address), want.port, want.forwarding, want.weight, want.u_threshold, want.l_threshold)


@dataclass(slots=True)
class _Drains:
    """The drain bookkeeping of one plan: who drains since when, and the next deadline."""

    before: Mapping[DestId, float]
    now: float
    timeout: float
    after: dict[DestId, float] = field(default_factory=dict)
    wake_at: float | None = None

    def drain(self, sid: ServiceId, have: ObservedDest) -> Op | None:
        """The op (if any) that moves a real server that is not desired towards its removal."""
        key = (sid, have.address, have.port)
        if have.weight != 0:
            # Start (or restart, if someone raised the weight again) the drain: no new connections.
            self._keep(key, self.before.get(key, self.now))
            return EditDest(sid, have.address, have.port, have.forwarding, 0, have.u_threshold, have.l_threshold)
        started = self.before.get(key, self.now)
        if have.active == 0 or self.now - started >= self.timeout:
            return DelDest(sid, have.address, have.port)
        self._keep(key, started)
        return None

    def _keep(self, key: DestId, started: float) -> None:
        self.after[key] = started
        deadline = started + self.timeout
        if self.wake_at is None or deadline < self.wake_at:
            self.wake_at = deadline


def _service_ops(want: IpvsService | None, have: ObservedService | None, sid: ServiceId,
                 drains: _Drains) -> list[Op]:
    head: list[Op] = []
    adds: list[Op] = []
    edits: list[Op] = []
    dels: list[Op] = []
    if want is not None and have is None:
        head.append(AddService(sid, want.scheduler, _flags(want.flags)))
    elif want is not None and have is not None and not _service_matches(want, have):
        head.append(EditService(sid, want.scheduler, _flags(want.flags)))
    wanted: dict[tuple[str, int], IpvsDest] = {}
    for d in want.dests if want is not None else ():
        wanted.setdefault((canonical_ip(d.address), d.port), d)
    observed = {(d.address, d.port): d for d in (have.dests if have is not None else ())}
    for key, d in wanted.items():
        current = observed.get(key)
        if current is None:
            adds.append(AddDest(sid, *_dest_fields(d)))
        elif not _dest_matches(d, current):
            edits.append(EditDest(sid, *_dest_fields(d)))
    for key in sorted(observed.keys() - wanted.keys(), key=lambda k: (_ip_order(k[0]), k[1])):
        op = drains.drain(sid, observed[key])
        if isinstance(op, DelDest):
            dels.append(op)
        elif op is not None:
            edits.append(op)
    tail: list[Op] = []
    if want is None and have is not None and len(dels) == len(have.dests):
        tail.append(DelService(sid))  # every real server is gone (or there were none)
    return head + adds + edits + dels + tail


def plan(
    desired: Iterable[IpvsService],
    observed: Observed,
    *,
    owned_vips: Collection[str],
    draining: Mapping[DestId, float] | None = None,
    now: float = 0.0,
    drain_timeout: float = 300.0,
) -> Plan:
    """The ops that turn the owned part of `observed` into `desired`; no ops when they agree.

    `owned_vips`: the configured VIPs; only services on them are created, changed or deleted
    (a `CanonicalVips` as it is: a change's plan then costs nothing per VIP).
    `draining`: the previous plan's `draining`; `now`: the current time, on the same clock.
    Never raises on bad input: a desired service that cannot be applied is skipped, with why.
    """
    owned = _canonical(owned_vips)
    skipped: list[str] = []
    wanted: dict[ServiceId, IpvsService] = {}
    for svc in desired:
        sid = service_id(svc)
        if sid.vip not in owned:
            skipped.append(f"{sid}: VIP is not a configured VIP")
        elif sid in wanted:
            skipped.append(f"{sid}: listed twice; the first one is used")
        else:
            wanted[sid] = svc
    have = {s.id: s for s in observed.services if s.id.vip in owned}
    drains = _Drains(before=draining or {}, now=now, timeout=drain_timeout)
    ops: list[Op] = []
    for sid in sorted(wanted.keys() | have.keys(), key=service_order):
        ops += _service_ops(wanted.get(sid), have.get(sid), sid, drains)
    return Plan(ops=tuple(ops), draining=drains.after, wake_at=drains.wake_at, skipped=tuple(skipped))


def cleanup_plan(observed: Observed, *, owned_vips: Collection[str]) -> tuple[Op, ...]:
    """Remove every service we own at once (`--cleanup`); deleting a service removes its dests."""
    owned = _canonical(owned_vips)
    return tuple(DelService(s.id) for s in sorted(observed.services, key=lambda s: service_order(s.id))
                 if s.id.vip in owned)


def observed_after(observed: Observed, ops: Iterable[Op]) -> Observed:
    """What observing IPVS again would show once `ops` all succeeded (connection counts as they
    were; a new real server has none). It saves a dump of every service and real server on the
    path of each change: at 10,000 services that dump is the dominant cost of a reconcile."""
    services = {s.id: s for s in observed.services}
    for op in ops:
        svc = services.get(op.service)
        if isinstance(op, AddService | EditService):
            services[op.service] = ObservedService(op.service, op.scheduler, _flags(op.flags),
                                                   dests=svc.dests if svc is not None else ())
            continue
        if isinstance(op, DelService):
            services.pop(op.service, None)
            continue
        if svc is None:
            continue
        dests = {(d.address, d.port): d for d in svc.dests}
        if isinstance(op, DelDest):
            dests.pop((op.address, op.port), None)
        else:
            old = dests.get((op.address, op.port))
            dests[(op.address, op.port)] = ObservedDest(
                op.address, op.port, op.forwarding, op.weight, op.u_threshold, op.l_threshold,
                active=old.active if old else 0, inactive=old.inactive if old else 0)
        services[op.service] = replace(svc, dests=tuple(dests[k] for k in sorted(dests, key=_dest_order)))
    return Observed(tuple(services[k] for k in sorted(services, key=service_order)))


def _dest_order(key: tuple[str, int]) -> tuple[tuple[int, int, str], int]:
    return _ip_order(key[0]), key[1]


def observed_as_desired(observed: Observed, owned_vips: Collection[str]) -> tuple[IpvsService, ...]:
    """The owned services the kernel holds, as `IpvsService`s: what `/config?format=ipvsadm`
    renders, so it compares line by line with `kube2ipvs rules --format ipvsadm`. Real servers of
    a forwarding method we never program (NAT, local) are shown as they are not: left out."""
    owned = _canonical(owned_vips)
    out = []
    for s in sorted(observed.services, key=lambda s: service_order(s.id)):
        if s.id.vip not in owned:
            continue
        dests = tuple(IpvsDest(d.address, d.port, d.forwarding, d.weight, d.u_threshold, d.l_threshold)
                      for d in sorted(s.dests, key=lambda d: _dest_order((d.address, d.port)))
                      if d.forwarding in ("g", "i"))
        out.append(IpvsService(s.id.vip, s.id.family, s.id.port, s.id.protocol, s.scheduler, s.flags, dests))
    return tuple(out)
