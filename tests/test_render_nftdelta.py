"""render_nft_delta: the exact commands for add, remove and change, their order, and "" for no change.

That the commands turn `render_nft(old)` into `render_nft(new)` in the kernel is checked in
tests/root/test_nftdelta_netns.py.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from kube2ipvs.normalize import normalize
from kube2ipvs.render.nft import dnat_entries, render_nft
from kube2ipvs.render.nftdelta import entries_by_key, render_entries_delta, render_nft_delta
from tests.test_render_nft import virtual_service
from tests.test_render_properties import Cluster, clusters

A = virtual_service("192.0.2.1", 80, endpoints=[("10.0.0.1", 8080), ("10.0.0.2", 8080)])
DNS = virtual_service("192.0.2.1", 53, "udp", endpoints=[("10.0.0.1", 53)])
B = virtual_service("192.0.2.2", 443, endpoints=[("10.0.0.3", 8443)])
A1 = virtual_service("192.0.2.1", 80, endpoints=[("10.0.0.2", 8080)])
A6 = virtual_service("2001:db8::1", 80, endpoints=[("2001:db8:1::1", 8080)])
B6 = virtual_service("2001:db8::2", 80, endpoints=[("2001:db8:1::1", 8080)])


def lines(text: str) -> list[str]:
    return text.splitlines()


def test_no_change_gives_no_text() -> None:
    assert render_nft_delta([A, DNS, A6], [A, DNS, A6]) == ""
    assert render_nft_delta([], []) == ""


def test_input_order_and_duplicates_make_no_difference() -> None:
    assert render_nft_delta([A, DNS, A6], [A6, DNS, A, A]) == ""


def test_a_service_whose_endpoints_changed_moves_class_with_its_new_slots_and_keeps_its_counters() -> None:
    fewer = virtual_service("192.0.2.1", 80, endpoints=[("10.0.0.2", 8080)])
    assert lines(render_nft_delta([A, DNS], [fewer, DNS])) == [
        "delete element ip kube2ipvs class { 192.0.2.1 . tcp . 80 }",
        "delete element ip kube2ipvs slots_2 { 192.0.2.1 . tcp . 80 . 0, 192.0.2.1 . tcp . 80 . 1 }",
        "create element ip kube2ipvs slots_1 { 192.0.2.1 . tcp . 80 . 0 : 10.0.0.2 . 8080 }",
        "create element ip kube2ipvs class { 192.0.2.1 . tcp . 80 : goto dnat_1 }",
    ]
    assert lines(render_nft_delta([fewer, DNS], [A, DNS])) == [
        "delete element ip kube2ipvs class { 192.0.2.1 . tcp . 80 }",
        "delete element ip kube2ipvs slots_1 { 192.0.2.1 . tcp . 80 . 0 }",
        "create element ip kube2ipvs slots_2 { 192.0.2.1 . tcp . 80 . 0 : 10.0.0.1 . 8080, "
        "192.0.2.1 . tcp . 80 . 1 : 10.0.0.2 . 8080 }",
        "create element ip kube2ipvs class { 192.0.2.1 . tcp . 80 : goto dnat_2 }",
    ]


def test_an_endpoint_replaced_by_another_is_an_element_change_only() -> None:
    other = virtual_service("192.0.2.1", 80, endpoints=[("10.0.0.1", 8080), ("10.0.0.9", 8080)])
    text = render_nft_delta([A], [other])
    assert all(" element " in line for line in lines(text))
    assert "create element ip kube2ipvs slots_2 { 192.0.2.1 . tcp . 80 . 0 : 10.0.0.1 . 8080, " \
           "192.0.2.1 . tcp . 80 . 1 : 10.0.0.9 . 8080 }" in text


def test_a_service_growing_past_the_fixed_classes_creates_its_class_and_the_last_one_out_deletes_it() -> None:
    many = virtual_service("192.0.2.1", 80, endpoints=[(f"10.0.1.{i}", 8080) for i in range(1, 71)])
    grown = lines(render_nft_delta([A], [many]))
    made = [line for line in grown if " element " not in line]
    assert made == [
        "create map ip kube2ipvs slots_70 { typeof ip daddr . meta l4proto . th dport . numgen random mod 70 : "
        "ip daddr . th dport; }",
        "create chain ip kube2ipvs dnat_70",
        "add rule ip kube2ipvs dnat_70 meta l4proto tcp dnat ip to ip daddr . meta l4proto . th dport . "
        "numgen random mod 70 map @slots_70",
        "add rule ip kube2ipvs dnat_70 meta l4proto udp dnat ip to ip daddr . meta l4proto . th dport . "
        "numgen random mod 70 map @slots_70",
    ]
    class_element = "create element ip kube2ipvs class { 192.0.2.1 . tcp . 80 : goto dnat_70 }"
    assert grown.index(made[-1]) < grown.index(class_element)
    shrunk = lines(render_nft_delta([many], [A]))
    assert [line for line in shrunk if " element " not in line] == [
        "delete chain ip kube2ipvs dnat_70", "delete map ip kube2ipvs slots_70"]
    assert shrunk.index("delete element ip kube2ipvs class { 192.0.2.1 . tcp . 80 }") < shrunk.index(
        "delete chain ip kube2ipvs dnat_70")


def test_a_large_class_still_used_by_an_unchanged_service_stays() -> None:
    many = virtual_service("192.0.2.1", 80, endpoints=[(f"10.0.1.{i}", 8080) for i in range(1, 71)])
    also = virtual_service("192.0.2.2", 80, endpoints=[(f"10.0.1.{i}", 8080) for i in range(1, 71)])
    assert all(" element " in line for line in lines(render_nft_delta([many, also], [A, also])))
    assert all(" element " in line for line in lines(render_nft_delta([A, also], [many, also])))


def test_a_change_outside_the_dnat_entry_such_as_the_service_name_changes_nothing() -> None:
    # The kernel holds only VIP, port, protocol and endpoints; names of the Kubernetes objects
    # are not part of the table.
    assert render_nft_delta([A], [replace(A, service="renamed")]) == ""


def test_a_new_service_gets_its_slots_and_counters_before_the_class_element_that_reaches_them() -> None:
    assert lines(render_nft_delta([A], [A, DNS])) == [
        "create element ip kube2ipvs slots_1 { 192.0.2.1 . udp . 53 . 0 : 10.0.0.1 . 53 }",
        "create element ip kube2ipvs pkts_in { 192.0.2.1 . udp . 53 }",
        "create element ip kube2ipvs pkts_out { 192.0.2.1 . udp . 53 }",
        "create element ip kube2ipvs class { 192.0.2.1 . udp . 53 : goto dnat_1 }",
    ]


def test_a_new_tcp_service_is_added_to_every_counter_set() -> None:
    text = render_nft_delta([A], [A, B])
    for kind in ("pkts_in", "pkts_out", "syn_in", "synack_out", "fin_in", "fin_out", "rst_in", "rst_out"):
        assert f"create element ip kube2ipvs {kind} {{ 192.0.2.2 . tcp . 443 }}" in text


def test_a_removed_service_leaves_the_class_map_first_then_its_slots_and_counters() -> None:
    assert lines(render_nft_delta([A, DNS], [A])) == [
        "delete element ip kube2ipvs class { 192.0.2.1 . udp . 53 }",
        "delete element ip kube2ipvs slots_1 { 192.0.2.1 . udp . 53 . 0 }",
        "delete element ip kube2ipvs pkts_in { 192.0.2.1 . udp . 53 }",
        "delete element ip kube2ipvs pkts_out { 192.0.2.1 . udp . 53 }",
    ]


def test_a_service_left_without_endpoints_is_removed() -> None:
    empty = replace(DNS, backends=(replace(DNS.backends[0], endpoints=()),))
    assert render_nft_delta([A, DNS], [A, empty]) == render_nft_delta([A, DNS], [A])


def test_several_removed_and_added_services_share_one_command_per_map() -> None:
    c = virtual_service("192.0.2.3", 80)
    d = virtual_service("192.0.2.4", 80)
    text = lines(render_nft_delta([A, c, d], [A, B]))
    assert "delete element ip kube2ipvs class { 192.0.2.3 . tcp . 80, 192.0.2.4 . tcp . 80 }" in text
    assert "create element ip kube2ipvs class { 192.0.2.2 . tcp . 443 : goto dnat_1 }" in text
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


def test_the_entries_delta_compares_only_the_keys_it_is_told_may_have_changed() -> None:
    old, new = entries_by_key(dnat_entries([A, DNS])), entries_by_key(dnat_entries([A1, DNS]))
    assert render_entries_delta(old, new) == render_nft_delta([A, DNS], [A1, DNS])
    assert render_entries_delta(old, new, changed=[("192.0.2.1", 53, "udp")]) == ""


def test_a_vip_mtu_change_replaces_its_mss_elements_and_keeps_the_rest_element_only() -> None:
    small = replace(A, mtu=1400)
    text = lines(render_nft_delta([A, DNS], [small, replace(DNS, mtu=1400)]))
    assert all(" element " in line for line in text)
    assert "create element ip kube2ipvs mss_clamp { 192.0.2.1 . 1361-65535 }" in text
    assert "create element ip kube2ipvs mss { 192.0.2.1 : 1360 }" in text
    back = lines(render_nft_delta([small, replace(DNS, mtu=1400)], [A, DNS]))
    assert back[0] == "delete element ip kube2ipvs mss_clamp { 192.0.2.1 . 1361-65535 }"
    assert back[1] == "delete element ip kube2ipvs mss { 192.0.2.1 }"


@settings(max_examples=200, deadline=None)
@given(clusters(), clusters(), st.booleans())
def test_with_the_entries_per_vip_the_delta_is_the_same_without_a_pass_over_every_entry(
        a: Cluster, b: Cluster, masquerade: bool) -> None:
    """The realserver keeps how many entries each VIP has; given those, the delta (MSS elements,
    the masquerade's VIP set) is computed from the changed entries alone, and must be the one a
    comparison of every entry gives."""
    exempt = ["10.0.0.0/8"] if masquerade else None
    before, after = normalize(*a), normalize(*b)
    for node in sorted({b.node for vs in (*before.services, *after.services) for b in vs.backends}):
        old = entries_by_key(dnat_entries(before.for_node(node)))
        new = entries_by_key(dnat_entries(after.for_node(node)))
        changed = [k for k in old.keys() | new.keys() if old.get(k) != new.get(k)]
        counts = Counter(e.vip for e in new.values())
        assert render_entries_delta(old, new, masquerade_exempt=exempt, changed=changed, vip_entries=counts) == \
            render_entries_delta(old, new, masquerade_exempt=exempt)


def test_with_the_entries_per_vip_mss_elements_follow_the_vips_not_the_changed_entries() -> None:
    """A VIP's MSS elements stay while an unchanged entry of it keeps its MTU; they go, come or
    change with the VIP's last entry, or with an MTU change (which changes all its entries)."""
    a, dns, b = (replace(vs, mtu=1400) for vs in (A, DNS, B))
    cases = [([a], [a, dns]), ([a, dns], [a]), ([a, dns], [b]), ([a], [replace(a, mtu=1280)]),
             ([a, dns], [replace(a, mtu=1280), replace(dns, mtu=1280)]), ([a, B], [a, b]), ([A1], [a])]
    for before, after in cases:
        old, new = entries_by_key(dnat_entries(before)), entries_by_key(dnat_entries(after))
        changed = [k for k in old.keys() | new.keys() if old.get(k) != new.get(k)]
        counts = Counter(e.vip for e in new.values())
        assert render_entries_delta(old, new, changed=changed, vip_entries=counts) == \
            render_nft_delta(before, after), (before, after)
