"""A small generic-netlink IPVS client on the standard library: `socket.AF_NETLINK` and `struct`.

`LinuxIpvs` (`kernel`) uses it for everything it asks IPVS. The message layouts are those of the
kernel's uapi headers (`linux/netlink.h`, `linux/genetlink.h`, `linux/ip_vs.h`):

    nlmsghdr   u32 len, u16 type (the family id), u16 flags, u32 seq, u32 pid     host order
    genlmsghdr u8 cmd, u8 version (IPVS_GENL_VERSION = 1), u16 reserved
    nlattr     u16 len (header included, padding not), u16 type; the value padded to 4 bytes

A request carries IPVS_CMD_ATTR_SERVICE (nested IPVS_SVC_ATTR_*) and, for a real server,
IPVS_CMD_ATTR_DEST (nested IPVS_DEST_ATTR_*). Addresses are `union nf_inet_addr` (16 bytes, the
IPv4 one in its first 4), ports big-endian, everything else host order.

Why not pyroute2 here: it builds, encodes and waits for one request at a time through an asyncio
loop, about 20 ms per op under the VM's emulation; `apply` sends many ops per `send` instead.

- `NetlinkIpvs.batch(messages)` sends the messages concatenated in one `send`, each with
  NLM_F_REQUEST|NLM_F_ACK and its own sequence number, and returns one errno per message (0 for
  done). The kernel handles the messages of one buffer in order, each on its own: a refused one
  does not stop the ones after it, and every ack is already queued when `send` returns.
- `NetlinkIpvs.dump(cmd, attrs)` runs one NLM_F_DUMP request. A netlink socket runs one dump at a
  time (a second dump request while one is unfinished gets EBUSY), so dumps are not pipelined.
- `apply_ops(client, ops)` is `LinuxIpvs.apply`'s loop: idempotence rules and batching.
- `decode_service`, `decode_dest`, `decode_counters` read dump replies with `scan`, which walks
  one level of attributes into a flat list of offsets (no per-attribute objects).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import socket
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from kube2ipvs_director.plan import (
    SCHEDULER_FLAG_BITS,
    AddDest,
    AddService,
    DelDest,
    DelService,
    DestForwarding,
    EditDest,
    EditService,
    ObservedDest,
    ObservedService,
    Op,
    ServiceId,
    canonical_ip,
)

# linux/netlink.h
NETLINK_GENERIC: Final = 16
NLMSG_NOOP: Final = 1
NLMSG_ERROR: Final = 2
NLMSG_DONE: Final = 3
NLMSG_OVERRUN: Final = 4
NLM_F_REQUEST: Final = 0x1
NLM_F_MULTI: Final = 0x2
NLM_F_ACK: Final = 0x4
NLM_F_DUMP: Final = 0x300  # NLM_F_ROOT | NLM_F_MATCH
NLA_F_NESTED: Final = 0x8000
NLA_TYPE_MASK: Final = 0x3FFF
SOL_NETLINK: Final = 270
NETLINK_CAP_ACK: Final = 10  # errors do not echo the whole request
SO_RCVBUFFORCE: Final = 33
# linux/genetlink.h
GENL_ID_CTRL: Final = 0x10
CTRL_CMD_GETFAMILY: Final = 3
CTRL_ATTR_FAMILY_ID: Final = 1
CTRL_ATTR_FAMILY_NAME: Final = 2
# linux/ip_vs.h
IPVS_GENL_NAME: Final = b"IPVS"
IPVS_GENL_VERSION: Final = 1
CMD_NEW_SERVICE: Final = 1
CMD_SET_SERVICE: Final = 2
CMD_DEL_SERVICE: Final = 3
CMD_GET_SERVICE: Final = 4
CMD_NEW_DEST: Final = 5
CMD_SET_DEST: Final = 6
CMD_DEL_DEST: Final = 7
CMD_GET_DEST: Final = 8
CMD_SET_CONFIG: Final = 12
CMD_GET_CONFIG: Final = 13
CMD_ATTR_SERVICE: Final = 1
CMD_ATTR_DEST: Final = 2
CMD_ATTR_TIMEOUT_TCP: Final = 4
CMD_ATTR_TIMEOUT_TCP_FIN: Final = 5
CMD_ATTR_TIMEOUT_UDP: Final = 6
SVC_ATTR_AF: Final = 1  # u16
SVC_ATTR_PROTOCOL: Final = 2  # u16
SVC_ATTR_ADDR: Final = 3  # union nf_inet_addr
SVC_ATTR_PORT: Final = 4  # be16
SVC_ATTR_FWMARK: Final = 5  # u32
SVC_ATTR_SCHED_NAME: Final = 6  # NUL-terminated string
SVC_ATTR_FLAGS: Final = 7  # struct ip_vs_flags {u32 flags; u32 mask}
SVC_ATTR_TIMEOUT: Final = 8  # u32
SVC_ATTR_NETMASK: Final = 9  # u32
SVC_ATTR_STATS: Final = 10  # nested IPVS_STATS_ATTR_*
SVC_ATTR_STATS64: Final = 12
SVC_ATTR_COUNT: Final = 13
DEST_ATTR_ADDR: Final = 1
DEST_ATTR_PORT: Final = 2  # be16
DEST_ATTR_FWD_METHOD: Final = 3  # u32
DEST_ATTR_WEIGHT: Final = 4  # u32
DEST_ATTR_U_THRESH: Final = 5  # u32
DEST_ATTR_L_THRESH: Final = 6  # u32
DEST_ATTR_ACTIVE_CONNS: Final = 7  # u32
DEST_ATTR_INACT_CONNS: Final = 8  # u32
DEST_ATTR_STATS: Final = 10
DEST_ATTR_ADDR_FAMILY: Final = 11  # u16
DEST_ATTR_STATS64: Final = 12
DEST_ATTR_TUN_TYPE: Final = 13  # u8
DEST_ATTR_TUN_PORT: Final = 14  # be16
DEST_ATTR_TUN_FLAGS: Final = 15  # u16
DEST_ATTR_COUNT: Final = 16
STATS_ATTR_COUNT: Final = 6  # CONNS, INPKTS, OUTPKTS, INBYTES, OUTBYTES (1..5)

FWD_METHODS: Final[dict[DestForwarding, int]] = {"m": 0, "local": 1, "i": 2, "g": 3, "bypass": 4}
FWD_NAMES: Final[dict[int, DestForwarding]] = {v: k for k, v in FWD_METHODS.items()}
FWD_MASK: Final = 0x7  # IP_VS_CONN_F_FWD_MASK
PROTOCOLS: Final = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP}
PROTO_NAMES: Final = {socket.IPPROTO_TCP: "tcp", socket.IPPROTO_UDP: "udp"}
SVC_PERSISTENT: Final = 0x1
SVC_ONEPACKET: Final = 0x4
SCHED_FLAG_SHIFT: Final = 2  # scheduler flag bit n is 1 << (n + 2): IP_VS_SVC_F_SCHED1 = 0x8
FLAGS_MASK: Final = 0xFFFF

_NLMSG: Final = struct.Struct("=IHHII")
_GENL: Final = struct.Struct("=BBH")
_NLA: Final = struct.Struct("=HH")
_HEAD: Final = _NLMSG.size + _GENL.size  # where a generic netlink message's attributes start
_U8: Final = struct.Struct("=B")
_U16: Final = struct.Struct("=H")
_BE16: Final = struct.Struct("!H")
_U32: Final = struct.Struct("=I")
_I32: Final = struct.Struct("=i")
_U64: Final = struct.Struct("=Q")
_FLAGS: Final = struct.Struct("=II")
_NETMASK4: Final = b"\xff\xff\xff\xff"
_NETMASK6: Final = _U32.pack(128)  # IPv6: the prefix length, a host-order u32 (as ipvsadm sends it)
_RECV_SIZE: Final = 1 << 17  # a netlink dump part is at most 32 KiB
BATCH_MESSAGES: Final = 256  # requests per `send`; their acks must fit the receive buffer
BATCH_BYTES: Final = 64 * 1024
RCVBUF_BYTES: Final = 4 << 20


class NetlinkError(Exception):
    """The kernel answered a request with an error (`code` is a positive errno)."""

    def __init__(self, code: int, what: str) -> None:
        self.code = code
        super().__init__(f"{what}: [Errno {code}] {errno.errorcode.get(code, '?')} ({_strerror(code)})")


def _strerror(code: int) -> str:
    try:
        return os.strerror(code)
    except ValueError:
        return "unknown error"


# -- encoding ---------------------------------------------------------------------------------

def attr(kind: int, value: bytes) -> bytes:
    """One netlink attribute, padded to 4 bytes."""
    size = _NLA.size + len(value)
    return _NLA.pack(size, kind) + value + b"\0" * (-size % 4)


def nested(kind: int, *attrs: bytes) -> bytes:
    return attr(kind | NLA_F_NESTED, b"".join(attrs))


def message(family: int, flags: int, seq: int, cmd: int, attrs: bytes, version: int = IPVS_GENL_VERSION) -> bytes:
    """One generic netlink message."""
    return _NLMSG.pack(_HEAD + len(attrs), family, flags, seq, 0) + _GENL.pack(cmd, version, 0) + attrs


@functools.lru_cache(maxsize=65536)
def _inet_addr(address: str) -> tuple[int, bytes]:
    """(AF_INET or AF_INET6, the address as a 16-byte `union nf_inet_addr`); OSError if neither."""
    if ":" in address:
        return socket.AF_INET6, socket.inet_pton(socket.AF_INET6, address)
    return socket.AF_INET, socket.inet_pton(socket.AF_INET, address) + bytes(12)


def service_key_attrs(sid: ServiceId) -> bytes:
    """The attributes that name a service: family, protocol, address, port."""
    af = socket.AF_INET6 if sid.family == 6 else socket.AF_INET
    found, raw = _inet_addr(sid.vip)
    if found != af:
        raise ValueError(f"{sid.vip} is not an IPv{sid.family} address")
    return (attr(SVC_ATTR_AF, _U16.pack(af)) + attr(SVC_ATTR_PROTOCOL, _U16.pack(PROTOCOLS[sid.protocol]))
            + attr(SVC_ATTR_ADDR, raw) + attr(SVC_ATTR_PORT, _BE16.pack(sid.port)))


def sched_flag_word(flags: Sequence[int]) -> int:
    return sum(1 << (b + SCHED_FLAG_SHIFT) for b in set(flags) if b in SCHEDULER_FLAG_BITS)


def sched_flag_bits(word: int) -> tuple[int, ...]:
    return tuple(b for b in SCHEDULER_FLAG_BITS if word & (1 << (b + SCHED_FLAG_SHIFT)))


def service_attr(sid: ServiceId, scheduler: str | None = None, flags: Sequence[int] = ()) -> bytes:
    """IPVS_CMD_ATTR_SERVICE: the key alone, or (with a scheduler) every attribute NEW/SET_SERVICE
    needs: scheduler, flags {word, mask 0xffff} (persistence and one-packet off), persistence
    timeout 0, netmask (255.255.255.255, or 128 for IPv6)."""
    body = service_key_attrs(sid)
    if scheduler is not None:
        body += (attr(SVC_ATTR_SCHED_NAME, scheduler.encode() + b"\0")
                 + attr(SVC_ATTR_FLAGS, _FLAGS.pack(sched_flag_word(flags), FLAGS_MASK))
                 + attr(SVC_ATTR_TIMEOUT, _U32.pack(0))
                 + attr(SVC_ATTR_NETMASK, _NETMASK6 if sid.family == 6 else _NETMASK4))
    return nested(CMD_ATTR_SERVICE, body)


def dest_attr(op: AddDest | EditDest | DelDest) -> bytes:
    """IPVS_CMD_ATTR_DEST: address, its family and port; for an add or set also forwarding method,
    weight, thresholds and the tunnel attributes at 0 (no GUE/GRE encapsulation)."""
    af, raw = _inet_addr(op.address)
    body = attr(DEST_ATTR_ADDR, raw) + attr(DEST_ATTR_PORT, _BE16.pack(op.port)) + attr(DEST_ATTR_ADDR_FAMILY,
                                                                                      _U16.pack(af))
    if not isinstance(op, DelDest):
        body += (attr(DEST_ATTR_FWD_METHOD, _U32.pack(FWD_METHODS[op.forwarding]))
                 + attr(DEST_ATTR_WEIGHT, _U32.pack(op.weight))
                 + attr(DEST_ATTR_TUN_TYPE, _U8.pack(0)) + attr(DEST_ATTR_TUN_PORT, _BE16.pack(0))
                 + attr(DEST_ATTR_TUN_FLAGS, _U16.pack(0))
                 + attr(DEST_ATTR_U_THRESH, _U32.pack(op.u_threshold))
                 + attr(DEST_ATTR_L_THRESH, _U32.pack(op.l_threshold)))
    return nested(CMD_ATTR_DEST, body)


def op_request(op: Op, *, as_set: bool = False) -> tuple[int, bytes]:
    """(IPVS command, attributes) of one op; `as_set` turns an add into the set of the same
    attributes. ValueError/OSError/struct.error when the op cannot be encoded (bad address, a
    weight out of u32 range)."""
    if isinstance(op, AddService | EditService):
        cmd = CMD_NEW_SERVICE if isinstance(op, AddService) and not as_set else CMD_SET_SERVICE
        return cmd, service_attr(op.service, op.scheduler, op.flags)
    if isinstance(op, DelService):
        return CMD_DEL_SERVICE, service_attr(op.service)
    svc = service_attr(op.service)
    if isinstance(op, DelDest):
        return CMD_DEL_DEST, svc + dest_attr(op)
    cmd = CMD_NEW_DEST if isinstance(op, AddDest) and not as_set else CMD_SET_DEST
    return cmd, svc + dest_attr(op)


# -- decoding ---------------------------------------------------------------------------------

def scan(buf: bytes, start: int, end: int, count: int) -> list[int]:
    """One level of attributes in buf[start:end]: a flat list where [2*t] is where the value of
    attribute type t starts and [2*t + 1] its length; -1 for an absent type (t < count)."""
    found = [-1] * (2 * count)
    unpack = _NLA.unpack_from
    while start + 4 <= end:
        size, kind = unpack(buf, start)
        if size < 4 or start + size > end:
            break
        kind &= NLA_TYPE_MASK
        if kind < count:
            found[2 * kind] = start + 4
            found[2 * kind + 1] = size - 4
        start += (size + 3) & ~3
    return found


def _uint(buf: bytes, at: list[int], kind: int) -> int:
    """A u8/u16/u32/u64 attribute by its length (0 when absent)."""
    offset, size = at[2 * kind], at[2 * kind + 1]
    if offset < 0:
        return 0
    if size == 4:
        return int(_U32.unpack_from(buf, offset)[0])
    if size == 8:
        return int(_U64.unpack_from(buf, offset)[0])
    if size == 2:
        return int(_U16.unpack_from(buf, offset)[0])
    if size == 1:
        return buf[offset]
    return 0


def _be16(buf: bytes, at: list[int], kind: int) -> int:
    offset = at[2 * kind]
    return int(_BE16.unpack_from(buf, offset)[0]) if offset >= 0 and at[2 * kind + 1] >= 2 else 0


@functools.lru_cache(maxsize=65536)
def _address_text(af: int, raw: bytes) -> str:
    if af == socket.AF_INET6:
        return canonical_ip(socket.inet_ntop(socket.AF_INET6, raw[:16]))
    return canonical_ip(socket.inet_ntop(socket.AF_INET, raw[:4]))


def _address(buf: bytes, at: list[int], kind: int, af: int) -> str | None:
    offset, size = at[2 * kind], at[2 * kind + 1]
    if offset < 0 or size < (16 if af == socket.AF_INET6 else 4):
        return None
    return _address_text(af, bytes(buf[offset:offset + size]))


def _nested_at(buf: bytes, start: int, end: int, kind: int) -> tuple[int, int] | None:
    """(start, end) of the value of the top-level attribute `kind` of a message's attributes."""
    at = scan(buf, start, end, kind + 1)
    offset = at[2 * kind]
    return None if offset < 0 else (offset, offset + at[2 * kind + 1])


