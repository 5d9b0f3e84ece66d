"""The bad-input corpus (tests/corpus/*.json), fed to the services that consume each input.

Hostile and malformed ConfigMaps and Kubernetes objects go to the watcher's state machine on top
of the realistic cluster; malformed, foreign and oversized values of the cluster-state bucket go
to a director and a realserver that have converged on the realistic state, through the same
assemblers their NATS subscribers use, then through their reconcile loops against the strict
kernel fakes. Every case: a clear reason (a rejection, a skip or a problem naming the key), no
exception, and the last good state stays: the watcher's published content is unchanged, and
the fakes record no kernel change. A few of the bucket values also go through a real
nats-server, written by a foreign publisher, to the real subscribers.
"""

from __future__ import annotations

import asyncio
import copy
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from kube2ipvs.model import ClusterState, content_hash, digest
from kube2ipvs.natskv import KVPublisher, NatsSettings, NodeSliceSubscriber, StateSubscriber
from kube2ipvs.protocol import (
    META_KEY,
    NODES_KEY,
    VIPS_KEY,
    Assembler,
    NodeSlice,
    NodeSliceAssembler,
    Write,
    encode_state,
    encoded_from_values,
    plan_writes,
    service_key,
)
from kube2ipvs.statusserver import source_detail
from kube2ipvs_director.host import FakeHost
from kube2ipvs_director.kernel import FakeIpvs
from kube2ipvs_realserver.kernel import FakeKernel
from kube2ipvs_watcher.app import _service_keys
from kube2ipvs_watcher.core import ConfigRejected, WatcherCore, WatcherSettings
from kube2ipvs_watcher.source import ObjectEvent, Resync
from tests.conftest import realistic_state
from tests.natsfixture import NatsServer, running_nats_server
from tests.test_director_app import director, reconcile
from tests.test_realserver_app import app_with
from tests.test_watcher_core import UNICORNS, configmap, items, synced_core

CORPUS = Path(__file__).parent / "corpus"
NOISE = ("Traceback", "<class", "object at 0x", "Error(")


def corpus(name: str) -> list[dict[str, Any]]:
    cases: list[dict[str, Any]] = json.loads((CORPUS / name).read_text())["cases"]
    return cases


def clean(text: str) -> bool:
    """One printable line without Python internals."""
    return text.isprintable() and not any(n in text for n in NOISE)


def published(core: WatcherCore) -> dict[str, bytes]:
    """What the watcher would publish now (the generation aside)."""
    return dict(encode_state(core.state(generation=1)).values)


# --------------------------------------------------------------------------------------------
# ConfigMaps -> the watcher

CONFIGMAPS = corpus("configmaps.json")
GREEN = WatcherSettings(default_service=UNICORNS, config_key="green")


def hostile_configmap(case: dict[str, Any]) -> dict[str, Any]:
    cm = configmap("{}")
    if "data" in case:
        cm["data"] = case["data"]
    else:
        cm["data"]["green"] = case["text"] if "text" in case else json.dumps(case["lb"])
    return cm


def rejected_alone(cm: dict[str, Any]) -> tuple[ConfigRejected, dict[str, bytes], dict[str, bytes]]:
    core = synced_core(GREEN)
    before = published(core)
    notices = core.apply(ObjectEvent("ConfigMap", "MODIFIED", cm))
    assert len(notices) == 1
    assert isinstance(notices[0], ConfigRejected), notices
    return notices[0], before, published(core)


def test_the_configmap_corpus_names_each_case_once_and_the_realistic_config_is_accepted() -> None:
    names = [c["name"] for c in CONFIGMAPS]
    assert len(names) == len(set(names))
    core = synced_core()
    assert core.ready
    assert core.config_status.problem == ""


@pytest.mark.parametrize("case", CONFIGMAPS, ids=[c["name"] for c in CONFIGMAPS])
def test_a_hostile_configmap_is_rejected_clearly_and_the_published_state_stays(case: dict[str, Any]) -> None:
    core = synced_core(GREEN)
    before = published(core)
    notices = core.apply(ObjectEvent("ConfigMap", "MODIFIED", hostile_configmap(case)))
    assert [type(n) for n in notices] == [ConfigRejected]
    rejected = notices[0]
    assert isinstance(rejected, ConfigRejected)
    assert case["error"] in rejected.reason, rejected.reason
    assert all(clean(e) for e in rejected.errors), rejected.errors
    assert core.config_status.problem.startswith("config rejected: ")
    assert published(core) == before


