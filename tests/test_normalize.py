"""normalize(): which nodes are backends, which endpoints count, what is skipped and why."""

from __future__ import annotations

from kube2ipvs.model import ClusterState, PodEndpoint
from kube2ipvs.normalize import normalize
from tests.builders import config, endpointslice, node, service, web_entry

WEB = service("shop", "web", ("http", 80, "TCP"))
HTTP = [("http", 8080, "TCP")]


def backends(state: ClusterState) -> dict[str, list[tuple[str, int]]]:
    return {f"{vs.vip}:{vs.port}/{vs.protocol}": [(b.node, b.weight) for b in vs.backends]
            for vs in state.services}


def test_weight_is_the_number_of_ready_endpoints_on_each_node() -> None:
    nodes = [node("a", "198.51.100.1"), node("b", "198.51.100.2")]
    slices = [endpointslice("shop", "web", "w1", HTTP, [
        ("10.0.0.1", "a", True), ("10.0.0.2", "a", True), ("10.0.1.1", "b", True)])]
    state = normalize(nodes, [WEB], slices, config({"192.0.2.1": {"80": web_entry()}}))
    assert backends(state) == {"192.0.2.1:80/tcp": [("a", 2), ("b", 1)]}
    assert state.services[0].backends[0].endpoints == (PodEndpoint("10.0.0.1", 8080), PodEndpoint("10.0.0.2", 8080))


def test_endpoints_of_one_service_in_several_slices_are_merged_and_deduplicated() -> None:
    nodes = [node("a", "198.51.100.1")]
    slices = [
        endpointslice("shop", "web", "w1", HTTP, [("10.0.0.1", "a", True)]),
        endpointslice("shop", "web", "w2", HTTP, [("10.0.0.1", "a", True), ("10.0.0.2", "a", True)]),
    ]
    state = normalize(nodes, [WEB], slices, config({"192.0.2.1": {"80": web_entry()}}))
    assert backends(state) == {"192.0.2.1:80/tcp": [("a", 2)]}


def test_unready_endpoints_and_endpoints_without_a_node_do_not_count() -> None:
    nodes = [node("a", "198.51.100.1")]
    slices = [endpointslice("shop", "web", "w1", HTTP, [
        ("10.0.0.1", "a", False), ("10.0.0.2", None, True), ("10.0.0.3", "a", True)])]
    state = normalize(nodes, [WEB], slices, config({"192.0.2.1": {"80": web_entry()}}))
    assert backends(state) == {"192.0.2.1:80/tcp": [("a", 1)]}


def test_nodes_not_ready_or_missing_a_label_or_an_address_are_not_backends() -> None:
    nodes = [
        node("ok", "198.51.100.1"),
        node("down", "198.51.100.2", ready=False),
        node("blue", "198.51.100.3", labels={"example.com/lb-zone": "blue"}),
        node("noip"),
    ]
    slices = [endpointslice("shop", "web", "w1", HTTP, [
        ("10.0.0.1", "ok", True), ("10.0.0.2", "down", True), ("10.0.0.3", "blue", True), ("10.0.0.4", "noip", True)])]
    state = normalize(nodes, [WEB], slices, config({"192.0.2.1": {"80": web_entry()}}))
    assert backends(state) == {"192.0.2.1:80/tcp": [("ok", 1)]}
    reasons = {n.name: n.reason for n in state.nodes}
    assert reasons == {"ok": "", "down": "not Ready", "blue": "lacks label example.com/lb-zone=green",
                       "noip": "has no InternalIP"}
    assert "down, noip, blue" not in state.skipped[0].reason
    assert state.skipped[0].reason.endswith("blue, down, noip")


def test_cordoned_nodes_stay_backends_unless_excluded() -> None:
    nodes = [node("a", "198.51.100.1", cordoned=True), node("b", "198.51.100.2")]
    slices = [endpointslice("shop", "web", "w1", HTTP, [("10.0.0.1", "a", True), ("10.0.1.1", "b", True)])]
    cfg = config({"192.0.2.1": {"80": web_entry()}})
    assert backends(normalize(nodes, [WEB], slices, cfg)) == {"192.0.2.1:80/tcp": [("a", 1), ("b", 1)]}
    excluded = normalize(nodes, [WEB], slices, cfg, exclude_cordoned=True)
    assert backends(excluded) == {"192.0.2.1:80/tcp": [("b", 1)]}


def test_an_ipv6_vip_uses_ipv6_slices_and_the_nodes_ipv6_address() -> None:
    nodes = [node("a", "198.51.100.1", "2001:db8:100::1"), node("b", "198.51.100.2")]
    slices = [
        endpointslice("shop", "web", "w4", HTTP, [("10.0.0.1", "a", True)]),
        endpointslice("shop", "web", "w6", HTTP, [("2001:db8:1::1", "a", True), ("2001:db8:1::2", "b", True)],
                      family=6),
    ]
    state = normalize(nodes, [WEB], slices, config({}, config6={"2001:db8::10": {"80": web_entry()}}))
    (vs,) = state.services
    assert (vs.vip, vs.family) == ("2001:db8::10", 6)
    assert [(b.node, b.address, b.endpoints) for b in vs.backends] == [
        ("a", "2001:db8:100::1", (PodEndpoint("2001:db8:1::1", 8080),))]
    assert "b" in state.skipped[0].reason


