"""The director loop against the strict fakes: convergence, one op per one-endpoint change, drift
repair on resync, graceful drains, ownership of VIPs that left the configuration, settings,
failures, readiness and /config. Real IPVS: tests/vm/test_director_app_vm.py."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import generate_latest

from kube2ipvs.ipvs import desired_ipvs
from kube2ipvs.model import ClusterState
from kube2ipvs.normalize import normalize
from kube2ipvs.render.ipvsadm import render_ipvsadm
from kube2ipvs.statusserver import ConfigResponse, StatusServer
from kube2ipvs_director.app import DirectorApp, DirectorSettings, cleanup, default_vs_sysctls
from kube2ipvs_director.host import FakeHost
from kube2ipvs_director.kernel import FakeIpvs
from kube2ipvs_director.plan import AddDest, DelDest, DelService, EditDest, ObservedService, ServiceId, Timeouts
from tests.builders import config, endpointslice, node, service, web_entry

WEB = service("shop", "web", ("http", 80, "TCP"))
NODES = [node("a", "198.51.100.1"), node("b", "198.51.100.2")]


def cluster(generation: int, endpoints: Sequence[tuple[str, str]],
            vips: Sequence[str] = ("192.0.2.1",)) -> ClusterState:
    """Service shop/web on port 80 of every VIP in `vips`, with (pod address, node) endpoints."""
    cfg = config({vip: {"80": web_entry()} for vip in vips})
    slices = [endpointslice("shop", "web", "w", [("http", 8080, "TCP")], [(a, n, True) for a, n in endpoints])]
    return replace(normalize(NODES, [WEB], slices, cfg), generation=generation)


TWO_NODES = [("10.0.0.1", "a"), ("10.0.0.2", "a"), ("10.0.1.1", "b")]
SID = ServiceId("192.0.2.1", 4, 80, "tcp")


class CountingIpvs(FakeIpvs):
    dumps = 0

    def observe(self) -> Any:
        self.dumps += 1
        return super().observe()


@dataclass
class Readiness:
    published: list[Mapping[str, Any]] = field(default_factory=list)

    async def publish(self, status: Mapping[str, Any]) -> None:
        self.published.append(dict(status))


def director(ipvs: FakeIpvs | None = None, host: FakeHost | None = None, *, clock: list[float] | None = None,
             readiness: Readiness | None = None, **settings: Any) -> DirectorApp:
    now = clock if clock is not None else [1000.0]
    return DirectorApp(ipvs or CountingIpvs(), host or FakeHost(), source=None, readiness=readiness,
                       settings=DirectorSettings(mode="arp", vs_sysctls=default_vs_sysctls("arp"), **settings),
                       clock=lambda: now[0])


def reconcile(app: DirectorApp, state: ClusterState | None = None) -> list[Any]:
    if state is not None:
        app.offer(state)
    return asyncio.run(app.reconcile_once())


def kernel_rules(ipvs: FakeIpvs) -> str:
    from kube2ipvs.render.ipvsadm import service_lines
    from kube2ipvs_director.plan import observed_as_desired
    lines = service_lines(observed_as_desired(ipvs.observe(), {s.vip for s in ipvs.services}))
    return "\n".join(lines) + ("\n" if lines else "")


def test_before_the_first_state_nothing_is_touched() -> None:
    ipvs, host = CountingIpvs(), FakeHost()
    app = director(ipvs, host)
    assert reconcile(app) == []
    assert (ipvs.batches, host.batches, ipvs.dumps) == ([], [], 0)
    assert app.health().reason == "no cluster state received yet"


def test_a_state_converges_the_kernel_to_exactly_the_rendered_rules_and_a_resync_changes_nothing() -> None:
    ipvs, host = CountingIpvs(), FakeHost()
    app = director(ipvs, host)
    state = cluster(1, TWO_NODES)
    done = reconcile(app, state)
    assert done[:3] == ["SetTimeouts tcp=900 tcpfin=30 udp=300", "SetSysctl net.ipv4.vs.conntrack=0",
                        "SetSysctl net.ipv4.vs.expire_nodest_conn=1"]
    assert "AddVip 192.0.2.1" in done
    assert done.index("AddVip 192.0.2.1") < next(i for i, op in enumerate(done) if not isinstance(op, str))
    assert kernel_rules(ipvs) == render_ipvsadm(state, mode="arp")
    assert host.ours == {"192.0.2.1"}
    assert ipvs.timeouts() == Timeouts(900, 30, 300)
    assert reconcile(app) == []  # a resync of a converged kernel
    health = app.health()
    assert health.ok, health.reason
    assert health.detail["generation_applied"] == 1


def test_a_one_endpoint_change_is_one_set_and_reads_no_dump_of_the_kernel() -> None:
    ipvs = CountingIpvs()
    app = director(ipvs)
    reconcile(app, cluster(1, TWO_NODES))
    dumps = ipvs.dumps
    done = reconcile(app, cluster(2, [*TWO_NODES, ("10.0.1.2", "b")]))
    assert done == [EditDest(SID, "198.51.100.2", 80, "g", 2, 0, 0)]
    assert ipvs.dumps == dumps  # the change path trusts what the last apply left
    assert ipvs.batches[-1] == (EditDest(SID, "198.51.100.2", 80, "g", 2, 0, 0),)


def test_an_ipvsadm_d_by_hand_is_repaired_by_the_next_resync_and_counted_as_drift() -> None:
    ipvs = CountingIpvs()
    app = director(ipvs)
    reconcile(app, cluster(1, TWO_NODES))
    svc = ipvs.services[SID]
    ipvs.services[SID] = replace(svc, dests=tuple(d for d in svc.dests if d.address != "198.51.100.2"))
    assert reconcile(app) == [AddDest(SID, "198.51.100.2", 80, "g", 1, 0, 0)]
    assert "kube2ipvs_director_drift_repairs_total 1.0" in generate_latest(app.registry).decode()


def test_foreign_services_stay_exactly_as_they_are() -> None:
    foreign = ObservedService(ServiceId("10.96.0.10", 4, 53, "udp"), "rr")
    ipvs = CountingIpvs(services={foreign.id: foreign})
    app = director(ipvs)
    reconcile(app, cluster(1, TWO_NODES))
    reconcile(app)
    assert ipvs.services[foreign.id] == foreign
    assert "10.96.0.10" not in answer(app, {"format": "ipvsadm"}).body


def test_a_node_that_loses_its_last_endpoint_drains_then_goes() -> None:
    clock = [1000.0]
    ipvs = CountingIpvs()
    app = director(ipvs, clock=clock, drain_timeout=60)
    reconcile(app, cluster(1, TWO_NODES))
    ipvs.connect(SID, "198.51.100.2", 80, active=3)
    assert reconcile(app, cluster(2, TWO_NODES[:2])) == [EditDest(SID, "198.51.100.2", 80, "g", 0, 0, 0)]
    assert app.wake_at == 1060.0
    clock[0] = 1010.0
    assert reconcile(app) == []  # still 3 connections, before the deadline
    ipvs.connect(SID, "198.51.100.2", 80, active=0)
    done = reconcile(app)  # a drain re-reads connection counts on its resyncs
    assert [type(op).__name__ for op in done] == ["DelDest"]
    assert app.draining == {}


def test_a_vip_removed_from_the_configuration_is_drained_and_deleted_also_after_a_restart(tmp_path: Path) -> None:
    state_file = tmp_path / "director.json"
    ipvs, host = CountingIpvs(), FakeHost()
    app = director(ipvs, host, state_file=state_file, drain_timeout=0)
    reconcile(app, cluster(1, TWO_NODES, vips=("192.0.2.1", "192.0.2.2")))
    assert host.ours == {"192.0.2.1", "192.0.2.2"}
    restarted = director(ipvs, host, state_file=state_file, drain_timeout=0)  # forgot nothing: the file
    drained = reconcile(restarted, cluster(2, TWO_NODES, vips=("192.0.2.1",)))
    assert {(op.service.vip, op.weight) for op in drained if isinstance(op, EditDest)} == {("192.0.2.2", 0)}
    assert host.ours == {"192.0.2.1", "192.0.2.2"}  # held while its service drains
    done = reconcile(restarted)
    assert "DeleteVip 192.0.2.2" in done
    assert {s.vip for s in ipvs.services} == {"192.0.2.1"}
    assert host.ours == {"192.0.2.1"}
    assert "192.0.2.2" not in state_file.read_text()  # nothing of it left to own


def test_settings_that_do_not_stick_fail_health_and_are_named() -> None:
    host = FakeHost(stuck={"conntrack"})
    app = director(host=host)
    reconcile(app, cluster(1, TWO_NODES))
    assert app.health().reason == "IPVS settings wrong: net.ipv4.vs.conntrack want 0, have 1"
    host.stuck.clear()
    reconcile(app)
    assert app.health().ok


def test_a_failed_apply_is_reported_then_retried_from_a_fresh_dump() -> None:
    ipvs = CountingIpvs()
    app = director(ipvs)
    reconcile(app, cluster(1, TWO_NODES))
    ipvs.fail_at = 0
    reconcile(app, cluster(2, [*TWO_NODES, ("10.0.1.2", "b")]))
    assert app.health().reason.startswith("last apply failed: ApplyError")
    dumps = ipvs.dumps
    assert reconcile(app) == [EditDest(SID, "198.51.100.2", 80, "g", 2, 0, 0)]
    assert ipvs.dumps == dumps + 1
    assert app.health().ok


def test_readiness_says_which_generation_is_applied_and_whether_healthy() -> None:
    readiness = Readiness()
    app = director(readiness=readiness)
    reconcile(app, cluster(5, TWO_NODES))
    last = readiness.published[-1]
    assert (last["healthy"], last["generation"], last["vips"], last["mode"]) == (True, 5, ["192.0.2.1"], "arp")


def answer(app: DirectorApp, query: Mapping[str, str]) -> ConfigResponse:
    """/config's answer, awaited when the director reads the kernel for it."""
    result = app.config(query)
    if isinstance(result, ConfigResponse):
        return result

    async def wait() -> ConfigResponse:
        return await result

    return asyncio.run(wait())


