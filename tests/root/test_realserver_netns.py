"""The realserver's apply path against the real kernel, in throw-away network namespaces.

    client 203.0.113.2 ──veth── node (realserver: VIPs on lo, our nft table) ──veth── pod1 10.0.1.2
                                                                              ──veth── pod2 10.0.2.2

Unlike conftest's `dataplane`, the node starts without VIPs: the realserver under test adds them.
The node's lo also holds a foreign address, 192.0.2.99, that must survive everything. The
realserver runs in this process with `LinuxKernel(netns=node)`; `--cleanup` runs as the CLI would,
in a subprocess inside the node namespace.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest

from kube2ipvs.model import ClusterState, VirtualService
from kube2ipvs.natskv import KVPublisher, NatsSettings, NodeSliceSubscriber
from kube2ipvs.protocol import NodeSlice, encode_state, plan_writes
from kube2ipvs.render.nft import render_nft
from kube2ipvs_realserver.app import AppSettings, RealserverApp
from kube2ipvs_realserver.kernel import Counters, LinuxKernel
from kube2ipvs_realserver.plan import AddAddress, Observed, Op, ReplaceTable, Settings, SysctlKey
from tests.natsfixture import running_nats_server
from tests.root.conftest import PODS, PORT, Lab, Netns, build_dataplane, skip_reason, wait_for
from tests.root.test_nft_netns import set_counters
from tests.test_render_nft import virtual_service

pytestmark = pytest.mark.root

VIP, VIP6, FOREIGN = "192.0.2.10", "2001:db8::10", "192.0.2.99"


@dataclass
class Topology:
    node: Netns
    client: Netns

    def curl(self, url: str, times: int) -> list[str]:
        out = self.client.exec("curl", "-sS", "-m", "5", "-H", "Connection: close", *[url] * times)
        return [line.split()[0] for line in out.splitlines()]

    def lo_addresses(self) -> set[str]:
        doc = json.loads(self.node.ip("-j", "addr", "show", "dev", "lo"))
        return {a["local"] for link in doc for a in link["addr_info"]}

    def our_tables(self) -> set[str]:
        doc = json.loads(self.node.exec("nft", "-j", "list", "tables"))
        return {t["table"]["family"] for t in doc["nftables"] if "table" in t and t["table"]["name"] == "kube2ipvs"}

    def sysctl(self, key: str) -> int:
        return int(self.node.exec("sysctl", "-n", key))


@pytest.fixture(scope="module")
def topology() -> Iterator[Topology]:
    if (reason := skip_reason()) is not None:
        pytest.skip(reason)
    lab = Lab()
    try:
        node, client = build_dataplane(lab, prefix="rs-")
        node.ip("addr", "add", f"{FOREIGN}/32", "dev", "lo")  # someone else's: never to be touched
        yield Topology(node, client)
    finally:
        lab.close()


@pytest.fixture
def kernel(topology: Topology, tmp_path: Path) -> Iterator[LinuxKernel]:
    k = LinuxKernel(netns=topology.node.name, state_file=tmp_path / "state.json")
    try:
        yield k
    finally:
        # Leave the node as the next test expects it: none of our tables or addresses.
        k.close()
        topology.node.exec("nft", "-f", "-", stdin="table ip kube2ipvs\ndelete table ip kube2ipvs\n"
                                                    "table ip6 kube2ipvs\ndelete table ip6 kube2ipvs\n")
        for address in ({VIP, VIP6} & topology.lo_addresses()):
            topology.node.ip("addr", "del", f"{address}/{128 if ':' in address else 32}", "dev", "lo")


def web(vip: str, pods: tuple[str, ...] = ("pod1", "pod2")) -> VirtualService:
    return virtual_service(vip, PORT, endpoints=[(PODS[p][":" in vip], PORT) for p in pods])


def slice_of(*services: VirtualService) -> NodeSlice:
    return NodeSlice("node-a", tuple(dict.fromkeys(vs.vip for vs in services)), services)


def realserver(kernel: LinuxKernel) -> RealserverApp:
    return RealserverApp(kernel, source=None, settings=Settings(interface="vc"),
                         app_settings=AppSettings(resync_interval=0.1, counters_interval=0))


def reconcile(app: RealserverApp, node_slice: NodeSlice | None = None) -> list[type]:
    if node_slice is not None:
        app.offer(node_slice)
    return [type(op) for op in asyncio.run(app.reconcile_once())]


def test_the_vip_reaches_both_pods_over_ipv4_and_ipv6_and_the_arp_sysctls_are_set_and_reported(
    topology: Topology, kernel: LinuxKernel
) -> None:
    app = realserver(kernel)
    reconcile(app, slice_of(web(VIP), web(VIP6)))
    # Each new connection picks a pod at random: 20 reach both but with a chance of 2e-6.
    assert set(topology.curl(f"http://{VIP}:{PORT}/", 20)) == {"pod1", "pod2"}
    assert set(topology.curl(f"http://[{VIP6}]:{PORT}/", 20)) == {"pod1", "pod2"}
    for dev in ("lo", "vc"):
        assert topology.sysctl(f"net.ipv4.conf.{dev}.arp_ignore") == 1
        assert topology.sysctl(f"net.ipv4.conf.{dev}.arp_announce") == 2
    health = app.health()
    assert health.ok, health.reason
    assert health.detail["sysctls"] == {"lo/arp_announce": 2, "lo/arp_ignore": 1,
                                        "vc/arp_announce": 2, "vc/arp_ignore": 1}


def test_a_sysctl_reset_by_hand_fails_health_until_the_next_apply_sets_it_back(
    topology: Topology, kernel: LinuxKernel
) -> None:
    app = realserver(kernel)
    reconcile(app, slice_of(web(VIP)))
    topology.node.exec("sysctl", "-qw", "net.ipv4.conf.vc.arp_ignore=0")
    app.observed = kernel.observe(app.desired.sysctls if app.desired else ())
    assert app.health().reason == "sysctls wrong: vc/arp_ignore want 1, have 0"
    assert reconcile(app) != []
    assert topology.sysctl("net.ipv4.conf.vc.arp_ignore") == 1
    assert app.health().ok


def test_a_second_apply_and_a_restart_with_the_same_slice_make_no_kernel_change(
    topology: Topology, kernel: LinuxKernel, tmp_path: Path
) -> None:
    reconcile(realserver(kernel), slice_of(web(VIP), web(VIP6)))
    table_before = topology.node.exec("nft", "-a", "list", "table", "ip", "kube2ipvs")
    assert reconcile(realserver(kernel), slice_of(web(VIP), web(VIP6))) == []
    restarted = LinuxKernel(netns=topology.node.name, state_file=tmp_path / "state.json")
    try:
        assert reconcile(realserver(restarted), slice_of(web(VIP), web(VIP6))) == []
    finally:
        restarted.close()
    # Same handles: the table was not even replaced with an identical one.
    assert topology.node.exec("nft", "-a", "list", "table", "ip", "kube2ipvs") == table_before


def test_an_endpoint_change_is_an_element_change_only_and_the_counters_read_by_netlink_are_nfts(
    topology: Topology, kernel: LinuxKernel
) -> None:
    app = realserver(kernel)
    reconcile(app, slice_of(web(VIP), web(VIP6)))
    topology.curl(f"http://{VIP}:{PORT}/", 5)
    topology.curl(f"http://[{VIP6}]:{PORT}/", 3)
    chains_before = topology.node.exec("nft", "-a", "list", "chains")
    assert reconcile(app) == []  # nothing changed: nothing to do
    app.offer(slice_of(web(VIP, ("pod2",)), web(VIP6)))
    [op] = asyncio.run(app.reconcile_once())
    assert isinstance(op, ReplaceTable)
    assert op.delta is not None
    assert all(" element " in line for line in op.delta.splitlines())
    assert topology.node.exec("nft", "-a", "list", "chains") == chains_before  # same chains, same handles
    assert set(topology.curl(f"http://{VIP}:{PORT}/", 4)) == {"pod2"}

    ours = wait_for(kernel.counters, lambda c: c[(VIP, PORT, "tcp")]["fin_out"][0] >= 9)
    for family, vip in (("ip", VIP), ("ip6", VIP6)):
        for kind in ("pkts_in", "pkts_out", "syn_in", "synack_out", "fin_in", "fin_out", "rst_in", "rst_out"):
            listed = set_counters(topology.node, family, kind)[(vip, "tcp", PORT)]
            assert ours[(vip, PORT, "tcp")][kind] == listed, (vip, kind)
    assert ours[(VIP, PORT, "tcp")]["syn_in"][0] == 9
    assert ours[(VIP6, PORT, "tcp")]["syn_in"][0] == 3


def test_a_service_deleted_by_hand_from_the_class_map_is_repaired_by_the_next_resync(
    topology: Topology, kernel: LinuxKernel
) -> None:
    app = realserver(kernel)
    other = virtual_service(VIP, PORT + 1, endpoints=[(PODS["pod1"][0], PORT)])
    reconcile(app, slice_of(web(VIP), other))
    topology.node.exec("nft", "delete", "element", "ip", "kube2ipvs", "class", f"{{ {VIP} . tcp . {PORT + 1} }}")
    assert topology.client.exit_code("curl", "-sS", "-m", "2", f"http://{VIP}:{PORT + 1}/") != 0
    assert reconcile(app) == [ReplaceTable]
    assert set(topology.curl(f"http://{VIP}:{PORT + 1}/", 2)) == {"pod1"}


def test_without_libnftables_the_same_changes_go_through_the_nft_command(
    topology: Topology, tmp_path: Path
) -> None:
    kernel = LinuxKernel(netns=topology.node.name, state_file=tmp_path / "cli.json", use_libnftables=False)
    try:
        app = realserver(kernel)
        reconcile(app, slice_of(web(VIP)))
        app.offer(slice_of(web(VIP, ("pod1",))))
        [op] = asyncio.run(app.reconcile_once())
        assert isinstance(op, ReplaceTable)
        assert op.delta
        assert app.apply_error is None
        assert set(topology.curl(f"http://{VIP}:{PORT}/", 4)) == {"pod1"}
        assert kernel.counters()[(VIP, PORT, "tcp")]["syn_in"][0] == 4
        assert reconcile(app) == []
    finally:
        kernel.close()
        topology.node.exec("nft", "-f", "-", stdin="table ip kube2ipvs\ndelete table ip kube2ipvs\n")
        topology.node.ip("addr", "del", f"{VIP}/32", "dev", "lo")


def test_a_pod_removed_from_the_slice_gets_no_new_connections(topology: Topology, kernel: LinuxKernel) -> None:
    app = realserver(kernel)
    reconcile(app, slice_of(web(VIP)))
    assert reconcile(app, slice_of(web(VIP, ("pod1",)))) == [ReplaceTable]
    assert set(topology.curl(f"http://{VIP}:{PORT}/", 6)) == {"pod1"}


def test_a_change_goes_as_a_delta_that_keeps_the_other_services_counters(
    topology: Topology, kernel: LinuxKernel
) -> None:
    app = realserver(kernel)
    other = virtual_service(VIP, PORT + 1, endpoints=[(PODS["pod1"][0], PORT)])
    reconcile(app, slice_of(web(VIP), other))
    topology.curl(f"http://{VIP}:{PORT}/", 3)
    key = (VIP, PORT, "tcp")
    assert wait_for(lambda: kernel.counters()[key]["syn_in"][0], lambda n: n == 3) == 3
    changed = virtual_service(VIP, PORT + 1, endpoints=[(PODS["pod2"][0], PORT)])
    app.offer(slice_of(web(VIP), changed))
    [op] = asyncio.run(app.reconcile_once())
    assert isinstance(op, ReplaceTable)
    assert op.delta is not None
    assert kernel.counters()[key]["syn_in"][0] == 3  # a whole replace would have reset it
    assert set(topology.curl(f"http://{VIP}:{PORT + 1}/", 3)) == {"pod2"}
    assert reconcile(app) == []  # the kernel now counts as holding the full text


def test_a_delta_the_kernel_refuses_falls_back_to_the_whole_table(topology: Topology, kernel: LinuxKernel) -> None:
    first, second = render_nft([web(VIP)]), render_nft([web(VIP, ("pod2",))])
    kernel.replace_table(ReplaceTable("first", None, lambda: first))
    kernel.replace_table(ReplaceTable("second", "delete element ip kube2ipvs class { 192.0.2.99 . tcp . 1 }\n",
                                      lambda: second))
    assert set(topology.curl(f"http://{VIP}:{PORT}/", 3)) == {"pod2"}


def test_a_table_or_vip_deleted_by_hand_is_repaired_by_the_next_resync(
    topology: Topology, kernel: LinuxKernel
) -> None:
    app = realserver(kernel)
    reconcile(app, slice_of(web(VIP)))
    topology.node.exec("nft", "delete", "table", "ip", "kube2ipvs")
    topology.node.ip("addr", "del", f"{VIP}/32", "dev", "lo")
    assert reconcile(app) == [ReplaceTable, AddAddress]
    assert set(topology.curl(f"http://{VIP}:{PORT}/", 20)) == {"pod1", "pod2"}


def test_a_foreign_address_on_lo_is_never_touched_not_even_by_cleanup(
    topology: Topology, kernel: LinuxKernel, tmp_path: Path
) -> None:
    app = realserver(kernel)
    reconcile(app, slice_of(web(VIP), web(VIP6)))
    reconcile(app, slice_of())
    assert FOREIGN in topology.lo_addresses()
    reconcile(app, slice_of(web(VIP)))
    cleanup_cli(topology, tmp_path / "state.json")
    assert FOREIGN in topology.lo_addresses()


def test_cleanup_leaves_no_table_and_no_vip_even_after_a_restart_forgot_which_were_ours(
    topology: Topology, kernel: LinuxKernel, tmp_path: Path
) -> None:
    reconcile(realserver(kernel), slice_of(web(VIP), web(VIP6)))
    assert {VIP, VIP6} <= topology.lo_addresses()
    (tmp_path / "state.json").unlink()  # ours are known by their address protocol, not a file
    cleanup_cli(topology, tmp_path / "state.json")
    assert topology.our_tables() == set()
    assert topology.lo_addresses() & {VIP, VIP6} == set()
    assert topology.client.exit_code("curl", "-sS", "-m", "1", f"http://{VIP}:{PORT}/") != 0


def test_n_connections_show_as_n_syns_in_the_metrics(topology: Topology, kernel: LinuxKernel) -> None:
    app = realserver(kernel)
    reconcile(app, slice_of(web(VIP)))
    topology.curl(f"http://{VIP}:{PORT}/", 5)
    syn = f'kube2ipvs_realserver_tcp_flags_total{{direction="in",flag="syn",namespace="shop",port="{PORT}",'

    def scraped() -> str:
        asyncio.run(app.read_counters())
        return generate_latest(app.registry).decode()

    text = wait_for(scraped, lambda t: f'{syn}port_name="http",protocol="tcp",service="web",vip="{VIP}"}} 5.0' in t)
    assert f'{syn}port_name="http",protocol="tcp",service="web",vip="{VIP}"}} 5.0' in text
    assert 'kube2ipvs_realserver_tcp_flags_total{direction="in",flag="fin"' in text


def cleanup_cli(topology: Topology, state_file: Path) -> None:
    """`kube2ipvs realserver --cleanup`, run inside the node namespace as the DaemonSet would."""
    code = "import sys; from kube2ipvs_realserver.main import run; sys.exit(run(sys.argv[1:]))"
    done = subprocess.run(["ip", "netns", "exec", topology.node.name, sys.executable, "-c", code, "--cleanup",
                           "--state-file", str(state_file)], capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr


def test_the_whole_loop_follows_slices_published_on_nats_and_keeps_the_kernel_while_nats_is_away(
    topology: Topology, kernel: LinuxKernel, tmp_path: Path
) -> None:
    with running_nats_server(tmp_path / "nats") as server:
        nats = NatsSettings(servers=(server.url,), reconnect_wait=0.1, connect_timeout=1.0, request_timeout=2.0)

        def state(generation: int, *services: VirtualService) -> ClusterState:
            return ClusterState(generation=generation, vips=(VIP,), services=services, nodes=())

        async def reconciled_with(app: RealserverApp, ops: Callable[[list[Any]], bool]) -> None:
            async with asyncio.timeout(15):
                while True:
                    app.reconciled.clear()
                    await app.reconciled.wait()
                    if ops(app.last_ops):
                        return

        async def scenario() -> None:
            async with KVPublisher(nats) as pub, NodeSliceSubscriber(nats, "node-a") as subscriber:
                first = encode_state(state(1, web(VIP)))
                await pub.publish(plan_writes(None, first))
                app = RealserverApp(kernel, source=subscriber, settings=Settings(interface="vc"),
                                    app_settings=AppSettings(resync_interval=0.1, counters_interval=0))
                task = asyncio.create_task(app.run())
                try:
                    await reconciled_with(app, lambda ops: AddAddress(VIP, 32) in ops)
                    served = await asyncio.to_thread(topology.curl, f"http://{VIP}:{PORT}/", 20)
                    assert set(served) == {"pod1", "pod2"}

                    await pub.publish(plan_writes(first, encode_state(state(2, web(VIP, ("pod2",))))))
                    await reconciled_with(app, bool)
                    assert set(await asyncio.to_thread(topology.curl, f"http://{VIP}:{PORT}/", 4)) == {"pod2"}

                    server.stop()
                    for _ in range(3):  # resyncs while NATS is away change nothing
                        await reconciled_with(app, lambda ops: True)
                        assert app.last_ops == []
                    assert app.health().detail["nats_connected"] is False
                    assert set(await asyncio.to_thread(topology.curl, f"http://{VIP}:{PORT}/", 2)) == {"pod2"}
                finally:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task

        asyncio.run(scenario())


UDP_CLIENT = r"""
import socket, sys
for _ in range(int(sys.argv[3])):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # a new socket: a new flow each time
        s.settimeout(5)
        s.sendto(b"ping", (sys.argv[1], int(sys.argv[2])))
        print(s.recvfrom(2048)[0].decode())
