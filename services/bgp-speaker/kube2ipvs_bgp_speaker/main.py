"""`kube2ipvs bgp-speaker`: flags, wiring, and shutdown.

Start-up: status server, then the NATS state subscriber and the status board (the local
director's readiness), then the loop, which starts BGP in gobgpd and adds the peers when
`--local-as` is given (otherwise gobgpd's own gobgpd.conf does that) and announces routes.
Shutdown on SIGTERM: stop the loop, withdraw every owned route (after a GRACEFUL_SHUTDOWN round
and `--shutdown-delay` with `--graceful-shutdown`), close NATS and the status server; gobgpd
and its peers stay up. `--cleanup` withdraws gobgpd's host routes, deletes our peers and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import logging
import socket
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from kube2ipvs.bgp import parse_community
from kube2ipvs.heartbeat import heartbeat
from kube2ipvs.natskv import StateSubscriber, StatusBoard
from kube2ipvs.roleargs import (
    RoleParser,
    RoleUsageError,
    add,
    add_common,
    listen_hosts,
    nats_settings,
    positive_float,
    run_role,
)
from kube2ipvs.statusserver import StatusServer
from kube2ipvs_bgp_speaker.app import SpeakerApp, SpeakerSettings, cleanup, describe_settings
from kube2ipvs_bgp_speaker.plan import GlobalSpec, PeerSpec, RouteSettings, canonical_communities

log = logging.getLogger("kube2ipvs.bgp-speaker")

DEFAULT_GOBGPD = "127.0.0.1:50051"


def asn(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 2**32 - 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not an AS number (1-4294967295)")
    return int(text)


def uint(limit: int) -> Any:
    def parse(text: str) -> int:
        if not text.isdigit() or int(text) > limit:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number from 0 to {limit}")
        return int(text)
    return parse


def address(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an IP address") from None


def ipv4(text: str) -> str:
    value = address(text)
    if ":" in value:
        raise argparse.ArgumentTypeError(f"{text!r}: a router id is an IPv4 address")
    return value


def peer(text: str) -> tuple[str, int]:
    """ADDRESS@ASN"""
    addr, sep, number = text.rpartition("@")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r} is not ADDRESS@ASN (e.g. 198.51.100.1@64500)")
    return address(addr), asn(number)


def community(text: str) -> str:
    try:
        return parse_community(text.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    p = RoleParser(prog="kube2ipvs bgp-speaker",
                   description="Announce the VIPs the local director serves as /32 (/128) routes through "
                               "gobgpd's gRPC API; withdraw them when it cannot serve them.")
    add(p, "--gobgpd", default=DEFAULT_GOBGPD, metavar="HOST:PORT",
        help=f"gobgpd's gRPC API (its --api-hosts; default {DEFAULT_GOBGPD})")
    add(p, "--host-name", default=socket.gethostname(),
        help="the local director's name on the status board (default: the host name, as the director's)")
    add(p, "--local-as", type=asn, metavar="ASN", help="start BGP in gobgpd with this AS and add --peer's")
    add(p, "--router-id", type=ipv4, metavar="IPV4",
        help="router id (default: this host's address toward the first peer)")
    add(p, "--bgp-port", type=int, default=179, metavar="PORT",
        help="port gobgpd accepts BGP on, -1: none (it only connects out) (default 179)")
    add(p, "--peer", type=peer, action="append", metavar="ADDRESS@ASN", help="a neighbour, repeatable")
    add(p, "--hold-time", type=uint(65535), default=90, metavar="S", help="hold time (default 90)")
    add(p, "--keepalive", type=uint(65535), default=30, metavar="S", help="keepalive interval (default 30)")
    add(p, "--connect-retry", type=uint(65535), default=5, metavar="S",
        help="connect retry interval (default 5; gobgpd waits at least 5)")
    add(p, "--peer-password", metavar="SECRET", help="TCP MD5 password of every peer (prefer the environment)")
    add(p, "--multihop", type=uint(255), default=0, metavar="TTL",
        help="eBGP multihop TTL for peers more than one hop away (default 0: directly connected)")
    add(p, "--peer-port", type=uint(65535), default=0, metavar="PORT", help="the peers' BGP port (default 179)")
    add(p, "--passive", action="store_true", help="wait for the peers to connect (never connect out)")
    add(p, "--nexthop", type=address, metavar="IPV4",
        help="next hop of IPv4 VIPs (default self: this host's address toward each peer)")
    add(p, "--nexthop6", type=address, metavar="IPV6", help="next hop of IPv6 VIPs (default self)")
    add(p, "--community", type=community, action="append", metavar="C",
        help="community on every route, repeatable: ASN:VALUE, A:B:C (large), no-export, ...")
    add(p, "--local-pref", type=uint(2**32 - 1), metavar="N", help="LOCAL_PREF (sent to iBGP peers only)")
    add(p, "--med", type=uint(2**32 - 1), metavar="N", help="MULTI_EXIT_DISC")
    add(p, "--resync-interval", type=positive_float, default=10.0, metavar="S",
        help="re-read gobgpd's paths and peers and repair drift this often (default 10)")
    add(p, "--readiness-interval", type=positive_float, default=0.1, metavar="S",
        help="wait this long before watching the director's readiness again after the watch broke "
             "(and the poll interval of a source without a watch; default 0.1)")
    add(p, "--director-stale", type=positive_float, default=30.0, metavar="S",
        help="a director readiness older than this counts as a stopped director (default 30)")
    add(p, "--graceful-shutdown", action="store_true",
        help="on shutdown, re-announce every route with GRACEFUL_SHUTDOWN (65535:0, RFC 8326) before "
             "withdrawing it")
    add(p, "--shutdown-delay", type=positive_float, default=0.0, metavar="S",
        help="on shutdown, wait this long after the GRACEFUL_SHUTDOWN round (or after withdrawing) (default 0)")
    add(p, "--cleanup", action="store_true", help="withdraw gobgpd's host routes, delete our peers, then exit")
    add_common(p, "bgp-speaker")
    return p


def source_address_toward(target: str) -> str:
    """The address this host sends from toward `target` (a UDP connect sends nothing)."""
    family = socket.AF_INET6 if ":" in target else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect((target, 179))
        return str(s.getsockname()[0])


def speaker_settings(args: argparse.Namespace) -> SpeakerSettings:
    try:
        # From the environment (KUBE2IPVS_PEER=a@1,b@2), the list arrives unparsed.
        peers_given = [peer(p) if isinstance(p, str) else p for p in args.peer or ()]
        communities = canonical_communities(args.community or ())
    except (argparse.ArgumentTypeError, ValueError) as exc:
        raise RoleUsageError(str(exc)) from None
    if peers_given and args.local_as is None:
        raise RoleUsageError("--peer needs --local-as (or leave both to gobgpd.conf)")
    bgp = None
    if args.local_as is not None:
        router_id = args.router_id
        if router_id is None:
            v4 = [a for a, _ in peers_given if ":" not in a]
            if not v4:
                raise RoleUsageError("--router-id is required without an IPv4 --peer to derive it from")
            try:
                router_id = source_address_toward(v4[0])
            except OSError as exc:
                raise RoleUsageError(f"no route toward {v4[0]} to take a router id from ({exc}); "
                                     "give --router-id") from None
        bgp = GlobalSpec(asn=args.local_as, router_id=router_id, listen_port=args.bgp_port)
    if args.keepalive and args.hold_time and args.keepalive * 3 > args.hold_time:
        raise RoleUsageError(f"--keepalive {args.keepalive} should be at most a third of --hold-time {args.hold_time}")
    peers = tuple(
        PeerSpec(address=a, asn=n, hold_time=args.hold_time, keepalive=args.keepalive,
                 connect_retry=args.connect_retry, password=args.peer_password or "", multihop_ttl=args.multihop,
                 port=args.peer_port, passive=bool(args.passive), ipv4=":" not in a, ipv6=":" in a)
        for a, n in peers_given)
    return SpeakerSettings(
        routes=RouteSettings(nexthop=args.nexthop, nexthop6=args.nexthop6,
                             communities=communities,
                             local_pref=args.local_pref, med=args.med),
        bgp=bgp, peers=peers, resync_interval=args.resync_interval, readiness_interval=args.readiness_interval,
        director_stale=args.director_stale, graceful_shutdown=bool(args.graceful_shutdown),
        shutdown_delay=args.shutdown_delay,
    )


class BoardDirector:
    """The local director's readiness on the status board, under its host name."""

    def __init__(self, board: StatusBoard, host: str) -> None:
        self._board, self._host = board, host

    async def read(self) -> Mapping[str, Any] | None:
        return await self._board.get("director", self._host)

    def watch(self) -> AsyncIterator[dict[str, Any] | None]:
        return self._board.watch("director", self._host)


