"""`kube2ipvs doctor`'s checks over injected readings: what each reading makes PASS, WARN, FAIL or
SKIP, and the fix it names; the parsers of what the kernel and the tools print."""

from __future__ import annotations

import argparse
import io
import json
from collections.abc import Mapping, Sequence

import pytest

from kube2ipvs import doctor, doctorio
from kube2ipvs.cli import main
from kube2ipvs.doctor import Http, NftTable, Result, Timeouts, Unread
from kube2ipvs.lbconfig import Family, Protocol
from kube2ipvs.model import Backend, PodEndpoint, VirtualService
from kube2ipvs.render.nft import render_nft
from kube2ipvs_realserver.plan import expected_tables

DESIRED = """\
-A -t 192.0.2.10:70 -s mh -b mh-fallback,mh-port
-a -t 192.0.2.10:70 -r 10.99.0.21:70 -g -w 1
-a -t 192.0.2.10:70 -r 10.99.0.22:70 -g -w 2
-A -u 192.0.2.11:53 -s mh -b mh-fallback,mh-port
-a -u 192.0.2.11:53 -r 10.99.0.21:53 -g -w 1
-A -t [2001:db8::10]:80 -s wrr
-a -t [2001:db8::10]:80 -r [2001:db8:1::21]:80 -i -w 3
"""

# /proc/net/ip_vs as ip_vs_ctl.c prints it: IPv4 in hex, IPv6 in brackets, fwmark services apart.
PROC_IP_VS = (
    "IP Virtual Server version 1.2.1 (size=4096)\n"
    "Prot LocalAddress:Port Scheduler Flags\n"
    "  -> RemoteAddress:Port Forward Weight ActiveConn InActConn\n"
    "TCP  C000020A:0046 mh \n"
    "  -> 0A630015:0046      Route   1      0          0         \n"
    "  -> 0A630016:0046      Route   2      3          1         \n"
    "UDP  C000020B:0035 mh \n"
    "  -> 0A630015:0035      Route   1      0          0         \n"
    "TCP  [2001:0db8:0000:0000:0000:0000:0000:0010]:0050 wrr \n"
    "  -> [2001:0db8:0001:0000:0000:0000:0000:0021]:0050      Tunnel  3      0          0         \n"
    "FWM  00000001 wrr \n"
    "  -> 0A630017:0000      Route   1      0          0         \n"
)


def ok(body: Mapping[str, object], status: int = 200) -> Http:
    return Http(status, json.dumps(body))


def statuses(results: Sequence[Result]) -> list[str]:
    return [r.status for r in results]


# -- the service -------------------------------------------------------------------------------------

def test_a_healthy_service_passes_and_names_its_generation() -> None:
    r = doctor.check_service("director", "http://10.99.0.11:9872/healthz", ok({"ok": True, "generation_applied": 7}))
    assert r.status == "PASS"
    assert "generation 7" in r.detail


def test_an_unhealthy_service_fails_with_its_reason() -> None:
    r = doctor.check_service("realserver", "u", ok({"ok": False, "reason": "sysctls wrong: lo/arp_ignore"}, 503))
    assert r.status == "FAIL"
    assert "sysctls wrong: lo/arp_ignore" in r.detail
    assert "journalctl -u kube2ipvs-realserver" in r.fix


def test_a_service_that_does_not_answer_fails_with_how_to_start_it() -> None:
    r = doctor.check_service("director", "u", Unread("connection refused"))
    assert (r.status, r.detail) == ("FAIL", "u: connection refused")
    assert "systemctl status kube2ipvs-director" in r.fix


def test_something_else_on_the_port_fails() -> None:
    r = doctor.check_service("director", "u", Http(200, "<html>"))
    assert r.status == "FAIL"
    assert "--listen" in r.fix


# -- IPVS rules ------------------------------------------------------------------------------------------

