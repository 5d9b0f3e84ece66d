"""The realserver's planner: desired state from a node slice, and the ops that reach it."""

from __future__ import annotations

from dataclasses import replace

from kube2ipvs.model import PodEndpoint
from kube2ipvs.protocol import NodeSlice
from kube2ipvs.render.nftdelta import render_nft_delta
from kube2ipvs_realserver.kernel import FakeKernel
from kube2ipvs_realserver.plan import (
    AddAddress,
    DeleteAddress,
    DeleteTables,
    Desired,
    NftTables,
    Observed,
    ReplaceTable,
    SetSysctl,
    Settings,
    cleanup_plan,
    desired_state,
    expected_tables,
    plan,
    wrong_sysctls,
)
from tests.test_render_nft import virtual_service

SETTINGS = Settings(interface="eth0")


def node_slice(*services: tuple[str, int], node: str = "node-a") -> NodeSlice:
    vss = tuple(virtual_service(vip, port) for vip, port in services)
    return NodeSlice(node=node, vips=tuple(dict.fromkeys(vs.vip for vs in vss)), services=vss)


def converged(desired: Desired, foreign: frozenset[str] = frozenset({"127.0.0.1"})) -> Observed:
    return Observed(ours=desired.vips, foreign=foreign, nft_digest=desired.nft_digest,
                    nft=expected_tables(desired.nft), sysctls=dict(desired.sysctls))


def test_a_slice_wants_its_vips_as_host_addresses_the_rendered_table_and_the_arp_sysctls() -> None:
    d = desired_state(node_slice(("192.0.2.10", 80), ("2001:db8::10", 80)), SETTINGS)
    assert d.vips == {"192.0.2.10", "2001:db8::10"}
    assert "dnat ip to 10.1.1.2:8080" in d.nft
    assert d.sysctls == {("lo", "arp_ignore"): 1, ("lo", "arp_announce"): 2,
                         ("eth0", "arp_ignore"): 1, ("eth0", "arp_announce"): 2}


def test_the_sysctl_values_are_configurable() -> None:
    d = desired_state(node_slice(), Settings(arp_ignore=2, arp_announce=1))
    assert d.sysctls == {("lo", "arp_ignore"): 2, ("lo", "arp_announce"): 1}


def test_ipip_services_also_want_loose_reverse_path_filtering_on_the_tunnel_device() -> None:
    ipip = replace(virtual_service("192.0.2.10", 80), forwarding="i")
    d = desired_state(NodeSlice("node-a", ("192.0.2.10",), (ipip,)), SETTINGS)
    assert d.sysctls[("tunl0", "rp_filter")] == 2
    assert ("tunl0", "rp_filter") not in desired_state(node_slice(("192.0.2.10", 80)), SETTINGS).sysctls


def test_plan_of_a_converged_kernel_is_empty() -> None:
    d = desired_state(node_slice(("192.0.2.10", 80), ("192.0.2.11", 443)), SETTINGS)
    assert plan(d, converged(d)) == []


def test_an_empty_kernel_gets_sysctls_first_then_the_table_then_the_addresses() -> None:
    d = desired_state(node_slice(("192.0.2.11", 80), ("192.0.2.10", 80), ("2001:db8::10", 80)), SETTINGS)
    empty = Observed(ours=frozenset(), foreign=frozenset(), nft_digest=None,
                     sysctls=dict.fromkeys(d.sysctls, 0))
    assert plan(d, empty) == [
        SetSysctl(("eth0", "arp_announce"), 2), SetSysctl(("eth0", "arp_ignore"), 1),
        SetSysctl(("lo", "arp_announce"), 2), SetSysctl(("lo", "arp_ignore"), 1),
        ReplaceTable(d.nft),
        AddAddress("192.0.2.10", 32), AddAddress("192.0.2.11", 32), AddAddress("2001:db8::10", 128),
    ]


def test_a_removed_service_deletes_only_its_vip_and_replaces_the_table() -> None:
    before = desired_state(node_slice(("192.0.2.10", 80), ("192.0.2.11", 80)), SETTINGS)
    after = desired_state(node_slice(("192.0.2.10", 80)), SETTINGS)
    assert plan(after, converged(before)) == [ReplaceTable(after.nft), DeleteAddress("192.0.2.11", 32)]


def test_a_change_from_what_this_process_applied_goes_as_a_delta_of_the_changed_service_only() -> None:
    before = desired_state(node_slice(("192.0.2.10", 80), ("192.0.2.11", 80)), SETTINGS)
    changed = replace(virtual_service("192.0.2.11", 80), backends=(replace(
        virtual_service("192.0.2.11", 80).backends[0], endpoints=(PodEndpoint("10.1.1.3", 8080),)),))
    after = desired_state(NodeSlice("node-a", ("192.0.2.10", "192.0.2.11"),
                                    (virtual_service("192.0.2.10", 80), changed)), SETTINGS)
    [op] = plan(after, converged(before), applied=before)
    assert op == ReplaceTable(after.nft, render_nft_delta(before.services, after.services))
    assert op.delta is not None
    assert "svc_192.0.2.11_80_tcp" in op.delta
    assert "192.0.2.10" not in op.delta


