"""The director's observability parsers: /proc/net/ip_vs_conn counted by protocol and state
(streaming, header and odd lines skipped), conntrack use (absent module: None), and the fake
IPVS handing back the stats a test sets. The real files and netlink stats are read in the VM
(tests/vm/test_director_host_vm.py)."""

from __future__ import annotations

import io
from pathlib import Path

from kube2ipvs_director.kernel import DestStats, FakeIpvs, IpvsCounters, ServiceStats
from kube2ipvs_director.plan import ServiceId
from kube2ipvs_director.stats import (
    ConntrackUsage,
    count_ip_vs_conn,
    merge_counts,
    parse_sysctl_int,
    read_conntrack,
    read_ip_vs_conn,
)

HEADER = b"Pro FromIP   FPrt ToIP     TPrt DestIP   DPrt State       Expires PEName PEData\n"
# The kernel's formats (net/netfilter/ipvs/ip_vs_conn.c, ip_vs_conn_seq_show): IPv4 addresses as
# 8 hex digits, IPv6 ones uncompressed with colons, ports as 4 hex digits, then the state.
SAMPLE = [
    HEADER,
    b"TCP C0000201 D431 C000020A 0050 C6336401 0050 ESTABLISHED     899\n",
    b"TCP C0000202 D432 C000020A 0050 C6336401 0050 ESTABLISHED     812\n",
    b"TCP C0000203 D433 C000020A 0050 C6336402 0050 FIN_WAIT         29\n",
    b"TCP C0000204 D434 C000020A 0050 C6336402 0050 TIME_WAIT       119\n",
    b"TCP C0000205 D435 C000020A 0050 C6336402 0050 SYN_RECV         59\n",
    b"TCP C0000206 D436 C000020A 0050 C6336402 0050 CLOSE_WAIT       59\n",
    b"UDP C0000207 A001 C000020B 0035 C6336403 0035 UDP             299\n",
    b"TCP 2001:0db8:000c:0000:0000:0000:0000:0002 D437 2001:0db8:0000:0000:0000:0000:0000:0010 0050 "
    b"2001:0db8:0000:0000:0000:0000:0000:0011 0050 ESTABLISHED     899\n",
    b"TCP C0000208 0000 C000020A 0050 C6336401 0050 NONE            360 sip abc\n",  # a persistence template
]


def test_connections_are_counted_by_protocol_and_state() -> None:
    assert count_ip_vs_conn(SAMPLE) == {
        ("TCP", "CLOSE_WAIT"): 1, ("TCP", "ESTABLISHED"): 3, ("TCP", "FIN_WAIT"): 1, ("TCP", "NONE"): 1,
        ("TCP", "SYN_RECV"): 1, ("TCP", "TIME_WAIT"): 1, ("UDP", "UDP"): 1,
    }


def test_an_empty_table_is_only_its_header() -> None:
    assert count_ip_vs_conn([HEADER]) == {}
    assert count_ip_vs_conn([]) == {}


def test_lines_with_too_few_fields_are_skipped_and_the_rest_still_counted() -> None:
    lines = [HEADER, b"TCP C0000201 D431\n", b"\n", SAMPLE[1], b"garbage\n", SAMPLE[3]]
    assert count_ip_vs_conn(lines) == {("TCP", "ESTABLISHED"): 1, ("TCP", "FIN_WAIT"): 1}


def test_a_large_table_streams_through_in_batches() -> None:
    body = b"".join(SAMPLE[1:8]) * 30_000  # 210,000 lines, several batches
    counts = count_ip_vs_conn(io.BytesIO(HEADER + body))
    assert counts[("TCP", "ESTABLISHED")] == 60_000
    assert sum(counts.values()) == 210_000


def test_counts_of_several_files_add_up() -> None:
    a = {("TCP", "ESTABLISHED"): 2, ("UDP", "UDP"): 1}
    assert merge_counts(a, {("TCP", "ESTABLISHED"): 3}) == {("TCP", "ESTABLISHED"): 5, ("UDP", "UDP"): 1}


def test_the_reader_adds_up_the_files_that_exist_and_says_none_without_any(tmp_path: Path) -> None:
    (tmp_path / "ip_vs_conn").write_bytes(b"".join(SAMPLE[:3]))
    (tmp_path / "ip_vs_conn6").write_bytes(HEADER + SAMPLE[8])
    paths = [tmp_path / "ip_vs_conn", tmp_path / "ip_vs_conn6", tmp_path / "absent"]
    assert read_ip_vs_conn(paths) == {("TCP", "ESTABLISHED"): 3}
    assert read_ip_vs_conn([tmp_path / "absent"]) is None


def test_conntrack_use_is_read_and_a_missing_module_gives_none(tmp_path: Path) -> None:
    (tmp_path / "nf_conntrack_count").write_text("1234\n")
    (tmp_path / "nf_conntrack_max").write_text("262144\n")
    assert read_conntrack(tmp_path) == ConntrackUsage(count=1234, max=262144)
    assert read_conntrack(tmp_path / "absent") == ConntrackUsage(count=None, max=None)


def test_a_sysctl_that_is_not_a_number_reads_as_none() -> None:
    assert parse_sysctl_int(" 42\n") == 42
    assert parse_sysctl_int("") is None
    assert parse_sysctl_int("4 5") is None


def test_the_fake_ipvs_returns_the_stats_a_test_sets() -> None:
    sid = ServiceId("192.0.2.10", 4, 80, "tcp")
    stats = (ServiceStats(sid, IpvsCounters(connections=3, packets_in=30, bytes_in=3000),
                          (DestStats("198.51.100.1", 80, IpvsCounters(connections=3), active=1, inactive=2),)),)
    assert FakeIpvs().stats() == ()
    assert FakeIpvs(service_stats=stats).stats() == stats