def test_ipvsadm_lines_and_proc_ip_vs_parse_to_the_same_rules() -> None:
    from_lines = doctor.parse_ipvsadm(DESIRED)
    from_proc = doctor.parse_proc_ip_vs(PROC_IP_VS)
    assert from_lines[("tcp", "192.0.2.10", 70)] == ("mh", {("10.99.0.21", 70): ("g", 1), ("10.99.0.22", 70): ("g", 2)})
    assert from_lines[("tcp", "2001:db8::10", 80)] == ("wrr", {("2001:db8:1::21", 80): ("i", 3)})
    assert from_proc == from_lines  # the fwmark service is not one of ours


def test_rules_equal_to_the_desired_ones_pass() -> None:
    r = doctor.check_ipvs_rules(Http(200, DESIRED), doctor.parse_proc_ip_vs(PROC_IP_VS), Http(200, DESIRED))
    assert r.status == "PASS"
    assert r.detail == "3 virtual services, 4 real servers, as desired"


def test_a_real_server_removed_by_hand_fails_with_the_difference() -> None:
    kernel = doctor.parse_proc_ip_vs(PROC_IP_VS)
    kernel[("tcp", "192.0.2.10", 70)][1].pop(("10.99.0.22", 70), None)
    r = doctor.check_ipvs_rules(Http(200, DESIRED), kernel, Http(200, DESIRED))
    assert r.status == "FAIL"
    assert "missing tcp 192.0.2.10:70 -> 10.99.0.22:70" in r.detail
    assert "resync" in r.fix
    assert "ipvsadm" in r.fix


def test_a_changed_weight_and_an_extra_service_of_a_served_vip_fail() -> None:
    kernel = doctor.parse_ipvsadm(DESIRED.replace("-r 10.99.0.22:70 -g -w 2", "-r 10.99.0.22:70 -g -w 5")
                                  + "-A -t 192.0.2.10:8080 -s rr\n")
    r = doctor.check_ipvs_rules(Http(200, DESIRED), kernel, Unread("x"))
    assert r.status == "FAIL"
    assert "tcp 192.0.2.10:70 -> 10.99.0.22:70: g weight 5, want g weight 2" in r.detail
    assert "unexpected tcp 192.0.2.10:8080" in r.detail


def test_draining_real_servers_and_other_peoples_services_are_no_difference() -> None:
    kernel = doctor.parse_ipvsadm(DESIRED + "-a -t 192.0.2.10:70 -r 10.99.0.23:70 -g -w 0\n"
                                  "-A -t 198.51.100.99:80 -s rr\n")
    assert doctor.check_ipvs_rules(Http(200, DESIRED), kernel, Http(200, DESIRED)).status == "PASS"


def test_no_ipvs_in_the_kernel_fails_with_modprobe() -> None:
    r = doctor.check_ipvs_rules(Http(200, DESIRED), Unread("/proc/net/ip_vs: No such file or directory"),
                                Http(200, DESIRED))
    assert r.status == "FAIL"
    assert "modprobe ip_vs" in r.fix


def test_the_directors_own_view_differing_from_the_kernel_warns() -> None:
    seen = DESIRED.replace("-w 2", "-w 1")
    r = doctor.check_ipvs_rules(Http(200, DESIRED), doctor.parse_ipvsadm(DESIRED), Http(200, seen))
    assert r.status == "WARN"


def test_a_director_without_desired_rules_fails() -> None:
    r = doctor.check_ipvs_rules(Http(503, "not reconciled yet\n"), {}, Unread("x"))
    assert r.status == "FAIL"
    assert "not reconciled yet" in r.detail


# -- the nftables dataplane -------------------------------------------------------------------------

NFT_KERNEL = {("tcp", "192.0.2.10", 70): {"10.99.0.21": 1, "10.99.0.22": 2},
              ("udp", "192.0.2.11", 53): {"10.99.0.21": 1}, ("tcp", "2001:db8::10", 80): {"2001:db8:1::21": 3}}