@dataclass(frozen=True, slots=True)
class Part:
    """One reply message of a dump: its attributes are buf[start:end]."""

    buf: bytes
    start: int
    end: int


def decode_service(part: Part) -> tuple[ObservedService, list[int], int] | None:
    """The service of a GET_SERVICE reply, its attribute offsets (for `decode_counters`) and its
    address family; None for fwmark services, other protocols than TCP/UDP, or no address."""
    span = _nested_at(part.buf, part.start, part.end, CMD_ATTR_SERVICE)
    if span is None:
        return None
    buf = part.buf
    at = scan(buf, span[0], span[1], SVC_ATTR_COUNT)
    protocol = PROTO_NAMES.get(_uint(buf, at, SVC_ATTR_PROTOCOL))
    af = _uint(buf, at, SVC_ATTR_AF)
    address = _address(buf, at, SVC_ATTR_ADDR, af)
    if protocol is None or address is None or _uint(buf, at, SVC_ATTR_FWMARK):
        return None
    word = _FLAGS.unpack_from(buf, at[2 * SVC_ATTR_FLAGS])[0] if at[2 * SVC_ATTR_FLAGS + 1] >= 8 else 0
    offset, size = at[2 * SVC_ATTR_SCHED_NAME], at[2 * SVC_ATTR_SCHED_NAME + 1]
    scheduler = bytes(buf[offset:offset + size]).split(b"\0", 1)[0].decode() if offset >= 0 else ""
    sid = ServiceId(address, 6 if af == socket.AF_INET6 else 4, _be16(buf, at, SVC_ATTR_PORT),
                    "tcp" if protocol == "tcp" else "udp")
    svc = ObservedService(id=sid, scheduler=scheduler, flags=sched_flag_bits(word),
                          persistent=bool(word & SVC_PERSISTENT), timeout=_uint(buf, at, SVC_ATTR_TIMEOUT),
                          one_packet=bool(word & SVC_ONEPACKET))
    return svc, at, af