def generated_configmaps() -> dict[str, tuple[dict[str, Any] | str, str]]:
    entry = {"namespace": "shop", "service": "web", "portName": "http"}
    many: dict[str, dict[str, object]] = {f"192.0.2.{i // 250}": {} for i in range(1000)}
    for i in range(1000):
        many[f"192.0.2.{i // 250}"][str(i + 1)] = {**entry, "service": f"Bad{i}"}
    return {
        "a 2 MiB value": ({"vipPool": ["192.0.2.10"], "note": "x" * (2 << 20)}, "the limit is 1048576 bytes"),
        "a value nested 100000 deep": ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        "objects nested 100000 deep under config": ('{"config": ' + '{"a":' * 100_000 + "1" + "}" * 100_001,
                                                    "nested too deeply"),
        "a name of 100000 characters": ({"config": {"192.0.2.10": {"80": {**entry, "service": "w" * 100_000}}}},
                                        "is not a valid Kubernetes service name"),
        "1000 bad entries": ({"config": many}, "... and 800 more"),
        "an int of 5000 digits": ('{"mtuConfig": {"192.0.2.10": 1' + "0" * 5000 + "}}", "not valid JSON"),
    }


GENERATED = generated_configmaps()


@pytest.mark.parametrize("name", GENERATED)
def test_a_huge_or_deep_configmap_is_rejected_clearly_and_the_published_state_stays(name: str) -> None:
    value, fragment = GENERATED[name]
    rejected, before, after = rejected_alone(configmap(value))
    assert fragment in rejected.reason
    assert len(rejected.reason) < 20_000  # shortened, not echoed
    assert all(clean(e) for e in rejected.errors)
    assert after == before


def test_after_a_run_of_rejections_the_good_config_again_changes_nothing() -> None:
    core = synced_core(GREEN)
    before = published(core)
    for case in CONFIGMAPS:
        core.apply(ObjectEvent("ConfigMap", "MODIFIED", hostile_configmap(case)))
    assert published(core) == before
    good = items("configmap")[0]
    assert [type(n).__name__ for n in core.apply(ObjectEvent("ConfigMap", "MODIFIED", good))] == ["ConfigAccepted"]
    assert core.config_status.problem == ""
    assert published(core) == before


# --------------------------------------------------------------------------------------------
# Kubernetes objects -> the watcher

OBJECTS = corpus("kube_objects.json")


def content(state: ClusterState) -> tuple[str, tuple[str, ...]]:
    return state.content_hash, state.vips


def test_the_object_corpus_names_each_case_once() -> None:
    names = [c["name"] for c in OBJECTS]
    assert len(names) == len(set(names))


@pytest.mark.parametrize("case", OBJECTS, ids=[c["name"] for c in OBJECTS])
def test_a_malformed_object_event_is_skipped_or_ignored_and_the_published_content_stays(case: dict[str, Any]) -> None:
    core = synced_core()
    before = content(core.state(generation=1))
    core.apply(ObjectEvent(case["kind"], case["event"], copy.deepcopy(case["object"])))
    state = core.state(generation=1)
    assert content(state) == before
    reasons = [s.reason for s in state.skipped]
    assert all(clean(r) for r in reasons), reasons
    expect: str = case["expect"]
    if expect.startswith("skipped: "):
        assert any(expect.removeprefix("skipped: ") in r for r in reasons), reasons
    else:
        assert expect == "unchanged"
        assert not any(r.startswith("malformed") for r in reasons), reasons


def test_the_whole_object_corpus_in_the_initial_lists_gives_the_realistic_content() -> None:
    core = WatcherCore(synced_core().settings, clock=lambda: 0.0)
    extra: dict[str, list[dict[str, Any]]] = {"Node": [], "Service": [], "EndpointSlice": []}
    for case in OBJECTS:
        extra[case["kind"]].append(copy.deepcopy(case["object"]))
    for kind, name in (("Node", "nodes"), ("Service", "services"), ("EndpointSlice", "endpointslices")):
        core.apply(Resync(kind, (*items(name), *extra[kind])))  # type: ignore[arg-type]
    core.apply(Resync("ConfigMap", tuple(items("configmap"))))
    state = core.state(generation=1)
    assert content(state) == content(realistic_state())
    reasons = [s.reason for s in state.skipped if s.reason.startswith("malformed")]
    for case in OBJECTS:
        if case["expect"].startswith("skipped: "):
            assert any(case["expect"].removeprefix("skipped: ") in r for r in reasons), case["name"]