def test_config_shows_the_kernels_rules_as_kube2ipvs_rules_prints_them() -> None:
    ipvs = FakeIpvs()
    app = director(ipvs)
    assert answer(app, {"format": "ipvsadm"}).status == 503
    state = cluster(1, TWO_NODES)
    reconcile(app, state)
    assert answer(app, {"format": "ipvsadm"}).body == render_ipvsadm(state, mode="arp")
    assert answer(app, {"format": "desired"}).body == render_ipvsadm(state, mode="arp")
    assert '"generation_applied": 1' in answer(app, {}).body
    # A change by hand shows at once (the kernel is read for the answer), before a resync repairs it.
    svc = ipvs.services[SID]
    ipvs.services[SID] = replace(svc, dests=tuple(d for d in svc.dests if d.address != "198.51.100.2"))
    assert "198.51.100.2" not in answer(app, {"format": "ipvsadm"}).body
    assert "198.51.100.2" in answer(app, {"format": "desired"}).body


@pytest.mark.parametrize("mode", ["arp", "bgp"])
def test_sloppy_tcp_is_on_for_bgp_directors_only(mode: str) -> None:
    assert default_vs_sysctls(mode)["sloppy_tcp"] == (1 if mode == "bgp" else 0)  # type: ignore[arg-type]


