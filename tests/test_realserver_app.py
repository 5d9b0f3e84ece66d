"""The realserver loop against the strict fake kernel: converging, idempotence, drift, health,
/config and the kernel counters as Prometheus series."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import aiohttp
import pytest
from prometheus_client import generate_latest

from kube2ipvs.protocol import NodeSlice
from kube2ipvs.statusserver import ConfigRequestError, StatusServer
from kube2ipvs_realserver.app import AppSettings, RealserverApp, cleanup
from kube2ipvs_realserver.kernel import FakeKernel
from kube2ipvs_realserver.plan import AddAddress, DeleteAddress, DeleteTables, ReplaceTable, Settings
from tests.test_realserver_plan import node_slice
from tests.test_render_nft import virtual_service

SETTINGS = Settings(interface="eth0")


class Slices:
    """A slice source the test feeds; `connected`, `status` and `rejected` are what /healthz
    reports of it."""

    def __init__(self) -> None:
        self.connected = True
        self.status = "in sync"
        self.rejected: dict[str, str] = {}
        self._queue: asyncio.Queue[NodeSlice] = asyncio.Queue()

    def put(self, s: NodeSlice) -> None:
        self._queue.put_nowait(s)

    async def slices(self) -> AsyncIterator[NodeSlice]:
        while True:
            yield await self._queue.get()


def app_with(kernel: FakeKernel, source: Slices | None = None, settings: Settings = SETTINGS) -> RealserverApp:
    return RealserverApp(kernel, source=source, settings=settings,
                         app_settings=AppSettings(resync_interval=0.05, retry_min=0.01, counters_interval=0))


def test_before_the_first_slice_nothing_is_touched_and_health_says_why() -> None:
    kernel = FakeKernel()
    app = app_with(kernel)
    assert asyncio.run(app.reconcile_once()) == []
    assert kernel.changes == []
    health = app.health()
    assert not health.ok
    assert health.reason == "no slice of this node received yet"


def test_a_slice_converges_the_kernel_and_the_same_slice_again_changes_nothing() -> None:
    kernel = FakeKernel()
    app = app_with(kernel)
    v6 = virtual_service("2001:db8::10", 80, endpoints=[("2001:db8:1::2", 8080)])
    only_v4_pods = virtual_service("2001:db8::11", 80)  # its one endpoint, 10.1.1.2, cannot be DNATed to
    app.offer(NodeSlice("node-a", ("192.0.2.10", "2001:db8::10", "2001:db8::11"),
                        (virtual_service("192.0.2.10", 80), v6, only_v4_pods)))
    first = asyncio.run(app.reconcile_once())
    assert AddAddress("192.0.2.10", 32) in first
    assert kernel.ours == {"192.0.2.10", "2001:db8::10"}  # a VIP without a DNAT would answer with RSTs
    assert kernel.sysctls[("eth0", "arp_ignore")] == 1
    kernel.changes.clear()
    assert asyncio.run(app.reconcile_once()) == []
    assert kernel.changes == []
    health = app.health()
    assert health.ok, health.reason
    assert health.detail["sysctls"]["lo/arp_announce"] == 2


def test_health_fails_when_the_arp_sysctls_cannot_be_set_on_the_interface() -> None:
    kernel = FakeKernel()
    app = app_with(kernel, settings=Settings(interface="eth9"))
    app.offer(node_slice(("192.0.2.10", 80)))
    asyncio.run(app.reconcile_once())
    health = app.health()
    assert not health.ok
    assert health.reason == ("sysctls wrong: eth9/arp_announce want 2, have None, "
                             "eth9/arp_ignore want 1, have None")


def test_a_failed_apply_shows_on_health_and_the_next_reconcile_repairs_it() -> None:
    kernel = FakeKernel(fail_next="nft: Error: Could not process rule")
    app = app_with(kernel)
    app.offer(node_slice(("192.0.2.10", 80)))
    asyncio.run(app.reconcile_once())
    assert app.health().reason == "last apply failed: KernelError: nft: Error: Could not process rule"
    asyncio.run(app.reconcile_once())
    assert app.health().ok
    assert kernel.ours == {"192.0.2.10"}


def test_the_loop_applies_each_new_slice_repairs_drift_and_keeps_the_kernel_while_nats_is_away() -> None:
    kernel = FakeKernel()
    source = Slices()
    app = app_with(kernel, source)

    async def scenario() -> None:
        task = asyncio.create_task(app.run())
        try:
            source.put(node_slice(("192.0.2.10", 80), ("192.0.2.11", 80)))
            await until(lambda: kernel.ours == {"192.0.2.10", "192.0.2.11"})
            source.put(node_slice(("192.0.2.10", 80)))
            await until(lambda: kernel.ours == {"192.0.2.10"})
            # NATS goes away: no new slice. Resyncs go on and change nothing...
            source.connected = False
            kernel.changes.clear()
            await resyncs(app, 3)
            assert kernel.changes == []
            # ...but a table deleted by hand is back within a resync interval.
            kernel.nft_text = None
            await until(lambda: kernel.nft_text is not None)
            assert [type(op) for op in kernel.changes] == [ReplaceTable]
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(scenario())
    assert app.health().detail["nats_connected"] is False


async def until(condition: Callable[[], bool], timeout: float = 2.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.005)


async def resyncs(app: RealserverApp, n: int) -> None:
    for _ in range(n):
        app.reconciled.clear()
        await asyncio.wait_for(app.reconciled.wait(), 2)


def test_kernel_counters_become_labelled_series_that_go_with_their_service() -> None:
    kernel = FakeKernel()
    app = app_with(kernel)
    app.offer(node_slice(("192.0.2.10", 80), ("192.0.2.11", 80)))
    kernel.counter_values = {("192.0.2.10", 80, "tcp"): {"syn_in": (5, 300), "pkts_in": (20, 1500)},
                             ("192.0.2.11", 80, "tcp"): {"rst_out": (2, 80)},
                             ("192.0.2.99", 80, "tcp"): {"rst_out": (7, 80)}}  # not in the slice
    asyncio.run(app.reconcile_once())
    asyncio.run(app.read_counters())
    text = generate_latest(app.registry).decode()
    labels = 'namespace="shop",port="80",port_name="http",protocol="tcp",service="web"'
    assert (f'kube2ipvs_realserver_tcp_flags_total{{direction="in",flag="syn",{labels},vip="192.0.2.10"}} 5.0'
            in text)
    assert f'kube2ipvs_realserver_bytes_total{{direction="in",{labels},vip="192.0.2.10"}} 1500.0' in text
    assert f'kube2ipvs_realserver_tcp_flags_total{{direction="out",flag="rst",{labels},vip="192.0.2.11"}} 2.0' in text
    assert "192.0.2.99" not in text  # counters of a service not in the slice make no series
    app.offer(node_slice(("192.0.2.10", 80)))
    asyncio.run(app.reconcile_once())
    assert 'vip="192.0.2.11"' not in generate_latest(app.registry).decode()


def test_config_shows_the_nodes_rules_in_each_format() -> None:
    app = app_with(FakeKernel())
    assert app.config({"format": "nft"}).status == 503
    app.offer(node_slice(("192.0.2.10", 80)))
    asyncio.run(app.reconcile_once())
    assert "192.0.2.10 . tcp . 80 . 0 : 10.1.1.2 . 8080" in app.config({"format": "nft"}).body
    assert "-j DNAT --to-destination 10.1.1.2:8080" in app.config({"format": "iptables"}).body
    assert '"vip": "192.0.2.10"' in app.config({"format": "json"}).body
    assert '"vips": [\n    "192.0.2.10"\n  ]' in app.config({}).body
    with pytest.raises(ConfigRequestError):
        app.config({"format": "ipvsadm"})


def test_cleanup_removes_our_tables_and_addresses_and_keeps_foreign_ones() -> None:
    kernel = FakeKernel(foreign={"127.0.0.1", "192.0.2.99"})
    app = app_with(kernel)
    app.offer(node_slice(("192.0.2.10", 80)))
    asyncio.run(app.reconcile_once())
    removed = cleanup(kernel)
    assert removed == [DeleteTables(), DeleteAddress("192.0.2.10", 32)]
    assert kernel.ours == set()
    assert kernel.nft_text is None
    assert kernel.foreign == {"127.0.0.1", "192.0.2.99"}
    assert cleanup(kernel) == [DeleteTables()]  # idempotent: deleting absent tables is fine


def test_the_status_server_answers_healthz_config_and_metrics_from_the_app() -> None:
    app = app_with(FakeKernel())

    async def scenario() -> None:
        server = StatusServer(host="127.0.0.1", port=0, health=app.health, config=app.config, registry=app.registry)
        await server.start()
        base = f"http://127.0.0.1:{server.port}"
        try:
            async with aiohttp.ClientSession() as http:
                async with http.get(f"{base}/healthz") as r:
                    assert (r.status, (await r.json())["reason"]) == (503, "no slice of this node received yet")
                app.offer(node_slice(("192.0.2.10", 80)))
                await app.reconcile_once()
                async with http.get(f"{base}/healthz") as r:
                    assert r.status == 200
                async with http.get(f"{base}/config?format=nft") as r:
                    assert "table ip kube2ipvs {" in await r.text()
                async with http.get(f"{base}/config?format=bgp") as r:
                    assert r.status == 400
                async with http.get(f"{base}/metrics") as r:
                    assert "kube2ipvs_realserver_reconciles_total 1.0" in await r.text()
        finally:
            await server.stop()

    asyncio.run(scenario())


def test_a_resync_of_an_unchanged_slice_does_not_render_it_again() -> None:
    app = app_with(FakeKernel())
    app.offer(node_slice(("192.0.2.10", 80)))
    asyncio.run(app.reconcile_once())
    rendered = app.desired
    asyncio.run(app.reconcile_once())
    assert app.desired is rendered
    app.offer(node_slice(("192.0.2.10", 80)))  # an equal slice, handed over again: rendered again
    asyncio.run(app.reconcile_once())
    assert app.desired is not rendered
    assert app.desired == rendered
