"""The realserver's planner: desired state from a node slice, and the ops that reach it."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kube2ipvs.model import ClusterState, PodEndpoint, VirtualService
from kube2ipvs.protocol import NodeSlice
from kube2ipvs.render.nft import render_nft
from kube2ipvs.render.nftdelta import render_entries_delta, render_nft_delta
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
    observed_after,
    plan,
    wrong_sysctls,
)
from tests.test_render_nft import virtual_service

SETTINGS = Settings(interface="eth0")


def node_slice(*services: tuple[str, int], node: str = "node-a") -> NodeSlice:
    vss = tuple(virtual_service(vip, port, endpoints=[("2001:db8:1::2" if ":" in vip else "10.1.1.2", 8080)])
                for vip, port in services)
    return NodeSlice(node=node, vips=tuple(dict.fromkeys(vs.vip for vs in vss)), services=vss)


def converged(desired: Desired, foreign: frozenset[str] = frozenset({"127.0.0.1"})) -> Observed:
    return Observed(ours=desired.vips, foreign=foreign, nft_digest=desired.nft_digest,
                    nft=expected_tables(desired.nft), sysctls=dict(desired.sysctls))


def test_a_slice_wants_its_vips_as_host_addresses_the_rendered_table_and_the_arp_sysctls() -> None:
    d = desired_state(node_slice(("192.0.2.10", 80), ("2001:db8::10", 80)), SETTINGS)
    assert d.vips == {"192.0.2.10", "2001:db8::10"}
    assert d.nft == render_nft(d.services)
    assert "192.0.2.10 . tcp . 80 . 0 : 10.1.1.2 . 8080" in d.nft
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
        ReplaceTable(d.nft_digest),
        AddAddress("192.0.2.10", 32), AddAddress("192.0.2.11", 32), AddAddress("2001:db8::10", 128),
    ]


def test_a_removed_service_deletes_only_its_vip_and_replaces_the_table() -> None:
    before = desired_state(node_slice(("192.0.2.10", 80), ("192.0.2.11", 80)), SETTINGS)
    after = desired_state(node_slice(("192.0.2.10", 80)), SETTINGS)
    assert plan(after, converged(before)) == [ReplaceTable(after.nft_digest), DeleteAddress("192.0.2.11", 32)]


def test_a_change_from_what_this_process_applied_goes_as_a_delta_of_the_changed_service_only() -> None:
    before = desired_state(node_slice(("192.0.2.10", 80), ("192.0.2.11", 80)), SETTINGS)
    changed = replace(virtual_service("192.0.2.11", 80), backends=(replace(
        virtual_service("192.0.2.11", 80).backends[0], endpoints=(PodEndpoint("10.1.1.3", 8080),)),))
    after = desired_state(NodeSlice("node-a", ("192.0.2.10", "192.0.2.11"),
                                    (virtual_service("192.0.2.10", 80), changed)), SETTINGS)
    [op] = plan(after, converged(before), applied=before)
    assert op == ReplaceTable(after.nft_digest, render_nft_delta(before.services, after.services))
    assert op.text == after.nft == render_nft(after.services)
    assert op.delta is not None
    assert "192.0.2.11 . tcp . 80 . 0 : 10.1.1.3 . 8080" in op.delta
    assert "192.0.2.10" not in op.delta


def test_a_kernel_that_no_longer_holds_what_was_applied_gets_the_whole_table() -> None:
    before = desired_state(node_slice(("192.0.2.10", 80)), SETTINGS)
    after = desired_state(node_slice(("192.0.2.10", 80), ("192.0.2.11", 80)), SETTINGS)
    drifted = replace(converged(before), nft=NftTables())
    assert plan(after, drifted, applied=before) == [ReplaceTable(after.nft_digest), AddAddress("192.0.2.11", 32)]
    restarted = replace(converged(before), nft_digest=None)
    assert plan(after, restarted, applied=before)[0] == ReplaceTable(after.nft_digest)


def test_a_second_port_on_a_held_vip_replaces_the_table_and_touches_no_address() -> None:
    before = desired_state(node_slice(("192.0.2.10", 80)), SETTINGS)
    after = desired_state(node_slice(("192.0.2.10", 80), ("192.0.2.10", 443)), SETTINGS)
    assert plan(after, converged(before)) == [ReplaceTable(after.nft_digest)]


def test_foreign_addresses_are_never_deleted_nor_taken_over() -> None:
    d = desired_state(node_slice(("192.0.2.10", 80)), SETTINGS)
    observed = converged(d, foreign=frozenset({"127.0.0.1", "192.0.2.99", "192.0.2.10"}))
    observed = replace(observed, ours=frozenset())
    assert plan(d, observed) == []
    assert cleanup_plan(observed) == [DeleteTables()]


def test_a_table_deleted_by_hand_is_replaced_although_the_text_is_unchanged() -> None:
    d = desired_state(node_slice(("192.0.2.10", 80)), SETTINGS)
    assert plan(d, replace(converged(d), nft=NftTables())) == [ReplaceTable(d.nft_digest)]


def test_a_chain_deleted_by_hand_is_replaced() -> None:
    d = desired_state(node_slice(("192.0.2.10", 80)), SETTINGS)
    tables = expected_tables(d.nft)
    damaged = replace(tables, chains=frozenset(c for c in tables.chains if c[1] != "dnat_1"))
    assert plan(d, replace(converged(d), nft=damaged), applied=d) == [ReplaceTable(d.nft_digest)]


def test_a_service_deleted_by_hand_from_the_class_map_is_replaced() -> None:
    d = desired_state(node_slice(("192.0.2.10", 80), ("192.0.2.11", 80)), SETTINGS)
    tables = expected_tables(d.nft)
    assert tables.services is not None
    assert tables.services == {("192.0.2.10", 80, "tcp"), ("192.0.2.11", 80, "tcp")}
    damaged = replace(tables, services=tables.services - {("192.0.2.11", 80, "tcp")})
    assert plan(d, replace(converged(d), nft=damaged), applied=d) == [ReplaceTable(d.nft_digest)]


@pytest.mark.parametrize("masquerade", [None, ("10.0.0.0/8",)])
def test_the_tables_expected_from_the_entries_are_those_the_text_makes(state: ClusterState,
                                                                      masquerade: tuple[str, ...] | None) -> None:
    big = virtual_service("192.0.2.12", 80)
    big = replace(big, backends=(replace(big.backends[0], endpoints=tuple(
        PodEndpoint(f"10.1.2.{i}", 80) for i in range(1, 71))),))
    services = (*state.for_node("node-a"), big)
    d = desired_state(NodeSlice("node-a", state.vips, services), replace(SETTINGS, masquerade_exempt=masquerade))
    assert d.nft_tables == expected_tables(d.nft)
    assert ("ip", "dnat_70") in d.nft_tables.chains


def test_the_kernel_after_the_ops_is_what_observing_it_again_would_show() -> None:
    before = desired_state(node_slice(("192.0.2.10", 80), ("192.0.2.11", 80)), SETTINGS)
    observed = replace(converged(before), sysctls={**converged(before).sysctls, ("lo", "arp_ignore"): 0})
    after = desired_state(node_slice(("192.0.2.10", 80), ("2001:db8::10", 80)), SETTINGS, before)
    ops = plan(after, observed, applied=before)
    assert observed_after(observed, ops, after) == replace(converged(after), nft=replace(after.nft_tables))


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
    assert plan(after, converged(before)) == [ReplaceTable(after.nft_digest), DeleteAddress("192.0.2.10", 32)]


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


# ---------------------------------------------------------------------------------------------
# Incremental desired state: built from the previous one, equal to a build from scratch


def test_an_unchanged_service_keeps_its_entry_object_and_a_changed_one_gets_a_new_one() -> None:
    first = node_slice(("192.0.2.10", 80), ("192.0.2.11", 80), ("2001:db8::10", 80))
    d1 = desired_state(first, SETTINGS)
    entries1 = dict(d1.entries)  # (d2 takes d1's entries over: read them first)
    moved = virtual_service("192.0.2.11", 80, endpoints=[("10.1.1.3", 8080)])
    second = NodeSlice("node-a", first.vips, (first.services[0], moved, first.services[2]))
    d2 = desired_state(second, SETTINGS, d1)
    assert d2.entries[("192.0.2.10", 80, "tcp")] is entries1[("192.0.2.10", 80, "tcp")]
    assert d2.entries[("2001:db8::10", 80, "tcp")] is entries1[("2001:db8::10", 80, "tcp")]
    assert d2.entries[("192.0.2.11", 80, "tcp")] is not entries1[("192.0.2.11", 80, "tcp")]
    scratch = desired_state(second, SETTINGS)
    assert (d2.nft_digest, d2.nft, d2.vips, d2.nft_tables) == (scratch.nft_digest, scratch.nft, scratch.vips,
                                                               scratch.nft_tables)


def test_the_text_is_not_rendered_until_asked_for() -> None:
    d = desired_state(node_slice(("192.0.2.10", 80)), SETTINGS)
    assert "nft" not in vars(d)  # cached_property: absent until the first read
    assert d.nft == render_nft(d.services)
    assert "nft" in vars(d)


def test_the_digest_tells_tables_apart_by_content_and_masquerade_setting_only() -> None:
    a = desired_state(node_slice(("192.0.2.10", 80), ("192.0.2.11", 80)), SETTINGS)
    b = desired_state(node_slice(("192.0.2.11", 80), ("192.0.2.10", 80)), SETTINGS)
    assert a.nft_digest == b.nft_digest  # order of the services does not matter
    assert desired_state(node_slice(("192.0.2.10", 80)), SETTINGS).nft_digest != a.nft_digest
    masq = desired_state(node_slice(("192.0.2.10", 80), ("192.0.2.11", 80)),
                         replace(SETTINGS, masquerade_exempt=("10.0.0.0/8",)))
    assert masq.nft_digest != a.nft_digest


_VIPS = ["192.0.2.10", "192.0.2.11", "2001:db8::10"]
_PODS = ["10.1.1.2", "10.1.1.3", "2001:db8:1::2", "2001:db8:1::3"]


@st.composite
def slices(draw: st.DrawFn) -> list[tuple[str, int, tuple[str, ...]]]:
    keys = draw(st.lists(st.tuples(st.sampled_from(_VIPS), st.sampled_from([80, 443])), unique=True, max_size=5))
    return [(vip, port, tuple(draw(st.lists(st.sampled_from(_PODS), unique=True, max_size=3))))
            for vip, port in keys]


@given(st.lists(slices(), min_size=1, max_size=6), st.booleans())
@settings(max_examples=150, deadline=None)
def test_incremental_builds_equal_builds_from_scratch(
    steps: list[list[tuple[str, int, tuple[str, ...]]]], masquerade: bool
) -> None:
    settings_ = replace(SETTINGS, masquerade_exempt=("10.0.0.0/8",) if masquerade else None)
    pool: dict[tuple[str, int, tuple[str, ...]], VirtualService] = {}  # the same object for the same service

    def service(vip: str, port: int, pods: tuple[str, ...]) -> VirtualService:
        return pool.setdefault((vip, port, pods), virtual_service(vip, port, endpoints=[(p, 8080) for p in pods]))

    previous = None
    for step in steps:
        services = tuple(service(*s) for s in step)
        node = NodeSlice("node-a", tuple(dict.fromkeys(vs.vip for vs in services)), services)
        before = dict(previous.entries) if previous is not None else None  # read first: `built` takes them over
        built = desired_state(node, settings_, previous)
        scratch = desired_state(node, settings_)
        assert built.entries == scratch.entries
        assert (built.nft_digest, built.vips, built.nft_tables) == (scratch.nft_digest, scratch.vips,
                                                                    scratch.nft_tables)
        assert built.nft == scratch.nft == render_nft(services, masquerade_exempt=settings_.masquerade_exempt)
        if previous is not None:  # and the delta from the previous one is the services' delta
            assert render_entries_delta(before or {}, built.entries,
                                        masquerade_exempt=settings_.masquerade_exempt) == render_nft_delta(
                previous.services, built.services, masquerade_exempt=settings_.masquerade_exempt)
        previous = built
