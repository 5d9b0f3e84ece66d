"""The one adapter to gobgpd: its gRPC API (gobgp v3, service `apipb.GobgpApi`) over grpc.aio.

The only module of kube2ipvs that imports grpc or the generated `kube2ipvs_gobgpapi` modules
(genproto.py makes them at build time from Debian's gobgp .proto files). It converts between
the speaker's model (plan.Route, plan.PeerSpec, plan.GlobalSpec) and gobgp's messages, and turns
every gRPC error into one of errors.py's kinds (gobgpd answers refusals with UNKNOWN and a text).

Concurrency: one channel (one HTTP/2 connection) for every call; `apply` sends a whole batch
as one client stream (AddPathStream), `watch_peers` is one server stream. When
gobgpd goes away, calls fail at once with GobgpUnavailableError (no wait-for-ready) and the channel
reconnects in the background with a short backoff (`wait_ready` waits for that). Cancelling a
call cancels the RPC; gobgpd may or may not have applied it, which the next ListPath shows.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import Final, TypeVar

import grpc
from google.protobuf.any_pb2 import Any as AnyPb
from google.protobuf.empty_pb2 import Empty
from google.protobuf.message import Message
from kube2ipvs_gobgpapi import attribute_pb2 as attr
from kube2ipvs_gobgpapi import gobgp_pb2 as api

from kube2ipvs_bgp_speaker.errors import ApplyError, GobgpError, translate
from kube2ipvs_bgp_speaker.plan import (
    GlobalSpec,
    PeerEvent,
    PeerSpec,
    PeerStatus,
    Route,
    RouteOp,
    Withdraw,
    canonical_communities,
    large_value,
    standard_text,
    standard_value,
)

SERVICE: Final = "/apipb.GobgpApi/"
DEFAULT_TARGET: Final = "127.0.0.1:50051"
V4: Final = api.Family(afi=api.Family.AFI_IP, safi=api.Family.SAFI_UNICAST)
V6: Final = api.Family(afi=api.Family.AFI_IP6, safi=api.Family.SAFI_UNICAST)
ORIGIN_IGP: Final = 0
# The next hop of a path announced as "self": gobgpd sends its own address toward each peer instead.
SELF4: Final = "0.0.0.0"  # noqa: S104 - a next hop, not a bind address
SELF6: Final = "::"
_PATHS_PER_MESSAGE: Final = 256  # ~25 kB messages; gRPC's default limit is 4 MiB
_LOCAL_SOURCE: Final = frozenset({"", "<nil>"})  # neighbor_ip of paths gobgpd originated itself
_SESSION_STATES: Final = {v: k.lower() for k, v in api.PeerState.SessionState.items()}
_CHANNEL_OPTIONS: Final = (
    # gobgpd restarts are found within a fraction of a second, not after gRPC's default 1..120 s.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
)

Req = TypeVar("Req", bound=Message)
Resp = TypeVar("Resp", bound=Message)
T = TypeVar("T")
M = TypeVar("M", bound=Message)


# -- conversions (pure) --------------------------------------------------------------------


def _pack(message: Message) -> AnyPb:
    out = AnyPb()
    out.Pack(message)
    return out


def _unpack(packed: AnyPb, kind: type[M]) -> M | None:
    if packed.TypeName() != kind.DESCRIPTOR.full_name:
        return None
    out = kind()
    packed.Unpack(out)
    return out


def family_of(route: Route) -> api.Family:
    return V6 if route.v6 else V4


def path_of(route: Route) -> api.Path:
    """The gobgp Path that announces `route` (IPv6 through MP_REACH_NLRI, RFC 4760)."""
    ip = ipaddress.ip_interface(route.prefix)
    nlri = _pack(attr.IPAddressPrefix(prefix_len=ip.network.prefixlen, prefix=str(ip.ip)))
    family = family_of(route)
    pattrs = [_pack(attr.OriginAttribute(origin=ORIGIN_IGP))]
    if route.v6:
        pattrs.append(_pack(attr.MpReachNLRIAttribute(family=family, next_hops=[route.nexthop or SELF6],
                                                      nlris=[nlri])))
    else:
        pattrs.append(_pack(attr.NextHopAttribute(next_hop=route.nexthop or SELF4)))
    standard = [v for v in map(standard_value, route.communities) if v is not None]
    if standard:
        pattrs.append(_pack(attr.CommunitiesAttribute(communities=standard)))
    large = [attr.LargeCommunity(global_admin=a, local_data1=b, local_data2=c)
             for a, b, c in (v for v in map(large_value, route.communities) if v is not None)]
    if large:
        pattrs.append(_pack(attr.LargeCommunitiesAttribute(communities=large)))
    if route.local_pref is not None:
        pattrs.append(_pack(attr.LocalPrefAttribute(local_pref=route.local_pref)))
    if route.med is not None:
        pattrs.append(_pack(attr.MultiExitDiscAttribute(med=route.med)))
    return api.Path(family=family, nlri=nlri, pattrs=pattrs)


def route_of_path(path: api.Path) -> Route | None:
    """The route a path gobgpd holds announces; None for anything but a host route we could
    have originated (another family, a shorter prefix, a path learned from a peer)."""
    if path.neighbor_ip not in _LOCAL_SOURCE or path.is_from_external or path.is_withdraw:
        return None
    prefix = _unpack(path.nlri, attr.IPAddressPrefix)
    if prefix is None:
        return None
    try:
        ip = ipaddress.ip_address(prefix.prefix)
    except ValueError:
        return None
    if prefix.prefix_len != ip.max_prefixlen:
        return None
    nexthop: str | None = None
    communities: list[str] = []
    local_pref = med = None
    for packed in path.pattrs:
        if (hop := _unpack(packed, attr.NextHopAttribute)) is not None:
            nexthop = hop.next_hop
        elif (reach := _unpack(packed, attr.MpReachNLRIAttribute)) is not None:
            nexthop = reach.next_hops[0] if reach.next_hops else None
        elif (comms := _unpack(packed, attr.CommunitiesAttribute)) is not None:
            communities += [standard_text(v) for v in comms.communities]
        elif (larges := _unpack(packed, attr.LargeCommunitiesAttribute)) is not None:
            communities += [f"{c.global_admin}:{c.local_data1}:{c.local_data2}" for c in larges.communities]
        elif (pref := _unpack(packed, attr.LocalPrefAttribute)) is not None:
            local_pref = pref.local_pref
        elif (disc := _unpack(packed, attr.MultiExitDiscAttribute)) is not None:
            med = disc.med
    if nexthop in (SELF4, SELF6, ""):
        nexthop = None
    return Route(prefix=f"{ip}/{prefix.prefix_len}", nexthop=nexthop, communities=canonical_communities(communities),
                 local_pref=local_pref, med=med)


def peer_message(peer: PeerSpec) -> api.Peer:
    families = [api.AfiSafi(config=api.AfiSafiConfig(family=f, enabled=True))
                for f, on in ((V4, peer.ipv4), (V6, peer.ipv6)) if on]
    return api.Peer(
        conf=api.PeerConf(neighbor_address=peer.address, peer_asn=peer.asn, auth_password=peer.password),
        timers=api.Timers(config=api.TimersConfig(connect_retry=peer.connect_retry, hold_time=peer.hold_time,
                                                  keepalive_interval=peer.keepalive)),
        ebgp_multihop=api.EbgpMultihop(enabled=peer.multihop_ttl > 0, multihop_ttl=peer.multihop_ttl),
        transport=api.Transport(remote_port=peer.port, passive_mode=peer.passive),
        afi_safis=families,
    )


def peer_spec(peer: api.Peer) -> PeerSpec:
    families = {(a.config.family.afi, a.config.family.safi) for a in peer.afi_safis if a.config.enabled}
    timers = peer.timers.config
    port = peer.transport.remote_port
    return PeerSpec(
        address=peer.conf.neighbor_address or peer.state.neighbor_address, asn=peer.conf.peer_asn,
        hold_time=timers.hold_time, keepalive=timers.keepalive_interval, connect_retry=timers.connect_retry,
        password=peer.conf.auth_password,
        multihop_ttl=peer.ebgp_multihop.multihop_ttl if peer.ebgp_multihop.enabled else 0,
        port=0 if port == 179 else port, passive=peer.transport.passive_mode,
        ipv4=(V4.afi, V4.safi) in families, ipv6=(V6.afi, V6.safi) in families,
    )


def session_state(value: int) -> str:
    return _SESSION_STATES.get(value, "unknown")


# -- the client ----------------------------------------------------------------------------


class GobgpClient:
    """gobgpd's API as the speaker uses it. `target` is gobgpd's --api-hosts address."""

    def __init__(self, target: str = DEFAULT_TARGET, *, timeout: float = 5.0) -> None:
        self.target = target
        self._timeout = timeout
        self._channel = grpc.aio.insecure_channel(target, options=_CHANNEL_OPTIONS)

    async def close(self) -> None:
        await self._channel.close()

    def _unary(self, name: str, request: Req, response: type[Resp]) -> Awaitable[Resp]:
        method = self._channel.unary_unary(SERVICE + name, request_serializer=type(request).SerializeToString,
                                           response_deserializer=response.FromString)
        return self._call(name, method(request, timeout=self._timeout))

    async def _call(self, name: str, call: Awaitable[T]) -> T:
        try:
            return await call
        except grpc.aio.AioRpcError as exc:
            raise translate(exc.code().name, exc.details() or "", name) from None

    async def _stream(self, name: str, request: Req, response: type[Resp], *,
                      timeout: float | None = None) -> AsyncIterator[Resp]:
        method = self._channel.unary_stream(SERVICE + name, request_serializer=type(request).SerializeToString,
                                            response_deserializer=response.FromString)
        call = method(request, timeout=timeout)
        try:
            async for item in call:
                yield item
        except grpc.aio.AioRpcError as exc:
            raise translate(exc.code().name, exc.details() or "", name) from None
        finally:
            call.cancel()

    async def _collect(self, name: str, request: Req, response: type[Resp]) -> list[Resp]:
        return [item async for item in self._stream(name, request, response, timeout=max(self._timeout, 60.0))]

    async def wait_ready(self, timeout: float) -> bool:
        """Wait up to `timeout` for the channel to (re)connect; True when gobgpd accepted it."""
        try:
            await asyncio.wait_for(self._channel.channel_ready(), timeout)
        except TimeoutError:
            return False
        return True

    # global

    async def get_global(self) -> GlobalSpec | None:
        """gobgpd's global configuration; None while BGP is not started."""
        reply = await self._unary("GetBgp", api.GetBgpRequest(), api.GetBgpResponse)
        g = getattr(reply, "global")  # a Python keyword
        if not g.asn:
            return None
        return GlobalSpec(asn=g.asn, router_id=g.router_id, listen_port=g.listen_port,
                          listen_addresses=tuple(g.listen_addresses))

    async def start(self, spec: GlobalSpec) -> None:
        g = api.Global(asn=spec.asn, router_id=spec.router_id, listen_port=spec.listen_port,
                       listen_addresses=list(spec.listen_addresses))
        await self._unary("StartBgp", api.StartBgpRequest(**{"global": g}), Empty)

    # peers

    async def list_peers(self) -> list[PeerStatus]:
        replies = await self._collect("ListPeer", api.ListPeerRequest(), api.ListPeerResponse)
        return [PeerStatus(peer_spec(r.peer), session_state(r.peer.state.session_state)) for r in replies]

    async def add_peer(self, peer: PeerSpec) -> None:
        await self._unary("AddPeer", api.AddPeerRequest(peer=peer_message(peer)), Empty)

    async def update_peer(self, peer: PeerSpec) -> None:
        await self._unary("UpdatePeer", api.UpdatePeerRequest(peer=peer_message(peer)), api.UpdatePeerResponse)

    async def delete_peer(self, address: str) -> None:
        await self._unary("DeletePeer", api.DeletePeerRequest(address=address), Empty)

    async def watch_peers(self) -> AsyncIterator[PeerEvent]:
        """Every peer's state as the stream starts, then each change. Ends (raising
        GobgpUnavailableError) when gobgpd goes away."""
        request = api.WatchEventRequest(peer=api.WatchEventRequest.Peer())
        async for event in self._stream("WatchEvent", request, api.WatchEventResponse):
            if event.WhichOneof("event") != "peer":
                continue
            kind = event.peer.type
            if kind in (api.WatchEventResponse.PeerEvent.INIT, api.WatchEventResponse.PeerEvent.STATE):
                peer = event.peer.peer
                yield PeerEvent(peer.state.neighbor_address or peer.conf.neighbor_address,
                                session_state(peer.state.session_state))

    # paths

    async def list_routes(self) -> tuple[Route, ...]:
        """The host routes gobgpd originated itself (ours, and any an operator added by hand)."""
        out: list[Route] = []
        for family in (V4, V6):
            request = api.ListPathRequest(table_type=api.GLOBAL, family=family)
            for reply in await self._collect("ListPath", request, api.ListPathResponse):
                out += [r for r in map(route_of_path, reply.destination.paths) if r is not None]
        return tuple(out)

    async def apply(self, ops: Sequence[RouteOp]) -> None:
        """Every change in one AddPathStream call, in their order: announcements as paths,
        withdrawals as paths marked is_withdraw (gobgpd takes the withdrawal of a path it does
        not hold as done). 1,000 paths take ~40 ms this way, against ~500 ms as concurrent
        AddPath/DeletePath calls. gobgpd answers the stream once, so after a failure it may have
        taken some of the paths: ApplyError then names none as applied, and the caller reads
        ListPath again."""
        if not ops:
            return
        paths = []
        for op in ops:
            path = path_of(op.route)
            path.is_withdraw = isinstance(op, Withdraw)
            paths.append(path)

        async def requests() -> AsyncIterator[api.AddPathStreamRequest]:
            for i in range(0, len(paths), _PATHS_PER_MESSAGE):
                yield api.AddPathStreamRequest(table_type=api.GLOBAL, paths=paths[i:i + _PATHS_PER_MESSAGE])

        method = self._channel.stream_unary(SERVICE + "AddPathStream",
                                            request_serializer=api.AddPathStreamRequest.SerializeToString,
                                            response_deserializer=Empty.FromString)
        timeout = self._timeout + len(paths) / 1000 * self._timeout
        try:
            await self._call("AddPathStream", method(requests(), timeout=timeout))
        except GobgpError as exc:
            raise ApplyError(exc, ()) from None
