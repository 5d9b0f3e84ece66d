"""What the bgp-speaker wants gobgpd to hold, and the changes that get it there. Pure.

    director_verdict(readiness, now, stale_after)  -> what the local director allows
    desired_routes(state, verdict, settings)       -> the routes to announce (health-gated)
    plan_routes(desired, held, owned)              -> [Announce | Withdraw]
    plan_peers(desired, held)                      -> [AddPeer | UpdatePeer]

A route is one /32 (/128) prefix with the attributes we send: next hop (None: "self", gobgpd puts
its address toward each peer), communities, local-pref, MED. Routes are compared whole: a held
path whose attributes differ from the desired ones is announced again (gobgpd replaces a locally
originated path by prefix). Only owned prefixes are ever withdrawn; the loop owns the prefixes of
configured VIPs and of the routes it announced itself, and leaves every other path alone.

Peers are only ever added or updated here: a peer the speaker was not configured with belongs to
the operator (gobgpd.conf).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final

from kube2ipvs.bgp import announced_vips, parse_community
from kube2ipvs.lbconfig import address_sort_key, canonical_address
from kube2ipvs.model import ClusterState

# RFC 1997 / RFC 8326 / RFC 7999 well-known communities, by the names parse_community accepts.
WELL_KNOWN: Final[Mapping[str, int]] = {
    "no-export": 0xFFFFFF01,
    "no-advertise": 0xFFFFFF02,
    "no-export-subconfed": 0xFFFFFF03,
    "no-peer": 0xFFFFFF04,
    "blackhole": 0xFFFF029A,
}
_WELL_KNOWN_NAMES: Final = {v: k for k, v in WELL_KNOWN.items()}
GRACEFUL_SHUTDOWN: Final = "65535:0"  # RFC 8326: receivers lower the route's preference to 0


# -- communities ---------------------------------------------------------------------------


def standard_value(community: str) -> int | None:
    """The 32-bit value of a standard or well-known community; None for a large one."""
    if community in WELL_KNOWN:
        return WELL_KNOWN[community]
    parts = [int(p) for p in community.split(":")]
    if len(parts) != 2:
        return None
    return parts[0] << 16 | parts[1]


def large_value(community: str) -> tuple[int, int, int] | None:
    parts = community.split(":")
    if len(parts) != 3:
        return None
    return int(parts[0]), int(parts[1]), int(parts[2])


def standard_text(value: int) -> str:
    return _WELL_KNOWN_NAMES.get(value) or f"{value >> 16}:{value & 0xFFFF}"


def _community_key(community: str) -> tuple[int, ...]:
    std = standard_value(community)
    if std is not None:
        return (0, std)
    large = large_value(community)
    assert large is not None
    return (1, *large)


def canonical_communities(texts: Iterable[str]) -> tuple[str, ...]:
    """Validated, de-duplicated, in one order (standard by value, then large): the form routes
    hold, so that what gobgpd reports compares equal to what was configured."""
    unique = {parse_community(t) for t in texts}
    return tuple(sorted(unique, key=_community_key))


# -- routes --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Route:
    prefix: str  # canonical: 192.0.2.10/32, 2001:db8::10/128
    nexthop: str | None = None  # None: self
    communities: tuple[str, ...] = ()  # canonical_communities()
    local_pref: int | None = None
    med: int | None = None

    @property
    def v6(self) -> bool:
        return ":" in self.prefix

    @property
    def address(self) -> str:
        return self.prefix.partition("/")[0]

    def line(self) -> str:
        """`192.0.2.10/32 nexthop=198.51.100.2 communities=64512:100` (DESIGN.md 4), the same
        line `kube2ipvs rules --format bgp` prints, with local-pref and MED when set."""
        text = f"{self.prefix} nexthop={self.nexthop or 'self'}"
        if self.communities:
            text += " communities=" + ",".join(self.communities)
        if self.local_pref is not None:
            text += f" local-pref={self.local_pref}"
        if self.med is not None:
            text += f" med={self.med}"
        return text


def route_sort_key(route: Route) -> tuple[Any, ...]:
    return address_sort_key(route.address)


def host_prefix(address: str) -> str:
    ip = ipaddress.ip_address(address)
    return f"{ip}/{ip.max_prefixlen}"


@dataclass(frozen=True, slots=True)
class RouteSettings:
    nexthop: str | None = None
    nexthop6: str | None = None
    communities: tuple[str, ...] = ()  # put in canonical_communities() order on construction
    local_pref: int | None = None
    med: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "communities", canonical_communities(self.communities))


def with_graceful_shutdown(route: Route) -> Route:
    return replace(route, communities=canonical_communities((*route.communities, GRACEFUL_SHUTDOWN)))


# -- the director gate ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DirectorVerdict:
    """What the local director's readiness allows: the VIPs it serves, or why none."""

    vips: frozenset[str] = frozenset()
    reason: str = ""  # why nothing may be announced; "" when the director is ready

    @property
    def ready(self) -> bool:
        return not self.reason


