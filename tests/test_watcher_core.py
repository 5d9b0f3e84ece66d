"""The watcher's state machine: initial sync, incremental updates, config rejection and the removal guard."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

from kube2ipvs.kube import parse_endpointslices, parse_nodes, parse_services
from kube2ipvs.lbconfig import DefaultService
from kube2ipvs.normalize import normalize
from kube2ipvs_watcher.core import (
    CONFIRM_ANNOTATION,
    ConfigAccepted,
    ConfigHeld,
    ConfigRejected,
    WatcherCore,
    WatcherSettings,
    confirm_token,
)
from kube2ipvs_watcher.source import KINDS, ObjectEvent, Resync
from tests.conftest import REALISTIC, realistic_state

UNICORNS = DefaultService.parse("rdei-system/unicorns:http", 70)


def items(name: str) -> list[dict[str, Any]]:
    doc = json.loads((REALISTIC / f"{name}.json").read_text())
    found: list[dict[str, Any]] = doc.get("items", [doc])
    return found


def configmap(lb: dict[str, Any] | str, annotations: dict[str, str] | None = None) -> dict[str, Any]:
    cm: dict[str, Any] = json.loads((REALISTIC / "configmap.json").read_text())
    cm["data"]["green"] = lb if isinstance(lb, str) else json.dumps(lb)
    if annotations:
        cm["metadata"]["annotations"] = annotations
    return cm


def synced_core(settings: WatcherSettings | None = None) -> WatcherCore:
    core = WatcherCore(settings or WatcherSettings(default_service=UNICORNS), clock=lambda: 100.0)
    core.apply(Resync("Node", tuple(items("nodes"))))
    core.apply(Resync("Service", tuple(items("services"))))
    core.apply(Resync("EndpointSlice", tuple(items("endpointslices"))))
    core.apply(Resync("ConfigMap", tuple(items("configmap"))))
    return core


def lb_value() -> dict[str, Any]:
    cm = json.loads((REALISTIC / "configmap.json").read_text())
    value: dict[str, Any] = json.loads(cm["data"]["green"])
    return value


def test_nothing_is_ready_until_every_kind_had_its_initial_list() -> None:
    core = WatcherCore(WatcherSettings(), clock=lambda: 0.0)
    for kind in KINDS[:-1]:
        core.apply(Resync(kind, ()))
        assert not core.ready
    assert core.waiting_for == ["initial list of ConfigMap", "a valid LB config"]
    core.apply(Resync("ConfigMap", ()))
    assert core.ready


def test_after_the_initial_lists_the_state_is_what_normalize_gives() -> None:
    core = synced_core()
    assert core.ready
    assert core.state(generation=1) == replace(realistic_state(), generation=1)


def test_a_watch_event_updates_only_what_it_touches() -> None:
    core = synced_core()
    before = core.state(generation=1)
    web = next(o for o in items("endpointslices") if o["metadata"]["name"] == "web-4xk2p")
    web["endpoints"] = [e for e in web["endpoints"] if e["nodeName"] != "node-b"]
    core.apply(ObjectEvent("EndpointSlice", "MODIFIED", web))
    after = core.state(generation=2)
    changed = {vs.key for vs in after.services} ^ {vs.key for vs in before.services}
    assert changed == set()
    diff = [vs.key for vs, old in zip(after.services, before.services, strict=True) if vs != old]
    assert diff == [("192.0.2.10", 80, "tcp"), ("192.0.2.10", 8080, "tcp")]


def test_a_node_going_not_ready_removes_its_backends() -> None:
    core = synced_core()
    node_b = next(o for o in items("nodes") if o["metadata"]["name"] == "node-b")
    for c in node_b["status"]["conditions"]:
        if c["type"] == "Ready":
            c["status"] = "False"
    core.apply(ObjectEvent("Node", "MODIFIED", node_b))
    state = core.state(generation=2)
    assert all(b.node != "node-b" for vs in state.services for b in vs.backends)
    assert next(n for n in state.nodes if n.name == "node-b").reason == "not Ready"


def test_deleted_objects_leave_the_state() -> None:
    core = synced_core()
    api = next(o for o in items("services") if o["metadata"]["name"] == "api")
    core.apply(ObjectEvent("Service", "DELETED", api))
    skipped = {s.subject: s.reason for s in core.state(generation=2).skipped}
    assert skipped["192.0.2.11:443/tcp"] == "service shop/api not found"


def test_a_bad_config_is_rejected_and_the_last_good_one_stays_in_force() -> None:
    core = synced_core()
    before = core.state(generation=1)
    bad = lb_value()
    bad["config"]["192.0.2.10"]["80"]["ipvsOptions"]["scheduler"] = "fastest"
    notices = core.apply(ObjectEvent("ConfigMap", "MODIFIED", configmap(bad)))
    assert len(notices) == 1
    assert isinstance(notices[0], ConfigRejected)
    assert 'config."192.0.2.10"."80".ipvsOptions.scheduler: "fastest" is not one of' in notices[0].reason
    assert core.config_status.problem.startswith("config rejected: ")
    assert core.config_status.since == 100.0
    assert core.state(generation=2).services == before.services
    good = lb_value()
    assert isinstance(core.apply(ObjectEvent("ConfigMap", "MODIFIED", configmap(good)))[0], ConfigAccepted)
    assert core.config_status.problem == ""


def test_a_config_removing_most_services_is_held_until_confirmed_for_that_exact_text() -> None:
    core = synced_core()
    before = core.state(generation=1)
    small = lb_value()
    small["config"] = {"192.0.2.10": small["config"]["192.0.2.10"]}
    small["config6"] = {}
    small["vipPool"] = ["192.0.2.10"]
    text = json.dumps(small)
    (held,) = core.apply(ObjectEvent("ConfigMap", "MODIFIED", configmap(text)))
    assert isinstance(held, ConfigHeld)
    assert held.token == confirm_token(text)
    assert f"{CONFIRM_ANNOTATION}={held.token}" in core.config_status.problem
    assert core.state(generation=2).services == before.services
    stale = {CONFIRM_ANNOTATION: confirm_token(text + " ")}
    assert isinstance(core.apply(ObjectEvent("ConfigMap", "MODIFIED", configmap(text, stale)))[0], ConfigHeld)
    confirmed = {CONFIRM_ANNOTATION: held.token}
    assert isinstance(core.apply(ObjectEvent("ConfigMap", "MODIFIED", configmap(text, confirmed)))[0],
                      ConfigAccepted)
    assert {vs.vip for vs in core.state(generation=3).services} == {"192.0.2.10"}


def test_deleting_the_configmap_is_a_removal_the_guard_holds() -> None:
    core = synced_core()
    (held,) = core.apply(ObjectEvent("ConfigMap", "DELETED", configmap(lb_value())))
    assert isinstance(held, ConfigHeld)
    assert held.token == "delete"
    assert core.state(generation=2).services


def test_after_a_restart_the_published_services_are_the_guards_baseline() -> None:
    core = WatcherCore(WatcherSettings(), clock=lambda: 0.0)
    published = realistic_state()
    core.set_in_force_keys(frozenset(vs.key for vs in published.services))
    for kind in ("Node", "Service", "EndpointSlice"):
        core.apply(Resync(kind, ()))
    notices = core.apply(Resync("ConfigMap", ()))
    assert isinstance(notices[0], ConfigHeld)
    assert not core.ready  # nothing is published: the bucket keeps serving what it serves


def test_other_configmaps_are_ignored_and_malformed_objects_are_skipped_with_a_reason() -> None:
    core = synced_core()
    other = configmap("{not json")
    other["metadata"]["name"] = "something-else"
    assert core.apply(ObjectEvent("ConfigMap", "MODIFIED", other)) == []
    core.apply(ObjectEvent("Node", "ADDED", {"kind": "Node", "metadata": {}}))
    assert any(s.reason == "malformed: metadata.name is missing" for s in core.state(generation=2).skipped)


def test_the_state_matches_a_from_scratch_normalize_after_events() -> None:
    core = synced_core(WatcherSettings())
    for obj in items("endpointslices"):
        obj["endpoints"] = obj["endpoints"][:1]
        core.apply(ObjectEvent("EndpointSlice", "MODIFIED", obj))
    want = normalize(parse_nodes(items("nodes"))[0], parse_services(items("services"))[0],
                     parse_endpointslices([{**o, "endpoints": o["endpoints"][:1]}
                                           for o in items("endpointslices")])[0],
                     core.config, generation=4)
    assert core.state(generation=4) == want


# -- a config split over several ConfigMaps (--configmap-selector) ------------------------------

SHARDED = WatcherSettings(default_service=UNICORNS, configmap_selector=(("kube2ipvs.io/config", "green"),))


def shard(name: str, lb: dict[str, Any], labels: dict[str, str] | None = None,
          annotations: dict[str, str] | None = None) -> dict[str, Any]:
    cm = configmap(lb, annotations)
    cm["metadata"]["name"] = name
    cm["metadata"]["uid"] = f"uid-{name}"
    cm["metadata"]["labels"] = {"kube2ipvs.io/config": "green"} if labels is None else labels
    return cm


def split(lb: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The realistic config in two halves: the first VIP in one, everything else in the other."""
    first = next(iter(lb["config"]))
    a = {**lb, "config": {first: lb["config"][first]}, "config6": {}}
    b = {**lb, "config": {k: v for k, v in lb["config"].items() if k != first}}
    return a, b