def test_the_nft_dataplane_holding_the_desired_nodes_passes() -> None:
    r = doctor.check_nft_dataplane("netdev kube2ipvs_dsr", Http(200, DESIRED), NFT_KERNEL)
    assert r.status == "PASS"


def test_a_missing_nft_dataplane_table_fails() -> None:
    r = doctor.check_nft_dataplane("netdev kube2ipvs_dsr", Http(200, DESIRED), Unread("the table is missing"))
    assert r.status == "FAIL"
    assert "netdev kube2ipvs_dsr: the table is missing" in r.detail
    assert "nft list table netdev kube2ipvs_dsr" in r.fix


def test_a_node_missing_from_the_nft_dataplane_fails() -> None:
    kernel = {**NFT_KERNEL, ("tcp", "192.0.2.10", 70): {"10.99.0.21": 1, "10.99.0.22": 0}}
    r = doctor.check_nft_dataplane("netdev kube2ipvs_dsr", Http(200, DESIRED), kernel)
    assert r.status == "FAIL"
    assert "tcp 192.0.2.10:70: nodes 10.99.0.21*1, want 10.99.0.21*1,10.99.0.22*2" in r.detail


# -- timeouts and connection states -----------------------------------------------------------------

def test_ipvsadm_timeouts_parse() -> None:
    assert doctor.parse_ipvsadm_timeouts("Timeout (tcp tcpfin udp): 900 120 300\n") == Timeouts(900, 120, 300)
    assert doctor.parse_ipvsadm_timeouts("nothing") is None


def test_timeouts_as_the_director_wants_pass() -> None:
    assert doctor.check_ipvs_timeouts("ipvs", Timeouts(900, 30, 300), 30, {}).status == "PASS"


def test_a_long_tcpfin_warns_and_names_ipvsadm_set() -> None:
    r = doctor.check_ipvs_timeouts("ipvs", Timeouts(900, 120, 300), None, {})
    assert r.status == "WARN"
    assert "ipvsadm --set" in r.fix


def test_a_tcpfin_other_than_the_directors_fails() -> None:
    assert doctor.check_ipvs_timeouts("ipvs", Timeouts(900, 120, 300), 30, {}).status == "FAIL"
    r = doctor.check_ipvs_timeouts("ipvs", Unread("x"), 30, {"timeout tcpfin": "want 30, have 120"})
    assert r.status == "FAIL"
    assert "timeout tcpfin want 30, have 120" in r.detail


def test_unreadable_timeouts_warn_and_the_nft_dataplane_skips_them() -> None:
    assert doctor.check_ipvs_timeouts("ipvs", Unread("ipvsadm is not installed"), 30, {}).status == "WARN"
    assert doctor.check_ipvs_timeouts("nftables", Unread("x"), None, {}).status == "SKIP"


def test_connection_states_are_counted_from_ip_vs_conn() -> None:
    text = ("Pro FromIP   FPrt ToIP     TPrt DestIP   DPrt State       Expires PEName PEData\n"
            "TCP C000020A C01E C000020A 0050 7F000001 A573 FIN_WAIT        117\n"
            "TCP C000020A C01F C000020A 0050 7F000001 A573 ESTABLISHED     899\n"
            "TCP C000020A C020 C000020A 0050 7F000001 A573 FIN_WAIT        12\n")
    assert doctor.count_conn_states(text) == {"FIN_WAIT": 2, "ESTABLISHED": 1}


def test_a_fin_wait_pile_up_warns_and_a_few_entries_do_not() -> None:
    r = doctor.check_conn_states("ipvs", {"FIN_WAIT": 900, "ESTABLISHED": 100})
    assert r.status == "WARN"
    assert "900 of 1000 entries in FIN_WAIT (90%)" in r.detail
    assert "tcpfin" in r.fix
    assert doctor.check_conn_states("ipvs", {"FIN_WAIT": 9, "ESTABLISHED": 1}).status == "PASS"
    assert doctor.check_conn_states("ipvs", {"FIN_WAIT": 400, "ESTABLISHED": 600}).status == "PASS"
    assert doctor.check_conn_states("ipvs", {"FIN_WAIT": 400, "ESTABLISHED": 600}, share=0.3).status == "WARN"


