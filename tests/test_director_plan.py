"""The director's IPVS planner: edits in place, new real servers first, graceful drains, and
nothing touched outside the configured VIPs. `FakeIpvs` is the simulator the ops run on."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kube2ipvs.ipvs import IpvsDest, IpvsService, desired_ipvs
from kube2ipvs.lbconfig import Forwarding
from kube2ipvs_director.kernel import ApplyError, FakeIpvs, sched_flag_bits, sched_flag_word
from kube2ipvs_director.plan import (
    AddDest,
    AddService,
    DelDest,
    DelService,
    EditDest,
    EditService,
    Observed,
    ObservedDest,
    ObservedService,
    Op,
    Plan,
    ServiceId,
    cleanup_plan,
    plan,
)
from tests.conftest import Golden, realistic_state

VIP = "192.0.2.10"
OWNED = frozenset({"192.0.2.10", "192.0.2.11", "2001:db8::10"})
FOREIGN = ObservedService(ServiceId("10.96.0.1", 4, 443, "tcp"), "rr",
                          dests=(ObservedDest("10.0.0.5", 6443, "m", 1, active=4),))
TIMEOUT = 300.0


def dest(address: str, weight: int = 1, *, port: int = 80, forwarding: Forwarding = "g",
         upper: int = 0, lower: int = 0) -> IpvsDest:
    return IpvsDest(address, port, forwarding, weight, upper, lower)


def svc(*dests: IpvsDest, vip: str = VIP, port: int = 80, protocol: str = "tcp", scheduler: str = "wrr",
        flags: tuple[int, ...] = ()) -> IpvsService:
    assert protocol in ("tcp", "udp")
    return IpvsService(vip, 6 if ":" in vip else 4, port, "tcp" if protocol == "tcp" else "udp", scheduler, flags,
                       tuple(dests))


def sid(vip: str = VIP, port: int = 80) -> ServiceId:
    return ServiceId(vip, 6 if ":" in vip else 4, port, "tcp")


def run(desired: Iterable[IpvsService], fake: FakeIpvs, *, now: float = 0.0,
        draining: Plan | None = None) -> Plan:
    """Plan against the fake's state and apply it there, like one pass of the director's loop."""
    p = plan(desired, fake.observe(), owned_vips=OWNED, draining=draining.draining if draining else None,
             now=now, drain_timeout=TIMEOUT)
    fake.apply(p.ops)
    return p


def converged(desired: Sequence[IpvsService], *extra: ObservedService) -> FakeIpvs:
    fake = FakeIpvs.holding(Observed(extra))
    run(desired, fake)
    return fake


def plan_for(desired: Iterable[IpvsService], fake: FakeIpvs, *, now: float = 0.0,
             previous: Plan | None = None) -> Plan:
    return plan(desired, fake.observe(), owned_vips=OWNED, draining=previous.draining if previous else None,
                now=now, drain_timeout=TIMEOUT)


WEB = svc(dest("198.51.100.1", 3), dest("198.51.100.2", 1))


# -- examples ---------------------------------------------------------------------------------

def test_an_empty_kernel_gets_each_service_before_its_real_servers() -> None:
    other = svc(dest("198.51.100.1", 2, port=53), vip="192.0.2.11", port=53, protocol="udp", scheduler="mh",
                flags=(2, 1))
    p = plan([other, WEB], Observed(), owned_vips=OWNED)
    web, dns = sid(), ServiceId("192.0.2.11", 4, 53, "udp")
    assert p.ops == (
        AddService(web, "wrr", ()),
        AddDest(web, "198.51.100.1", 80, "g", 3, 0, 0),
        AddDest(web, "198.51.100.2", 80, "g", 1, 0, 0),
        AddService(dns, "mh", (1, 2)),
        AddDest(dns, "198.51.100.1", 53, "g", 2, 0, 0),
    )
    assert p.draining == {}
    assert p.wake_at is None


def test_a_converged_kernel_needs_no_ops() -> None:
    fake = converged([WEB])
    assert plan_for([WEB], fake).ops == ()


def test_the_realistic_cluster_converges_from_an_empty_kernel_and_then_needs_nothing() -> None:
    desired = desired_ipvs(realistic_state(), "bgp")
    owned = {s.vip for s in desired}
    fake = FakeIpvs()
    first = plan(desired, fake.observe(), owned_vips=owned)
    fake.apply(first.ops)
    assert len(first.ops) == len(desired) + sum(len(s.dests) for s in desired)
    assert plan(desired, fake.observe(), owned_vips=owned).ops == ()


def test_one_more_endpoint_on_one_node_is_one_weight_set() -> None:
    fake = converged([WEB])
    more = svc(dest("198.51.100.1", 4), dest("198.51.100.2", 1))
    assert plan_for([more], fake).ops == (EditDest(sid(), "198.51.100.1", 80, "g", 4, 0, 0),)


@pytest.mark.parametrize(("changed", "op"), [
    (svc(dest("198.51.100.1", 3, upper=750, lower=75), dest("198.51.100.2", 1)),
     EditDest(sid(), "198.51.100.1", 80, "g", 3, 750, 75)),
    (svc(dest("198.51.100.1", 3, forwarding="i"), dest("198.51.100.2", 1)),
     EditDest(sid(), "198.51.100.1", 80, "i", 3, 0, 0)),
    (svc(dest("198.51.100.1", 3), dest("198.51.100.2", 1), scheduler="mh", flags=(1, 2)),
     EditService(sid(), "mh", (1, 2))),
    (svc(dest("198.51.100.1", 3), dest("198.51.100.2", 1), flags=(3,)), EditService(sid(), "wrr", (3,))),
], ids=["thresholds", "forwarding", "scheduler", "flags"])
def test_an_attribute_change_is_one_set_in_place(changed: IpvsService, op: Op) -> None:
    fake = converged([WEB])
    assert plan_for([changed], fake).ops == (op,)


def test_someone_elses_persistence_on_our_service_is_switched_off_with_one_set() -> None:
    fake = converged([WEB])
    fake.services[sid()] = replace(fake.services[sid()], persistent=True, timeout=300)
    assert plan_for([WEB], fake).ops == (EditService(sid(), "wrr", ()),)


def test_a_moved_endpoint_adds_the_new_node_before_the_old_one_stops_taking_connections() -> None:
    fake = converged([svc(dest("198.51.100.1", 1))])
    p = plan_for([svc(dest("198.51.100.2", 1))], fake, now=50.0)
    assert p.ops == (
        AddDest(sid(), "198.51.100.2", 80, "g", 1, 0, 0),
        EditDest(sid(), "198.51.100.1", 80, "g", 0, 0, 0),
    )
    assert p.draining == {(sid(), "198.51.100.1", 80): 50.0}
    assert p.wake_at == 50.0 + TIMEOUT


def test_a_drained_node_stays_at_weight_0_while_it_has_connections_and_goes_when_they_end() -> None:
    fake = converged([WEB])
    gone = [svc(dest("198.51.100.1", 3))]
    p = run(gone, fake, now=100.0)
    assert p.ops == (EditDest(sid(), "198.51.100.2", 80, "g", 0, 0, 0),)
    fake.connect(sid(), "198.51.100.2", 80, active=2, inactive=5)
    p = run(gone, fake, now=200.0, draining=p)
    assert p.ops == ()
    assert p.draining == {(sid(), "198.51.100.2", 80): 100.0}  # the drain keeps its start
    fake.connect(sid(), "198.51.100.2", 80, active=0, inactive=5)
    p = run(gone, fake, now=210.0, draining=p)
    assert p.ops == (DelDest(sid(), "198.51.100.2", 80),)
    assert p.draining == {}
    assert plan_for(gone, fake, now=220.0).ops == ()


def test_a_drained_node_is_removed_at_the_timeout_even_with_connections_left() -> None:
    fake = converged([WEB])
    gone = [svc(dest("198.51.100.1", 3))]
    p = run(gone, fake, now=0.0)
    fake.connect(sid(), "198.51.100.2", 80, active=7)
    p = run(gone, fake, now=TIMEOUT - 1, draining=p)
    assert p.ops == ()
    assert p.wake_at == TIMEOUT
    assert run(gone, fake, now=TIMEOUT, draining=p).ops == (DelDest(sid(), "198.51.100.2", 80),)


def test_a_draining_node_that_gets_endpoints_again_gets_its_weight_back_in_one_set() -> None:
    fake = converged([WEB])
    p = run([svc(dest("198.51.100.1", 3))], fake, now=0.0)
    fake.connect(sid(), "198.51.100.2", 80, active=1)
    back = run([WEB], fake, now=10.0, draining=p)
    assert back.ops == (EditDest(sid(), "198.51.100.2", 80, "g", 1, 0, 0),)
    assert back.draining == {}
    assert back.wake_at is None


def test_after_a_restart_a_node_found_at_weight_0_and_not_wanted_starts_draining_then() -> None:
    fake = converged([WEB])
    run([svc(dest("198.51.100.1", 3))], fake, now=0.0)
    fake.connect(sid(), "198.51.100.2", 80, active=1)
    p = plan_for([svc(dest("198.51.100.1", 3))], fake, now=1000.0)  # no draining state kept
    assert p.ops == ()
    assert p.draining == {(sid(), "198.51.100.2", 80): 1000.0}


def test_a_service_no_longer_wanted_drains_its_nodes_and_goes_with_its_last_one() -> None:
    fake = converged([WEB])
    p = run([], fake, now=0.0)
    assert p.ops == (EditDest(sid(), "198.51.100.1", 80, "g", 0, 0, 0),
                     EditDest(sid(), "198.51.100.2", 80, "g", 0, 0, 0))
    fake.connect(sid(), "198.51.100.1", 80, active=1)
    p = run([], fake, now=5.0, draining=p)
    assert p.ops == (DelDest(sid(), "198.51.100.2", 80),)  # the service still carries a connection
    fake.connect(sid(), "198.51.100.1", 80, active=0)
    p = run([], fake, now=6.0, draining=p)
    assert p.ops == (DelDest(sid(), "198.51.100.1", 80), DelService(sid()))
    assert fake.observe() == Observed()


def test_an_owned_service_without_real_servers_and_not_wanted_is_deleted_at_once() -> None:
    empty = ObservedService(sid(), "wrr")
    assert plan([], Observed((empty,)), owned_vips=OWNED).ops == (DelService(sid()),)


def test_services_outside_the_configured_vips_are_never_touched() -> None:
    kube_proxy = FOREIGN
    operator = ObservedService(sid("192.0.2.99"), "wlc", persistent=True, timeout=60,
                               dests=(ObservedDest("198.51.100.7", 80, "g", 0),))
    fake = converged([WEB], kube_proxy, operator)
    assert fake.services[kube_proxy.id] == kube_proxy
    assert fake.services[operator.id] == operator
    assert plan_for([], fake).ops == (EditDest(sid(), "198.51.100.1", 80, "g", 0, 0, 0),
                                      EditDest(sid(), "198.51.100.2", 80, "g", 0, 0, 0))


def test_a_desired_service_on_a_vip_that_is_not_configured_is_skipped_with_the_reason() -> None:
    p = plan([svc(dest("198.51.100.1"), vip="192.0.2.99")], Observed((FOREIGN,)), owned_vips=OWNED)
    assert p.ops == ()
    assert p.skipped == ("tcp/192.0.2.99:80: VIP is not a configured VIP",)


def test_a_service_listed_twice_is_planned_once() -> None:
    p = plan([WEB, svc(dest("198.51.100.9"))], Observed(), owned_vips=OWNED)
    assert [op for op in p.ops if isinstance(op, AddDest)] == [
        AddDest(sid(), "198.51.100.1", 80, "g", 3, 0, 0), AddDest(sid(), "198.51.100.2", 80, "g", 1, 0, 0)]
    assert p.skipped == ("tcp/192.0.2.10:80: listed twice; the first one is used",)


def test_ipv6_addresses_are_compared_in_canonical_form() -> None:
    long_form = svc(dest("2001:db8:0:0::a", port=443), vip="2001:DB8::10", port=443)
    fake = converged([long_form])
    v6 = sid("2001:db8::10", 443)
    assert fake.services[v6].dests[0].address == "2001:db8::a"
    assert plan_for([long_form], fake).ops == ()


def test_cleanup_deletes_every_owned_service_and_nothing_else() -> None:
    fake = converged([WEB, svc(dest("198.51.100.1"), vip="192.0.2.11")], FOREIGN)
    assert cleanup_plan(fake.observe(), owned_vips=OWNED) == (DelService(sid()), DelService(sid("192.0.2.11")))


def test_the_fake_stops_at_the_first_refused_op_and_says_which() -> None:
    fake = FakeIpvs()
    ops: list[Op] = [AddService(sid(), "wrr", ()), AddDest(sid(), "198.51.100.1", 80, "g", 1, 0, 0),
           AddService(sid(), "wrr", ()), AddDest(sid(), "198.51.100.2", 80, "g", 1, 0, 0)]
    with pytest.raises(ApplyError) as caught:
        fake.apply(ops)
    assert caught.value.index == 2
    assert caught.value.op == ops[2]
    assert [d.address for d in fake.services[sid()].dests] == ["198.51.100.1"]


def test_the_fake_refuses_an_unknown_scheduler_like_the_kernel() -> None:
    with pytest.raises(ApplyError, match="no scheduler"):
        FakeIpvs().apply([AddService(sid(), "nonsense", ())])


def test_scheduler_flag_bits_are_the_kernels_sched1_to_sched3_service_flags() -> None:
    assert sched_flag_word((1, 2)) == 0x08 | 0x10
    assert sched_flag_word((3,)) == 0x20
    assert sched_flag_bits(0x08 | 0x10 | 0x02 | 0x01) == (1, 2)  # hashed and persistent are not scheduler flags


def test_wake_at_is_the_earliest_drain_deadline() -> None:
    fake = converged([WEB, svc(dest("198.51.100.3"), vip="192.0.2.11")])
    first = run([svc(dest("198.51.100.2")), svc(dest("198.51.100.3"), vip="192.0.2.11")], fake, now=10.0)
    fake.connect(sid(), "198.51.100.1", 80, active=1)
    second = run([svc(dest("198.51.100.2"))], fake, now=20.0, draining=first)
    assert second.draining == {(sid(), "198.51.100.1", 80): 10.0, (sid("192.0.2.11"), "198.51.100.3", 80): 20.0}
    assert second.wake_at == 10.0 + TIMEOUT


# -- properties -------------------------------------------------------------------------------

NODES = ("198.51.100.1", "198.51.100.2", "198.51.100.3", "198.51.100.4")
SCHEDULERS = ("wrr", "rr", "mh", "sh")
ALL_VIPS = (*sorted(OWNED - {"2001:db8::10"}), "192.0.2.99", "10.96.0.1")  # the last two: not ours


@st.composite
def desired_sets(draw: st.DrawFn) -> list[IpvsService]:
    keys = draw(st.lists(st.tuples(st.sampled_from(sorted(OWNED - {"2001:db8::10"})), st.sampled_from((80, 443)),
                                   st.sampled_from(("tcp", "udp"))), unique=True, max_size=4))
    services = []
    for vip, port, protocol in keys:
        nodes = draw(st.lists(st.sampled_from(NODES), unique=True, min_size=1, max_size=3))
        dests = [dest(n, draw(st.integers(1, 5)), port=port, forwarding=draw(st.sampled_from(("g", "i"))),
                      upper=draw(st.sampled_from((0, 100))), lower=draw(st.sampled_from((0, 10))))
                 for n in sorted(nodes)]
        services.append(svc(*dests, vip=vip, port=port, protocol=protocol, scheduler=draw(st.sampled_from(SCHEDULERS)),
                            flags=tuple(sorted(draw(st.sets(st.sampled_from((1, 2, 3)), max_size=2))))))
    return services


@st.composite
def kernels(draw: st.DrawFn) -> Observed:
    """Whatever the kernel may hold: our services in any shape, others' services, open connections."""
    keys = draw(st.lists(st.tuples(st.sampled_from(ALL_VIPS), st.sampled_from((80, 443)),
                                   st.sampled_from(("tcp", "udp"))), unique=True, max_size=5))
    services = []
    for vip, port, protocol in keys:
        nodes = draw(st.lists(st.sampled_from(NODES), unique=True, max_size=3))
        dests = tuple(ObservedDest(n, draw(st.sampled_from((port, 8080))), draw(st.sampled_from(("g", "i", "m"))),
                                   draw(st.integers(0, 5)), draw(st.sampled_from((0, 100))), 0,
                                   active=draw(st.integers(0, 2)), inactive=draw(st.integers(0, 2)))
                      for n in sorted(nodes))
        services.append(ObservedService(ServiceId(vip, 4, port, "tcp" if protocol == "tcp" else "udp"),
                                        draw(st.sampled_from(SCHEDULERS)), persistent=draw(st.booleans()),
                                        dests=dests))
    return Observed(tuple(services))


