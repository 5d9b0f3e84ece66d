"""The watcher's Kubernetes adapter, driven through the real kubernetes-asyncio client against the
in-process fake API server (tests/fakes/kubeapi.py): list/watch semantics, outages, leader election
and Events. Each test runs its own event loop (`asyncio.run`) and waits on conditions, with a
deadline, rather than sleeping."""

from __future__ import annotations

import asyncio
import copy
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import aiohttp
import pytest

from kube2ipvs.kubeclient import KubeConfigError, load_api_client
from kube2ipvs_watcher.core import WatcherCore, WatcherSettings
from kube2ipvs_watcher.kube import (
    EventRecorder,
    KubeSource,
    LeaderElector,
)
from kube2ipvs_watcher.source import KINDS, Kind, ObjectEvent, Resync, SourceItem, object_key
from tests.conftest import REALISTIC
from tests.fakes.kubeapi import FakeKubeAPI, RecordedRequest, realistic_objects

JSON = dict[str, Any]
LB_NAMESPACE, LB_NAME = "platform-load-balancer", "kube2ipvs"
SCENARIO_TIMEOUT = 20.0


# ---- harness ---------------------------------------------------------------------------------------


class RecordingSink:
    """Keeps what the source put, a cache built from it, and every ordering violation it saw."""

    def __init__(self) -> None:
        self.items: list[SourceItem] = []
        self.cache: dict[Kind, dict[str, JSON]] = {kind: {} for kind in KINDS}
        self.violations: list[str] = []
        self._synced: set[Kind] = set()
        self._changed = asyncio.Event()

    def put_nowait(self, item: SourceItem) -> None:
        self.items.append(item)
        if isinstance(item, Resync):
            self._synced.add(item.kind)
            self.cache[item.kind] = {object_key(o): o for o in item.objects}
        else:
            if item.kind not in self._synced:
                self.violations.append(f"{item.type} {item.kind} {object_key(item.obj)} before its Resync")
            if item.type == "DELETED":
                self.cache[item.kind].pop(object_key(item.obj), None)
            else:
                self.cache[item.kind][object_key(item.obj)] = item.obj
        self._changed.set()

    def resyncs(self, kind: Kind) -> list[Resync]:
        return [i for i in self.items if isinstance(i, Resync) and i.kind == kind]

    def events(self, kind: Kind) -> list[ObjectEvent]:
        return [i for i in self.items if isinstance(i, ObjectEvent) and i.kind == kind]

    async def wait_until(self, predicate: Callable[[], bool], *, timeout: float = 5.0, what: str = "") -> None:
        try:
            async with asyncio.timeout(timeout):
                while not predicate():
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}") from None


async def eventually(predicate: Callable[[], bool], *, timeout: float = 5.0, what: str = "") -> None:
    """For state that signals nothing (the source's counters): re-check every 10 ms until a deadline."""
    try:
        async with asyncio.timeout(timeout):
            while not predicate():
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}") from None


@dataclass
class Cluster:
    api: FakeKubeAPI
    kubeconfig: Path
    sink: RecordingSink = field(default_factory=RecordingSink)
    source: KubeSource | None = None

    def server_objects(self, kind: Kind) -> dict[str, JSON]:
        objects = self.api.objects(kind)
        if kind == "ConfigMap":
            objects = [o for o in objects if object_key(o) == f"{LB_NAMESPACE}/{LB_NAME}"]
        return {object_key(o): o for o in objects}

    def in_sync(self) -> bool:
        return all(self.sink.cache[kind] == self.server_objects(kind) for kind in KINDS)

    def all_resynced(self, times: int = 1) -> bool:
        return all(len(self.sink.resyncs(kind)) >= times for kind in KINDS)