def test_connection_states_skip_on_the_nft_dataplane_and_warn_when_unread() -> None:
    assert doctor.check_conn_states("nftables", Unread("x")).status == "SKIP"
    assert doctor.check_conn_states("ipvs", Unread("no such file")).status == "WARN"


# -- ARP ----------------------------------------------------------------------------------------------

GOOD_ARP = {("all", "arp_ignore"): 0, ("all", "arp_announce"): 0, ("lo", "arp_ignore"): 1,
            ("lo", "arp_announce"): 2, ("eth0", "arp_ignore"): 1, ("eth0", "arp_announce"): 2}


def test_a_realserver_with_arp_ignore_1_and_arp_announce_2_passes() -> None:
    assert doctor.check_arp("realserver", ["lo", "eth0"], GOOD_ARP).status == "PASS"


def test_arp_ignore_0_on_lo_of_a_realserver_fails_with_the_sysctl_to_set() -> None:
    r = doctor.check_arp("realserver", ["lo", "eth0"], {**GOOD_ARP, ("lo", "arp_ignore"): 0})
    assert r.status == "FAIL"
    assert "lo/arp_ignore=0" in r.detail
    assert r.fix.startswith("sysctl -w net.ipv4.conf.lo.arp_ignore=1")


def test_the_all_value_counts_when_it_is_the_larger() -> None:
    values = {**GOOD_ARP, ("all", "arp_ignore"): 1, ("all", "arp_announce"): 2, ("eth0", "arp_ignore"): 0,
              ("eth0", "arp_announce"): 0}
    assert doctor.check_arp("realserver", ["lo", "eth0"], values).status == "PASS"


def test_a_missing_interface_fails() -> None:
    r = doctor.check_arp("realserver", ["lo", "po0"], GOOD_ARP)
    assert r.status == "FAIL"
    assert "po0/arp_ignore" in r.detail


def test_a_director_reports_its_arp_values_without_failing() -> None:
    values = dict.fromkeys(GOOD_ARP, 0)
    bgp = doctor.check_arp("director", ["lo", "eth0"], values, mode="bgp")
    arp = doctor.check_arp("director", ["lo", "eth0"], values, mode="arp")
    assert (bgp.status, arp.status) == ("PASS", "PASS")
    assert "lo/arp_ignore=0" in bgp.detail
    assert "BGP mode" in bgp.detail


# -- VIPs -----------------------------------------------------------------------------------------------

def test_vips_on_the_device_pass_and_a_missing_one_fails() -> None:
    assert doctor.check_vips("realserver", "lo", ["192.0.2.10"], {"127.0.0.1", "192.0.2.10"}).status == "PASS"
    r = doctor.check_vips("director", "kube2ipvs0", ["192.0.2.10", "192.0.2.11"], {"192.0.2.10"})
    assert r.status == "FAIL"
    assert r.detail == "missing on kube2ipvs0: 192.0.2.11"
    assert "ip addr show dev kube2ipvs0" in r.fix


def test_unreadable_addresses_fail_and_no_vips_warn() -> None:
    assert doctor.check_vips("director", "kube2ipvs0", ["192.0.2.10"], Unread("no device")).status == "FAIL"
    assert doctor.check_vips("realserver", "lo", [], {"127.0.0.1"}).status == "WARN"


# -- BGP --------------------------------------------------------------------------------------------------

# What `gobgp -j neighbor` and `gobgp -j neighbor PEER adj-out` print (gobgp 3.x, trimmed).
NEIGHBORS = json.dumps([{"conf": {"local_asn": 64512, "neighbor_address": "10.99.0.1", "peer_asn": 64500},
                         "state": {"neighbor_address": "10.99.0.1", "peer_asn": 64500, "session_state": 6}}])
