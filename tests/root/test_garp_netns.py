"""Gratuitous ARP and unsolicited NAs on a real link: a director namespace announces 1,000 IPv4
VIPs and a few IPv6 ones through `GarpSender` on the schedule an ARP director uses; the router
namespace captures every frame (AF_PACKET) and its neighbour table follows.

    router (r0, arp_accept=1) ──veth── director (d0)
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import struct
import threading
import time
from collections import defaultdict

import pytest
from pyroute2 import netns as pyroute2_netns

from kube2ipvs_director.garp import GarpSchedule, GarpSender
from tests.root.conftest import Lab, Netns, skip_reason

pytestmark = pytest.mark.root

VIPS = [f"10.{100 + i // 250}.{i % 250}.1" for i in range(1000)]
VIPS6 = [f"2001:db8:77::{i:x}" for i in range(1, 11)]
PERIOD = 1.0


@pytest.fixture
def link(lab: Lab) -> tuple[Netns, Netns]:
    if (reason := skip_reason()) is not None:
        pytest.skip(reason)
    router, director = lab.netns("garp-r"), lab.netns("garp-d")
    lab.link(router, "r0", director, "d0")
    router.exec("sysctl", "-qw", "net.ipv4.conf.r0.arp_accept=1")
    router.ip("addr", "add", "10.99.0.1/8", "dev", "r0")
    router.ip("-6", "addr", "add", "2001:db8:77::ffff/64", "dev", "r0", "nodad")
    return router, director


def capture(ns: Netns, stop: threading.Event, seen: dict[str, list[float]]) -> None:
    """Every ARP request and neighbour advertisement arriving on r0: VIP -> arrival times."""
    pyroute2_netns.pushns(ns.name)
    try:
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))  # ETH_P_ALL
        # A round of 1,010 frames arrives in a few ms: room for all of them (SO_RCVBUFFORCE, root).
        sock.setsockopt(socket.SOL_SOCKET, 33, 16 << 20)
        sock.bind(("r0", 0))
    finally:
        pyroute2_netns.popns()
    sock.settimeout(0.2)
    with sock:
        while not stop.is_set():
            try:
                frame = sock.recv(2048)
            except TimeoutError:
                continue
            now = time.monotonic()
            ethertype, = struct.unpack("!H", frame[12:14])
            if ethertype == 0x0806 and struct.unpack("!H", frame[20:22])[0] == 1:
                seen[socket.inet_ntoa(frame[28:32])].append(now)
            elif ethertype == 0x86DD and frame[20] == 58 and frame[54] == 136:
                seen[socket.inet_ntop(socket.AF_INET6, frame[62:78])].append(now)


def announce_for(ns: Netns, seconds: float, vips: list[str]) -> tuple[GarpSchedule, str, list[float]]:
    """Run the ARP director's schedule in `ns` for `seconds`; the schedule, the MAC, round times."""
    pyroute2_netns.pushns(ns.name)
    try:
        sender = GarpSender("d0")
    finally:
        pyroute2_netns.popns()
    schedule = GarpSchedule(period=PERIOD)
    rounds: list[float] = []
    start = time.monotonic()
    try:
        schedule.update(vips, start)
        while (now := time.monotonic()) - start < seconds:
            due = schedule.due(now)
            if due:
                t0 = time.perf_counter()
                sender.announce(due)
                rounds.append(time.perf_counter() - t0)
                schedule.sent(due, time.monotonic())
            wake = schedule.wake_at()
            time.sleep(max(0.0, (wake or now + 0.1) - time.monotonic()))
        return schedule, sender.mac.hex(":"), rounds
    finally:
        sender.close()


def test_every_one_of_1000_vips_is_announced_within_the_period_and_the_router_learns_our_mac(
    link: tuple[Netns, Netns],
) -> None:
    router, director = link
    # An IPv6 entry is only ever updated by an unsolicited NA, never created: make one (stale,
    # with another MAC) for the first VIP6, so its takeover shows the NA is valid.
    router.ip("-6", "neigh", "add", VIPS6[0], "lladdr", "02:00:00:00:00:99", "dev", "r0", "nud", "stale")
    seen: dict[str, list[float]] = defaultdict(list)
    stop = threading.Event()
    listener = threading.Thread(target=capture, args=(router, stop, seen))
    listener.start()
    time.sleep(0.3)  # the capture socket is bound
    try:
        schedule, mac, rounds = announce_for(director, 3.2, VIPS + VIPS6)
    finally:
        time.sleep(0.2)
        stop.set()
        listener.join()

    assert set(seen) == set(VIPS + VIPS6)
    gaps = [b - a for times in seen.values() for a, b in itertools.pairwise(times)]
    assert min(len(times) for times in seen.values()) >= 4  # at once, then about every 0.8 s
    assert max(gaps) <= PERIOD, max(gaps)  # the bound, as the router saw it
    assert schedule.max_interval <= PERIOD
    assert max(rounds) < 0.5  # a round of 1,010 frames
    neigh = router.ip("neigh", "show", "dev", "r0")
    assert f"{VIPS[0]} lladdr {mac}" in neigh
    assert f"{VIPS[-1]} lladdr {mac}" in neigh
    assert f"{VIPS6[0]} lladdr {mac}" in router.ip("-6", "neigh", "show", "dev", "r0")


def test_a_director_app_in_arp_mode_announces_through_the_real_sender(link: tuple[Netns, Netns]) -> None:
    from kube2ipvs_director.app import DirectorApp, DirectorSettings, default_vs_sysctls
    from kube2ipvs_director.host import FakeHost
    from tests.test_director_app import TWO_NODES, CountingIpvs, cluster

    router, director = link
    pyroute2_netns.pushns(director.name)
    try:
        sender = GarpSender("d0")
    finally:
        pyroute2_netns.popns()
    app = DirectorApp(CountingIpvs(), FakeHost(), source=None, announcer=sender,
                      settings=DirectorSettings(mode="arp", vs_sysctls=default_vs_sysctls("arp")))
    try:
        app.offer(cluster(1, TWO_NODES, vips=("10.100.0.1",)))
        asyncio.run(app.reconcile_once())
        assert asyncio.run(app.announce_due()) == 1
        time.sleep(0.2)
        assert f"10.100.0.1 lladdr {sender.mac.hex(':')}" in router.ip("neigh", "show", "dev", "r0")
    finally:
        app.close()
        sender.close()
