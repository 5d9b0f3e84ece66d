"""`kube2ipvs director`: flags, wiring, and shutdown.

Start-up: status server, then the NATS state subscriber and the status board, then the loop.
Shutdown on SIGTERM: stop the loop and close NATS and the status server; IPVS and the VIP
addresses stay as they are (a restart finds them converged and changes nothing; the bgp-speaker
stops announcing once this director's readiness expires). `--cleanup` instead removes the
virtual services and addresses it owns, and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import socket
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from kube2ipvs.maglev import DEFAULT_SIZE, is_prime
from kube2ipvs.natskv import Lease, StateSubscriber, StatusBoard
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
from kube2ipvs_director.app import (
    DEFAULT_STATE_FILE,
    DirectorApp,
    DirectorSettings,
    StatsSnapshot,
    cleanup,
    default_vs_sysctls,
)
from kube2ipvs_director.dsr import DEFAULT_SEED, MAX_SEED, DsrSettings
from kube2ipvs_director.garp import GarpSender
from kube2ipvs_director.host import LinuxHost
from kube2ipvs_director.kernel import KernelError, LinuxIpvs
from kube2ipvs_director.nftdsr import NftDsr
from kube2ipvs_director.plan import Timeouts
from kube2ipvs_director.stats import read_conntrack, read_ip_vs_conn

log = logging.getLogger("kube2ipvs.director")


def sysctl_setting(text: str) -> tuple[str, int]:
    name, sep, value = text.partition("=")
    if not sep or not name or "/" in name or not value.strip().lstrip("-").isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=INTEGER (a net.ipv4.vs sysctl, e.g. conntrack=0)")
    return name.strip(), int(value)


def timeout_seconds(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 <= value <= 86400 * 7:
        raise argparse.ArgumentTypeError(f"{value} is not between 0 (leave as is) and 604800 seconds")
    return value


def prime_size(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 3 <= value <= 65521 or not is_prime(value):
        raise argparse.ArgumentTypeError(f"{value} is not a prime between 3 and 65521")
    return value


def hash_seed(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number (decimal or 0x...)") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"{text} is not a 32-bit number")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = RoleParser(prog="kube2ipvs director",
                   description="Program kernel IPVS (direct routing to the compute nodes, weighted by their "
                               "pods) from the cluster state on NATS.")
    add(p, "--mode", choices=("arp", "bgp"), default="bgp",
        help="how VIP traffic is attracted: bgp (default scheduler mh, sloppy_tcp) or arp (wrr)")
    add(p, "--host-name", default=socket.gethostname(),
        help="name this director publishes its readiness under (default: the host name)")
    add(p, "--device", default="kube2ipvs0",
        help="device for the VIP addresses: a dummy link, created if missing (default kube2ipvs0), or lo")
    add(p, "--dataplane", choices=("auto", "ipvs", "nftables"), default="auto",
        help="ipvs: kernel IPVS; nftables: stateless direct routing by Maglev tables in an nft table on "
             "--interface, for kernels without IPVS; auto (default): ipvs where the kernel has it")
    add(p, "--interface", metavar="DEV",
        help="the interface VIP traffic arrives on: gratuitous ARPs (IPv6: unsolicited NAs) go out on it in "
             "ARP mode, and the nftables dataplane forwards on it (required for either)")
    add(p, "--maglev-size", type=prime_size, default=DEFAULT_SIZE, metavar="PRIME",
        help=f"nftables dataplane: slots per Maglev table (default {DEFAULT_SIZE}); larger moves fewer flows "
             "when a node changes, at that many nft elements per distinct node set. Same on every director")
    add(p, "--hash-seed", type=hash_seed, default=DEFAULT_SEED, metavar="N",
        help=f"nftables dataplane: the flow hash's seed (default {DEFAULT_SEED:#x}). Same on every director, "
             "so a flow re-hashed by the routers to another director reaches the same node")
    add(p, "--garp-period", type=positive_float, default=2.0, metavar="S",
        help="ARP mode: every served VIP is announced at least this often (default 2)")
    add(p, "--lease", default="arp-directors", metavar="NAME",
        help="ARP mode: the NATS lease the ARP directors of one segment share; only its holder holds "
             "the VIPs and announces them, the others stand by with IPVS programmed (default "
             "arp-directors; '' for a lone director without a lease)")
    add(p, "--lease-ttl", type=positive_float, default=1.5, metavar="S",
        help="ARP mode: a standby takes over this long after the active director stopped renewing (default 1.5)")
    add(p, "--drain-timeout", type=positive_float, default=300.0, metavar="S",
        help="a real server that lost its last endpoint is removed once idle, or after this long (default 300)")
    add(p, "--tcp-timeout", type=timeout_seconds, default=900, metavar="S",
        help="IPVS tcp timeout (ipvsadm --set), 0 leaves it as it is (default 900)")
    add(p, "--tcpfin-timeout", type=timeout_seconds, default=30, metavar="S",
        help="IPVS tcpfin timeout: FIN_WAIT entries pile up on a director, which sees half a teardown "
             "(default 30; the kernel's is 120)")
    add(p, "--udp-timeout", type=timeout_seconds, default=300, metavar="S", help="IPVS udp timeout (default 300)")
    add(p, "--vs-sysctl", type=sysctl_setting, action="append", metavar="NAME=VALUE",
        help="a net.ipv4.vs sysctl to hold, repeatable; overrides the defaults (conntrack=0, "
             "expire_nodest_conn=1, sloppy_tcp=1 in bgp mode)")
    add(p, "--resync-interval", type=positive_float, default=10.0, metavar="S",
        help="re-read IPVS and repair drift this often (default 10)")
    add(p, "--state-file", default=DEFAULT_STATE_FILE, metavar="FILE",
        help=f"remembers the VIPs this director owns across restarts (default {DEFAULT_STATE_FILE})")
    add(p, "--cleanup", action="store_true", help="delete our virtual services and VIP addresses, then exit")
    add_common(p, "director")
    return p


def director_settings(args: argparse.Namespace) -> DirectorSettings:
    sysctls: dict[str, int] = default_vs_sysctls(args.mode)
    sysctls.update(dict(args.vs_sysctl or ()))
    return DirectorSettings(
        mode=args.mode, drain_timeout=args.drain_timeout,
        timeouts=Timeouts(tcp=args.tcp_timeout, tcpfin=args.tcpfin_timeout, udp=args.udp_timeout),
        vs_sysctls=sysctls, resync_interval=args.resync_interval, state_file=Path(args.state_file),
        garp_period=args.garp_period,
    )


class LinuxStats:
    """/metrics' readings: IPVS counters on a socket of their own (the reconcile uses another),
    connection states from /proc/net/ip_vs_conn, conntrack use. With the nftables dataplane:
    the per-service packet counters of its table, and no connection states (it keeps none)."""

    def __init__(self, dsr: DsrSettings | None = None) -> None:
        self._source: LinuxIpvs | NftDsr = NftDsr(dsr) if dsr is not None else LinuxIpvs()

    def read(self) -> StatsSnapshot:
        conn_states = read_ip_vs_conn() if isinstance(self._source, LinuxIpvs) else None
        return StatsSnapshot(self._source.stats(), conn_states, read_conntrack())

    def close(self) -> None:
        self._source.close()


class BoardReadiness:
    """The director's readiness on the status board, under its host name."""

    def __init__(self, board: StatusBoard, host: str) -> None:
        self._board, self._host = board, host

    async def publish(self, status: Mapping[str, Any]) -> None:
        await self._board.put("director", self._host, status)


