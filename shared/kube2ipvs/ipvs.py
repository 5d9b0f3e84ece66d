"""The desired IPVS configuration of a director, derived from cluster state. Pure.

This is the planner's input on the director and the source of the `ipvsadm-save -n` rendering,
so what `kube2ipvs rules` prints is exactly what a director programs.

Mode defaults: an entry without an explicit scheduler gets `wrr` on an ARP director and `mh`
(Maglev hashing, with mh-fallback and mh-port) on a BGP director, so that every director behind
ECMP picks the same real server for a flow (DESIGN.md 4.1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final, Literal

from kube2ipvs.bulk import gc_paused
from kube2ipvs.lbconfig import Family, Forwarding, Protocol
from kube2ipvs.model import ClusterState, VirtualService

Mode = Literal["arp", "bgp"]
MODES: Final = ("arp", "bgp")
DEFAULT_SCHEDULER: Final[dict[Mode, str]] = {"arp": "wrr", "bgp": "mh"}
# IPVS keeps per-destination thresholds in 32 bits, but ipvsadm and the original system cap at 65535.
MAX_DEST_THRESHOLD: Final = 65535
MH_DEFAULT_FLAGS: Final = (1, 2)  # mh-fallback, mh-port


@dataclass(frozen=True, slots=True)
class IpvsDest:
    address: str
    port: int
    forwarding: Forwarding
    weight: int
    u_threshold: int
    l_threshold: int


@dataclass(frozen=True, slots=True)
class IpvsService:
    vip: str
    family: Family
    port: int
    protocol: Protocol
    scheduler: str
    flags: tuple[int, ...]  # scheduler flag bits 1..3
    dests: tuple[IpvsDest, ...]  # sorted by address

    @property
    def key(self) -> tuple[str, int, Protocol]:
        return (self.vip, self.port, self.protocol)


def flag_names(scheduler: str, flags: tuple[int, ...]) -> tuple[str, ...]:
    """Scheduler flag bits as ipvsadm names them: sh/mh have their own names for bits 1 and 2."""
    named = {1: "fallback", 2: "port"}
    if scheduler in ("sh", "mh"):
        return tuple(f"{scheduler}-{named[b]}" if b in named else f"flag-{b}" for b in flags)
    return tuple(f"flag-{b}" for b in flags)


def split_threshold(total: int, weight: int, total_weight: int) -> int:
    """A real server's share of a service-wide connection threshold, in proportion to its weight.

    Rounded up, never to 0 for a positive total: 0 means "unlimited" to IPVS, so rounding a
    small share down would lift the limit instead of applying it.
    """
    if total <= 0 or weight <= 0 or total_weight <= 0:
        return 0
    return min(MAX_DEST_THRESHOLD, max(1, math.ceil(total * weight / total_weight)))


def desired_service(vs: VirtualService, mode: Mode) -> IpvsService:
    scheduler = vs.scheduler or DEFAULT_SCHEDULER[mode]
    flags = vs.flags
    if scheduler == "mh" and not flags:
        flags = MH_DEFAULT_FLAGS
    weights = [len(b.endpoints) for b in vs.backends]
    total = sum(weights)
    upper, lower, port, forwarding = vs.u_threshold, vs.l_threshold, vs.port, vs.forwarding
    dests = tuple(
        IpvsDest(
            address=b.address,
            port=port,  # direct routing keeps the destination port: the realserver DNATs it
            forwarding=forwarding,
            weight=w,
            u_threshold=split_threshold(upper, w, total) if upper else 0,
            l_threshold=split_threshold(lower, w, total) if lower else 0,
        )
        for b, w in zip(vs.backends, weights, strict=True)
    )
    return IpvsService(
        vip=vs.vip, family=vs.family, port=vs.port, protocol=vs.protocol,
        scheduler=scheduler, flags=flags,
        dests=dests,  # in the backends' order: sorted by address
    )


def desired_ipvs(state: ClusterState, mode: Mode) -> tuple[IpvsService, ...]:
    """One IPVS virtual service per VIP, port and protocol that has at least one real server."""
    with gc_paused():
        return tuple(desired_service(vs, mode) for vs in state.services if vs.backends)
