"""`kube2ipvs watcher` as deployed: the real role wiring (flags, Kubernetes source, Lease, Events,
status server, NATS publisher) against the fake API server and a real nats-server."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from kube2ipvs.natskv import KVPublisher, NatsSettings
from kube2ipvs.protocol import Assembler
from kube2ipvs_watcher.main import amain, build_parser
from tests.conftest import REALISTIC, realistic_state
from tests.fakes.kubeapi import FakeKubeAPI, realistic_objects
from tests.natsfixture import NatsServer, running_nats_server


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    with running_nats_server(tmp_path / "nats") as server:
        yield server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def bucket(url: str) -> dict[str, bytes]:
    async with KVPublisher(NatsSettings(servers=(url,))) as reader:
        return await reader.read_all()


async def complete_hash(url: str) -> str | None:
    a = Assembler()
    for key, value in (await bucket(url)).items():
        a.update(key, value)
    state = a.complete()
    return state.content_hash if state is not None else None


async def eventually(check: Any, timeout: float = 20.0) -> None:
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.05)


def test_the_watcher_role_publishes_the_cluster_reports_a_bad_config_and_hands_over_its_lease(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    async def scenario() -> None:
        async with FakeKubeAPI() as api:
            for obj in realistic_objects(*(REALISTIC / f"{n}.json" for n in
                                           ("nodes", "services", "endpointslices", "configmap"))):
                api.create(obj)
            kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
            args = build_parser().parse_args([
                "--kubeconfig", str(kubeconfig), "--nats", nats_server.url, "--listen", "127.0.0.1:0",
                "--default-service", "rdei-system/unicorns:http", "--identity", "watcher-1",
                "--lease-namespace", "platform-load-balancer", "--min-interval", "0.05",
            ])
            stop = asyncio.Event()
            role = asyncio.create_task(amain(args, stop))
            want = realistic_state().content_hash

            async def published() -> bool:
                return await complete_hash(nats_server.url) == want
            await eventually(published)
            lease = api.get("Lease", "kube2ipvs-watcher", namespace="platform-load-balancer")
            assert lease is not None
            assert lease["spec"]["holderIdentity"] == "watcher-1"

            def break_config(cm: dict[str, Any]) -> None:
                lb = json.loads(cm["data"]["green"])
                lb["config"]["192.0.2.10"]["80"]["portName"] = "http; flush ruleset"
                cm["data"]["green"] = json.dumps(lb)
            api.modify("ConfigMap", "kube2ipvs", break_config, namespace="platform-load-balancer")

            async def event_recorded() -> bool:
                return any(e.get("reason") == "ConfigRejected" for e in api.events())
            await eventually(event_recorded)
            (event,) = [e for e in api.events() if e.get("reason") == "ConfigRejected"]
            assert event["involvedObject"]["name"] == "kube2ipvs"
            configmap = api.get("ConfigMap", "kube2ipvs", namespace="platform-load-balancer")
            assert configmap is not None
            assert event["involvedObject"]["uid"] == configmap["metadata"]["uid"]
            assert '"http; flush ruleset" is not a valid Kubernetes port name' in event["message"]
            assert await complete_hash(nats_server.url) == want  # nothing published changed

            def scale_down(es: dict[str, Any]) -> None:
                es["endpoints"] = es["endpoints"][:1]
            api.modify("EndpointSlice", "api-kk8w2", scale_down, namespace="shop")

            async def updated() -> bool:
                values = await bucket(nats_server.url)
                doc = json.loads(values.get("vs.192-0-2-11.443.tcp", b"{}"))
                return [b["weight"] for b in doc.get("backends", [])] == [1]
            await eventually(updated)

            stop.set()
            assert await asyncio.wait_for(role, 20) == 0
            lease = api.get("Lease", "kube2ipvs-watcher", namespace="platform-load-balancer")
            assert lease is not None
            assert not lease["spec"].get("holderIdentity")  # released: a standby takes over at once

    asyncio.run(asyncio.wait_for(scenario(), 90))


def test_the_watcher_role_answers_health_before_its_first_publish(tmp_path: Path, nats_server: NatsServer) -> None:
    async def scenario() -> None:
        async with FakeKubeAPI() as api:
            kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
            api.fail_next(1000, status=500, resource="nodes")  # the initial list of Nodes keeps failing
            port = free_port()
            args = build_parser().parse_args([
                "--kubeconfig", str(kubeconfig), "--nats", nats_server.url, "--listen", f"127.0.0.1:{port}",
                "--no-leader-elect",
            ])
            stop = asyncio.Event()
            role = asyncio.create_task(amain(args, stop))
            async with aiohttp.ClientSession() as http:
                async def answered() -> bool:
                    try:
                        async with http.get(f"http://127.0.0.1:{port}/healthz") as r:
                            body = await r.json()
                            return r.status == 503 and "initial list of Node" in body["reason"]
                    except aiohttp.ClientConnectionError:
                        return False
                await eventually(answered)
            stop.set()
            assert await asyncio.wait_for(role, 20) == 0

    asyncio.run(asyncio.wait_for(scenario(), 60))
