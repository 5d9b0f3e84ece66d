"""The watcher's status page: the pure renderer on normalized states; `GET /ui` on the watcher
fed by an in-memory source and publisher (the status board a stub); and reading every document
of a real status board (nats-server)."""

from __future__ import annotations

import asyncio
import html
import json
import re
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from kube2ipvs.model import ClusterState, hostport
from kube2ipvs.natskv import NatsSettings, StatusBoard
from kube2ipvs.normalize import normalize
from kube2ipvs.protocol import Write
from kube2ipvs.statusserver import StatusServer
from kube2ipvs_watcher.app import AppSettings, WatcherApp
from kube2ipvs_watcher.core import WatcherCore, WatcherSettings
from kube2ipvs_watcher.source import ObjectEvent, Resync, SourceItem
from kube2ipvs_watcher.ui import Member, Rejection, StatusPage, members_from_board, render
from kube2ipvs_watcher.uiroute import StatusPageRoute
from tests.builders import config, endpointslice, node, service, web_entry
from tests.conftest import realistic_state
from tests.natsfixture import running_nats_server
from tests.test_watcher_core import UNICORNS, configmap, items

NOW = 1_800_000_000.0
WATCHER = Member(role="watcher", host="ctl", healthy=True, reason="", generation=7, content_hash="sha256:abc",
                 age=None, detail="leader")


def page(state: ClusterState | None, **kw: Any) -> StatusPage:
    fields: dict[str, Any] = {"now": NOW, "watcher": WATCHER, "state": state, "members": (), "board_error": None,
                              "rejections": ()}
    return StatusPage(**(fields | kw))


def small_state(service_name: str = "web") -> ClusterState:
    nodes = [node("node-a", "198.51.100.11"), node("node-b", "198.51.100.12"),
             node("node-c", "198.51.100.13", ready=False)]
    services = [service("shop", service_name, ("http", 80, "TCP"))]
    slices = [endpointslice("shop", service_name, f"{service_name}-1", [("http", 8080, "TCP")], [
        ("10.0.1.10", "node-a", True), ("10.0.1.11", "node-a", True), ("10.0.2.10", "node-b", True)])]
    entry = web_entry() | {"service": service_name}
    lb = config({"192.0.2.10": {"80": entry}, "192.0.2.11": {"8080": entry}}, pool=["192.0.2.10", "192.0.2.11",
                                                                                      "192.0.2.12"])
    return normalize(nodes, services, slices, lb)


def text_of(doc: str) -> str:
    """The page's visible text, roughly: tags dropped, entities decoded."""
    return html.unescape(re.sub(r"<[^>]+>", " ", doc))


def test_the_page_lists_every_vip_port_service_node_weight_and_pod() -> None:
    state = realistic_state()
    doc = render(page(state))
    visible = text_of(doc)
    assert state.vips
    assert state.services
    for vip in state.vips:
        assert f'id="vip-{vip}"' in doc
    for vs in state.services:
        section = doc[doc.index(f'id="vip-{vs.vip}"'):]
        section = section[:section.index("</section>")]
        assert f"{vs.port}/{vs.protocol}" in section
        assert html.escape(vs.service_ref) in section
        for b in vs.backends:  # one row per node: name, weight, then its pods
            pods = ", ".join(hostport(p.address, p.port) for p in b.endpoints)
            assert (f'<td>{b.node} <span class="muted">{b.address}</span></td><td>{b.weight}</td>'
                    f"<td><code>{pods}</code></td>") in section
    for n in state.nodes:
        assert n.name in visible


def test_weights_are_the_ready_pods_per_node_and_a_vip_without_ports_is_still_listed() -> None:
    doc = render(page(small_state()))
    section = doc[doc.index('id="vip-192.0.2.10"'):doc.index('id="vip-192.0.2.11"')]
    assert re.search(r"<td>node-a <span[^>]*>198\.51\.100\.11</span></td><td>2</td>"
                     r"<td><code>10\.0\.1\.10:8080, 10\.0\.1\.11:8080</code></td>", section)
    assert re.search(r"<td>node-b <span[^>]*>198\.51\.100\.12</span></td><td>1</td>", section)
    assert "node-c" not in section  # not ready: no backend
    pool_only = doc[doc.index('id="vip-192.0.2.12"'):]
    assert "no ports configured" in pool_only[:pool_only.index("</section>")]
    assert 'content="5"' in doc
    assert 'http-equiv="refresh"' in doc


