"""The director's nftables dataplane (stateless direct routing by Maglev tables) on real links:

    client 203.0.113.2 ── router ─┬─ director A 10.99.0.11  (ECMP next hops for the VIP)
                       (br0      ├─ director B 10.99.0.12
                       10.99.0.1)├─ node n1 10.99.0.21 ── pod n1 10.50.1.2
                                 ├─ node n2 10.99.0.22 ── pod n2 10.50.2.2
                                 └─ node n3 10.99.0.23 ── pod n3 10.50.3.2

Both directors run DirectorApp in this process with the nftables adapter (`NftDsr`) in their
namespace; the nodes hold the VIP on lo and DNAT it to their pod with the realserver's own nft
rendering; replies go node -> router -> client, never through a director. The pods answer with
their name and the client address they see (HTTP and UDP on 8080, a line echo on 8081).
"""

from __future__ import annotations

import asyncio
import selectors
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from pyroute2 import netns as pyroute2_netns

from kube2ipvs.maglev import maglev_table
from kube2ipvs.model import ClusterState
from kube2ipvs.natskv import KVPublisher, NatsSettings
from kube2ipvs.normalize import normalize
from kube2ipvs.protocol import encode_state, plan_writes
from kube2ipvs.render.nft import render_nft
from kube2ipvs_director.app import DirectorApp, DirectorSettings
from kube2ipvs_director.dsr import DsrSettings
from kube2ipvs_director.host import LinuxHost
from kube2ipvs_director.nftdsr import FULL_READ_EVERY, NftDsr
from kube2ipvs_director.plan import AddDest, AddService, ServiceId, Timeouts
from tests.builders import config, endpointslice, node, service, web_entry
from tests.natsfixture import nats_server_binary
from tests.root.conftest import SERVER, Lab, Netns, skip_reason

pytestmark = pytest.mark.root

VIP = "192.0.2.80"
CLIENT = "203.0.113.2"
DIRECTORS = {"a": "10.99.0.11", "b": "10.99.0.12"}
NODES = {"n1": "10.99.0.21", "n2": "10.99.0.22", "n3": "10.99.0.23"}
POD = {name: f"10.50.{i}.2" for i, name in enumerate(NODES, start=1)}
WEB = service("shop", "web", ("http", 80, "TCP"), ("echo", 81, "TCP"))
UDP_SID = ServiceId(VIP, 4, 80, "udp")

ECHO = r"""
import socketserver, sys
name, port = sys.argv[1], int(sys.argv[2])
class Handler(socketserver.StreamRequestHandler):
    def handle(self):
        for line in self.rfile:
            self.wfile.write(f"{name} {line.decode().strip()}\n".encode())
class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
srv = Server(("0.0.0.0", port), Handler)
print("ready", flush=True)
srv.serve_forever()
"""

# On a director: counts any VIP packet that reached its IP stack, and any conntrack entry of a VIP flow.
PROBE = f"""table ip probe {{
  chain raw {{ type filter hook prerouting priority raw; ip daddr {VIP} counter; }}
  chain late {{ type filter hook prerouting priority filter; ct original ip daddr {VIP} counter; }}
}}
"""

# A long-lived connection, driven line by line: each stdin line is sent and the answer printed.
LINE_CLIENT = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
f = s.makefile("rw")
print("connected", flush=True)
for line in sys.stdin:
    f.write(line); f.flush()
    answer = f.readline()
    print(answer.strip() or "EOF", flush=True)
"""

# One UDP flow per source port (bound explicitly, so a second run repeats the very same flows).
UDP_FLOWS = r"""
import socket, sys
vip, port, first, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
for sport in range(first, first + count):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", sport))
        s.settimeout(2)
        answer = "lost"
        for _ in range(3):
            s.sendto(b"ping", (vip, port))
            try:
                answer = s.recvfrom(2048)[0].decode().split()[0]
                break
            except socket.timeout:
                continue
        print(sport, answer, flush=True)