def decode_dest(part: Part, service_af: int) -> tuple[ObservedDest, list[int]] | None:
    """The real server of a GET_DEST reply and its attribute offsets; None without an address."""
    span = _nested_at(part.buf, part.start, part.end, CMD_ATTR_DEST)
    if span is None:
        return None
    buf = part.buf
    at = scan(buf, span[0], span[1], DEST_ATTR_COUNT)
    address = _address(buf, at, DEST_ATTR_ADDR, _uint(buf, at, DEST_ATTR_ADDR_FAMILY) or service_af)
    if address is None:
        return None
    dest = ObservedDest(
        address=address, port=_be16(buf, at, DEST_ATTR_PORT),
        forwarding=FWD_NAMES.get(_uint(buf, at, DEST_ATTR_FWD_METHOD) & FWD_MASK, "bypass"),
        weight=_uint(buf, at, DEST_ATTR_WEIGHT), u_threshold=_uint(buf, at, DEST_ATTR_U_THRESH),
        l_threshold=_uint(buf, at, DEST_ATTR_L_THRESH), active=_uint(buf, at, DEST_ATTR_ACTIVE_CONNS),
        inactive=_uint(buf, at, DEST_ATTR_INACT_CONNS))
    return dest, at


def decode_counters(buf: bytes, at: list[int], stats64: int, stats: int) -> tuple[int, int, int, int, int]:
    """(connections, packets in, packets out, bytes in, bytes out) from the nested STATS64
    attribute (Linux >= 4.1, 64-bit counters), else the STATS one (32-bit ones that wrap)."""
    for kind in (stats64, stats):
        offset = at[2 * kind]
        if offset >= 0:
            inner = scan(buf, offset, offset + at[2 * kind + 1], STATS_ATTR_COUNT)
            return (_uint(buf, inner, 1), _uint(buf, inner, 2), _uint(buf, inner, 3), _uint(buf, inner, 4),
                    _uint(buf, inner, 5))
    return 0, 0, 0, 0, 0