def test_cleanup_removes_our_services_and_addresses_only(tmp_path: Path) -> None:
    foreign = ObservedService(ServiceId("10.96.0.10", 4, 53, "udp"), "rr")
    ipvs, host = CountingIpvs(services={foreign.id: foreign}), FakeHost()
    app = director(ipvs, host, state_file=tmp_path / "d.json")
    reconcile(app, cluster(1, TWO_NODES))
    done = cleanup(ipvs, host, tmp_path / "d.json")
    assert [str(op) if isinstance(op, str) else type(op).__name__ for op in done] == ["DelService",
                                                                                     "DeleteVip 192.0.2.1"]
    assert list(ipvs.services) == [foreign.id]
    assert host.ours == set()
    assert desired_ipvs(cluster(1, TWO_NODES), "arp")  # (the fixture did make a service to remove)


def test_stats_of_owned_services_become_metrics_and_foreign_ones_do_not() -> None:
    from kube2ipvs_director.app import StatsSnapshot
    from kube2ipvs_director.kernel import DestStats, IpvsCounters, ServiceStats
    from kube2ipvs_director.stats import ConntrackUsage

    mine = ServiceStats(SID, IpvsCounters(connections=7, packets_in=70, bytes_in=7000),
                        (DestStats("198.51.100.1", 80, IpvsCounters(), active=2, inactive=1),
                         DestStats("198.51.100.2", 80, IpvsCounters(), active=1)))
    theirs = ServiceStats(ServiceId("10.96.0.10", 4, 53, "udp"), IpvsCounters(connections=99))

    class Source:
        def read(self) -> StatsSnapshot:
            return StatsSnapshot((mine, theirs), {("TCP", "FIN_WAIT"): 12, ("TCP", "ESTABLISHED"): 3},
                                 ConntrackUsage(100, 262144))

    app = DirectorApp(CountingIpvs(), FakeHost(), source=None, stats=Source(),
                      settings=DirectorSettings(mode="arp", vs_sysctls=default_vs_sysctls("arp")))
    reconcile(app, cluster(1, TWO_NODES))
    asyncio.run(app.read_stats())
    text = generate_latest(app.registry).decode()
    key = 'port="80",protocol="tcp",vip="192.0.2.1"'
    assert f"kube2ipvs_director_vs_active_connections{{{key}}} 3.0" in text
    assert f"kube2ipvs_director_vs_inactive_connections{{{key}}} 1.0" in text
    assert f"kube2ipvs_director_vs_connections_total{{{key}}} 7.0" in text
    assert f'kube2ipvs_director_vs_packets_total{{direction="in",{key}}} 70.0' in text
    assert 'kube2ipvs_director_ipvs_connections{protocol="TCP",state="FIN_WAIT"} 12.0' in text
    assert "kube2ipvs_director_conntrack_entries 100.0" in text
    assert "kube2ipvs_director_conntrack_max 262144.0" in text
    assert "10.96.0.10" not in text
    app.close()


