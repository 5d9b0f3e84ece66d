"""The watcher end to end with a real nats-server: a directory of objects -> state in the bucket.

Covers: the first publish is the complete state; a one-endpoint change is a small delta; a bad
config changes nothing published and shows on /healthz; a standby replica publishes nothing and a
new leader with the same content writes nothing; a NATS restart is survived.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from kube2ipvs.lbconfig import DefaultService
from kube2ipvs.model import ClusterState
from kube2ipvs.natskv import KVPublisher, NatsSettings
from kube2ipvs.protocol import Assembler, Write
from kube2ipvs.statusserver import StatusServer
from kube2ipvs_watcher.app import AppSettings, WatcherApp
from kube2ipvs_watcher.core import WatcherCore, WatcherSettings
from kube2ipvs_watcher.files import FileSource
from tests.conftest import REALISTIC, realistic_state
from tests.natsfixture import NatsServer, running_nats_server

SETTINGS = WatcherSettings(default_service=DefaultService.parse("rdei-system/unicorns:http", 70))


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    with running_nats_server(tmp_path / "nats") as server:
        yield server


def cluster_dir(tmp_path: Path) -> Path:
    d = tmp_path / "cluster"
    d.mkdir()
    for name in ("nodes", "services", "endpointslices", "configmap"):
        shutil.copy(REALISTIC / f"{name}.json", d / f"{name}.json")
    return d


class Leader:
    def __init__(self, leading: bool) -> None:
        self.is_leader = leading
        self._changed = asyncio.Event()

    def set(self, leading: bool) -> None:
        self.is_leader = leading
        self._changed.set()

    async def wait_changed(self) -> None:
        await self._changed.wait()
        self._changed.clear()

    async def run(self) -> None:
        await asyncio.Event().wait()


class RecordingPublisher(KVPublisher):
    """The real publisher, remembering the keys of each batch it wrote."""

    batches: list[list[str]]

    async def publish(self, writes: Sequence[Write]) -> int:
        self.batches = [*getattr(self, "batches", []), [w.key for w in writes]]
        return await super().publish(writes)


@asynccontextmanager
async def watcher(directory: Path, url: str, leader: Leader | None = None) -> AsyncIterator[WatcherApp]:
    publisher = RecordingPublisher(NatsSettings(servers=(url,)),
                                   on_reconnect=lambda: app.nats_reconnected())  # noqa: PLW0108 (app comes next)
    await publisher.start()
    app = WatcherApp(WatcherCore(SETTINGS, clock=lambda: 0.0), source=FileSource(directory, interval=0.02),
                     publisher=publisher, leadership=leader, settings=AppSettings(min_interval=0.01))
    task = asyncio.create_task(app.run())
    try:
        yield app
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await publisher.close()


async def bucket_state(url: str) -> ClusterState | None:
    reader = KVPublisher(NatsSettings(servers=(url,)))
    await reader.start()
    try:
        assembler = Assembler()
        for key, value in (await reader.read_all()).items():
            assembler.update(key, value)
        return assembler.complete()
    finally:
        await reader.close()


async def until(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.02)


def run(coro: Awaitable[None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 60))


def edit_json(path: Path, change: Callable[[Any], None]) -> None:
    doc = json.loads(path.read_text())
    change(doc)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc))
    tmp.replace(path)  # atomic: the source never sees half a file


def test_the_first_publish_is_the_complete_state(tmp_path: Path, nats_server: NatsServer) -> None:
    async def scenario() -> None:
        async with watcher(cluster_dir(tmp_path), nats_server.url) as app:
            await asyncio.wait_for(app.published_event.wait(), 10)
            got = await bucket_state(nats_server.url)
            assert got is not None
            assert got.services == realistic_state().services
            assert got.generation == 1
            assert app.health().ok
    run(scenario())


def test_a_one_endpoint_change_is_published_as_a_small_delta(tmp_path: Path, nats_server: NatsServer) -> None:
    directory = cluster_dir(tmp_path)

    async def scenario() -> None:
        async with watcher(directory, nats_server.url) as app:
            await asyncio.wait_for(app.published_event.wait(), 10)
            app.published_event.clear()

            def scale_up(doc: Any) -> None:
                web = next(s for s in doc["items"] if s["metadata"]["name"] == "web-4xk2p")
                web["endpoints"].append({"addresses": ["10.1.1.4"], "conditions": {"ready": True},
                                         "nodeName": "node-a"})
            edit_json(directory / "endpointslices.json", scale_up)
            await asyncio.wait_for(app.published_event.wait(), 10)
            publisher = app._publisher
            assert isinstance(publisher, RecordingPublisher)
            # The slice feeds web's two ports; node-a hosts the new pod. Nothing else is rewritten.
            assert publisher.batches[-1] == ["node.node-a.192-0-2-10.80.tcp", "node.node-a.192-0-2-10.8080.tcp",
                                             "vs.192-0-2-10.80.tcp", "vs.192-0-2-10.8080.tcp", "state.meta"]
            got = await bucket_state(nats_server.url)
            assert got is not None
            web80 = next(vs for vs in got.services if vs.key == ("192.0.2.10", 80, "tcp"))
            assert [(b.node, b.weight) for b in web80.backends] == [("node-a", 3), ("node-b", 1), ("node-c", 1)]
            assert got.generation == 2
    run(scenario())


def test_a_bad_config_changes_nothing_published_and_shows_on_healthz(tmp_path: Path, nats_server: NatsServer) -> None:
    directory = cluster_dir(tmp_path)

    async def scenario() -> None:
        async with watcher(directory, nats_server.url) as app:
            server = StatusServer(host="127.0.0.1", port=0, health=app.health, config=app.config,
                                  registry=app.registry)
            await server.start()
            try:
                await asyncio.wait_for(app.published_event.wait(), 10)
                before = await bucket_state(nats_server.url)

                def break_it(doc: Any) -> None:
                    lb = json.loads(doc["data"]["green"])
                    lb["config"]["192.0.2.10"]["80"]["ipvsOptions"]["scheduler"] = "fastest"
                    doc["data"]["green"] = json.dumps(lb)
                edit_json(directory / "configmap.json", break_it)

                async def rejected() -> bool:
                    return app.core.config_status.rejected is not None
                await until(rejected)
                async with aiohttp.ClientSession() as http:
                    async with http.get(f"http://127.0.0.1:{server.port}/healthz") as r:
                        body = await r.json()
                        assert r.status == 503
                        assert body["reason"].startswith('config rejected: config."192.0.2.10"."80".ipvsOptions')
                    async with http.get(f"http://127.0.0.1:{server.port}/metrics") as r:
                        metrics = await r.text()
                        assert "kube2ipvs_watcher_config_rejections_total 1.0" in metrics
                        assert "kube2ipvs_watcher_state_services 10.0" in metrics
                        assert "kube2ipvs_watcher_state_bytes 0.0" not in metrics
                    async with http.get(f"http://127.0.0.1:{server.port}/config?format=ipvsadm") as r:
                        assert (await r.text()).startswith("-A -t 192.0.2.10:53 -s wrr\n")
                    async with http.get(f"http://127.0.0.1:{server.port}/config?format=yaml") as r:
                        assert r.status == 400
                assert await bucket_state(nats_server.url) == before
            finally:
                await server.stop()
    run(scenario())


def test_a_standby_publishes_nothing_and_a_new_leader_with_the_same_content_writes_nothing(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    directory = cluster_dir(tmp_path)

    async def scenario() -> None:
        first, second = Leader(True), Leader(False)
        async with watcher(directory, nats_server.url, first) as one, \
                watcher(directory, nats_server.url, second) as two:
            await asyncio.wait_for(one.published_event.wait(), 10)

            async def two_ready() -> bool:
                return two.core.ready
            await until(two_ready)
            assert two.metrics.publishes._value.get() == 0
            first.set(False)
            second.set(True)
            await asyncio.wait_for(two.published_event.wait(), 10)
            assert two.metrics.publishes._value.get() == 0  # same content: no write, no consumer churn
            assert two.metrics.publish_bytes._value.get() == 0
            got = await bucket_state(nats_server.url)
            assert got is not None
            assert got.generation == 1
    run(scenario())


def test_the_watcher_republishes_after_nats_restarts_with_an_empty_store(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    directory = cluster_dir(tmp_path)

    async def scenario() -> None:
        async with watcher(directory, nats_server.url) as app:
            await asyncio.wait_for(app.published_event.wait(), 10)
            await asyncio.to_thread(nats_server.restart, wipe=True)  # the volume is lost
            app.published_event.clear()

            def scale_down(doc: Any) -> None:
                web = next(s for s in doc["items"] if s["metadata"]["name"] == "web-4xk2p")
                web["endpoints"] = web["endpoints"][:1]
            edit_json(directory / "endpointslices.json", scale_down)

            async def converged() -> bool:
                got = await bucket_state(nats_server.url)
                return got is not None and got.content_hash == (app.last_state.content_hash
                                                                if app.last_state else "")
            await until(converged, 30)
            got = await bucket_state(nats_server.url)
            assert got is not None
            web80 = next(vs for vs in got.services if vs.key == ("192.0.2.10", 80, "tcp"))
            assert [(b.node, b.weight) for b in web80.backends] == [("node-a", 1)]
    run(scenario())


@pytest.mark.parametrize("broken", ["{ half a file", "kind: [unclosed"])
def test_a_broken_file_keeps_its_last_good_objects(tmp_path: Path, broken: str) -> None:
    directory = cluster_dir(tmp_path)
    source = FileSource(directory, interval=0.01)
    first = source.scan()
    assert any(kind == "Node" for kind, _ in first)
    (directory / "nodes.json").write_text(broken)
    assert source.poll() == []  # no deletion
    assert str(directory / "nodes.json") in source.errors