def test_the_page_loads_nothing_from_elsewhere() -> None:
    doc = render(page(realistic_state()))
    assert not re.search(r"<(script|link|img|iframe)\b", doc)
    assert "src=" not in doc
    assert "http://" not in doc
    assert "https://" not in doc
    assert "default-src 'none'" in doc


def test_hostile_names_are_escaped() -> None:
    evil = "<script>alert(1)</script>"
    members = members_from_board({
        f"director.{evil}": {"role": "director", "healthy": False, "reason": evil, "generation": 3, "at": NOW - 4},
    }, NOW)
    doc = render(page(small_state(), members=members, board_error=None,
                      rejections=(Rejection(NOW - 60, "rejected", f'config."{evil}": bad', (evil,)),),
                      config_problem=f"config rejected: {evil}",
                      watcher=Member(role="watcher", host=evil, healthy=False, reason=evil, generation=1,
                                     content_hash=evil, age=None, detail=evil)))
    assert "<script" not in doc
    assert "&lt;script&gt;" in doc
    # Config validation refuses such names; the renderer escapes them anyway.
    state = small_state()
    vs = state.services[0]
    hostile = replace(state, services=(replace(vs, service='<script>"x"</script>', namespace="a&b"),))
    doc = render(page(hostile))
    assert "<script" not in doc
    assert "a&amp;b/&lt;script&gt;&quot;x&quot;&lt;/script&gt;:http" in doc


def test_board_members_show_health_and_whether_they_applied_the_published_generation() -> None:
    members = members_from_board({
        "director.dir1": {"role": "director", "healthy": True, "reason": "", "generation": 7,
                          "content_hash": "sha256:abc", "mode": "bgp", "active": True, "vips": ["192.0.2.10"],
                          "at": NOW - 3},
        "director.dir2": {"role": "director", "healthy": False, "reason": "last apply failed: EPERM",
                          "generation": 5, "content_hash": "sha256:old", "at": NOW - 12},
        "realserver.node-1": {"healthy": "yes", "generation": "7"},  # wrong types: shown as unknown
    }, NOW)
    assert [(m.role, m.host) for m in members] == [("director", "dir1"), ("director", "dir2"),
                                                   ("realserver", "node-1")]
    assert members[2].healthy is None
    assert members[2].generation is None
    visible = text_of(render(page(None, members=members)))
    assert "dir1 healthy 7 in sync mode bgp, active, 1 VIPs 3 s ago" in " ".join(visible.split())
    assert "dir2 unhealthy : last apply failed: EPERM 5 behind (7 published) 12 s ago" in " ".join(visible.split())
    assert "nothing on the status board from: bgp-speaker" in visible
    assert "no cluster state published yet" in visible


def test_an_unreadable_board_and_recent_rejections_are_shown() -> None:
    rejections = (Rejection(NOW - 5, "held", "config held: it removes 3 of 4 VIP:ports"),
                  Rejection(NOW - 65, "rejected", "1 error", ('config."192.0.2.10"."80".port: bad',)))
    visible = " ".join(text_of(render(page(small_state(), board_error="nats: no servers available",
                                           rejections=rejections))).split())
    assert "status board unavailable: nats: no servers available" in visible
    assert "2027-01-15 07:59:55 UTC held config held: it removes 3 of 4 VIP:ports" in visible
    assert 'rejected 1 error config."192.0.2.10"."80".port: bad' in visible


def test_past_the_row_budget_the_rest_is_summarized_but_every_vip_is_listed() -> None:
    state = realistic_state()
    doc = render(page(state), max_rows=2)
    assert "virtual services not drawn" in doc
    for vip in state.vips:
        assert f'href="#vip-{vip}"' in doc


# -- GET /ui on a running watcher ------------------------------------------------------------------


class ListSource:
    def __init__(self, items: Sequence[SourceItem]) -> None:
        self.items = list(items)

    async def run(self, sink: asyncio.Queue[SourceItem]) -> None:
        for item in self.items:
            sink.put_nowait(item)
        await asyncio.Event().wait()