def ipvs_problem() -> str | None:
    """Why IPVS cannot be used here; None when it can."""
    probe = LinuxIpvs()  # its own socket: the app's stay on the app's kernel thread (kube2ipvs.workers)
    try:
        probe.observe()
    except KernelError as exc:
        return str(exc)
    finally:
        probe.close()
    return None


def choose_dataplane(args: argparse.Namespace) -> DsrSettings | None:
    """The nftables dataplane's settings, or None for IPVS; says which and why."""
    if args.dataplane in {"ipvs", "auto"}:
        problem = ipvs_problem()
        if problem is None:
            log.info("event=dataplane dataplane=ipvs")
            return None
        if args.dataplane == "ipvs":
            raise RoleUsageError(f"this kernel has no usable IPVS ({problem}); load ip_vs, or run with "
                                 "--dataplane nftables")
        if not args.interface:
            raise RoleUsageError(f"this kernel has no usable IPVS ({problem}), and the nftables dataplane it "
                                 "would fall back to needs --interface (where VIP traffic arrives)")
        log.warning("event=dataplane dataplane=nftables reason=%r: this kernel has no usable IPVS, so VIP "
                    "traffic is forwarded by the nftables dataplane (stateless direct routing, Maglev tables) "
                    "on %s", problem, args.interface)
    elif not args.interface:
        raise RoleUsageError("--dataplane nftables needs --interface (where VIP traffic arrives)")
    else:
        log.info("event=dataplane dataplane=nftables interface=%s", args.interface)
    try:
        return DsrSettings(args.interface, table_size=args.maglev_size, seed=args.hash_seed)
    except ValueError as exc:
        raise RoleUsageError(f"--interface/--maglev-size/--hash-seed: {exc}") from exc