def seed(api: FakeKubeAPI) -> None:
    for obj in realistic_objects(*sorted(REALISTIC.glob("*.json"))):
        api.create(obj)
    # Decoys the ConfigMap watch must not see: another ConfigMap in its namespace, the same name elsewhere.
    api.create({"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"namespace": LB_NAMESPACE, "name": "unrelated"}, "data": {"k": "v"}})
    api.create({"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"namespace": "default", "name": LB_NAME}, "data": {"green": "{}"}})


Scenario = Callable[[Cluster], Awaitable[None]]


def run(tmp_path: Path, scenario: Scenario, *, start_source: bool = True, seed_objects: bool = True,
        fake_options: dict[str, Any] | None = None, **source_options: Any) -> None:
    """Start the fake (seeded with the realistic cluster) and, unless told not to, a KubeSource on it;
    run the scenario; then check that no ObjectEvent ever preceded its kind's Resync."""

    async def main() -> None:
        async with FakeKubeAPI(**(fake_options or {})) as api:
            if seed_objects:
                seed(api)
            cluster = Cluster(api, api.write_kubeconfig(tmp_path / "kubeconfig"))
            async with asyncio.timeout(SCENARIO_TIMEOUT):
                if not start_source:
                    await scenario(cluster)
                    return
                options = {"backoff_initial": 0.05, "backoff_max": 0.4, **source_options}
                async with source_running(cluster, **options):
                    await scenario(cluster)
            assert cluster.sink.violations == []

    asyncio.run(main())


@asynccontextmanager
async def source_running(cluster: Cluster, *, from_environment: bool = False,
                         **options: Any) -> AsyncIterator[None]:
    api_client = await load_api_client(None if from_environment else str(cluster.kubeconfig))
    cluster.source = KubeSource(api_client, configmap_namespace=LB_NAMESPACE, configmap_name=LB_NAME, **options)
    task = asyncio.create_task(cluster.source.run(cluster.sink))
    try:
        yield
    finally:
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task
        await api_client.close()


async def synced(c: Cluster) -> None:
    """Initial lists done and every watch open."""
    await c.sink.wait_until(c.all_resynced, what="a Resync of every kind")
    await c.api.wait_until(lambda: c.api.open_watches() == len(KINDS), what="a watch per kind")


def watches(api: FakeKubeAPI, resource: str) -> list[RecordedRequest]:
    return api.requests_for("watch", resource)


def set_ready(node: JSON, ready: bool) -> None:
    for condition in node["status"]["conditions"]:
        if condition["type"] == "Ready":
            condition["status"] = "True" if ready else "False"


def endpoint(ip: str, node: str) -> JSON:
    return {"addresses": [ip], "conditions": {"ready": True, "serving": True, "terminating": False},
            "nodeName": node}


# ---- initial sync and events -----------------------------------------------------------------------


def test_the_initial_sync_puts_one_resync_per_kind_with_exactly_the_servers_objects(tmp_path: Path) -> None:
    async def scenario(c: Cluster) -> None:
        await synced(c)
        for kind in KINDS:
            (resync,) = c.sink.resyncs(kind)
            assert {object_key(o): o for o in resync.objects} == c.server_objects(kind), kind
            assert len(resync.objects) == len(c.server_objects(kind))
        assert list(c.sink.cache["ConfigMap"]) == [f"{LB_NAMESPACE}/{LB_NAME}"]
        # The API's own JSON: camelCase fields, and kind/apiVersion even on list items.
        slice_ = c.sink.cache["EndpointSlice"]["shop/web-4xk2p"]
        assert slice_["kind"] == "EndpointSlice"
        assert slice_["apiVersion"] == "discovery.k8s.io/v1"
        assert slice_["addressType"] == "IPv4"
        assert "nodeName" in slice_["endpoints"][0]
        assert slice_["metadata"]["resourceVersion"].isdigit()
        # Pages of two: the lists were followed to their end.
        assert any("continue" in r.query for r in c.api.requests_for("list", "endpointslices"))

    run(tmp_path, scenario, list_page_size=2)


def test_an_endpoint_scale_up_then_down_arrives_as_two_modified_events(tmp_path: Path) -> None:
    async def scenario(c: Cluster) -> None:
        await synced(c)
        c.api.modify("EndpointSlice", "web-4xk2p", lambda s: s["endpoints"].append(endpoint("10.1.9.9", "node-c")),
                     namespace="shop")
        await c.sink.wait_until(lambda: len(c.sink.events("EndpointSlice")) == 1)
        up = c.sink.events("EndpointSlice")[0]
        assert up.type == "MODIFIED"
        assert [e["addresses"] for e in up.obj["endpoints"]][-1] == ["10.1.9.9"]
        assert up.obj == c.server_objects("EndpointSlice")["shop/web-4xk2p"]

        c.api.modify("EndpointSlice", "web-4xk2p", lambda s: s["endpoints"].pop(), namespace="shop")
        await c.sink.wait_until(lambda: len(c.sink.events("EndpointSlice")) == 2)
        down = c.sink.events("EndpointSlice")[1]
        assert down.type == "MODIFIED"
        assert ["10.1.9.9"] not in [e["addresses"] for e in down.obj["endpoints"]]
        assert c.in_sync()

    run(tmp_path, scenario)


def test_a_node_going_not_ready_arrives_as_a_modified_event(tmp_path: Path) -> None:
    async def scenario(c: Cluster) -> None:
        await synced(c)
        c.api.modify("Node", "node-b", lambda n: set_ready(n, False))
        await c.sink.wait_until(lambda: len(c.sink.events("Node")) == 1)
        (event,) = c.sink.events("Node")
        assert event.type == "MODIFIED"
        assert object_key(event.obj) == "node-b"
        ready = [cond for cond in event.obj["status"]["conditions"] if cond["type"] == "Ready"]
        assert ready[0]["status"] == "False"

    run(tmp_path, scenario)


def test_configmap_edits_deletion_and_recreation_arrive_and_other_configmaps_do_not(tmp_path: Path) -> None:
    def edit(cm: JSON) -> None:
        doc = json.loads(cm["data"]["green"])
        doc["vipPool"].append("192.0.2.99")
        cm["data"]["green"] = json.dumps(doc)

    async def scenario(c: Cluster) -> None:
        await synced(c)
        c.api.modify("ConfigMap", "unrelated", lambda cm: cm["data"].update(k="w"), namespace=LB_NAMESPACE)
        c.api.modify("ConfigMap", LB_NAME, lambda cm: cm["data"].update(green="{}"), namespace="default")
        c.api.modify("ConfigMap", LB_NAME, edit, namespace=LB_NAMESPACE)
        await c.sink.wait_until(lambda: len(c.sink.events("ConfigMap")) == 1)
        assert "192.0.2.99" in c.sink.events("ConfigMap")[0].obj["data"]["green"]

        kept = c.api.delete("ConfigMap", LB_NAME, namespace=LB_NAMESPACE)
        await c.sink.wait_until(lambda: len(c.sink.events("ConfigMap")) == 2)
        assert c.sink.cache["ConfigMap"] == {}
        kept["metadata"] = {"namespace": LB_NAMESPACE, "name": LB_NAME}
        c.api.create(kept)
        await c.sink.wait_until(lambda: len(c.sink.events("ConfigMap")) == 3)
        assert [e.type for e in c.sink.events("ConfigMap")] == ["MODIFIED", "DELETED", "ADDED"]
        assert all(object_key(e.obj) == f"{LB_NAMESPACE}/{LB_NAME}" for e in c.sink.events("ConfigMap"))
        assert c.in_sync()

    run(tmp_path, scenario)


def test_with_a_selector_every_labelled_configmap_arrives_and_one_losing_its_label_leaves(tmp_path: Path) -> None:
    """A config split over several ConfigMaps (--configmap-selector): the source lists and
    watches the labelled ones of the namespace; one that loses its label arrives as DELETED (the
    API server's rule for a watch with a selector), and the watcher core merges what is left."""
    selector = (("kube2ipvs.io/config", "green"),)
    lb = json.loads(next(o for o in realistic_objects(*sorted(REALISTIC.glob("*.json")))
                         if o["kind"] == "ConfigMap")["data"]["green"])
    first = next(iter(lb["config"]))
    halves = {"lb-a": {**lb, "config": {first: lb["config"][first]}, "config6": {}},
              "lb-b": {**lb, "config": {k: v for k, v in lb["config"].items() if k != first}}}

    def labelled(name: str, doc: JSON, labels: dict[str, str]) -> JSON:
        return {"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"namespace": LB_NAMESPACE, "name": name, "labels": labels},
                "data": {"green": json.dumps(doc)}}

    async def scenario(c: Cluster) -> None:
        for name, doc in halves.items():
            c.api.create(labelled(name, doc, dict(selector)))
        c.api.create(labelled("lb-other", {"config": {"192.0.2.99": lb["config"][first]}},
                              {"kube2ipvs.io/config": "blue"}))
        await synced(c)
        [listed] = c.sink.resyncs("ConfigMap")
        assert sorted(o["metadata"]["name"] for o in listed.objects) == ["lb-a", "lb-b"]
        assert {r.query.get("labelSelector") for r in c.api.requests_for("list", "configmaps")} == \
            {"kube2ipvs.io/config=green"}
        core = WatcherCore(WatcherSettings(configmap_namespace=LB_NAMESPACE, configmap_selector=selector),
                           clock=lambda: 0.0)
        for item in list(c.sink.items):
            core.apply(item)
        assert core.ready
        both = {e.vip for e in core.config.entries}
        assert first in both
        assert "192.0.2.99" not in both

        c.api.modify("ConfigMap", "lb-a", lambda cm: cm["metadata"].update(labels={"kube2ipvs.io/config": "blue"}),
                     namespace=LB_NAMESPACE)
        await c.sink.wait_until(lambda: len(c.sink.events("ConfigMap")) == 1)
        [gone] = c.sink.events("ConfigMap")
        assert (gone.type, gone.obj["metadata"]["name"]) == ("DELETED", "lb-a")
        core.apply(gone)
        assert {e.vip for e in core.config.entries} == both - {first}

    run(tmp_path, scenario, configmap_selector=selector)


def test_a_deleted_service_and_its_slice_arrive_as_deleted_events(tmp_path: Path) -> None:
    async def scenario(c: Cluster) -> None:
        await synced(c)
        c.api.delete("Service", "api", namespace="shop")
        c.api.delete("EndpointSlice", "api-kk8w2", namespace="shop")
        await c.sink.wait_until(lambda: bool(c.sink.events("Service") and c.sink.events("EndpointSlice")))
        assert [(e.type, object_key(e.obj)) for e in c.sink.events("Service")] == [("DELETED", "shop/api")]
        assert [(e.type, object_key(e.obj)) for e in c.sink.events("EndpointSlice")] == [
            ("DELETED", "shop/api-kk8w2")]
        assert c.in_sync()

    run(tmp_path, scenario)


# ---- watch expiry, drops, outages, errors ----------------------------------------------------------


@pytest.mark.parametrize("gone_as", ["event", "http"])
def test_an_expired_watch_relists_and_resyncs_with_the_current_objects(
        tmp_path: Path, gone_as: Literal["event", "http"]) -> None:
    async def scenario(c: Cluster) -> None:
        await synced(c)
        assert c.source is not None
        # While every watch is down, things change and the history is compacted: resuming is 410.
        c.api.drop_watches()
        c.api.modify("EndpointSlice", "web-4xk2p", lambda s: s["endpoints"].pop(), namespace="shop")
        c.api.delete("Node", "node-e")
        c.api.modify("ConfigMap", LB_NAME, lambda cm: cm["data"].update(green="{}"), namespace=LB_NAMESPACE)
        c.api.delete("Service", "ghost", namespace="shop")
        c.api.compact()
        await c.sink.wait_until(lambda: c.all_resynced(times=2), what="a second Resync of every kind")
        for kind in KINDS:
            second = c.sink.resyncs(kind)[1]
            assert {object_key(o): o for o in second.objects} == c.server_objects(kind), kind
            assert c.source.stats.relists[kind] == 1
            assert c.sink.events(kind) == []  # the changes came with the Resync, not as events
        assert "node-e" not in c.sink.cache["Node"]
        # Then the watches carry on from the relist.
        c.api.modify("Node", "node-a", lambda n: set_ready(n, False))
        await c.sink.wait_until(lambda: len(c.sink.events("Node")) == 1)
        assert c.in_sync()

    run(tmp_path, scenario, fake_options={"gone_as": gone_as})


def test_a_storm_of_410s_relists_at_a_backed_off_pace_and_ends_in_sync(tmp_path: Path) -> None:
    async def scenario(c: Cluster) -> None:
        await synced(c)
        assert c.source is not None
        # Six watches in a row answer 410 Gone, even on the resourceVersion a list has just given:
        # every one costs a LIST, so they must be paced, not looped.
        c.api.fail_next(6, status=410, verb="watch", resource="endpointslices")
        started = asyncio.get_running_loop().time()
        c.api.drop_watches("endpointslices")
        c.api.modify("EndpointSlice", "web-4xk2p", lambda s: s["endpoints"].pop(), namespace="shop")
        await c.sink.wait_until(lambda: len(c.sink.resyncs("EndpointSlice")) == 7 and c.in_sync(),
                                what="a relist after each 410, then the current objects")
        took = asyncio.get_running_loop().time() - started
        await c.api.wait_until(lambda: c.api.open_watches() == len(KINDS), what="a watch per kind")
        assert c.source.stats.relists["EndpointSlice"] == 6
        assert [r.status for r in watches(c.api, "endpointslices")[1:]] == [410] * 6 + [200]
        # Backoff 0.05 s doubling to 0.4 s with equal jitter: at least 0.025+0.05+0.1+0.2+0.2+0.2 s.
        assert took >= 0.775, took
        for resync in c.sink.resyncs("EndpointSlice")[1:]:  # each one whole: the picture of its list
            assert {object_key(o): o for o in resync.objects} == c.server_objects("EndpointSlice")
        assert all(len(c.sink.resyncs(k)) == 1 for k in KINDS if k != "EndpointSlice")
        assert c.sink.events("EndpointSlice") == []

    run(tmp_path, scenario)


@pytest.mark.parametrize("mode", ["refused", "unavailable"])
def test_an_api_outage_is_ridden_out_and_no_event_is_lost(
        tmp_path: Path, mode: Literal["refused", "unavailable"]) -> None:
    async def scenario(c: Cluster) -> None:
        await synced(c)
        assert c.source is not None
        await c.api.go_down(mode)
        # Changes while the API is unreachable stay in its history; the watches resume past them.
        c.api.modify("EndpointSlice", "web-4xk2p", lambda s: s["endpoints"].append(endpoint("10.1.7.7", "node-b")),
                     namespace="shop")
        c.api.modify("Node", "node-c", lambda n: set_ready(n, False))
        c.api.delete("Service", "ghost", namespace="shop")
        source = c.source
        # The outage lasts as long as four reconnection attempts of every kind: most of a second.
        await eventually(lambda: all(source.stats.reconnects[k] >= 4 for k in KINDS), timeout=5,
                         what="failed reconnection attempts during the outage")
        await c.api.come_up()
        await c.sink.wait_until(c.in_sync, what="the cache to match the server again")
        await c.api.wait_until(lambda: c.api.open_watches() == len(KINDS))
        assert all(len(c.sink.resyncs(k)) == 1 for k in KINDS)  # resumed, not relisted
        assert [e.type for e in c.sink.events("Service")] == ["DELETED"]

    run(tmp_path, scenario)


def test_server_errors_on_a_list_are_retried_until_it_succeeds(tmp_path: Path) -> None:
    async def scenario(c: Cluster) -> None:
        c.api.fail_next(3, status=500, verb="list", resource="endpointslices")
        c.api.fail_next(1, status=503, verb="list", resource="nodes")
        async with source_running(c, backoff_initial=0.05, backoff_max=0.2):
            await synced(c)
            assert [r.status for r in c.api.requests_for("list", "endpointslices")] == [500, 500, 500, 200]
            assert [r.status for r in c.api.requests_for("list", "nodes")] == [503, 200]
            assert c.in_sync()

    run(tmp_path, scenario, start_source=False)


def test_no_object_event_of_a_kind_precedes_its_resync(tmp_path: Path) -> None:
    async def scenario(c: Cluster) -> None:
        c.api.fail_next(4, status=500, verb="list", resource="endpointslices")
        async with source_running(c, backoff_initial=0.05, backoff_max=0.2):
            # The other kinds are synced and watching while EndpointSlices still fail to list.
            await c.sink.wait_until(lambda: all(c.sink.resyncs(k) for k in ("Node", "Service", "ConfigMap")))
            assert c.sink.resyncs("EndpointSlice") == []
            c.api.modify("Node", "node-a", lambda n: set_ready(n, False))
            c.api.modify("EndpointSlice", "web-4xk2p", lambda s: s["endpoints"].pop(), namespace="shop")
            await synced(c)
            c.api.modify("EndpointSlice", "web-4xk2p", lambda s: s["endpoints"].pop(), namespace="shop")
            await c.sink.wait_until(lambda: len(c.sink.events("EndpointSlice")) == 1)
        kinds_in_order = [(type(i).__name__, i.kind) for i in c.sink.items if i.kind == "EndpointSlice"]
        assert kinds_in_order == [("Resync", "EndpointSlice"), ("ObjectEvent", "EndpointSlice")]
        assert c.sink.violations == []
        assert c.in_sync()

    run(tmp_path, scenario, start_source=False)


def test_a_dropped_watch_that_then_fails_with_5xx_resumes_from_its_last_resource_version(tmp_path: Path) -> None:
    async def scenario(c: Cluster) -> None:
        await synced(c)
        assert c.source is not None
        c.api.modify("Node", "node-a", lambda n: set_ready(n, False))
        await c.sink.wait_until(lambda: len(c.sink.events("Node")) == 1)
        seen = c.sink.events("Node")[0].obj["metadata"]["resourceVersion"]
        c.api.fail_next(2, status=500, verb="watch", resource="nodes")
        c.api.drop_watches("nodes")
        c.api.modify("Node", "node-b", lambda n: set_ready(n, False))
        await c.sink.wait_until(lambda: len(c.sink.events("Node")) == 2)
        resumed = watches(c.api, "nodes")[1:]
        assert [r.status for r in resumed] == [500, 500, 200]
        assert {r.query["resourceVersion"] for r in resumed} == {seen}
        assert len(c.sink.resyncs("Node")) == 1
        assert c.source.stats.reconnects["Node"] == 3

    run(tmp_path, scenario)


def test_bookmarks_advance_the_resource_version_a_watch_resumes_from(tmp_path: Path) -> None:
    async def scenario(c: Cluster) -> None:
        await synced(c)
        source = c.source
        assert source is not None
        listed = c.sink.resyncs("Node")[0]
        list_rv = watches(c.api, "nodes")[0].query["resourceVersion"]
        assert all(r.query["allowWatchBookmarks"].lower() == "true" for r in watches(c.api, "nodes"))
        # Writes to other kinds move the global resourceVersion; the Node watch sees none of them.
        for _ in range(3):
            c.api.modify("Service", "web", lambda s: s["metadata"].setdefault("labels", {}).update(x="y"),
                         namespace="shop")
        bookmark_rv = str(c.api.resource_version)
        assert bookmark_rv != list_rv
        assert c.api.send_bookmarks() == len(KINDS)
        await eventually(lambda: source.resource_version("Node") == bookmark_rv, what="the Node bookmark")
        c.api.drop_watches("nodes")
        await c.api.wait_until(lambda: len(watches(c.api, "nodes")) == 2)
        assert watches(c.api, "nodes")[1].query["resourceVersion"] == bookmark_rv
        assert source.stats.watch_events["Node", "BOOKMARK"] == 1
        assert c.sink.resyncs("Node") == [listed]
        assert c.sink.events("Node") == []

    run(tmp_path, scenario)


def test_a_watch_that_reaches_its_timeout_is_resumed_without_a_relist(tmp_path: Path) -> None:
    async def scenario(c: Cluster) -> None:
        await synced(c)
        assert c.source is not None
        assert watches(c.api, "nodes")[0].query["timeoutSeconds"] == "1"
        c.api.modify("Service", "web", lambda s: s["metadata"].setdefault("labels", {}).update(x="y"),
                     namespace="shop")
        rv_after_write = str(c.api.resource_version)
        # The server ends each watch after a second, with a last bookmark at its resourceVersion.
        await c.api.wait_until(lambda: len(watches(c.api, "nodes")) >= 2, timeout=4)
        assert watches(c.api, "nodes")[1].query["resourceVersion"] == rv_after_write
        assert c.source.stats.reconnects["Node"] == 0
        assert len(c.sink.resyncs("Node")) == 1
        c.api.modify("Node", "node-d", lambda n: set_ready(n, False))
        await c.sink.wait_until(lambda: len(c.sink.events("Node")) == 1)

    run(tmp_path, scenario, watch_timeout_seconds=1)


def test_a_clean_end_of_every_watch_is_resumed_and_later_changes_arrive(tmp_path: Path) -> None:
    async def scenario(c: Cluster) -> None:
        await synced(c)
        listed_at = watches(c.api, "endpointslices")[0].query["resourceVersion"]
        assert c.api.end_watches() == len(KINDS)
        c.api.modify("EndpointSlice", "dns-7hd2k", lambda s: s["endpoints"].pop(), namespace="infra")
        await c.sink.wait_until(lambda: len(c.sink.events("EndpointSlice")) == 1)
        assert watches(c.api, "endpointslices")[1].query["resourceVersion"] == listed_at
        assert all(len(c.sink.resyncs(k)) == 1 for k in KINDS)
        assert c.in_sync()

    run(tmp_path, scenario)


class FailingOnceSink(RecordingSink):
    """A consumer bug: raises on the first ObjectEvent of one kind."""

    def __init__(self, kind: Kind) -> None:
        super().__init__()
        self.fail_kind: Kind | None = kind

    def put_nowait(self, item: SourceItem) -> None:
        if isinstance(item, ObjectEvent) and item.kind == self.fail_kind:
            self.fail_kind = None
            raise RuntimeError("consumer bug")
        super().put_nowait(item)


def test_a_kind_whose_task_fails_unexpectedly_is_logged_and_restarted_from_a_fresh_list(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def scenario(c: Cluster) -> None:
        c.sink = FailingOnceSink("Node")
        async with source_running(c, backoff_initial=0.05, backoff_max=0.2):
            assert c.source is not None
            await synced(c)
            c.api.modify("Node", "node-a", lambda n: set_ready(n, False))
            await c.sink.wait_until(lambda: len(c.sink.resyncs("Node")) == 2)
            assert c.source.stats.restarts == {"Node": 1}
            assert c.sink.cache["Node"] == c.server_objects("Node")  # the lost event's change, by relist
            c.api.modify("Service", "web", lambda s: s["metadata"].setdefault("labels", {}).update(x="y"),
                         namespace="shop")
            await c.sink.wait_until(lambda: len(c.sink.events("Service")) == 1)  # other kinds carried on
        assert "event=task_failed" in caplog.text

    run(tmp_path, scenario, start_source=False)


# ---- the fake is strict where a client could misuse the API ----------------------------------------


def test_the_fake_refuses_lease_writes_the_real_server_refuses(tmp_path: Path) -> None:
    async def scenario(c: Cluster) -> None:
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        lease = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                 "metadata": {"name": "l", "namespace": "ns"},
                 "spec": {"holderIdentity": "a", "leaseDurationSeconds": 1, "renewTime": now}}
        base = f"{c.api.url}/apis/coordination.k8s.io/v1/namespaces/ns/leases"
        async with aiohttp.ClientSession() as http:
            async def status(method: str, url: str, body: JSON) -> int:
                async with http.request(method, url, json=body) as response:
                    return response.status
            assert await status("POST", base, lease) == 201
            assert await status("POST", base, lease) == 409  # AlreadyExists
            stored = c.api.get("Lease", "l", namespace="ns")
            assert stored is not None
            stale = copy.deepcopy(stored)
            stale["metadata"]["resourceVersion"] = "1"
            no_rv = copy.deepcopy(stored)
            del no_rv["metadata"]["resourceVersion"]
            bad_time = copy.deepcopy(stored)
            bad_time["spec"]["renewTime"] = "2024-01-01T00:00:00Z"
            zero = copy.deepcopy(stored)
            zero["spec"]["leaseDurationSeconds"] = 0
            assert await status("PUT", f"{base}/l", stale) == 409
            assert await status("PUT", f"{base}/l", no_rv) == 422
            assert await status("PUT", f"{base}/l", bad_time) == 400
            assert await status("PUT", f"{base}/l", zero) == 422
            assert await status("PUT", f"{base}/other", stored) == 400  # name differs from the URL
            assert await status("PUT", f"{base}/l", stored) == 200

    run(tmp_path, scenario, start_source=False, seed_objects=False)


# ---- leader election -------------------------------------------------------------------------------


LEASE_NS, LEASE_NAME = "platform-load-balancer", "kube2ipvs-watcher"


Electors = tuple[dict[str, LeaderElector], dict[str, "asyncio.Task[None]"]]


@asynccontextmanager
async def electors(c: Cluster, *identities: str, changes: dict[str, list[bool]] | None = None,
                   **options: Any) -> AsyncIterator[Electors]:
    """Electors with a 1 s lease (unless overridden), running until the block ends; `changes`
    collects each one's leadership changes."""
    api_client = await load_api_client(str(c.kubeconfig))
    settings = {"lease_duration": 1.0, "renew_deadline": 0.6, "retry_period": 0.1, **options}
    running = {i: LeaderElector(api_client, namespace=LEASE_NS, name=LEASE_NAME, identity=i,
                                on_change=changes.setdefault(i, []).append if changes is not None else None,
                                **settings)
               for i in identities}
    tasks = {i: asyncio.create_task(e.run()) for i, e in running.items()}
    try:
        yield running, tasks
    finally:
        for task in tasks.values():
            task.cancel()
        for task in tasks.values():
            with suppress(asyncio.CancelledError):
                await task
        await api_client.close()


def lease_spec(api: FakeKubeAPI) -> JSON:
    lease = api.get("Lease", LEASE_NAME, namespace=LEASE_NS)
    assert lease is not None
    spec: JSON = lease["spec"]
    return spec


def lease_writes(api: FakeKubeAPI) -> int:
    return sum(1 for r in api.requests if r.resource == "leases" and r.verb in ("create", "update")
               and r.status in (200, 201))


def test_two_electors_on_one_lease_yield_exactly_one_leader(tmp_path: Path) -> None:
    changes: dict[str, list[bool]] = {"replica-a": [], "replica-b": []}

    async def scenario(c: Cluster) -> None:
        async with electors(c, "replica-a", "replica-b", changes=changes) as (running, _):
            waiters = {asyncio.create_task(e.wait_for(True)): i for i, e in running.items()}
            done, pending = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
            leader = waiters[done.pop()]
            # Over several renewals the holder stays the one and only leader.
            for _ in range(5):
                target = lease_writes(c.api) + 1
                await c.api.wait_until(lambda: lease_writes(c.api) >= target)  # noqa: B023
                assert [i for i, e in running.items() if e.is_leader] == [leader]
                assert lease_spec(c.api)["holderIdentity"] == leader
            assert lease_spec(c.api)["leaseTransitions"] == 0
        follower = ({"replica-a", "replica-b"} - {leader}).pop()
        assert changes[leader] == [True, False]  # the False: stopping at the end of the test
        assert changes[follower] == []

    run(tmp_path, scenario, start_source=False, seed_objects=False)


def test_when_the_leader_releases_the_lease_the_other_replica_takes_over_promptly(tmp_path: Path) -> None:
    async def scenario(c: Cluster) -> None:
        async with electors(c, "replica-a", lease_duration=5.0, renew_deadline=3.0) as (running_a, tasks_a):
            await running_a["replica-a"].wait_for(True)
            async with electors(c, "replica-b", lease_duration=5.0, renew_deadline=3.0) as (running_b, _):
                b = running_b["replica-b"]
                # b watches a valid lease held by a: it waits.
                await c.api.wait_until(lambda: len(c.api.requests_for("get", "leases")) >= 10)
                assert not b.is_leader
                loop = asyncio.get_running_loop()
                released_at = loop.time()
                tasks_a["replica-a"].cancel()
                with suppress(asyncio.CancelledError):
                    await tasks_a["replica-a"]
                assert not running_a["replica-a"].is_leader
                await b.wait_for(True)
                # Well within the 5 s lease: b did not wait for the released lease to expire.
                assert loop.time() - released_at < 1.0
                spec = lease_spec(c.api)
                assert spec["holderIdentity"] == "replica-b"
                assert spec["leaseTransitions"] == 1

    run(tmp_path, scenario, start_source=False, seed_objects=False)


def test_an_expired_lease_of_a_dead_replica_is_taken_over(tmp_path: Path) -> None:
    async def scenario(c: Cluster) -> None:
        long_ago = (datetime.now(UTC) - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        c.api.create({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                      "metadata": {"namespace": LEASE_NS, "name": LEASE_NAME},
                      "spec": {"holderIdentity": "dead-replica", "leaseDurationSeconds": 1,
                               "acquireTime": long_ago, "renewTime": long_ago, "leaseTransitions": 4}})
        async with electors(c, "replica-a") as (running, _):
            await running["replica-a"].wait_for(True)
            spec = lease_spec(c.api)
            assert spec["holderIdentity"] == "replica-a"
            assert spec["leaseTransitions"] == 5
            assert spec["renewTime"] > long_ago

    run(tmp_path, scenario, start_source=False, seed_objects=False)


def test_a_lease_another_replica_keeps_renewing_is_never_taken(tmp_path: Path) -> None:
    async def scenario(c: Cluster) -> None:
        def renew(lease: JSON) -> None:
            lease["spec"]["renewTime"] = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")

        c.api.create({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                      "metadata": {"namespace": LEASE_NS, "name": LEASE_NAME},
                      "spec": {"holderIdentity": "other", "leaseDurationSeconds": 1}})
        async with electors(c, "replica-a") as (running, _):
            # Two lease durations' worth of rounds, with "other" renewing every 0.25 s.
            for _ in range(8):
                await asyncio.sleep(0.25)  # the other replica's renewal period
                c.api.modify("Lease", LEASE_NAME, renew, namespace=LEASE_NS)
                assert not running["replica-a"].is_leader
            assert lease_spec(c.api)["holderIdentity"] == "other"

    run(tmp_path, scenario, start_source=False, seed_objects=False)


def test_a_leader_that_cannot_renew_steps_down_before_its_lease_could_expire(tmp_path: Path) -> None:
    changes: dict[str, list[bool]] = {}

    async def scenario(c: Cluster) -> None:
        async with electors(c, "replica-a", changes=changes) as (running, _):
            leader = running["replica-a"]
            await leader.wait_for(True)
            loop = asyncio.get_running_loop()
            cut_at = loop.time()
            await c.api.go_down("unavailable")
            await leader.wait_changed()
            assert not leader.is_leader
            assert loop.time() - cut_at < 1.0  # the lease lasts 1 s for the others
            await c.api.come_up()
            await leader.wait_for(True)
        assert changes == {"replica-a": [True, False, True, False]}

    run(tmp_path, scenario, start_source=False, seed_objects=False)


# ---- events ----------------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        self.now += timedelta(seconds=7)
        return self.now


@asynccontextmanager
async def recorder(c: Cluster, **options: Any) -> AsyncIterator[EventRecorder]:
    api_client = await load_api_client(str(c.kubeconfig))
    try:
        yield EventRecorder(api_client, host="node-a", clock=Clock(), **options)
    finally:
        await api_client.close()


def test_a_rejected_config_is_recorded_as_a_warning_event_on_the_configmap(tmp_path: Path) -> None:
    async def scenario(c: Cluster) -> None:
        cm = c.api.get("ConfigMap", LB_NAME, namespace=LB_NAMESPACE)
        assert cm is not None
        async with recorder(c) as events:
            await events.config_rejected(LB_NAMESPACE, LB_NAME, "config.x: not a VIP", uid=cm["metadata"]["uid"])
        (event,) = c.api.events()
        assert event["metadata"]["namespace"] == LB_NAMESPACE
        assert event["involvedObject"] == {"apiVersion": "v1", "kind": "ConfigMap", "namespace": LB_NAMESPACE,
                                           "name": LB_NAME, "uid": cm["metadata"]["uid"]}
        assert (event["type"], event["reason"], event["message"]) == ("Warning", "ConfigRejected",
                                                                     "config.x: not a VIP")
        assert event["count"] == 1
        assert event["firstTimestamp"] == event["lastTimestamp"] == "2024-05-01T12:00:07Z"
        assert event["source"] == {"component": "kube2ipvs-watcher", "host": "node-a"}

    run(tmp_path, scenario, start_source=False)


def test_identical_warnings_within_the_window_are_aggregated_into_one_event_with_a_count(tmp_path: Path) -> None:
    async def scenario(c: Cluster) -> None:
        async with recorder(c) as events:
            for _ in range(3):
                await events.config_rejected(LB_NAMESPACE, LB_NAME, "config.x: not a VIP")
            await events.config_held(LB_NAMESPACE, LB_NAME, "would remove 80% of VIP:ports")
            await events.config_rejected(LB_NAMESPACE, LB_NAME, "config.y: bad port")
        by_message = {e["message"]: e for e in c.api.events()}
        assert len(c.api.events()) == 3
        repeated = by_message["config.x: not a VIP"]
        assert repeated["count"] == 3
        assert repeated["firstTimestamp"] == "2024-05-01T12:00:07Z"
        assert repeated["lastTimestamp"] == "2024-05-01T12:00:21Z"
        assert by_message["would remove 80% of VIP:ports"]["reason"] == "ConfigHeld"
        assert by_message["config.y: bad port"]["count"] == 1
        assert len(c.api.requests_for("create", "events")) == 3
        assert len(c.api.requests_for("patch", "events")) == 2

    run(tmp_path, scenario, start_source=False)


def test_warnings_outside_the_window_or_after_the_event_expired_create_new_events(tmp_path: Path) -> None:
    async def scenario(c: Cluster) -> None:
        async with recorder(c, aggregate_window=0.0) as events:
            await events.config_rejected(LB_NAMESPACE, LB_NAME, "config.x: not a VIP")
            await events.config_rejected(LB_NAMESPACE, LB_NAME, "config.x: not a VIP")
        assert [e["count"] for e in c.api.events()] == [1, 1]
        async with recorder(c) as events:
            await events.config_rejected(LB_NAMESPACE, LB_NAME, "config.z: bad")
            (expired,) = [e for e in c.api.events() if e["message"] == "config.z: bad"]
            c.api.delete("Event", expired["metadata"]["name"], namespace=LB_NAMESPACE)
            await events.config_rejected(LB_NAMESPACE, LB_NAME, "config.z: bad")
        (again,) = [e for e in c.api.events() if e["message"] == "config.z: bad"]
        assert again["metadata"]["name"] != expired["metadata"]["name"]
        assert again["count"] == 1

    run(tmp_path, scenario, start_source=False)


def test_recording_an_event_while_the_api_is_down_logs_and_does_not_raise(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def scenario(c: Cluster) -> None:
        async with recorder(c) as events:
            await c.api.go_down("unavailable")
            with caplog.at_level(logging.WARNING, logger="kube2ipvs_watcher.kube"):
                await events.config_rejected(LB_NAMESPACE, LB_NAME, "config.x: not a VIP")
        assert c.api.events() == []
        assert "event_not_recorded" in caplog.text

    run(tmp_path, scenario, start_source=False)


# ---- configuration ---------------------------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for name in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_the_api_client_is_found_through_KUBECONFIG_and_sends_its_token(  # noqa: N802
        tmp_path: Path, clean_env: pytest.MonkeyPatch) -> None:
    async def scenario(c: Cluster) -> None:
        clean_env.setenv("KUBECONFIG", f"{tmp_path / 'missing'}:{c.kubeconfig}")
        async with source_running(c, from_environment=True):
            await synced(c)
        assert all(r.status != 401 for r in c.api.requests)

    run(tmp_path, scenario, start_source=False, fake_options={"token": "s3cret"})


def test_an_explicit_kubeconfig_wins_over_KUBECONFIG_and_a_missing_one_fails_clearly(  # noqa: N802
        tmp_path: Path, clean_env: pytest.MonkeyPatch) -> None:
    async def scenario(c: Cluster) -> None:
        clean_env.setenv("KUBECONFIG", str(tmp_path / "nowhere"))
        api_client = await load_api_client(str(c.kubeconfig))
        assert api_client.configuration.host == c.api.url
        await api_client.close()
        with pytest.raises(KubeConfigError, match="nowhere"):
            await load_api_client()

    run(tmp_path, scenario, start_source=False, seed_objects=False)


def test_without_any_kubeconfig_or_pod_environment_loading_fails_clearly(clean_env: pytest.MonkeyPatch) -> None:
    with pytest.raises(KubeConfigError, match="not running in a pod"):
        asyncio.run(load_api_client())
    clean_env.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    clean_env.setenv("KUBERNETES_SERVICE_PORT", "443")
    with pytest.raises(KubeConfigError, match="cannot load"):
        asyncio.run(load_api_client())