def test_the_loop_follows_states_published_on_nats_publishes_readiness_and_keeps_ipvs_while_nats_is_away(
    tmp_path: Path,
) -> None:
    from kube2ipvs.natskv import KVPublisher, NatsSettings, StateSubscriber, StatusBoard
    from kube2ipvs.protocol import encode_state, plan_writes
    from kube2ipvs_director.main import BoardReadiness
    from tests.natsfixture import running_nats_server

    with running_nats_server(tmp_path / "nats") as server:
        nats = NatsSettings(servers=(server.url,), reconnect_wait=0.1, connect_timeout=1.0, request_timeout=2.0)

        async def scenario() -> None:
            ipvs = CountingIpvs()
            board, reader = StatusBoard(nats), StatusBoard(nats)
            async with KVPublisher(nats) as pub, StateSubscriber(nats) as subscriber:
                await board.start()
                await reader.start()
                first = encode_state(cluster(1, TWO_NODES))
                await pub.publish(plan_writes(None, first))
                app = DirectorApp(ipvs, FakeHost(), source=subscriber, readiness=BoardReadiness(board, "dir-1"),
                                  settings=DirectorSettings(mode="arp", vs_sysctls=default_vs_sysctls("arp"),
                                                            resync_interval=0.1))
                task = asyncio.create_task(app.run())
                try:
                    async with asyncio.timeout(15):
                        while app.applied is None or app.applied.generation != 1:
                            await asyncio.sleep(0.05)
                    assert kernel_rules(ipvs) == render_ipvsadm(cluster(1, TWO_NODES), mode="arp")
                    status = await reader.get("director", "dir-1")
                    assert status is not None
                    assert (status["healthy"], status["generation"]) == (True, 1)

                    await pub.publish(plan_writes(first, encode_state(cluster(2, [*TWO_NODES, ("10.0.1.2", "b")]))))
                    async with asyncio.timeout(15):
                        while app.applied is None or app.applied.generation != 2:
                            await asyncio.sleep(0.05)
                    assert ipvs.batches[-1] == (EditDest(SID, "198.51.100.2", 80, "g", 2, 0, 0),)

                    batches = len(ipvs.batches)
                    server.stop()
                    await asyncio.sleep(1.0)  # about ten resyncs while NATS is away
                    assert len(ipvs.batches) == batches  # IPVS kept exactly as it was
                    assert app.health().ok
                    assert app.health().detail["nats_connected"] is False
                finally:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                    app.close()
                    await board.close()
                    await reader.close()

        asyncio.run(scenario())