def sharded_core(*shards: dict[str, Any], settings: WatcherSettings = SHARDED) -> WatcherCore:
    core = WatcherCore(settings, clock=lambda: 100.0)
    core.apply(Resync("Node", tuple(items("nodes"))))
    core.apply(Resync("Service", tuple(items("services"))))
    core.apply(Resync("EndpointSlice", tuple(items("endpointslices"))))
    core.apply(Resync("ConfigMap", shards))
    return core


def test_a_config_split_over_labelled_configmaps_is_the_config_they_make_together() -> None:
    a, b = split(lb_value())
    unlabelled = shard("not-ours", {"config": {"192.0.2.99": lb_value()["config"]["192.0.2.10"]}}, labels={})
    core = sharded_core(shard("lb-a", a), shard("lb-b", b), unlabelled)
    assert core.ready
    assert core.state(generation=1) == replace(realistic_state(), generation=1)
    assert "192.0.2.99" not in core.config.vips()


def test_a_shard_changing_or_leaving_changes_only_its_part() -> None:
    a, b = split(lb_value())
    core = sharded_core(shard("lb-a", a), shard("lb-b", b))
    whole = core.config
    first = next(iter(a["config"]))
    # lb-a loses its label: its VIP:ports go (a small share: not held back)
    notices = core.apply(ObjectEvent("ConfigMap", "MODIFIED", shard("lb-a", a, labels={"other": "x"})))
    assert notices == [ConfigAccepted(entries=len(core.config.entries), warnings=())]
    served = {e.vip for e in whole.entries if e.port != 70}
    assert {e.vip for e in core.config.entries if e.port != 70} == served - {first}
    core.apply(ObjectEvent("ConfigMap", "ADDED", shard("lb-a", a)))
    assert core.config == whole
    core.apply(ObjectEvent("ConfigMap", "DELETED", shard("lb-a", a)))
    assert first not in {e.vip for e in core.config.entries if e.port != 70}
    # an unrelated ConfigMap in another namespace changes nothing
    other = shard("lb-a", a)
    other["metadata"]["namespace"] = "elsewhere"
    assert core.apply(ObjectEvent("ConfigMap", "ADDED", other)) == []