ADJ_OUT = json.dumps({"192.0.2.10/32": [{"nlri": {"prefix": "192.0.2.10/32"}}],
                      "192.0.2.11/32": [{"nlri": {"prefix": "192.0.2.11/32"}}]})
SPEAKER_OK = ok({"ok": True, "peers_established": 1})
VIPS = ["192.0.2.10", "192.0.2.11"]


def test_gobgp_output_parses() -> None:
    assert doctor.parse_gobgp_neighbors(NEIGHBORS) == {"10.99.0.1": True}
    assert doctor.parse_gobgp_neighbors(NEIGHBORS.replace('"session_state": 6', '"session_state": 3')) == \
        {"10.99.0.1": False}
    assert doctor.parse_gobgp_adj_out(ADJ_OUT) == {"192.0.2.10/32", "192.0.2.11/32"}
    assert doctor.parse_gobgp_adj_out("null") == set()
    assert doctor.parse_gobgp_neighbors("rpc error") is None


def test_established_peers_holding_every_vip_pass() -> None:
    r = doctor.check_bgp(VIPS, SPEAKER_OK, {"10.99.0.1": True}, {"10.99.0.1": doctor.parse_gobgp_adj_out(ADJ_OUT)
                                                                   or set()})
    assert r.status == "PASS"
    assert r.detail == "1 peer(s) ESTABLISHED (10.99.0.1); adj-out holds all 2 VIPs"


def test_gobgpd_not_answering_fails_with_restart_gobgpd() -> None:
    speaker = ok({"ok": False, "reason": "gobgpd unreachable: WatchEvent"}, 503)
    r = doctor.check_bgp(VIPS, speaker, Unread("gobgpd API 127.0.0.1:50051: connection refused"), {})
    assert r.status == "FAIL"
    assert "connection refused" in r.detail
    assert "the bgp-speaker says: gobgpd unreachable" in r.detail
    assert "systemctl restart gobgpd" in r.fix
    assert "/etc/gobgpd.conf" in r.fix


def test_no_established_peer_fails() -> None:
    r = doctor.check_bgp(VIPS, SPEAKER_OK, {"10.99.0.1": False}, {})
    assert r.status == "FAIL"
    assert "no peer ESTABLISHED" in r.detail


def test_an_adj_out_without_a_vip_fails() -> None:
    r = doctor.check_bgp(VIPS, SPEAKER_OK, {"10.99.0.1": True}, {"10.99.0.1": {"192.0.2.10/32"}})
    assert r.status == "FAIL"
    assert r.detail == "10.99.0.1 adj-out lacks 192.0.2.11/32"


def test_one_peer_down_of_two_warns_and_an_unhealthy_speaker_warns() -> None:
    out = {"192.0.2.10/32", "192.0.2.11/32"}
    r = doctor.check_bgp(VIPS, SPEAKER_OK, {"10.99.0.1": True, "10.99.0.2": False}, {"10.99.0.1": out})
    assert r.status == "WARN"
    assert "not established: 10.99.0.2" in r.detail
    sick = ok({"ok": False, "reason": "last apply failed"}, 503)
    assert doctor.check_bgp(VIPS, sick, {"10.99.0.1": True}, {"10.99.0.1": out}).status == "WARN"
    assert doctor.check_bgp(VIPS, Unread("refused"), {"10.99.0.1": True}, {"10.99.0.1": out}).status == "WARN"


# -- the realserver's nft table -----------------------------------------------------------------------------

def vs(vip: str, port: int, protocol: Protocol = "tcp", endpoints: int = 1) -> VirtualService:
    family: Family = 6 if ":" in vip else 4
    return VirtualService(vip=vip, family=family, port=port, protocol=protocol, namespace="default",
                          service="unicorns", port_name="http", scheduler=None, forwarding="g", u_threshold=0,
                          l_threshold=0, flags=(), mtu=None,
                          backends=(Backend("node-1", "10.99.0.21" if family == 4 else "2001:db8:1::21",
                                            tuple(PodEndpoint(f"10.244.1.{i + 10}" if family == 4 else
                                                              f"fd00::{i + 10}", 8080) for i in range(endpoints))),))


