"""ARP-mode failover between two directors sharing a NATS lease, with traffic, on real links:

    client 203.0.113.2 ── router (br0 10.99.0.1/8, arp_accept=1) ─┬─ director A a0 10.99.0.11 (active)
                                                                  ├─ director B b0 10.99.0.12 (standby)
                                                                  ├─ node n1 ── pod n1
                                                                  ├─ node n2 ── pod n2
                                                                  └─ node n3 ── pod n3

Both directors run DirectorApp in this process on the nftables dataplane (the host has no IPVS;
the VM lane covers IPVS), with the real VIP addresses (LinuxHost in their namespace), the real
gratuitous ARP sender and a real nats-server lease. The nodes hold the VIP on lo without
answering ARP for it and DNAT it to their pod (tests/root/test_dsr_netns.py's nodes). A holds
the VIP and the router's neighbour entry points at A's MAC; when A's host goes away (its link
down, its process gone: no more renewals), B takes the lease after it expires, puts the VIP on
its lo and announces it: the router's entry moves to B's MAC, and a client sending a request
every 50 ms gets answers again, within the 3 s target. A planned stop of A hands over at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from pyroute2 import netns as pyroute2_netns

from kube2ipvs.natskv import Lease, NatsSettings
from kube2ipvs_director.app import DirectorApp, DirectorSettings
from kube2ipvs_director.garp import GarpSender
from kube2ipvs_director.plan import Timeouts
from tests.natsfixture import running_nats_server
from tests.root.conftest import Lab, Netns, skip_reason
from tests.root.test_dsr_netns import CLIENT, NODES, add_node, state
from tests.root.test_dsr_netns import director as dsr_director

pytestmark = pytest.mark.root

VIP = "10.100.0.1"
TTL = 1.5
TARGET = 3.0


def topology(lab: Lab) -> tuple[Netns, Netns, Netns, Netns]:
    router, a, b, client = lab.netns("fo-r"), lab.netns("fo-a"), lab.netns("fo-b"), lab.netns("fo-c")
    router.exec("sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv4.conf.all.rp_filter=0",
                "net.ipv4.conf.default.rp_filter=0")
    router.ip("link", "add", "br0", "type", "bridge")
    router.ip("link", "set", "br0", "up")
    for ns, name, address in ((a, "a0", "10.99.0.11/8"), (b, "b0", "10.99.0.12/8")):
        lab.link(ns, name, router, f"r-{name}")
        router.ip("link", "set", f"r-{name}", "master", "br0")
        ns.ip("addr", "add", address, "dev", name)
    router.ip("addr", "add", "10.99.0.1/8", "dev", "br0")
    router.exec("sysctl", "-qw", "net.ipv4.conf.br0.arp_accept=1")
    lab.link(router, "rc", client, "eth0")
    router.ip("addr", "add", "203.0.113.1/24", "dev", "rc")
    client.ip("addr", "add", f"{CLIENT}/24", "dev", "eth0")
    client.ip("route", "add", "default", "via", "203.0.113.1")
    for name in NODES:
        add_node(lab, router, name, VIP)
    return router, a, b, client


class Prober(threading.Thread):
    """A client in `ns` asking the VIP's UDP echo every 50 ms, each time from a new socket (a new
    flow); records (time sent, answered within 200 ms)."""

    def __init__(self, ns: Netns) -> None:
        super().__init__(daemon=True)
        self.ns = ns
        self.results: list[tuple[float, bool]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        pyroute2_netns.pushns(self.ns.name)  # this thread's sockets are the client's
        try:
            while not self.stop.is_set():
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                    s.settimeout(0.2)
                    sent = time.monotonic()
                    s.sendto(b"ping", (VIP, 80))
                    try:
                        s.recvfrom(2048)
                        self.results.append((sent, True))
                    except TimeoutError:
                        self.results.append((sent, False))
                self.stop.wait(max(0.0, 0.05 - (time.monotonic() - sent)))
        finally:
            pyroute2_netns.popns()

    def answered_since(self, t: float) -> float | None:
        """Seconds from `t` to the first answered request sent after it."""
        return next((sent - t for sent, ok in self.results if ok and sent >= t), None)


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
    app, _ = dsr_director(ns, interface, announcer=sender, leadership=lease,
                          settings=DirectorSettings(mode="arp", vs_sysctls={}, timeouts=Timeouts(), garp_period=1.0,
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


@dataclass(frozen=True, slots=True)
class Takeover:
    """One failover, measured from the moment the active director's host went away."""

    neighbour_moved: float  # until the router's entry for the VIP holds the standby's MAC
    traffic_back: float  # until the first answered request sent after it
    unanswered: int  # requests sent after it that got no answer
    requests: int