def test_a_vip_port_in_two_shards_rejects_the_merge_naming_both_and_keeps_the_last_good_config() -> None:
    a, b = split(lb_value())
    core = sharded_core(shard("lb-a", a), shard("lb-b", b))
    good = core.config
    first = next(iter(a["config"]))
    clash = {**b, "config": {**b["config"], first: a["config"][first]}}
    notices = core.apply(ObjectEvent("ConfigMap", "MODIFIED", shard("lb-b", clash)))
    assert len(notices) == 1
    rejected = notices[0]
    assert isinstance(rejected, ConfigRejected)
    port = next(iter(a["config"][first]))
    assert f'ConfigMap lb-b, config."{first}"."{port}": also configured in ConfigMap lb-a' in rejected.errors
    assert (rejected.name, rejected.uid) == ("lb-b", "uid-lb-b")  # the Event goes on the shard at fault
    assert core.config == good
    assert core.config_status.problem.startswith("config rejected: ConfigMap lb-b")


def test_a_bad_shard_is_named_and_rejects_the_whole() -> None:
    a, b = split(lb_value())
    core = sharded_core(shard("lb-a", a), shard("lb-b", b))
    good = core.config
    first = next(iter(a["config"]))
    port = next(iter(a["config"][first]))
    bad = json.loads(json.dumps(a))
    bad["config"][first][port]["ipvsOptions"] = {"scheduler": "fastest"}
    [rejected] = core.apply(ObjectEvent("ConfigMap", "MODIFIED", shard("lb-a", bad)))
    assert isinstance(rejected, ConfigRejected)
    assert rejected.name == "lb-a"
    where = f'ConfigMap lb-a, config."{first}"."{port}".ipvsOptions.scheduler: '
    assert any(e.startswith(where) for e in rejected.errors)
    assert core.config == good


def test_conflicting_labels_or_mtus_across_shards_are_rejected() -> None:
    a, b = split(lb_value())
    core = sharded_core(shard("lb-a", {**a, "labels": {"zone": "x"}}), shard("lb-b", {**b, "labels": {"zone": "y"}}))
    assert not core.ready
    problem = core.config_status.problem
    assert "ConfigMap lb-b, labels.\"zone\": 'y' here, 'x' in ConfigMap lb-a" in problem
    core = sharded_core(shard("lb-a", {**a, "mtuConfig": {"192.0.2.10": "1400"}}),
                        shard("lb-b", {**b, "mtuConfig": {"192.0.2.10": "9000"}}))
    assert "mtuConfig.\"192.0.2.10\": 9000 here, 1400 in ConfigMap lb-a" in core.config_status.problem


def test_removing_most_of_a_split_config_is_held_until_any_shard_confirms_it() -> None:
    a, b = split(lb_value())
    core = sharded_core(shard("lb-a", a), shard("lb-b", b), settings=replace(SHARDED, max_removal_share=0.1))
    good = core.config
    [held] = core.apply(ObjectEvent("ConfigMap", "DELETED", shard("lb-b", b)))
    assert isinstance(held, ConfigHeld)
    assert "annotate any one of the LB ConfigMaps" in held.reason
    assert core.config == good
    [accepted] = core.apply(ObjectEvent("ConfigMap", "MODIFIED", shard("lb-a", a, annotations={
        CONFIRM_ANNOTATION: held.token})))
    assert isinstance(accepted, ConfigAccepted)
    assert core.config != good
