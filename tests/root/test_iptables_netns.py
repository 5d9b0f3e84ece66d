"""render_iptables against the real kernel (iptables-nft), in throw-away network namespaces."""

from __future__ import annotations

import re
import shutil
from collections import Counter
from functools import partial

import pytest

from kube2ipvs.model import ClusterState, VirtualService
from kube2ipvs.render.iptables import render_iptables
from kube2ipvs.render.nft import counter_names
from tests.root.conftest import VIP, VIP6, Dataplane, Lab, Netns, wait_for, web

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(any(shutil.which(t) is None for t in ("iptables-restore", "ip6tables-restore")),
                       reason="needs iptables-restore and ip6tables-restore on PATH"),
]

SPLIT = "# kube2ipvs IPv6 rules: ip6tables-restore input\n"


def by_family(text: str) -> dict[str, str]:
    """The restore input of each family: `iptables` -> IPv4 document, `ip6tables` -> IPv6."""
    v4, v6 = text.split(SPLIT)
    return {"iptables": v4, "ip6tables": SPLIT + v6}


def tables_of(save: str) -> dict[str, list[str]]:
    """Table -> its lines, dropping comments: iptables-save prints tables in an order of its own."""
    out: dict[str, list[str]] = {}
    for line in save.splitlines():
        if line.startswith("*"):
            table = out.setdefault(line[1:], [])
        elif not line.startswith("#"):
            table.append(line)
    return out


def restore(ns: Netns, text: str) -> None:
    for tool, document in by_family(text).items():
        ns.exec(f"{tool}-restore", stdin=document)


def rule_packets(ns: Netns, vs: VirtualService) -> dict[str, int]:
    """Counter kind -> packets of the counting rule commented with that counter's name."""
    tool = "ip6tables-save" if vs.family == 6 else "iptables-save"
    found: dict[str, int] = {}
    for table in ("raw", "mangle"):
        for m in re.finditer(r"^\[(\d+):\d+\] -A .* --comment \"?([^ \"\n]+)", ns.exec(tool, "-c", "-t", table), re.M):
            found[m[2]] = int(m[1])
    return {kind: found[name] for kind, name in counter_names(vs).items()}


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("node", "exempt"), [("node-a", None), ("node-b", None), ("node-b", ["10.1.0.0/16"])])
def test_the_realistic_rendering_passes_restore_test(
    lab: Lab, state: ClusterState, node: str, exempt: list[str] | None
) -> None:
    ns = lab.netns("ipt-check")
    for tool, document in by_family(render_iptables(state.for_node(node), masquerade_exempt=exempt)).items():
        ns.exec(f"{tool}-restore", "--test", stdin=document)


def test_the_kernel_dumps_back_exactly_the_rendered_rules(lab: Lab, state: ClusterState) -> None:
    ns = lab.netns("ipt-save")
    text = render_iptables(state.for_node("node-b"), masquerade_exempt=["10.1.0.0/16", "fd00::/8"])
    restore(ns, text)
    for tool, document in by_family(text).items():
        assert tables_of(ns.exec(f"{tool}-save")) == tables_of(document)


def test_connections_are_shared_evenly_and_counted_by_rule_counters(dataplane: Dataplane) -> None:
    vs, vs6 = web(), web(vip=VIP6)
    dataplane.node.exec("nft", "flush", "ruleset")  # nothing left over from another test's rules
    restore(dataplane.node, render_iptables([vs, vs6]))
    try:
        answers = dataplane.curl(f"http://{VIP}:{vs.port}/", 40) + dataplane.curl(f"http://[{VIP6}]:{vs.port}/", 40)
        # `statistic random` is a coin toss per connection: both pods, not an exact split.
        assert set(Counter(a.split()[0] for a in answers[:40])) == {"pod1", "pod2"}
        assert set(Counter(a.split()[0] for a in answers[40:])) == {"pod1", "pod2"}
        for service in (vs, vs6):
            counts = wait_for(partial(rule_packets, dataplane.node, service), lambda c: c["fin_out"] >= 40)
            assert (counts["syn_in"], counts["synack_out"], counts["fin_in"], counts["fin_out"]) == (40, 40, 40, 40)
            assert counts["rst_in"] == counts["rst_out"] == 0
            assert counts["pkts_in"] >= 40 * 4
            assert counts["pkts_out"] >= 40 * 3
    finally:
        dataplane.node.exec("nft", "flush", "ruleset")
