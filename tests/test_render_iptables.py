"""render_iptables and the hashed chain names: structure, and what share of connections each
endpoint of a VIP:port gets (read back from the `statistic` cascade in the text)."""

from __future__ import annotations

import random
import re

import pytest

from kube2ipvs.model import ClusterState, hostport
from kube2ipvs.names import IPTABLES_CHAIN_MAX, iptables_chain_name, iptables_service_chain, service_identity
from kube2ipvs.render.iptables import probability, render_iptables
from kube2ipvs.render.nft import counter_names
from tests.test_render_nft import virtual_service

Document = dict[str, list[str]]  # table -> its lines between `*table` and COMMIT


def documents(text: str) -> dict[str, Document]:
    """`4`/`6` -> tables, split at the comment line that introduces each document."""
    docs: dict[str, Document] = {}
    current: Document = {}
    table = ""
    for line in text.splitlines():
        if m := re.fullmatch(r"# kube2ipvs IPv(4|6) rules: ip6?tables-restore input", line):
            current = docs[m[1]] = {}
        elif line.startswith("*"):
            table = line[1:]
            current[table] = []
        elif line != "COMMIT":
            current[table].append(line)
    return docs


def connection_shares(doc: Document) -> dict[tuple[str, str, int], dict[str, float]]:
    """(VIP, protocol, port) -> endpoint -> the share of new connections DNATed to it."""
    rules = doc["nat"]
    shares: dict[tuple[str, str, int], dict[str, float]] = {}
    for rule in rules:
        jump = re.fullmatch(r"-A K2I-SERVICES -d (\S+)/\d+ -p (\w+) -m \w+ --dport (\d+) "
                            r"-m comment --comment \"?[^ \"]+\"? -j (\S+)", rule)
        if jump is None:
            continue
        left, picked = 1.0, {}
        for r in (r for r in rules if r.startswith(f"-A {jump[4]} ")):
            m = re.fullmatch(rf"-A \S+ -p {jump[2]}(?: -m statistic --mode random --probability ([\d.]+))?"
                             r" -j DNAT --to-destination (\S+)", r)
            assert m is not None, r
            p = float(m[1]) if m[1] else 1.0
            picked[m[2]] = left * p
            left -= left * p
        assert left == pytest.approx(0.0)
        shares[(jump[1], jump[2], int(jump[3]))] = picked
    return shares


@pytest.mark.parametrize("node", ["node-a", "node-b"])
def test_each_endpoint_of_a_vip_port_gets_an_equal_share_of_connections(state: ClusterState, node: str) -> None:
    mine = state.for_node(node)
    docs = documents(render_iptables(mine))
    shares = {**connection_shares(docs["4"]), **connection_shares(docs["6"])}
    assert set(shares) == {(vs.vip, vs.protocol, vs.port) for vs in mine}
    for vs in mine:
        endpoints = [hostport(e.address, e.port) for b in vs.backends for e in b.endpoints]
        assert shares[(vs.vip, vs.protocol, vs.port)] == pytest.approx({ep: 1 / len(endpoints) for ep in endpoints})


@pytest.mark.parametrize("n", range(1, 12))
def test_the_probability_cascade_is_even_for_any_number_of_endpoints(n: int) -> None:
    eps = [(f"10.1.1.{i}", 8080) for i in range(1, n + 1)]
    text = render_iptables([virtual_service("192.0.2.10", 80, endpoints=eps)])
    (shares,) = connection_shares(documents(text)["4"]).values()
    assert list(shares.values()) == pytest.approx([1 / n] * n, abs=1e-9)


def test_probabilities_are_written_the_way_iptables_save_prints_them() -> None:
    assert probability(2) == "0.50000000000"
    assert probability(3) == "0.33333333349"  # the 31-bit fraction xt_statistic stores
    assert probability(4) == "0.25000000000"


def test_each_family_is_a_complete_restore_input_with_raw_mangle_and_nat(state: ClusterState) -> None:
    text = render_iptables(state.for_node("node-a"))
    assert text.startswith("# kube2ipvs IPv4 rules: iptables-restore input\n*raw\n")
    assert "COMMIT\n# kube2ipvs IPv6 rules: ip6tables-restore input\n*raw\n" in text
    for doc in documents(text).values():
        assert list(doc) == ["raw", "mangle", "nat"]
        for lines in doc.values():
            declared = {line[1:].split()[0] for line in lines if line.startswith(":")}
            targets = {"DNAT", "MASQUERADE", "RETURN", "TCPMSS"}
            used = {w for line in lines for w in re.findall(r"-[AjI] (\S+)", line)} - targets
            assert used <= declared


