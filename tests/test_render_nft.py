"""render_nft: structure, names, and what each VIP:port is DNATed to (read back from the text)."""

from __future__ import annotations

import ipaddress
import random
import re
from collections.abc import Sequence
from dataclasses import replace

import pytest

from kube2ipvs.lbconfig import Family, Protocol
from kube2ipvs.model import Backend, ClusterState, PodEndpoint, VirtualService, hostport
from kube2ipvs.names import NFT_NAME_MAX, nft_service_name
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


def elements(body: str, kind: str, name: str) -> list[str]:
    m = re.search(rf"^\t{kind} {name} \{{\n(.*?)^\t\}}$", body, re.M | re.S)
    assert m is not None, f"no {kind} {name}"
    inner = re.search(r"elements = \{\n(.*?)\n\t\t\}", m[1], re.S)
    return [] if inner is None else [e.strip().rstrip(",") for e in inner[1].splitlines()]


def map_elements(body: str, name: str) -> list[str]:
    return elements(body, "map", name)


def set_elements(body: str, name: str) -> list[str]:
    return elements(body, "set", name)


def dnat_slots(text: str) -> dict[Key, list[str]]:
    """Follow every element of the `class` vmap as nft would: to chain dnat_N, whose rule for
    the service's protocol picks `numgen random mod N` from map slots_N; return, per service,
    the endpoint each of its N slots holds (in slot order). Fails on a slot missing or extra."""
    traced: dict[Key, list[str]] = {}
    for family, body in tables(text).items():
        if not body:
            continue
        rules = chains(body)
        slots: dict[str, dict[str, str]] = {}
        for element in map_elements(body, "class"):
            m = re.fullmatch(r"(\S+ \. (tcp|udp) \. \d+) : goto (\S+)", element)
            assert m is not None, element
            key, protocol, chain = m.groups()
            rule = next(r for r in rules[chain] if r.startswith(f"meta l4proto {protocol} "))
            found = re.fullmatch(rf"meta l4proto {protocol} dnat {family} to {family} daddr \. meta l4proto \. "
                                 r"th dport \. numgen random mod (\d+) map @(\S+)", rule)
            assert found is not None, rule
            n, slot_map = int(found[1]), found[2]
            if slot_map not in slots:
                slots[slot_map] = dict(e.split(" : ") for e in map_elements(body, slot_map))
            held = [slots[slot_map].pop(f"{key} . {i}") for i in range(n)]
            vip, _, port = key.split(" . ")
            traced[(family, vip, protocol, int(port))] = [
                hostport(addr, int(p)) for addr, p in (h.split(" . ") for h in held)]
        assert all(not rest for rest in slots.values()), f"slots no service reaches: {slots}"
    return traced


def one_slot_each(services: Sequence[VirtualService]) -> dict[Key, list[str]]:
    """Every local endpoint of every service holds exactly one slot, in address order."""
    def order(e: PodEndpoint) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
        return ipaddress.ip_address(e.address), e.port

    return {("ip6" if vs.family == 6 else "ip", vs.vip, vs.protocol, vs.port):
            [hostport(e.address, e.port) for b in vs.backends for e in sorted(b.endpoints, key=order)]
            for vs in services}


# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("node", ["node-a", "node-b", "node-c"])
def test_each_vip_port_is_dnated_to_exactly_the_nodes_local_endpoints(state: ClusterState, node: str) -> None:
    mine = state.for_node(node)
    assert mine, "the fixture gives every one of these nodes some services"
    assert dnat_slots(render_nft(mine)) == one_slot_each(mine)


