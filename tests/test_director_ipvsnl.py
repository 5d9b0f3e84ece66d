"""The raw IPVS netlink client (`kube2ipvs_director.ipvsnl`) without a kernel: the bytes each op
becomes (laid out here by hand from linux/ip_vs.h), dump replies crafted the same way, and how
acks map back to op indexes, through a fake socket that acks like the kernel (one datagram per
ack, the messages of one `send` handled in order)."""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from kube2ipvs_director import ipvsnl
from kube2ipvs_director.kernel import ApplyError, LinuxIpvs
from kube2ipvs_director.plan import (
    AddDest,
    AddService,
    DelDest,
    DelService,
    EditDest,
    EditService,
    ObservedDest,
    ObservedService,
    Op,
    ServiceId,
    Timeouts,
)

FAMILY = 0x1D  # the id the fake kernel gives "IPVS"
V4 = ServiceId("192.0.2.10", 4, 80, "tcp")
V6 = ServiceId("2001:db8::10", 6, 53, "udp")


def nla(kind: int, value: bytes) -> bytes:
    return struct.pack("=HH", 4 + len(value), kind) + value + bytes(-(4 + len(value)) % 4)


def u16(v: int) -> bytes:
    return struct.pack("=H", v)


def u32(v: int) -> bytes:
    return struct.pack("=I", v)


def be16(v: int) -> bytes:
    return struct.pack(">H", v)


def v4(address: str) -> bytes:
    return socket.inet_aton(address) + bytes(12)


def svc_key(af: int, proto: int, addr: bytes, port: int) -> bytes:
    return nla(1, u16(af)) + nla(2, u16(proto)) + nla(3, addr) + nla(4, be16(port))


def parse(data: bytes) -> list[tuple[int, int, int, int, bytes]]:
    """(type, flags, seq, cmd, attributes) of each message of a `send`."""
    out = []
    offset = 0
    while offset < len(data):
        size, kind, flags, seq, _pid = struct.unpack_from("=IHHII", data, offset)
        cmd, version, _ = struct.unpack_from("=BBH", data, offset + 16)
        assert version == 1
        out.append((kind, flags, seq, cmd, data[offset + 20:offset + size]))
        offset += (size + 3) & ~3
    return out


def reply(kind: int, seq: int, body: bytes, flags: int = 0) -> bytes:
    return struct.pack("=IHHII", 16 + len(body), kind, flags, seq, 0) + body


def ack(seq: int, code: int = 0) -> bytes:
    """NLMSG_ERROR with the request's header echoed (NETLINK_CAP_ACK: no payload)."""
    return reply(2, seq, struct.pack("=i", -code) + struct.pack("=IHHII", 20, FAMILY, 5, seq, 0))


def genl(cmd: int, attrs: bytes) -> bytes:
    return struct.pack("=BBH", cmd, 1, 0) + attrs


Handler = Callable[[int, int, bytes], "int | list[bytes]"]


@dataclass
class FakeKernel:
    """A netlink socket whose kernel side is `handler(cmd, flags, attrs)`: an errno (0: done)
    or, for a dump, the genetlink payloads of the reply messages."""

    handler: Handler
    sends: list[bytes] = field(default_factory=list)
    queue: list[bytes] = field(default_factory=list)
    closed: bool = False

    def send(self, data: bytes, /) -> int:
        self.sends.append(data)
        for kind, flags, seq, cmd, attrs in parse(data):
            result = self.handler(cmd, flags, attrs) if kind == FAMILY else 0
            if isinstance(result, list):
                body = b"".join(reply(FAMILY, seq, p, flags=2) for p in result)
                self.queue.append(body)
                self.queue.append(reply(3, seq, struct.pack("=i", 0), flags=2))
            else:
                self.queue.append(ack(seq, result))
        return len(data)

    def recv(self, size: int, /) -> bytes:
        assert self.queue, "recv with nothing queued: the client waits for an ack that never comes"
        return self.queue.pop(0)

    def close(self) -> None:
        self.closed = True

    def requests(self) -> list[tuple[int, bytes]]:
        return [(cmd, attrs) for data in self.sends for _k, _f, _s, cmd, attrs in parse(data)]


def client(handler: Handler) -> tuple[ipvsnl.NetlinkIpvs, FakeKernel]:
    fake = FakeKernel(handler)
    return ipvsnl.NetlinkIpvs(sock=fake, family=FAMILY), fake


