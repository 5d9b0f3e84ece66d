"""The director's kernel: IPVS virtual services and real servers, IPVS timeouts, IPVS sysctls.

`Ipvs` is the port the reconciler uses; `LinuxIpvs` is the one adapter (the only module of the
role that imports pyroute2, and only inside its methods), `FakeIpvs` the strict in-memory
stand-in. Every `LinuxIpvs` method blocks on netlink; the app calls them from one worker thread,
one at a time (a pyroute2 socket is not shared between threads).

`apply(ops)` makes one netlink request per op, in order, and stops at the first one the kernel
refuses, raising `ApplyError` with that op and its index: the ops before it are in the kernel,
the ones after it were not tried, and the caller re-observes before planning again. What is
already done counts as done: deleting a service or real server that is gone, adding one that
exists (it is then `set` to the op's attributes, so the result is the same either way).

pyroute2 0.9.7 quirks handled here:
- `IPVSDest.from_message(m)["fwd_method"]` reports the default (3, DR) whatever the kernel says,
  so every attribute is read from the raw netlink attributes instead.
- `IPVS.service("update")` / `dest("update")` send DEL commands; edits use `"set"`.
- The socket has no method for IPVS_CMD_GET_CONFIG/SET_CONFIG (the timeouts), and declares
  their attributes as "hex" blobs: the requests are built here with `_ipvs_msg_class()`, which
  encodes them as u32, and the replies (parsed by pyroute2's own class) are decoded from the
  hex text ("84:03:00:00" is 900 in host byte order).
- `IPVSService` sets the netmask only for IPv4. The kernel requires one for every service, and
  for IPv6 it is the prefix length (128) as a host-order u32, which is what ipvsadm sends.
"""

from __future__ import annotations

import errno
import functools
import socket
import struct
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final, Protocol

from kube2ipvs.lbconfig import Family
from kube2ipvs.lbconfig import Protocol as IpProtocol
from kube2ipvs_director.plan import (
    SCHEDULER_FLAG_BITS,
    AddDest,
    AddService,
    DelDest,
    DelService,
    DestForwarding,
    EditDest,
    EditService,
    Observed,
    ObservedDest,
    ObservedService,
    Op,
    ServiceId,
    Timeouts,
    canonical_ip,
)

FWD_METHODS: Final[dict[DestForwarding, int]] = {"m": 0, "local": 1, "i": 2, "g": 3, "bypass": 4}
_FWD_NAMES: Final = {v: k for k, v in FWD_METHODS.items()}
_FWD_MASK: Final = 0x7  # IP_VS_CONN_F_FWD_MASK
PROTOCOLS: Final[dict[IpProtocol, int]] = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP}
_PROTO_NAMES: Final[dict[int, IpProtocol]] = {v: k for k, v in PROTOCOLS.items()}
_FAMILIES: Final = {4: socket.AF_INET, 6: socket.AF_INET6}
# Service flags (include/uapi/linux/ip_vs.h).
SVC_PERSISTENT: Final = 0x1
SVC_ONEPACKET: Final = 0x4
_SCHED_FLAG_SHIFT: Final = 2  # scheduler flag bit n is 1 << (n + 2): IP_VS_SVC_F_SCHED1 = 0x8
_FLAGS_MASK: Final = 0xFFFF
_CMD_SET_CONFIG: Final = 12
_CMD_GET_CONFIG: Final = 13
VS_SYSCTL_DIR: Final = Path("/proc/sys/net/ipv4/vs")


class KernelError(Exception):
    """IPVS could not be read or configured at all (no IPVS in this kernel, no permission)."""


class ApplyError(KernelError):
    """The kernel refused `op` (`ops[index]`); the ops before it were applied, none after it."""

    def __init__(self, op: Op, index: int, code: int, message: str) -> None:
        self.op, self.index, self.code = op, index, code
        super().__init__(f"op {index} {op}: {message}")


class Ipvs(Protocol):
    def observe(self) -> Observed: ...

    def apply(self, ops: Sequence[Op]) -> None: ...

    def timeouts(self) -> Timeouts: ...

    def set_timeouts(self, timeouts: Timeouts) -> None: ...