def test_headless_missing_and_mismatched_services_are_skipped_with_a_reason() -> None:
    services = [WEB, service("shop", "hl", ("http", 80, "TCP"), headless=True)]
    cfg = config({"192.0.2.1": {
        "80": web_entry(portName="metrics"),
        "81": {"namespace": "shop", "service": "hl", "portName": "http"},
        "82": {"namespace": "shop", "service": "gone", "portName": "http"},
    }})
    state = normalize([node("a", "198.51.100.1")], services, [], cfg)
    assert state.services == ()
    assert {s.subject: s.reason for s in state.skipped} == {
        "192.0.2.1:80/tcp": "service shop/web has no port named 'metrics' (it has: http)",
        "192.0.2.1:81/tcp": "service shop/hl is headless",
        "192.0.2.1:82/tcp": "service shop/gone not found",
    }


def test_a_numeric_port_name_designates_the_service_port_with_that_number() -> None:
    svc = service("shop", "web", ("web", 8080, "TCP"))
    slices = [endpointslice("shop", "web", "w1", [("web", 9000, "TCP")], [("10.0.0.1", "a", True)])]
    state = normalize([node("a", "198.51.100.1")], [svc], slices,
                      config({"192.0.2.1": {"80": web_entry(portName="8080")}}))
    assert state.services[0].backends[0].endpoints == (PodEndpoint("10.0.0.1", 9000),)


def test_tcp_and_udp_on_one_port_each_use_the_slice_port_of_their_protocol() -> None:
    svc = service("infra", "dns", ("dns", 53, "UDP"), ("dns-tcp", 53, "TCP"))
    slices = [endpointslice("infra", "dns", "d1", [("dns", 5353, "UDP"), ("dns-tcp", 53, "TCP")],
                            [("10.0.0.1", "a", True)])]
    entry = {"namespace": "infra", "service": "dns", "portName": "dns", "tcpEnabled": True, "udpEnabled": True}
    state = normalize([node("a", "198.51.100.1")], [svc], slices, config({"192.0.2.1": {"53": entry}}))
    got = {vs.protocol: vs.backends[0].endpoints[0].port for vs in state.services}
    # The config names one port ("dns", UDP); TCP falls back to it because Ravel matched by name only.
    assert got == {"tcp": 5353, "udp": 5353}


def test_the_state_is_independent_of_input_order_and_so_is_its_hash() -> None:
    nodes = [node("a", "198.51.100.1"), node("b", "198.51.100.2"), node("c", "198.51.100.3")]
    slices = [
        endpointslice("shop", "web", "w1", HTTP, [("10.0.0.3", "c", True), ("10.0.0.1", "a", True)]),
        endpointslice("shop", "web", "w2", HTTP, [("10.0.0.2", "b", True)]),
    ]
    cfg = config({"192.0.2.2": {"80": web_entry()}, "192.0.2.1": {"443": web_entry(), "80": web_entry()}})
    one = normalize(nodes, [WEB], slices, cfg)
    two = normalize(list(reversed(nodes)), [WEB], list(reversed(slices)), cfg)
    assert one == two
    assert one.content_hash == two.content_hash
    assert [vs.key for vs in one.services] == [
        ("192.0.2.1", 80, "tcp"), ("192.0.2.1", 443, "tcp"), ("192.0.2.2", 80, "tcp")]


def test_the_hash_changes_with_an_endpoint_but_not_with_the_generation() -> None:
    nodes = [node("a", "198.51.100.1")]
    cfg = config({"192.0.2.1": {"80": web_entry()}})
    one = normalize(nodes, [WEB], [endpointslice("shop", "web", "w", HTTP, [("10.0.0.1", "a", True)])], cfg)
    later = normalize(nodes, [WEB], [endpointslice("shop", "web", "w", HTTP, [("10.0.0.1", "a", True)])], cfg,
                      generation=7)
    more = normalize(nodes, [WEB], [endpointslice("shop", "web", "w", HTTP,
                                                  [("10.0.0.1", "a", True), ("10.0.0.2", "a", True)])], cfg)
    assert one.content_hash == later.content_hash
    assert one.content_hash != more.content_hash


def test_a_node_slice_keeps_only_that_nodes_backend() -> None:
    nodes = [node("a", "198.51.100.1"), node("b", "198.51.100.2")]
    slices = [endpointslice("shop", "web", "w1", HTTP, [("10.0.0.1", "a", True), ("10.0.1.1", "b", True)])]
    state = normalize(nodes, [WEB], slices, config({"192.0.2.1": {"80": web_entry()}}, pool=["192.0.2.2"]))
    (vs,) = state.for_node("b")
    assert [b.node for b in vs.backends] == ["b"]
    assert state.for_node("nobody") == ()
    assert state.vips == ("192.0.2.1", "192.0.2.2")
