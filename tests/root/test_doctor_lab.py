"""`kube2ipvs doctor` in the lab, as an operator runs it on a director host and on a node: a healthy
lab passes every check that applies; then one thing at a time is broken (arp_ignore=0 on a node,
the node's nft table deleted, gobgpd stopped on dir1) and that check FAILs with its fix.

One lab for the module, on a copy of lab/cluster/, brought down at the end whatever happened.
Breakages are made inside the lab's namespaces only; the one process killed is the lab's dir1
gobgpd, by the PID `lab status` reports (last: the lab does not restart it)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kube2ipvs.cli import main
from kube2ipvs.lab import prefix
from kube2ipvs.labplan import DIRECTORS
from tests.root.labfixture import running_lab

pytestmark = pytest.mark.root

REPO = Path(__file__).resolve().parents[2]
NAME = f"d{os.getpid() % 1_000_000}"
NODE_ADDRESSES = {"node-1": "10.99.0.21", "node-2": "10.99.0.22", "node-3": "10.99.0.23"}

Results = list[dict[str, str]]


def lab_cli(*args: str) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(["lab", *args, "--name", NAME], out=out, err=err)
    return code, out.getvalue() + err.getvalue()


def status() -> dict[str, Any]:
    code, text = lab_cli("status", "--json")
    assert code == 0, text
    report: dict[str, Any] = json.loads(text)
    return report


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with running_lab(NAME, tmp_path_factory.mktemp("lab")):
        yield status()


def ns(host: str) -> str:
    return prefix(NAME) + host


def doctor(host: str, address: str) -> tuple[int, Results]:
    """`kube2ipvs doctor --json` inside the host's namespace, as an operator on that host runs it."""
    done = subprocess.run(["ip", "netns", "exec", ns(host), sys.executable, "-m", "kube2ipvs.cli", "doctor",
                           "--listen-address", address, "--json"], capture_output=True, text=True, timeout=60,
                          check=False)
    assert "Traceback" not in done.stderr, done.stderr
    results: Results = json.loads(done.stdout)
    return done.returncode, results


def result(results: Results, name: str) -> dict[str, str]:
    return next(r for r in results if r["name"] == name)


def sysctl(host: str, setting: str) -> None:
    subprocess.run(["ip", "netns", "exec", ns(host), "sysctl", "-qw", setting], check=True, timeout=10)


def read_sysctl(host: str, name: str) -> str:
    return subprocess.run(["ip", "netns", "exec", ns(host), "sysctl", "-n", name], capture_output=True, text=True,
                          check=True, timeout=10).stdout.strip()


def until(read: Callable[[], bool], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not read():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {seconds} s")
        time.sleep(0.2)


def broken(host: str, address: str, check: str, breaking: Callable[[], None],
           still_broken: Callable[[], bool]) -> tuple[int, dict[str, str]]:
    """Break, run doctor right away, and return `check`'s result. The service repairs the damage at
    its next resync (every 10 s); when that fell between breaking and reading, break again."""
    for _ in range(3):
        breaking()
        code, results = doctor(host, address)
        found = result(results, check)
        if found["status"] != "PASS" or still_broken():
            return code, found
    pytest.fail(f"{check}: repaired before doctor read it, three times")


def test_a_healthy_director_passes_every_check_that_applies_to_it(lab: dict[str, Any]) -> None:
    code, results = doctor("dir1", DIRECTORS["dir1"])
    by_status = {r["name"]: r["status"] for r in results}
    assert code == 0, results
    skipped = {name for name, s in by_status.items() if s == "SKIP"}
    curls = {f"curl {v['vip']}:70" for v in lab["vips"] if v["port"] == 70}
    # From a director the VIPs are its own addresses: a curl from there never leaves it.
    stateless = {"IPVS timeouts", "IPVS connection states"} if lab["dataplane"] == "nftables" else set()
    assert skipped == curls | stateless, results
    assert all(s == "PASS" for name, s in by_status.items() if name not in skipped), results
    wanted = {"director service", "ARP sysctls", "VIP addresses", "BGP", "NATS",
              "nftables dataplane" if lab["dataplane"] == "nftables" else "IPVS rules"}
    assert wanted <= by_status.keys()


def test_a_healthy_node_passes_every_check_and_curl_reaches_the_unicorns(lab: dict[str, Any]) -> None:
    code, results = doctor("node-1", NODE_ADDRESSES["node-1"])  # node-1 runs a unicorns pod
    assert code == 0, results
    assert all(r["status"] == "PASS" for r in results), results
    assert {r["name"] for r in results} >= {"realserver service", "ARP sysctls", "VIP addresses", "nft table",
                                            "RST counters", "NATS", "curl 192.0.2.10:70", "curl 192.0.2.11:70"}
    assert result(results, "curl 192.0.2.10:70")["detail"].startswith("HTTP 200: unicorns-")


def test_arp_ignore_0_on_a_node_fails_the_arp_check_with_its_fix(lab: dict[str, Any]) -> None:
    try:
        code, arp = broken("node-2", NODE_ADDRESSES["node-2"], "ARP sysctls",
                           lambda: sysctl("node-2", "net.ipv4.conf.lo.arp_ignore=0"),
                           lambda: read_sysctl("node-2", "net.ipv4.conf.lo.arp_ignore") == "0")
        assert code == 1
        assert arp["status"] == "FAIL", arp
        assert "lo/arp_ignore=0" in arp["detail"]
        assert arp["fix"].startswith("sysctl -w net.ipv4.conf.lo.arp_ignore=1")
    finally:
        sysctl("node-2", "net.ipv4.conf.lo.arp_ignore=1")
    code, results = doctor("node-2", NODE_ADDRESSES["node-2"])
    assert result(results, "ARP sysctls")["status"] == "PASS"


def test_the_nft_table_deleted_on_a_node_fails_the_table_check_with_its_fix(lab: dict[str, Any]) -> None:
    def delete() -> None:
        subprocess.run(["ip", "netns", "exec", ns("node-3"), "nft", "delete", "table", "ip", "kube2ipvs"],
                       check=False, timeout=10)

    def absent() -> bool:
        return subprocess.run(["ip", "netns", "exec", ns("node-3"), "nft", "list", "chains", "ip"],
                              capture_output=True, text=True, check=False, timeout=10).stdout.find("kube2ipvs") < 0

    code, table = broken("node-3", NODE_ADDRESSES["node-3"], "nft table", delete, absent)
    assert code == 1
    assert table["status"] == "FAIL", table
    assert table["detail"] == "table ip kube2ipvs is missing"
    assert "next resync" in table["fix"]
    # The realserver puts it back at its next resync, and doctor sees it whole again.
    until(lambda: result(doctor("node-3", NODE_ADDRESSES["node-3"])[1], "nft table")["status"] == "PASS", 25)


def test_gobgpd_stopped_on_a_director_fails_the_bgp_check_with_its_fix(lab: dict[str, Any]) -> None:
    entry = status()["processes"]["dir1-gobgpd"]
    pid = int(entry["pid"])
    assert entry["alive"]
    assert Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].endswith(b"gobgpd")
    os.kill(pid, signal.SIGTERM)  # the lab's own gobgpd of dir1; the lab does not restart it
    until(lambda: not status()["processes"]["dir1-gobgpd"]["alive"], 10)
    code, results = doctor("dir1", DIRECTORS["dir1"])
    bgp = result(results, "BGP")
    assert code == 1
    assert bgp["status"] == "FAIL", bgp
    assert "gobgpd does not answer" in bgp["detail"]
    assert "systemctl restart gobgpd" in bgp["fix"]
