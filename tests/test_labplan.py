"""The lab's plan from cluster files (kube2ipvs.labplan), without root: what the lab would build
from lab/cluster/, and clear errors for files it cannot build from. The lab itself:
tests/root/test_lab_e2e.py."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import pytest

from kube2ipvs.cli import main
from kube2ipvs.labplan import DIRECTORS, LabError, LabPod, LabVip, frr_config, read_cluster, veth_name

CLUSTER = Path(__file__).resolve().parents[1] / "lab" / "cluster"


@pytest.fixture
def cluster(tmp_path: Path) -> Path:
    for f in CLUSTER.iterdir():
        shutil.copy(f, tmp_path / f.name)
    return tmp_path


def test_the_shipped_cluster_makes_three_nodes_seven_pods_and_four_vip_ports() -> None:
    world = read_cluster(CLUSTER)
    assert [(n.name, n.address) for n in world.nodes] == [
        ("node-1", "10.99.0.21"), ("node-2", "10.99.0.22"), ("node-3", "10.99.0.23")]
    assert len(world.pods) == 7
    assert LabPod("10.244.1.12", "dns-0", "node-1", (), (5353,)) in world.pods
    assert LabPod("10.244.3.11", "web-2", "node-3", (8080,), ()) in world.pods
    assert world.vips == (LabVip("192.0.2.10", 70, "tcp"), LabVip("192.0.2.10", 80, "tcp"),
                          LabVip("192.0.2.11", 53, "udp"), LabVip("192.0.2.11", 70, "tcp"))
    assert world.skipped == ()


def test_the_shipped_configmap_is_valid() -> None:
    out, err = io.StringIO(), io.StringIO()
    assert main(["validate-config", str(CLUSTER / "configmap.yaml")], out=out, err=err) == 0, err.getvalue()


def test_an_endpoint_on_an_unknown_node_gets_no_pod_and_says_why(cluster: Path) -> None:
    slices = cluster / "endpointslices.yaml"
    slices.write_text(slices.read_text().replace("nodeName: node-3, conditions: {ready: true}, targetRef: "
                                                 "{kind: Pod, name: web-2}", "nodeName: node-9, conditions: "
                                                 "{ready: true}, targetRef: {kind: Pod, name: web-2}"))
    world = read_cluster(cluster)
    assert "10.244.3.11" not in {p.address for p in world.pods}
    assert any("10.244.3.11" in s and "node-9" in s for s in world.skipped)


@pytest.mark.parametrize(("file", "old", "new", "message"), [
    ("nodes.yaml", "address: 10.99.0.23", "address: 10.98.0.23", "node-3: InternalIP 10.98.0.23 is not a free"),
    ("nodes.yaml", "address: 10.99.0.23", "address: 10.99.0.11", "10.99.0.11 is not a free address"),
    ("nodes.yaml", "address: 10.99.0.23", "address: 10.99.0.22", "also node node-2's"),
    ("configmap.yaml", "name: kube2ipvs}", "name: other}", "no ConfigMap platform-load-balancer/kube2ipvs"),
    ("configmap.yaml", '"192.0.2.10": {\n', '"192.0.2.300": {\n', "ConfigMap platform-load-balancer/kube2ipvs"),
    ("services.yaml", "kind: List", "kind: List\n  bad: [", "services.yaml"),
])
def test_files_it_cannot_build_from_are_refused_naming_what(cluster: Path, file: str, old: str, new: str,
                                                            message: str) -> None:
    path = cluster / file
    assert old in path.read_text()
    path.write_text(path.read_text().replace(old, new, 1))
    with pytest.raises(LabError, match=message.replace(".", r"\.").replace("[", r"\[")):
        read_cluster(cluster)


def test_the_router_peers_with_every_director_and_spreads_over_them() -> None:
    text = frr_config()
    for address in DIRECTORS.values():
        assert f" neighbor {address} remote-as 64512" in text
        assert f"  neighbor {address} activate" in text
    assert "  maximum-paths 8" in text
    assert " no bgp ebgp-requires-policy" in text


def test_pod_interface_names_fit_the_kernels_limit() -> None:
    assert veth_name("p", "10.244.255.255") == "p0af4ffff"
    assert len(veth_name("p", "255.255.255.255")) <= 15


def test_lab_commands_refuse_bad_names_and_urls_without_a_traceback() -> None:
    out, err = io.StringIO(), io.StringIO()
    assert main(["lab", "status", "--name", "Bad-Name"], out=out, err=err) == 2
    assert "1-8 lower-case letters or digits" in err.getvalue()
    err = io.StringIO()
    assert main(["lab", "probe", "ftp://192.0.2.10:70", "--name", "nolab"], out=out, err=err) == 2
    assert "give http://VIP:PORT/ or udp://VIP:PORT" in err.getvalue()
