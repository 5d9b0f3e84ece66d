"""The NATS KV protocol, without a server: encoding, minimal writes, and consumers' consistency rule."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from kube2ipvs.chunked import Chunked
from kube2ipvs.model import (
    ClusterState,
    PodEndpoint,
    VirtualService,
    content_hash,
    content_hash_v1,
    digest,
    service_digest,
    service_value,
    vips_value,
)
from kube2ipvs.normalize import normalize
from kube2ipvs.protocol import (
    META_KEY,
    SLICE_CHANGES_KEPT,
    SLICE_STEPS_KEPT,
    Assembler,
    Encoder,
    NodeSlice,
    NodeSliceAssembler,
    ProtocolError,
    Write,
    decode_node_service,
    encode_state,
    node_prefix,
    node_service_key,
    plan_writes,
    service_key,
)
from tests.conftest import realistic_state
from tests.test_render_nft import virtual_service
from tests.test_render_properties import Cluster, clusters


def one_more_endpoint(state: ClusterState) -> ClusterState:
    """node-a gets one more pod of 192.0.2.10:80/tcp."""
    services = []
    for vs in state.services:
        if vs.key == ("192.0.2.10", 80, "tcp"):
            a = vs.backends[0]
            grown = replace(a, endpoints=(*a.endpoints, PodEndpoint("10.1.1.99", 8080)))
            services.append(replace(vs, backends=(grown, *vs.backends[1:])))
        else:
            services.append(vs)
    return replace(state, generation=state.generation + 1, services=tuple(services))


def assemble(writes: list[Write]) -> ClusterState | None:
    a = Assembler()
    for w in writes:
        a.update(w.key, w.value)
    return a.complete()


def test_a_late_joiner_assembles_exactly_the_published_state() -> None:
    state = realistic_state()
    got = assemble(plan_writes(None, encode_state(state)))
    assert got == state
    assert got is not None
    assert got.content_hash == state.content_hash


def test_keys_name_the_service_without_characters_kv_keys_forbid() -> None:
    assert service_key("192.0.2.10", 8080, "tcp") == "vs.192-0-2-10.8080.tcp"
    assert service_key("2001:db8::10", 80, "udp") == "vs.2001-db8--10.80.udp"


def test_a_one_endpoint_change_writes_one_service_one_node_slice_and_the_manifest() -> None:
    state = realistic_state()
    first = encode_state(state)
    writes = plan_writes(first, encode_state(one_more_endpoint(state)))
    assert [w.key for w in writes] == ["node.node-a.192-0-2-10.80.tcp", "vs.192-0-2-10.80.tcp", META_KEY]
    assert writes[-1].value is not None
    assert len(writes[-1].value) < 300
    changed = sum(len(w.value or b"") for w in writes)
    assert changed < sum(len(v) for v in first.values.values()) / 5


def test_an_unchanged_state_writes_nothing_and_a_new_generation_writes_only_the_manifest() -> None:
    state = realistic_state()
    first = encode_state(state)
    assert plan_writes(first, encode_state(state)) == []
    assert [w.key for w in plan_writes(first, encode_state(replace(state, generation=9)))] == [META_KEY]


def test_values_are_written_before_deletions_and_the_manifest_comes_last() -> None:
    state = realistic_state()
    grown = one_more_endpoint(state)
    fewer = replace(grown, services=tuple(vs for vs in grown.services if vs.vip != "192.0.2.11"))
    writes = plan_writes(encode_state(state), encode_state(fewer))
    kinds = ["put" if w.value is not None else "delete" for w in writes[:-1]]
    assert kinds == sorted(kinds, key=lambda k: k == "delete")
    assert "put" in kinds
    assert writes[-1].key == META_KEY
    assert {w.key for w in writes if w.value is None} == {
        "vs.192-0-2-11.70.tcp", "vs.192-0-2-11.443.tcp",
        "node.node-a.192-0-2-11.70.tcp", "node.node-b.192-0-2-11.70.tcp",
        "node.node-a.192-0-2-11.443.tcp", "node.node-b.192-0-2-11.443.tcp"}


def test_a_consumer_never_sees_a_partial_picture_whatever_order_the_writes_arrive_in() -> None:
    state = realistic_state()
    old = encode_state(state)
    new_state = one_more_endpoint(state)
    writes = plan_writes(old, encode_state(new_state))
    for seed in range(30):
        a = Assembler()
        for w in plan_writes(None, old):
            a.update(w.key, w.value)
        assert a.complete() == state
        shuffled = list(writes)
        random.Random(seed).shuffle(shuffled)
        for w in shuffled:
            a.update(w.key, w.value)
            got = a.complete()
            assert got is None or got.content_hash in (state.content_hash, new_state.content_hash)
        assert a.complete() == new_state


def test_a_stale_value_under_a_new_manifest_is_not_complete() -> None:
    state = realistic_state()
    a = Assembler()
    for w in plan_writes(None, encode_state(state)):
        a.update(w.key, w.value)
    newer = encode_state(one_more_endpoint(state))
    a.update(META_KEY, newer.meta)  # the manifest overtook its values
    assert a.complete() is None
    assert a.missing() == []  # same count and digests of vips/nodes: only the hash tells
    a.update("vs.192-0-2-10.80.tcp", newer.values["vs.192-0-2-10.80.tcp"])
    assert a.complete() is not None


def test_a_value_that_does_not_decode_keeps_the_state_incomplete_and_says_why() -> None:
    state = realistic_state()
    a = Assembler()
    for w in plan_writes(None, encode_state(state)):
        a.update(w.key, b"{not json" if w.key == "vs.192-0-2-10.80.tcp" else w.value)
    assert a.complete() is None
    assert any(m.startswith("vs.192-0-2-10.80.tcp: ") for m in a.missing())


def test_a_node_sees_its_services_with_only_its_backend() -> None:
    state = realistic_state()
    encoded = encode_state(state)
    node_b = NodeSliceAssembler("node-b")
    for key, value in encoded.values.items():
        node_b.update(key, value)
    got = node_b.slice()
    assert got.services == state.for_node("node-b")
    assert got.vips == ("192.0.2.10", "192.0.2.11", "192.0.2.12", "2001:db8::10")
    assert sorted(k for k in encoded.values if k.startswith("node.node-c.")) == [
        "node.node-c.192-0-2-10.80.tcp", "node.node-c.192-0-2-10.8080.tcp"]


def test_dotted_node_names_cannot_collide_in_keys() -> None:
    assert node_prefix("ip-10-0-0-1.ec2.internal") == "node.ip-10-0-0-1_ec2_internal."
    assert not node_service_key("a.b.c", "192.0.2.1", 80, "tcp").startswith(node_prefix("a.b"))


def test_a_node_value_that_does_not_decode_is_not_applied_and_the_last_good_one_stays() -> None:
    a = NodeSliceAssembler("node-a")
    key = node_service_key("node-a", "192.0.2.10", 80, "tcp")
    a.update(key, encode_state(realistic_state()).values[key])
    before = a.slice()
    assert len(before.services) == 1
    a.update(key, b"garbage")
    assert a.slice() == before  # a value it cannot read takes nothing out of the kernel
    assert key in a.problems
    fresh = NodeSliceAssembler("node-a")
    fresh.update(key, b"garbage")
    assert fresh.slice().services == ()  # and a key that never decoded is never DNATed


@settings(max_examples=60, deadline=None)
@given(st.lists(clusters(), min_size=1, max_size=5))
def test_the_incremental_encoder_always_matches_a_fresh_encoding(history: list[Cluster]) -> None:
    encoder = Encoder()
    previous = None
    for generation, cluster in enumerate(history):
        state = normalize(*cluster, generation=generation)
        delta = encoder.update(state)
        incremental = encoder.snapshot(generation)
        fresh = encode_state(state)
        assert incremental.values == fresh.values
        if previous is not None:  # the delta is exactly the difference (the manifest aside)
            assert [*delta.puts, *delta.deletes] == plan_writes(previous, incremental)[:-1]
        a = Assembler()
        for w in plan_writes(None, incremental):
            a.update(w.key, w.value)
        assert a.complete() == state
        if previous is not None:  # applying the delta to the old bucket gives the new bucket
            bucket = dict(previous.values)
            for w in plan_writes(previous, incremental):
                if w.value is None:
                    bucket.pop(w.key)
                else:
                    bucket[w.key] = w.value
            assert bucket == dict(fresh.values)
        previous = incremental


def test_each_assembled_state_names_what_changed_since_the_previous_one() -> None:
    state = realistic_state()
    a = Assembler()
    for w in plan_writes(None, encode_state(state)):
        a.update(w.key, w.value)
    first = a.complete()
    assert first is not None
    assert first.delta is not None
    assert set(first.delta.changed) == {vs.key for vs in state.services}  # the first names them all
    newer = one_more_endpoint(state)
    for w in plan_writes(encode_state(state), encode_state(newer)):
        a.update(w.key, w.value)
    second = a.complete()
    assert second == newer  # in state order, without a sort at assembly
    assert second is not None
    assert second.delta is not None
    assert (second.delta.lineage, second.delta.seq) == (first.delta.lineage, first.delta.seq + 1)
    changed = {vs.key for old, vs in zip(state.services, newer.services, strict=True) if old != vs}
    assert set(second.delta.changed) == changed
    assert all(item is not None and item[0] in newer.services for item in second.delta.changed.values())
    # A service that goes is named with None; another assembler is another lineage.
    gone = newer.services[0]
    fewer = replace(newer, generation=newer.generation + 1, services=newer.services[1:])
    for w in plan_writes(encode_state(newer), encode_state(fewer)):
        a.update(w.key, w.value)
    third = a.complete()
    assert third == fewer
    assert third is not None
    assert third.delta is not None
    assert third.delta.changed == {gone.key: None}
    assert assemble(plan_writes(None, encode_state(fewer))).delta.lineage != third.delta.lineage  # type: ignore[union-attr]


def test_addresses_from_another_publisher_are_held_in_the_form_the_kernel_reports() -> None:
    """A publisher that spells an address differently (upper case, IPv4 tail, zeros) must not
    make desired and kernel state differ forever: values decode to the canonical form."""
    state = realistic_state()
    encoded = encode_state(state)
    key = next(k for k in encoded.values if k.startswith("vs.") and "2001" in k)
    doc = json.loads(encoded.values[key])
    assert doc["vip"] == "2001:db8::10"
    doc["vip"] = "2001:DB8:0:0::0.0.0.16"
    doc["backends"][0]["endpoints"][0]["address"] = doc["backends"][0]["endpoints"][0]["address"].upper()
    vs = decode_node_service(json.dumps(doc).encode())
    original = next(s for s in state.services if s.vip == "2001:db8::10" and s.port == vs.port)
    assert vs == original


def test_a_manifest_of_version_1_is_still_checked_with_version_1s_hash() -> None:
    """A consumer upgraded before the watcher: the old watcher's manifests carry the hash of every
    digest in order (version 1); they are checked that way, and a wrong one is still refused."""
    state = realistic_state()
    writes = plan_writes(None, encode_state(state))
    meta = json.loads(writes[-1].value or b"")
    assert meta["version"] == 2
    digests = list(state.service_digests)  # in service order, as version 1 hashed them
    assert sorted(digests) == sorted(digest(w.value) for w in writes if w.key.startswith("vs.") and w.value)
    vips = next(w.value for w in writes if w.key == "state.vips")
    assert vips is not None
    v1 = {**meta, "version": 1, "hash": content_hash_v1(vips, digests)}
    got = assemble([*writes[:-1], Write(META_KEY, json.dumps(v1).encode())])
    assert got == state
    assert got is not None
    assert got.content_hash == v1["hash"]
    assert assemble([*writes[:-1], Write(META_KEY, json.dumps({**v1, "hash": meta["hash"]}).encode())]) is None
    future = Assembler()
    for w in [*writes[:-1], Write(META_KEY, json.dumps({**meta, "version": 3}).encode())]:
        future.update(w.key, w.value)
    assert future.complete() is None
    assert "protocol version 3" in future.problems[META_KEY]


def test_the_content_hash_follows_changes_at_any_size() -> None:
    """The running sum an Assembler keeps through hundreds of puts and deletes (several chunks)
    gives the hash a one-shot computation gives."""
    rng = random.Random(7)
    base = realistic_state()
    template = base.services[0]
    services = {port: replace(template, port=port) for port in range(1000, 1700)}
    assembler = Assembler()
    encoder = Encoder()
    for step in range(6):
        for port in rng.sample(sorted(services), 150):
            if rng.random() < 0.5:
                services.pop(port)
            else:
                services[port] = replace(template, port=port, mtu=1280 + step)
        for port in rng.sample(range(1000, 1700), 100):
            services.setdefault(port, replace(template, port=port))
        state = replace(base, generation=step + 1, services=tuple(services[p] for p in sorted(services)))
        if step == 0:
            writes = plan_writes(None, encode_state(state))
            encoder.update(state)
        else:
            writes = encoder.update(state).writes(encoder.meta(step + 1))
        for w in writes:
            assembler.update(w.key, w.value)
        got = assembler.complete()
        assert got is not None, assembler.missing()
        assert got == state
        assert got.content_hash == content_hash(vips_value(state.vips), [service_digest(vs) for vs in state.services])


# ---------------------------------------------------------------------------------------------
# NodeSliceAssembler: slices in proportion to the change, each with what changed since the ones before


# Two spellings of one address (two keys, one service identity: equal sort keys) and one that is no address.
_SLICE_VIPS = ["192.0.2.10", "192.0.2.9", "192.0.2.100", "2001:db8::10", "2001:db8::a", "2001:db8:0::a",
               "192.0.2.10.5"]


def _node_value(vip: str, port: int, pods: int, name: str = "web") -> bytes:
    """A `node.` value as the watcher writes it (any VIP text: a bad one must not decode)."""
    vs = virtual_service("192.0.2.1", port, endpoints=[(f"10.1.1.{i + 2}", 8080) for i in range(pods)])
    doc = json.loads(service_value(replace(vs, service=name)))
    doc["vip"] = vip
    return json.dumps(doc).encode()


_SLICE_OPS = st.one_of(
    st.tuples(st.just("put"), st.sampled_from(_SLICE_VIPS), st.sampled_from([80, 443]), st.integers(1, 3),
              st.sampled_from(["web", "api"])),
    st.tuples(st.just("garbage"), st.sampled_from(_SLICE_VIPS), st.sampled_from([80, 443])),
    st.tuples(st.just("delete"), st.sampled_from(_SLICE_VIPS), st.sampled_from([80, 443])),
    st.tuples(st.just("other-node"), st.sampled_from(_SLICE_VIPS), st.sampled_from([80, 443])),
    st.tuples(st.just("slice")),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(_SLICE_OPS, max_size=40))
def test_node_slices_are_what_sorting_the_held_values_gives_and_their_deltas_lead_from_each_earlier_one(
    ops: list[tuple[Any, ...]]
) -> None:
    a = NodeSliceAssembler("node-a")
    held: dict[str, VirtualService] = {}  # the reference: what the assembler holds, by key
    problems: set[str] = set()
    taken: list[tuple[NodeSlice, dict[str, VirtualService]]] = []
    for op in [*ops, ("slice",)]:
        if op[0] == "slice":
            s = a.slice()
            # As the former implementation made them: a stable sort of the values in key arrival order.
            expected = sorted(held.items(), key=lambda item: item[1].sort_key())
            assert s.services == tuple(vs for _, vs in expected)
            assert s.vips == tuple(dict.fromkeys(vs.vip for vs in s.services))
            assert set(a.problems) == problems
            taken.append((s, {key: vs for (key, _), vs in zip(expected, s.services, strict=True)}))
            continue
        key = node_service_key("node-b" if op[0] == "other-node" else "node-a", op[1], op[2], "tcp")
        if op[0] == "put":
            a.update(key, _node_value(*op[1:]))
            try:
                held[key] = decode_node_service(_node_value(*op[1:]))
                problems.discard(key)
            except ProtocolError:
                problems.add(key)  # and the last good value stays
        elif op[0] == "garbage":
            a.update(key, b"{not json")
            problems.add(key)
        elif op[0] == "delete":
            a.update(key, None)
            held.pop(key, None)
            problems.discard(key)
        else:
            a.update(key, _node_value(op[1], op[2], 1))  # not this node's: ignored

    last, now = taken[-1]
    assert last.delta is not None
    for s, then in taken:
        assert s.delta is not None
        changes = last.delta.since(s.delta.lineage, s.delta.seq)
        if last.delta.seq - s.delta.seq > SLICE_STEPS_KEPT:
            assert changes is None
            continue
        assert changes is not None  # (40 ops change far fewer keys than SLICE_CHANGES_KEPT)
        assert changes == {k: (then.get(k), now.get(k)) for k in then.keys() | now.keys()
                           if then.get(k) is not now.get(k)}
    assert last.delta.since(last.delta.lineage + 1_000_000, last.delta.seq) is None  # another lineage
    assert last.delta.since(last.delta.lineage, last.delta.seq + 1) is None  # a later slice


def test_a_slice_delta_reaches_back_only_so_many_changed_keys() -> None:
    a = NodeSliceAssembler("node-a")
    for i in range(SLICE_CHANGES_KEPT + 1):
        a.update(node_service_key("node-a", "192.0.2.10", 1 + i, "tcp"), _node_value("192.0.2.10", 1 + i, 1))
    first = a.slice()
    a.update(node_service_key("node-a", "192.0.2.10", 1, "tcp"), None)
    second = a.slice()
    assert first.delta is not None
    assert second.delta is not None
    assert len(second.delta.steps) == 1  # the first slice's step named more keys than are kept
    assert second.delta.since(first.delta.lineage, first.delta.seq) == {
        node_service_key("node-a", "192.0.2.10", 1, "tcp"): (first.services[0], None)}
    assert second.delta.since(first.delta.lineage, first.delta.seq - 1) is None


def test_unchanged_chunks_and_vips_are_shared_from_one_slice_to_the_next() -> None:
    a = NodeSliceAssembler("node-a")
    for i in range(2000):
        a.update(node_service_key("node-a", f"192.0.2.{i % 100 + 1}", 1000 + i, "tcp"),
                 _node_value(f"192.0.2.{i % 100 + 1}", 1000 + i, 1))
    first = a.slice()
    a.update(node_service_key("node-a", "192.0.2.1", 1000, "tcp"), _node_value("192.0.2.1", 1000, 2))
    second = a.slice()
    assert isinstance(first.services, Chunked)
    assert isinstance(second.services, Chunked)
    shared = sum(x is y for x, y in zip(first.services.chunks, second.services.chunks, strict=True))
    assert shared == len(first.services.chunks) - 1
    assert second.vips is first.vips  # the same VIPs: the same tuple
    assert second.delta is not None
    assert list(second.delta.changed) == [
        node_service_key("node-a", "192.0.2.1", 1000, "tcp")]
