"""The director as it runs (DirectorApp with the real IPVS, host and stats adapters) in the VM:
an empty kernel converges to exactly what `kube2ipvs rules --format ipvsadm --mode bgp` prints
for the realistic fixture, with its VIPs on the dummy device and the timeouts and sysctls set;
an `ipvsadm -d` by hand is repaired by the next resync; a foreign service is never touched, not
even by `--cleanup`, which removes everything of ours."""

from __future__ import annotations

import asyncio
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from pyroute2 import IPRoute

from kube2ipvs.render.ipvsadm import render_ipvsadm
from kube2ipvs_director.app import DirectorApp, DirectorSettings, cleanup, default_vs_sysctls
from kube2ipvs_director.host import DEFAULT_DEVICE, LinuxHost
from kube2ipvs_director.kernel import LinuxIpvs
from kube2ipvs_director.main import LinuxStats
from kube2ipvs_director.plan import Timeouts
from tests.conftest import realistic_state
from tests.vm.conftest import IPVSSocket

pytestmark = pytest.mark.vm

DEVICE = DEFAULT_DEVICE  # --cleanup deletes only this dummy (the default), never an operator's device


def ipvsadm(*args: str) -> str:
    return subprocess.run(["ipvsadm", *args], check=True, capture_output=True, text=True, timeout=60).stdout


def saved() -> list[str]:
    return sorted(ipvsadm("-Sn").splitlines())


def without_thresholds(text: str) -> list[str]:
    # ipvsadm-save never prints -x/-y (ipvsadm-restore accepts them); compare the rest.
    return sorted(re.sub(r" -[xy] \d+", "", line) for line in text.splitlines())



def device_addresses() -> dict[str, int | None]:
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=DEVICE)
        if not found:
            return {}
        return {m.get("IFA_ADDRESS"): m.get("IFA_PROTO") for m in ipr.get_addr(index=found[0])
                if not str(m.get("IFA_ADDRESS")).startswith("fe80")}


@pytest.fixture
def parts(ipvs: IPVSSocket, tmp_path: Path) -> Iterator[tuple[LinuxIpvs, LinuxHost, Path]]:
    kernel, host = LinuxIpvs(), LinuxHost(device=DEVICE)
    try:
        yield kernel, host, tmp_path / "director.json"
    finally:
        kernel.close()
        host.close()
        # Fresh sockets on this thread: the app used the others on its kernel thread.
        kernel, host = LinuxIpvs(), LinuxHost(device=DEVICE)
        try:
            cleanup(kernel, host, tmp_path / "director.json")
            host.remove_device()
        finally:
            kernel.close()
            host.close()


def test_the_director_converges_repairs_and_cleans_up_only_its_own(parts: tuple[LinuxIpvs, LinuxHost, Path]) -> None:
    kernel, host, state_file = parts
    ipvsadm("-A", "-t", "10.96.0.10:53", "-s", "rr")  # kube-proxy's, say
    foreign = [line for line in saved() if "10.96.0.10" in line]
    state = realistic_state()
    stats = LinuxStats()
    app = DirectorApp(kernel, host, source=None, stats=stats, settings=DirectorSettings(
        mode="bgp", vs_sysctls=default_vs_sysctls("bgp"), state_file=state_file))
    try:
        app.offer(state)
        asyncio.run(app.reconcile_once())
        assert app.health().ok, app.health().reason
        ours = [line for line in saved() if "10.96.0.10" not in line]
        assert without_thresholds("\n".join(ours)) == without_thresholds(render_ipvsadm(state, mode="bgp"))
        served = {s.vip for s in state.services if s.backends}
        assert set(device_addresses()) == served
        assert set(device_addresses().values()) == {149}
        assert kernel.timeouts() == Timeouts(900, 30, 300)
        assert Path("/proc/sys/net/ipv4/vs/sloppy_tcp").read_text().strip() == "1"
        assert Path("/proc/sys/net/ipv4/vs/conntrack").read_text().strip() == "0"
        assert asyncio.run(app.reconcile_once()) == []  # a resync of a converged kernel

        victim = next(line for line in ours if line.startswith("-a "))
        target = victim.split()[1:5]  # -t VIP:PORT -r RS:PORT
        ipvsadm("-d", *target)
        repaired = asyncio.run(app.reconcile_once())
        assert [type(op).__name__ for op in repaired] == ["AddDest"]
        assert [line for line in saved() if "10.96.0.10" not in line] == ours
        assert [line for line in saved() if "10.96.0.10" in line] == foreign

        asyncio.run(app.read_stats())
        metrics = generate_latest(app.registry).decode()
        assert "kube2ipvs_director_vs_active_connections{" in metrics
        assert f"kube2ipvs_director_generation_applied {float(state.generation)}" in metrics
    finally:
        stats.close()
        app.close()

    kernel, host = LinuxIpvs(), LinuxHost(device=DEVICE)  # `--cleanup` runs as a process of its own
    try:
        done = cleanup(kernel, host, state_file)
        assert host.remove_device()
    finally:
        kernel.close()
        host.close()
    assert saved() == foreign  # ours gone, the foreign service as it was
    assert any(isinstance(op, str) and op.startswith("DeleteVip") for op in done)
    assert device_addresses() == {}
    ipvsadm("-D", "-t", "10.96.0.10:53")