async def failover_round(router: Netns, a_ns: Netns, b_ns: Netns, client: Netns, nats: NatsSettings) -> Takeover:
    """A (active) and B (standby) share the lease and serve the VIP; A's host goes away (its
    process and its link); B takes over. Asserts one active director before and B holding the
    VIP after; returns what it measured (this test, and bench/bench_failover.py)."""
    target = state(1, list(NODES), VIP)
    prober = Prober(client)
    a, a_sender, a_lease = director(a_ns, "a0", nats, "dir-a")
    b, b_sender, b_lease = director(b_ns, "b0", nats, "dir-b")
    await a_lease.start()
    await b_lease.start()
    a_task = asyncio.create_task(a.run())
    b_task: asyncio.Task[None] | None = None
    try:
        a.offer(target)
        await until(lambda: router_mac_for(router) == a_sender.mac.hex(":"), 10)
        b.offer(target)
        b_task = asyncio.create_task(b.run())
        await asyncio.sleep(2 * TTL)
        assert (a.active, b.active) == (True, False)  # one active director
        assert VIP not in b_ns.ip("addr", "show", "dev", "lo")
        assert router_mac_for(router) == a_sender.mac.hex(":")
        prober.start()
        await until(lambda: prober.answered_since(0) is not None, 5)  # traffic flows through A

        # A's host goes away: no more renewals, no more frames.
        a_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await a_task
        a_ns.ip("link", "set", "a0", "down")
        gone = time.monotonic()
        moved = await until(lambda: router_mac_for(router) == b_sender.mac.hex(":"), 10)
        assert b.active
        assert VIP in b_ns.ip("addr", "show", "dev", "lo")
        await until(lambda: prober.answered_since(gone) is not None, 10)
        back = prober.answered_since(gone)
        assert back is not None
        await asyncio.sleep(1.0)
        after = [ok for sent, ok in prober.results if sent >= gone]
        return Takeover(moved, back, sum(1 for ok in after if not ok), len(after))
    finally:
        prober.stop.set()
        for task in (a_task, b_task):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for app, sender, lease in ((a, a_sender, a_lease), (b, b_sender, b_lease)):
            app.close()
            sender.close()
            await lease.close()


def test_the_standby_takes_the_vip_within_the_target_when_the_active_director_is_gone(
    lab: Lab, tmp_path: Path
) -> None:
    if (reason := skip_reason()) is not None:
        pytest.skip(reason)
    router, a_ns, b_ns, client = topology(lab)
    with running_nats_server(tmp_path / "nats") as server:
        nats = NatsSettings(servers=(server.url,), reconnect_wait=0.1, connect_timeout=1.0, request_timeout=2.0)
        took = asyncio.run(failover_round(router, a_ns, b_ns, client, nats))
    print(f"takeover: the router moved to the standby {took.neighbour_moved:.2f} s after the active one went; "
          f"answers again {took.traffic_back:.2f} s after ({took.unanswered} requests unanswered)")
    assert took.neighbour_moved <= TARGET, took
    assert took.traffic_back <= TARGET, took