def test_a_kernel_that_no_longer_holds_what_was_applied_gets_the_whole_table() -> None:
    before = desired_state(node_slice(("192.0.2.10", 80)), SETTINGS)
    after = desired_state(node_slice(("192.0.2.10", 80), ("192.0.2.11", 80)), SETTINGS)
    drifted = replace(converged(before), nft=NftTables())
    assert plan(after, drifted, applied=before) == [ReplaceTable(after.nft), AddAddress("192.0.2.11", 32)]
    restarted = replace(converged(before), nft_digest=None)
    assert plan(after, restarted, applied=before)[0] == ReplaceTable(after.nft)


def test_a_second_port_on_a_held_vip_replaces_the_table_and_touches_no_address() -> None:
    before = desired_state(node_slice(("192.0.2.10", 80)), SETTINGS)
    after = desired_state(node_slice(("192.0.2.10", 80), ("192.0.2.10", 443)), SETTINGS)
    assert plan(after, converged(before)) == [ReplaceTable(after.nft)]


def test_foreign_addresses_are_never_deleted_nor_taken_over() -> None:
    d = desired_state(node_slice(("192.0.2.10", 80)), SETTINGS)
    observed = converged(d, foreign=frozenset({"127.0.0.1", "192.0.2.99", "192.0.2.10"}))
    observed = replace(observed, ours=frozenset())
    assert plan(d, observed) == []
    assert cleanup_plan(observed) == [DeleteTables()]


def test_a_table_deleted_by_hand_is_replaced_although_the_text_is_unchanged() -> None:
    d = desired_state(node_slice(("192.0.2.10", 80)), SETTINGS)
    assert plan(d, replace(converged(d), nft=NftTables())) == [ReplaceTable(d.nft)]


def test_a_service_chain_deleted_by_hand_is_replaced() -> None:
    d = desired_state(node_slice(("192.0.2.10", 80)), SETTINGS)
    tables = expected_tables(d.nft)
    damaged = NftTables(tables.tables, frozenset(c for c in tables.chains if not c[1].startswith("svc_")))
    assert plan(d, replace(converged(d), nft=damaged)) == [ReplaceTable(d.nft)]


def test_a_sysctl_changed_by_hand_is_set_back_and_reported_until_then() -> None:
    d = desired_state(node_slice(("192.0.2.10", 80)), SETTINGS)
    observed = converged(d)
    observed = replace(observed, sysctls={**observed.sysctls, ("eth0", "arp_ignore"): 0})
    assert plan(d, observed) == [SetSysctl(("eth0", "arp_ignore"), 1)]
    assert wrong_sysctls(d, observed) == {"eth0/arp_ignore": "want 1, have 0"}


def test_a_missing_interface_is_reported_not_written() -> None:
    d = desired_state(node_slice(), SETTINGS)
    observed = replace(converged(d), sysctls={**d.sysctls, ("eth0", "arp_ignore"): None})
    assert plan(d, observed) == []
    assert wrong_sysctls(d, observed) == {"eth0/arp_ignore": "want 1, have None"}


def test_an_empty_slice_removes_our_vips_and_empties_the_tables() -> None:
    before = desired_state(node_slice(("192.0.2.10", 80)), SETTINGS)
    after = desired_state(node_slice(), SETTINGS)
    assert after.vips == frozenset()
    assert expected_tables(after.nft) == NftTables()  # empty tables: no chains
    assert plan(after, converged(before)) == [ReplaceTable(after.nft), DeleteAddress("192.0.2.10", 32)]


def test_a_vip_of_the_wrong_family_is_skipped_with_a_reason_and_the_rest_applies() -> None:
    good = virtual_service("192.0.2.10", 80)
    bad = replace(virtual_service("192.0.2.11", 80), family=6)
    d = desired_state(NodeSlice("node-a", ("192.0.2.10", "192.0.2.11"), (good, bad)), SETTINGS)
    assert d.vips == {"192.0.2.10"}
    assert d.skipped == ("192.0.2.11:80/tcp: VIP is not an IPv6 address",)
    assert "192.0.2.11" not in d.nft


def test_applying_the_plan_to_the_fake_converges_and_a_second_plan_is_empty() -> None:
    kernel = FakeKernel(foreign={"127.0.0.1", "192.0.2.99"})
    for services in ([("192.0.2.10", 80), ("2001:db8::10", 80)], [("192.0.2.11", 80)], []):
        d = desired_state(node_slice(*services), SETTINGS)
        for op in plan(d, kernel.observe(d.sysctls)):
            kernel.apply(op)
        assert kernel.ours == set(d.vips)
        assert plan(d, kernel.observe(d.sysctls)) == []
    assert kernel.foreign == {"127.0.0.1", "192.0.2.99"}
