"""Properties of normalize + every rendering on generated clusters: deterministic, order-independent."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import TypeVar

from hypothesis import given, settings
from hypothesis import strategies as st

from kube2ipvs.lbconfig import LBConfig, parse_lbconfig_value
from kube2ipvs.model import ClusterState, EndpointSlice, Node, Service
from kube2ipvs.normalize import normalize
from kube2ipvs.render.bgp import render_bgp
from kube2ipvs.render.ipvsadm import render_ipvsadm
from kube2ipvs.render.json import render_json
from tests.builders import endpointslice, node, service

Cluster = tuple[list[Node], list[Service], list[EndpointSlice], LBConfig]
SERVICES = ["web", "api", "db"]
T = TypeVar("T")


def _pod_address(family: int, service_index: int, i: int) -> str:
    return f"10.{service_index}.0.{i}" if family == 4 else f"2001:db8:{service_index + 1}::{i:x}"


@st.composite
def clusters(draw: st.DrawFn) -> Cluster:
    n_nodes = draw(st.integers(1, 6))
    nodes = [node(f"n{i}", f"198.51.100.{i + 1}", f"2001:db8:100::{i + 1}",
                  ready=draw(st.booleans()) or i == 0) for i in range(n_nodes)]
    services = [service("shop", s, ("http", 80, "TCP"), ("dns", 53, "UDP")) for s in SERVICES]
    slices: list[EndpointSlice] = []
    for s in SERVICES:
        for family in (4, 6):
            eps = draw(st.lists(st.tuples(st.integers(1, 250), st.integers(0, n_nodes - 1), st.booleans()),
                                max_size=8))
            k = SERVICES.index(s)
            slices.append(endpointslice("shop", s, f"{s}-{family}", [("http", 8080, "TCP"), ("dns", 5353, "UDP")],
                                        [(_pod_address(family, k, i), f"n{n}", r) for i, n, r in eps], family=family))
    entries: dict[str, dict[str, object]] = {}
    for vip in draw(st.lists(st.sampled_from(["192.0.2.1", "192.0.2.2", "192.0.2.3"]), unique=True, max_size=3)):
        entries[vip] = {
            str(port): {"namespace": "shop", "service": draw(st.sampled_from(SERVICES)),
                        "portName": draw(st.sampled_from(["http", "dns"])),
                        "tcpEnabled": draw(st.booleans()), "udpEnabled": draw(st.booleans()),
                        "ipvsOptions": {"scheduler": draw(st.sampled_from(["", "wrr", "mh", "rr"])),
                                        "uThreshold": draw(st.sampled_from([0, 10, 1000]))}}
            for port in draw(st.lists(st.integers(1, 65535), unique=True, max_size=4))
        }
    config6 = {"2001:db8::1": {"80": {"namespace": "shop", "service": "web", "portName": "http"}}}
    config = parse_lbconfig_value({"vipPool": ["192.0.2.9"], "config": entries, "config6": config6})
    return nodes, services, slices, config


def renderings(state: ClusterState) -> list[str]:
    from kube2ipvs.render.iptables import render_iptables
    from kube2ipvs.render.nft import render_nft

    out = [render_ipvsadm(state, mode="arp"), render_ipvsadm(state, mode="bgp"),
           render_bgp(state, nexthop="198.51.100.254"), render_json(state)]
    for name in state.node_names():
        out += [render_nft(state.for_node(name)), render_iptables(state.for_node(name))]
    return out


def shuffled(items: Sequence[T], rnd: random.Random) -> list[T]:
    copy = list(items)
    rnd.shuffle(copy)
    return copy


@settings(max_examples=60, deadline=None)
@given(clusters(), st.randoms(use_true_random=False))
def test_renderings_are_independent_of_input_order(cluster: Cluster, rnd: random.Random) -> None:
    nodes, services, slices, config = cluster
    first = normalize(nodes, services, slices, config)
    reshuffled_slices = [
        EndpointSlice(s.namespace, s.name, s.service_name, s.family, s.ports,
                      tuple(shuffled(s.endpoints, rnd)))
        for s in shuffled(slices, rnd)
    ]
    second = normalize(shuffled(nodes, rnd), shuffled(services, rnd), reshuffled_slices, config)
    assert first == second
    assert renderings(first) == renderings(second)


@settings(max_examples=30, deadline=None)
@given(clusters())
def test_renderings_are_deterministic(cluster: Cluster) -> None:
    render: Callable[[], list[str]] = lambda: renderings(normalize(*cluster))  # noqa: E731
    assert render() == render()


@settings(max_examples=60, deadline=None)
@given(clusters())
def test_every_real_server_has_a_positive_weight_equal_to_its_endpoints(cluster: Cluster) -> None:
    state = normalize(*cluster)
    for vs in state.services:
        assert all(b.weight == len(b.endpoints) > 0 for b in vs.backends)
        assert len({b.node for b in vs.backends}) == len(vs.backends)
