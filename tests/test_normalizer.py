"""The incremental Normalizer always agrees with a from-scratch normalize(), and does little work."""

from __future__ import annotations

from dataclasses import dataclass, replace

from hypothesis import given, settings
from hypothesis import strategies as st

from kube2ipvs.lbconfig import parse_lbconfig_value
from kube2ipvs.model import EndpointSlice, Node, Service
from kube2ipvs.normalize import Normalizer, normalize
from kube2ipvs.protocol import Encoder, encode_state
from tests.builders import endpointslice, node, service

NODES = ["n0", "n1", "n2", "n3"]
SERVICES = ["web", "api"]
CONFIG = parse_lbconfig_value({
    "labels": {"example.com/lb-zone": "green"},
    "config": {"192.0.2.1": {"80": {"namespace": "shop", "service": "web", "portName": "http"},
                             "443": {"namespace": "shop", "service": "api", "portName": "http",
                                     "udpEnabled": True}},
               "192.0.2.2": {"80": {"namespace": "shop", "service": "api", "portName": "http"}}},
    "config6": {"2001:db8::1": {"80": {"namespace": "shop", "service": "web", "portName": "http"}}},
})


def make_node(i: int, ready: bool, labelled: bool) -> Node:
    return node(NODES[i], f"198.51.100.{i + 1}", f"2001:db8:100::{i + 1}", ready=ready,
                labels={"example.com/lb-zone": "green" if labelled else "blue"})


def make_service(svc: str, headless: bool) -> Service:
    return service("shop", svc, ("http", 80, "TCP"), headless=headless)


def make_slice(svc: str, index: int, family: int, eps: list[tuple[int, int, bool]]) -> EndpointSlice:
    k = SERVICES.index(svc)
    return endpointslice("shop", svc, f"{svc}-{family}-{index}", [("http", 8080, "TCP")],
                         [(f"10.0.{k}.{a}" if family == 4 else f"2001:db8:{k + 1}::{a:x}", NODES[n], r)
                          for a, n, r in eps], family=family)


@dataclass(frozen=True)
class SetNode:
    index: int
    ready: bool
    labelled: bool


@dataclass(frozen=True)
class DeleteNode:
    index: int


@dataclass(frozen=True)
class SetService:
    name: str
    headless: bool


@dataclass(frozen=True)
class DeleteService:
    name: str


@dataclass(frozen=True)
class SetSlice:
    service: str
    index: int
    family: int
    endpoints: list[tuple[int, int, bool]]


@dataclass(frozen=True)
class DeleteSlice:
    service: str
    index: int
    family: int


Change = SetNode | DeleteNode | SetService | DeleteService | SetSlice | DeleteSlice
FAMILIES = st.sampled_from([4, 6])
changes_strategy: st.SearchStrategy[Change] = st.one_of(
    st.builds(SetNode, st.integers(0, 3), st.booleans(), st.booleans()),
    st.builds(DeleteNode, st.integers(0, 3)),
    st.builds(SetService, st.sampled_from(SERVICES), st.booleans()),
    st.builds(DeleteService, st.sampled_from(SERVICES)),
    st.builds(SetSlice, st.sampled_from(SERVICES), st.integers(0, 1), FAMILIES,
              st.lists(st.tuples(st.integers(1, 9), st.integers(0, 3), st.booleans()), max_size=5)),
    st.builds(DeleteSlice, st.sampled_from(SERVICES), st.integers(0, 1), FAMILIES),
)


