"""The director's host side against the real kernel (the VM lane): the dummy VIP device is made
and repaired, VIPs are added and removed by diff while a foreign address stays, and the
observability readers count a real connection through a NAT VIP (/proc/net/ip_vs_conn and the
IPVS netlink stats).

The address tests run in a network namespace of their own (`k2i-h-<pid>`), which also exercises
the adapter's netns path; the IPVS tests use conftest's `ipvs` and `vip` fixtures in the VM's
own namespace (IPVS here has no netns support in `LinuxIpvs`).
"""

from __future__ import annotations

import http.client
import http.server
import json
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Final

import pytest
from pyroute2 import IPRoute

from kube2ipvs.vipaddrs import ADDRESS_PROTO, VipAddresses
from kube2ipvs_director.host import DEFAULT_DEVICE, AddVip, DeleteVip, LinuxHost, ObservedVips, plan_vips
from kube2ipvs_director.kernel import IpvsCounters, LinuxIpvs
from kube2ipvs_director.plan import AddDest, AddService, ServiceId
from kube2ipvs_director.stats import count_ip_vs_conn, read_conntrack, read_ip_vs_conn
from tests.vm.conftest import IPVSSocket, KeepAliveHandler, Vip

pytestmark = pytest.mark.vm

NETNS: Final = f"k2i-h-{os.getpid()}"
V1, V2, V6, FOREIGN, SHARED = "192.0.2.10", "192.0.2.11", "2001:db8::10", "192.0.2.99", "192.0.2.12"


def ip(*args: str) -> str:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20, check=True).stdout


@pytest.fixture
def netns() -> Iterator[str]:
    """A fresh network namespace, deleted (with every link in it) at teardown."""
    ip("netns", "add", NETNS)
    try:
        yield NETNS
    finally:
        subprocess.run(["ip", "netns", "del", NETNS], capture_output=True, timeout=20, check=False)


def link(ns: str, device: str) -> dict[str, Any]:
    (found,) = json.loads(ip("-n", ns, "-j", "-d", "link", "show", "dev", device))
    doc: dict[str, Any] = found
    return doc


def addresses(ns: str, device: str) -> dict[str, dict[str, Any]]:
    """address -> its `ip -j addr` entry (with `protocol` and `label` when set)."""
    (found,) = json.loads(ip("-n", ns, "-j", "addr", "show", "dev", device))
    return {a["local"]: a for a in found["addr_info"]}


@pytest.fixture
def host(netns: str) -> Iterator[LinuxHost]:
    adapter = LinuxHost(device=DEFAULT_DEVICE, netns=netns, mtu=1400)
    try:
        yield adapter
    finally:
        adapter.close()


def test_the_first_add_creates_the_dummy_device_up_with_its_mtu(host: LinuxHost, netns: str) -> None:
    assert host.observe() == ObservedVips()  # no device yet, and reading does not make one
    assert "kube2ipvs0" not in ip("-n", netns, "-br", "link")
    host.apply([AddVip(V1)])
    dev = link(netns, DEFAULT_DEVICE)
    assert dev["linkinfo"]["info_kind"] == "dummy"
    assert "UP" in dev["flags"]
    assert dev["mtu"] == 1400
    assert host.prepare() is False  # it exists now


def test_a_downed_device_is_brought_up_again_by_the_next_read(host: LinuxHost, netns: str) -> None:
    host.add_vip(V1)
    ip("-n", netns, "link", "set", "dev", DEFAULT_DEVICE, "down")
    ours, foreign = host.vip_addresses()
    assert ours == {V1}
    assert all(a.startswith("fe80:") for a in foreign)  # the kernel's own link-local address, if any
    assert "UP" in link(netns, DEFAULT_DEVICE)["flags"]