def ok(cmd: int, flags: int, attrs: bytes) -> int:
    return 0


# -- encoding -----------------------------------------------------------------------------------

def test_an_ipv4_service_add_carries_key_scheduler_flags_timeout_and_host_netmask() -> None:
    cmd, attrs = ipvsnl.op_request(AddService(V4, "mh", (1, 2)))
    body = (svc_key(socket.AF_INET, socket.IPPROTO_TCP, v4("192.0.2.10"), 80) + nla(6, b"mh\0")
            + nla(7, struct.pack("=II", 0x8 | 0x10, 0xFFFF)) + nla(8, u32(0)) + nla(9, b"\xff" * 4))
    assert cmd == 1
    assert attrs == nla(1 | 0x8000, body)


def test_an_ipv6_service_set_has_prefix_length_128_as_its_netmask() -> None:
    cmd, attrs = ipvsnl.op_request(EditService(V6, "wlc", ()))
    addr = socket.inet_pton(socket.AF_INET6, "2001:db8::10")
    body = (svc_key(socket.AF_INET6, socket.IPPROTO_UDP, addr, 53) + nla(6, b"wlc\0")
            + nla(7, struct.pack("=II", 0, 0xFFFF)) + nla(8, u32(0)) + nla(9, u32(128)))
    assert (cmd, attrs) == (2, nla(1 | 0x8000, body))


def test_an_add_turned_into_a_set_keeps_its_attributes() -> None:
    add = ipvsnl.op_request(AddService(V4, "rr", (3,)))
    assert ipvsnl.op_request(AddService(V4, "rr", (3,)), as_set=True) == (2, add[1])
    dest = AddDest(V4, "198.51.100.1", 80, "g", 3, 750, 75)
    assert ipvsnl.op_request(dest, as_set=True) == (6, ipvsnl.op_request(dest)[1])


def test_a_service_delete_names_the_service_only() -> None:
    assert ipvsnl.op_request(DelService(V4)) == (3, nla(1 | 0x8000, svc_key(2, 6, v4("192.0.2.10"), 80)))


def test_a_dest_add_carries_every_attribute_set_dest_needs() -> None:
    cmd, attrs = ipvsnl.op_request(AddDest(V4, "198.51.100.1", 8080, "i", 7, 1000, 100))
    dest = (nla(1, v4("198.51.100.1")) + nla(2, be16(8080)) + nla(11, u16(socket.AF_INET)) + nla(3, u32(2))
            + nla(4, u32(7)) + nla(13, b"\0") + nla(14, be16(0)) + nla(15, u16(0)) + nla(5, u32(1000))
            + nla(6, u32(100)))
    assert cmd == 5
    assert attrs == nla(1 | 0x8000, svc_key(2, 6, v4("192.0.2.10"), 80)) + nla(2 | 0x8000, dest)


def test_forwarding_methods_are_the_kernel_numbers() -> None:
    for forwarding, number in (("m", 0), ("local", 1), ("i", 2), ("g", 3), ("bypass", 4)):
        _cmd, attrs = ipvsnl.op_request(EditDest(V4, "198.51.100.1", 80, forwarding, 1, 0, 0))  # type: ignore[arg-type]
        assert nla(3, u32(number)) in attrs


def test_a_dest_delete_names_the_dest_only_and_an_ipv6_dest_has_its_family() -> None:
    cmd, attrs = ipvsnl.op_request(DelDest(V6, "2001:db8::1", 53))
    addr6 = socket.inet_pton(socket.AF_INET6, "2001:db8::1")
    key = svc_key(socket.AF_INET6, socket.IPPROTO_UDP, socket.inet_pton(socket.AF_INET6, "2001:db8::10"), 53)
    assert (cmd, attrs) == (7, nla(1 | 0x8000, key) + nla(2 | 0x8000, nla(1, addr6) + nla(2, be16(53))
                                                           + nla(11, u16(socket.AF_INET6))))


def test_every_message_of_a_batch_is_a_request_with_an_ack_and_its_own_sequence_number() -> None:
    c, fake = client(ok)
    assert c.batch([ipvsnl.op_request(DelService(V4)), ipvsnl.op_request(DelService(V6))]) == [0, 0]
    (data,) = fake.sends
    msgs = parse(data)
    assert [(k, f) for k, f, *_ in msgs] == [(FAMILY, 0x5), (FAMILY, 0x5)]
    assert len({s for _k, _f, s, *_ in msgs}) == 2