def owned_view(services: Iterable[ObservedService]) -> dict[ServiceId, tuple[str, tuple[int, ...], frozenset[object]]]:
    return {s.id: (s.scheduler, s.flags, frozenset((d.address, d.port, d.forwarding, d.weight, d.u_threshold,
                                                     d.l_threshold) for d in s.dests))
            for s in services if s.id.vip in OWNED}


def desired_view(desired: Iterable[IpvsService]) -> dict[ServiceId, tuple[str, tuple[int, ...], frozenset[object]]]:
    return {ServiceId(s.vip, s.family, s.port, s.protocol): (
        s.scheduler, tuple(sorted(s.flags)),
        frozenset((d.address, d.port, d.forwarding, d.weight, d.u_threshold, d.l_threshold) for d in s.dests))
        for s in desired}


def without_draining(fake: FakeIpvs, p: Plan) -> list[ObservedService]:
    """The fake's services minus the real servers the plan left draining (and services kept only by them)."""
    kept = []
    for s in fake.observe().services:
        dests = tuple(d for d in s.dests if (s.id, d.address, d.port) not in p.draining)
        if dests or len(dests) == len(s.dests):
            kept.append(replace(s, dests=dests))
    return kept


@settings(max_examples=150, deadline=None)
@given(desired_sets(), kernels())
def test_applying_a_plan_reaches_the_desired_state_apart_from_draining_nodes_and_then_settles(
        desired: list[IpvsService], observed: Observed) -> None:
    fake = FakeIpvs.holding(observed)
    foreign = {s.id: s for s in observed.services if s.id.vip not in OWNED}
    first = run(desired, fake, now=10.0)  # the strict fake raises on any invalid op
    assert owned_view(without_draining(fake, first)) == desired_view(desired)
    assert all(d.weight == 0 for s in fake.observe().services for d in s.dests
               if (s.id, d.address, d.port) in first.draining)
    assert {s.id: s for s in fake.observe().services if s.id.vip not in OWNED} == foreign
    # What is left is removing drained nodes: those without active connections go next time.
    second = run(desired, fake, now=10.0, draining=first)
    assert all(isinstance(op, DelDest | DelService) for op in second.ops)
    assert plan_for(desired, fake, now=10.0, previous=second).ops == ()
    assert {s.id: s for s in fake.observe().services if s.id.vip not in OWNED} == foreign


