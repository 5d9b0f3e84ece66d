"""The realserver's incremental desired state is a build from scratch, whatever the history.

`desired_state` takes the working state of the Desired it is built from over (its dicts move on,
updated in place) and follows the slice's delta when that reaches back to the slice the previous
Desired was built from. Random histories of slice updates check that nothing goes stale: adds,
removals, endpoint changes, values that do not decode, skipped services, VIPs appearing and
disappearing, slices skipped over, the masquerade setting changing, builds from an older Desired
or from none, and failed applies. Each build must equal `desired_state(slice, settings)`, and
`plan` must give the ops it gives for that build from scratch.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kube2ipvs.model import Backend, PodEndpoint, VirtualService, new_lineage, service_value
from kube2ipvs.protocol import NodeSlice, NodeSliceAssembler, SliceChange, SliceDelta, node_service_key
from kube2ipvs.render.nftdelta import render_entries_delta
from kube2ipvs_realserver.app import AppSettings, RealserverApp
from kube2ipvs_realserver.kernel import FakeKernel
from kube2ipvs_realserver.plan import (
    Desired,
    NftTables,
    Observed,
    ReplaceTable,
    Settings,
    StaleDesiredError,
    desired_state,
    expected_tables,
    observed_after,
    plan,
)
from tests.test_realserver_plan import node_slice

SETTINGS = Settings(interface="eth0")
MASQUERADE = replace(SETTINGS, masquerade_exempt=("10.0.0.0/8",))
NODE = "node-a"

# VIPs: two spellings of one IPv6 address (one identity: the realserver merges them), a VIP whose
# family is wrong for its text and one that is no address (skipped when a slice holds them; the
# decoder refuses them, so through the assembler they are values that do not decode). The MTU is
# one per VIP, as the configuration has it.
VIPS: dict[str, tuple[int, int | None]] = {  # text -> (family, mtu)
    "192.0.2.10": (4, None), "192.0.2.11": (4, 1400), "2001:db8::10": (6, None), "2001:db8:0::10": (6, None),
    "2001:db8::11": (6, 1380), "192.0.2.12": (6, None), "vip.example": (4, None),
}
PODS = ["10.1.1.2", "10.1.1.3", "10.1.1.4", "2001:db8:1::2", "2001:db8:1::3"]


@dataclass(frozen=True)
class Put:
    vip: str
    port: int
    pods: tuple[str, ...]  # () as well: a service whose endpoints all went (or none of its family)
    forwarding: str = "g"

    @property
    def key(self) -> str:
        return node_service_key(NODE, self.vip, self.port, "tcp")

    def service(self) -> VirtualService:
        family, mtu = VIPS.get(self.vip, (6 if ":" in self.vip else 4, None))
        return VirtualService(
            vip=self.vip, family=4 if family == 4 else 6, port=self.port, protocol="tcp", namespace="shop",
            service="web", port_name="http", scheduler=None, forwarding="i" if self.forwarding == "i" else "g",
            u_threshold=0, l_threshold=0, flags=(), mtu=mtu,
            backends=(Backend(NODE, "198.51.100.11", tuple(PodEndpoint(p, 8080) for p in self.pods)),))


@dataclass(frozen=True)
class _OnKey:
    vip: str
    port: int

    @property
    def key(self) -> str:
        return node_service_key(NODE, self.vip, self.port, "tcp")


@dataclass(frozen=True)
class Delete(_OnKey):
    pass


@dataclass(frozen=True)
class Garbage(_OnKey):
    """A value no protocol version reads: the key keeps its last good value."""


@dataclass(frozen=True)
class TakeSlice:
    pass


@dataclass(frozen=True)
class Build:
    """desired_state of a slice (the newest, or an older one) from the latest Desired, an older
    one, or none; then the app's apply, which may fail."""

    slice_back: int  # 0: the newest slice
    previous: str  # "latest", "older", "none"
    masquerade: bool
    fails: bool


KEYS = st.tuples(st.sampled_from(sorted(VIPS)), st.sampled_from([80, 443]))
PUT = st.builds(lambda k, pods, fwd: Put(k[0], k[1], tuple(pods), fwd), KEYS,
                st.lists(st.sampled_from(PODS), unique=True, max_size=3), st.sampled_from(["g", "g", "i"]))
BUILD = st.builds(Build, st.sampled_from([0, 0, 0, 1, 3]), st.sampled_from(["latest"] * 6 + ["older", "none"]),
                  st.sampled_from([False] * 5 + [True]), st.sampled_from([False] * 4 + [True]))
OPS = st.one_of(PUT, PUT, PUT, st.builds(lambda k: Delete(*k), KEYS), st.builds(lambda k: Garbage(*k), KEYS),
                st.just(TakeSlice()), st.just(TakeSlice()), BUILD, BUILD)
HISTORIES = st.lists(OPS, min_size=20, max_size=60)


