"""The director's IPVS adapter against the real kernel (the VM lane): observe, plan, apply, and
the kernel then holds exactly what `kube2ipvs rules` prints; drift is repaired; a weight change is
one `set` that keeps an established connection; other people's services stay as they are.

Every test uses the `ipvs` fixture, which empties IPVS before and after it.
"""

from __future__ import annotations

import http.client
import http.server
import re
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import Final, cast

import pytest

from kube2ipvs.ipvs import IpvsDest, IpvsService, desired_ipvs
from kube2ipvs.lbconfig import Forwarding
from kube2ipvs.model import ClusterState
from kube2ipvs.normalize import normalize
from kube2ipvs.render import render_format
from kube2ipvs_director.kernel import ApplyError, LinuxIpvs, read_vs_sysctls, write_vs_sysctl
from kube2ipvs_director.plan import (
    AddDest,
    AddService,
    DelDest,
    EditDest,
    EditService,
    Observed,
    ObservedDest,
    Op,
    Plan,
    ServiceId,
    Timeouts,
    plan,
)
from tests.builders import config, endpointslice, node, service, web_entry
from tests.vm.conftest import IPVSSocket, KeepAliveHandler, Vip

pytestmark = pytest.mark.vm

# NAT is not a forwarding method users configure (the realservers DNAT themselves), but it is the
# one that carries real traffic to backends on 127.0.0.1 inside the VM.
MASQ: Final = cast(Forwarding, "m")
OWNED: Final = frozenset({"192.0.2.10", "192.0.2.11", "2001:db8::10"})


@pytest.fixture
def kernel(ipvs: IPVSSocket) -> Iterator[LinuxIpvs]:
    adapter = LinuxIpvs()
    try:
        yield adapter
    finally:
        adapter.close()


def converge(kernel: LinuxIpvs, desired: Sequence[IpvsService], *, previous: Plan | None = None,
             now: float = 0.0) -> Plan:
    p = plan(desired, kernel.observe(), owned_vips=OWNED, draining=previous.draining if previous else None,
             now=now, drain_timeout=300.0)
    kernel.apply(p.ops)
    return p


def pending(kernel: LinuxIpvs, desired: Sequence[IpvsService], *, previous: Plan | None = None,
            now: float = 0.0) -> tuple[Op, ...]:
    return plan(desired, kernel.observe(), owned_vips=OWNED, draining=previous.draining if previous else None,
                now=now, drain_timeout=300.0).ops


def ipvsadm(*args: str) -> str:
    return subprocess.run(["ipvsadm", *args], capture_output=True, text=True, timeout=20, check=True).stdout


def grouped(save_text: str) -> dict[str, list[str]]:
    """`ipvsadm-save -n` text as service line -> its sorted real-server lines (the kernel lists
    services in hash order and real servers newest first; the renderer sorts both)."""
    groups: dict[str, list[str]] = {}
    head = ""
    for line in save_text.splitlines():
        if line.startswith("-A "):
            head = line
            groups[head] = []
        elif line.startswith("-a "):
            groups[head].append(line)
    return {h: sorted(lines) for h, lines in groups.items()}


def small_cluster() -> ClusterState:
    """Two VIPs: web on TCP and UDP with thresholds, dns with explicit mh and its flags."""
    nodes = [node("a", "198.51.100.1"), node("b", "198.51.100.2"), node("c", "198.51.100.3")]
    services = [service("shop", "web", ("http", 80, "TCP")), service("shop", "dns", ("dns", 53, "UDP"))]
    slices = [
        endpointslice("shop", "web", "w", [("http", 8080, "TCP")], [
            ("10.0.0.1", "a", True), ("10.0.0.2", "a", True), ("10.0.0.3", "a", True), ("10.0.1.1", "b", True)]),
        endpointslice("shop", "dns", "d", [("dns", 5353, "UDP")], [
            ("10.0.0.4", "a", True), ("10.0.2.1", "c", True), ("10.0.2.2", "c", True)]),
    ]
    cfg = config({
        "192.0.2.10": {"80": web_entry(udpEnabled=True, ipvsOptions={"uThreshold": 1000, "lThreshold": 100})},
        "192.0.2.11": {"53": {"namespace": "shop", "service": "dns", "portName": "dns", "tcpEnabled": False,
                              "udpEnabled": True, "ipvsOptions": {"scheduler": "mh", "flags": "mh-port"}}},
    })
    return normalize(nodes, services, slices, cfg)


