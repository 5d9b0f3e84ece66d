"""VIP addresses a component owns on one device, and the dummy device that can hold them.

Both the realserver (VIPs on `lo`) and the director (VIPs on a dummy device, `kube2ipvs0` by
default, or `lo`) add VIPs as host addresses (/32, /128) and must never touch anyone else's
addresses on the same device. `VipAddresses` is the one adapter for that; callers diff what they
want against `addresses()` and call `add`/`delete`.

How our addresses are recognised: every address we add carries the address protocol
`IFA_PROTO = 149` (Linux >= 5.18, both families; `ip addr` shows it as `proto 149`). IPv6 has no
address labels, so the label alone could not mark our /128s; the protocol can, and it survives
a restart without any state of ours. IPv4 addresses also get the label `<device>:k2i` (when it
fits the kernel's 15 characters), so operators see them in `ip addr`.

What is already done counts as done: adding an address that is there (EEXIST) or deleting one
that is gone (EADDRNOTAVAIL, ENOENT) succeeds. An address someone else added first stays theirs:
the kernel refuses our add with EEXIST and keeps its protocol, so `addresses()` still reports it
as foreign (callers plan no add for a foreign address).

Every method blocks on netlink; use one instance from one thread at a time (a pyroute2 socket is
not shared between threads). With `netns`, everything happens in that existing network
namespace (`IPRoute(netns=..., flags=0)`: a missing namespace is an error, not created).
pyroute2 is imported inside the methods, so importing this module stays cheap.
"""

from __future__ import annotations

import errno
import ipaddress
from typing import Any, Final

ADDRESS_PROTO: Final = 149  # IFA_PROTO of our addresses; 0-3 are the kernel's own
LABEL_SUFFIX: Final = ":k2i"
IFNAMSIZ: Final = 15  # the longest interface name (and address label) the kernel accepts
_IFF_UP: Final = 0x1


class AddressError(Exception):
    """The kernel refused an address or link operation (not an already-done one), or the device
    is missing: report it, and re-read before trying again."""


def label_for(device: str) -> str | None:
    """The label of our IPv4 addresses on `device`, or None when it would not fit IFNAMSIZ."""
    label = device + LABEL_SUFFIX
    return label if len(label) <= IFNAMSIZ else None


def host_prefixlen(address: str) -> int:
    """32 for an IPv4 address, 128 for an IPv6 one: VIPs are host addresses."""
    return 128 if ":" in address else 32


def canonical(address: str) -> str:
    """The kernel's spelling of an address (lower case, shortest IPv6 form); ValueError if invalid."""
    return str(ipaddress.ip_address(address.split("%", maxsplit=1)[0]))


