"""The realserver's kernel: VIP addresses, ARP sysctls, our nft tables, their counters.

`Kernel` is the port the reconciler uses; `LinuxKernel` is the one adapter (the only module of
the role that imports pyroute2 or runs `nft`), `FakeKernel` the strict in-memory stand-in.

How our addresses are recognised: every address we add carries the address protocol
`IFA_PROTO = 149` (Linux >= 5.18, both families; `ip addr` shows it as `proto 149`). IPv6 has no
address labels, so the label alone could not mark our /128s; the protocol can, and it survives
a restart of the realserver without any state of ours. IPv4 addresses also get the label
`<device>:k2i` (when it fits the kernel's 15 characters), so operators see them in `ip addr`.

What was last applied to nft: the digest of the text is kept in a small state file (default
under /run, so it goes with a reboot, as the tables do). A restart with unchanged state then
finds the digest, the chains and the services in place and changes nothing (counters keep
counting).

How nft is driven: through libnftables in-process (`kube2ipvs.libnft`). Deltas, which with the
table layout of `render_nft` are element changes, go through one long-lived context (about 3 ms
at 10,000 services); whole tables are loaded by a throwaway context, so the big cache of a full
load does not slow the next small change down. Where libnftables cannot be loaded, the same
texts go to `nft -f` (a process per change, about 20 ms more). Counters and the `class` map's
keys are read by netlink dumps (`kube2ipvs.nfsets`), not through nft, whose listing of 80,000
counter elements takes seconds.

Every method blocks (netlink, libnftables); the app calls them from a worker thread, one at a
time. With `netns`, everything happens in that network namespace (tests): addresses through
`IPRoute(netns=...)`, sockets and libnftables contexts created after `setns` on the calling
thread (a socket stays in the namespace it was made in), sysctls likewise.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import json
import logging
import os
import subprocess
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol

from kube2ipvs import libnft
from kube2ipvs.names import COUNTER_KINDS
from kube2ipvs.nfsets import SetReader, service_key
from kube2ipvs.render.nft import CLASS_MAP
from kube2ipvs.vipaddrs import AddressError, VipAddresses
from kube2ipvs.vipaddrs import label_for as label_for  # noqa: PLC0414 (re-exported: main and tests use it)
from kube2ipvs_realserver.plan import (
    NFT_FAMILIES,
    OWNED_TABLE,
    AddAddress,
    DeleteTables,
    NftTables,
    Observed,
    Op,
    ReplaceTable,
    SetSysctl,
    SysctlKey,
    expected_tables,
    host_prefixlen,
)

log = logging.getLogger("kube2ipvs.realserver")

DEFAULT_STATE_DIR: Final = "/run/kube2ipvs"
_DELETE_TABLES: Final = "".join(f"table {f} {OWNED_TABLE}\ndelete table {f} {OWNED_TABLE}\n" for f in NFT_FAMILIES)

ServiceKey = tuple[str, int, str]  # canonical VIP, port, protocol
# service -> counter kind (pkts_in, syn_in, ...) -> (packets, bytes)
Counters = Mapping[ServiceKey, Mapping[str, tuple[int, int]]]


class KernelError(Exception):
    """An operation the kernel refused (not an already-done one): report, resync later."""


class Kernel(Protocol):
    def observe(self, sysctls: Iterable[SysctlKey]) -> Observed: ...

    def apply(self, op: Op) -> None: ...

    def counters(self) -> Counters: ...


class LinuxKernel:
    def __init__(self, *, device: str = "lo", state_file: Path | None = None, netns: str | None = None,
                 use_libnftables: bool = True) -> None:
        self.device = device
        self.netns = netns
        self.state_file = state_file or Path(DEFAULT_STATE_DIR) / f"realserver-{device}.json"
        self._ipr: Any = None
        self._nft: libnft.Nft | None = None
        self._use_library = use_libnftables  # False: `nft -f` for everything (the fallback)
        self._sets: SetReader | None = None
        self._counter_sets: SetReader | None = None  # counters() runs in a thread of its own

    def close(self) -> None:
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None
        if self._nft is not None:
            self._nft.close()
            self._nft = None
        for reader in (self._sets, self._counter_sets):
            if reader is not None:
                reader.close()
        self._sets = self._counter_sets = None

    # -- addresses --------------------------------------------------------------------------

    def _iproute(self) -> VipAddresses:
        """Our addresses on the device (the `kube2ipvs.vipaddrs` adapter, its socket opened lazily)."""
        if self._ipr is None:
            self._ipr = VipAddresses(self.device, netns=self.netns)
        vips: VipAddresses = self._ipr
        return vips

    def addresses(self) -> tuple[frozenset[str], frozenset[str]]:
        """(ours, foreign) addresses on the device."""
        try:
            return self._iproute().addresses()
        except AddressError as exc:
            raise KernelError(str(exc)) from exc

    def _address(self, command: str, address: str, prefixlen: int) -> None:
        vips = self._iproute()
        try:
            if command == "add":
                vips.add(address, prefixlen)
            else:
                vips.delete(address, prefixlen)
        except AddressError as exc:
            raise KernelError(str(exc)) from exc

    # -- sysctls ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _in_netns(self) -> Iterator[None]:
        if self.netns is None:
            yield
            return
        from pyroute2 import netns

        netns.pushns(self.netns)  # /proc/sys/net shows the namespace of the thread that opens it
        try:
            yield
        finally:
            netns.popns()

    def read_sysctls(self, keys: Iterable[SysctlKey]) -> dict[SysctlKey, int | None]:
        values: dict[SysctlKey, int | None] = {}
        with self._in_netns():
            for dev, name in keys:
                try:
                    values[(dev, name)] = int(Path(f"/proc/sys/net/ipv4/conf/{dev}/{name}").read_text())
                except FileNotFoundError:
                    values[(dev, name)] = None
        return values

    def _write_sysctl(self, key: SysctlKey, value: int) -> None:
        dev, name = key
        with self._in_netns():
            try:
                Path(f"/proc/sys/net/ipv4/conf/{dev}/{name}").write_text(f"{value}\n")
            except OSError as exc:
                raise KernelError(f"sysctl net.ipv4.conf.{dev}.{name}={value}: {exc}") from exc

    # -- nft --------------------------------------------------------------------------------

    def _nft_cli(self, *args: str, stdin: str | None = None) -> str:
        prefix = ["ip", "netns", "exec", self.netns] if self.netns else []
        try:
            done = subprocess.run([*prefix, "nft", *args], input=stdin, capture_output=True, text=True,
                                  timeout=120, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise KernelError(f"nft {' '.join(args)}: {exc}") from exc
        if done.returncode != 0:
            raise KernelError(f"nft {' '.join(args)}: {done.stderr.strip()[:2000]}")
        return done.stdout

    def _context(self) -> libnft.Nft | None:
        """The long-lived libnftables context; None where the library cannot be loaded."""
        if self._nft is None and self._use_library:
            try:
                with self._in_netns():
                    self._nft = libnft.Nft()
            except libnft.NftError as exc:
                log.warning("event=libnftables_unavailable fallback=nft-cli error=%s", exc)
                self._use_library = False
        return self._nft

    def _nft_apply(self, text: str, *, whole: bool = False) -> None:
        """Run `text` as one transaction: a delta on the long-lived context, a whole table on a
        throwaway one (see the module docstring)."""
        context = self._context()
        try:
            if context is None:
                self._nft_cli("-f", "-", stdin=text)
            elif whole:
                with self._in_netns():
                    libnft.run_once(text)
            else:
                context.cmd(text)
        except libnft.NftError as exc:
            raise KernelError(f"nft: {str(exc)[:2000]}") from exc

    def _nft_json(self, command: str) -> list[dict[str, Any]]:
        context = self._context()
        try:
            if context is not None:
                return context.json(command)
        except libnft.NftError as exc:
            raise KernelError(f"nft {command}: {exc}") from exc
        doc = json.loads(self._nft_cli("-j", *command.split()) or "{}")
        items: list[dict[str, Any]] = doc.get("nftables", [])
        return items

    def _set_reader(self) -> SetReader:
        if self._sets is None:
            with self._in_netns():
                self._sets = SetReader()
        return self._sets

    def _elements(self, family: str, set_name: str) -> list[Any]:
        try:
            return self._set_reader().elements(family, OWNED_TABLE, set_name)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return []  # the table or set is not there (the chains say which tables are)
            raise KernelError(f"reading set {family} {OWNED_TABLE} {set_name}: {exc}") from exc

    def nft_tables(self) -> NftTables:
        # `list chains` (about 2 ms in-process): `list tables` or `list table` build nft's whole
        # cache, set elements included, which costs seconds at 10,000 services. A table without
        # chains therefore counts as absent (see expected_tables). The `class` map's keys come
        # from a netlink dump.
        chains = frozenset((c["chain"]["family"], c["chain"]["name"]) for c in self._nft_json("list chains")
                           if "chain" in c and c["chain"]["table"] == OWNED_TABLE
                           and c["chain"]["family"] in NFT_FAMILIES)
        tables = frozenset(f for f, _ in chains)
        keys = frozenset(key for family in sorted(tables) for element in self._elements(family, CLASS_MAP)
                         if (key := service_key(family, element.key)) is not None)
        return NftTables(tables, chains, keys)

    def _applied_digest(self) -> str | None:
        try:
            doc = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return None
        digest = doc.get("nft_digest") if isinstance(doc, dict) else None
        return digest if isinstance(digest, str) else None

    def _record_digest(self, digest: str | None) -> None:
        if digest is None:
            self.state_file.unlink(missing_ok=True)
            return
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"nft_digest": digest}) + "\n")
        os.replace(tmp, self.state_file)

    def replace_table(self, op: ReplaceTable) -> None:
        self._record_digest(None)  # until the kernel holds it, we do not know what it holds
        if op.delta is not None:
            try:
                if op.delta:
                    self._nft_apply(op.delta)
                self._record_digest(op.digest)
                return
            except KernelError as exc:
                # The table was not what the delta assumed (its commands create and delete
                # exactly the elements it expects, so the whole transaction failed and changed
                # nothing): load the whole text instead.
                log.warning("event=delta_refused error=%s", exc)
        self._nft_apply(op.text, whole=True)
        self._record_digest(op.digest)

    def counters(self) -> Counters:
        """Every counter of our tables, by service and kind: one netlink dump per counter set.

        Safe to call from another thread while a reconcile runs: it uses a socket of its own and
        nothing else of this object (a family without our table or set reads as empty)."""
        if self._counter_sets is None:
            with self._in_netns():
                self._counter_sets = SetReader()
        reader = self._counter_sets
        found: dict[ServiceKey, dict[str, tuple[int, int]]] = {}
        for family in NFT_FAMILIES:
            for kind in COUNTER_KINDS:
                try:
                    elements = reader.elements(family, OWNED_TABLE, kind)
                except OSError as exc:
                    if exc.errno == errno.ENOENT:
                        break  # no table (or no such set) in this family
                    raise KernelError(f"reading set {family} {OWNED_TABLE} {kind}: {exc}") from exc
                for element in elements:
                    key = service_key(family, element.key)
                    if key is not None and element.packets is not None:
                        found.setdefault(key, {})[kind] = (element.packets, element.octets or 0)
        return found

    # -- the port ---------------------------------------------------------------------------

    def observe(self, sysctls: Iterable[SysctlKey]) -> Observed:
        ours, foreign = self.addresses()
        return Observed(ours=ours, foreign=foreign, nft_digest=self._applied_digest(), nft=self.nft_tables(),
                        sysctls=self.read_sysctls(sysctls))

    def apply(self, op: Op) -> None:
        if isinstance(op, SetSysctl):
            self._write_sysctl(op.key, op.value)
        elif isinstance(op, ReplaceTable):
            self.replace_table(op)
        elif isinstance(op, DeleteTables):
            self._nft_apply(_DELETE_TABLES, whole=True)
            self._record_digest(None)
        elif isinstance(op, AddAddress):
            self._address("add", op.address, op.prefixlen)
        else:
            self._address("del", op.address, op.prefixlen)


@dataclass
class FakeKernel:
    """The kernel in memory, strict where the real one is: it rejects what the kernel rejects
    (an address that is not a host address of its family, a sysctl of a device that does not
    exist, nft text that is not our two tables) and what would be a bug of ours (deleting an
    address we do not own). It records every change, so tests can assert "no kernel change".
    """

    devices: set[str] = field(default_factory=lambda: {"lo", "eth0"})
    ours: set[str] = field(default_factory=set)
    foreign: set[str] = field(default_factory=lambda: {"127.0.0.1", "::1"})
    sysctls: dict[SysctlKey, int] = field(default_factory=dict)
    nft_text: str | None = None  # what our tables hold (None: no tables)
    digest: str | None = None  # the state file
    counter_values: dict[ServiceKey, dict[str, tuple[int, int]]] = field(default_factory=dict)
    changes: list[Op] = field(default_factory=list)
    fail_next: str | None = None  # the next apply raises KernelError with this message

    def observe(self, sysctls: Iterable[SysctlKey]) -> Observed:
        values = {(d, n): (self.sysctls.get((d, n), 0) if d in self.devices else None) for d, n in sysctls}
        nft = expected_tables(self.nft_text) if self.nft_text is not None else NftTables()
        return Observed(ours=frozenset(self.ours), foreign=frozenset(self.foreign), nft_digest=self.digest,
                        nft=nft, sysctls=values)

    def apply(self, op: Op) -> None:
        if self.fail_next is not None:
            message, self.fail_next = self.fail_next, None
            raise KernelError(message)
        if isinstance(op, SetSysctl):
            if op.key[0] not in self.devices:
                raise KernelError(f"no device {op.key[0]}")
            self.sysctls[op.key] = op.value
        elif isinstance(op, ReplaceTable):
            if not op.text.startswith(f"table ip {OWNED_TABLE}\ndelete table ip {OWNED_TABLE}\n"):
                raise KernelError("nft text does not replace our table")
            self.nft_text, self.digest = op.text, op.digest
        elif isinstance(op, DeleteTables):
            self.nft_text = self.digest = None
        elif isinstance(op, AddAddress):
            if op.prefixlen != host_prefixlen(op.address) or str(ipaddress.ip_address(op.address)) != op.address:
                raise KernelError(f"not a canonical host address: {op.address}/{op.prefixlen}")
            if op.address in self.foreign:
                raise KernelError(f"{op.address} exists")  # the real add would find it and not mark it ours
            self.ours.add(op.address)
        else:
            if op.address in self.foreign:
                raise AssertionError(f"deleted a foreign address {op.address}")
            self.ours.discard(op.address)
        self.changes.append(op)

    def counters(self) -> Counters:
        return {key: dict(kinds) for key, kinds in self.counter_values.items()}
