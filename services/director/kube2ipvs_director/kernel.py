"""The director's kernel: IPVS virtual services and real servers, IPVS timeouts, IPVS sysctls.

`Ipvs` is the port the reconciler uses; `LinuxIpvs` is the one adapter, `FakeIpvs` the strict
in-memory stand-in. `LinuxIpvs` speaks generic netlink to IPVS through `ipvsnl` (a raw client on
the standard library: pyroute2 cost about 20 ms per op under the VM's emulation, 23 times
`ipvsadm -R`'s time for a full load). Every `LinuxIpvs` method blocks on netlink; the app calls
them from one worker thread, one at a time (the socket is not shared between threads).

`apply(ops)` sends the ops in order, many per `send` (`ipvsnl.apply_ops`), and raises
`ApplyError` with the first op the kernel refuses and its index: the ops before it are in the
kernel; of those after it, only some of its batch may be (`ApplyError.applied_after`), and the
caller re-observes before planning again. What is already done counts as done: deleting a
service or real server that is gone, adding one that exists (it is then `set` to the op's
attributes, so the result is the same either way).

Encoding, as ipvsadm does it: every service add/set carries the scheduler, the flags word with
mask 0xffff (so persistence and one-packet scheduling are off), persistence timeout 0 and a
netmask, which the kernel requires: 255.255.255.255 for IPv4, the prefix length 128 as a
host-order u32 for IPv6. A real server's add/set carries forwarding method, weight, both
thresholds and its address family (IPIP may cross families).
"""

from __future__ import annotations

import errno
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Final, Protocol

from kube2ipvs_director import ipvsnl
from kube2ipvs_director.plan import (
    AddService,
    DelDest,
    DelService,
    EditDest,
    EditService,
    Observed,
    ObservedDest,
    ObservedService,
    Op,
    ServiceId,
    Timeouts,
)

VS_SYSCTL_DIR: Final = Path("/proc/sys/net/ipv4/vs")


class KernelError(Exception):
    """IPVS could not be read or configured at all (no IPVS in this kernel, no permission)."""


class ApplyError(KernelError):
    """The kernel refused `op` (`ops[index]`). `applied` lists the indexes of the ops that are in
    the kernel nevertheless (by default every op before it; with batching also some after it);
    no other op was applied."""

    def __init__(self, op: Op, index: int, code: int, message: str, *,
                 applied: tuple[int, ...] | None = None) -> None:
        self.op, self.index, self.code = op, index, code
        self.applied = tuple(range(index)) if applied is None else applied
        super().__init__(f"op {index} {op}: {message}")


def is_withdrawal(op: Op) -> bool:
    """Ops that take capacity away: deleting, or a drain start (weight 0)."""
    return isinstance(op, DelDest | DelService) or (isinstance(op, EditDest) and op.weight == 0)


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
    return ipvsnl.sched_flag_word(tuple(flags))


def sched_flag_bits(word: int) -> tuple[int, ...]:
    return ipvsnl.sched_flag_bits(word)