def test_an_empty_kernel_converges_to_the_desired_services_and_then_needs_no_ops(kernel: LinuxIpvs) -> None:
    desired = desired_ipvs(small_cluster(), "bgp")
    first = converge(kernel, desired)
    assert len(first.ops) == len(desired) + sum(len(s.dests) for s in desired)
    assert pending(kernel, desired) == ()
    web_tcp = next(s for s in kernel.observe().services if s.id == ServiceId("192.0.2.10", 4, 80, "tcp"))
    assert (web_tcp.scheduler, web_tcp.flags, web_tcp.persistent) == ("mh", (1, 2), False)
    assert web_tcp.dests == (ObservedDest("198.51.100.1", 80, "g", 3, 750, 75),
                             ObservedDest("198.51.100.2", 80, "g", 1, 250, 25))


def thresholds_listed() -> set[tuple[str, str, int, int]]:
    """(service, real server, upper, lower) for each real server with a threshold, from
    `ipvsadm -Ln --thresholds` (`ipvsadm-save` never prints thresholds)."""
    found = set()
    head = ""
    for line in ipvsadm("-L", "-n", "--thresholds").splitlines():
        if line.startswith(("TCP ", "UDP ")):
            proto, target = line.split()[:2]
            head = f"{'-t' if proto == 'TCP' else '-u'} {target}"
        elif line.startswith("  -> ") and head:
            rs, upper, lower = line.split()[1:4]
            if rs != "RemoteAddress:Port" and (int(upper) or int(lower)):
                found.add((head, rs, int(upper), int(lower)))
    return found


def thresholds_rendered(text: str) -> set[tuple[str, str, int, int]]:
    found = set()
    for line in text.splitlines():
        m = re.match(r"-a (-[tu] \S+) -r (\S+) .*?(?: -x (\d+))?(?: -y (\d+))?$", line)
        if m and (m[3] or m[4]):
            found.add((m[1], m[2], int(m[3] or 0), int(m[4] or 0)))
    return found


def test_the_kernel_then_lists_exactly_what_kube2ipvs_rules_prints(kernel: LinuxIpvs) -> None:
    state = small_cluster()
    converge(kernel, desired_ipvs(state, "bgp"))
    rendered = render_format(state, "ipvsadm", mode="bgp")
    # ipvsadm-save leaves thresholds out (ipvsadm-restore does read -x/-y): compare the rest
    # line by line, and the thresholds with what `ipvsadm -Ln --thresholds` lists.
    assert grouped(ipvsadm("-S", "-n")) == grouped(re.sub(r" -[xy] \d+", "", rendered))
    assert len(grouped(rendered)) == 3
    assert thresholds_listed() == thresholds_rendered(rendered)
    assert len(thresholds_rendered(rendered)) == 4


def test_an_ipv6_service_converges_too(kernel: LinuxIpvs) -> None:
    desired = [IpvsService("2001:db8::10", 6, 443, "tcp", "wrr", (),
                           (IpvsDest("2001:db8:1::1", 443, "g", 2, 0, 0),
                            IpvsDest("2001:db8:1::2", 443, "g", 1, 0, 0)))]
    converge(kernel, desired)
    assert pending(kernel, desired) == ()
    assert grouped(ipvsadm("-S", "-n")) == {"-A -t [2001:db8::10]:443 -s wrr": [
        "-a -t [2001:db8::10]:443 -r [2001:db8:1::1]:443 -g -w 2",
        "-a -t [2001:db8::10]:443 -r [2001:db8:1::2]:443 -g -w 1"]}


def test_an_external_ipvsadm_delete_is_repaired_by_the_next_plan(kernel: LinuxIpvs) -> None:
    desired = desired_ipvs(small_cluster(), "arp")
    converge(kernel, desired)
    before = grouped(ipvsadm("-S", "-n"))
    ipvsadm("-d", "-t", "192.0.2.10:80", "-r", "198.51.100.2:80")
    ipvsadm("-D", "-u", "192.0.2.11:53")
    ops = pending(kernel, desired)
    web = ServiceId("192.0.2.10", 4, 80, "tcp")
    dns = ServiceId("192.0.2.11", 4, 53, "udp")
    assert ops == (AddDest(web, "198.51.100.2", 80, "g", 1, 250, 25),
                   AddService(dns, "mh", (2,)),
                   AddDest(dns, "198.51.100.1", 53, "g", 1, 0, 0),
                   AddDest(dns, "198.51.100.3", 53, "g", 2, 0, 0))
    kernel.apply(ops)
    assert grouped(ipvsadm("-S", "-n")) == before
    assert pending(kernel, desired) == ()


