"""render_nft_delta: the exact commands for add, remove and change, their order, and "" for no change.

That the commands turn `render_nft(old)` into `render_nft(new)` in the kernel is checked in
tests/root/test_nftdelta_netns.py.
"""

from __future__ import annotations

from dataclasses import replace

from kube2ipvs.render.nft import render_nft
from kube2ipvs.render.nftdelta import render_nft_delta
from tests.test_render_nft import virtual_service

A = virtual_service("192.0.2.1", 80, endpoints=[("10.0.0.1", 8080), ("10.0.0.2", 8080)])
DNS = virtual_service("192.0.2.1", 53, "udp", endpoints=[("10.0.0.1", 53)])
B = virtual_service("192.0.2.2", 443, endpoints=[("10.0.0.3", 8443)])
A6 = virtual_service("2001:db8::1", 80, endpoints=[("2001:db8:1::1", 8080)])
B6 = virtual_service("2001:db8::2", 80, endpoints=[("2001:db8:1::1", 8080)])


def lines(text: str) -> list[str]:
    return text.splitlines()


def test_no_change_gives_no_text() -> None:
    assert render_nft_delta([A, DNS, A6], [A, DNS, A6]) == ""
    assert render_nft_delta([], []) == ""


def test_input_order_and_duplicates_make_no_difference() -> None:
    assert render_nft_delta([A, DNS, A6], [A6, DNS, A, A]) == ""


def test_a_service_whose_endpoints_changed_has_its_chain_flushed_and_refilled() -> None:
    fewer = virtual_service("192.0.2.1", 80, endpoints=[("10.0.0.2", 8080)])
    assert lines(render_nft_delta([A, DNS], [fewer, DNS])) == [
        "flush chain ip kube2ipvs svc_192.0.2.1_80_tcp",
        "add rule ip kube2ipvs svc_192.0.2.1_80_tcp meta l4proto tcp dnat ip to 10.0.0.2:8080",
    ]
    assert lines(render_nft_delta([fewer, DNS], [A, DNS])) == [
        "flush chain ip kube2ipvs svc_192.0.2.1_80_tcp",
        "add rule ip kube2ipvs svc_192.0.2.1_80_tcp meta l4proto tcp numgen inc mod 2 == 0 dnat ip to 10.0.0.1:8080",
        "add rule ip kube2ipvs svc_192.0.2.1_80_tcp meta l4proto tcp dnat ip to 10.0.0.2:8080",
    ]


def test_a_change_outside_the_dnat_entry_such_as_the_service_name_changes_nothing() -> None:
    # The kernel holds only VIP, port, protocol and endpoints; names of the Kubernetes objects
    # are not part of the table.
    assert render_nft_delta([A], [replace(A, service="renamed")]) == ""


def test_a_new_service_is_created_counters_then_chain_and_rules_then_map_elements() -> None:
    assert lines(render_nft_delta([A], [A, DNS])) == [
        "create counter ip kube2ipvs svc_192.0.2.1_53_udp_pkts_in",
        "create counter ip kube2ipvs svc_192.0.2.1_53_udp_pkts_out",
        "create chain ip kube2ipvs svc_192.0.2.1_53_udp",
        "add rule ip kube2ipvs svc_192.0.2.1_53_udp meta l4proto udp dnat ip to 10.0.0.1:53",
        "create element ip kube2ipvs services { 192.0.2.1 . udp . 53 : goto svc_192.0.2.1_53_udp }",
        'create element ip kube2ipvs pkts_in { 192.0.2.1 . udp . 53 : "svc_192.0.2.1_53_udp_pkts_in" }',
        'create element ip kube2ipvs pkts_out { 192.0.2.1 . udp . 53 : "svc_192.0.2.1_53_udp_pkts_out" }',
    ]


def test_a_new_tcp_service_is_added_to_every_flag_map() -> None:
    text = render_nft_delta([A], [A, B])
    for kind in ("pkts_in", "pkts_out", "syn_in", "synack_out", "fin_in", "fin_out", "rst_in", "rst_out"):
        element = f'{{ 192.0.2.2 . tcp . 443 : "svc_192.0.2.2_443_tcp_{kind}" }}'
        assert f"create element ip kube2ipvs {kind} {element}" in text
        assert f"create counter ip kube2ipvs svc_192.0.2.2_443_tcp_{kind}" in text


