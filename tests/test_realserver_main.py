"""`kube2ipvs realserver` flags: settings from flags and environment, usage errors."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

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


def test_reconciles_never_read_the_counters_their_own_task_does_once_per_interval() -> None:
    class CountingKernel(FakeKernel):
        reads = 0

        def counters(self) -> Counters:
            self.reads += 1
            return {}

    kernel = CountingKernel()
    app = RealserverApp(kernel, source=None, app_settings=AppSettings(counters_interval=0.2, resync_interval=60))

    async def burst() -> None:
        for port in range(80, 85):
            app.offer(node_slice(("192.0.2.10", port)))
            await app.reconcile_once()
        assert kernel.reads == 0  # a reconcile at 10,000 services must not wait ~2 s for them
        task = asyncio.create_task(app.run())
        await asyncio.sleep(0.5)  # reads at 0, 0.2 and 0.4 s
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(burst())
    assert kernel.reads == 3