def test_vips_are_added_and_removed_by_diff_and_foreign_addresses_stay(host: LinuxHost, netns: str) -> None:
    host.prepare()
    ip("-n", netns, "addr", "add", f"{FOREIGN}/32", "dev", DEFAULT_DEVICE)  # someone else's
    ip("-n", netns, "addr", "add", f"{SHARED}/32", "dev", DEFAULT_DEVICE)  # someone else's, and a VIP of ours

    first = plan_vips({V1, V2, V6, SHARED}, *host.vip_addresses())
    assert first == (AddVip(V1), AddVip(V2), AddVip(V6))
    host.apply(first)
    on_device = addresses(netns, DEFAULT_DEVICE)
    assert {V1, V2, V6, FOREIGN, SHARED} <= on_device.keys()
    assert on_device[V1]["prefixlen"] == 32
    assert on_device[V6]["prefixlen"] == 128
    assert on_device[V1].get("label") == "kube2ipvs0:k2i"
    ours, foreign = host.vip_addresses()
    assert ours == {V1, V2, V6}
    assert {FOREIGN, SHARED} <= foreign
    assert plan_vips({V1, V2, V6, SHARED}, ours, foreign) == ()

    second = plan_vips({V6}, ours, foreign)
    assert second == (DeleteVip(V1), DeleteVip(V2))
    host.apply(second)
    on_device = addresses(netns, DEFAULT_DEVICE)
    assert V1 not in on_device
    assert V2 not in on_device
    assert {V6, FOREIGN, SHARED} <= on_device.keys()

    # Applying the same ops again changes nothing and raises nothing (already done is done).
    host.apply(second)
    host.apply(first[2:])
    assert host.vip_addresses()[0] == {V6}


def test_our_mark_is_what_tells_our_addresses_apart_after_a_restart(host: LinuxHost, netns: str) -> None:
    host.add_vip(V6)
    ip("-n", netns, "addr", "add", "2001:db8::99/128", "dev", DEFAULT_DEVICE)  # same kind, no mark
    with IPRoute(netns=netns, flags=0) as ipr:
        (index,) = ipr.link_lookup(ifname=DEFAULT_DEVICE)
        protos = {m.get("IFA_ADDRESS"): m.get("IFA_PROTO") for m in ipr.get_addr(index=index)}
    assert protos[V6] == ADDRESS_PROTO
    with VipAddresses(DEFAULT_DEVICE, netns=netns) as fresh:  # what a restarted director sees
        ours, foreign = fresh.addresses()
    assert ours == {V6}
    assert "2001:db8::99" in foreign


def test_cleanup_removes_our_dummy_device_only_when_nothing_foreign_is_on_it(host: LinuxHost, netns: str) -> None:
    host.add_vip(V1)
    ip("-n", netns, "addr", "add", f"{FOREIGN}/32", "dev", DEFAULT_DEVICE)
    host.apply(plan_vips((), *host.vip_addresses()))
    assert host.remove_device() is False
    assert DEFAULT_DEVICE in ip("-n", netns, "-br", "link")
    ip("-n", netns, "addr", "del", f"{FOREIGN}/32", "dev", DEFAULT_DEVICE)
    assert host.remove_device() is True
    assert DEFAULT_DEVICE not in ip("-n", netns, "-br", "link")
    assert host.vip_addresses() == (frozenset(), frozenset())


def test_vips_can_go_on_lo_which_is_never_created_nor_removed(netns: str) -> None:
    lo = LinuxHost(device="lo", netns=netns)
    try:
        assert lo.prepare() is False
        lo.add_vip(V1)
        ours, foreign = lo.vip_addresses()
        assert ours == {V1}
        assert "127.0.0.1" in foreign
        assert addresses(netns, "lo")[V1].get("label") == "lo:k2i"
        lo.delete_vip(V1)
        assert lo.vip_addresses()[0] == frozenset()
        assert lo.remove_device() is False
    finally:
        lo.close()


# -- a real connection through a NAT VIP, seen by the readers ----------------------------------

@pytest.fixture
def backend_port() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), KeepAliveHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def nat_vip(ipvs: IPVSSocket, vip: Vip, backend_port: int) -> tuple[ServiceId, int]:
    """vip:80 over TCP, NAT to the backend on 127.0.0.1 (the `ipvs` fixture removes it)."""
    sid = ServiceId(vip.address, 4, 80, "tcp")
    kernel = LinuxIpvs()
    try:
        kernel.apply([AddService(sid, "rr", ()), AddDest(sid, "127.0.0.1", backend_port, "m", 1, 0, 0)])
    finally:
        kernel.close()
    return sid, backend_port