def drop_vips(host: LinuxHost) -> None:
    ours, _ = host.vip_addresses()
    for vip in sorted(ours):
        host.delete_vip(vip)


def make_announcer(args: argparse.Namespace) -> GarpSender | None:
    if args.mode != "arp":
        return None
    if not args.interface:
        raise RoleUsageError("--interface is required in ARP mode (where gratuitous ARPs go out)")
    try:
        return GarpSender(args.interface)
    except OSError as exc:
        raise RoleUsageError(f"--interface {args.interface}: {exc}") from exc


async def serve(app: DirectorApp, subscriber: StateSubscriber, board: StatusBoard, lease: Lease | None,
                host: LinuxHost, stop: asyncio.Event) -> None:
    await subscriber.start()
    # The board connects in the background (until NATS answers); readiness published before
    # that fails, is logged, and goes out with the next reconcile.
    tasks = [asyncio.create_task(board.start(), name="status-board")]
    if lease is not None:
        await lease.start()  # before the app checks it
    tasks.append(asyncio.create_task(app.run(), name="director"))
    await stop.wait()
    log.info("event=stopping role=director")
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task
    if lease is not None and app.active:
        # A planned stop of the active ARP director: drop the VIPs, then the lease, so a standby
        # takes over at once instead of after the lease's expiry.
        await asyncio.to_thread(drop_vips, host)
        await lease.release()


async def amain(args: argparse.Namespace, stop: asyncio.Event) -> int:
    dsr = await asyncio.to_thread(choose_dataplane, args)
    settings = director_settings(args)
    if dsr is not None:  # no IPVS connection timeouts or net.ipv4.vs sysctls to hold
        settings = replace(settings, timeouts=Timeouts(), vs_sysctls={})
    ipvs: LinuxIpvs | NftDsr = NftDsr(dsr) if dsr is not None else LinuxIpvs()
    host = LinuxHost(device=args.device)
    app: DirectorApp | None = None
    try:
        if args.cleanup:
            removed = await asyncio.to_thread(cleanup, ipvs, host, settings.state_file)
            if isinstance(ipvs, NftDsr) and await asyncio.to_thread(ipvs.remove_table):
                removed.append(f"DeleteTable netdev {ipvs.settings.table}")
            if await asyncio.to_thread(host.remove_device):
                removed.append(f"DeleteDevice {args.device}")
            log.info("event=cleaned_up removed=%d what=%r", len(removed), [str(op) for op in removed])
            return 0
        announcer = make_announcer(args)
        nats = nats_settings(args, name=f"kube2ipvs-director-{args.host_name}")
        subscriber = StateSubscriber(nats)
        board = StatusBoard(nats)
        lease = Lease(nats, args.lease, args.host_name, ttl=args.lease_ttl) if args.mode == "arp" and args.lease \
            else None
        stats = LinuxStats(dsr)
        app = DirectorApp(
            ipvs, host, source=subscriber, settings=settings, readiness=BoardReadiness(board, args.host_name),
            stats=stats, announcer=announcer, leadership=lease,
            describe={"mode": args.mode, "host_name": args.host_name, "device": args.device,
                      "dataplane": "nftables" if dsr is not None else "ipvs",
                      **({"interface": dsr.interface, "maglev_size": dsr.table_size, "hash_seed": hex(dsr.seed),
                          "nft_table": f"netdev {dsr.table}"} if dsr is not None else {}),
                      "drain_timeout": args.drain_timeout,
                      "timeouts": {"tcp": settings.timeouts.tcp, "tcpfin": settings.timeouts.tcpfin,
                                   "udp": settings.timeouts.udp},
                      "vs_sysctls": dict(settings.vs_sysctls), "resync_interval": args.resync_interval,
                      "nats": nats.describe()},
        )
        listen_host, port = args.listen
        server = StatusServer(host=listen_hosts(listen_host), port=port, health=app.health, config=app.config,
                              registry=app.registry, config_token=args.config_token,
                              before_metrics=app.read_stats)
        await server.start()
        log.info("event=started role=director listen=%s mode=%s", server.listening, args.mode)
        try:
            await serve(app, subscriber, board, lease, host, stop)
        finally:
            await subscriber.close()
            await board.close()
            if lease is not None:
                await lease.close()
            await server.stop()
            stats.close()
            if announcer is not None:
                announcer.close()
        return 0
    finally:
        if app is not None:
            app.close()
        ipvs.close()
        host.close()


def run(argv: Sequence[str]) -> int:
    return run_role("director", argv, build_parser, amain)