SERVICES = [vs("192.0.2.10", 70, endpoints=2), vs("192.0.2.11", 53, "udp"), vs("2001:db8::10", 80)]


def kernel_of(text: str) -> NftTable:
    seen = expected_tables(text)  # what the realserver itself expects to read back
    return NftTable(seen.chains, frozenset(seen.services))


def test_the_expected_table_is_what_the_realserver_expects_to_read_back() -> None:
    text = render_nft(SERVICES)
    assert doctor.expected_nft(text) == kernel_of(text)
    assert doctor.expected_nft(text).services == {("192.0.2.10", 70, "tcp"), ("192.0.2.11", 53, "udp"),
                                                  ("2001:db8::10", 80, "tcp")}


def test_the_table_as_rendered_passes() -> None:
    text = render_nft(SERVICES)
    r = doctor.check_nft_table(Http(200, text), kernel_of(text))
    assert r.status == "PASS"
    assert "3 services in the class map" in r.detail


def test_a_deleted_table_fails_with_the_resync_fix() -> None:
    text = render_nft(SERVICES)
    only_ip6 = NftTable(frozenset(c for c in kernel_of(text).chains if c[0] == "ip6"),
                        frozenset({("2001:db8::10", 80, "tcp")}))
    r = doctor.check_nft_table(Http(200, text), only_ip6)
    assert r.status == "FAIL"
    assert r.detail == "table ip kube2ipvs is missing"
    assert "next resync" in r.fix


def test_a_service_missing_from_the_class_map_fails() -> None:
    text = render_nft(SERVICES)
    kernel = kernel_of(render_nft(SERVICES[:2]))
    r = doctor.check_nft_table(Http(200, text), NftTable(kernel_of(text).chains, kernel.services))
    assert r.status == "FAIL"
    assert "1 services missing from the class map (2001:db8::10:80/tcp)" in r.detail


def test_an_unreadable_table_or_rules_fail() -> None:
    assert doctor.check_nft_table(Http(200, render_nft(SERVICES)), Unread("operation not permitted")).status == "FAIL"
    assert doctor.check_nft_table(Http(503, "no slice of this node received yet\n"), Unread("x")).status == "FAIL"


# -- RST counters -------------------------------------------------------------------------------------------

KEY = ("192.0.2.10", 70, "tcp")


def test_a_rst_burst_between_two_reads_warns() -> None:
    r = doctor.check_rst({KEY: 100}, {KEY: 160}, 2.0)
    assert r.status == "WARN"
    assert "192.0.2.10:70/tcp 30.0/s" in r.detail
    assert "mh" in r.fix
    assert "tcpdump" in r.fix


def test_a_steady_rst_count_passes() -> None:
    r = doctor.check_rst({KEY: 100}, {KEY: 105}, 1.0)
    assert r.status == "PASS"
    assert "105 RSTs counted" in r.detail


def test_unreadable_rst_counters_warn() -> None:
    assert doctor.check_rst(Unread("no set"), Unread("no set"), 1.0).status == "WARN"


# -- NATS ---------------------------------------------------------------------------------------------------

INFO = 'INFO {"server_id":"NABC","server_name":"lab","version":"2.9.10","jetstream":true,"max_payload":1048576}'


def test_a_nats_server_answering_info_passes() -> None:
    r = doctor.check_nats("nats://10.99.0.5:4222", INFO)
    assert r.status == "PASS"
    assert "NATS 2.9.10 (lab)" in r.detail


def test_nats_unreachable_or_not_nats_or_without_jetstream_fails() -> None:
    refused = doctor.check_nats("nats://10.99.0.5:4222", Unread("connection refused"))
    assert refused.status == "FAIL"
    assert "nats-server" in refused.fix
    assert doctor.check_nats("nats://x:4222", "SSH-2.0-OpenSSH_9.2").status == "FAIL"
    assert doctor.check_nats("nats://x:4222", INFO.replace('"jetstream":true', '"jetstream":false')).status == "FAIL"