def get(conn: http.client.HTTPConnection, backend: int) -> None:
    conn.request("GET", "/")
    response = conn.getresponse()
    assert response.status == 200
    assert response.read() == f"{backend}\n".encode()  # NATed to the backend


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    """IPVS offers no event for a connection changing state: poll, briefly."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def established() -> int:
    return (read_ip_vs_conn() or {}).get(("TCP", "ESTABLISHED"), 0)


def test_ip_vs_conn_counts_an_open_connection_as_established_until_it_closes(
        nat_vip: tuple[ServiceId, int]) -> None:
    sid, port = nat_vip
    before = established()  # entries of earlier tests' connections may linger, none established
    conn = http.client.HTTPConnection(sid.vip, 80, timeout=10)
    try:
        get(conn, port)
        assert established() == before + 1
    finally:
        conn.close()
    assert wait_for(lambda: established() == before), read_ip_vs_conn()


def test_the_conn_file_has_the_format_the_parser_reads(nat_vip: tuple[ServiceId, int]) -> None:
    sid, port = nat_vip
    conn = http.client.HTTPConnection(sid.vip, 80, timeout=10)
    try:
        get(conn, port)
        with open("/proc/net/ip_vs_conn", "rb") as f:
            lines = f.readlines()
    finally:
        conn.close()
    assert lines[0].split()[:8] == [b"Pro", b"FromIP", b"FPrt", b"ToIP", b"TPrt", b"DestIP", b"DPrt", b"State"]
    backend = [b"7F000001", f"{port:04X}".encode()]  # 127.0.0.1:port, a port only this test uses
    (entry,) = [fields for line in lines[1:] if (fields := line.split())[5:7] == backend]
    assert entry[0] == b"TCP"
    assert entry[3:5] == [b"C000020A", b"0050"]  # 192.0.2.10:80
    assert entry[7] == b"ESTABLISHED"
    ours = [line for line in lines if line.split()[5:7] == backend]
    assert count_ip_vs_conn([lines[0], *ours]) == {("TCP", "ESTABLISHED"): 1}


def test_ipvs_stats_count_the_connection_and_its_packets_both_ways(nat_vip: tuple[ServiceId, int]) -> None:
    sid, port = nat_vip
    kernel = LinuxIpvs()
    try:
        (before,) = kernel.stats()
        assert before.id == sid
        assert before.counters == IpvsCounters()
        conn = http.client.HTTPConnection(sid.vip, 80, timeout=10)
        try:
            for _ in range(3):
                get(conn, port)
            (svc,) = kernel.stats()
            (dest,) = svc.dests
            assert (dest.address, dest.port, dest.active, dest.inactive) == ("127.0.0.1", port, 1, 0)
        finally:
            conn.close()
        # The kernel copies its per-CPU counters into what it reports at the estimator's tick,
        # every 2 s: poll for them.
        assert wait_for(lambda: kernel.stats()[0].counters.packets_out >= 4), kernel.stats()
        (svc,) = kernel.stats()
        (dest,) = svc.dests
        # A handshake, three requests and their answers are at least 4 packets each way, and
        # NAT sees the replies (out) as well.
        assert svc.counters.connections == 1
        assert svc.counters.packets_in >= 4
        assert svc.counters.bytes_in > 3 * len("GET / HTTP/1.1\r\n")
        assert svc.counters.bytes_out > 3 * len(f"{port}\n")
        assert dest.counters.connections == 1
        assert dest.counters.packets_in >= 4
    finally:
        kernel.close()


def test_conntrack_use_is_read_when_the_module_is_loaded() -> None:
    usage = read_conntrack()
    if usage.max is None:
        pytest.skip("nf_conntrack is not loaded in this VM")
    assert usage.count is not None
    assert 0 <= usage.count <= usage.max