@settings(max_examples=100, deadline=None)
@given(desired_sets(), kernels())
def test_each_service_comes_before_its_real_servers_and_goes_after_them(
        desired: list[IpvsService], observed: Observed) -> None:
    p = plan(desired, observed, owned_vips=OWNED)
    for i, op in enumerate(p.ops):
        later = p.ops[i + 1:]
        earlier = p.ops[:i]
        if isinstance(op, AddService):
            assert not any(isinstance(o, AddDest | EditDest | DelDest) and o.service == op.service for o in earlier)
        if isinstance(op, DelService):
            assert not any(o.service == op.service for o in later)
        if isinstance(op, AddDest):
            # new real servers of a service come before any of its old ones stops or leaves
            assert not any(isinstance(o, DelDest) or (isinstance(o, EditDest) and o.weight == 0)
                           for o in earlier if o.service == op.service)
    assert not any(op.service.vip not in OWNED for op in p.ops)


@settings(max_examples=100, deadline=None)
@given(desired_sets().filter(bool), st.data())
def test_one_weight_change_is_exactly_one_set(desired: list[IpvsService], data: st.DataObject) -> None:
    fake = converged(desired)
    i = data.draw(st.integers(0, len(desired) - 1))
    j = data.draw(st.integers(0, len(desired[i].dests) - 1))
    old = desired[i].dests[j]
    new_weight = data.draw(st.integers(1, 9).filter(lambda w: w != old.weight))
    changed = [*desired]
    changed[i] = replace(desired[i], dests=tuple(replace(d, weight=new_weight) if k == j else d
                                                 for k, d in enumerate(desired[i].dests)))
    sid_ = ServiceId(desired[i].vip, desired[i].family, desired[i].port, desired[i].protocol)
    assert plan_for(changed, fake).ops == (
        EditDest(sid_, old.address, old.port, old.forwarding, new_weight, old.u_threshold, old.l_threshold),)