def test_a_good_object_made_malformed_by_a_later_event_keeps_its_last_good_form() -> None:
    core = synced_core()
    before = content(core.state(generation=1))
    web = next(o for o in items("endpointslices") if o["metadata"]["name"] == "web-4xk2p")
    broken = copy.deepcopy(web)
    broken["metadata"]["namespace"] = "shop; flush ruleset"  # another object, skipped
    core.apply(ObjectEvent("EndpointSlice", "MODIFIED", broken))
    no_meta = {k: v for k, v in web.items() if k != "metadata"}
    core.apply(ObjectEvent("EndpointSlice", "MODIFIED", no_meta))
    assert content(core.state(generation=1)) == before


def test_an_ipv4_mapped_endpoint_address_counts_as_its_ipv4_address() -> None:
    """Kubernetes (Go's net.ParseIP) reads `::ffff:10.1.2.2` as 10.1.2.2 and accepts it in an
    IPv4 slice: the same pod, so the same weight, and the realserver can DNAT to it."""
    core = synced_core()
    before = core.state(generation=1)
    web = next(o for o in items("endpointslices") if o["metadata"]["name"] == "web-4xk2p")
    mapped = copy.deepcopy(web)
    for ep in mapped["endpoints"]:
        ep["addresses"] = ["::ffff:" + ep["addresses"][0]]
    core.apply(ObjectEvent("EndpointSlice", "MODIFIED", mapped))
    assert content(core.state(generation=1)) == content(before)


# --------------------------------------------------------------------------------------------
# Bucket values -> the director and the realserver

VALUES = corpus("nats_values.json")
STATE = realistic_state()
ENCODED = dict(encode_state(STATE).values)
NODE = "node-b"
TARGET = {"vs": "vs.192-0-2-10.80.tcp", "node": f"node.{NODE}.192-0-2-10.80.tcp", "meta": META_KEY,
          "vips": VIPS_KEY, "nodes": NODES_KEY}


def _at(doc: Any, path: list[Any]) -> tuple[Any, Any]:
    for step in path[:-1]:
        doc = doc[step]
    return doc, path[-1]


def bad_value(case: dict[str, Any]) -> bytes:
    good = ENCODED[TARGET[case["key"]]]
    if "text" in case:
        return str(case["text"]).encode()
    if "hex" in case:
        return bytes.fromhex(case["hex"])
    if "truncate" in case:
        return good[: case["truncate"]]
    if case.get("generate") == "deep":
        return b"[" * 100_000 + b"]" * 100_000
    if case.get("generate") == "huge":
        return b'{"vip": "' + b"\x00\xff" * (1 << 20)
    doc = json.loads(good)
    for path, value in case.get("set", []):
        parent, last = _at(doc, path)
        parent[last] = value
    for path in case.get("delete", []):
        parent, last = _at(doc, path)
        del parent[last]
    text = json.dumps(doc, separators=(",", ":"))
    return text.replace('"port":"NaN"', '"port":NaN').encode() if case.get("raw_nan") else text.encode()


def foreign_writes(key: str, value: bytes) -> dict[str, bytes]:
    """`key` := `value`, with a manifest whose digests and hash match the new values, as another
    publisher that knows the protocol would write it."""
    values = {**ENCODED, key: value}
    in_order = [service_key(*vs.key) for vs in STATE.services]  # the hash's order: VIP, port, protocol
    meta = json.loads(ENCODED[META_KEY])
    meta.update(hash=content_hash(values[VIPS_KEY], [digest(values[k]) for k in in_order]),
                vips=digest(values[VIPS_KEY]), nodes=digest(values[NODES_KEY]))
    return {key: value, META_KEY: json.dumps(meta, separators=(",", ":")).encode()}


def test_the_value_corpus_names_each_case_once_per_key_and_targets_keys_of_the_state() -> None:
    names = [(c["key"], c["name"]) for c in VALUES]
    assert len(names) == len(set(names))
    assert all(TARGET[c["key"]] in ENCODED for c in VALUES)


