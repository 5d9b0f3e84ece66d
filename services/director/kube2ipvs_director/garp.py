"""Gratuitous ARP (IPv4) and unsolicited neighbour advertisements (IPv6) for the VIPs an ARP-mode
director serves: the schedule is pure (`GarpSchedule`), the sender is raw frames on the interface
(`GarpSender`; no `arping` exec).

Why not the original's loop of `arping` execs: `arping -U -c 1` takes a full second per VIP (it
waits one interval after its last probe), so with hundreds of VIPs some were announced minutes
apart. Here one frame costs tens of microseconds, and the schedule bounds the interval for every
VIP: a VIP is announced when it appears (at once: that is what moves traffic on a failover) and
then again every `period` seconds, all of them, whatever their number.

What the neighbours do with it: a router updates (or, with `arp_accept=1`, creates) its entry for
the VIP with our MAC. IPv4: an ARP request "who-has VIP tell VIP" from our MAC to the broadcast
address, as `arping -U` sends it. IPv6: a neighbour advertisement for VIP to all-nodes (ff02::1),
with the override flag and our link-layer address, hop limit 255 (RFC 4861 7.2.6).
"""

from __future__ import annotations

import fcntl
import ipaddress
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

ETH_P_ARP: Final = 0x0806
ETH_P_IPV6: Final = 0x86DD
SIOCGIFHWADDR: Final = 0x8927
BROADCAST: Final = b"\xff" * 6
ALL_NODES: Final = "ff02::1"
ALL_NODES_MAC: Final = bytes.fromhex("333300000001")
NA_OVERRIDE: Final = 0x20000000
# A VIP is next due this share of the period after it was sent: the interval the neighbours see
# is that plus the time of a round and of the timer's slack, and must stay within the period.
RESEND_FRACTION: Final = 0.8


@dataclass
class GarpSchedule:
    """When each VIP is announced next. Pure: the caller passes the clock.

    `update(vips, now)`: new VIPs become due at once, gone ones are forgotten. `due(now)`: the
    VIPs to announce now (earliest first). `sent(vips, now)`: they are next due
    `RESEND_FRACTION * period` later, so that with the round's own time the interval between
    two announcements of a VIP stays within `period`.
    `max_interval`: the largest time between two announcements of one VIP seen so far (the
    metric that shows the bound holds).
    """

    period: float = 2.0
    next_due: dict[str, float] = field(default_factory=dict)
    last_sent: dict[str, float] = field(default_factory=dict)
    max_interval: float = 0.0

    def update(self, vips: Iterable[str], now: float) -> None:
        wanted = set(vips)
        for vip in list(self.next_due):
            if vip not in wanted:
                del self.next_due[vip]
                self.last_sent.pop(vip, None)
        for vip in wanted - self.next_due.keys():
            self.next_due[vip] = now

    def due(self, now: float) -> list[str]:
        return sorted((v for v, t in self.next_due.items() if t <= now), key=lambda v: (self.next_due[v], v))

    def sent(self, vips: Iterable[str], now: float) -> None:
        for vip in vips:
            if vip not in self.next_due:
                continue
            before = self.last_sent.get(vip)
            if before is not None:
                self.max_interval = max(self.max_interval, now - before)
            self.last_sent[vip] = now
            self.next_due[vip] = now + self.period * RESEND_FRACTION

    def wake_at(self) -> float | None:
        return min(self.next_due.values(), default=None)


def garp_frame(mac: bytes, vip: str) -> bytes:
    """Ethernet + ARP request "who-has VIP tell VIP" from `mac`, to the broadcast address."""
    ip = socket.inet_aton(vip)
    arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + mac + ip + b"\x00" * 6 + ip
    return BROADCAST + mac + struct.pack("!H", ETH_P_ARP) + arp


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\x00"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def na_frame(mac: bytes, vip: str) -> bytes:
    """Ethernet + IPv6 + ICMPv6 unsolicited neighbour advertisement for `vip` (override flag,
    target link-layer address option), from `vip` to all-nodes, hop limit 255."""
    source = socket.inet_pton(socket.AF_INET6, vip)
    dest = socket.inet_pton(socket.AF_INET6, ALL_NODES)
    body = struct.pack("!I", NA_OVERRIDE) + source + struct.pack("!BB", 2, 1) + mac  # option 2: target LLA
    pseudo = source + dest + struct.pack("!I", 4 + len(body)) + b"\x00\x00\x00" + bytes([58])
    icmp = struct.pack("!BBH", 136, 0, _checksum(pseudo + struct.pack("!BBH", 136, 0, 0) + body)) + body
    ip6 = struct.pack("!IHBB", 6 << 28, len(icmp), 58, 255) + source + dest
    return ALL_NODES_MAC + mac + struct.pack("!H", ETH_P_IPV6) + ip6 + icmp


def frame_for(mac: bytes, vip: str) -> bytes:
    return na_frame(mac, vip) if ipaddress.ip_address(vip).version == 6 else garp_frame(mac, vip)


class GarpSender:
    """Raw frames out of `interface` (CAP_NET_RAW). The socket works in the network namespace of
    the thread that created it (tests create it inside theirs)."""

    def __init__(self, interface: str) -> None:
        self.interface = interface
        self._sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP))
        try:
            self._sock.bind((interface, 0))
            request = struct.pack("256s", interface.encode()[:15])
            self.mac = fcntl.ioctl(self._sock.fileno(), SIOCGIFHWADDR, request)[18:24]
        except OSError:
            self._sock.close()
            raise
        self._frames: dict[str, bytes] = {}

    def close(self) -> None:
        self._sock.close()

    def announce(self, vips: Iterable[str]) -> int:
        """One frame per VIP; returns how many went out (a send error stops and raises)."""
        count = 0
        for vip in vips:
            frame = self._frames.get(vip)
            if frame is None:
                if len(self._frames) > 65536:
                    self._frames.clear()  # VIPs that left; rebuilding a frame costs microseconds
                frame = self._frames[vip] = frame_for(self.mac, vip)
            self._sock.send(frame)
            count += 1
        return count
