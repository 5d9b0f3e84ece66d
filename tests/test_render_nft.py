"""render_nft: structure, names, and what each VIP:port is DNATed to (read back from the text)."""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace

import pytest

from kube2ipvs.lbconfig import Family, Protocol
from kube2ipvs.model import Backend, ClusterState, PodEndpoint, VirtualService, hostport
from kube2ipvs.names import NFT_NAME_MAX, nft_service_name, service_counter_names
from kube2ipvs.render.nft import counter_names, render_nft

Key = tuple[str, str, str, int]  # family, VIP, protocol, port


def virtual_service(vip: str, port: int, protocol: Protocol = "tcp",
                    endpoints: Sequence[tuple[str, int]] = (("10.1.1.2", 8080),),
                    node: str = "node-a") -> VirtualService:
    family: Family = 6 if ":" in vip else 4
    return VirtualService(
        vip=vip, family=family, port=port, protocol=protocol, namespace="shop", service="web",
        port_name="http", scheduler=None, forwarding="g", u_threshold=0, l_threshold=0, flags=(),
        mtu=None,
        backends=(Backend(node, "198.51.100.11", tuple(PodEndpoint(a, p) for a, p in endpoints)),),
    )


# ---------------------------------------------------------------------------------------------
# A small reader of the rendered text: which endpoints each VIP:port/protocol is DNATed to.

def tables(text: str) -> dict[str, str]:
    """nft family -> the body of its `table <family> kube2ipvs { ... }` block."""
    return {m[1]: m[2] for m in re.finditer(r"^table (ip6?) kube2ipvs \{\n(.*?)^\}$", text, re.M | re.S)}


def chains(body: str) -> dict[str, list[str]]:
    found = re.finditer(r"^\tchain (\S+) \{\n(.*?)^\t\}$", body, re.M | re.S)
    return {m[1]: [line.strip() for line in m[2].splitlines()] for m in found}


def map_elements(body: str, name: str) -> list[str]:
    m = re.search(rf"^\tmap {name} \{{\n(.*?)^\t\}}$", body, re.M | re.S)
    assert m is not None, f"no map {name}"
    inner = re.search(r"elements = \{\n(.*?)\n\t\t\}", m[1], re.S)
    return [] if inner is None else [e.strip().rstrip(",") for e in inner[1].splitlines()]


def dnat_targets(text: str, connections: int = 120) -> dict[Key, Counter[str]]:
    """Send `connections` new connections to every VIP:port/protocol of the `services` vmap and
    count where each is DNATed: each rule of the service chain runs as nft would, a `numgen inc
    mod K == 0` test consuming that rule's own counter."""
    traced: dict[Key, Counter[str]] = {}
    for family, body in tables(text).items():
        if not body:
            continue
        rules = chains(body)
        for element in map_elements(body, "services"):
            m = re.fullmatch(r"(\S+) \. (tcp|udp) \. (\d+) : goto (\S+)", element)
            assert m is not None, element
            vip, protocol, port, chain = m.groups()
            parsed = [
                re.fullmatch(rf"meta l4proto {protocol} (?:numgen inc mod (\d+) == 0 )?dnat {family} to (\S+)", r)
                for r in rules[chain]
            ]
            numgen = [0] * len(parsed)
            hits: Counter[str] = Counter()
            for _ in range(connections):
                for i, rule in enumerate(parsed):
                    assert rule is not None, rules[chain][i]
                    if rule[1] is not None:
                        numgen[i] = (numgen[i] + 1) % int(rule[1])  # the kernel yields the new value
                        if numgen[i] != 0:
                            continue
                    hits[rule[2]] += 1
                    break
                else:
                    pytest.fail(f"a connection to {vip}:{port}/{protocol} fell through {chain}")
            traced[(family, vip, protocol, int(port))] = hits
    return traced