"""


def state(generation: int, nodes: Sequence[str], vip: str = VIP) -> ClusterState:
    """shop/web on `vip`: HTTP and UDP echo on port 80 (pods' 8080), a line echo on 81 (8081),
    served by one pod on each of `nodes`."""
    cfg = config({vip: {"80": web_entry(udpEnabled=True),
                        "81": {"namespace": "shop", "service": "web", "portName": "echo"}}})
    slices = [endpointslice("shop", "web", "w", [("http", 8080, "TCP"), ("echo", 8081, "TCP")],
                            [(POD[n], n, True) for n in nodes])]
    return replace(normalize([node(n, NODES[n]) for n in NODES], [WEB], slices, cfg), generation=generation)


@dataclass
class Topology:
    router: Netns
    client: Netns
    directors: dict[str, Netns]
    nodes: dict[str, Netns]

    def route_via(self, *names: str) -> None:
        hops = [w for n in names for w in ("nexthop", "via", DIRECTORS[n])]
        self.router.ip("route", "replace", f"{VIP}/32", *hops)

    def udp_flows(self, first: int, count: int) -> dict[int, str]:
        out = self.client.exec(sys.executable, "-c", UDP_FLOWS, VIP, "80", str(first), str(count), timeout=120)
        return {int(sport): pod for sport, pod in (line.split() for line in out.splitlines())}


def add_node(lab: Lab, router: Netns, name: str, vip: str = VIP) -> Netns:
    """Node `name` on the router's bridge, holding `vip` on lo (answering no ARP for it), and its
    pod: the realserver's own nft rules DNAT the VIP's ports to the pod."""
    i = list(NODES).index(name) + 1
    ns = lab.netns(f"dsr-{name}")
    lab.link(ns, "eth0", router, f"r-{name}")
    router.ip("link", "set", f"r-{name}", "master", "br0")
    ns.ip("addr", "add", f"{NODES[name]}/24", "dev", "eth0")
    ns.ip("route", "add", "default", "via", "10.99.0.1")
    ns.ip("addr", "add", f"{vip}/32", "dev", "lo")
    ns.exec("sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv4.conf.all.arp_ignore=1",
            "net.ipv4.conf.all.arp_announce=2", "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.eth0.rp_filter=0")
    pod = lab.netns(f"dsr-p{name}")
    lab.link(ns, "vp", pod, "eth0")
    ns.ip("addr", "add", f"10.50.{i}.1/24", "dev", "vp")
    pod.ip("addr", "add", f"{POD[name]}/24", "dev", "eth0")
    pod.ip("route", "add", "default", "via", f"10.50.{i}.1")
    lab.spawn_ready(pod, [sys.executable, "-c", SERVER, name, "8080"])
    lab.spawn_ready(pod, [sys.executable, "-c", ECHO, name, "8081"])
    mine = [replace(vs, backends=tuple(b for b in vs.backends if b.node == name))
            for vs in state(1, list(NODES), vip).services]
    ns.nft(render_nft(mine))
    return ns


def build(lab: Lab) -> Topology:
    router, client = lab.netns("dsr-r"), lab.netns("dsr-c")
    router.exec("sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv4.fib_multipath_hash_policy=1",
                "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0")
    router.ip("link", "add", "br0", "type", "bridge")
    router.ip("link", "set", "br0", "up")
    router.ip("addr", "add", "10.99.0.1/24", "dev", "br0")
    lab.link(router, "rc", client, "eth0")
    router.ip("addr", "add", "203.0.113.1/24", "dev", "rc")
    client.ip("addr", "add", f"{CLIENT}/24", "dev", "eth0")
    client.ip("route", "add", "default", "via", "203.0.113.1")
    directors, nodes = {}, {}
    for name, address in DIRECTORS.items():
        ns = directors[name] = lab.netns(f"dsr-{name}")
        lab.link(ns, f"{name}0", router, f"r-{name}")
        router.ip("link", "set", f"r-{name}", "master", "br0")
        ns.ip("addr", "add", f"{address}/24", "dev", f"{name}0")
    for name in NODES:
        nodes[name] = add_node(lab, router, name)
    topo = Topology(router, client, directors, nodes)
    topo.route_via("a", "b")
    return topo


def director(ns: Netns, interface: str, **kwargs: Any) -> tuple[DirectorApp, NftDsr]:
    """DirectorApp on the nftables dataplane in `ns` (BGP mode unless `settings` says otherwise)."""
    dataplane = NftDsr(DsrSettings(interface), netns=ns.name)
    settings = kwargs.pop("settings", DirectorSettings(mode="bgp", timeouts=Timeouts(), vs_sysctls={}))
    app = DirectorApp(dataplane, LinuxHost(device="lo", netns=ns.name), source=None, settings=settings, **kwargs)
    return app, dataplane


async def converge(apps: Sequence[DirectorApp], target: ClusterState) -> None:
    for app in apps:
        app.offer(target)
        await app.reconcile_once()
        assert app.apply_error is None, app.apply_error
        assert app.health().ok, app.health().reason


@pytest.fixture
def topology(lab: Lab) -> Topology:
    if (reason := skip_reason()) is not None:
        pytest.skip(reason)
    return build(lab)


def run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


def test_requests_reach_every_pod_through_both_directors_and_replies_bypass_them(topology: Topology) -> None:
    for ns in topology.directors.values():
        ns.nft(PROBE)

    async def scenario() -> None:
        apps = [director(topology.directors[n], f"{n}0") for n in DIRECTORS]
        try:
            await converge([a for a, _ in apps], state(1, list(NODES)))
            answers = topology.client.exec("curl", "-sS", "-m", "5", "-H", "Connection: close",
                                           *[f"http://{VIP}:80/"] * 60).splitlines()
            pods = Counter(line.split()[0] for line in answers)
            assert set(pods) == set(NODES), pods
            assert {line.split()[1] for line in answers} == {CLIENT}  # the source is kept (DSR)
            flows = topology.udp_flows(41000, 60)
            assert set(flows.values()) == set(NODES), flows
            for _, dataplane in apps:
                forwarded = {s.id: s.counters.packets_in for s in dataplane.stats()}
                assert forwarded[ServiceId(VIP, 4, 80, "tcp")] > 0  # ECMP used both directors
                assert forwarded[UDP_SID] > 0
        finally:
            for app, dataplane in apps:
                app.close()
                dataplane.close()

    run(scenario())
    for name, ns in topology.directors.items():
        # No VIP packet reached the director's IP stack, and conntrack saw no connection at all.
        probe = ns.exec("nft", "list", "table", "ip", "probe")
        assert probe.count("counter packets 0 bytes 0") == 2, probe
        # The replies went node -> router -> client: what a director sent is the forwarded half
        # (client -> node) of those flows, and no reply.
        rx = int(ns.exec("cat", f"/sys/class/net/{name}0/statistics/rx_packets"))
        tx = int(ns.exec("cat", f"/sys/class/net/{name}0/statistics/tx_packets"))
        print(f"director {name}: received {rx} packets, sent {tx}")
        assert tx <= rx + 20, (rx, tx)


def test_a_long_lived_tcp_connection_survives_the_router_moving_it_to_the_other_director(
    topology: Topology, lab: Lab
) -> None:
    async def scenario() -> None:
        apps = [director(topology.directors[n], f"{n}0") for n in DIRECTORS]
        try:
            await converge([a for a, _ in apps], state(1, list(NODES)))
            flips = 0
            for _ in range(4):  # connections of several flows (so several nodes), each flipped twice
                topology.route_via("a")
                proc = subprocess.Popen(["ip", "netns", "exec", topology.client.name, sys.executable, "-c",
                                         LINE_CLIENT, VIP, "81"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        text=True)
                lab.processes.append(proc)
                assert proc.stdin is not None
                assert proc.stdout is not None
                assert proc.stdout.readline().strip() == "connected"
                answers = []
                for via in ("a", "b", "a"):
                    topology.route_via(via)
                    proc.stdin.write(f"via-{via}\n")
                    proc.stdin.flush()
                    answers.append(proc.stdout.readline().split())
                    flips += 1
                proc.stdin.close()
                proc.wait(timeout=10)
                pods = {a[0] for a in answers}
                assert len(pods) == 1, answers  # one pod: the same connection all along
                assert pods <= set(NODES)
                assert [a[1] for a in answers] == ["via-a", "via-b", "via-a"]
            assert flips == 12
            echo = ServiceId(VIP, 4, 81, "tcp")
            for _, dataplane in apps:  # both directors forwarded packets of these connections
                assert {s.id: s.counters.packets_in for s in dataplane.stats()}[echo] > 0
        finally:
            for app, dataplane in apps:
                app.close()
                dataplane.close()

    run(scenario())


def test_removing_one_node_moves_only_its_flows(topology: Topology) -> None:
    flows = 600

    async def scenario() -> None:
        apps = [director(topology.directors[n], f"{n}0") for n in DIRECTORS]
        try:
            await converge([a for a, _ in apps], state(1, list(NODES)))
            before = topology.udp_flows(42000, flows)
            await converge([a for a, _ in apps], state(2, ["n1", "n2"]))
            after = topology.udp_flows(42000, flows)
        finally:
            for app, dataplane in apps:
                app.close()
                dataplane.close()
        assert "lost" not in before.values()
        assert "lost" not in after.values()
        assert set(before.values()) == set(NODES)
        on_n3 = [p for p, pod in before.items() if pod == "n3"]
        stayed = [p for p, pod in before.items() if pod != "n3"]
        assert all(after[p] in ("n1", "n2") for p in on_n3)
        moved = sum(after[p] != before[p] for p in stayed) / len(stayed)
        # What the tables predict: the share of slots of n1 and n2 that change hands (Maglev moves a
        # little more than the removed node's slots). The flows hash uniformly onto slots.
        old = maglev_table({NODES["n1"]: 1, NODES["n2"]: 1, NODES["n3"]: 1}, DsrSettings("x").table_size)
        new = maglev_table({NODES["n1"]: 1, NODES["n2"]: 1}, DsrSettings("x").table_size)
        kept = [i for i, n in enumerate(old) if n != NODES["n3"]]
        predicted = sum(old[i] != new[i] for i in kept) / len(kept)
        print(f"flows on n3: {len(on_n3)}/{flows} moved; flows on n1/n2 moved: {moved:.3f} "
              f"(the tables predict {predicted:.3f})")
        assert moved <= predicted + 0.06, (moved, predicted)

    run(scenario())


def test_a_restarted_director_adopts_its_table_and_reloads_one_that_was_changed_by_hand(topology: Topology) -> None:
    async def scenario() -> None:
        ns = topology.directors["a"]
        topology.route_via("a")
        app, dataplane = director(ns, "a0")
        await converge([app], state(1, list(NODES)))
        assert dataplane.full_loads == 1  # a first load (in bounded transactions, hooked in last)
        before = topology.udp_flows(43000, 100)
        app.close()
        dataplane.close()
        # A new process finds the table it would write: it keeps it, without a reload.
        app, dataplane = director(ns, "a0")
        try:
            await converge([app], state(1, list(NODES)))
            assert (dataplane.adoptions, dataplane.full_loads) == (1, 0)
            assert topology.udp_flows(43000, 100) == before
            # Resyncs read nothing while nothing was committed (the nf_tables generation stands
            # still), but one in FULL_READ_EVERY reads anyway.
            reads = dataplane.reads
            for _ in range(FULL_READ_EVERY - 1):
                await app.reconcile_once()
            assert dataplane.reads == reads
            await app.reconcile_once()
            assert dataplane.reads == reads + 1
            ns.exec("nft", "delete", "element", "netdev", "kube2ipvs_dsr", "dests4",
                    f"{{ {VIP} . udp . 80 . {NODES['n1']} }}")
            done = await app.reconcile_once()  # a resync reads the kernel back
            assert done
            assert dataplane.full_loads == 1  # not adoptable any more: replaced whole, in one transaction
            assert f"{VIP} . udp . 80 . {NODES['n1']}" in ns.exec("nft", "list", "map", "netdev",
                                                                  "kube2ipvs_dsr", "dests4")
            assert topology.udp_flows(43000, 100) == before  # same tables, same nodes: nothing moved
        finally:
            app.close()
            dataplane.close()

    run(scenario())


def test_flows_keep_their_node_when_the_other_director_was_configured_later(topology: Topology) -> None:
    """Different histories, same tables: A saw n3 join last, B got all three at once."""
    async def scenario() -> None:
        (a, da), (b, db) = (director(topology.directors[n], f"{n}0") for n in DIRECTORS)
        try:
            await converge([a], state(1, ["n1", "n2"]))
            await converge([a], state(2, list(NODES)))
            await converge([b], state(2, list(NODES)))
            assert da.deltas >= 1  # A changed its tables in place
            assert db.full_loads == 1
            topology.route_via("a")
            via_a = topology.udp_flows(44000, 200)
            topology.route_via("b")
            via_b = topology.udp_flows(44000, 200)
            assert via_a == via_b
            assert set(via_a.values()) == set(NODES)
        finally:
            for app, dataplane in ((a, da), (b, db)):
                app.close()
                dataplane.close()

    run(scenario())



def publish_in(ns: Netns, url: str, target: ClusterState) -> None:
    """Publish `target` on the nats-server at `url` inside `ns` (retrying until it answers)."""
    async def publish() -> None:
        settings = NatsSettings(servers=(url,), reconnect_wait=0.1, connect_timeout=1.0, request_timeout=2.0)
        for _ in range(50):
            try:
                async with KVPublisher(settings) as pub:
                    await pub.publish(plan_writes(None, encode_state(target)))
                    return
            except Exception:  # not up yet
                await asyncio.sleep(0.1)
        pytest.fail(f"nats-server in {ns.name} did not answer")

    pyroute2_netns.pushns(ns.name)  # the publisher's sockets live in that namespace
    try:
        asyncio.run(publish())
    finally:
        pyroute2_netns.popns()


def lines_until(proc: subprocess.Popen[str], needle: str, seconds: float = 20) -> list[str]:
    """`proc`'s output lines up to the first with `needle` (or all it printed within `seconds`)."""
    assert proc.stdout is not None
    seen: list[str] = []
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not (seen and needle in seen[-1]):
            if sel.select(1):
                line = proc.stdout.readline()
                if not line:
                    break
                seen.append(line)
    return seen


def answers_within(client: Netns, url: str, count: int, seconds: float) -> list[str]:
    """The first words of `count` successful answers of `url` (fewer if `seconds` pass first)."""
    answers: list[str] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and len(answers) < count:
        done = subprocess.run(["ip", "netns", "exec", client.name, "curl", "-sS", "-m", "2", url],
                              capture_output=True, text=True, check=False)
        if done.returncode == 0:
            answers.append(done.stdout.split()[0])
        else:
            time.sleep(0.1)
    return answers


DIRECTOR_CLI = "import sys; from kube2ipvs_director.main import run; sys.exit(run(sys.argv[1:]))"


def test_the_director_command_picks_its_dataplane_says_so_and_forwards(topology: Topology, lab: Lab,
                                                                       tmp_path: Path) -> None:
    """`kube2ipvs director --dataplane auto` as a process in director A's namespace, following a
    cluster state published on a nats-server there; IPVS where the kernel has it (not here, on
    the host: there it falls back to nftables, with the log line that says so)."""
    ns = topology.directors["a"]
    nats_binary = nats_server_binary()
    if nats_binary is None:
        pytest.skip("nats-server is not installed (apt-get install nats-server)")
    topology.route_via("a")
    nats = lab.spawn_ready(ns, ["sh", "-c", f'echo ready; exec {nats_binary} -js -a 127.0.0.1 -p 14222 '
                                            f'-sd {tmp_path / "store"}'])
    assert nats.poll() is None
    url = "nats://127.0.0.1:14222"
    publish_in(ns, url, state(1, list(NODES)))
    proc = subprocess.Popen(["ip", "netns", "exec", ns.name, sys.executable, "-c", DIRECTOR_CLI,
                             "--dataplane", "auto", "--interface", "a0", "--device", "lo", "--nats", url,
                             "--listen", "127.0.0.1:19190", "--state-file", str(tmp_path / "director.json")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lab.processes.append(proc)
    seen = lines_until(proc, "event=dataplane")
    chosen = seen[-1] if seen else ""
    assert "dataplane=nftables" in chosen, "".join(seen)
    assert "this kernel has no usable IPVS" in chosen
    answers = answers_within(topology.client, f"http://{VIP}:80/", 10, seconds=20)
    assert len(answers) == 10, seen
    assert set(answers) <= set(NODES)
    health = ns.exec("curl", "-sS", "http://127.0.0.1:19190/config")
    assert '"dataplane": "nftables"' in health
    proc.terminate()
    assert proc.wait(timeout=15) == 0
    cleanup = subprocess.run(["ip", "netns", "exec", ns.name, sys.executable, "-c", DIRECTOR_CLI, "--cleanup",
                              "--dataplane", "nftables", "--interface", "a0", "--device", "lo",
                              "--state-file", str(tmp_path / "director.json")],
                             capture_output=True, text=True, timeout=60, check=False)
    assert cleanup.returncode == 0, cleanup.stdout + cleanup.stderr
    assert ns.exit_code("nft", "list", "table", "netdev", "kube2ipvs_dsr") != 0  # the table is gone


def test_the_director_command_refuses_an_nftables_dataplane_without_an_interface(topology: Topology) -> None:
    done = subprocess.run(["ip", "netns", "exec", topology.directors["b"].name, sys.executable, "-c", DIRECTOR_CLI,
                           "--dataplane", "nftables", "--device", "lo"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2, done.stderr
    assert "--dataplane nftables needs --interface" in done.stderr
    assert "Traceback" not in done.stderr
    done = subprocess.run(["ip", "netns", "exec", topology.directors["b"].name, sys.executable, "-c", DIRECTOR_CLI,
                           "--maglev-size", "250", "--interface", "b0"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    assert "--maglev-size: 250 is not a prime" in done.stderr


def test_a_director_forwards_only_frames_addressed_to_it(topology: Topology) -> None:
    """With the bridge flooding every frame (a hub, or a switch whose entry aged out), the
    director the router did not choose sees the frames too, and must not forward them again."""
    topology.router.ip("link", "set", "br0", "type", "bridge", "ageing_time", "0")
    topology.route_via("a")

    async def scenario() -> None:
        apps = [director(topology.directors[n], f"{n}0") for n in DIRECTORS]
        try:
            await converge([a for a, _ in apps], state(1, list(NODES)))
            flows = topology.udp_flows(45000, 50)
            assert "lost" not in flows.values()
            (_, da), (_, db) = apps
            assert {s.id: s.counters.packets_in for s in da.stats()}[UDP_SID] >= 50
            assert {s.id: s.counters.packets_in for s in db.stats()}[UDP_SID] == 0
        finally:
            for app, dataplane in apps:
                app.close()
                dataplane.close()

    run(scenario())


def test_ipv6_vips_are_forwarded_by_direct_routing_too(lab: Lab) -> None:
    """client 2001:db8:c::2 -> router -> director (fwd ip6) -> node n1 or n2, which hold the VIP
    on lo and serve it themselves, and answer the client directly."""
    vip6 = "2001:db8:80::1"
    router, client, d = lab.netns("v6-r"), lab.netns("v6-c"), lab.netns("v6-d")
    router.exec("sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
    router.ip("link", "add", "br0", "type", "bridge")
    router.ip("link", "set", "br0", "up")
    router.ip("addr", "add", "fd00:99::1/64", "dev", "br0")
    lab.link(router, "rc", client, "eth0")
    router.ip("addr", "add", "2001:db8:c::1/64", "dev", "rc")
    client.ip("addr", "add", "2001:db8:c::2/64", "dev", "eth0")
    client.ip("-6", "route", "add", "default", "via", "2001:db8:c::1")
    members = {"d": (d, "fd00:99::11")}
    for name in ("n1", "n2"):
        members[name] = (lab.netns(f"v6-{name}"), f"fd00:99::{20 + int(name[1])}")
    for name, (ns, address) in members.items():
        lab.link(ns, f"{name}0", router, f"r-{name}")
        router.ip("link", "set", f"r-{name}", "master", "br0")
        ns.ip("addr", "add", f"{address}/64", "dev", f"{name}0")
        if name != "d":
            ns.ip("-6", "route", "add", "default", "via", "fd00:99::1")
            ns.ip("addr", "add", f"{vip6}/128", "dev", "lo")
            lab.spawn_ready(ns, [sys.executable, "-c", SERVER, name, "8080"])
    router.ip("-6", "route", "add", f"{vip6}/128", "via", "fd00:99::11")
    dataplane = NftDsr(DsrSettings("d0"), netns=d.name)
    sid = ServiceId(vip6, 6, 8080, "tcp")
    try:
        dataplane.observe()
        dataplane.apply([AddService(sid, "mh", ()), AddDest(sid, "fd00:99::21", 8080, "g", 1, 0, 0),
                         AddDest(sid, "fd00:99::22", 8080, "g", 1, 0, 0)])
        answers = client.exec("curl", "-sS", "-m", "5", "-H", "Connection: close",
                              *[f"http://[{vip6}]:8080/"] * 30).splitlines()
        assert {line.split()[0] for line in answers} == {"n1", "n2"}, answers
        assert {line.split()[1] for line in answers} == {"2001:db8:c::2"}
        assert {s.id: s.counters.packets_in for s in dataplane.stats()}[sid] > 0
    finally:
        dataplane.close()
