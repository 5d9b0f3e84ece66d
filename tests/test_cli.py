"""The `kube2ipvs` command: rules, validate-config, help, and clear errors without tracebacks."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kube2ipvs.cli import main
from tests.conftest import GOLDEN, REALISTIC

FILES = [
    "--configmap", str(REALISTIC / "configmap.json"),
    "--nodes", str(REALISTIC / "nodes.json"),
    "--services", str(REALISTIC / "services.json"),
    "--endpointslices", str(REALISTIC / "endpointslices.json"),
    "--default-service", "rdei-system/unicorns:http",
]


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def run_process(*argv: str, stdin: bytes = b"") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kube2ipvs.cli", *argv], input=stdin.decode(),
                          capture_output=True, text=True, timeout=60, check=False)


def test_rules_prints_the_ipvsadm_rules_of_the_golden_file() -> None:
    code, out, err = run("rules", *FILES)
    assert code == 0
    assert out == (GOLDEN / "realistic.ipvsadm").read_text()
    assert "note: 192.0.2.11:9000/tcp: service shop/headless is headless" in err


def test_rules_in_bgp_mode_and_each_other_format_match_their_golden_files() -> None:
    assert run("rules", *FILES, "--mode", "bgp", "-q")[1] == (GOLDEN / "realistic-bgp.ipvsadm").read_text()
    bgp = run("rules", *FILES, "--format", "bgp", "--nexthop", "198.51.100.2", "--nexthop6", "2001:db8:100::2",
              "--communities", "64512:100")[1]
    assert bgp == (GOLDEN / "realistic.bgp").read_text()
    assert run("rules", *FILES, "--format", "json")[1] == (GOLDEN / "realistic.json").read_text()
    assert run("rules", *FILES, "--format", "json", "--node", "node-b")[1] == \
        (GOLDEN / "realistic-node-b.json").read_text()
    assert run("rules", *FILES, "--format", "arp", "--interface", "eth0")[1] == \
        (GOLDEN / "realistic.arp").read_text()


@pytest.mark.parametrize("fmt", ["nft", "iptables"])
def test_realserver_formats_render_the_chosen_node(fmt: str) -> None:
    code, out, _ = run("rules", *FILES, "--format", fmt, "--node", "node-a")
    assert code == 0
    assert out == (GOLDEN / f"realistic-node-a.{fmt}").read_text()


@pytest.mark.parametrize("fmt", ["nft", "iptables"])
def test_realserver_formats_without_a_node_name_the_nodes_to_choose_from(fmt: str) -> None:
    code, out, err = run("rules", *FILES, "--format", fmt)
    assert code == 2
    assert out == ""
    assert "--node" in err
    assert "node-a, node-b, node-c, node-d, node-e" in err


def test_an_unknown_node_is_a_clear_error() -> None:
    code, _, err = run("rules", *FILES, "--format", "nft", "--node", "node-z")
    assert code == 2
    assert err.strip() == "error: --node node-z: no such node (nodes: node-a, node-b, node-c, node-d, node-e)"


def test_the_configmap_key_is_required_only_when_there_are_several(tmp_path: Path) -> None:
    cm = json.loads((REALISTIC / "configmap.json").read_text())
    cm["data"]["blue"] = cm["data"]["green"]
    path = tmp_path / "cm.json"
    path.write_text(json.dumps(cm))
    argv = ["rules", "--configmap", str(path), *FILES[2:8]]
    code, _, err = run(*argv)
    assert code == 1
    assert "several keys (blue, green); choose one" in err
    assert run(*argv, "--config-key", "blue")[0] == 0


@pytest.mark.parametrize(("argv", "message"), [
    (["rules", "--format", "ipvsadm"], "--configmap, --nodes, --services, --endpointslices required"),
    (["rules", *FILES, "--format", "yaml"], "invalid choice: 'yaml'"),
    (["rules", *FILES, "--nexthop", "not-an-ip"], "'not-an-ip' is not an IP address"),
    (["rules", *FILES, "--communities", "64512:70000"], "each part must be at most 65535"),
    (["rules", *FILES, "--default-port", "0"], "'0' is not a port 1-65535"),
    (["rules", *FILES[:-1], "x; rm -rf /"], "is not NAMESPACE/SERVICE:PORTNAME"),
    (["rules", *FILES, "--masquerade-exempt", "10.0.0.0/8"], "--masquerade-exempt needs --masquerade"),
    (["rules", "--configmap", "/nonexistent/cm.json", *FILES[2:8]], "cannot read configmap /nonexistent/cm.json"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
])
def test_usage_errors_are_one_clear_line_and_exit_2(argv: list[str], message: str) -> None:
    code, out, err = run(*argv)
    assert code == 2
    assert out == ""
    assert message in err
    assert "Traceback" not in err


def test_a_bad_nodes_file_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "nodes.json"
    bad.write_text("{ not json: [")
    code, _, err = run("rules", "--configmap", FILES[1], "--nodes", str(bad), *FILES[4:8])
    assert code == 2
    assert str(bad) in err


def test_validate_config_accepts_a_configmap_and_reports_what_it_holds() -> None:
    code, out, _ = run("validate-config", str(REALISTIC / "configmap.json"))
    assert code == 0
    assert out.strip().endswith("(key green): valid: 4 VIPs, 8 VIP:ports, 9 enabled VIP:port/protocols")


def test_validate_config_lists_every_error_with_its_path_and_exits_1(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"config": {
        "192.0.2.1": {"80": {"namespace": "shop", "service": "web; flush ruleset", "portName": "http",
                             "ipvsOptions": {"scheduler": "fastest"}}},
        "2001:db8::1": {"99999": {}},
    }}))
    proc = run_process("validate-config", str(path))
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert 'config."192.0.2.1"."80".service: "web; flush ruleset" is not a valid Kubernetes service name' \
        in proc.stderr
    assert 'config."192.0.2.1"."80".ipvsOptions.scheduler: "fastest" is not one of rr, wrr, lc, wlc, lblc, ' \
        'lblcr, dh, sh, sed, nq, fo, ovf, mh' in proc.stderr
    assert 'config."2001:db8::1": "2001:db8::1" is not an IPv4 address' in proc.stderr
    assert "(3 errors)" in proc.stderr


def test_validate_config_reads_standard_input() -> None:
    proc = run_process("validate-config", "-", stdin=b'{"vipPool": ["192.0.2.1"]}')
    assert proc.returncode == 0, proc.stderr
    assert "valid: 1 VIPs, 0 VIP:ports" in proc.stdout


@pytest.mark.parametrize("command", [[], ["rules"], ["validate-config"]])
def test_every_command_has_help(command: list[str]) -> None:
    proc = run_process(*command, "--help")
    assert proc.returncode == 0
    assert "usage: kube2ipvs" in proc.stdout


def test_a_role_that_is_not_installed_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    """A build without the bgp-speaker package (each service installs on its own): no entry point."""
    from importlib.metadata import entry_points

    monkeypatch.setattr("kube2ipvs.cli.entry_points",
                        lambda group: [ep for ep in entry_points(group=group) if ep.name != "bgp-speaker"])
    code, _, err = run("bgp-speaker", "--help")
    assert code == 2
    assert "the bgp-speaker role is not installed" in err


def test_an_installed_role_is_found_through_its_entry_point() -> None:
    proc = run_process("watcher", "--help")
    assert proc.returncode == 0
    assert "usage: kube2ipvs watcher" in proc.stdout
    assert "[env KUBE2IPVS_MIN_INTERVAL]" in proc.stdout


def test_a_role_rejects_a_bad_environment_setting_in_one_line() -> None:
    proc = subprocess.run([sys.executable, "-m", "kube2ipvs.cli", "watcher"], capture_output=True, text=True,
                          timeout=60, check=False, env={**os.environ, "KUBE2IPVS_MAX_REMOVAL_SHARE": "2"})
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: KUBE2IPVS_MAX_REMOVAL_SHARE='2': '2' is not a share between 0 and 1"


@pytest.mark.parametrize(("selector", "message"), [
    ("tier!=lb", "'tier!=lb': write key=value (only equality is supported)"),
    ("a=b,a=c", "'a' given twice with different values"),
    ("a b=c", '"a b" is not a valid Kubernetes label key'),
    ("tier=no spaces", '"no spaces" is not a valid Kubernetes label value'),
])
def test_a_bad_configmap_selector_is_one_clear_line(selector: str, message: str) -> None:
    proc = run_process("watcher", "--configmap-selector", selector)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: kube2ipvs watcher: argument --configmap-selector: {message}"