def even_split(services: Sequence[VirtualService], connections: int = 120) -> dict[Key, Counter[str]]:
    """Every local endpoint of every service gets the same number of the `connections`."""
    split: dict[Key, Counter[str]] = {}
    for vs in services:
        endpoints = [hostport(e.address, e.port) for b in vs.backends for e in b.endpoints]
        split[("ip6" if vs.family == 6 else "ip", vs.vip, vs.protocol, vs.port)] = Counter(
            {ep: connections // len(endpoints) for ep in endpoints})
    return split


def declared_counters(text: str) -> list[str]:
    return re.findall(r"^\tcounter (\S+) \{ \}$", text, re.M)


# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("node", ["node-a", "node-b", "node-c"])
def test_each_vip_port_is_dnated_to_exactly_the_nodes_local_endpoints(state: ClusterState, node: str) -> None:
    mine = state.for_node(node)
    assert mine, "the fixture gives every one of these nodes some services"
    assert dnat_targets(render_nft(mine)) == even_split(mine)


def test_several_endpoints_take_turns_and_a_single_one_is_a_plain_dnat() -> None:
    text = render_nft([
        virtual_service("192.0.2.10", 80, endpoints=[("10.1.1.3", 8080), ("10.1.1.2", 8080), ("10.1.1.4", 8080)]),
        virtual_service("192.0.2.10", 53, "udp", endpoints=[("10.1.1.5", 5353)]),
    ])
    rules = chains(tables(text)["ip"])
    assert rules["svc_192.0.2.10_80_tcp"] == [
        "meta l4proto tcp numgen inc mod 3 == 0 dnat ip to 10.1.1.2:8080",
        "meta l4proto tcp numgen inc mod 2 == 0 dnat ip to 10.1.1.3:8080",
        "meta l4proto tcp dnat ip to 10.1.1.4:8080",
    ]
    assert rules["svc_192.0.2.10_53_udp"] == ["meta l4proto udp dnat ip to 10.1.1.5:5353"]


@pytest.mark.parametrize("n", range(1, 7))
def test_any_number_of_endpoints_share_connections_exactly_evenly(n: int) -> None:
    vs = virtual_service("192.0.2.10", 80, endpoints=[(f"10.1.1.{i}", 8080) for i in range(1, n + 1)])
    assert dnat_targets(render_nft([vs]), connections=720) == even_split([vs], connections=720)


def test_ipv6_services_go_to_the_ip6_table_with_bracketed_endpoints() -> None:
    text = render_nft([virtual_service("2001:db8::10", 80, endpoints=[("2001:db8:1:1::2", 8080)])])
    assert tables(text)["ip"] == ""
    assert chains(tables(text)["ip6"])["svc_2001-db8--10_80_tcp"] == [
        "meta l4proto tcp dnat ip6 to [2001:db8:1:1::2]:8080"
    ]
    assert "ip6 daddr . meta l4proto . th dport vmap @services" in text


def test_no_services_still_replaces_both_tables_with_empty_ones() -> None:
    assert render_nft([]) == (
        "table ip kube2ipvs\ndelete table ip kube2ipvs\ntable ip kube2ipvs {\n}\n"
        "table ip6 kube2ipvs\ndelete table ip6 kube2ipvs\ntable ip6 kube2ipvs {\n}\n"
    )


def test_each_table_is_created_then_deleted_then_written_so_one_load_replaces_it(state: ClusterState) -> None:
    lines = render_nft(state.for_node("node-a")).splitlines()
    heads = [i for i, line in enumerate(lines) if line.startswith("table ") and not line.endswith("{")]
    assert [lines[i:i + 3] for i in heads] == [
        [f"table {f} kube2ipvs", f"delete table {f} kube2ipvs", f"table {f} kube2ipvs {{"] for f in ("ip", "ip6")
    ]


def test_the_text_does_not_depend_on_the_order_of_services_or_endpoints(state: ClusterState) -> None:
    services = list(state.for_node("node-a"))
    rnd = random.Random(7)
    for _ in range(5):
        rnd.shuffle(services)
        shuffled = [
            replace(vs, backends=tuple(
                replace(b, endpoints=tuple(rnd.sample(b.endpoints, len(b.endpoints)))) for b in vs.backends))
            for vs in services
        ]
        assert render_nft(shuffled) == render_nft(state.for_node("node-a"))


def test_a_service_without_endpoints_is_left_out_and_a_repeated_one_is_merged() -> None:
    text = render_nft([
        replace(virtual_service("192.0.2.10", 80), backends=()),
        virtual_service("192.0.2.11", 80, endpoints=[("10.1.1.2", 8080)]),
        virtual_service("192.0.2.11", 80, endpoints=[("10.1.1.3", 8080)], node="node-b"),
        virtual_service("192.0.2.11", 80, endpoints=[("10.1.1.2", 8080)]),
    ])
    assert dnat_targets(text, 2) == {("ip", "192.0.2.11", "tcp", 80): Counter(["10.1.1.2:8080", "10.1.1.3:8080"])}
    assert "192.0.2.10" not in text


def test_an_endpoint_of_the_other_family_is_never_a_dnat_target() -> None:
    text = render_nft([virtual_service("192.0.2.10", 80, endpoints=[("2001:db8:1:1::2", 8080), ("10.1.1.2", 80)])])
    assert dnat_targets(text, 1) == {("ip", "192.0.2.10", "tcp", 80): Counter(["10.1.1.2:80"])}


def test_the_counters_declared_are_exactly_those_counter_names_promises(state: ClusterState) -> None:
    mine = state.for_node("node-a")
    promised = sorted(name for vs in mine for name in counter_names(vs).values())
    assert sorted(declared_counters(render_nft(mine))) == promised


def test_every_counter_is_reached_through_exactly_one_map_element_of_its_kind(state: ClusterState) -> None:
    text = render_nft(state.for_node("node-a"))
    for body in tables(text).values():
        referenced = []
        for kind in ("pkts_in", "pkts_out", "syn_in", "synack_out", "fin_in", "fin_out", "rst_in", "rst_out"):
            for element in map_elements(body, kind):
                key, name = element.split(" : ")
                vip, protocol, port = key.split(" . ")
                assert name == f'"{service_counter_names(vip, int(port), protocol)[kind]}"'
                referenced.append(name.strip('"'))
        assert sorted(referenced) == sorted(declared_counters(body))


def test_counting_happens_before_dnat_inbound_and_after_un_dnat_outbound(state: ClusterState) -> None:
    body = tables(render_nft(state.for_node("node-a")))["ip"]
    assert "type filter hook prerouting priority raw; policy accept;\n\t\tjump count_in" in body
    assert "type filter hook postrouting priority 300; policy accept;\n\t\tjump count_out" in body
    rules = chains(body)
    assert rules["count_in"] == [
        "counter name ip daddr . meta l4proto . th dport map @pkts_in",
        "tcp flags & (syn | ack) == syn counter name ip daddr . meta l4proto . th dport map @syn_in",
        "tcp flags & fin == fin counter name ip daddr . meta l4proto . th dport map @fin_in",
        "tcp flags & rst == rst counter name ip daddr . meta l4proto . th dport map @rst_in",
    ]
    assert rules["count_out"] == [
        "counter name ip saddr . meta l4proto . th sport map @pkts_out",
        "tcp flags & (syn | ack) == syn | ack counter name ip saddr . meta l4proto . th sport map @synack_out",
        "tcp flags & fin == fin counter name ip saddr . meta l4proto . th sport map @fin_out",
        "tcp flags & rst == rst counter name ip saddr . meta l4proto . th sport map @rst_out",
    ]


def test_udp_services_have_packet_counters_and_no_flag_counters() -> None:
    vs = virtual_service("192.0.2.10", 53, "udp")
    assert counter_names(vs) == {"pkts_in": "svc_192.0.2.10_53_udp_pkts_in",
                                 "pkts_out": "svc_192.0.2.10_53_udp_pkts_out"}
    body = tables(render_nft([vs]))["ip"]
    assert declared_counters(body) == list(counter_names(vs).values())
    assert map_elements(body, "syn_in") == []
    assert map_elements(body, "rst_out") == []


def test_tcp_services_have_all_eight_counters_with_readable_names() -> None:
    assert counter_names(virtual_service("192.0.2.10", 8080)) == {
        kind: f"svc_192.0.2.10_8080_tcp_{kind}"
        for kind in ("pkts_in", "pkts_out", "syn_in", "synack_out", "fin_in", "fin_out", "rst_in", "rst_out")
    }


@pytest.mark.parametrize(("vip", "name"), [
    ("192.0.2.10", "svc_192.0.2.10_65535_tcp"),
    ("2001:DB8:0::10", "svc_2001-db8--10_65535_tcp"),
    ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "svc_ffff-ffff-ffff-ffff-ffff-ffff-ffff-ffff_65535_tcp"),
])
def test_names_are_canonical_valid_nft_identifiers_within_the_length_budget(vip: str, name: str) -> None:
    assert nft_service_name(vip, 65535, "tcp") == name
    for counter in counter_names(virtual_service(vip, 65535, endpoints=[("2001:db8:1::2", 80)])).values():
        assert re.fullmatch(r"[A-Za-z][A-Za-z0-9_./-]*", counter)
        assert len(counter) <= 70 < NFT_NAME_MAX


def test_client_addresses_are_preserved_by_default(state: ClusterState) -> None:
    text = render_nft(state.for_node("node-a"))
    assert "masquerade" not in text
    assert "snat" not in text


def test_masquerade_exempts_the_pod_cidrs_of_each_family_and_uses_no_mark(state: ClusterState) -> None:
    text = render_nft(state.for_node("node-a"), masquerade_exempt=["10.1.2.0/24", "fd00::/8", "10.1.0.0/16"])
    ip, ip6 = tables(text)["ip"], tables(text)["ip6"]
    assert "flags interval\n\t\telements = { 10.1.0.0/16 }" in ip  # the /24 lies inside the /16
    assert "elements = { fd00::/8 }" in ip6
    assert "elements = { 192.0.2.10, 192.0.2.11, 192.0.2.12 }" in ip
    assert chains(ip)["postrouting_masquerade"] == [
        "type nat hook postrouting priority srcnat; policy accept;",
        "ct status dnat ct original ip daddr @vips ip saddr != @masquerade_exempt masquerade",
    ]
    assert "mark" not in text


def test_an_empty_exempt_list_masquerades_every_source() -> None:
    body = tables(render_nft([virtual_service("192.0.2.10", 80)], masquerade_exempt=[]))["ip"]
    assert "\tset masquerade_exempt {\n\t\ttype ipv4_addr\n\t\tflags interval\n\t}" in body
    assert "ip saddr != @masquerade_exempt masquerade" in body


def test_an_exempt_entry_that_is_not_a_cidr_is_refused() -> None:
    with pytest.raises(ValueError, match="does not appear to be an IPv4 or IPv6 network"):
        render_nft([virtual_service("192.0.2.10", 80)], masquerade_exempt=["10.1.0.0/16; flush ruleset"])


def test_service_chains_hold_no_anonymous_sets_so_loading_stays_linear() -> None:
    # The kernel looks for a free name for each anonymous set by walking the table's sets, so
    # one `numgen ... map { }` per service made 10,000 services take minutes to load.
    services = [virtual_service(f"192.0.2.{i}", 80, endpoints=[("10.1.1.2", 80), ("10.1.1.3", 80)])
                for i in range(1, 40)]
    for name, rules in chains(tables(render_nft(services))["ip"]).items():
        if name.startswith("svc_"):
            assert not any("{" in rule for rule in rules), rules
