"""A strict in-memory gobgpd for tests of the speaker (app.Gobgpd). Pure: no grpc.

It refuses what gobgpd 3.10 refuses, with gobgpd's texts translated into the same error kinds
the real adapter raises (errors.translate): paths or peers before StartBgp, a second StartBgp,
a peer added twice, a peer that is not there. It can be stopped and started again (losing
everything, as a gobgpd restart does), paths can be deleted "by hand", and peer sessions can be
moved between states; every call is recorded, and every apply() batch in `batches`.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import AsyncIterator, Sequence
from typing import Final

from kube2ipvs_bgp_speaker.errors import ApplyError, GobgpError, translate
from kube2ipvs_bgp_speaker.plan import (
    Announce,
    GlobalSpec,
    PeerEvent,
    PeerSpec,
    PeerStatus,
    Route,
    RouteOp,
    route_sort_key,
)

_REFUSED: Final = "connection refused"


class FakeGobgp:
    def __init__(self) -> None:
        self.up = True
        self.bgp: GlobalSpec | None = None
        self.peer_conf: dict[str, PeerSpec] = {}
        self.sessions: dict[str, str] = {}
        self.paths: dict[str, Route] = {}  # locally originated, by prefix
        self.calls: list[str] = []
        self.batches: list[tuple[RouteOp, ...]] = []
        self.fail: list[GobgpError] = []  # raised by the next calls, one each
        self.refuse: dict[str, GobgpError] = {}  # raised by every AddPath/DeletePath of that prefix
        self.restarts = 0
        self._events: asyncio.Queue[PeerEvent | None] | None = None
        self._up = asyncio.Event()
        self._up.set()

    # -- what tests do to it --------------------------------------------------------------

    def stop(self) -> None:
        """gobgpd exits: everything it held is gone; open streams end."""
        self.up = False
        self._up.clear()
        self.bgp, self.peer_conf, self.sessions, self.paths = None, {}, {}, {}
        if self._events is not None:
            self._events.put_nowait(None)
            self._events = None

    def start_again(self) -> None:
        self.up = True
        self.restarts += 1
        self._up.set()

    def delete_by_hand(self, prefix: str) -> None:
        """`gobgp global rib del PREFIX`."""
        del self.paths[prefix]

    def add_by_hand(self, route: Route) -> None:
        """`gobgp global rib add PREFIX`."""
        self.paths[route.prefix] = route

    def set_session(self, address: str, state: str) -> None:
        if address not in self.peer_conf:
            raise KeyError(address)
        self.sessions[address] = state
        if self._events is not None:
            self._events.put_nowait(PeerEvent(address, state))

    def rib_lines(self) -> list[str]:
        return [r.line() for r in sorted(self.paths.values(), key=route_sort_key)]

    # -- the API --------------------------------------------------------------------------

    def _enter(self, call: str) -> None:
        self.calls.append(call)
        if not self.up:
            raise translate("UNAVAILABLE", _REFUSED, call)
        if self.fail:
            raise self.fail.pop(0)

    def _started(self, call: str) -> None:
        if self.bgp is None:
            raise translate("UNKNOWN", "bgp server hasn't started yet", call)

    async def wait_ready(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._up.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def get_global(self) -> GlobalSpec | None:
        self._enter("GetBgp")
        return self.bgp

    async def start(self, spec: GlobalSpec) -> None:
        self._enter("StartBgp")
        if self.bgp is not None:  # gobgpd 3.10 tries to listen a second time
            raise translate("UNKNOWN", f"listen tcp4 0.0.0.0:{spec.listen_port}: bind: address already in use",
                            "StartBgp")
        if not _is_ipv4(spec.router_id):
            raise translate("UNKNOWN", f"invalid router-id format: {spec.router_id}", "StartBgp")
        self.bgp = spec

    async def list_peers(self) -> list[PeerStatus]:
        self._enter("ListPeer")
        return [PeerStatus(spec, self.sessions.get(a, "idle")) for a, spec in sorted(self.peer_conf.items())]

    async def add_peer(self, peer: PeerSpec) -> None:
        self._enter("AddPeer")
        self._started("AddPeer")
        if peer.address in self.peer_conf:
            raise translate("UNKNOWN", f"can't overwrite the existing peer: {peer.address}", "AddPeer")
        self.peer_conf[peer.address] = peer
        self.set_session(peer.address, "active")

    async def update_peer(self, peer: PeerSpec) -> None:
        self._enter("UpdatePeer")
        self._started("UpdatePeer")
        if peer.address not in self.peer_conf:
            raise translate("UNKNOWN", f"neighbor that has {peer.address} doesn't exist", "UpdatePeer")
        self.peer_conf[peer.address] = peer

    async def delete_peer(self, address: str) -> None:
        self._enter("DeletePeer")
        if address not in self.peer_conf:
            raise translate("UNKNOWN", f"can't delete a peer configuration for {address}", "DeletePeer")
        del self.peer_conf[address]
        self.sessions.pop(address, None)

    async def watch_peers(self) -> AsyncIterator[PeerEvent]:
        self._enter("WatchEvent")
        queue: asyncio.Queue[PeerEvent | None] = asyncio.Queue()
        for address in sorted(self.peer_conf):
            queue.put_nowait(PeerEvent(address, self.sessions.get(address, "idle")))
        self._events = queue
        while (event := await queue.get()) is not None:
            yield event
        raise translate("UNAVAILABLE", "Socket closed", "WatchEvent")

    async def list_routes(self) -> tuple[Route, ...]:
        self._enter("ListPath")
        self._started("ListPath")
        # Like gobgp.GobgpClient: host routes (/32, /128) only.
        hosts = (r for r in self.paths.values() if ipaddress.ip_network(r.prefix).num_addresses == 1)
        return tuple(sorted(hosts, key=route_sort_key))

    async def apply(self, ops: Sequence[RouteOp]) -> None:
        self.batches.append(tuple(ops))
        applied: list[RouteOp] = []
        for op in ops:
            call = "AddPath" if isinstance(op, Announce) else "DeletePath"
            try:
                self._enter(call)
                self._started(call)
                self._check(op.route, call)
                if op.route.prefix in self.refuse:
                    raise self.refuse[op.route.prefix]
            except GobgpError as exc:
                raise ApplyError(exc, applied) from None
            if isinstance(op, Announce):
                self.paths[op.route.prefix] = op.route
            else:
                self.paths.pop(op.route.prefix, None)  # withdrawing what is not there is fine
            applied.append(op)

    @staticmethod
    def _check(route: Route, call: str) -> None:
        net = ipaddress.ip_network(route.prefix)
        if route.nexthop is not None and ipaddress.ip_address(route.nexthop).version != net.version:
            raise translate("UNKNOWN", "nexthop not found", call)


def _is_ipv4(text: str) -> bool:
    try:
        return ipaddress.ip_address(text).version == 4
    except ValueError:
        return False