def assert_vip_books_agree_with_a_recount(app: DirectorApp, ipvs: FakeIpvs, host: FakeHost,
                                          state: ClusterState) -> None:
    """What a change keeps up to date without looking at every VIP, against the same counted whole."""
    held = [s for s in ipvs.services.values() if s.id.vip in app.owned_vips]  # (not counted as a dump)
    assert app.owned_vips >= set(state.vips)
    assert app.served_vips == {svc.vip for svc in app.desired} | {s.id.vip for s in held}
    assert host.ours == app.served_vips
    assert app.readiness()["vips"] == sorted(app.served_vips)
    assert app.registry.get_sample_value("kube2ipvs_director_virtual_services") == len(held)
    assert app.registry.get_sample_value("kube2ipvs_director_real_servers") == sum(len(s.dests) for s in held)


# Steps of (pod address, node) endpoints, and the VIPs a state configures.
STEPS = st.lists(st.lists(st.tuples(st.sampled_from(["10.0.0.1", "10.0.0.2", "10.0.1.1", "10.0.1.2"]),
                                    st.sampled_from(["a", "b"])), unique_by=lambda e: e[0], max_size=4),
                 min_size=1, max_size=8)
VIP_SETS = st.lists(st.sampled_from(["192.0.2.1", "192.0.2.2", "192.0.2.3"]), min_size=1, max_size=3, unique=True)


@given(STEPS, VIP_SETS)
@settings(max_examples=60, deadline=None)
def test_changes_planned_incrementally_leave_nothing_a_full_plan_would_still_do(
    steps: list[list[tuple[str, str]]], vips: list[str]
) -> None:
    from kube2ipvs_director.plan import AddService, DelDest, DelService, EditService, plan

    ipvs = CountingIpvs()
    app = director(ipvs, drain_timeout=300)
    reconcile(app, cluster(1, TWO_NODES, vips=vips))
    for generation, endpoints in enumerate(steps, start=2):
        reconcile(app, cluster(generation, endpoints, vips=vips[: 1 + generation % len(vips)]))
        assert app.observed == ipvs.observe()  # what the change path assumed is what the kernel holds
        left = plan(app.desired, ipvs.observe(), owned_vips=app.owned_vips, draining=app.draining,
                    now=1000.0, drain_timeout=300).ops
        assert not [op for op in left if isinstance(op, AddService | AddDest | EditService)
                    or (isinstance(op, EditDest) and op.weight > 0)], left
        assert all(isinstance(op, DelDest | DelService) for op in left), left  # only drains may end later
    app.close()