def test_a_scheduler_change_is_one_set_of_the_service_in_place(kernel: LinuxIpvs) -> None:
    desired = desired_ipvs(small_cluster(), "arp")
    converge(kernel, desired)
    changed = [replace(s, scheduler="mh", flags=(1, 2)) if s.port == 80 and s.protocol == "tcp" else s
               for s in desired]
    ops = pending(kernel, changed)
    assert ops == (EditService(ServiceId("192.0.2.10", 4, 80, "tcp"), "mh", (1, 2)),)
    kernel.apply(ops)
    assert pending(kernel, changed) == ()
    assert "-A -t 192.0.2.10:80 -s mh -b mh-fallback,mh-port" in ipvsadm("-S", "-n").splitlines()


@pytest.fixture
def keepalive_backends() -> Iterator[list[int]]:
    """Two HTTP/1.1 backends on 127.0.0.1; each answers with its own port."""
    servers = [http.server.ThreadingHTTPServer(("127.0.0.1", 0), KeepAliveHandler) for _ in range(2)]
    threads = []
    for server in servers:
        server.daemon_threads = True
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        threads.append(thread)
    try:
        yield [int(s.server_address[1]) for s in servers]
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()
        for thread in threads:
            thread.join(timeout=5)


def get(conn: http.client.HTTPConnection) -> int:
    conn.request("GET", "/")
    response = conn.getresponse()
    assert response.status == 200
    return int(response.read())


def nat_service(vip: str, weights: dict[int, int]) -> list[IpvsService]:
    return [IpvsService(vip, 4, 80, "tcp", "wrr", (),
                        tuple(IpvsDest("127.0.0.1", port, MASQ, w, 0, 0) for port, w in sorted(weights.items())))]


def test_a_weight_change_is_one_set_and_an_open_connection_keeps_its_backend(
        kernel: LinuxIpvs, vip: Vip, keepalive_backends: list[int]) -> None:
    first, second = keepalive_backends
    converge(kernel, nat_service(vip.address, {first: 1, second: 1}))
    conn = http.client.HTTPConnection(vip.address, 80, timeout=10)
    try:
        serving = get(conn)
        other = second if serving == first else first
        heavier = nat_service(vip.address, {serving: 5, other: 1})
        ops = pending(kernel, heavier)
        assert ops == (EditDest(ServiceId(vip.address, 4, 80, "tcp"), "127.0.0.1", serving, "m", 5, 0, 0),)
        kernel.apply(ops)
        assert [get(conn) for _ in range(3)] == [serving] * 3  # same TCP connection, same backend
        (svc,) = kernel.observe().services
        assert {d.port: (d.weight, d.active) for d in svc.dests} == {serving: (5, 1), other: (1, 0)}
    finally:
        conn.close()


def test_a_node_without_endpoints_drains_at_weight_0_and_goes_when_its_connection_ends(
        kernel: LinuxIpvs, vip: Vip, keepalive_backends: list[int]) -> None:
    first, second = keepalive_backends
    converge(kernel, nat_service(vip.address, {first: 1, second: 1}))
    conn = http.client.HTTPConnection(vip.address, 80, timeout=10)
    serving = get(conn)
    other = second if serving == first else first
    left = nat_service(vip.address, {other: 1})
    sid = ServiceId(vip.address, 4, 80, "tcp")
    try:
        drain = converge(kernel, left, now=1.0)
        assert drain.ops == (EditDest(sid, "127.0.0.1", serving, "m", 0, 0, 0),)
        assert get(conn) == serving  # weight 0 takes no new connections, the open one goes on
        fresh = http.client.HTTPConnection(vip.address, 80, timeout=10)
        try:
            assert get(fresh) == other
        finally:
            fresh.close()
        assert pending(kernel, left, previous=drain, now=2.0) == ()  # one active connection left
        # One service's real servers read alone (the change path's drain check) say the same.
        whole = {(d.port, d.weight, d.active) for s in kernel.observe().services if s.id == sid for d in s.dests}
        alone = kernel.observe_dests(sid)
        assert alone is not None
        assert {(d.port, d.weight, d.active) for d in alone} == whole
        assert next(d.active for d in alone if d.port == serving) == 1
        assert kernel.observe_dests(ServiceId(vip.address, 4, 81, "tcp")) == ()  # no such service: none
    finally:
        conn.close()
    # Closing moves the connection out of ESTABLISHED: the real server has no active one left.
    assert wait_for(lambda: active_conns(kernel, serving) == 0)
    done = converge(kernel, left, previous=drain, now=3.0)
    assert done.ops == (DelDest(sid, "127.0.0.1", serving),)
    assert done.draining == {}
    assert [d.port for s in kernel.observe().services for d in s.dests] == [other]