def populated() -> tuple[dict[str, Node], dict[str, Service], dict[str, EndpointSlice]]:
    """Every node ready, both services, and endpoints of each service on every node."""
    nodes = {NODES[i]: make_node(i, True, True) for i in range(len(NODES))}
    services = {s: make_service(s, False) for s in SERVICES}
    slices = {}
    for s in SERVICES:
        for family in (4, 6):
            es = make_slice(s, 0, family, [(i + 1, i, True) for i in range(len(NODES))])
            slices[es.name] = es
    return nodes, services, slices


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(changes_strategy, st.booleans()), max_size=30))
def test_any_sequence_of_changes_gives_the_same_state_as_normalizing_from_scratch(
    changes: list[tuple[Change, bool]],
) -> None:
    nodes, services, slices = populated()
    inc = Normalizer(CONFIG)
    inc.replace_all(nodes.values(), services.values(), slices.values())
    encoder = Encoder()
    encoder.update(inc.state())
    for change, read_after in changes:
        match change:
            case SetNode(index, ready, labelled):
                n = make_node(index, ready, labelled)
                nodes[n.name] = n
                inc.upsert_node(n)
            case DeleteNode(index):
                nodes.pop(NODES[index], None)
                inc.delete_node(NODES[index])
            case SetService(name, headless):
                services[name] = make_service(name, headless)
                inc.upsert_service(services[name])
            case DeleteService(name):
                services.pop(name, None)
                inc.delete_service("shop", name)
            case SetSlice(svc, index, family, endpoints):
                es = make_slice(svc, index, family, endpoints)
                slices[es.name] = es
                inc.upsert_endpointslice(es)
            case DeleteSlice(svc, index, family):
                name = f"{svc}-{family}-{index}"
                slices.pop(name, None)
                inc.delete_endpointslice("shop", name)
        if read_after:  # interleaved reads must not disturb later results
            partial = inc.state()
            encoder.update(partial)  # from the state's delta: must equal a full encoding
            assert encoder.snapshot(0).values == encode_state(partial).values
    got = inc.state(generation=3)
    encoder.update(got)
    snapshot = encoder.snapshot(3)
    assert snapshot.values == encode_state(got).values
    assert encoder.total_bytes == sum(len(v) for k, v in snapshot.values.items() if k != "state.meta")
    want = normalize(nodes.values(), services.values(), slices.values(), CONFIG, generation=3)
    assert got == want
    assert got.skipped == want.skipped
    assert got.content_hash == want.content_hash


def test_an_unchanged_node_update_recomputes_nothing() -> None:
    inc = Normalizer(CONFIG)
    inc.replace_all([make_node(0, True, True)], [make_service("web", False)],
                    [make_slice("web", 0, 4, [(1, 0, True)])])
    first = inc.state()
    inc.upsert_node(make_node(0, True, True))
    assert inc._dirty == set()  # the point of the test is the work not done
    assert inc.state().services == first.services


def test_a_slice_change_recomputes_only_its_service() -> None:
    inc = Normalizer(CONFIG)
    inc.replace_all([make_node(0, True, True)], [make_service("web", False), make_service("api", False)],
                    [make_slice("web", 0, 4, [(1, 0, True)]), make_slice("api", 0, 4, [(1, 0, True)])])
    before = inc.state()
    inc.upsert_endpointslice(make_slice("web", 0, 4, [(1, 0, True), (2, 0, True)]))
    assert inc._dirty == {("shop", "web")}
    after = inc.state()
    changed = {vs.key for vs, d in zip(after.services, after.service_digests, strict=True)
               if d not in before.service_digests}
    assert changed == {("192.0.2.1", 80, "tcp")}


def test_a_new_config_is_applied_to_the_objects_already_held() -> None:
    inc = Normalizer(CONFIG)
    inc.replace_all([make_node(0, True, True)], [make_service("web", False)],
                    [make_slice("web", 0, 4, [(1, 0, True)])])
    assert [vs.key for vs in inc.state().services if vs.backends] == [("192.0.2.1", 80, "tcp")]
    inc.set_config(replace(CONFIG, labels=(("example.com/lb-zone", "blue"),)))
    state = inc.state()
    assert [vs.key for vs in state.services if vs.backends] == []
    assert state.nodes[0].reason == "lacks label example.com/lb-zone=blue"