class MemoryPublisher:
    connected = True

    def __init__(self) -> None:
        self.values: dict[str, bytes] = {}

    async def publish(self, writes: Sequence[Write]) -> int:
        for w in writes:
            if w.value is None:
                self.values.pop(w.key, None)
            else:
                self.values[w.key] = w.value
        return sum(len(w.value or b"") for w in writes)

    async def read_all(self) -> dict[str, bytes]:
        return dict(self.values)


class StubBoard:
    async def documents(self) -> dict[str, dict[str, Any]]:
        return {"director.dir1": {"role": "director", "healthy": True, "generation": 1, "at": 0.0}}


def test_the_watcher_serves_the_page_on_get_only_and_records_rejections() -> None:
    lb = json.loads(items("configmap")[0]["data"]["green"])
    lb["config"]["192.0.2.10"]["80"]["ipvsOptions"]["scheduler"] = "fastest"
    source = ListSource([Resync("Node", tuple(items("nodes"))), Resync("Service", tuple(items("services"))),
                         Resync("EndpointSlice", tuple(items("endpointslices"))),
                         Resync("ConfigMap", tuple(items("configmap")))])

    async def scenario() -> None:
        app = WatcherApp(WatcherCore(WatcherSettings(default_service=UNICORNS), clock=lambda: 0.0),
                         source=source, publisher=MemoryPublisher(), settings=AppSettings(min_interval=0.01))
        server = StatusServer(host="127.0.0.1", port=0, health=app.health, config=app.config, registry=app.registry,
                              pages={"/ui": StatusPageRoute(app, StubBoard(), identity="ctl-1")})
        await server.start()
        runner = asyncio.create_task(app.run())
        try:
            await asyncio.wait_for(app.published_event.wait(), 10)
            source.items.clear()
            app._queue.put_nowait(ObjectEvent("ConfigMap", "MODIFIED", configmap(lb)))
            for _ in range(200):
                if app.rejections:
                    break
                await asyncio.sleep(0.01)
            url = f"http://127.0.0.1:{server.port}/ui"
            async with aiohttp.ClientSession() as http:
                async with http.get(url) as r:
                    assert r.status == 200
                    assert r.content_type == "text/html"
                    doc = await r.text()
                for method in ("POST", "PUT", "DELETE", "PATCH"):
                    async with http.request(method, url) as r:
                        assert r.status == 405, method
                async with http.get(f"http://127.0.0.1:{server.port}/healthz") as r:
                    assert r.status == 503  # the existing routes behave as before
            assert app.last_state is not None
            for vip in app.last_state.vips:
                assert f'id="vip-{vip}"' in doc
            visible = " ".join(text_of(doc).split())
            assert "ctl-1" in visible
            assert "dir1" in visible
            assert 'rejected config."192.0.2.10"."80".ipvsOptions.scheduler: "fastest"' in visible
            assert "LB config config rejected:" in visible
        finally:
            runner.cancel()
            with pytest.raises(asyncio.CancelledError):
                await runner
            await server.stop()

    asyncio.run(scenario())


def test_the_page_reads_every_document_on_a_real_status_board(tmp_path: Path) -> None:
    with running_nats_server(tmp_path / "nats") as server:
        nats = NatsSettings(servers=(server.url,), reconnect_wait=0.1, connect_timeout=1.0, request_timeout=2.0)

        async def scenario() -> None:
            writer = StatusBoard(nats, bucket="k2i-status-ui", ttl=1.0)
            reader = StatusBoard(nats, bucket="k2i-status-ui", ttl=1.0)
            await writer.start()
            await reader.start()
            try:
                assert await reader.documents() == {}
                await writer.put("director", "dir1.example.com", {"healthy": True, "generation": 3})
                await writer.put("bgp-speaker", "dir1", {"healthy": False, "reason": "gobgpd unreachable"})
                await writer.put("director", "dir1.example.com", {"healthy": True, "generation": 4})  # newest wins
                assert await reader.documents() == {
                    "director.dir1_example_com": {"healthy": True, "generation": 4},
                    "bgp-speaker.dir1": {"healthy": False, "reason": "gobgpd unreachable"},
                }
                await asyncio.sleep(1.6)  # not refreshed: gone from the page as from the board
                assert await reader.documents() == {}
            finally:
                await writer.close()
                await reader.close()

        asyncio.run(scenario())