def test_ops_that_cannot_be_encoded_are_refused() -> None:
    with pytest.raises(ValueError):
        ipvsnl.op_request(AddService(ServiceId("2001:db8::1", 4, 80, "tcp"), "rr", ()))
    with pytest.raises(OSError):
        ipvsnl.op_request(DelDest(V4, "not-an-address", 80))
    with pytest.raises(struct.error):
        ipvsnl.op_request(AddDest(V4, "198.51.100.1", 80, "g", -1, 0, 0))


# -- decoding -----------------------------------------------------------------------------------

def service_reply(af: int, proto: int, addr: bytes, port: int, sched: bytes, flags: int, *, timeout: int = 0,
                  fwmark: int = 0, stats64: bytes | None = None) -> bytes:
    body = svc_key(af, proto, addr, port) + nla(6, sched) + nla(7, struct.pack("=II", flags, 0xFFFF))
    body += nla(8, u32(timeout)) + nla(9, b"\xff" * 4) + nla(5, u32(fwmark))
    body += nla(10 | 0x8000, nla(1, u32(9)) + nla(2, u32(8)) + nla(3, u32(7)) + nla(4, struct.pack("=Q", 6))
                + nla(5, struct.pack("=Q", 5)))
    if stats64 is not None:
        body += nla(12 | 0x8000, stats64)
    return genl(4, nla(1 | 0x8000, body))


def dest_reply(addr: bytes, port: int, fwd: int, weight: int, *, family: int | None = socket.AF_INET, u: int = 0,
               lo: int = 0, active: int = 0, inactive: int = 0) -> bytes:
    body = nla(1, addr) + nla(2, be16(port)) + nla(3, u32(fwd)) + nla(4, u32(weight)) + nla(5, u32(u))
    body += nla(6, u32(lo)) + nla(7, u32(active)) + nla(8, u32(inactive)) + nla(9, u32(0))
    if family is not None:
        body += nla(11, u16(family))
    body += nla(13, b"\0") + nla(14, be16(0)) + nla(15, u16(0)) + nla(99, b"future attribute")
    return genl(8, nla(2 | 0x8000, body))


def part(payload: bytes) -> ipvsnl.Part:
    buf = b"\0" * 16 + payload
    return ipvsnl.Part(buf, 16 + 4, len(buf))


def test_a_service_reply_decodes_to_the_observed_model() -> None:
    got = ipvsnl.decode_service(part(service_reply(2, 6, v4("192.0.2.10"), 80, b"mh\0", 0x8 | 0x10 | 0x1,
                                                   timeout=300)))
    assert got is not None
    assert got[0] == ObservedService(V4, "mh", (1, 2), persistent=True, timeout=300)
    assert got[2] == socket.AF_INET
    six = ipvsnl.decode_service(part(service_reply(10, 17, socket.inet_pton(10, "2001:db8:0:0::10"), 53, b"rr\0",
                                                   0x4)))
    assert six is not None
    assert six[0] == ObservedService(V6, "rr", (), one_packet=True)


def test_fwmark_and_sctp_services_are_not_reported() -> None:
    assert ipvsnl.decode_service(part(service_reply(2, 6, bytes(16), 0, b"rr\0", 0, fwmark=7))) is None
    assert ipvsnl.decode_service(part(service_reply(2, 132, v4("192.0.2.10"), 80, b"rr\0", 0))) is None


def test_counters_prefer_stats64_and_fall_back_to_stats() -> None:
    stats64 = b"".join(nla(k, struct.pack("=Q", 2**40 + k)) for k in range(1, 11))
    with64 = ipvsnl.decode_service(part(service_reply(2, 6, v4("192.0.2.10"), 80, b"rr\0", 0, stats64=stats64)))
    plain = ipvsnl.decode_service(part(service_reply(2, 6, v4("192.0.2.10"), 80, b"rr\0", 0)))
    assert with64 is not None
    assert plain is not None
    assert ipvsnl.decode_counters(part(b"").buf, [-1] * 26, 12, 10) == (0, 0, 0, 0, 0)
    buf64 = part(service_reply(2, 6, v4("192.0.2.10"), 80, b"rr\0", 0, stats64=stats64)).buf
    assert ipvsnl.decode_counters(buf64, with64[1], 12, 10) == tuple(2**40 + k for k in range(1, 6))
    buf = part(service_reply(2, 6, v4("192.0.2.10"), 80, b"rr\0", 0)).buf
    assert ipvsnl.decode_counters(buf, plain[1], 12, 10) == (9, 8, 7, 6, 5)


