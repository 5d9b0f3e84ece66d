"""`kube2ipvs collect` against the lab (`kube2ipvs lab up`, on a copy of lab/cluster/), run as an
operator would, from inside the lab's ctl namespace (the lab's addresses exist only there): a
healthy lab agrees (exit 0); a rule deleted by hand on one director is repaired by its next resync
and noted; a director cut off from NATS misses an update of the files and is reported with the
diff of its rules against the up-to-date one (exit 1). The lab is taken down at the end."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from kube2ipvs.cli import main
from kube2ipvs.lab import PORTS, prefix
from kube2ipvs.labplan import CTL, DIRECTORS, NATS_PORT
from tests.root.labfixture import running_lab

pytestmark = pytest.mark.root

REPO = Path(__file__).resolve().parents[2]
NAME = f"c{os.getpid() % 1_000_000}"
NODES = ("10.99.0.21", "10.99.0.22", "10.99.0.23")  # lab/cluster/nodes.yaml
TARGETS = ",".join([
    *(f"{a}:{PORTS['director']}" for a in DIRECTORS.values()),
    *(f"{a}:{PORTS['bgp-speaker']}" for a in DIRECTORS.values()),
    *(f"{a}:{PORTS['realserver']}" for a in NODES),
    f"{CTL}:{PORTS['watcher']}",
])
DIR1, DIR2 = (f"{a}:{PORTS['director']}" for a in (DIRECTORS["dir1"], DIRECTORS["dir2"]))
DNS_0 = ("      - {addresses: [10.244.1.12], nodeName: node-1, conditions: {ready: true}, "
         "targetRef: {kind: Pod, name: dns-0}}\n")
DNS_2 = DNS_0.replace("10.244.1.12", "10.244.2.12").replace("node-1", "node-2").replace("dns-0", "dns-2")
T = TypeVar("T")


def lab_cli(*args: str) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(["lab", *args, "--name", NAME], out=out, err=err)
    return code, out.getvalue() + err.getvalue()


def ns(host: str) -> str:
    return prefix(NAME) + host


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with running_lab(NAME, tmp_path_factory.mktemp("lab")) as running:
        yield running.cluster


def collect() -> tuple[int, dict[str, Any]]:
    """`kube2ipvs collect --format json` from the ctl namespace, as a separate process."""
    done = subprocess.run(["ip", "netns", "exec", ns("ctl"), sys.executable, "-m", "kube2ipvs.cli", "collect",
                           "--targets", TARGETS, "--timeout", "3", "--format", "json"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode in (0, 1), done.stderr
    doc: dict[str, Any] = json.loads(done.stdout)
    return done.returncode, doc


def until(read: Callable[[], T], done: Callable[[T], bool], seconds: float) -> T:
    deadline = time.monotonic() + seconds
    value = read()
    while not done(value):
        if time.monotonic() > deadline:
            pytest.fail(f"not within {seconds} s; last: {json.dumps(value, indent=2)}")
        time.sleep(0.5)
        value = read()
    return value


def test_a_healthy_lab_agrees(lab: Path) -> None:
    # The bgp-speakers may still be reading their director's readiness right after `up`.
    _, doc = until(collect, lambda r: r[0] == 0, 30)
    assert doc["ok"] is True
    assert len(doc["instances"]) == 8
    assert doc["directors"]["reference"] == "the majority (2 of 2 directors)"
    directors = [i for i in doc["instances"] if i["role"] == "director"]
    assert [d["node"] for d in directors] == ["dir1", "dir2"]
    assert all(d["counts"] == directors[0]["counts"] and d["counts"]["services"] == 4 for d in directors)


def test_a_rule_deleted_by_hand_is_reported_with_the_diff_then_repaired_and_noted(lab: Path) -> None:
    # A director answers ?format=ipvsadm from the kernel, so the change shows until its resync
    # (every 10 s) repairs it; should the resync come first, delete it again.
    for _ in range(3):
        subprocess.run(["ip", "netns", "exec", ns("dir1"), "nft", "delete", "element", "netdev", "kube2ipvs_dsr",
                        "dests4", "{ 192.0.2.10 . tcp . 80 . 10.99.0.21 }"], check=True, capture_output=True)
        code, doc = collect()
        if doc["directors"]["differ"]:
            break
    assert code == 1
    [differ] = doc["directors"]["differ"]
    assert differ["address"] == DIR1
    removed = [line for line in differ["diff"].splitlines() if line.startswith("-") and not line.startswith("---")]
    assert removed == ["--a -t 192.0.2.10:80 -r 10.99.0.21:80 -g -w 1"]
    print(f"collect reported {DIR1}:\n{differ['diff']}")
    # The resync puts it back and counts it; collect then agrees again and notes the repair.
    code, doc = until(collect, lambda r: r[0] == 0 and any(n.startswith(f"{DIR1} (director): repaired ")
                                                           for n in r[1]["notes"]), 30)
    assert doc["directors"]["differ"] == []


def test_a_director_cut_off_from_nats_misses_an_update_and_is_reported_with_the_diff(lab: Path) -> None:
    # dir1 keeps what it has (the director holds its last state while NATS is away) ...
    subprocess.run(["ip", "netns", "exec", ns("dir1"), "nft", "-f", "-"], check=True, capture_output=True, text=True,
                   input=f"""table inet k2icollecttest {{
  chain in {{ type filter hook input priority 0; ip saddr {CTL} tcp sport {NATS_PORT} drop; }}
  chain out {{ type filter hook output priority 0; ip daddr {CTL} tcp dport {NATS_PORT} drop; }}
}}
""")
    # ... while the files change: a dns pod on node-2, so 192.0.2.11:53 gains a real server.
    slices = lab / "endpointslices.yaml"
    before = slices.read_text()
    assert DNS_0 in before
    slices.write_text(before.replace(DNS_0, DNS_0 + DNS_2))

    code, doc = until(collect, lambda r: bool(r[1]["directors"]["differ"]), 30)

    assert code == 1
    assert doc["ok"] is False
    [differ] = doc["directors"]["differ"]
    assert differ["address"] == DIR1
    assert differ["reference"].startswith(f"{DIR2}, the newest applied generation")
    removed = [line for line in differ["diff"].splitlines() if line.startswith("-") and not line.startswith("---")]
    added = [line for line in differ["diff"].splitlines() if line.startswith("+") and not line.startswith("+++")]
    assert (removed, added) == (["--a -u 192.0.2.11:53 -r 10.99.0.22:53 -g -w 1"], [])
    assert f"{DIR1} (director): rules differ from {differ['reference']}: 1 missing, 0 extra" in doc["problems"]
    instances = {i["address"]: i for i in doc["instances"]}
    assert instances[DIR1]["rules_differ"] is True
    assert instances[DIR2]["rules_differ"] is False
    assert instances[DIR1]["generation"] < instances[DIR2]["generation"]
    print(f"collect reported {DIR1}:\n{differ['diff']}")
