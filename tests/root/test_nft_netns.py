"""render_nft against the real kernel, in throw-away network namespaces (see conftest's
`dataplane`: a client, a node playing the realserver, and two pods behind it)."""

from __future__ import annotations

import json
import sys
from collections import Counter

import pytest

from kube2ipvs.model import ClusterState, VirtualService
from kube2ipvs.render.nft import counter_names, render_nft
from tests.root.conftest import CLIENT, CLIENT6, PORT, VIP, VIP6, Dataplane, Lab, Netns, wait_for, web

pytestmark = pytest.mark.root

UDP_CLIENT = r"""
import socket, sys
vip, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
family = socket.AF_INET6 if ":" in vip else socket.AF_INET
for _ in range(count):
    with socket.socket(family, socket.SOCK_DGRAM) as s:  # a new socket, so a new flow each time
        s.settimeout(5)
        s.sendto(b"ping", (vip, port))
        print(s.recvfrom(2048)[0].decode())
"""

RESET_CLIENT = r"""
import socket, struct, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close() sends RST
s.close()
"""

def apply(dataplane: Dataplane, services: list[VirtualService], masquerade_exempt: list[str] | None = None) -> None:
    dataplane.node.nft(render_nft(services, masquerade_exempt=masquerade_exempt))


def set_counters(ns: Netns, family: str, kind: str) -> dict[tuple[str, str, int], tuple[int, int]]:
    """(VIP, protocol, port) -> (packets, bytes) of each element of counter set `kind`, as nft
    lists it (independent of the realserver's own netlink reader)."""
    out = json.loads(ns.exec("nft", "-j", "list", "set", family, "kube2ipvs", kind))
    found = {}
    for item in out["nftables"]:
        for element in item.get("set", {}).get("elem", []):
            vip, protocol, port = element["elem"]["val"]["concat"]
            counter = element["elem"]["counter"]
            found[(vip, protocol, int(port))] = (counter["packets"], counter["bytes"])
    return found


def nft_counts(dataplane: Dataplane, vs: VirtualService) -> dict[str, int]:
    """Counter kind -> packets, for `vs`."""
    family = "ip6" if vs.family == 6 else "ip"
    return {kind: set_counters(dataplane.node, family, kind)[(vs.vip, vs.protocol, vs.port)][0]
            for kind in counter_names(vs)}


def assert_both_pods_share(answers: list[str]) -> None:
    """Each new connection goes to a pod drawn at random (numgen random): over 40 connections
    each of two pods gets at least 8 unless something is wrong (chance of a false alarm about
    4e-5); over 20, both are reached (2e-6)."""
    hits = Counter(a.split()[0] for a in answers)
    assert set(hits) == {"pod1", "pod2"}, hits
    if len(answers) >= 40:
        assert min(hits.values()) >= len(answers) // 5, hits


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("node", "exempt"), [("node-a", None), ("node-b", None), ("node-a", ["10.1.0.0/16"])])
def test_the_realistic_rendering_is_accepted_by_nft(
    lab: Lab, state: ClusterState, node: str, exempt: list[str] | None
) -> None:
    ns = lab.netns("check")
    ns.exec("nft", "-c", "-f", "-", stdin=render_nft(state.for_node(node), masquerade_exempt=exempt))


def test_applying_twice_gives_the_same_ruleset_and_leaves_other_tables_alone(lab: Lab, state: ClusterState) -> None:
    ns = lab.netns("idem")
    ns.nft("table ip bystander { chain c { type filter hook input priority 0; policy accept; }; }")
    text = render_nft(state.for_node("node-a"), masquerade_exempt=["10.1.0.0/16"])
    ns.nft(text)
    first = ns.exec("nft", "list", "ruleset")
    ns.nft(text)
    assert ns.exec("nft", "list", "ruleset") == first
    assert "table ip kube2ipvs" in first
    assert "table ip6 kube2ipvs" in first
    assert "table ip bystander" in first

    ns.nft(render_nft([]))
    emptied = ns.exec("nft", "list", "ruleset")
    assert "dnat_" not in emptied
    assert "table ip bystander" in emptied


def test_connections_to_the_vip_are_shared_evenly_by_both_pods_and_counted(dataplane: Dataplane) -> None:
    vs = web()
    apply(dataplane, [vs])
    answers = dataplane.curl(f"http://{VIP}:{PORT}/", 40)
    assert_both_pods_share(answers)

    counts = wait_for(lambda: nft_counts(dataplane, vs), lambda c: c["fin_in"] >= 40 and c["fin_out"] >= 40)
    assert counts["syn_in"] == 40
    assert counts["synack_out"] == 40
    assert counts["fin_in"] == 40
    assert counts["fin_out"] == 40
    assert counts["rst_in"] == counts["rst_out"] == 0
    assert counts["pkts_in"] >= 40 * 4  # SYN, ACK, request, FIN at least
    assert counts["pkts_out"] >= 40 * 3  # SYN-ACK, response, FIN at least