def config_timeouts(parts: Sequence[Part]) -> tuple[int, int, int] | None:
    """(tcp, tcpfin, udp) of a GET_CONFIG reply."""
    for part in parts:
        at = scan(part.buf, part.start, part.end, CMD_ATTR_TIMEOUT_UDP + 1)
        if at[2 * CMD_ATTR_TIMEOUT_TCP] >= 0:
            return (_uint(part.buf, at, CMD_ATTR_TIMEOUT_TCP), _uint(part.buf, at, CMD_ATTR_TIMEOUT_TCP_FIN),
                    _uint(part.buf, at, CMD_ATTR_TIMEOUT_UDP))
    return None


def timeout_attrs(tcp: int, tcpfin: int, udp: int) -> bytes:
    """SET_CONFIG's attributes: a 0 is left out (the kernel would skip it anyway)."""
    return b"".join(attr(kind, _U32.pack(value)) for kind, value in ((CMD_ATTR_TIMEOUT_TCP, tcp),
                                                                    (CMD_ATTR_TIMEOUT_TCP_FIN, tcpfin),
                                                                    (CMD_ATTR_TIMEOUT_UDP, udp)) if value)


# -- the socket -------------------------------------------------------------------------------

def messages(buf: bytes) -> Iterator[tuple[int, int, int, int, int]]:
    """(type, flags, seq, start, end) of each netlink message in a datagram."""
    offset, total = 0, len(buf)
    while offset + _NLMSG.size <= total:
        size, kind, flags, seq, _pid = _NLMSG.unpack_from(buf, offset)
        if size < _NLMSG.size or offset + size > total:
            return
        yield kind, flags, seq, offset, offset + size
        offset += (size + 3) & ~3