@settings(max_examples=60, deadline=None)
@given(desired_sets().filter(bool), st.floats(0, TIMEOUT * 2), st.integers(0, 3))
def test_a_removed_node_is_deleted_exactly_when_idle_or_timed_out(
        desired: list[IpvsService], elapsed: float, active: int) -> None:
    target = desired[0]
    fake = converged(desired)
    node = target.dests[0]
    smaller = [replace(target, dests=target.dests[1:]), *desired[1:]]
    start = run(smaller, fake, now=1000.0)
    sid_ = ServiceId(target.vip, target.family, target.port, target.protocol)
    fake.connect(sid_, node.address, node.port, active=active)
    p = run(smaller, fake, now=1000.0 + elapsed, draining=start)
    gone = active == 0 or elapsed >= TIMEOUT
    assert (DelDest(sid_, node.address, node.port) in p.ops) is gone
    assert ((sid_, node.address, node.port) in p.draining) is not gone


# ---------------------------------------------------------------------------------------------
# Golden: the realistic fixture's plans, as text a reviewer reads


def _op_text(op: Op) -> str:
    fields = ", ".join(f"{f.name}={getattr(op, f.name)}" for f in dataclasses.fields(op) if f.name != "service")
    return f"{type(op).__name__} {op.service} {fields}".rstrip()


def test_golden_plans_of_the_realistic_fixture(golden: Golden) -> None:
    state = realistic_state()
    owned = set(state.vips)
    desired = desired_ipvs(state, "bgp")
    empty = plan(desired, Observed(), owned_vips=owned)
    fake = FakeIpvs()
    fake.apply(empty.ops)
    # Then: the first service's first real server loses its last endpoint (drain start), and
    # the second one gains a pod (one set).
    first, second = desired[0], desired[1]
    changed = [replace(first, dests=first.dests[1:]),
               replace(second, dests=(replace(second.dests[0], weight=second.dests[0].weight + 1),
                                       *second.dests[1:])), *desired[2:]]
    after = plan(changed, fake.observe(), owned_vips=owned, now=0.0)
    text = ["# from an empty kernel", *map(_op_text, empty.ops), "# one node drained, one weight up",
            *map(_op_text, after.ops)]
    golden.check("realistic-bgp.director-plan", "\n".join(text) + "\n")