def test_a_dest_reply_decodes_with_its_own_family_or_the_services() -> None:
    got = ipvsnl.decode_dest(part(dest_reply(v4("198.51.100.1"), 8080, 2 | 0x100, 5, u=10, lo=2, active=3,
                                             inactive=4)), socket.AF_INET)
    assert got is not None
    assert got[0] == ObservedDest("198.51.100.1", 8080, "i", 5, 10, 2, active=3, inactive=4)
    addr6 = socket.inet_pton(socket.AF_INET6, "2001:db8::1")
    old_kernel = ipvsnl.decode_dest(part(dest_reply(addr6, 53, 3, 1, family=None)), socket.AF_INET6)
    assert old_kernel is not None
    assert old_kernel[0] == ObservedDest("2001:db8::1", 53, "g", 1)


def test_observe_dumps_services_then_each_ones_dests_sorted() -> None:
    def kernel(cmd: int, flags: int, attrs: bytes) -> int | list[bytes]:
        assert flags & 0x300 == 0x300
        if cmd == 4:
            return [service_reply(2, 6, v4("192.0.2.10"), 80, b"wlc\0", 0),
                    service_reply(2, 6, bytes(16), 0, b"rr\0", 0, fwmark=3)]
        assert cmd == 8
        assert attrs == nla(1 | 0x8000, svc_key(2, 6, v4("192.0.2.10"), 80))
        return [dest_reply(v4("198.51.100.2"), 80, 3, 1), dest_reply(v4("198.51.100.1"), 80, 0, 2, active=1)]

    lin = LinuxIpvs()
    lin._client, _fake = client(kernel)
    (svc,) = lin.observe().services
    assert svc == ObservedService(V4, "wlc", dests=(ObservedDest("198.51.100.1", 80, "m", 2, active=1),
                                                    ObservedDest("198.51.100.2", 80, "g", 1)))
    (stats,) = lin.stats()
    assert stats.counters.connections == 9
    assert [d.address for d in stats.dests] == ["198.51.100.1", "198.51.100.2"]


def test_timeouts_are_u32_attributes_and_zeros_are_left_out() -> None:
    seen: list[bytes] = []

    def kernel(cmd: int, flags: int, attrs: bytes) -> int | list[bytes]:
        seen.append(attrs)
        return [genl(13, nla(4, u32(900)) + nla(5, u32(120)) + nla(6, u32(300)))] if cmd == 13 else 0

    lin = LinuxIpvs()
    lin._client, _fake = client(kernel)
    assert lin.timeouts() == Timeouts(900, 120, 300)
    lin.set_timeouts(Timeouts(tcp=600, udp=60))
    assert seen[-1] == nla(4, u32(600)) + nla(6, u32(60))


def test_the_family_is_resolved_by_name_through_the_controller() -> None:
    def controller(data: bytes) -> list[bytes]:
        ((kind, _flags, seq, cmd, attrs),) = parse(data)
        assert (kind, cmd, attrs) == (0x10, 3, nla(2, b"IPVS\0"))
        return [reply(0x10, seq, genl(1, nla(2, b"IPVS\0") + nla(1, u16(0x2A)))), ack(seq)]

    @dataclass
    class Ctrl:
        queue: list[bytes] = field(default_factory=list)

        def send(self, data: bytes, /) -> int:
            self.queue.extend(controller(data))
            return len(data)

        def recv(self, size: int, /) -> bytes:
            return self.queue.pop(0)

        def close(self) -> None:
            pass

    assert ipvsnl.NetlinkIpvs(sock=Ctrl()).family == 0x2A


# -- acks ---------------------------------------------------------------------------------------

OPS: tuple[Op, ...] = (
    AddService(V4, "rr", ()),
    AddDest(V4, "198.51.100.1", 80, "g", 1, 0, 0),
    AddDest(V4, "198.51.100.2", 80, "g", 1, 0, 0),
    DelDest(V4, "198.51.100.3", 80),
    DelService(V6),
)