def test_a_removed_service_leaves_the_maps_before_its_chain_and_counters_go() -> None:
    assert lines(render_nft_delta([A, DNS], [A])) == [
        "delete element ip kube2ipvs services { 192.0.2.1 . udp . 53 }",
        "delete element ip kube2ipvs pkts_in { 192.0.2.1 . udp . 53 }",
        "delete element ip kube2ipvs pkts_out { 192.0.2.1 . udp . 53 }",
        "delete chain ip kube2ipvs svc_192.0.2.1_53_udp",
        "delete counter ip kube2ipvs svc_192.0.2.1_53_udp_pkts_in",
        "delete counter ip kube2ipvs svc_192.0.2.1_53_udp_pkts_out",
    ]


def test_a_service_left_without_endpoints_is_removed() -> None:
    empty = replace(DNS, backends=(replace(DNS.backends[0], endpoints=()),))
    assert render_nft_delta([A, DNS], [A, empty]) == render_nft_delta([A, DNS], [A])


def test_several_removed_and_added_services_share_one_command_per_map() -> None:
    c = virtual_service("192.0.2.3", 80)
    d = virtual_service("192.0.2.4", 80)
    text = lines(render_nft_delta([A, c, d], [A, B]))
    assert "delete element ip kube2ipvs services { 192.0.2.3 . tcp . 80, 192.0.2.4 . tcp . 80 }" in text
    assert "create element ip kube2ipvs services { 192.0.2.2 . tcp . 443 : goto svc_192.0.2.2_443_tcp }" in text
    deletes = [i for i, line in enumerate(text) if line.startswith("delete ")]
    adds = [i for i, line in enumerate(text) if line.startswith(("create ", "add "))]
    assert max(deletes) < min(adds)  # everything removed first: no name is in use twice at a time


def test_only_the_family_that_changed_appears() -> None:
    text = render_nft_delta([A, A6], [A, B6])
    assert "ip6 kube2ipvs" in text
    assert " ip kube2ipvs" not in text


def test_with_masquerading_the_vips_set_follows_the_vips_in_use() -> None:
    exempt = ["10.0.0.0/8"]
    text = lines(render_nft_delta([A], [A, B], masquerade_exempt=exempt))
    assert text[-1] == "create element ip kube2ipvs vips { 192.0.2.2 }"
    text = lines(render_nft_delta([A, B], [A], masquerade_exempt=exempt))
    assert "delete element ip kube2ipvs vips { 192.0.2.2 }" in text


def test_with_masquerading_a_vip_still_used_by_another_port_stays_in_the_vips_set() -> None:
    exempt = ["10.0.0.0/8"]
    assert "vips" not in render_nft_delta([A], [A, DNS], masquerade_exempt=exempt)  # same VIP, new port
    assert "vips" not in render_nft_delta([A, DNS], [A], masquerade_exempt=exempt)


def test_without_masquerading_there_is_no_vips_set_to_update() -> None:
    assert "vips" not in render_nft_delta([A], [A, B])


def test_a_family_becoming_non_empty_gets_its_whole_table_as_render_nft_writes_it() -> None:
    text = render_nft_delta([A], [A, A6])
    full = render_nft([A, A6])
    ip6_block = full[full.index("table ip6 kube2ipvs\n"):]
    assert text == ip6_block


def test_a_family_becoming_empty_gets_an_empty_table() -> None:
    assert render_nft_delta([A, A6], [A6]) == "table ip kube2ipvs\ndelete table ip kube2ipvs\ntable ip kube2ipvs {\n}\n"


def test_from_nothing_the_delta_is_the_full_render() -> None:
    assert render_nft_delta([], [A, A6], masquerade_exempt=["10.0.0.0/8"]) == render_nft(
        [A, A6], masquerade_exempt=["10.0.0.0/8"])


def test_a_vip_spelled_differently_is_the_same_service() -> None:
    upper = virtual_service("2001:DB8::1", 80, endpoints=[("2001:db8:1::1", 8080)])
    assert render_nft_delta([A6], [upper]) == ""


def test_services_whose_backends_did_not_change_are_not_rebuilt() -> None:
    # The delta's cost is that of the changed services: an unchanged one is compared, never
    # parsed. An address the renderer would reject (ValueError) shows it was not read.
    unread = virtual_service("192.0.2.9", 80, endpoints=[("not-an-address", 8080)])
    fewer = virtual_service("192.0.2.1", 80, endpoints=[("10.0.0.2", 8080)])
    assert render_nft_delta([A, unread], [fewer, unread]) == render_nft_delta([A], [fewer])