class HandSlices:
    """Slices made as the assembler makes them, but holding the services as given (a skipped
    one too), in the order their keys came; with the delta, or (`deltas=False`) without."""

    def __init__(self, *, deltas: bool) -> None:
        self._deltas = deltas
        self._held: dict[str, VirtualService] = {}
        self._changed: dict[str, SliceChange] = {}
        self._steps: tuple[dict[str, SliceChange], ...] = ()
        self._lineage, self._seq = new_lineage(), 0

    def update(self, key: str, vs: VirtualService | None) -> None:
        old = self._held.pop(key, None) if vs is None else self._held.get(key)
        if vs is not None:
            self._held[key] = vs
        first = self._changed[key][0] if key in self._changed else old
        if first is not vs:
            self._changed[key] = (first, vs)
        else:
            self._changed.pop(key, None)

    def slice(self) -> NodeSlice:
        self._seq += 1
        self._steps, self._changed = (*self._steps[-3:], self._changed), {}  # only 4 back: some reach too far
        services = tuple(self._held.values())
        return NodeSlice(NODE, tuple(dict.fromkeys(vs.vip for vs in services)), services,
                         SliceDelta(self._lineage, self._seq, self._steps) if self._deltas else None)


def same_as_scratch(built: Desired, scratch: Desired) -> None:
    assert built == scratch
    assert dict(built.entries) == dict(scratch.entries)
    assert (built.hash_total, built.ipip_services) == (scratch.hash_total, scratch.ipip_services)
    assert built.nft_tables == scratch.nft_tables == expected_tables(scratch.nft)
    assert frozenset(built.nft_tables.services) == frozenset(scratch.entries)
    assert built.vips == frozenset(e.vip for e in scratch.entries.values())
    assert built.nft_from_services() == scratch.nft


@dataclass
class Realserver:
    """The app's handling of desired states and applies, with a kernel that is what it was told."""

    desired: Desired | None = None
    applied: Desired | None = None
    observed: Observed = field(default_factory=lambda: Observed(
        ours=frozenset(), foreign=frozenset({"127.0.0.1"}), nft_digest=None, nft=NftTables(), sysctls={}))
    built: list[Desired] = field(default_factory=list)
    twin: dict[int, Desired] = field(default_factory=dict)  # serial -> the same Desired built from scratch

    def build(self, step: Build, slices: list[NodeSlice]) -> None:
        node = slices[max(0, len(slices) - 1 - step.slice_back)]
        settings_ = MASQUERADE if step.masquerade else SETTINGS
        previous = {"latest": self.desired, "older": self.built[-2] if len(self.built) > 1 else None,
                    "none": None}[step.previous]
        current = previous is not None and previous.current
        built = desired_state(node, settings_, previous)
        scratch = desired_state(node, settings_)
        same_as_scratch(built, scratch)
        if current and previous is not None and previous.masquerade_exempt == settings_.masquerade_exempt:
            assert built.base == previous.serial
            assert not previous.current
            with pytest.raises(StaleDesiredError):
                dict(previous.entries)
        elif previous is not None:
            assert built.base is None  # from scratch: `previous` was built from already, or has the other setting
        self.twin[built.serial] = scratch
        self.built.append(built)
        self.desired = built

        ops = plan(built, self.observed, applied=self.applied)
        # The same ops as for the build from scratch, with the delta (if any) from a twin of the
        # applied state; none when the applied state's entries moved on to a Desired other than
        # this one (the app never plans against such: it applies each Desired it builds).
        applied = self.applied
        knowable = applied is not None and (applied.current or built.base == applied.serial)
        expected = plan(scratch, self.observed, applied=self.twin[applied.serial] if knowable and applied else None)
        assert ops == expected
        for op in ops:
            if isinstance(op, ReplaceTable):
                assert op.text == scratch.nft  # (the text when the delta is refused)
                if op.delta is not None and applied is not None:
                    assert op.delta == render_entries_delta(dict(self.twin[applied.serial].entries),
                                                            dict(scratch.entries),
                                                            masquerade_exempt=settings_.masquerade_exempt)
        if step.fails:
            self.applied = None  # the kernel is as it was, the table unknown: the next one goes whole
        else:
            self.observed = observed_after(self.observed, ops, built)
            self.applied = built
            assert plan(built, self.observed, applied=built) == []


def run(ops: list[Any], update: Callable[[str, Any], None], take: Callable[[], NodeSlice]) -> None:
    slices: list[NodeSlice] = []
    server = Realserver()
    for op in [*ops, TakeSlice(), Build(0, "latest", masquerade=False, fails=False)]:
        if isinstance(op, TakeSlice):
            slices.append(take())
        elif isinstance(op, Build):
            server.build(op, slices or [take()])
        else:
            update(op.key, op)


@settings(max_examples=150, deadline=None)
@given(HISTORIES)
def test_builds_from_the_node_slice_assembler_equal_builds_from_scratch(ops: list[Any]) -> None:
    assembler = NodeSliceAssembler(NODE)

    def update(key: str, op: Any) -> None:
        value = service_value(op.service()) if isinstance(op, Put) else b"{garbage" if isinstance(op, Garbage) \
            else None
        assembler.update(key, value)

    run(ops, update, assembler.slice)