def test_a_service_goes_to_the_class_of_its_endpoint_count_and_each_endpoint_holds_one_slot() -> None:
    text = render_nft([
        virtual_service("192.0.2.10", 80, endpoints=[("10.1.1.3", 8080), ("10.1.1.2", 8080), ("10.1.1.4", 8080)]),
        virtual_service("192.0.2.10", 53, "udp", endpoints=[("10.1.1.5", 5353)]),
    ])
    body = tables(text)["ip"]
    assert map_elements(body, "class") == ["192.0.2.10 . udp . 53 : goto dnat_1", "192.0.2.10 . tcp . 80 : goto dnat_3"]
    assert map_elements(body, "slots_3") == [
        "192.0.2.10 . tcp . 80 . 0 : 10.1.1.2 . 8080",
        "192.0.2.10 . tcp . 80 . 1 : 10.1.1.3 . 8080",
        "192.0.2.10 . tcp . 80 . 2 : 10.1.1.4 . 8080",
    ]
    assert map_elements(body, "slots_1") == ["192.0.2.10 . udp . 53 . 0 : 10.1.1.5 . 5353"]
    assert chains(body)["dnat_3"] == [
        "meta l4proto tcp dnat ip to ip daddr . meta l4proto . th dport . numgen random mod 3 map @slots_3",
        "meta l4proto udp dnat ip to ip daddr . meta l4proto . th dport . numgen random mod 3 map @slots_3",
    ]


def test_the_fixed_classes_always_exist_and_a_larger_one_only_while_used() -> None:
    small = tables(render_nft([virtual_service("192.0.2.10", 80)]))["ip"]
    assert [c for c in chains(small) if c.startswith("dnat_")] == [f"dnat_{n}" for n in range(1, 65)]
    big = virtual_service("192.0.2.10", 80, endpoints=[(f"10.1.{i // 200}.{i % 200 + 1}", 80) for i in range(300)])
    body = tables(render_nft([big]))["ip"]
    assert [c for c in chains(body) if c.startswith("dnat_")] == [f"dnat_{n}" for n in [*range(1, 65), 300]]
    assert len(dnat_slots(render_nft([big]))[("ip", "192.0.2.10", "tcp", 80)]) == 300


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 65])
def test_any_number_of_endpoints_gets_one_slot_each(n: int) -> None:
    vs = virtual_service("192.0.2.10", 80, endpoints=[(f"10.1.1.{i}", 8080) for i in range(1, n + 1)])
    assert dnat_slots(render_nft([vs])) == one_slot_each([vs])


def test_ipv6_services_go_to_the_ip6_table_with_bracketed_endpoints() -> None:
    text = render_nft([virtual_service("2001:db8::10", 80, endpoints=[("2001:db8:1:1::2", 8080)])])
    assert tables(text)["ip"] == ""
    assert map_elements(tables(text)["ip6"], "slots_1") == ["2001:db8::10 . tcp . 80 . 0 : 2001:db8:1:1::2 . 8080"]
    assert dnat_slots(text) == {("ip6", "2001:db8::10", "tcp", 80): ["[2001:db8:1:1::2]:8080"]}
    assert "ip6 daddr . meta l4proto . th dport vmap @class" in text


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
    assert dnat_slots(text) == {("ip", "192.0.2.11", "tcp", 80): ["10.1.1.2:8080", "10.1.1.3:8080"]}
    assert "192.0.2.10" not in text


def test_an_endpoint_of_the_other_family_is_never_a_dnat_target() -> None:
    text = render_nft([virtual_service("192.0.2.10", 80, endpoints=[("2001:db8:1:1::2", 8080), ("10.1.1.2", 80)])])
    assert dnat_slots(text) == {("ip", "192.0.2.10", "tcp", 80): ["10.1.1.2:80"]}


def test_each_counter_set_holds_exactly_the_services_of_its_kinds(state: ClusterState) -> None:
    mine = state.for_node("node-a")
    text = render_nft(mine)
    for family, body in tables(text).items():
        for kind in ("pkts_in", "pkts_out", "syn_in", "synack_out", "fin_in", "fin_out", "rst_in", "rst_out"):
            declared = re.search(rf"^\tset {kind} \{{\n(.*?)^\t\}}$", body, re.M | re.S)
            assert declared is not None
            assert "\t\tcounter\n" in declared[0]
            promised = sorted(f"{vs.vip} . {vs.protocol} . {vs.port}" for vs in mine
                              if ("ip6" if vs.family == 6 else "ip") == family and kind in counter_names(vs))
            assert sorted(set_elements(body, kind)) == promised, (family, kind)