@dataclass(frozen=True, slots=True)
class IpvsCounters:
    """IPVS's counters of a virtual service or real server since it was created (or zeroed).
    With direct routing and IPIP the replies bypass the director: `packets_out` and `bytes_out`
    stay 0 there; only NAT (masquerading) counts them."""

    connections: int = 0
    packets_in: int = 0
    packets_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0


@dataclass(frozen=True, slots=True)
class DestStats:
    address: str  # canonical
    port: int
    counters: IpvsCounters
    active: int = 0  # connections IPVS counts as active (TCP ESTABLISHED), now
    inactive: int = 0  # every other connection entry of this real server, now


@dataclass(frozen=True, slots=True)
class ServiceStats:
    id: ServiceId
    counters: IpvsCounters
    dests: tuple[DestStats, ...] = ()  # sorted by address, port


class IpvsStats(Protocol):
    def stats(self) -> tuple[ServiceStats, ...]: ...


def sched_flag_word(flags: Iterable[int]) -> int:
    return sum(1 << (b + _SCHED_FLAG_SHIFT) for b in set(flags) if b in SCHEDULER_FLAG_BITS)


def sched_flag_bits(word: int) -> tuple[int, ...]:
    return tuple(b for b in SCHEDULER_FLAG_BITS if word & (1 << (b + _SCHED_FLAG_SHIFT)))


@functools.cache
def _ipvs_msg_class() -> Any:
    """pyroute2's IPVS message with the three timeout attributes as u32, for requests."""
    from pyroute2.netlink.generic import ipvs

    timeouts = ("IPVS_CMD_ATTR_TIMEOUT_TCP", "IPVS_CMD_ATTR_TIMEOUT_TCP_FIN", "IPVS_CMD_ATTR_TIMEOUT_UDP")

    class IpvsMsg(ipvs.ipvsmsg):  # type: ignore[misc]
        nla_map = tuple((name, "uint32" if name in timeouts else kind) for name, kind in ipvs.ipvsmsg.nla_map)

    # pyroute2 compiles nla_map once per class into (name-mangled) class attributes, which a
    # subclass inherits: without this, ours would use the parent's table once one was compiled.
    IpvsMsg._nlmsg_base__compiled_nla = False
    return IpvsMsg


def _u32(value: object) -> int:
    """A u32 attribute the replies' parser (pyroute2's own `ipvsmsg`) shows as hex bytes."""
    if value is None:
        return 0
    if isinstance(value, int):
        return value
    return int.from_bytes(bytes.fromhex(str(value).replace(":", "")), sys.byteorder)


def _attr(nla: Any, name: str, default: Any = None) -> Any:
    value = nla.get_attr(name)
    return default if value is None else value


def _counters(nla: Any, prefix: str) -> IpvsCounters:
    """The nested STATS64 attribute of a service or destination (Linux >= 4.1), else the 32-bit
    STATS one, whose counters wrap; pyroute2 0.9.7 decodes both into nested attributes."""
    stats = nla.get_attr(prefix + "STATS64")
    if stats is None:
        stats = nla.get_attr(prefix + "STATS")
    if stats is None:
        return IpvsCounters()
    return IpvsCounters(
        connections=int(_attr(stats, "IPVS_STATS_ATTR_CONNS", 0)),
        packets_in=int(_attr(stats, "IPVS_STATS_ATTR_INPKTS", 0)),
        packets_out=int(_attr(stats, "IPVS_STATS_ATTR_OUTPKTS", 0)),
        bytes_in=int(_attr(stats, "IPVS_STATS_ATTR_INBYTES", 0)),
        bytes_out=int(_attr(stats, "IPVS_STATS_ATTR_OUTBYTES", 0)),
    )