@dataclass
class ConvergedDirector:
    assembler: Assembler = field(default_factory=Assembler)
    ipvs: FakeIpvs = field(default_factory=FakeIpvs)
    host: FakeHost = field(default_factory=FakeHost)

    def __post_init__(self) -> None:
        for key, value in ENCODED.items():
            self.assembler.update(key, value)
        state = self.assembler.complete()
        assert state is not None
        self.app = director(self.ipvs, self.host)
        reconcile(self.app, state)
        assert self.app.apply_error is None
        self.ipvs.batches.clear()
        self.host.batches.clear()

    def receive(self, writes: dict[str, bytes]) -> ClusterState | None:
        for key, value in writes.items():
            self.assembler.update(key, value)
        state = self.assembler.complete()
        reconcile(self.app, state)  # a resync when nothing new came: it must change nothing either
        return state


DIRECTOR_CASES = [c for c in VALUES if c["key"] != "node"]


@pytest.mark.parametrize("foreign", [False, True], ids=["alone", "with a matching manifest"])
@pytest.mark.parametrize("case", DIRECTOR_CASES, ids=[f"{c['key']}: {c['name']}" for c in DIRECTOR_CASES])
def test_a_bad_bucket_value_changes_nothing_in_a_directors_kernel(case: dict[str, Any], foreign: bool) -> None:
    d = ConvergedDirector()
    key = TARGET[case["key"]]
    value = bad_value(case)
    state = d.receive(foreign_writes(key, value) if foreign and key != META_KEY else {key: value})
    assert d.ipvs.batches == []
    assert d.host.batches == []
    assert d.app.apply_error is None
    expect: str = case["expect"]
    if expect.startswith("rejected: "):
        assert state is None
        problem = d.assembler.problems.get(key, "")
        assert expect.removeprefix("rejected: ") in problem, d.assembler.problems
        assert clean(problem)
    elif expect == "incomplete":
        assert state is None
    else:
        assert expect == "ignored"
        assert state is None or state.services == STATE.services


@pytest.mark.parametrize("case", [c for c in VALUES if c["key"] == "node"],
                         ids=[c["name"] for c in VALUES if c["key"] == "node"])
def test_a_bad_node_value_changes_nothing_in_a_realservers_kernel(case: dict[str, Any]) -> None:
    assembler = NodeSliceAssembler(NODE)
    for key, value in ENCODED.items():
        assembler.update(key, value)
    kernel = FakeKernel(devices={"lo", "eth0", "tunl0"})  # the realistic state has an IPIP service
    app = app_with(kernel)
    app.offer(assembler.slice())
    asyncio.run(app.reconcile_once())
    assert app.health().ok, app.health().reason
    kernel.changes.clear()
    key = TARGET["node"]
    assembler.update(key, bad_value(case))
    app.offer(assembler.slice())
    assert asyncio.run(app.reconcile_once()) == []
    assert kernel.changes == []
    assert app.health().ok, app.health().reason
    expect: str = case["expect"]
    if expect.startswith("rejected: "):
        assert expect.removeprefix("rejected: ") in assembler.problems.get(key, ""), assembler.problems
        assert clean(assembler.problems[key])
    else:
        assert expect == "ignored"
        assert key not in assembler.problems


def test_a_bad_value_of_a_key_the_realserver_never_had_adds_nothing() -> None:
    assembler = NodeSliceAssembler(NODE)
    for key, value in ENCODED.items():
        assembler.update(key, value)
    before = assembler.slice()
    for case in [c for c in VALUES if c["key"] == "node" and c["expect"] != "ignored"]:
        assembler.update(f"node.{NODE}.192-0-2-99.80.tcp", bad_value(case))
        assert assembler.slice() == before


def test_every_bad_value_at_every_key_is_only_ever_recorded_as_a_problem() -> None:
    """Every value of the corpus, to every key of the protocol: no exception escapes the
    assemblers' `update`, `complete` or `slice`."""
    bad = [bad_value(c) for c in VALUES]
    for key in ENCODED:
        a, n = Assembler(), NodeSliceAssembler(NODE)
        for k, v in ENCODED.items():
            a.update(k, v)
            n.update(k, v)
        for value in bad:
            a.update(key, value)
            n.update(key, value)
            a.complete()
            n.slice()