async def amain(args: argparse.Namespace, stop: asyncio.Event) -> int:
    settings = speaker_settings(args)
    try:
        from kube2ipvs_bgp_speaker.gobgp import GobgpClient
    except ImportError as exc:
        raise RoleUsageError(f"gobgpd's API modules are not generated ({exc}): run `make install`, or "
                             "`python -m kube2ipvs_bgp_speaker.genproto` with grpcio-tools installed") from None
    client = GobgpClient(args.gobgpd)
    try:
        if args.cleanup:
            if not await client.wait_ready(5.0):
                raise RoleUsageError(f"gobgpd does not answer at {args.gobgpd}")
            done = await cleanup(client, settings.peers)
            log.info("event=cleaned_up removed=%d what=%r", len(done), done)
            return 0
        nats = nats_settings(args, name=f"kube2ipvs-bgp-speaker-{args.host_name}")
        subscriber = StateSubscriber(nats)
        board = StatusBoard(nats)
        app = SpeakerApp(client, source=subscriber, director=BoardDirector(board, args.host_name), settings=settings,
                         describe=describe_settings(settings, gobgpd=args.gobgpd, host_name=args.host_name,
                                                    nats=nats.describe()))
        listen_host, port = args.listen
        server = StatusServer(host=listen_hosts(listen_host), port=port, health=app.health, config=app.config,
                              registry=app.registry, config_token=args.config_token)
        await server.start()
        log.info("event=started role=bgp-speaker listen=%s gobgpd=%s", server.listening, args.gobgpd)
        try:
            return await serve(app, subscriber, board, stop, args.host_name)
        finally:
            await subscriber.close()
            await board.close()
            await server.stop()
    finally:
        await client.close()


async def serve(app: SpeakerApp, subscriber: StateSubscriber, board: StatusBoard, stop: asyncio.Event,
                host: str = "") -> int:
    await subscriber.start()
    # The board connects in the background (until NATS answers); reads fail until then, and the
    # speaker touches no route before its first answer. Its own health goes on the board too.
    tasks = [asyncio.create_task(board.start(), name="status-board"),
             asyncio.create_task(app.run(), name="bgp-speaker"),
             asyncio.create_task(heartbeat(board, "bgp-speaker", host, app.health), name="heartbeat")]
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait([stopping, tasks[1]], return_when=asyncio.FIRST_COMPLETED)
    rc = 0
    if tasks[1].done() and not tasks[1].cancelled() and tasks[1].exception() is not None:
        log.error("event=bug error=%r", tasks[1].exception())
        rc = 1
    log.info("event=stopping role=bgp-speaker")
    stopping.cancel()
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
    done = await app.withdraw_all()
    log.info("event=withdrawn routes=%d", sum(op.startswith("Withdraw") for op in done))
    return rc


def run(argv: Sequence[str]) -> int:
    return run_role("bgp-speaker", argv, build_parser, amain)