def test_counting_happens_before_dnat_inbound_and_after_un_dnat_outbound(state: ClusterState) -> None:
    body = tables(render_nft(state.for_node("node-a")))["ip"]
    assert "type filter hook prerouting priority raw; policy accept;\n\t\tjump count_in" in body
    assert "type filter hook postrouting priority 300; policy accept;\n\t\tjump count_out" in body
    rules = chains(body)
    assert rules["count_in"] == [
        "ip daddr . meta l4proto . th dport @pkts_in",
        "tcp flags & (syn | ack) == syn ip daddr . meta l4proto . th dport @syn_in",
        "tcp flags & fin == fin ip daddr . meta l4proto . th dport @fin_in",
        "tcp flags & rst == rst ip daddr . meta l4proto . th dport @rst_in",
    ]
    assert rules["count_out"] == [
        "ip saddr . meta l4proto . th sport @pkts_out",
        "tcp flags & (syn | ack) == syn | ack ip saddr . meta l4proto . th sport @synack_out",
        "tcp flags & fin == fin ip saddr . meta l4proto . th sport @fin_out",
        "tcp flags & rst == rst ip saddr . meta l4proto . th sport @rst_out",
    ]


def test_udp_services_have_packet_counters_and_no_flag_counters() -> None:
    vs = virtual_service("192.0.2.10", 53, "udp")
    assert counter_names(vs) == {"pkts_in": "svc_192.0.2.10_53_udp_pkts_in",
                                 "pkts_out": "svc_192.0.2.10_53_udp_pkts_out"}
    body = tables(render_nft([vs]))["ip"]
    assert set_elements(body, "pkts_in") == set_elements(body, "pkts_out") == ["192.0.2.10 . udp . 53"]
    assert set_elements(body, "syn_in") == []
    assert set_elements(body, "rst_out") == []


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
    assert set_elements(ip, "masquerade_exempt") == ["10.1.0.0/16"]  # the /24 lies inside the /16
    assert "\tset masquerade_exempt {\n\t\ttype ipv4_addr\n\t\tflags interval\n" in ip
    assert set_elements(ip6, "masquerade_exempt") == ["fd00::/8"]
    assert set_elements(ip, "vips") == ["192.0.2.10", "192.0.2.11", "192.0.2.12"]
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


def test_no_rule_holds_an_anonymous_set_or_an_endpoint_so_changes_are_element_updates(state: ClusterState) -> None:
    # The kernel looks for a free name for each anonymous set by walking the table's sets (one
    # `numgen ... map { }` per service made 10,000 services take minutes to load); and a rule that
    # named an endpoint would have to be rewritten when it changes.
    mine = state.for_node("node-a")
    for body in tables(render_nft(mine)).values():
        for rules in chains(body).values():
            assert not any("{" in rule for rule in rules), rules
            for vs in mine:
                for b in vs.backends:
                    assert not any(ep.address in rule for ep in b.endpoints for rule in rules)


def test_a_vip_mtu_clamps_the_tcp_mss_of_its_connections_both_ways() -> None:
    small = replace(virtual_service("192.0.2.10", 80), mtu=1400)
    also = replace(virtual_service("192.0.2.10", 443), mtu=1400)
    v6 = replace(virtual_service("2001:db8::10", 80, endpoints=[("2001:db8:1:1::2", 8080)]), mtu=1500)
    text = render_nft([small, also, v6, virtual_service("192.0.2.11", 80)])
    ip, ip6 = tables(text)["ip"], tables(text)["ip6"]
    assert set_elements(ip, "mss_clamp") == ["192.0.2.10 . 1361-65535"]  # advertised sizes above 1400 - 40
    assert map_elements(ip, "mss") == ["192.0.2.10 : 1360"]
    assert map_elements(ip6, "mss") == ["2001:db8::10 : 1440"]  # IPv6 headers take 60
    assert chains(ip)["prerouting_mss"] == [
        "type filter hook prerouting priority mangle; policy accept;",
        "tcp flags & (syn | rst) == syn ip daddr . tcp option maxseg size @mss_clamp "
        "tcp option maxseg size set ip daddr map @mss",
    ]
    assert chains(ip)["postrouting_mss"][1].startswith("tcp flags & (syn | ack | rst) == syn | ack ip saddr . ")


def test_without_an_mtu_nothing_is_clamped() -> None:
    body = tables(render_nft([virtual_service("192.0.2.10", 80)]))["ip"]
    assert set_elements(body, "mss_clamp") == []
    assert map_elements(body, "mss") == []