@given(STEPS, VIP_SETS)
@settings(max_examples=60, deadline=None)
def test_following_the_subscribers_deltas_does_exactly_what_comparing_everything_does(
    steps: list[list[tuple[str, str]]], vips: list[str]
) -> None:
    """States as a director gets them (published, then assembled: each names what changed since
    the previous one) against the same states without their delta: the same ops, the same kernel."""
    from kube2ipvs.protocol import Assembler, encode_state, plan_writes

    assembler = Assembler()
    fast_ipvs, slow_ipvs = CountingIpvs(), CountingIpvs()
    fast, slow = director(fast_ipvs, drain_timeout=300), director(slow_ipvs, drain_timeout=300)
    previous = None
    for generation, endpoints in enumerate([TWO_NODES, *steps], start=1):
        encoded = encode_state(cluster(generation, endpoints, vips=vips[: 1 + generation % len(vips)]))
        for w in plan_writes(previous, encoded):
            assembler.update(w.key, w.value)
        previous = encoded
        state = assembler.complete()
        assert state is not None
        assert state.delta is not None
        reconcile(fast, state)
        reconcile(slow, replace(state, delta=None))
        assert fast_ipvs.batches == slow_ipvs.batches
        assert fast.observed == fast_ipvs.observe()
        assert fast.desired == slow.desired
        assert fast.served_vips == slow.served_vips
        assert isinstance(fast.host, FakeHost)
        assert_vip_books_agree_with_a_recount(fast, fast_ipvs, fast.host, state)
    assert fast_ipvs.observe() == slow_ipvs.observe()
    fast.close()
    slow.close()


class Subscriber:
    """States as a director's subscriber assembles them: each names what changed since the last."""

    def __init__(self) -> None:
        from kube2ipvs.protocol import Assembler, Encoded

        self._assembler = Assembler()
        self._previous: Encoded | None = None

    def assembled(self, generation: int, endpoints: Sequence[tuple[str, str]], vips: Sequence[str]) -> ClusterState:
        from kube2ipvs.protocol import encode_state, plan_writes

        encoded = encode_state(cluster(generation, endpoints, vips=vips))
        for w in plan_writes(self._previous, encoded):
            self._assembler.update(w.key, w.value)
        self._previous = encoded
        state = self._assembler.complete()
        assert state is not None
        return state