def refusing(codes: dict[int, int]) -> tuple[Handler, list[int]]:
    """A kernel that answers the n-th request (0-based, over the whole run) with codes[n]."""
    counter = [0]

    def kernel(cmd: int, flags: int, attrs: bytes) -> int:
        n = counter[0]
        counter[0] += 1
        return codes.get(n, 0)

    return kernel, counter


def test_a_clean_batch_is_one_send() -> None:
    c, fake = client(ok)
    assert ipvsnl.apply_ops(c, OPS) is None
    assert len(fake.sends) == 1
    assert [cmd for cmd, _ in fake.requests()] == [1, 5, 5, 7, 3]


def test_deletes_of_what_is_gone_count_as_done() -> None:
    handler, _ = refusing({3: errno.ENOENT, 4: errno.ESRCH})
    c, _fake = client(handler)
    assert ipvsnl.apply_ops(c, OPS) is None


def test_an_add_of_what_exists_is_followed_by_the_same_set() -> None:
    handler, _ = refusing({0: errno.EEXIST, 2: errno.EEXIST})
    c, fake = client(handler)
    assert ipvsnl.apply_ops(c, OPS) is None
    assert len(fake.sends) == 2
    assert fake.requests()[5:] == [(2, ipvsnl.op_request(OPS[0])[1]), (6, ipvsnl.op_request(OPS[2])[1])]


def test_the_first_refusal_is_reported_with_its_index_and_what_ran_after_it() -> None:
    handler, _ = refusing({1: errno.EINVAL, 3: errno.EPERM})
    c, _fake = client(handler)
    refusal = ipvsnl.apply_ops(c, OPS)
    assert refusal is not None
    assert (refusal.index, refusal.code, refusal.applied_after) == (1, errno.EINVAL, (2, 4))


def test_a_refused_set_after_an_existing_add_is_the_refusal() -> None:
    handler, _ = refusing({0: errno.EEXIST, 5: errno.ENOMEM})  # request 5 is the set of op 0
    c, _fake = client(handler)
    refusal = ipvsnl.apply_ops(c, OPS)
    assert refusal is not None
    assert (refusal.index, refusal.code) == (0, errno.ENOMEM)


def test_batches_are_split_and_the_next_is_not_sent_after_a_refusal() -> None:
    handler, counter = refusing({3: errno.EINVAL})
    c, fake = client(handler)
    refusal = ipvsnl.apply_ops(c, OPS, batch_messages=2)
    assert refusal is not None
    assert (refusal.index, refusal.applied_after) == (3, ())
    assert [len(parse(s)) for s in fake.sends] == [2, 2]
    assert counter[0] == 4


def test_acks_arriving_together_or_out_of_order_map_by_sequence_number() -> None:
    handler, _ = refusing({1: errno.EBUSY})
    c, fake = client(handler)

    class Shuffled(FakeKernel):
        def send(self, data: bytes, /) -> int:
            n = super().send(data)
            first, *rest = self.queue
            self.queue = [b"".join(reversed(rest)), first]  # two acks in one datagram, reversed; then one
            return n

    shuffled = Shuffled(handler)
    c = ipvsnl.NetlinkIpvs(sock=shuffled, family=FAMILY)
    assert c.batch([ipvsnl.op_request(op) for op in OPS[:3]]) == [0, errno.EBUSY, 0]
    assert len(shuffled.queue) == 0
    assert not fake.sends


def test_an_unencodable_op_is_refused_after_the_ops_before_it_ran() -> None:
    c, fake = client(ok)
    ops = (*OPS[:2], AddDest(V4, "198.51.100.9", 80, "g", -1, 0, 0), *OPS[2:])
    refusal = ipvsnl.apply_ops(c, ops)
    assert refusal is not None
    assert (refusal.index, refusal.code) == (2, errno.EINVAL)
    assert len(fake.requests()) == 2


def test_linux_ipvs_raises_apply_error_for_the_first_refusal() -> None:
    handler, _ = refusing({2: errno.ENOENT})
    lin = LinuxIpvs()
    lin._client, fake = client(handler)
    with pytest.raises(ApplyError) as caught:
        lin.apply(OPS)
    assert (caught.value.index, caught.value.op, caught.value.code) == (2, OPS[2], errno.ENOENT)
    assert caught.value.applied == (0, 1)
    assert len(fake.requests()) == 3  # the withdrawals (3: DelDest, 4: DelService) were never sent
    lin.close()
    assert fake.closed
