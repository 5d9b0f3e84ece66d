"""Every rendering of the realistic fixture against its golden file.

The fixture has several VIPs, TCP and UDP on one port, a node not Ready, a node missing the
required label, a cordoned node, a headless service, a portName mismatch, unready endpoints, an
IPv6 VIP in config6 and the default ("unicorns") service.
"""

from __future__ import annotations

import pytest

from kube2ipvs.model import ClusterState
from kube2ipvs.render.arp import render_arp
from kube2ipvs.render.bgp import render_bgp
from kube2ipvs.render.ipvsadm import render_ipvsadm
from kube2ipvs.render.json import render_json
from tests.conftest import Golden


def test_ipvsadm_rendering_in_arp_mode_matches_golden(state: ClusterState, golden: Golden) -> None:
    golden.check("realistic.ipvsadm", render_ipvsadm(state, mode="arp"))


def test_ipvsadm_rendering_in_bgp_mode_matches_golden(state: ClusterState, golden: Golden) -> None:
    golden.check("realistic-bgp.ipvsadm", render_ipvsadm(state, mode="bgp"))


@pytest.mark.parametrize("node", ["node-a", "node-b"])
def test_nft_rendering_of_each_realserver_matches_golden(state: ClusterState, golden: Golden, node: str) -> None:
    from kube2ipvs.render.nft import render_nft

    golden.check(f"realistic-{node}.nft", render_nft(state.for_node(node)))


def test_nft_rendering_with_masquerade_matches_golden(state: ClusterState, golden: Golden) -> None:
    from kube2ipvs.render.nft import render_nft

    golden.check("realistic-node-a-masquerade.nft",
                 render_nft(state.for_node("node-a"), masquerade_exempt=["10.1.0.0/16"]))


@pytest.mark.parametrize("node", ["node-a", "node-b"])
def test_iptables_rendering_of_each_realserver_matches_golden(
    state: ClusterState, golden: Golden, node: str
) -> None:
    from kube2ipvs.render.iptables import render_iptables

    golden.check(f"realistic-{node}.iptables", render_iptables(state.for_node(node)))


def test_bgp_rendering_matches_golden(state: ClusterState, golden: Golden) -> None:
    golden.check("realistic.bgp", render_bgp(
        state, nexthop="198.51.100.2", nexthop6="2001:db8:100::2", communities=("64512:100",)))


def test_json_rendering_matches_golden(state: ClusterState, golden: Golden) -> None:
    golden.check("realistic.json", render_json(state))


def test_json_rendering_of_one_node_matches_golden(state: ClusterState, golden: Golden) -> None:
    golden.check("realistic-node-b.json", render_json(state, node="node-b"))


def test_arp_rendering_matches_golden(state: ClusterState, golden: Golden) -> None:
    golden.check("realistic.arp", render_arp(state, interface="eth0"))