@settings(max_examples=150, deadline=None)
@given(HISTORIES, st.booleans())
def test_builds_from_slices_with_skipped_services_equal_builds_from_scratch(ops: list[Any], deltas: bool) -> None:
    hand = HandSlices(deltas=deltas)

    def update(key: str, op: Any) -> None:
        if isinstance(op, Put):
            hand.update(key, op.service())
        elif isinstance(op, Delete):
            hand.update(key, None)

    run(ops, update, hand.slice)


# ---------------------------------------------------------------------------------------------
# The moved working state, explicitly


def test_a_desired_built_from_holds_no_entries_and_is_not_built_from_again() -> None:
    d1 = desired_state(node_slice(("192.0.2.10", 80), ("192.0.2.11", 80)), SETTINGS)
    d2 = desired_state(node_slice(("192.0.2.10", 80)), SETTINGS, d1)
    assert (d1.current, d2.current) == (False, True)
    with pytest.raises(StaleDesiredError):
        _ = d1.nft  # never rendered: its entries are d2's now
    assert d1.vips == frozenset({"192.0.2.10", "192.0.2.11"})  # everything else stays
    s3 = node_slice(("192.0.2.12", 80))
    d3 = desired_state(s3, SETTINGS, d1)  # an older previous: built from scratch, d2 keeps its own
    assert d3.base is None
    assert d3 == desired_state(s3, SETTINGS)
    assert d2.current
    assert d3.current
    assert "192.0.2.10 . tcp . 80" in d2.nft


def test_a_rendered_desired_keeps_its_text_and_a_delta_from_it_needs_its_successor() -> None:
    d1 = desired_state(node_slice(("192.0.2.10", 80)), SETTINGS)
    text = d1.nft
    d2 = desired_state(node_slice(("192.0.2.10", 80), ("192.0.2.11", 80)), SETTINGS, d1)
    d3 = desired_state(node_slice(("192.0.2.11", 80)), SETTINGS, d2)
    assert d1.nft == text
    seen = Observed(ours=d1.vips, foreign=frozenset(), nft_digest=d1.nft_digest, nft=d1.nft_tables, sysctls={})
    # d1's entries went on to d2 and d3: from d1 to d3 no delta can be told, the table goes whole.
    assert [op for op in plan(d3, seen, applied=d1) if isinstance(op, ReplaceTable)] == [
        ReplaceTable(d3.nft_digest)]


def test_a_one_endpoint_change_rebuilds_one_entry_and_shares_the_keys_and_vips() -> None:
    services = [Put(f"192.0.2.{i % 50 + 1}", 1000 + i, ("10.1.1.2", "10.1.1.3")).service() for i in range(1000)]
    assembler = NodeSliceAssembler(NODE)
    for vs in services:
        assembler.update(node_service_key(NODE, vs.vip, vs.port, "tcp"), service_value(vs))
    d1 = desired_state(assembler.slice(), SETTINGS)
    one = replace(services[7], backends=(replace(services[7].backends[0], endpoints=(PodEndpoint("10.1.1.2", 8080),)),))
    assembler.update(node_service_key(NODE, one.vip, one.port, "tcp"), service_value(one))
    node = assembler.slice()
    d2 = desired_state(node, SETTINGS, d1)
    assert list(d2.replaced) == [(one.vip, one.port, "tcp")]
    assert d2.vips is d1.vips
    assert d2.services is node.services
    assert d2.nft_tables.services is d1.nft_tables.services  # the same keys: the same set
    assert d2 == desired_state(node, SETTINGS)


def test_the_app_converges_through_failed_applies_as_a_build_from_scratch_would() -> None:
    assembler = NodeSliceAssembler(NODE)
    kernel = FakeKernel()
    app = RealserverApp(kernel, source=None, settings=SETTINGS, app_settings=AppSettings(counters_interval=0))
    history: list[list[Put | Delete]] = [
        [Put("192.0.2.10", 80, ("10.1.1.2",)), Put("2001:db8::10", 80, ("2001:db8:1::2",))],
        [Put("192.0.2.10", 80, ("10.1.1.2", "10.1.1.3"))],
        [Put("192.0.2.11", 443, ("10.1.1.4",), "i"), Delete("2001:db8::10", 80)],  # this apply fails
        [Put("192.0.2.11", 443, ())],  # the next change after a failure
        [Delete("192.0.2.10", 80), Put("2001:db8::11", 80, ("2001:db8:1::3",))],
    ]
    try:
        for n, ops in enumerate(history):
            for op in ops:
                assembler.update(op.key, service_value(op.service()) if isinstance(op, Put) else None)
            node = assembler.slice()
            app.offer(node)
            kernel.fail_next = "nft: refused" if n == 2 else None
            asyncio.run(app.reconcile_once())
            scratch = desired_state(node, SETTINGS)
            assert app.desired == scratch
            assert (app.apply_error is not None) == (n == 2)
            if n != 2:
                assert (kernel.nft_text, kernel.digest, kernel.ours) == (scratch.nft, scratch.nft_digest,
                                                                          set(scratch.vips))
                assert app.config({"format": "nft"}).body == scratch.nft
    finally:
        app.close()