class LinuxIpvs:
    def __init__(self) -> None:
        self._sock: Any = None

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _ipvs(self) -> Any:
        if self._sock is None:
            from pyroute2 import IPVS
            from pyroute2.netlink.exceptions import NetlinkError

            try:
                sock = IPVS()
            except NetlinkError as exc:  # ENOENT: no generic netlink family "IPVS" in this kernel
                raise KernelError(f"IPVS is not available: {exc}") from exc
            self._sock = sock
        return self._sock

    # -- observe ----------------------------------------------------------------------------

    def observe(self) -> Observed:
        """Every TCP/UDP virtual service on an address, with its real servers and their counts.

        fwmark services and other protocols (SCTP) are not reported: no VIP of ours is one.
        """
        from pyroute2.netlink.exceptions import NetlinkError

        try:
            services = []
            for msg in self._ipvs().service("dump"):
                svc = self._service(msg.get_attr("IPVS_CMD_ATTR_SERVICE"))
                if svc is not None:
                    services.append(replace(svc, dests=self._dests(svc.id)))
        except NetlinkError as exc:
            raise KernelError(f"IPVS dump: {exc}") from exc
        return Observed(tuple(services))

    @staticmethod
    def _service(nla: Any) -> ObservedService | None:
        protocol = _PROTO_NAMES.get(_attr(nla, "IPVS_SVC_ATTR_PROTOCOL", 0))
        address = _attr(nla, "IPVS_SVC_ATTR_ADDR")
        if protocol is None or address is None or _attr(nla, "IPVS_SVC_ATTR_FWMARK", 0):
            return None
        family: Family = 6 if _attr(nla, "IPVS_SVC_ATTR_AF") == socket.AF_INET6 else 4
        flags = _attr(nla, "IPVS_SVC_ATTR_FLAGS")
        word = int(flags["flags"]) if flags is not None else 0
        sid = ServiceId(canonical_ip(address), family, int(_attr(nla, "IPVS_SVC_ATTR_PORT", 0)), protocol)
        return ObservedService(
            id=sid, scheduler=str(_attr(nla, "IPVS_SVC_ATTR_SCHED_NAME", "")), flags=sched_flag_bits(word),
            persistent=bool(word & SVC_PERSISTENT), timeout=int(_attr(nla, "IPVS_SVC_ATTR_TIMEOUT", 0)),
            one_packet=bool(word & SVC_ONEPACKET),
        )

    def _dests(self, sid: ServiceId) -> tuple[ObservedDest, ...]:
        dests = []
        for msg in self._ipvs().dest("dump", service=self._service_key(sid)):
            nla = msg.get_attr("IPVS_CMD_ATTR_DEST")
            # pyroute2 0.9.7: read the forwarding method from the raw attribute (see module doc).
            fwd = int(_attr(nla, "IPVS_DEST_ATTR_FWD_METHOD", 0)) & _FWD_MASK
            dests.append(ObservedDest(
                address=canonical_ip(str(_attr(nla, "IPVS_DEST_ATTR_ADDR"))),
                port=int(_attr(nla, "IPVS_DEST_ATTR_PORT", 0)),
                forwarding=_FWD_NAMES.get(fwd, "bypass"),
                weight=int(_attr(nla, "IPVS_DEST_ATTR_WEIGHT", 0)),
                u_threshold=int(_attr(nla, "IPVS_DEST_ATTR_U_THRESH", 0)),
                l_threshold=int(_attr(nla, "IPVS_DEST_ATTR_L_THRESH", 0)),
                active=int(_attr(nla, "IPVS_DEST_ATTR_ACTIVE_CONNS", 0)),
                inactive=int(_attr(nla, "IPVS_DEST_ATTR_INACT_CONNS", 0)),
            ))
        return tuple(sorted(dests, key=lambda d: (d.address, d.port)))

    # -- stats ------------------------------------------------------------------------------

    def stats(self) -> tuple[ServiceStats, ...]:
        """The counters of every TCP/UDP virtual service on an address and of its real servers,
        sorted like `observe()`: one service dump, then one destination dump per service.

        The kernel counts per CPU and copies the sums into what it reports at its rate
        estimator's tick (every 2 s), so the counters lag the traffic by up to that; the active
        and inactive connection counts are current."""
        from pyroute2.netlink.exceptions import NetlinkError

        found = []
        try:
            for msg in self._ipvs().service("dump"):
                nla = msg.get_attr("IPVS_CMD_ATTR_SERVICE")
                svc = self._service(nla)
                if svc is not None:
                    found.append(ServiceStats(svc.id, _counters(nla, "IPVS_SVC_ATTR_"), self._dest_stats(svc.id)))
        except NetlinkError as exc:
            raise KernelError(f"IPVS dump: {exc}") from exc
        return tuple(sorted(found, key=lambda s: s.id))

    def _dest_stats(self, sid: ServiceId) -> tuple[DestStats, ...]:
        dests = []
        for msg in self._ipvs().dest("dump", service=self._service_key(sid)):
            nla = msg.get_attr("IPVS_CMD_ATTR_DEST")
            dests.append(DestStats(
                address=canonical_ip(str(_attr(nla, "IPVS_DEST_ATTR_ADDR"))),
                port=int(_attr(nla, "IPVS_DEST_ATTR_PORT", 0)),
                counters=_counters(nla, "IPVS_DEST_ATTR_"),
                active=int(_attr(nla, "IPVS_DEST_ATTR_ACTIVE_CONNS", 0)),
                inactive=int(_attr(nla, "IPVS_DEST_ATTR_INACT_CONNS", 0)),
            ))
        return tuple(sorted(dests, key=lambda d: (d.address, d.port)))

    # -- apply ------------------------------------------------------------------------------

    @staticmethod
    def _service_key(sid: ServiceId, **extra: Any) -> Any:
        from pyroute2 import IPVSService

        fields: dict[str, Any] = {"af": _FAMILIES[sid.family], "addr": sid.vip, "port": sid.port,
                                  "protocol": PROTOCOLS[sid.protocol], **extra}
        # The kernel wants a netmask with every service. For IPv6 it is the prefix length as a
        # host-order u32 in an attribute pyroute2 encodes as an IPv4 address: ipvsadm sends 128
        # the same way. (pyroute2 adds the IPv4 one itself only when `af` is not given.)
        fields["netmask"] = socket.inet_ntoa(struct.pack("=I", 128)) if sid.family == 6 else "255.255.255.255"
        return IPVSService(**fields)

    def _service_full(self, sid: ServiceId, scheduler: str, flags: tuple[int, ...]) -> Any:
        return self._service_key(sid, sched_name=scheduler, timeout=0,
                                 flags={"flags": sched_flag_word(flags), "mask": _FLAGS_MASK})

    @staticmethod
    def _dest(op: AddDest | EditDest | DelDest) -> Any:
        from pyroute2 import IPVSDest

        if isinstance(op, DelDest):
            return IPVSDest(addr=op.address, port=op.port)
        return IPVSDest(addr=op.address, port=op.port, fwd_method=FWD_METHODS[op.forwarding], weight=op.weight,
                        u_thresh=op.u_threshold, l_thresh=op.l_threshold)

    def _apply_one(self, op: Op) -> None:
        from pyroute2.netlink.exceptions import NetlinkError

        ipvs = self._ipvs()
        try:
            if isinstance(op, AddService | EditService):
                svc = self._service_full(op.service, op.scheduler, op.flags)
                self._add_or_set(lambda cmd: ipvs.service(cmd, service=svc),
                                 "set" if isinstance(op, EditService) else "add")
            elif isinstance(op, DelService):
                ipvs.service("del", service=self._service_key(op.service))
            elif isinstance(op, AddDest | EditDest):
                svc, dest = self._service_key(op.service), self._dest(op)
                self._add_or_set(lambda cmd: ipvs.dest(cmd, service=svc, dest=dest),
                                 "set" if isinstance(op, EditDest) else "add")
            else:
                ipvs.dest("del", service=self._service_key(op.service), dest=self._dest(op))
        except NetlinkError as exc:
            # A delete of what is gone: ESRCH (no such service), ENOENT (no such real server).
            if isinstance(op, DelService | DelDest) and exc.code in (errno.ESRCH, errno.ENOENT):
                return
            raise

    @staticmethod
    def _add_or_set(call: Callable[[str], object], command: str) -> None:
        from pyroute2.netlink.exceptions import NetlinkError

        try:
            call(command)
        except NetlinkError as exc:
            if command != "add" or exc.code != errno.EEXIST:
                raise
            call("set")  # it exists: give it the attributes the add would have

    def apply(self, ops: Sequence[Op]) -> None:
        from pyroute2.netlink.exceptions import NetlinkError

        for index, op in enumerate(ops):
            try:
                self._apply_one(op)
            except NetlinkError as exc:
                raise ApplyError(op, index, exc.code, str(exc)) from exc
            except (OSError, ValueError) as exc:  # the socket failed, or pyroute2 could not encode the op
                raise ApplyError(op, index, getattr(exc, "errno", None) or errno.EINVAL, str(exc)) from exc

    # -- timeouts ---------------------------------------------------------------------------

    def _config_request(self, cmd: int, attrs: list[tuple[str, int]]) -> list[Any]:
        from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST
        from pyroute2.netlink.generic import ipvs as genl

        ipvs = self._ipvs()
        msg = _ipvs_msg_class()()
        msg["cmd"] = cmd
        msg["version"] = genl.GENL_VERSION
        msg["attrs"] = attrs
        result: list[Any] = ipvs._run_with_cleanup(ipvs.asyncore._do_request, msg, NLM_F_REQUEST | NLM_F_ACK)
        return result

    def timeouts(self) -> Timeouts:
        from pyroute2.netlink.exceptions import NetlinkError

        try:
            replies = [m for m in self._config_request(_CMD_GET_CONFIG, []) if m.get_attr("IPVS_CMD_ATTR_TIMEOUT_TCP")
                       is not None]
        except NetlinkError as exc:
            raise KernelError(f"IPVS get config: {exc}") from exc
        if not replies:
            raise KernelError("IPVS get config: no reply")
        m = replies[0]
        return Timeouts(tcp=_u32(m.get_attr("IPVS_CMD_ATTR_TIMEOUT_TCP")),
                        tcpfin=_u32(m.get_attr("IPVS_CMD_ATTR_TIMEOUT_TCP_FIN")),
                        udp=_u32(m.get_attr("IPVS_CMD_ATTR_TIMEOUT_UDP")))

    def set_timeouts(self, timeouts: Timeouts) -> None:
        """`ipvsadm --set`: a 0 leaves that timeout as it is (the kernel skips zeros)."""
        from pyroute2.netlink.exceptions import NetlinkError

        attrs = [(name, value) for name, value in (("IPVS_CMD_ATTR_TIMEOUT_TCP", timeouts.tcp),
                                                   ("IPVS_CMD_ATTR_TIMEOUT_TCP_FIN", timeouts.tcpfin),
                                                   ("IPVS_CMD_ATTR_TIMEOUT_UDP", timeouts.udp)) if value]
        try:
            self._config_request(_CMD_SET_CONFIG, attrs)
        except NetlinkError as exc:
            raise KernelError(f"IPVS set config {timeouts}: {exc}") from exc