def active_conns(kernel: LinuxIpvs, port: int) -> int:
    return sum(d.active for s in kernel.observe().services for d in s.dests if d.port == port)


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    """IPVS offers no event for a connection changing state: poll its counters, briefly."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_services_that_are_not_ours_are_left_alone(kernel: LinuxIpvs) -> None:
    ipvsadm("-A", "-t", "10.96.0.1:443", "-s", "rr")
    ipvsadm("-a", "-t", "10.96.0.1:443", "-r", "10.0.0.5:6443", "-m", "-w", "3")
    ipvsadm("-A", "-u", "192.0.2.99:53", "-s", "wlc", "-p", "60")
    ipvsadm("-A", "-f", "7", "-s", "rr")
    foreign = grouped(ipvsadm("-S", "-n"))
    desired = desired_ipvs(small_cluster(), "arp")
    converge(kernel, desired)
    assert pending(kernel, desired) == ()
    converge(kernel, [])  # nothing desired: ours drain (weight 0), theirs stay as they were
    now = grouped(ipvsadm("-S", "-n"))
    assert {h: lines for h, lines in now.items() if h in foreign} == foreign
    assert all(" -w 0" in line for h, lines in now.items() if h not in foreign for line in lines)


def test_apply_stops_at_the_first_refused_op_and_names_it(kernel: LinuxIpvs) -> None:
    sid = ServiceId("192.0.2.10", 4, 80, "tcp")
    ops: list[Op] = [AddService(sid, "wrr", ()),
                     EditDest(sid, "198.51.100.1", 80, "g", 2, 0, 0),  # no such real server: ENOENT
                     AddDest(sid, "198.51.100.2", 80, "g", 1, 0, 0)]
    with pytest.raises(ApplyError) as caught:
        kernel.apply(ops)
    assert (caught.value.index, caught.value.op) == (1, ops[1])
    # The batch went on past the refusal: the later add ran (and is named), no withdrawal did.
    assert caught.value.applied == (0, 2)
    assert grouped(ipvsadm("-S", "-n")) == {
        "-A -t 192.0.2.10:80 -s wrr": ["-a -t 192.0.2.10:80 -r 198.51.100.2:80 -g -w 1"]}


def test_adding_what_exists_sets_it_and_deleting_what_is_gone_is_done(kernel: LinuxIpvs) -> None:
    desired = desired_ipvs(small_cluster(), "arp")
    ops = plan(desired, Observed(), owned_vips=OWNED).ops
    kernel.apply(ops)
    heavier = [replace(s, dests=tuple(replace(d, weight=d.weight + 1) for d in s.dests)) for s in desired]
    kernel.apply(plan(heavier, Observed(), owned_vips=OWNED).ops)  # adds, all of which exist
    assert pending(kernel, heavier) == ()
    kernel.apply(plan([], kernel.observe(), owned_vips=OWNED, now=0.0).ops)  # drain to weight 0
    cleanup = plan([], kernel.observe(), owned_vips=OWNED, now=0.0).ops
    kernel.apply(cleanup)
    kernel.apply(cleanup)  # everything it deletes is already gone
    assert kernel.observe() == Observed()


def test_timeouts_are_set_and_read_back(kernel: LinuxIpvs) -> None:
    original = kernel.timeouts()
    try:
        kernel.set_timeouts(Timeouts(tcp=1000, tcpfin=60, udp=200))
        assert kernel.timeouts() == Timeouts(1000, 60, 200)
        kernel.set_timeouts(Timeouts(udp=30))  # 0 leaves the others as they are
        assert kernel.timeouts() == Timeouts(1000, 60, 30)
        assert "Timeout (tcp tcpfin udp): 1000 60 30" in ipvsadm("-L", "--timeout")
    finally:
        kernel.set_timeouts(original)
    assert kernel.timeouts() == original


def test_the_ipvs_sysctls_are_read_and_written() -> None:
    values = read_vs_sysctls()
    assert {"conntrack", "expire_nodest_conn", "sloppy_tcp"} <= values.keys()
    original = values["sloppy_tcp"]
    assert isinstance(original, int)
    try:
        write_vs_sysctl("sloppy_tcp", 1)
        assert read_vs_sysctls()["sloppy_tcp"] == 1
    finally:
        write_vs_sysctl("sloppy_tcp", original)