def error_code(buf: bytes, start: int) -> int:
    """The positive errno of an NLMSG_ERROR (0 for an ack) or NLMSG_DONE message at `start`."""
    return -int(_I32.unpack_from(buf, start + _NLMSG.size)[0]) if start + _NLMSG.size + 4 <= len(buf) else 0


class NetlinkSocket(Protocol):
    def send(self, data: bytes, /) -> int: ...

    def recv(self, size: int, /) -> bytes: ...

    def close(self) -> None: ...


def open_socket() -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_GENERIC)
    try:
        sock.bind((0, 0))
        for option in (SO_RCVBUFFORCE, socket.SO_RCVBUF):  # FORCE needs CAP_NET_ADMIN, as IPVS does
            try:
                sock.setsockopt(socket.SOL_SOCKET, option, RCVBUF_BYTES)
                break
            except OSError:
                continue
        with contextlib.suppress(OSError):  # older kernels: errors then echo the request
            sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
        sock.settimeout(60.0)  # acks are queued before `send` returns: a wait this long is a bug
    except BaseException:
        sock.close()
        raise
    return sock


class NetlinkIpvs:
    """Requests to the "IPVS" generic netlink family on one socket (not thread-safe)."""

    def __init__(self, sock: NetlinkSocket | None = None, family: int | None = None) -> None:
        self._sock: NetlinkSocket = sock if sock is not None else open_socket()
        self._seq = 0
        self.family = family if family is not None else self._resolve_family()

    def close(self) -> None:
        self._sock.close()

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0xFFFFFFFF or 1
        return self._seq

    def _resolve_family(self) -> int:
        parts = self.request(CTRL_CMD_GETFAMILY, attr(CTRL_ATTR_FAMILY_NAME, IPVS_GENL_NAME + b"\0"),
                             family=GENL_ID_CTRL, version=1, what="resolve generic netlink family IPVS")
        for part in parts:
            at = scan(part.buf, part.start, part.end, CTRL_ATTR_FAMILY_ID + 1)
            if at[2 * CTRL_ATTR_FAMILY_ID] >= 0:
                return _uint(part.buf, at, CTRL_ATTR_FAMILY_ID)
        raise NetlinkError(errno.ENOENT, "resolve generic netlink family IPVS: no family id in the reply")

    def _recv(self) -> bytes:
        return self._sock.recv(_RECV_SIZE)

    def request(self, cmd: int, attrs: bytes, *, family: int | None = None, version: int = IPVS_GENL_VERSION,
                what: str = "IPVS request") -> list[Part]:
        """One request with an ack: its reply messages (if any); NetlinkError if refused."""
        seq = self._next_seq()
        fam = self.family if family is None else family
        self._sock.send(message(fam, NLM_F_REQUEST | NLM_F_ACK, seq, cmd, attrs, version))
        parts: list[Part] = []
        while True:
            buf = self._recv()
            for kind, _flags, mseq, start, end in messages(buf):
                if mseq != seq:
                    continue
                if kind == NLMSG_ERROR:
                    code = error_code(buf, start)
                    if code:
                        raise NetlinkError(code, what)
                    return parts
                if kind == NLMSG_DONE:
                    return parts
                if kind == fam:
                    parts.append(Part(buf, start + _HEAD, end))

    def dump(self, cmd: int, attrs: bytes = b"", what: str = "IPVS dump") -> list[Part]:
        """Every reply message of one NLM_F_DUMP request; NetlinkError if it fails."""
        seq = self._next_seq()
        self._sock.send(message(self.family, NLM_F_REQUEST | NLM_F_DUMP, seq, cmd, attrs))
        parts: list[Part] = []
        family = self.family
        while True:
            buf = self._recv()
            for kind, _flags, mseq, start, end in messages(buf):
                if mseq != seq:
                    continue
                if kind == family:
                    parts.append(Part(buf, start + _HEAD, end))
                elif kind == NLMSG_DONE:
                    code = error_code(buf, start)
                    if code > 0:
                        raise NetlinkError(code, what)
                    return parts
                elif kind == NLMSG_ERROR:
                    code = error_code(buf, start)
                    if code:
                        raise NetlinkError(code, what)
                    return parts

    def batch(self, requests: Sequence[tuple[int, bytes]]) -> list[int]:
        """Send (cmd, attrs) requests in one `send`, each acked: the errno of each (0: done).
        OSError when the send fails (then none of them ran) or acks were lost."""
        seqs = [self._next_seq() for _ in requests]
        family = self.family
        flags = NLM_F_REQUEST | NLM_F_ACK
        self._sock.send(b"".join(message(family, flags, seq, cmd, attrs)
                                 for seq, (cmd, attrs) in zip(seqs, requests, strict=True)))
        codes: list[int | None] = [None] * len(requests)
        missing = len(requests)
        by_seq = {seq: i for i, seq in enumerate(seqs)}
        while missing:
            buf = self._recv()
            for kind, _flags, mseq, start, _end in messages(buf):
                if kind != NLMSG_ERROR:
                    continue
                index = by_seq.get(mseq)
                if index is not None and codes[index] is None:
                    codes[index] = error_code(buf, start)
                    missing -= 1
        return [c or 0 for c in codes]