class LinuxIpvs:
    """IPVS through `ipvsnl`, a raw generic netlink client, on one socket opened at first use."""

    def __init__(self, *, batch_messages: int = ipvsnl.BATCH_MESSAGES) -> None:
        self._client: ipvsnl.NetlinkIpvs | None = None
        self._batch_messages = batch_messages

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def _nl(self) -> ipvsnl.NetlinkIpvs:
        if self._client is None:
            try:
                self._client = ipvsnl.NetlinkIpvs()
            except ipvsnl.NetlinkError as exc:  # ENOENT: no generic netlink family "IPVS" in this kernel
                raise KernelError(f"IPVS is not available: {exc}") from exc
            except OSError as exc:
                raise KernelError(f"IPVS is not available: netlink: {exc}") from exc
        return self._client

    def _dump(self, cmd: int, attrs: bytes, what: str) -> list[ipvsnl.Part]:
        try:
            return self._nl().dump(cmd, attrs, what)
        except ipvsnl.NetlinkError as exc:
            self.close()  # a dump left half-read would make the socket's next one EBUSY
            raise KernelError(str(exc)) from exc
        except OSError as exc:
            self.close()
            raise KernelError(f"{what}: {exc}") from exc

    def _services(self) -> list[tuple[ObservedService, ipvsnl.Part, list[int], int]]:
        found = []
        for part in self._dump(ipvsnl.CMD_GET_SERVICE, b"", "IPVS dump"):
            decoded = ipvsnl.decode_service(part)
            if decoded is not None:
                found.append((decoded[0], part, decoded[1], decoded[2]))
        return found

    def _dest_parts(self, sid: ServiceId) -> list[ipvsnl.Part]:
        return self._dump(ipvsnl.CMD_GET_DEST, ipvsnl.service_attr(sid), f"IPVS dump of the real servers of {sid}")

    # -- observe ----------------------------------------------------------------------------

    def observe(self) -> Observed:
        """Every TCP/UDP virtual service on an address, with its real servers and their counts.

        fwmark services and other protocols (SCTP) are not reported: no VIP of ours is one.
        """
        services = []
        for svc, _part, _at, af in self._services():
            dests = []
            for part in self._dest_parts(svc.id):
                decoded = ipvsnl.decode_dest(part, af)
                if decoded is not None:
                    dests.append(decoded[0])
            dests.sort(key=_dest_key)
            services.append(replace(svc, dests=tuple(dests)))
        return Observed(tuple(services))

    def observe_dests(self, sid: ServiceId) -> tuple[ObservedDest, ...] | None:
        """The real servers of one service now, with their connection counts (a draining real
        server's drain ends on them). One GET_DEST dump; the kernel answers a service that is
        not there with none (the next full read finds it gone); None when IPVS cannot be read."""
        af = 10 if sid.family == 6 else 2
        try:
            parts = self._dest_parts(sid)
        except KernelError:
            return None
        dests = [d[0] for d in (ipvsnl.decode_dest(part, af) for part in parts) if d is not None]
        return tuple(sorted(dests, key=_dest_key))

    # -- stats ------------------------------------------------------------------------------

    def stats(self) -> tuple[ServiceStats, ...]:
        """The counters of every TCP/UDP virtual service on an address and of its real servers,
        sorted like `observe()`: one service dump, then one destination dump per service.

        The kernel counts per CPU and copies the sums into what it reports at its rate
        estimator's tick (every 2 s), so the counters lag the traffic by up to that; the active
        and inactive connection counts are current."""
        found = []
        for svc, part, at, af in self._services():
            dests = []
            for dpart in self._dest_parts(svc.id):
                decoded = ipvsnl.decode_dest(dpart, af)
                if decoded is not None:
                    dest, dat = decoded
                    counters = ipvsnl.decode_counters(dpart.buf, dat, ipvsnl.DEST_ATTR_STATS64, ipvsnl.DEST_ATTR_STATS)
                    dests.append(DestStats(dest.address, dest.port, IpvsCounters(*counters), active=dest.active,
                                           inactive=dest.inactive))
            counters = ipvsnl.decode_counters(part.buf, at, ipvsnl.SVC_ATTR_STATS64, ipvsnl.SVC_ATTR_STATS)
            found.append(ServiceStats(svc.id, IpvsCounters(*counters),
                                      tuple(sorted(dests, key=lambda d: (d.address, d.port)))))
        return tuple(sorted(found, key=lambda s: s.id))

    # -- apply ------------------------------------------------------------------------------

    def apply(self, ops: Sequence[Op]) -> None:
        if not ops:
            return
        try:
            client = self._nl()
        except KernelError as exc:
            raise ApplyError(ops[0], 0, errno.EPROTONOSUPPORT, str(exc)) from exc
        # Two phases: everything that adds or keeps capacity, then the withdrawals (drain starts,
        # deletions), sent only once the first phase went through whole. A batch goes on past a
        # refused op, so without the phases a failed add of a new real server could be followed
        # by the removal of the old one it was to replace. The plan's order within each phase
        # stays (a service before its real servers, real servers before their service goes).
        phases = ([i for i, op in enumerate(ops) if not is_withdrawal(op)],
                  [i for i, op in enumerate(ops) if is_withdrawal(op)])
        applied: list[int] = []
        for indexes in phases:
            if not indexes:
                continue
            refusal = ipvsnl.apply_ops(client, [ops[i] for i in indexes], batch_messages=self._batch_messages)
            if refusal is not None:
                self.close()  # the next call starts on a fresh socket, whatever this one still holds
                index = indexes[refusal.index]
                applied += indexes[:refusal.index] + [indexes[j] for j in refusal.applied_after]
                raise ApplyError(ops[index], index, refusal.code, refusal.message, applied=tuple(sorted(applied)))
            applied += indexes

    # -- timeouts ---------------------------------------------------------------------------

    def timeouts(self) -> Timeouts:
        try:
            parts = self._nl().request(ipvsnl.CMD_GET_CONFIG, b"", what="IPVS get config")
        except (ipvsnl.NetlinkError, OSError) as exc:
            self.close()
            raise KernelError(f"IPVS get config: {exc}") from exc
        found = ipvsnl.config_timeouts(parts)
        if found is None:
            raise KernelError("IPVS get config: no reply")
        return Timeouts(*found)

    def set_timeouts(self, timeouts: Timeouts) -> None:
        """`ipvsadm --set`: a 0 leaves that timeout as it is (the kernel skips zeros)."""
        try:
            self._nl().request(ipvsnl.CMD_SET_CONFIG,
                               ipvsnl.timeout_attrs(timeouts.tcp, timeouts.tcpfin, timeouts.udp),
                               what="IPVS set config")
        except (ipvsnl.NetlinkError, OSError) as exc:
            self.close()
            raise KernelError(f"IPVS set config {timeouts}: {exc}") from exc


def _dest_key(dest: ObservedDest) -> tuple[str, int]:
    return dest.address, dest.port


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

    def observe_dests(self, sid: ServiceId) -> tuple[ObservedDest, ...] | None:
        svc = self.services.get(sid)
        return svc.dests if svc is not None else ()  # as the kernel answers a service not there

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
