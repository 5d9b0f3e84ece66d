"""The director's VIP addresses: `plan_vips` adds what is missing, deletes only ours, never
touches a foreign address, and converges in one step; `FakeHost` is strict where the kernel is.
(The real device and addresses are tested in the VM: tests/vm/test_director_host_vm.py.)"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kube2ipvs.vipaddrs import canonical, host_prefixlen, label_for
from kube2ipvs_director.host import (
    AddVip,
    DeleteVip,
    FakeHost,
    HostError,
    ObservedVips,
    VipApplyError,
    applied,
    plan_vips,
)

V1, V2, V6 = "192.0.2.10", "192.0.2.11", "2001:db8::10"


def test_a_missing_vip_is_added_and_an_unwanted_one_of_ours_is_deleted() -> None:
    ops = plan_vips(frozenset({V1, V6}), ours=frozenset({V2}), foreign=frozenset())
    assert ops == (AddVip(V1), AddVip(V6), DeleteVip(V2))


def test_adds_come_before_deletes_and_ipv4_before_ipv6() -> None:
    ops = plan_vips(frozenset({V6, "192.0.2.9", V1}), ours=frozenset({"192.0.2.1", "2001:db8::1"}),
                    foreign=frozenset())
    assert ops == (AddVip("192.0.2.9"), AddVip(V1), AddVip(V6), DeleteVip("192.0.2.1"), DeleteVip("2001:db8::1"))


def test_a_foreign_address_equal_to_a_wanted_vip_is_neither_added_nor_deleted() -> None:
    assert plan_vips(frozenset({V1}), ours=frozenset(), foreign=frozenset({V1, "127.0.0.1"})) == ()
    assert plan_vips(frozenset(), ours=frozenset(), foreign=frozenset({V1, "127.0.0.1"})) == ()


def test_what_is_already_there_needs_no_op() -> None:
    assert plan_vips(frozenset({V1, V6}), ours=frozenset({V1, V6}), foreign=frozenset({"::1"})) == ()


def test_a_desired_vip_is_compared_in_its_canonical_spelling() -> None:
    assert plan_vips(["2001:DB8:0::10"], ours=frozenset({V6}), foreign=frozenset()) == ()
    assert plan_vips(["2001:DB8:0::11"], ours=frozenset(), foreign=frozenset()) == (AddVip("2001:db8::11"),)


def test_a_desired_vip_that_is_not_an_address_is_skipped_and_the_others_are_still_planned() -> None:
    assert plan_vips(["not-an-ip", V1], ours=frozenset(), foreign=frozenset()) == (AddVip(V1),)


def test_ops_carry_host_prefix_lengths() -> None:
    assert (AddVip(V1).prefixlen, DeleteVip(V6).prefixlen) == (32, 128)
    assert (host_prefixlen(V1), host_prefixlen(V6)) == (32, 128)


def test_addresses_are_canonicalised_like_the_kernel_prints_them() -> None:
    assert canonical("2001:DB8:0:0::10") == V6
    assert canonical("fe80::1%kube2ipvs0") == "fe80::1"
    with pytest.raises(ValueError, match="does not appear"):
        canonical("192.0.2")


def test_the_label_of_our_ipv4_addresses_fits_the_kernel_or_is_left_out() -> None:
    assert label_for("kube2ipvs0") == "kube2ipvs0:k2i"
    assert label_for("averylongname") is None


addresses = st.one_of(
    st.integers(0, 15).map(lambda i: f"192.0.2.{i}"),
    st.integers(0, 15).map(lambda i: canonical(f"2001:db8::{i:x}")),
)
address_sets = st.frozensets(addresses, max_size=8)


@given(address_sets, address_sets, address_sets)
def test_one_plan_converges_and_never_touches_a_foreign_address(
        desired: frozenset[str], ours: frozenset[str], foreign: frozenset[str]) -> None:
    foreign = foreign - ours  # the kernel reports an address once, ours or not
    ops = plan_vips(desired, ours, foreign)
    assert not {op.address for op in ops} & foreign
    after = applied(ObservedVips(ours, foreign), ops)
    assert after.ours == desired - foreign
    assert after.ours | after.foreign >= desired
    assert plan_vips(desired, after.ours, after.foreign) == ()


@given(address_sets, address_sets, address_sets)
def test_the_strict_fake_accepts_every_plan(desired: frozenset[str], ours: frozenset[str],
                                            foreign: frozenset[str]) -> None:
    host = FakeHost(exists=True, ours=set(ours), foreign=set(foreign - ours))
    host.apply(plan_vips(desired, *host.vip_addresses()))
    assert host.vip_addresses()[0] | host.vip_addresses()[1] >= desired


def test_the_fake_has_no_addresses_until_an_add_creates_its_device() -> None:
    host = FakeHost()
    assert host.observe() == ObservedVips()
    assert not host.exists
    host.add_vip(V1)
    assert host.exists
    assert host.vip_addresses() == (frozenset({V1}), frozenset())


def test_the_fake_refuses_to_add_a_foreign_address_and_asserts_on_deleting_one() -> None:
    host = FakeHost(exists=True, foreign={V1})
    with pytest.raises(VipApplyError, match="not ours") as refused:
        host.apply([AddVip(V2), AddVip(V1)])
    assert (refused.value.index, refused.value.op) == (1, AddVip(V1))
    assert host.ours == {V2}  # the ops before the refused one are in
    with pytest.raises(AssertionError, match="foreign"):
        host.delete_vip(V1)


def test_the_fake_refuses_a_non_canonical_address_and_injected_failures() -> None:
    host = FakeHost(exists=True)
    with pytest.raises(VipApplyError, match="canonical"):
        host.add_vip("2001:DB8::10")
    host.fail_at = 0
    with pytest.raises(VipApplyError, match="injected"):
        host.add_vip(V1)
    host.add_vip(V1)
    assert host.ours == {V1}


def test_the_fake_sets_only_sysctls_the_kernel_has() -> None:
    host = FakeHost()
    host.set_vs_sysctl("sloppy_tcp", 1)
    assert host.vs_sysctls()["sloppy_tcp"] == 1
    with pytest.raises(HostError, match="no such sysctl"):
        host.set_vs_sysctl("no_such_thing", 1)