# -- apply ------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Refusal:
    """The first op the kernel refused: `ops[index]`, with a positive errno. Every op before it
    is applied; of the ops after it, those in `applied_after` (same batch) are applied too."""

    index: int
    code: int
    message: str
    applied_after: tuple[int, ...] = ()


def _settled(op: Op, code: int) -> bool:
    """What is already done counts as done: a delete of what is gone (ESRCH: no such service,
    ENOENT: no such real server)."""
    return code == 0 or (isinstance(op, DelService | DelDest) and code in (errno.ESRCH, errno.ENOENT))


def apply_ops(client: NetlinkIpvs, ops: Sequence[Op], *, batch_messages: int = BATCH_MESSAGES,
              batch_bytes: int = BATCH_BYTES) -> Refusal | None:
    """Apply the ops in order, in batches; None when all are in the kernel, else the first refusal.

    An add of what exists (EEXIST) is followed, after its batch, by the set of the same
    attributes: the ops after it in the batch ran before that set, which only matters if one of
    them touched the same service or real server, and a plan has one op per object."""
    index = 0
    while index < len(ops):
        start = index
        requests: list[tuple[int, bytes]] = []
        size = 0
        unencodable: Refusal | None = None
        while index < len(ops) and len(requests) < batch_messages and size < batch_bytes:
            try:
                request = op_request(ops[index])
            except (ValueError, OSError, struct.error, KeyError) as exc:
                unencodable = Refusal(index, errno.EINVAL, f"cannot encode: {exc}")
                break
            requests.append(request)
            size += len(request[1]) + _HEAD
            index += 1
        if requests:
            refusal = _run_batch(client, ops, start, requests)
            if refusal is not None:
                return refusal
        if unencodable is not None:
            return unencodable
    return None