# -- curl VIP:70 --------------------------------------------------------------------------------------------

def test_curl_vip_70_passes_on_an_answer_and_fails_without() -> None:
    good = doctor.check_unicorns("192.0.2.10", 70, Http(200, "unicorns-0 node-1 192.0.2.10\n"))
    assert (good.name, good.status, good.detail) == ("curl 192.0.2.10:70", "PASS",
                                                     "HTTP 200: unicorns-0 node-1 192.0.2.10")
    refused = doctor.check_unicorns("192.0.2.10", 70, Unread("connection refused"))
    assert refused.status == "FAIL"
    assert "run doctor on each" in refused.fix
    assert doctor.check_unicorns("2001:db8::10", 70, Http(502, "")).status == "FAIL"


def test_curl_from_a_host_that_holds_the_vip_is_skipped() -> None:
    r = doctor.check_unicorns("192.0.2.10", 70, None)
    assert r.status == "SKIP"
    assert "curl it from a client outside" in r.detail


# -- output and the command line -----------------------------------------------------------------------------

RESULTS = [Result("a", "PASS", "fine"), Result("b", "WARN", "hmm", "do x"), Result("c", "SKIP", "n/a"),
           Result("d", "FAIL", "broken", "do y\nthen z")]


def test_exit_code_is_1_only_with_a_failure() -> None:
    assert doctor.exit_code(RESULTS) == 1
    assert doctor.exit_code(RESULTS[:3]) == 0


def test_text_output_shows_each_status_and_fix() -> None:
    text = doctor.render_text(RESULTS)
    assert text.splitlines() == ["PASS  a: fine", "WARN  b: hmm", "      fix: do x", "SKIP  c: n/a",
                                 "FAIL  d: broken", "      fix: do y", "      fix: then z",
                                 "1 passed, 1 warnings, 1 failed, 1 skipped"]


def test_json_output_is_a_list_of_results() -> None:
    assert json.loads(doctor.render_json(RESULTS))[3] == {"name": "d", "status": "FAIL", "detail": "broken",
                                                          "fix": "do y\nthen z"}


@pytest.mark.parametrize(("args", "message"), [
    (["--listen-address", "localhost"], "is not ADDRESS[:PORT]"),
    (["--listen-address", "10.99.0.11:99999"], "is not a port"),
    (["--vip-check", "192.0.2.300"], "is not an IP address"),
    (["--role", "watcher"], "invalid choice"),
    (["--rst-interval", "0"], "between 0 and 60"),
])
def test_bad_doctor_flags_are_one_line_and_exit_2(args: list[str], message: str) -> None:
    out, err = io.StringIO(), io.StringIO()
    assert main(["doctor", *args], out=out, err=err) == 2
    assert message in err.getvalue()
    assert "Traceback" not in err.getvalue()


def test_the_default_ports_are_the_roles() -> None:
    from kube2ipvs.roleargs import DEFAULT_PORTS

    assert {r: DEFAULT_PORTS[r] for r in doctorio.DEFAULT_PORTS} == doctorio.DEFAULT_PORTS


@pytest.mark.parametrize(("text", "parsed"), [
    ("10.99.0.11", ("10.99.0.11", None)), ("10.99.0.11:9872", ("10.99.0.11", 9872)),
    ("::1", ("::1", None)), ("[2001:db8::1]:9874", ("2001:db8::1", 9874)),
])
def test_listen_addresses_parse(text: str, parsed: tuple[str, int | None]) -> None:
    args = argparse.ArgumentParser()
    sub = args.add_subparsers()
    doctorio.add_parser(sub)
    assert args.parse_args(["doctor", "--listen-address", text]).listen_address == parsed


# -- the run, with the host's readers replaced (no network, no kernel) ------------------------------------------

