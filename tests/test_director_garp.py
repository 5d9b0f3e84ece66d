"""Gratuitous ARP: the schedule's bound on the interval of every VIP, the frames' bytes, and the
announcing loop of an ARP director (strict fakes). Real frames: tests/root/test_garp_netns.py."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

from prometheus_client import generate_latest

from kube2ipvs_director.app import DirectorApp, DirectorSettings, default_vs_sysctls
from kube2ipvs_director.garp import GarpSchedule, _checksum, garp_frame, na_frame
from kube2ipvs_director.host import FakeHost
from tests.test_director_app import TWO_NODES, CountingIpvs, cluster

MAC = bytes.fromhex("020000000001")


def test_new_vips_are_due_at_once_then_every_period_and_gone_ones_are_forgotten() -> None:
    s = GarpSchedule(period=2.0)
    s.update(["192.0.2.2", "192.0.2.1"], now=10.0)
    assert s.due(10.0) == ["192.0.2.1", "192.0.2.2"]
    s.sent(s.due(10.0), 10.0)
    assert s.due(11.5) == []
    assert s.wake_at() == 11.6  # 0.8 of the period: the round and the timer fit in the rest
    s.update(["192.0.2.1", "192.0.2.3"], now=11.0)  # .2 leaves, .3 comes
    assert s.due(11.0) == ["192.0.2.3"]
    s.sent(["192.0.2.3"], 11.0)
    assert s.due(11.6) == ["192.0.2.1"]
    s.sent(["192.0.2.1"], 11.7)
    assert abs(s.max_interval - 1.7) < 1e-9
    assert set(s.next_due) == {"192.0.2.1", "192.0.2.3"}


def test_however_many_vips_each_is_announced_within_the_period() -> None:
    s = GarpSchedule(period=2.0)
    vips = [f"10.{i // 250}.{i % 250}.1" for i in range(5000)]
    s.update(vips, 0.0)
    now = 0.0
    while now < 20.0:
        due = s.due(now)
        s.sent(due, now + 0.05)  # sending 5,000 frames takes a while
        wake = s.wake_at()
        assert wake is not None
        now = max(now + 0.01, wake)
    assert s.max_interval <= 2.0  # the period, although a round takes 0.05 s


def test_the_garp_is_an_arp_request_for_the_vip_from_the_vip() -> None:
    frame = garp_frame(MAC, "192.0.2.10")
    assert frame[:6] == b"\xff" * 6
    assert frame[6:12] == MAC
    ethertype, = struct.unpack("!H", frame[12:14])
    htype, ptype, hlen, plen, op = struct.unpack("!HHBBH", frame[14:22])
    assert (ethertype, htype, ptype, hlen, plen, op) == (0x0806, 1, 0x0800, 6, 4, 1)
    assert frame[22:28] == MAC
    assert socket.inet_ntoa(frame[28:32]) == socket.inet_ntoa(frame[38:42]) == "192.0.2.10"


def test_the_na_is_an_unsolicited_override_advertisement_with_a_valid_checksum() -> None:
    frame = na_frame(MAC, "2001:db8::10")
    assert frame[:6] == bytes.fromhex("333300000001")
    ip6, icmp = frame[14:54], frame[54:]
    assert ip6[6] == 58
    assert ip6[7] == 255
    assert socket.inet_ntop(socket.AF_INET6, ip6[8:24]) == "2001:db8::10"
    assert socket.inet_ntop(socket.AF_INET6, ip6[24:40]) == "ff02::1"
    assert icmp[0] == 136
    flags, = struct.unpack("!I", icmp[4:8])
    assert flags == 0x20000000  # override, not solicited, not router
    assert socket.inet_ntop(socket.AF_INET6, icmp[8:24]) == "2001:db8::10"
    assert icmp[24:26] == b"\x02\x01"
    assert icmp[26:32] == MAC
    pseudo = ip6[8:40] + struct.pack("!I", len(icmp)) + b"\x00\x00\x00\x3a"
    assert _checksum(pseudo + icmp) == 0  # the sum over the whole, checksum included, verifies


@dataclass
class Recorder:
    rounds: list[list[str]] = field(default_factory=list)

    def announce(self, vips: Iterable[str]) -> int:
        self.rounds.append(list(vips))
        return len(self.rounds[-1])


def test_an_arp_director_announces_what_it_serves_at_once_and_then_every_period() -> None:
    clock = [100.0]
    recorder = Recorder()
    app = DirectorApp(CountingIpvs(), FakeHost(), source=None, announcer=recorder, clock=lambda: clock[0],
                      settings=DirectorSettings(mode="arp", vs_sysctls=default_vs_sysctls("arp"), garp_period=2.0))

    async def scenario() -> None:
        assert await app.announce_due() == 0  # nothing served before the first reconcile
        app.offer(cluster(1, TWO_NODES, vips=("192.0.2.1", "192.0.2.2")))
        await app.reconcile_once()
        assert await app.announce_due() == 2
        clock[0] = 101.5
        assert await app.announce_due() == 0
        app.offer(cluster(2, TWO_NODES, vips=("192.0.2.1", "192.0.2.2", "192.0.2.3")))
        await app.reconcile_once()
        assert app._garp_kick.is_set()  # the loop wakes for the new VIP at once
        assert await app.announce_due() == 1
        clock[0] = 101.6
        assert await app.announce_due() == 2

    asyncio.run(scenario())
    assert recorder.rounds == [["192.0.2.1", "192.0.2.2"], ["192.0.2.3"], ["192.0.2.1", "192.0.2.2"]]
    text = generate_latest(app.registry).decode()
    assert "kube2ipvs_director_garp_sent_total 5.0" in text
    assert abs(app.garp.max_interval - 1.6) < 1e-9  # 100.0 -> 101.6
    assert "kube2ipvs_director_garp_max_interval_seconds 1.59999" in text
    app.close()