def test_vips_leaving_and_coming_back_between_changes_keep_addresses_ownership_and_counts_right(
    tmp_path: Path,
) -> None:
    """The VIP sets a change path keeps (built again only when the VIPs or the services of a VIP
    change) against a recount, through states that follow each other by deltas, a drain that
    outlives its VIP's configuration, and a state without a delta."""
    assembled = Subscriber().assembled
    state_file = tmp_path / "director.json"
    ipvs, host = CountingIpvs(), FakeHost()
    app = director(ipvs, host, state_file=state_file, drain_timeout=300)
    both, one = ("192.0.2.1", "192.0.2.2"), ("192.0.2.1",)
    second = ServiceId("192.0.2.2", 4, 80, "tcp")
    state = assembled(1, TWO_NODES, both)
    reconcile(app, state)
    assert_vip_books_agree_with_a_recount(app, ipvs, host, state)
    for address in ("198.51.100.1", "198.51.100.2"):
        ipvs.connect(second, address, 80, active=1)

    state = assembled(2, TWO_NODES, one)  # 192.0.2.2 leaves the configuration; its service drains
    done = reconcile(app, state)
    assert {(op.service.vip, op.weight) for op in done if isinstance(op, EditDest)} == {("192.0.2.2", 0)}
    assert "192.0.2.2" in app.owned_vips
    assert "192.0.2.2" in state_file.read_text()
    assert_vip_books_agree_with_a_recount(app, ipvs, host, state)

    dumps = ipvs.dumps
    state = assembled(3, [*TWO_NODES, ("10.0.1.2", "b")], one)  # the VIPs as they were
    assert reconcile(app, state) == [EditDest(SID, "198.51.100.2", 80, "g", 2, 0, 0)]
    assert ipvs.dumps == dumps
    assert_vip_books_agree_with_a_recount(app, ipvs, host, state)

    for address in ("198.51.100.1", "198.51.100.2"):
        ipvs.connect(second, address, 80, active=0)
    state = assembled(4, TWO_NODES, one)  # a change that also finds the drain over
    done = reconcile(app, state)
    assert "DeleteVip 192.0.2.2" in done
    assert ipvs.dumps == dumps
    assert host.ours == {"192.0.2.1"}
    assert "192.0.2.2" not in state_file.read_text()
    assert_vip_books_agree_with_a_recount(app, ipvs, host, state)

    # Someone makes a service on 192.0.2.2 while it is not ours (a resync sees it and leaves it)...
    stray = ServiceId("192.0.2.2", 4, 443, "tcp")
    ipvs.services[stray] = ObservedService(stray, "rr")
    assert reconcile(app) == []
    state = assembled(5, TWO_NODES, both)  # ...then 192.0.2.2 comes back, and that service is ours too
    assert "AddVip 192.0.2.2" in reconcile(app, state)
    assert_vip_books_agree_with_a_recount(app, ipvs, host, state)

    state = replace(assembled(6, TWO_NODES, one), delta=None)  # no delta: everything compared
    done = reconcile(app, state)
    assert {(op.service.vip, op.weight) for op in done if isinstance(op, EditDest)} == {("192.0.2.2", 0)}
    assert_vip_books_agree_with_a_recount(app, ipvs, host, state)
    assert reconcile(app) == [DelDest(second, "198.51.100.1", 80), DelDest(second, "198.51.100.2", 80),
                              DelService(second), DelService(stray), "DeleteVip 192.0.2.2"]  # no connections
    assert_vip_books_agree_with_a_recount(app, ipvs, host, state)
    app.close()


def test_counters_are_read_when_metrics_are_scraped_and_scrapes_close_together_share_a_reading() -> None:
    """Nothing reads 10,000 counters on a timer for nobody: a scrape does, at most once per
    stats_max_age, and scrapes arriving together wait for one reading."""
    from kube2ipvs_director.app import StatsSnapshot

    reads: list[float] = []
    now = [1000.0]

    class Source:
        def read(self) -> StatsSnapshot:
            reads.append(now[0])
            return StatsSnapshot()

    app = DirectorApp(CountingIpvs(), FakeHost(), source=None, stats=Source(), clock=lambda: now[0],
                      settings=DirectorSettings(mode="arp", vs_sysctls={}, stats_max_age=2.0))

    async def scrapes() -> list[int]:
        server = StatusServer(host="127.0.0.1", port=0, health=app.health, config=app.config,
                              registry=app.registry, before_metrics=app.read_stats)
        await server.start()
        statuses: list[int] = []
        try:
            async with aiohttp.ClientSession() as session:
                async def scrape() -> int:
                    async with session.get(f"http://127.0.0.1:{server.port}/metrics") as response:
                        return response.status
                statuses += await asyncio.gather(scrape(), scrape(), scrape())
                now[0] += 1.0
                statuses.append(await scrape())  # within 2 s of the reading: the same reading
                now[0] += 1.5
                statuses.append(await scrape())
        finally:
            await server.stop()
        return statuses

    assert reads == []  # built and reconciled: no reading yet
    assert asyncio.run(scrapes()) == [200] * 5
    assert reads == [1000.0, 1002.5]
