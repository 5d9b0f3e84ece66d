"""`kube2ipvs realserver` flags: settings from flags and environment, usage errors."""

from __future__ import annotations

import asyncio
import contextlib

import aiohttp
import pytest

from kube2ipvs.statusserver import StatusServer
from kube2ipvs_realserver.app import AppSettings, RealserverApp
from kube2ipvs_realserver.kernel import Counters, FakeKernel, label_for
from kube2ipvs_realserver.main import build_parser, realserver_settings, run
from kube2ipvs_realserver.plan import Settings
from tests.test_realserver_plan import node_slice


def test_defaults_keep_client_addresses_and_set_the_arp_sysctls_on_lo() -> None:
    settings = realserver_settings(build_parser().parse_args(["--node", "node-a"]))
    assert settings == Settings(device="lo", interface=None, arp_ignore=1, arp_announce=2, masquerade_exempt=None)


def test_masquerade_is_on_with_exempt_cidrs_or_with_the_flag_alone() -> None:
    exempt = build_parser().parse_args(["--masquerade-exempt", "10.0.0.0/8", "--masquerade-exempt", "fd00::/8"])
    assert realserver_settings(exempt).masquerade_exempt == ("10.0.0.0/8", "fd00::/8")
    assert realserver_settings(build_parser().parse_args(["--masquerade"])).masquerade_exempt == ()


def test_flags_fall_back_to_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBE2IPVS_INTERFACE", "bond0")
    monkeypatch.setenv("KUBE2IPVS_ARP_ANNOUNCE", "1")
    settings = realserver_settings(build_parser().parse_args([]))
    assert (settings.interface, settings.arp_announce) == ("bond0", 1)


def test_running_without_a_node_name_is_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NODE_NAME", raising=False)
    monkeypatch.delenv("KUBE2IPVS_NODE", raising=False)
    assert run(["--listen", "127.0.0.1:0"]) == 2


def test_the_address_label_is_left_out_where_the_device_name_is_too_long_for_it() -> None:
    assert label_for("lo") == "lo:k2i"
    assert label_for("k2i-vips0") == "k2i-vips0:k2i"
    assert label_for("verylongname") is None


def test_counters_are_read_when_metrics_are_scraped_never_by_a_reconcile_or_a_timer() -> None:
    """On a node holding 10,000 services a read is about 1.7 s: a reconcile never waits for it,
    nothing reads it for nobody, and scrapes within `counters_interval` share one reading."""
    class CountingKernel(FakeKernel):
        reads = 0

        def counters(self) -> Counters:
            self.reads += 1
            return {}

    kernel = CountingKernel()
    app = RealserverApp(kernel, source=None, app_settings=AppSettings(counters_interval=0.3, resync_interval=60))

    async def scenario() -> list[int]:
        for port in range(80, 85):
            app.offer(node_slice(("192.0.2.10", port)))
            await app.reconcile_once()
        task = asyncio.create_task(app.run())
        await asyncio.sleep(0.5)  # running, nobody scraping
        reads = [kernel.reads]
        server = StatusServer(host="127.0.0.1", port=0, health=app.health, config=app.config, registry=app.registry,
                              before_metrics=app.read_counters)
        await server.start()
        try:
            async with aiohttp.ClientSession() as session:
                async def scrape() -> None:
                    async with session.get(f"http://127.0.0.1:{server.port}/metrics") as response:
                        assert response.status == 200
                await asyncio.gather(scrape(), scrape(), scrape())
                reads.append(kernel.reads)
                await asyncio.sleep(0.4)
                await scrape()
                reads.append(kernel.reads)
        finally:
            await server.stop()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        return reads

    assert asyncio.run(scenario()) == [0, 1, 2]