class VipAddresses:
    """Our addresses on `device` (in `netns` when given), and the device itself."""

    def __init__(self, device: str, *, netns: str | None = None) -> None:
        self.device = device
        self.netns = netns
        self._ipr: Any = None

    def close(self) -> None:
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None

    def __enter__(self) -> VipAddresses:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _iproute(self) -> Any:
        if self._ipr is None:
            from pyroute2 import IPRoute

            # flags=0: a missing namespace is an error, not silently created (pyroute2's default).
            self._ipr = IPRoute(netns=self.netns, flags=0) if self.netns else IPRoute()
        return self._ipr

    def _lookup(self) -> int | None:
        found = self._iproute().link_lookup(ifname=self.device)
        return int(found[0]) if found else None

    def exists(self) -> bool:
        return self._lookup() is not None

    def index(self) -> int:
        """The device's interface index; AddressError when there is no such device."""
        index = self._lookup()
        if index is None:
            raise AddressError(f"no device {self.device}")
        return index

    # -- addresses --------------------------------------------------------------------------

    def addresses(self) -> tuple[frozenset[str], frozenset[str]]:
        """(ours, foreign): the canonical addresses on the device with our mark, and every other."""
        from pyroute2.netlink.exceptions import NetlinkError

        ours: set[str] = set()
        foreign: set[str] = set()
        try:
            messages = self._iproute().get_addr(index=self.index())
            for msg in messages:
                address = msg.get("IFA_LOCAL") or msg.get("IFA_ADDRESS")
                if address is None:
                    continue
                (ours if msg.get("IFA_PROTO") == ADDRESS_PROTO else foreign).add(canonical(address))
        except (NetlinkError, OSError) as exc:
            raise AddressError(f"addresses of {self.device}: {exc}") from exc
        return frozenset(ours), frozenset(foreign - ours)

    def add(self, address: str, prefixlen: int | None = None) -> None:
        """Add `address` (a host address unless `prefixlen` says otherwise) with our mark."""
        self._address("add", address, host_prefixlen(address) if prefixlen is None else prefixlen)

    def delete(self, address: str, prefixlen: int | None = None) -> None:
        """Delete `address`. The caller deletes only what `addresses()` reported as ours."""
        self._address("del", address, host_prefixlen(address) if prefixlen is None else prefixlen)

    def _address(self, command: str, address: str, prefixlen: int) -> None:
        from pyroute2.netlink.exceptions import NetlinkError

        extra: dict[str, Any] = {"proto": ADDRESS_PROTO} if command == "add" else {}
        if command == "add" and ":" not in address and (label := label_for(self.device)) is not None:
            extra["label"] = label
        try:
            self._iproute().addr(command, index=self.index(), address=address, prefixlen=prefixlen, **extra)
        except NetlinkError as exc:
            if command == "add" and exc.code == errno.EEXIST:
                return  # already there: converged
            if command == "del" and exc.code in (errno.EADDRNOTAVAIL, errno.ENOENT):
                return  # already gone: converged
            raise AddressError(f"addr {command} {address}/{prefixlen} dev {self.device}: {exc}") from exc
        except (OSError, ValueError) as exc:  # the socket failed, or pyroute2 could not encode it
            raise AddressError(f"addr {command} {address}/{prefixlen} dev {self.device}: {exc}") from exc

    # -- the device -------------------------------------------------------------------------

    def ensure_dummy(self, *, mtu: int | None = None) -> bool:
        """Make the device exist and be up: create it as a dummy link when it is missing (True
        then), bring it up when it is down, and give it `mtu` when one is given. A device that
        exists is used whatever its kind (`lo`, or one the operator made)."""
        from pyroute2.netlink.exceptions import NetlinkError

        ipr = self._iproute()
        created = False
        try:
            index = self._lookup()
            if index is None:
                try:
                    ipr.link("add", ifname=self.device, kind="dummy")
                    created = True
                except NetlinkError as exc:
                    if exc.code != errno.EEXIST:  # made by someone else in between: use it
                        raise
                index = self.index()
            (link,) = ipr.get_links(index)
            change: dict[str, Any] = {}
            if not int(link["flags"]) & _IFF_UP:
                change["state"] = "up"
            if mtu is not None and link.get("IFLA_MTU") != mtu:
                change["mtu"] = mtu
            if change:
                ipr.link("set", index=index, **change)
        except (NetlinkError, OSError, ValueError) as exc:
            raise AddressError(f"dummy device {self.device}: {exc}") from exc
        return created

    def kind(self) -> str | None:
        """The device's link kind ("dummy", "veth", ...); None for one without (lo, physical)."""
        (link,) = self._iproute().get_links(self.index())
        info = link.get("IFLA_LINKINFO")
        kind = info.get("IFLA_INFO_KIND") if info is not None else None
        return str(kind) if kind is not None else None

    def remove_dummy(self) -> bool:
        """Delete the device if it is a dummy link (True then); leave any other kind alone."""
        from pyroute2.netlink.exceptions import NetlinkError

        try:
            if self._lookup() is None or self.kind() != "dummy":
                return False
            self._iproute().link("del", index=self.index())
        except NetlinkError as exc:
            if exc.code == errno.ENODEV:
                return False  # gone in between
            raise AddressError(f"delete dummy device {self.device}: {exc}") from exc
        except OSError as exc:
            raise AddressError(f"delete dummy device {self.device}: {exc}") from exc
        return True
