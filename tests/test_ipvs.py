"""The desired IPVS model: schedulers per mode, flags, weights and threshold shares."""

from __future__ import annotations

import pytest

from kube2ipvs.ipvs import desired_ipvs, flag_names, split_threshold
from kube2ipvs.normalize import normalize
from kube2ipvs.render.ipvsadm import render_ipvsadm
from tests.builders import config, endpointslice, node, service, web_entry

WEB = service("shop", "web", ("http", 80, "TCP"))
NODES = [node("a", "198.51.100.1"), node("b", "198.51.100.2")]
SLICES = [endpointslice("shop", "web", "w", [("http", 8080, "TCP")], [
    ("10.0.0.1", "a", True), ("10.0.0.2", "a", True), ("10.0.0.3", "a", True), ("10.0.1.1", "b", True)])]


def rules(mode: str = "arp", **ipvs: object) -> str:
    cfg = config({"192.0.2.1": {"80": web_entry(ipvsOptions=ipvs)}})
    return render_ipvsadm(normalize(NODES, [WEB], SLICES, cfg), mode="bgp" if mode == "bgp" else "arp")


def test_an_entry_without_scheduler_gets_wrr_in_arp_mode() -> None:
    assert rules("arp") == (
        "-A -t 192.0.2.1:80 -s wrr\n"
        "-a -t 192.0.2.1:80 -r 198.51.100.1:80 -g -w 3\n"
        "-a -t 192.0.2.1:80 -r 198.51.100.2:80 -g -w 1\n"
    )


def test_an_entry_without_scheduler_gets_maglev_with_fallback_and_port_in_bgp_mode() -> None:
    assert rules("bgp").splitlines()[0] == "-A -t 192.0.2.1:80 -s mh -b mh-fallback,mh-port"


def test_an_explicit_scheduler_is_honoured_in_bgp_mode() -> None:
    assert rules("bgp", scheduler="wrr").splitlines()[0] == "-A -t 192.0.2.1:80 -s wrr"


def test_tunnel_forwarding_and_generic_flags_are_rendered() -> None:
    text = rules(scheduler="sh", forwardingMethod="i", flags="flag-1,sh-port")
    assert text.splitlines()[0] == "-A -t 192.0.2.1:80 -s sh -b sh-fallback,sh-port"
    assert text.splitlines()[1] == "-a -t 192.0.2.1:80 -r 198.51.100.1:80 -i -w 3 --tun-type ipip"


def test_thresholds_are_split_in_proportion_to_weight() -> None:
    lines = rules(uThreshold=1000, lThreshold=100).splitlines()
    assert lines[1].endswith("-w 3 -x 750 -y 75")
    assert lines[2].endswith("-w 1 -x 250 -y 25")


@pytest.mark.parametrize(("total", "weight", "all_weight", "share"), [
    (0, 1, 1, 0),             # 0 means unlimited and stays so
    (1, 1, 100, 1),           # a positive limit never becomes 0 (= unlimited) by rounding
    (10, 1, 3, 4),            # rounded up
    (10**9, 1, 1, 65535),     # capped like ipvsadm
])
def test_threshold_shares_round_up_and_are_capped(total: int, weight: int, all_weight: int, share: int) -> None:
    assert split_threshold(total, weight, all_weight) == share


def test_flag_names_follow_the_scheduler() -> None:
    assert flag_names("mh", (1, 2)) == ("mh-fallback", "mh-port")
    assert flag_names("sh", (2,)) == ("sh-port",)
    assert flag_names("wrr", (1, 3)) == ("flag-1", "flag-3")


def test_services_without_real_servers_are_not_programmed() -> None:
    cfg = config({"192.0.2.1": {"80": web_entry(), "81": web_entry(service="nobody")}})
    state = normalize(NODES, [WEB], [], cfg)
    assert desired_ipvs(state, "arp") == ()
    assert render_ipvsadm(state) == ""