def test_with_no_service_answering_only_the_service_check_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(doctorio, "http_get", lambda url, timeout: Unread("connection refused"))
    results = doctorio.run(doctorio.Options())
    assert [(r.name, r.status) for r in results] == [("service", "FAIL")]
    assert "neither a director nor a realserver answers on 127.0.0.1 (ports 9872, 9874)" in results[0].detail
    assert "--role" in results[0].fix


def test_a_realserver_host_is_read_and_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    text = render_nft(SERVICES[:2])
    config = {"role": "realserver", "settings": {"device": "lo", "interface": "eth0",
                                                 "nats": {"servers": ["nats://10.99.0.5:4222"]}}}
    slice_json = {"services": [{"vip": "192.0.2.10", "port": 70, "protocol": "tcp",
                                "backends": [{"endpoints": [{"address": "10.244.1.10", "port": 8080}]}]}]}
    pages = {
        "http://10.99.0.21:9872/healthz": Unread("connection refused"),
        "http://10.99.0.21:9874/healthz": ok({"ok": True, "vips": ["192.0.2.10", "192.0.2.11"]}),
        "http://10.99.0.21:9874/config": ok(config),
        "http://10.99.0.21:9874/config?format=nft": Http(200, text),
        "http://10.99.0.21:9874/config?format=json": ok(slice_json),
        "http://192.0.2.10:70/": Http(200, "unicorns-0 node-1 192.0.2.10\n"),
    }
    monkeypatch.setattr(doctorio, "http_get", lambda url, timeout: pages.get(url, Unread(f"unexpected {url}")))
    monkeypatch.setattr(doctorio, "read_sysctl", lambda dev, name: GOOD_ARP.get((dev, name)))
    monkeypatch.setattr(doctorio, "device_addresses", lambda dev: frozenset({"127.0.0.1", "192.0.2.10", "192.0.2.11"}))
    monkeypatch.setattr(doctorio, "realserver_table", lambda: kernel_of(text))
    reads = iter([{KEY: 5}, {KEY: 6}])
    monkeypatch.setattr(doctorio, "rst_counts", lambda: next(reads))
    monkeypatch.setattr(doctorio, "tcp_line", lambda host, port, timeout: INFO if (host, port) == ("10.99.0.5", 4222)
                        else Unread("refused"))
    monkeypatch.setattr(doctorio, "is_local", lambda address: True)
    slept: list[float] = []
    results = doctorio.run(doctorio.Options(host="10.99.0.21", sleep=slept.append))
    assert [(r.name, r.status) for r in results] == [
        ("realserver service", "PASS"), ("ARP sysctls", "PASS"), ("VIP addresses", "PASS"), ("nft table", "PASS"),
        ("RST counters", "PASS"), ("NATS", "PASS"), ("curl 192.0.2.10:70", "PASS"), ("curl 192.0.2.11:70", "SKIP")]
    assert slept == [1.0]


def test_a_reader_failing_unexpectedly_is_a_fail_not_a_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(dev: str, name: str) -> int:
        raise RuntimeError("netlink said no")

    pages = {"http://127.0.0.1:9872/healthz": ok({"ok": True, "vips": []}),
             "http://127.0.0.1:9872/config": ok({"role": "director", "settings": {"dataplane": "nftables"}})}
    monkeypatch.setattr(doctorio, "http_get", lambda url, timeout: pages.get(url, Unread("refused")))
    monkeypatch.setattr(doctorio, "dsr_table", lambda table: Unread("the table is missing"))
    monkeypatch.setattr(doctorio, "read_sysctl", broken)
    monkeypatch.setattr(doctorio, "tcp_line", lambda host, port, timeout: Unread("refused"))
    results = doctorio.run(doctorio.Options(role="director"))
    failed = result_named(results, "director checks")
    assert failed.status == "FAIL"
    assert failed.detail == "could not run: RuntimeError: netlink said no"
    assert result_named(results, "NATS").status == "FAIL"


def result_named(results: Sequence[Result], name: str) -> Result:
    return next(r for r in results if r.name == name)
