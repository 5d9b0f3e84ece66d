"""render_nft_delta against the real kernel: `render_nft(old)` then the delta, in one throw-away
network namespace, lists exactly as `render_nft(new)` loaded directly; and counters of services
the delta does not remove survive it (same object, same values)."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kube2ipvs.lbconfig import Protocol
from kube2ipvs.model import VirtualService
from kube2ipvs.names import COUNTER_KINDS
from kube2ipvs.render.nft import render_nft
from kube2ipvs.render.nftdelta import render_nft_delta
from tests.root.conftest import Lab, Netns, skip_reason, wait_for
from tests.root.test_nft_netns import set_counters
from tests.test_render_nft import virtual_service

pytestmark = pytest.mark.root

Listing = dict[str, Any]


def listing(ns: Netns, family: str) -> Listing:
    """What `nft -j list table <family> kube2ipvs` holds, without handles and counter values:
    chains with their hooks and rules in order, maps and sets with their elements (as a set,
    the kernel's order of elements is its own), and counter names."""
    out = json.loads(ns.exec("nft", "-j", "list", "table", family, "kube2ipvs"))
    chains: dict[str, dict[str, Any]] = {}
    rules: dict[str, list[Any]] = {}
    sets: dict[str, dict[str, Any]] = {}
    counters: list[str] = []
    for item in out["nftables"]:
        ((kind, body),) = item.items()
        if kind == "chain":
            chains[body["name"]] = {k: v for k, v in body.items() if k != "handle"}
        elif kind == "rule":
            rules.setdefault(body["chain"], []).append(body["expr"])
        elif kind in ("map", "set"):
            rest = {k: v for k, v in body.items() if k not in ("handle", "elem")}
            sets[body["name"]] = {**rest, "elem": sorted(json.dumps(e, sort_keys=True) for e in body.get("elem", []))}
        elif kind == "counter":
            counters.append(body["name"])
    return {"chains": chains, "rules": rules, "sets": sets, "counters": sorted(counters)}


def delta_matches_full_render(
    ns: Netns, old: list[VirtualService], new: list[VirtualService], exempt: list[str] | None
) -> None:
    ns.nft(render_nft(old, masquerade_exempt=exempt))
    delta = render_nft_delta(old, new, masquerade_exempt=exempt)
    if delta:
        ns.nft(delta)
    via_delta = {f: listing(ns, f) for f in ("ip", "ip6")}
    ns.nft(render_nft(new, masquerade_exempt=exempt))
    direct = {f: listing(ns, f) for f in ("ip", "ip6")}
    assert via_delta == direct, delta


def counter_objects(ns: Netns, family: str) -> dict[str, tuple[int, int]]:
    """Counter name -> (handle, packets): the handle tells whether the object was recreated."""
    out = json.loads(ns.exec("nft", "-j", "list", "counters", "table", family, "kube2ipvs"))
    return {c["name"]: (c["handle"], c["packets"]) for item in out["nftables"] if (c := item.get("counter"))}


# ---------------------------------------------------------------------------------------------

A = virtual_service("192.0.2.1", 80, endpoints=[("10.0.0.1", 8080), ("10.0.0.2", 8080)])
A1 = virtual_service("192.0.2.1", 80, endpoints=[("10.0.0.2", 8080)])
A3 = virtual_service("192.0.2.1", 80, endpoints=[("10.0.0.1", 8080), ("10.0.0.2", 8080), ("10.0.0.3", 8080)])
DNS = virtual_service("192.0.2.1", 53, "udp", endpoints=[("10.0.0.1", 53)])
B = virtual_service("192.0.2.2", 443, endpoints=[("10.0.0.3", 8443)])
A6 = virtual_service("2001:db8::1", 80, endpoints=[("2001:db8:1::1", 8080)])
B6 = virtual_service("2001:db8::2", 80, endpoints=[("2001:db8:1::1", 8080), ("2001:db8:1::2", 8080)])

CASES = {
    "one endpoint fewer": ([A, DNS, A6], [A1, DNS, A6]),
    "one endpoint more": ([A1, DNS], [A3, DNS]),
    "a service added": ([A, A6], [A, B, A6]),
    "a service removed": ([A, B, DNS, A6], [A, DNS, A6]),
    "a port added to a VIP in use": ([A], [A, DNS]),
    "everything at once, both families": ([A, DNS, A6], [A3, B, B6]),
    "an IPv6 table appears": ([A], [A, A6, B6]),
    "the IPv4 table empties": ([A, B, A6], [A6]),
    "from nothing": ([], [A, DNS, A6]),
    "to nothing": ([A, DNS, A6], []),
}


@pytest.mark.parametrize("exempt", [None, ["10.0.0.0/8", "2001:db8:1::/64"]], ids=["plain", "masquerade"])
@pytest.mark.parametrize(("old", "new"), CASES.values(), ids=CASES.keys())
def test_the_delta_after_the_old_table_lists_as_the_new_table_loaded_whole(
    lab: Lab, old: list[VirtualService], new: list[VirtualService], exempt: list[str] | None
) -> None:
    delta_matches_full_render(lab.netns("nd-case"), old, new, exempt)


# Random slices drawn from a small pool, so that old and new share, lose and gain services and
# VIPs, with 0 to 3 endpoints each (0: the service is left out), so the delta sees services
# kept, changed, added and removed, VIPs and families coming and going.
_VIPS = ("192.0.2.1", "192.0.2.2", "2001:db8::1")
_PORTS: tuple[tuple[int, Protocol], ...] = ((80, "tcp"), (53, "udp"))
_PODS = {4: ("10.0.0.1", "10.0.0.2", "10.0.0.3"), 6: ("2001:db8:1::1", "2001:db8:1::2", "2001:db8:1::3")}


@st.composite
def node_slices(draw: st.DrawFn) -> list[VirtualService]:
    out = []
    for vip in _VIPS:
        for port, protocol in _PORTS:
            # Mostly pods of the VIP's family; one of the other family is left out by render_nft,
            # and a service with only such pods has no entry at all.
            pool = _PODS[6 if ":" in vip else 4] + _PODS[4 if ":" in vip else 6][:1]
            pods = draw(st.lists(st.sampled_from(pool), max_size=3, unique=True))
            if pods:
                out.append(virtual_service(vip, port, protocol, endpoints=[(p, 8080) for p in pods]))
    return out


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(old=node_slices(), new=node_slices(), masquerade=st.booleans())
def test_any_delta_after_the_old_table_lists_as_the_new_table_loaded_whole(
    old: list[VirtualService], new: list[VirtualService], masquerade: bool
) -> None:
    if (reason := skip_reason()) is not None:
        pytest.skip(reason)
    lab = Lab()  # one namespace per example: no state carried between examples
    try:
        delta_matches_full_render(lab.netns("nd-prop"), old, new, ["10.0.0.0/8"] if masquerade else None)
    finally:
        lab.close()


SEND_UDP = r"""
import socket, sys
for _ in range(int(sys.argv[3])):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.sendto(b"x", (sys.argv[1], int(sys.argv[2])))
        except OSError:
            pass  # DNAT sends it to a pod address this lone namespace cannot route: counted first
"""


def test_counters_of_services_the_delta_keeps_are_not_reset(lab: Lab) -> None:
    ns = lab.netns("nd-count")
    ns.ip("addr", "add", "192.0.2.1/32", "dev", "lo")
    ns.nft(render_nft([A, DNS, B]))
    # Packets from the namespace to the VIP are counted by the output hook (raw priority, before
    # the DNAT), so pkts_in of the DNS service counts each datagram.
    ns.exec(sys.executable, "-c", SEND_UDP, "192.0.2.1", "53", "3")
    dns = ("192.0.2.1", "udp", 53)
    wait_for(lambda: set_counters(ns, "ip", "pkts_in"), lambda c: c[dns][0] >= 3)
    before = {kind: set_counters(ns, "ip", kind) for kind in COUNTER_KINDS}
    assert before["pkts_in"][dns][0] == 3

    # DNS itself loses an endpoint, A changes, B goes, a new service comes.
    dns_moved = virtual_service("192.0.2.1", 53, "udp", endpoints=[("10.0.0.2", 53)])
    new = [A1, dns_moved, virtual_service("192.0.2.3", 80)]
    ns.nft(render_nft_delta([A, DNS, B], new))

    after = {kind: set_counters(ns, "ip", kind) for kind in COUNTER_KINDS}
    for kind in COUNTER_KINDS:
        kept = [k for k in before[kind] if k != ("192.0.2.2", "tcp", 443)]  # A and DNS
        assert {k: after[kind][k] for k in kept} == {k: before[kind][k] for k in kept}, kind
        assert ("192.0.2.2", "tcp", 443) not in after[kind]  # B went with its elements
        assert ("192.0.2.3", "tcp", 80) in after[kind]  # the new one has all its kinds
    assert after["pkts_in"][dns][0] == 3


def test_a_delta_against_a_table_that_is_not_the_old_one_fails_and_changes_nothing(lab: Lab) -> None:
    ns = lab.netns("nd-drift")
    ns.nft(render_nft([A, B]))  # the caller believes the kernel holds [A]
    before = ns.exec("nft", "list", "ruleset")
    done = subprocess.run(["ip", "netns", "exec", ns.name, "nft", "-f", "-"], input=render_nft_delta([A], [A, B, DNS]),
                          capture_output=True, text=True, timeout=20, check=False)
    assert done.returncode != 0
    assert "File exists" in done.stderr  # B's counters and chain are there already
    assert ns.exec("nft", "list", "ruleset") == before
