"""ARP-mode failover between two directors sharing a NATS lease, on real links:

    router (br0 10.99.0.1/8, arp_accept=1) ─┬─veth─ director A (a0 10.99.0.11, VIPs on lo when active)
                                            └─veth─ director B (b0 10.99.0.12, standby)

Both run DirectorApp in this process (strict IPVS fake: the host has no IPVS; the VM lane covers
IPVS) with the real VIP addresses (LinuxHost in their namespace), the real gratuitous ARP sender
and a real nats-server lease. A holds the VIP and the router's neighbour entry points at A's
MAC; when A's host goes away (its link down, its process gone: no more renewals), B takes the
lease after it expires, puts the VIP on its lo and announces it, and the router's entry moves to
B's MAC within the 3 s target. A planned stop of A hands over at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import pytest
from pyroute2 import netns as pyroute2_netns

from kube2ipvs.natskv import Lease, NatsSettings
from kube2ipvs_director.app import DirectorApp, DirectorSettings
from kube2ipvs_director.garp import GarpSender
from kube2ipvs_director.host import LinuxHost
from tests.natsfixture import running_nats_server
from tests.root.conftest import Lab, Netns, skip_reason
from tests.test_director_app import TWO_NODES, CountingIpvs, cluster

pytestmark = pytest.mark.root

VIP = "10.100.0.1"
TTL = 1.5
TARGET = 3.0


def topology(lab: Lab) -> tuple[Netns, Netns, Netns]:
    router, a, b = lab.netns("fo-r"), lab.netns("fo-a"), lab.netns("fo-b")
    router.ip("link", "add", "br0", "type", "bridge")
    router.ip("link", "set", "br0", "up")
    for ns, name, address in ((a, "a0", "10.99.0.11/8"), (b, "b0", "10.99.0.12/8")):
        lab.link(ns, name, router, f"r-{name}")
        router.ip("link", "set", f"r-{name}", "master", "br0")
        ns.ip("addr", "add", address, "dev", name)
    router.ip("addr", "add", "10.99.0.1/8", "dev", "br0")
    router.exec("sysctl", "-qw", "net.ipv4.conf.br0.arp_accept=1")
    return router, a, b


def router_mac_for(router: Netns) -> str | None:
    for line in router.ip("neigh", "show", VIP, "dev", "br0").splitlines():
        words = line.split()
        if "lladdr" in words:
            return words[words.index("lladdr") + 1]
    return None


def director(ns: Netns, interface: str, nats: NatsSettings, name: str) -> tuple[DirectorApp, GarpSender, Lease]:
    pyroute2_netns.pushns(ns.name)
    try:
        sender = GarpSender(interface)
    finally:
        pyroute2_netns.popns()
    lease = Lease(nats, "arp-directors", name, ttl=TTL, bucket="k2i-failover-test")
    app = DirectorApp(CountingIpvs(), LinuxHost(device="lo", netns=ns.name), source=None, announcer=sender,
                      leadership=lease, settings=DirectorSettings(mode="arp", vs_sysctls={}, garp_period=1.0,
                                                                  resync_interval=0.5))
    return app, sender, lease


async def until(test: object, seconds: float) -> float:
    """Seconds until `test()` held (fails after `seconds`)."""
    start = time.monotonic()
    while not test():  # type: ignore[operator]
        if time.monotonic() - start > seconds:
            pytest.fail(f"not within {seconds} s")
        await asyncio.sleep(0.02)
    return time.monotonic() - start


def test_the_standby_takes_the_vip_within_the_target_when_the_active_director_is_gone(
    lab: Lab, tmp_path: Path
) -> None:
    if (reason := skip_reason()) is not None:
        pytest.skip(reason)
    router, a_ns, b_ns = topology(lab)
    with running_nats_server(tmp_path / "nats") as server:
        nats = NatsSettings(servers=(server.url,), reconnect_wait=0.1, connect_timeout=1.0, request_timeout=2.0)
        state = cluster(1, TWO_NODES, vips=(VIP,))

        async def scenario() -> None:
            a, a_sender, a_lease = director(a_ns, "a0", nats, "dir-a")
            b, b_sender, b_lease = director(b_ns, "b0", nats, "dir-b")
            await a_lease.start()
            await b_lease.start()
            a_task = asyncio.create_task(a.run())
            try:
                a.offer(state)
                await until(lambda: router_mac_for(router) == a_sender.mac.hex(":"), 10)
                b.offer(state)
                b_task = asyncio.create_task(b.run())
                try:
                    await asyncio.sleep(2 * TTL)
                    assert (a.active, b.active) == (True, False)  # one active director
                    assert VIP not in b_ns.ip("addr", "show", "dev", "lo")
                    assert router_mac_for(router) == a_sender.mac.hex(":")

                    # A's host goes away: no more renewals, no more frames.
                    a_task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await a_task
                    a_ns.ip("link", "set", "a0", "down")
                    took = await until(lambda: router_mac_for(router) == b_sender.mac.hex(":"), 10)
                    print(f"takeover: the router moved to the standby {took:.2f} s after the active one went")
                    assert took <= TARGET, took
                    assert b.active
                    assert VIP in b_ns.ip("addr", "show", "dev", "lo")
                finally:
                    b_task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await b_task
            finally:
                if not a_task.done():
                    a_task.cancel()
                for app, sender, lease in ((a, a_sender, a_lease), (b, b_sender, b_lease)):
                    app.close()
                    sender.close()
                    await lease.close()

        asyncio.run(scenario())