def test_pods_see_the_client_address_unless_masquerading_is_asked_for(dataplane: Dataplane) -> None:
    url = f"http://{VIP}:{PORT}/"
    apply(dataplane, [web()])
    assert {a.split()[1] for a in dataplane.curl(url, 4)} == {CLIENT}

    apply(dataplane, [web()], masquerade_exempt=["203.0.113.0/24"])
    assert {a.split()[1] for a in dataplane.curl(url, 4)} == {CLIENT}

    apply(dataplane, [web()], masquerade_exempt=["10.0.0.0/8"])
    assert {a.split()[1] for a in dataplane.curl(url, 20)} == {"10.0.1.1", "10.0.2.1"}  # the node's side of each veth


def test_a_client_on_the_node_itself_reaches_the_pods_and_is_counted(dataplane: Dataplane) -> None:
    vs = web()
    apply(dataplane, [vs])
    answers = dataplane.curl(f"http://{VIP}:{PORT}/", 20, ns=dataplane.node)
    assert_both_pods_share(answers)
    counts = wait_for(lambda: nft_counts(dataplane, vs), lambda c: c["fin_out"] >= 20)
    assert (counts["syn_in"], counts["synack_out"], counts["fin_out"]) == (20, 20, 20)


def test_resets_are_counted_both_ways(dataplane: Dataplane) -> None:
    refused = web(port=81, target=9)  # nothing listens on 9: the pod answers the SYN with a RST
    aborted = web(port=82, target=PORT)
    apply(dataplane, [refused, aborted])
    assert dataplane.client.exit_code("curl", "-s", "-m", "5", f"http://{VIP}:81/") == 7  # connection refused
    dataplane.client.exec(sys.executable, "-c", RESET_CLIENT, VIP, "82")

    counts = wait_for(lambda: nft_counts(dataplane, refused), lambda c: c["rst_out"] >= 1)
    assert {k: v for k, v in counts.items() if not k.startswith("pkts")} == {
        "syn_in": 1, "synack_out": 0, "fin_in": 0, "fin_out": 0, "rst_in": 0, "rst_out": 1}
    counts = wait_for(lambda: nft_counts(dataplane, aborted), lambda c: c["rst_in"] >= 1)
    assert {k: v for k, v in counts.items() if not k.startswith("pkts")} == {
        "syn_in": 1, "synack_out": 1, "fin_in": 0, "fin_out": 0, "rst_in": 1, "rst_out": 0}


def test_udp_datagrams_reach_both_pods_and_count_packets(dataplane: Dataplane) -> None:
    vs = web("udp")
    apply(dataplane, [vs])
    answers = dataplane.client.exec(sys.executable, "-c", UDP_CLIENT, VIP, str(PORT), "20").splitlines()
    assert_both_pods_share(answers)
    counts = wait_for(lambda: nft_counts(dataplane, vs), lambda c: c["pkts_out"] >= 20)
    assert counts == {"pkts_in": 20, "pkts_out": 20}


def test_an_ipv6_vip_reaches_both_pods_and_is_counted(dataplane: Dataplane) -> None:
    vs = web(vip=VIP6)
    apply(dataplane, [vs])
    answers = dataplane.curl(f"http://[{VIP6}]:{PORT}/", 20)
    assert_both_pods_share(answers)
    assert {a.split()[1] for a in answers} == {CLIENT6}
    counts = wait_for(lambda: nft_counts(dataplane, vs), lambda c: c["fin_out"] >= 20)
    assert (counts["syn_in"], counts["synack_out"], counts["fin_out"]) == (20, 20, 20)


MSS_CLIENT = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
print(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG))  # the MSS the pod's SYN-ACK allowed
s.close()
"""



def test_a_vip_mtu_clamps_the_mss_both_ways_and_a_vip_without_keeps_the_links(dataplane: Dataplane) -> None:
    from dataclasses import replace

    clamped = replace(web(), mtu=1280)  # the MTU is the VIP's: every port of it is clamped
    plain = web(vip=VIP6)
    apply(dataplane, [clamped, replace(web(port=81), mtu=1280), plain])
    # The client's view: the SYN-ACK from the VIP offered at most 1280 - 40 (TCP_MAXSEG is that
    # less the 12 bytes of timestamps).
    for port in (PORT, 81):
        assert int(dataplane.client.exec(sys.executable, "-c", MSS_CLIENT, VIP, str(port)).strip()) <= 1240
    assert int(dataplane.client.exec(sys.executable, "-c", MSS_CLIENT, VIP6, str(PORT)).strip()) > 1240  # MTU 1500
    answers = dataplane.curl(f"http://{VIP}:{PORT}/", 4)  # and connections still complete
    assert all(a.split()[0] in ("pod1", "pod2") for a in answers)