def director_verdict(doc: Mapping[str, Any] | None, *, now: float, stale_after: float) -> DirectorVerdict:
    """Judge the director's readiness document (kube2ipvs_director.app readiness(): healthy,
    active, vips, at). None means no document: the director never published or it expired."""
    if doc is None:
        return DirectorVerdict(reason="no readiness from the local director (stopped, or not started yet)")
    at = doc.get("at")
    if not isinstance(at, int | float):
        return DirectorVerdict(reason="the director's readiness has no time")
    if now - at > stale_after:
        return DirectorVerdict(reason=f"the director's readiness is {now - at:.0f}s old (limit {stale_after:g}s)")
    if doc.get("healthy") is not True:
        return DirectorVerdict(reason=f"the director is unhealthy: {doc.get('reason') or 'no reason given'}")
    if doc.get("active") is False:
        return DirectorVerdict(reason="the director is a standby (it holds no VIPs)")
    vips = doc.get("vips")
    if not isinstance(vips, list):
        return DirectorVerdict(reason="the director's readiness lists no VIPs")
    served = (canonical_address(v) if isinstance(v, str) else None for v in vips)
    return DirectorVerdict(vips=frozenset(v for v in served if v is not None))  # non-addresses: never announced


def desired_routes(state: ClusterState, verdict: DirectorVerdict, settings: RouteSettings) -> tuple[Route, ...]:
    """One route per VIP that has a real server in `state` (kube2ipvs.bgp.announced_vips, as
    `kube2ipvs rules --format bgp` prints them) and that the director serves. Cheap per VIP
    (a cached address canonicalization), as it runs on every change at up to 10,000 VIPs."""
    if not verdict.ready:
        return ()
    out = []
    for vip in announced_vips(state):
        address = canonical_address(vip)
        if address is None or address not in verdict.vips:
            continue
        v6 = ":" in address
        out.append(Route(f"{address}/{128 if v6 else 32}", settings.nexthop6 if v6 else settings.nexthop,
                         settings.communities, settings.local_pref, settings.med))
    return tuple(out)


def configured_prefixes(state: ClusterState) -> frozenset[str]:
    return frozenset(host_prefix(vip) for vip in state.vips)


# -- ops and plans -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Announce:
    route: Route

    def __str__(self) -> str:
        return f"Announce {self.route.line()}"


@dataclass(frozen=True, slots=True)
class Withdraw:
    route: Route

    def __str__(self) -> str:
        return f"Withdraw {self.route.prefix}"


RouteOp = Announce | Withdraw


def plan_routes(desired: Iterable[Route], held: Iterable[Route], *, owned: frozenset[str]) -> list[RouteOp]:
    """Announce what is missing or different, then withdraw owned prefixes no longer desired.
    Held paths of prefixes we do not own are never touched."""
    want = {r.prefix: r for r in desired}
    have = {r.prefix: r for r in held}
    ops: list[RouteOp] = [Announce(r) for p, r in want.items() if have.get(p) != r]
    ops += [Withdraw(r) for p, r in have.items() if p not in want and p in owned]
    return sorted(ops, key=lambda op: (isinstance(op, Withdraw), route_sort_key(op.route)))


def apply_route_ops(held: Iterable[Route], ops: Iterable[RouteOp]) -> tuple[Route, ...]:
    """What gobgpd holds after `ops` succeeded on `held`."""
    out = {r.prefix: r for r in held}
    for op in ops:
        if isinstance(op, Announce):
            out[op.route.prefix] = op.route
        else:
            out.pop(op.route.prefix, None)
    return tuple(sorted(out.values(), key=route_sort_key))


# -- peers ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GlobalSpec:
    asn: int
    router_id: str
    listen_port: int = 179  # -1: gobgpd does not listen (it only connects out)
    listen_addresses: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class PeerSpec:
    """One neighbour as the speaker configures it (and as gobgpd reports its configuration)."""

    address: str
    asn: int
    hold_time: int = 90
    keepalive: int = 30
    connect_retry: int = 5
    password: str = field(default="", repr=False)
    multihop_ttl: int = 0  # 0: directly connected (no eBGP multihop)
    port: int = 0  # 0: 179
    passive: bool = False
    ipv4: bool = True  # address families enabled on the session
    ipv6: bool = False

    def describe(self) -> dict[str, Any]:
        return {"address": self.address, "asn": self.asn, "hold_time": self.hold_time, "keepalive": self.keepalive,
                "connect_retry": self.connect_retry, "password": "<set>" if self.password else "",
                "multihop_ttl": self.multihop_ttl, "port": self.port or 179, "passive": self.passive,
                "families": [f for f, on in (("ipv4-unicast", self.ipv4), ("ipv6-unicast", self.ipv6)) if on]}


@dataclass(frozen=True, slots=True)
class PeerStatus:
    spec: PeerSpec  # the peer's configuration as gobgpd reports it
    state: str  # idle, connect, active, opensent, openconfirm, established, unknown


@dataclass(frozen=True, slots=True)
class PeerEvent:
    address: str
    state: str


@dataclass(frozen=True, slots=True)
class AddPeer:
    peer: PeerSpec

    def __str__(self) -> str:
        return f"AddPeer {self.peer.address} as={self.peer.asn}"


@dataclass(frozen=True, slots=True)
class UpdatePeer:
    peer: PeerSpec

    def __str__(self) -> str:
        return f"UpdatePeer {self.peer.address} as={self.peer.asn}"


PeerOp = AddPeer | UpdatePeer


def plan_peers(desired: Sequence[PeerSpec], held: Mapping[str, PeerSpec]) -> list[PeerOp]:
    ops: list[PeerOp] = []
    for peer in sorted(desired, key=lambda p: address_sort_key(p.address)):
        have = held.get(peer.address)
        if have is None:
            ops.append(AddPeer(peer))
        elif have != peer:
            ops.append(UpdatePeer(peer))
    return ops