def test_a_watcher_reading_back_a_bucket_of_bad_values_keeps_the_good_keys_as_its_baseline() -> None:
    """After a restart the watcher reads the bucket for its mass-removal baseline; a deeply nested
    value there raised RecursionError out of the reader and stopped the watcher."""
    values = dict(ENCODED)
    for i, case in enumerate(c for c in VALUES if c["key"] == "vs"):
        values[f"vs.192-0-2-99.{i + 1}.tcp"] = bad_value(case)
    assert _service_keys(encoded_from_values(values)) == {vs.key for vs in STATE.services}


# --------------------------------------------------------------------------------------------
# The same values through a real nats-server, written by a foreign publisher


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    with running_nats_server(tmp_path / "nats") as server:
        yield server


def nats_settings(server: NatsServer) -> NatsSettings:
    return NatsSettings(servers=(server.url,), reconnect_wait=0.1, connect_timeout=1.0, request_timeout=2.0)


async def status_says(subscriber: StateSubscriber | NodeSliceSubscriber, fragment: str) -> None:
    async with asyncio.timeout(15):
        while fragment not in subscriber.status:
            await asyncio.sleep(0.02)  # the status line has no event of its own


SENT = {"vs": "VIP with nft syntax", "node": "wrong version", "vips": "vips with nft syntax"}


def test_foreign_values_in_a_real_bucket_hand_nothing_over_and_the_republished_state_flows_again(
    nats_server: NatsServer,
) -> None:
    """Subscribers say which key they rejected and hand over nothing new; once the watcher
    writes its values again, they are back in sync, and every hand-over was the good state."""
    picked = [next(c for c in VALUES if c["key"] == key and c["name"] == name) for key, name in SENT.items()]

    async def scenario() -> None:
        async with KVPublisher(nats_settings(nats_server)) as pub, \
                StateSubscriber(nats_settings(nats_server)) as states, \
                NodeSliceSubscriber(nats_settings(nats_server), NODE) as slices:
            await pub.publish(plan_writes(None, encode_state(STATE)))
            handed_states: list[ClusterState] = [await asyncio.wait_for(anext(states.states()), 15)]
            handed_slices: list[NodeSlice] = [await asyncio.wait_for(anext(slices.slices()), 15)]
            good_slice = handed_slices[0]

            async def collect() -> None:
                async def take_states() -> None:
                    async for s in states.states():
                        handed_states.append(s)

                async def take_slices() -> None:
                    async for s in slices.slices():
                        handed_slices.append(s)
                await asyncio.gather(take_states(), take_slices())

            collector = asyncio.create_task(collect())
            try:
                for case in picked:
                    key = TARGET[case["key"]]
                    writes = foreign_writes(key, bad_value(case)) if key != TARGET["node"] else {key: bad_value(case)}
                    await pub.publish([Write(k, v) for k, v in writes.items()])
                await status_says(slices, "values rejected: " + TARGET["node"])
                await status_says(states, "syncing: ")
                # What /healthz shows of them (statusserver.source_detail): each refused key and why.
                assert set(states.rejected) == {TARGET["vs"], TARGET["vips"]}, states.rejected
                assert set(slices.rejected) == {TARGET["node"]}, slices.rejected
                assert "version 3" in slices.rejected[TARGET["node"]]
                detail = source_detail(slices)
                assert detail["rejected_values"] == 1
                assert list(detail["rejected"]) == [TARGET["node"]]
                await pub.publish(plan_writes(None, encode_state(STATE)))  # the watcher's next full publish
                await status_says(states, "in sync")
                await status_says(slices, "in sync")
                assert states.rejected == {}
                assert slices.rejected == {}
                assert source_detail(states) == {"state_source": "in sync", "rejected_values": 0}
            finally:
                collector.cancel()
                await asyncio.gather(collector, return_exceptions=True)
            assert all(s.content_hash == STATE.content_hash for s in handed_states)
            assert all(s == good_slice for s in handed_slices)

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_health_shows_the_first_refused_keys_and_how_many_there_are() -> None:
    class Source:
        def __init__(self) -> None:
            self.status = "syncing: vs.a"
            self.rejected = {f"vs.{i:03d}": "not JSON" for i in range(25)}

    detail = source_detail(Source())
    assert detail["state_source"] == "syncing: vs.a"
    assert detail["rejected_values"] == 25
    assert list(detail["rejected"]) == [f"vs.{i:03d}" for i in range(10)]
    assert source_detail(None) == {}
