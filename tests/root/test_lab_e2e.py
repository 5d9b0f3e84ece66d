"""The lab end to end (`kube2ipvs lab up|status|probe|down`), as an operator runs it, on a copy of
lab/cluster/: every VIP answers from the client namespace with the right service's pods and the
client's own address; scaling a service in the files reaches the new pod; a node removed from
the files is drained; killing one director's processes leaves traffic flowing through the
other; `down` leaves no namespace, process or state behind."""

from __future__ import annotations

import io
import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kube2ipvs.cli import main
from kube2ipvs.lab import STATE_ROOT, prefix
from kube2ipvs.labplan import LabVip
from tests.root.labfixture import running_lab

pytestmark = pytest.mark.root

REPO = Path(__file__).resolve().parents[2]
NAME = f"t{os.getpid() % 10_000_000}"
SERVICE_OF_PORT = {70: "unicorns-", 80: "web-", 53: "dns-"}


def cli(*args: str) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(["lab", *args, "--name", NAME], out=out, err=err)
    return code, out.getvalue() + err.getvalue()


def client_ns() -> str:
    return prefix(NAME) + "client"


def ask(vip: LabVip) -> str | None:
    from kube2ipvs.lab import probe

    return probe(client_ns(), vip, timeout=1.0)


def until(read: Callable[[], bool], seconds: float) -> float:
    start = time.monotonic()
    while not read():
        if time.monotonic() - start > seconds:
            pytest.fail(f"not within {seconds} s")
        time.sleep(0.05)
    return time.monotonic() - start


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with running_lab(NAME, tmp_path_factory.mktemp("lab")) as running:
        assert "director dataplane:" in running.up_output
        yield running.cluster


def status() -> dict[str, Any]:
    code, text = cli("status", "--json")
    assert code == 0, text
    report: dict[str, Any] = json.loads(text)
    return report


def test_every_vip_answers_with_its_service_and_the_clients_address(lab: Path) -> None:
    report = status()
    assert report["client_namespace"] == client_ns()
    vips = [LabVip(v["vip"], v["port"], v["protocol"]) for v in report["vips"]]
    assert {(v.port, v.protocol) for v in vips} == {(70, "tcp"), (80, "tcp"), (53, "udp")}
    for vip in vips:
        answers = [ask(vip) for _ in range(6)]
        assert all(a is not None for a in answers), (vip, answers)
        pods = {a.split()[0] for a in answers if a}
        assert all(p.startswith(SERVICE_OF_PORT[vip.port]) for p in pods), (vip, pods)
        assert {a.split()[2] for a in answers if a} == {"203.0.113.2"}  # no SNAT anywhere
    assert all(h["ok"] for h in report["health"].values()), report["health"]
    assert report["dataplane"] in ("ipvs", "nftables")
    code, text = cli("probe", "udp://192.0.2.11:53")
    assert code == 0
    assert text.startswith("dns-")


def test_scaling_a_service_in_the_files_reaches_the_new_pod(lab: Path) -> None:
    slices = lab / "endpointslices.yaml"
    before = slices.read_text()
    web2 = "      - {addresses: [10.244.3.11], nodeName: node-3, conditions: {ready: true}, targetRef: {kind: Pod, " \
           "name: web-2}}\n"
    assert web2 in before
    slices.write_text(before.replace(web2, web2 + web2.replace("10.244.3.11", "10.244.2.13").replace(
        "node-3", "node-2").replace("web-2", "web-3")))
    vip = LabVip("192.0.2.10", 80, "tcp")
    took = until(lambda: (ask(vip) or "").startswith("web-3"), 15)
    print(f"scaled: the new pod answered {took:.2f} s after the file changed")
    assert "10.244.2.13" in status()["pods"]
    slices.write_text(before)
    until(lambda: "10.244.2.13" not in status()["pods"], 10)
    assert all(not (ask(vip) or "web-3").startswith("web-3") for _ in range(10))


def test_a_node_removed_from_the_files_is_drained(lab: Path) -> None:
    nodes = lab / "nodes.yaml"
    before = nodes.read_text()
    start = before.index("  - apiVersion: v1\n    kind: Node\n    metadata: {name: node-3")
    nodes.write_text(before[:start])
    vip = LabVip("192.0.2.10", 80, "tcp")
    ns = prefix(NAME) + "dir1"

    def drained() -> bool:
        done = subprocess.run(["ip", "netns", "exec", ns, "curl", "-sS", "-m", "2",
                               "http://10.99.0.11:9872/config?format=ipvsadm"], capture_output=True, text=True,
                              check=False)
        if done.returncode != 0 or "10.99.0.21" not in done.stdout:
            return False
        # Draining: at weight 0 (no new connection) until it is idle, then gone.
        return all(line.endswith("-w 0") for line in done.stdout.splitlines() if "-r 10.99.0.23:" in line)

    took = until(drained, 15)
    print(f"node-3 was drained by the directors {took:.2f} s after the file changed")
    answers = [ask(vip) for _ in range(20)]
    assert all(a is not None and " node-3 " not in a for a in answers), answers
    nodes.write_text(before)
    until(lambda: "node-3" in status()["nodes"], 15)
    until(lambda: all((ask(LabVip("192.0.2.11", 53, "udp")) or "") for _ in range(3)), 15)


def test_traffic_keeps_flowing_through_the_other_director_when_one_is_killed(lab: Path) -> None:
    report = status()
    killed = [k for k in report["processes"] if k.startswith("dir1-")]
    assert sorted(killed) == ["dir1-bgp-speaker", "dir1-director", "dir1-gobgpd"]
    router = prefix(NAME) + "router"
    for key in killed:
        os.kill(int(report["processes"][key]["pid"]), 9)

    def one_path() -> bool:
        routes = subprocess.run(["ip", "-n", router, "route", "show", "192.0.2.10"], capture_output=True,
                                text=True, check=False).stdout
        return "10.99.0.11" not in routes and routes.strip() != ""

    took = until(one_path, 15)
    print(f"the router dropped dir1's routes {took:.2f} s after its processes were killed")
    for vip in (LabVip("192.0.2.10", 80, "tcp"), LabVip("192.0.2.10", 70, "tcp"), LabVip("192.0.2.11", 53, "udp")):
        answers = [ask(vip) for _ in range(10)]
        assert all(a is not None for a in answers), (vip, answers)
    after = status()
    assert not after["processes"]["dir1-director"]["alive"]
    assert after["health"]["dir2-director"]["ok"]


def test_down_leaves_nothing_behind(lab: Path) -> None:
    report = status()
    pids = [int(p["pid"]) for p in report["processes"].values()]
    code, text = cli("down")
    assert code == 0, text
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert prefix(NAME) not in listed
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not (STATE_ROOT / NAME).exists()
    code, text = cli("status")
    assert code == 2
    assert "no lab named" in text