def test_no_services_give_tables_holding_only_their_built_in_chains() -> None:
    for doc in documents(render_iptables([])).values():
        assert doc == {
            "raw": [":PREROUTING ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]"],
            "mangle": [f":{c} ACCEPT [0:0]" for c in ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING")],
            "nat": [f":{c} ACCEPT [0:0]" for c in ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING")],
        }


def test_the_text_does_not_depend_on_the_order_of_services(state: ClusterState) -> None:
    services = list(state.for_node("node-b"))
    random.Random(3).shuffle(services)
    assert render_iptables(services) == render_iptables(state.for_node("node-b"))


def test_counting_rules_carry_the_nft_counter_names_as_comments(state: ClusterState) -> None:
    mine = state.for_node("node-a")
    docs = documents(render_iptables(mine))
    comments = [
        m[1] for doc in docs.values() for table in ("raw", "mangle") for line in doc[table]
        if (m := re.search(r"--comment \"?([^ \"]+)", line))
    ]
    assert sorted(comments) == sorted(name for vs in mine for name in counter_names(vs).values())


def test_inbound_packets_are_counted_by_destination_and_outbound_by_original_destination() -> None:
    docs = documents(render_iptables([virtual_service("192.0.2.10", 80)]))
    match_in = "-A K2I-COUNT-IN -d 192.0.2.10/32 -p tcp -m tcp --dport 80"
    assert [line for line in docs["4"]["raw"] if line.startswith("-A K2I-COUNT-IN")] == [
        f'{match_in} -m comment --comment "svc_192.0.2.10_80_tcp_pkts_in"',
        f'{match_in} --tcp-flags SYN,ACK SYN -m comment --comment "svc_192.0.2.10_80_tcp_syn_in"',
        f'{match_in} --tcp-flags FIN FIN -m comment --comment "svc_192.0.2.10_80_tcp_fin_in"',
        f'{match_in} --tcp-flags RST RST -m comment --comment "svc_192.0.2.10_80_tcp_rst_in"',
    ]
    origin = "-m conntrack --ctorigdst 192.0.2.10 --ctorigdstport 80 --ctdir REPLY -m comment --comment"
    assert [line for line in docs["4"]["mangle"] if line.startswith("-A K2I-COUNT-OUT")] == [
        f'-A K2I-COUNT-OUT -p tcp {origin} "svc_192.0.2.10_80_tcp_pkts_out"',
        f'-A K2I-COUNT-OUT -p tcp -m tcp --tcp-flags SYN,ACK SYN,ACK {origin} "svc_192.0.2.10_80_tcp_synack_out"',
        f'-A K2I-COUNT-OUT -p tcp -m tcp --tcp-flags FIN FIN {origin} "svc_192.0.2.10_80_tcp_fin_out"',
        f'-A K2I-COUNT-OUT -p tcp -m tcp --tcp-flags RST RST {origin} "svc_192.0.2.10_80_tcp_rst_out"',
    ]


def test_udp_services_have_no_flag_counting_rules() -> None:
    text = render_iptables([virtual_service("192.0.2.10", 53, "udp")])
    assert "--tcp-flags" not in text
    assert "-p udp -m udp --dport 53 -m comment --comment \"svc_192.0.2.10_53_udp_pkts_in\"" in text


def test_ipv6_rules_are_in_the_second_document_only() -> None:
    docs = documents(render_iptables([virtual_service("2001:db8::10", 80, endpoints=[("2001:db8:1:1::2", 8080)])]))
    assert connection_shares(docs["6"]) == {("2001:db8::10", "tcp", 80): {"[2001:db8:1:1::2]:8080": 1.0}}
    assert connection_shares(docs["4"]) == {}
    assert "-A K2I-COUNT-IN -d 2001:db8::10/128 -p tcp -m tcp --dport 80 " \
           "-m comment --comment svc_2001-db8--10_80_tcp_pkts_in" in docs["6"]["raw"]


def test_client_addresses_are_preserved_by_default(state: ClusterState) -> None:
    text = render_iptables(state.for_node("node-a"))
    assert "MASQUERADE" not in text
    assert "K2I-POSTROUTING" not in text


def test_masquerade_returns_early_for_exempt_sources_and_uses_no_mark(state: ClusterState) -> None:
    docs = documents(render_iptables(state.for_node("node-a"), masquerade_exempt=["10.1.0.0/16", "fd00::/8"]))
    post = [line for line in docs["4"]["nat"] if "K2I-POSTROUTING" in line]
    assert post == [
        ":K2I-POSTROUTING - [0:0]",
        "-A POSTROUTING -j K2I-POSTROUTING",
        "-A K2I-POSTROUTING -s 10.1.0.0/16 -j RETURN",
        "-A K2I-POSTROUTING -m conntrack --ctstate DNAT --ctorigdst 192.0.2.10 -j MASQUERADE",
        "-A K2I-POSTROUTING -m conntrack --ctstate DNAT --ctorigdst 192.0.2.11 -j MASQUERADE",
        "-A K2I-POSTROUTING -m conntrack --ctstate DNAT --ctorigdst 192.0.2.12 -j MASQUERADE",
    ]
    assert "-A K2I-POSTROUTING -s fd00::/8 -j RETURN" in docs["6"]["nat"]
    assert "MARK" not in str(docs)
    assert "--mark" not in str(docs)


# ---------------------------------------------------------------------------------------------
# Hashed chain names


def test_service_chain_names_fit_iptables_and_are_stable(state: ClusterState) -> None:
    names = {iptables_service_chain(vs.vip, vs.port, vs.protocol) for vs in state.services}
    assert len(names) == len({vs.key for vs in state.services}), "one distinct name per service"
    for name in names:
        assert re.fullmatch(r"K2I-SVC-[A-Z2-7]{16}", name)
        assert len(name) <= IPTABLES_CHAIN_MAX
    assert iptables_service_chain("192.0.2.10", 80, "tcp") == "K2I-SVC-QHU3IOTJZLMGENXB"


def test_a_service_identity_does_not_depend_on_how_the_address_is_spelled() -> None:
    assert service_identity("2001:DB8:0::10", 80, "tcp") == "[2001:db8::10]:80/tcp"
    assert iptables_service_chain("2001:DB8:0::10", 80, "tcp") == iptables_service_chain("2001:db8::10", 80, "tcp")
    assert iptables_service_chain("192.0.2.10", 80, "tcp") != iptables_service_chain("192.0.2.10", 80, "udp")


def test_a_prefix_that_would_overflow_the_chain_name_is_refused() -> None:
    assert len(iptables_chain_name("K2I-12345678", "x")) == IPTABLES_CHAIN_MAX
    with pytest.raises(ValueError, match="longer than 28"):
        iptables_chain_name("K2I-123456789", "x")