# -- sysctls (net.ipv4.vs.*: conntrack, sloppy_tcp, expire_nodest_conn, ...) -----------------

def read_vs_sysctls(directory: Path = VS_SYSCTL_DIR) -> dict[str, int | str]:
    """Every IPVS sysctl: an int where the value is one, the text otherwise. Empty without IPVS."""
    values: dict[str, int | str] = {}
    if not directory.is_dir():
        return values
    for path in sorted(directory.iterdir()):
        try:
            text = path.read_text().strip()
        except OSError:  # write-only or not readable in this namespace
            continue
        try:
            values[path.name] = int(text)
        except ValueError:
            values[path.name] = text
    return values


def write_vs_sysctl(name: str, value: int, directory: Path = VS_SYSCTL_DIR) -> None:
    if "/" in name or name.startswith("."):
        raise KernelError(f"not an IPVS sysctl name: {name!r}")
    try:
        (directory / name).write_text(f"{value}\n")
    except OSError as exc:
        raise KernelError(f"sysctl net.ipv4.vs.{name}={value}: {exc}") from exc


# -- the strict fake ----------------------------------------------------------------------------

SCHEDULERS: Final = frozenset({"rr", "wrr", "lc", "wlc", "lblc", "lblcr", "dh", "sh", "sed", "nq", "fo", "ovf", "mh",
                               "twos"})