def _run_batch(client: NetlinkIpvs, ops: Sequence[Op], start: int,
               requests: list[tuple[int, bytes]]) -> Refusal | None:
    try:
        codes = client.batch(requests)
    except OSError as exc:
        return Refusal(start, exc.errno or errno.EIO, f"netlink: {exc}")
    failed: int | None = None
    resets: list[int] = []
    for offset, code in enumerate(codes):
        op = ops[start + offset]
        if _settled(op, code):
            continue
        if code == errno.EEXIST and isinstance(op, AddService | AddDest):
            resets.append(offset)
            continue
        failed = offset
        break
    if failed is not None:
        resets = [r for r in resets if r < failed]
    if resets:
        try:
            set_codes = client.batch([op_request(ops[start + r], as_set=True) for r in resets])
        except OSError as exc:
            set_codes = [exc.errno or errno.EIO] * len(resets)
        for r, code in zip(resets, set_codes, strict=True):
            if code:
                return _refusal(ops, start, r, code, codes)
    if failed is not None:
        return _refusal(ops, start, failed, codes[failed], codes)
    return None


def _refusal(ops: Sequence[Op], start: int, offset: int, code: int, codes: Sequence[int]) -> Refusal:
    after = tuple(start + i for i in range(offset + 1, len(codes)) if _settled(ops[start + i], codes[i]))
    return Refusal(start + offset, code, str(NetlinkError(code, "IPVS")), after)