"""


def test_udp_on_the_same_vip_and_port_reaches_both_pods_and_is_counted(
    topology: Topology, kernel: LinuxKernel
) -> None:
    app = realserver(kernel)
    udp = virtual_service(VIP, PORT, "udp", endpoints=[(PODS[p][0], PORT) for p in ("pod1", "pod2")])
    reconcile(app, slice_of(web(VIP), udp))
    answers = topology.client.exec(sys.executable, "-c", UDP_CLIENT, VIP, str(PORT), "20").split()
    assert set(answers[::2]) == {"pod1", "pod2"}
    assert set(answers[1::2]) == {"203.0.113.2"}  # the client's own address: no masquerade
    asyncio.run(app.read_counters())
    text = generate_latest(app.registry).decode()
    assert ('kube2ipvs_realserver_packets_total{direction="in",namespace="shop",port="8080",port_name="http",'
            f'protocol="udp",service="web",vip="{VIP}"}} 20.0') in text


def test_ten_thousand_services_load_in_one_transaction_and_a_rejected_table_leaves_the_old_one(
    topology: Topology, kernel: LinuxKernel
) -> None:
    # 250 VIPs (VIP among them) with 40 ports each, as a node of a big cluster would see them.
    many = [virtual_service(f"192.0.2.{i % 250 + 1}", 1000 + i // 250, endpoints=[(PODS["pod1"][0], PORT)])
            for i in range(10_000)]
    app = realserver(kernel)
    reconcile(app, slice_of(*many))
    assert app.health().ok, app.health().reason
    assert len(topology.lo_addresses() & {vs.vip for vs in many}) == len({vs.vip for vs in many})
    def dnated() -> int:
        return topology.node.exec("nft", "list", "map", "ip", "kube2ipvs", "class").count(": goto dnat_")

    assert dnated() == 10_000
    assert set(topology.curl(f"http://{VIP}:{1000 + 39}/", 1)) == {"pod1"}
    # nft rejects the whole text (an endpoint address nft cannot parse slipped past the model):
    # the transaction fails as a whole, the 10,000 services stay, and health says why.
    broken = RealserverApp(_Rejecting(kernel), source=None, settings=Settings(interface="vc"))
    reconcile(broken, slice_of(*many[:10]))
    assert broken.health().reason.startswith("last apply failed: KernelError: nft:")
    assert dnated() == 10_000


class _Rejecting:
    """The real kernel, but every table text gets a rule nft rejects appended (at its very end)."""

    def __init__(self, kernel: LinuxKernel) -> None:
        self._kernel = kernel

    def observe(self, sysctls: Iterable[SysctlKey]) -> Observed:
        return self._kernel.observe(sysctls)

    def counters(self) -> Counters:
        return self._kernel.counters()

    def apply(self, op: Op) -> None:
        if isinstance(op, ReplaceTable):
            broken = "table ip kube2ipvs {\n\tchain broken {\n\t\tip daddr 1.2.3.999 accept\n\t}\n}\n"
            text = op.text + broken
            op = ReplaceTable(op.digest, None, lambda: text)
        self._kernel.apply(op)