MAX_WEIGHT: Final = 2**31 - 1


@dataclass
class FakeIpvs:
    """IPVS in memory, strict where the planner should never need leniency: it refuses what the
    kernel refuses (an unknown scheduler, a real server of the wrong family, a negative weight)
    and, unlike the adapter, also an add of what exists or an edit/delete of what does not (a
    plan made from a fresh observation never needs those). `apply` stops at the first refusal
    with `ApplyError`, like the adapter. Connection counts are set by tests (`connect`)."""

    services: dict[ServiceId, ObservedService] = field(default_factory=dict)
    timeout_values: Timeouts = field(default_factory=lambda: Timeouts(900, 120, 300))
    batches: list[tuple[Op, ...]] = field(default_factory=list)  # every apply, in order
    fail_at: int | None = None  # the op of the next apply with this index fails (EIO)
    service_stats: tuple[ServiceStats, ...] = ()  # what `stats()` returns (set by tests)

    @classmethod
    def holding(cls, observed: Observed) -> FakeIpvs:
        return cls(services={s.id: s for s in observed.services})

    def observe(self) -> Observed:
        return Observed(tuple(self.services[k] for k in sorted(self.services)))

    def connect(self, sid: ServiceId, address: str, port: int, *, active: int, inactive: int = 0) -> None:
        svc = self.services[sid]
        dests = tuple(replace(d, active=active, inactive=inactive) if (d.address, d.port) == (address, port) else d
                      for d in svc.dests)
        self.services[sid] = replace(svc, dests=dests)

    def apply(self, ops: Sequence[Op]) -> None:
        self.batches.append(tuple(ops))
        fail_at, self.fail_at = self.fail_at, None
        for index, op in enumerate(ops):
            if index == fail_at:
                raise ApplyError(op, index, errno.EIO, "injected failure")
            problem = self._apply_one(op)
            if problem is not None:
                raise ApplyError(op, index, problem[0], problem[1])

    def _apply_one(self, op: Op) -> tuple[int, str] | None:
        svc = self.services.get(op.service)
        if isinstance(op, AddService | EditService):
            if (svc is None) != isinstance(op, AddService):
                return (errno.EEXIST, "service exists") if svc is not None else (errno.ESRCH, "no such service")
            if op.scheduler not in SCHEDULERS:
                return errno.ENOENT, f"no scheduler {op.scheduler}"
            dests = svc.dests if svc is not None else ()
            self.services[op.service] = ObservedService(op.service, op.scheduler, tuple(sorted(set(op.flags))),
                                                        dests=dests)
            return None
        if svc is None:
            return errno.ESRCH, "no such service"
        if isinstance(op, DelService):
            del self.services[op.service]
            return None
        found = {(d.address, d.port): d for d in svc.dests}
        key = (op.address, op.port)
        if isinstance(op, DelDest):
            if key not in found:
                return errno.ENOENT, "no such real server"
            del found[key]
        else:
            if (key in found) != isinstance(op, EditDest):
                return (errno.EEXIST, "real server exists") if key in found else (errno.ENOENT, "no such real server")
            if not 0 <= op.weight <= MAX_WEIGHT or op.u_threshold < 0 or op.l_threshold < 0:
                return errno.EINVAL, "weight or threshold out of range"
            if (":" in op.address) != (op.service.family == 6) and op.forwarding != "i":
                return errno.EINVAL, "real server of another family"
            old = found.get(key)
            found[key] = ObservedDest(op.address, op.port, op.forwarding, op.weight, op.u_threshold, op.l_threshold,
                                      active=old.active if old else 0, inactive=old.inactive if old else 0)
        self.services[op.service] = replace(svc, dests=tuple(found[k] for k in sorted(found)))
        return None

    def timeouts(self) -> Timeouts:
        return self.timeout_values

    def set_timeouts(self, timeouts: Timeouts) -> None:
        old = self.timeout_values
        self.timeout_values = Timeouts(timeouts.tcp or old.tcp, timeouts.tcpfin or old.tcpfin, timeouts.udp or old.udp)

    def stats(self) -> tuple[ServiceStats, ...]:
        return self.service_stats
