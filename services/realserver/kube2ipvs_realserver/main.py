"""`kube2ipvs realserver`: flags, wiring, and shutdown.

Start-up: status server, then the NATS subscriber for this node's slice, then the loop.
Shutdown on SIGTERM: stop the loop, close NATS and the status server; the kernel keeps the
tables and addresses as they are (a restart finds them converged and changes nothing).
`--cleanup` instead removes our tables and addresses and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from kube2ipvs.heartbeat import heartbeat
from kube2ipvs.natskv import NodeSliceSubscriber, StatusBoard
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
from kube2ipvs_realserver.app import AppSettings, RealserverApp, cleanup
from kube2ipvs_realserver.kernel import LinuxKernel, label_for
from kube2ipvs_realserver.plan import Settings

log = logging.getLogger("kube2ipvs.realserver")


def build_parser() -> argparse.ArgumentParser:
    p = RoleParser(prog="kube2ipvs realserver",
                   description="Hold this node's VIPs on loopback and DNAT them to the local pods with one "
                               "owned nftables table.")
    add(p, "--node", default=os.environ.get("NODE_NAME"), help="this node's name (default $NODE_NAME)")
    add(p, "--device", default="lo", help="device that holds the VIP addresses (default lo)")
    add(p, "--interface", metavar="DEV", help="primary interface: gets the ARP sysctls too")
    add(p, "--arp-ignore", type=int, default=1, help="net.ipv4.conf.<dev>.arp_ignore (default 1)")
    add(p, "--arp-announce", type=int, default=2, help="net.ipv4.conf.<dev>.arp_announce (default 2)")
    add(p, "--tunnel-device", default="tunl0",
        help="IPIP tunnel device: gets rp_filter=2 while a service uses IPIP (default tunl0)")
    add(p, "--masquerade", action="store_true", help="masquerade VIP traffic (off: client IPs preserved)")
    add(p, "--masquerade-exempt", action="append", metavar="CIDR", help="sources never masqueraded, repeatable")
    add(p, "--resync-interval", type=positive_float, default=10.0, metavar="S",
        help="re-read the kernel and repair drift this often (default 10)")
    add(p, "--counters-interval", type=positive_float, default=10.0, metavar="S",
        help="a /metrics scrape reads the kernel counters again when the last reading is older "
             "than this (default 10)")
    add(p, "--state-file", metavar="FILE", help="where the digest of the applied table is kept "
                                                "(default /run/kube2ipvs/realserver-<device>.json)")
    add(p, "--cleanup", action="store_true", help="delete our nft tables and VIP addresses, then exit")
    add_common(p, "realserver")
    return p


def realserver_settings(args: argparse.Namespace) -> Settings:
    if label_for(args.device) is None:
        log.info("event=no_label reason=device-name-too-long device=%s", args.device)
    exempt = tuple(args.masquerade_exempt or ()) if args.masquerade or args.masquerade_exempt else None
    return Settings(device=args.device, interface=args.interface, arp_ignore=args.arp_ignore,
                    arp_announce=args.arp_announce, masquerade_exempt=exempt, tunnel_device=args.tunnel_device)


async def amain(args: argparse.Namespace, stop: asyncio.Event) -> int:
    settings = realserver_settings(args)
    kernel = LinuxKernel(device=args.device, state_file=Path(args.state_file) if args.state_file else None)
    try:
        if args.cleanup:
            removed = await asyncio.to_thread(cleanup, kernel)
            log.info("event=cleaned_up removed=%d", len(removed))
            return 0
        if not args.node:
            raise RoleUsageError("--node (or $NODE_NAME) is required")
        nats = nats_settings(args, name=f"kube2ipvs-realserver-{args.node}")
        subscriber = NodeSliceSubscriber(nats, args.node)
        board = StatusBoard(nats)
        app = RealserverApp(
            kernel, source=subscriber, settings=settings,
            app_settings=AppSettings(resync_interval=args.resync_interval,
                                     counters_interval=args.counters_interval),
            describe={"node": args.node, "device": args.device, "interface": args.interface,
                      "arp_ignore": args.arp_ignore, "arp_announce": args.arp_announce,
                      "masquerade_exempt": settings.masquerade_exempt, "resync_interval": args.resync_interval,
                      "nats": nats.describe()},
        )
        host, port = args.listen
        server = StatusServer(host=listen_hosts(host), port=port, health=app.health, config=app.config,
                              registry=app.registry, config_token=args.config_token,
                              before_metrics=app.read_counters)
        await server.start()
        log.info("event=started role=realserver listen=%s node=%s", server.listening, args.node)
        try:
            await subscriber.start()
            # The board connects in the background; the health beat retries until it is there.
            tasks = [asyncio.create_task(app.run(), name="realserver"),
                     asyncio.create_task(board.start(), name="status-board"),
                     asyncio.create_task(heartbeat(board, "realserver", args.node, app.health), name="heartbeat")]
            await stop.wait()
            log.info("event=stopping role=realserver")
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        finally:
            await subscriber.close()
            await board.close()
            await server.stop()
            app.close()
        return 0
    finally:
        kernel.close()


def run(argv: Sequence[str]) -> int:
    return run_role("realserver", argv, build_parser, amain)
