"""The director's VIP addresses: which ones to add and delete (pure), and the adapter that does it.

IPVS sees a packet only once the host takes it as its own, so the director holds every VIP it
serves as a host address (/32, /128). They go on a device of their own, the dummy link
`kube2ipvs0` (created when missing, brought up), or on `lo`. A dummy device keeps them apart from
the addresses the host itself uses and gives operators one place to look (`ip addr show
kube2ipvs0`); either way the host answers ARP for them (the kernel's weak host model), which is
what ARP mode wants.

Ours and foreign: the addresses are added with the mark of `kube2ipvs.vipaddrs` (IFA_PROTO
149), so a restarted director recognises its own without any state, and `plan_vips` never
deletes an address without the mark, nor adds one that someone else already holds (it then serves
that VIP with their address, and leaves it there when the VIP goes).

`plan_vips` is pure: adds first (what comes never waits for what goes), then deletes, each group
sorted (IPv4 before IPv6, by address). `LinuxHost` is the adapter: the app's `Host` port (VIP
addresses one at a time, and the net.ipv4.vs sysctls) and `apply` of `plan_vips`' ops. Every
method blocks on netlink or /proc; the app calls it from its one worker thread. `FakeHost` is the
strict in-memory stand-in.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from kube2ipvs.lbconfig import address_sort_key, canonical_address
from kube2ipvs.vipaddrs import AddressError, VipAddresses, host_prefixlen
from kube2ipvs_director.kernel import VS_SYSCTL_DIR, KernelError, read_vs_sysctls, write_vs_sysctl

DEFAULT_DEVICE: Final = "kube2ipvs0"


@dataclass(frozen=True, slots=True)
class ObservedVips:
    ours: frozenset[str] = frozenset()  # canonical addresses on the device that carry our mark
    foreign: frozenset[str] = frozenset()  # every other address on the device (never touched)


@dataclass(frozen=True, slots=True)
class AddVip:
    address: str  # canonical

    @property
    def prefixlen(self) -> int:
        return host_prefixlen(self.address)


@dataclass(frozen=True, slots=True)
class DeleteVip:
    address: str  # canonical, and ours

    @property
    def prefixlen(self) -> int:
        return host_prefixlen(self.address)


VipOp = AddVip | DeleteVip


def plan_vips(desired: Iterable[str], ours: frozenset[str], foreign: frozenset[str]) -> tuple[VipOp, ...]:
    """The ops that make the device hold `desired`: add each wanted VIP that is neither ours nor
    foreign, delete each of ours that is not wanted. Foreign addresses are never in an op.

    `ours` and `foreign` are canonical (as `observe` reports them). A desired VIP is compared in
    its canonical spelling; one that is not an IP address at all is skipped (normalize has
    already rejected such config, so it can only be a bug upstream, and it must not stop the rest).
    """
    wanted = {c for a in desired if (c := canonical_address(a)) is not None}
    adds = sorted(wanted - ours - foreign, key=address_sort_key)
    deletes = sorted(ours - wanted, key=address_sort_key)
    return (*(AddVip(a) for a in adds), *(DeleteVip(a) for a in deletes))


def applied(observed: ObservedVips, ops: Iterable[VipOp]) -> ObservedVips:
    """What the device holds once `ops` succeeded (for tests and for the loop's bookkeeping)."""
    ours = set(observed.ours)
    for op in ops:
        if isinstance(op, AddVip):
            ours.add(op.address)
        else:
            ours.discard(op.address)
    return ObservedVips(frozenset(ours), observed.foreign)


# -- the adapters ---------------------------------------------------------------------------------

class HostError(Exception):
    """The device is missing or could not be made, or the kernel refused an address op."""


class VipApplyError(HostError):
    """The kernel refused `op` (`ops[index]`); the ops before it were applied, none after it."""

    def __init__(self, op: VipOp, index: int, message: str) -> None:
        self.op, self.index = op, index
        super().__init__(f"op {index} {op}: {message}")


class _VipPort:
    """The app's address port (`vip_addresses`, `add_vip`, `delete_vip`) in terms of the
    op-based one (`observe`, `apply`), for the adapter and the fake alike."""

    def observe(self) -> ObservedVips:
        raise NotImplementedError

    def apply(self, ops: Sequence[VipOp]) -> None:
        raise NotImplementedError

    def vip_addresses(self) -> tuple[frozenset[str], frozenset[str]]:
        """(ours, foreign): canonical addresses on the device."""
        observed = self.observe()
        return observed.ours, observed.foreign

    def add_vip(self, address: str) -> None:
        self.apply([AddVip(address)])

    def delete_vip(self, address: str) -> None:
        self.apply([DeleteVip(address)])


class LinuxHost(_VipPort):
    """The director's host: VIPs on `device` (in `netns` when given, for tests) and the
    net.ipv4.vs sysctls (of the caller's namespace; `sysctl_dir` for tests).

    The device is created as a dummy link (with `mtu` when one is given) by the first add that
    needs it, and every read brings an existing one up: a device someone deleted or downed is
    repaired at the next resync. `lo` always exists and is always up.

    It offers the app's `Host` port (`vip_addresses`, `add_vip`, `delete_vip`, `vs_sysctls`,
    `set_vs_sysctl`) and the op-based one (`observe`, `apply` of `plan_vips`' ops).
    """

    def __init__(self, *, device: str = DEFAULT_DEVICE, netns: str | None = None, mtu: int | None = None,
                 sysctl_dir: Path = VS_SYSCTL_DIR) -> None:
        self.device = device
        self.mtu = mtu
        self.sysctl_dir = sysctl_dir
        self._vips = VipAddresses(device, netns=netns)

    def close(self) -> None:
        self._vips.close()

    def prepare(self) -> bool:
        """Make the device exist and be up; True when it had to be created."""
        try:
            return self._vips.ensure_dummy(mtu=self.mtu)
        except AddressError as exc:
            raise HostError(str(exc)) from exc

    def observe(self) -> ObservedVips:
        """The addresses on the device; none while the device is missing (the first add creates
        it, so `--cleanup` never does). An existing device is brought up (and given `mtu`)."""
        try:
            if not self._vips.exists():
                return ObservedVips()
            self._vips.ensure_dummy(mtu=self.mtu)
            ours, foreign = self._vips.addresses()
        except (AddressError, OSError) as exc:
            raise HostError(str(exc)) from exc
        return ObservedVips(ours, foreign)

    def apply(self, ops: Sequence[VipOp]) -> None:
        """One netlink request per op, in order, after making the device when an op adds; adding
        what is there or deleting what is gone counts as done. Stops at the first refusal with
        `VipApplyError`."""
        if any(isinstance(op, AddVip) for op in ops):
            self.prepare()
        for index, op in enumerate(ops):
            try:
                if isinstance(op, AddVip):
                    self._vips.add(op.address, op.prefixlen)
                else:
                    self._vips.delete(op.address, op.prefixlen)
            except AddressError as exc:
                raise VipApplyError(op, index, str(exc)) from exc

    # -- the app's Host port ----------------------------------------------------------------

    def vs_sysctls(self) -> Mapping[str, int | str]:
        return read_vs_sysctls(self.sysctl_dir)

    def set_vs_sysctl(self, name: str, value: int) -> None:
        try:
            write_vs_sysctl(name, value, self.sysctl_dir)
        except KernelError as exc:
            raise HostError(str(exc)) from exc

    # -- cleanup ----------------------------------------------------------------------------

    def remove_device(self) -> bool:
        """`--cleanup`, after our VIPs are deleted: delete the device when it is our dummy
        (`kube2ipvs0`, of kind dummy) and holds no address but IPv6 link-local ones (the kernel
        adds those itself). True when it was deleted; a missing device is nothing to do."""
        if self.device != DEFAULT_DEVICE:
            return False
        try:
            ours, foreign = self._vips.addresses()
        except AddressError:
            return False  # no device
        if ours or any(not ipaddress.ip_address(a).is_link_local for a in foreign):
            return False
        try:
            return self._vips.remove_dummy()
        except AddressError as exc:
            raise HostError(str(exc)) from exc


@dataclass
class FakeHost(_VipPort):
    """The director's host in memory, strict where the kernel is and where a bug of ours would
    show: it refuses an address that is not canonical, an add of a foreign address (the real add
    would find it and not mark it ours), a delete of a foreign one (AssertionError: never ours to
    delete) and a sysctl the kernel lacks. An add creates the device, like `LinuxHost`. It
    records every batch of ops (`add_vip`/`delete_vip` are batches of one)."""

    exists: bool = False
    ours: set[str] = field(default_factory=set)
    foreign: set[str] = field(default_factory=set)
    sysctls: dict[str, int | str] = field(default_factory=lambda: {"conntrack": 1, "expire_nodest_conn": 0,
                                                                    "sloppy_tcp": 0})
    batches: list[tuple[VipOp, ...]] = field(default_factory=list)
    fail_at: int | None = None  # the op of the next apply with this index fails
    stuck: set[str] = field(default_factory=set)  # sysctls whose writes do not take (health reports them)
    device: str = DEFAULT_DEVICE

    def prepare(self) -> bool:
        created, self.exists = not self.exists, True
        return created

    def observe(self) -> ObservedVips:
        if not self.exists:
            return ObservedVips()
        return ObservedVips(frozenset(self.ours), frozenset(self.foreign))

    def apply(self, ops: Sequence[VipOp]) -> None:
        self.batches.append(tuple(ops))
        fail_at, self.fail_at = self.fail_at, None
        if any(isinstance(op, AddVip) for op in ops):
            self.prepare()
        for index, op in enumerate(ops):
            if index == fail_at:
                raise VipApplyError(op, index, "injected failure")
            if not self.exists:
                raise VipApplyError(op, index, f"no device {self.device}")
            if canonical_address(op.address) != op.address:
                raise VipApplyError(op, index, f"not a canonical address: {op.address}")
            if op.address in self.foreign:
                if isinstance(op, DeleteVip):
                    raise AssertionError(f"deleted a foreign address {op.address}")
                raise VipApplyError(op, index, f"{op.address} exists and is not ours")
            if isinstance(op, AddVip):
                self.ours.add(op.address)
            else:
                self.ours.discard(op.address)

    def vs_sysctls(self) -> Mapping[str, int | str]:
        return dict(self.sysctls)

    def set_vs_sysctl(self, name: str, value: int) -> None:
        if name not in self.sysctls:
            raise HostError(f"sysctl net.ipv4.vs.{name}={value}: no such sysctl")
        if name not in self.stuck:
            self.sysctls[name] = value
