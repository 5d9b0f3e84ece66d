"""Fuzzing the pure path from raw input to every rendering, with Hypothesis.

Generated Kubernetes objects mix good values with what the bad-input corpus holds (odd and
hostile addresses, names, ports, types); configs are valid but arbitrary; bucket values are good
service values with one field replaced by anything. Invariants:

- nothing raises but the documented error types (ProtocolError from the bucket decoder, DsrError
  from the nftables dataplane for what it cannot forward);
- no rendering has a rule for a VIP, port, node or pod address that is not in the input: every
  address in the text is a VIP of the config, a node's InternalIP, a pod's address (or a
  masquerade exemption), and every service key is an enabled (VIP, port, protocol) of the config;
- nft text is well-formed: printable ASCII, braces balanced, and no line that carries input holds
  a statement separator, a string or a comment (nft itself loads the same texts in
  tests/root/test_nft_fuzz_netns.py).

The corpus (tests/test_bad_input_corpus.py) pins the known bad inputs; this explores around them.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kube2ipvs.ipvs import IpvsService, desired_ipvs
from kube2ipvs.kube import parse_endpointslices, parse_nodes, parse_services
from kube2ipvs.lbconfig import LBConfig, Protocol, parse_lbconfig_value
from kube2ipvs.model import ClusterState, VirtualService, service_value
from kube2ipvs.normalize import normalize
from kube2ipvs.protocol import NodeSlice, ProtocolError, decode_node_service
from kube2ipvs.render.arp import render_arp
from kube2ipvs.render.bgp import render_bgp
from kube2ipvs.render.iptables import render_iptables
from kube2ipvs.render.ipvsadm import render_ipvsadm
from kube2ipvs.render.json import render_json
from kube2ipvs.render.nft import render_nft
from kube2ipvs.render.nftdelta import render_nft_delta
from kube2ipvs_director.dsr import DsrError, DsrSettings, change, layout_of, render_load, render_table
from kube2ipvs_director.plan import ObservedDest, ObservedService, ServiceId
from kube2ipvs_realserver.plan import Settings, desired_state

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --------------------------------------------------------------------------------------------
# Generated input

NODE_NAMES = ["n0", "n1", "n2", "n3"]
ODD_NAMES = ["N1", "n1; flush ruleset", "n1\n", "n.*", "", "n1 ", "-n1"]
ODD_ADDRESSES: list[object] = [
    "010.1.2.2", "10.1.2.256", "10.1.2.2/32", " 10.1.2.2", "", "fe80::1%eth0", "2001:db8:1::9%; flush ruleset",
    "::ffff:10.1.0.1", "::ffff:198.51.100.1", "167838210", "10.1.2", "10.1.2.2\n", None, 5, ["10.1.0.1"],
    "10.1.0.1 . 8080 }", "2001:db8:1::1]:80",
]
ODD_PORTS: list[object] = [0, -1, 65536, 10**20, "8080", 8080.0, True, None]
VIP4 = ["192.0.2.1", "192.0.2.2", "192.0.2.3"]
VIP6 = ["2001:db8::1", "2001:db8::2"]
SERVICES = ["web", "api", "dns"]
PORT_NAMES = ["http", "dns", "8080"]


def node_address(family: int, i: int) -> str:
    return f"198.51.100.{i + 1}" if family == 4 else f"2001:db8:100::{i + 1:x}"


def pod_address(family: int, i: int) -> str:
    return f"10.1.{i // 200}.{i % 200 + 1}" if family == 4 else f"2001:db8:1::{i + 1:x}"


ODD = st.sampled_from(ODD_ADDRESSES)


def mostly(good: st.SearchStrategy[Any], odd: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Good values three times in four: odd input among working input, so rules are rendered."""
    return st.sampled_from([True, True, True, False]).flatmap(lambda ok: good if ok else odd)


@st.composite
def raw_nodes(draw: st.DrawFn) -> list[dict[str, Any]]:
    out = []
    for i, name in enumerate(NODE_NAMES + draw(st.lists(st.sampled_from(ODD_NAMES), max_size=2))):
        good = [a for a in (node_address(4, i), node_address(6, i)) if draw(mostly(st.just(True), st.just(False)))]
        odd = draw(st.lists(ODD, max_size=2))
        addresses = draw(st.permutations(good + odd)) if draw(st.booleans()) else good + odd
        out.append({"kind": "Node", "metadata": {"name": name, "labels": {"zone": "green"}},
                    "status": {"conditions": [{"type": "Ready",
                                               "status": draw(mostly(st.just("True"), st.just("False")))}],
                               "addresses": [{"type": "InternalIP", "address": a} for a in addresses]}})
    return out


def raw_services() -> list[dict[str, Any]]:
    return [{"kind": "Service", "metadata": {"namespace": "shop", "name": s},
             "spec": {"ports": [{"name": "http", "port": 8080, "protocol": "TCP"},
                                {"name": "dns", "port": 53, "protocol": "UDP"}]}} for s in SERVICES]


@st.composite
def raw_slices(draw: st.DrawFn) -> list[dict[str, Any]]:
    out = []
    kinds = [(s, f) for s in SERVICES for f in (4, 6)] + draw(st.lists(st.tuples(
        st.sampled_from(SERVICES), st.sampled_from(["FQDN", None, 4])), max_size=2))
    for i, (service_name, family) in enumerate(kinds):
        ports = [{"name": name, "port": draw(mostly(st.sampled_from([8080, 5353, 9000]), st.sampled_from(ODD_PORTS))),
                  "protocol": draw(mostly(st.sampled_from(["TCP", "UDP"]), st.just("SCTP")))}
                 for name in draw(st.lists(st.sampled_from(PORT_NAMES[:2]), min_size=1, max_size=2, unique=True))]
        pods = st.integers(0, 30).map(functools.partial(pod_address, family if family in (4, 6) else 4))
        endpoints = [{"addresses": draw(st.lists(mostly(pods, ODD), min_size=1, max_size=2)),
                      "conditions": {"ready": draw(mostly(st.sampled_from([True, None]), st.just(False)))},
                      "nodeName": draw(mostly(st.sampled_from(NODE_NAMES), st.sampled_from(["n9", *ODD_NAMES])))}
                     for _ in range(draw(st.integers(0, 5)))]
        out.append({"kind": "EndpointSlice",
                    "metadata": {"namespace": "shop", "name": f"s{i}",
                                 "labels": {"kubernetes.io/service-name": service_name}},
                    "addressType": {4: "IPv4", 6: "IPv6"}.get(family, family),
                    "ports": ports, "endpoints": endpoints})
    return out


@st.composite
def configs(draw: st.DrawFn) -> LBConfig:
    def section(vips: Sequence[str]) -> dict[str, Any]:
        return {vip: {str(port): {
            "namespace": "shop", "service": draw(st.sampled_from(SERVICES)),
            "portName": draw(st.sampled_from(PORT_NAMES)),
            "tcpEnabled": draw(st.booleans()), "udpEnabled": draw(st.booleans()),
            "ipvsOptions": {"scheduler": draw(st.sampled_from(["", "wrr", "mh", "sh"])),
                            "forwardingMethod": draw(st.sampled_from(["g", "g", "i"])),
                            "uThreshold": draw(st.sampled_from([0, 10]))}}
            for port in draw(st.lists(st.integers(1, 65535), unique=True, max_size=3))}
            for vip in draw(st.lists(st.sampled_from(vips), unique=True, max_size=len(vips)))}

    mtu = {vip: str(draw(st.integers(576, 9216))) for vip in draw(st.lists(st.sampled_from(VIP4), unique=True))}
    return parse_lbconfig_value({"vipPool": draw(st.lists(st.sampled_from(VIP4 + VIP6), unique=True)),
                                 "labels": {"zone": "green"}, "mtuConfig": mtu,
                                 "config": section(VIP4), "config6": section(VIP6)})


@dataclass(frozen=True)
class Cluster:
    nodes: list[dict[str, Any]]
    slices: list[dict[str, Any]]
    config: LBConfig

    def state(self) -> ClusterState:
        nodes, _ = parse_nodes(self.nodes)
        services, _ = parse_services(raw_services())
        slices, _ = parse_endpointslices(self.slices)
        return normalize(nodes, services, slices, self.config)

    def allowed(self) -> set[str]:
        """Every address the input offers, as the kernel writes it."""
        found: set[str] = set(self.config.vips())
        for obj in self.nodes:
            found.update(_addresses([a["address"] for a in obj["status"]["addresses"]]))
        for obj in self.slices:
            for ep in obj["endpoints"]:
                found.update(_addresses(ep["addresses"] if isinstance(ep["addresses"], list) else []))
        return found


def _addresses(values: Iterable[object]) -> set[str]:
    out = set()
    for value in values:
        if isinstance(value, str):
            try:
                ip = ipaddress.ip_address(value)
            except ValueError:
                continue
            if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id is not None:
                continue  # a zone index is no address of the input's: it must never be rendered
            out.add(str(ip))
            if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
                out.add(str(ip.ipv4_mapped))
    return out


CLUSTERS = st.builds(Cluster, raw_nodes(), raw_slices(), configs())

# --------------------------------------------------------------------------------------------
# What a text refers to

_IPV4 = re.compile(r"(?<![\w.:])(\d{1,3}(?:\.\d{1,3}){3})(?![\w:])")
_IPV6 = re.compile(r"(?<![\w:.])([0-9a-f]{0,4}(?::[0-9a-f]{0,4}){2,7})(?![\w:])")
_NFT_KEY = re.compile(r"(\S+) \. (tcp|udp) \. (\d+)\b")
_IPVS_KEY = re.compile(r"^-[Aa] -([tu]) \[?([0-9a-f.:]+)\]?:(\d+)", re.M)


def addresses_in(text: str) -> set[str]:
    """Every IPv4 or IPv6 address written in `text` (prefixes and networks by their address)."""
    found = set(_IPV4.findall(text))
    for candidate in _IPV6.findall(text):
        try:
            found.add(str(ipaddress.ip_address(candidate)))
        except ValueError:
            continue
    return found


def check_addresses(text: str, allowed: set[str], *, extra: Iterable[str] = ()) -> None:
    stray = addresses_in(text) - allowed - set(extra)
    assert not stray, f"addresses not in the input: {sorted(stray)}\n{text[:3000]}"


def nft_service_keys(text: str) -> set[tuple[str, int, str]]:
    return {(vip, int(port), proto) for vip, proto, port in _NFT_KEY.findall(text)}


def check_nft_well_formed(text: str) -> None:
    assert text.isascii(), text[:2000]
    assert all(line.replace("\t", " ").isprintable() for line in text.splitlines()), text[:2000]
    depth = 0
    for line in text.splitlines():
        depth += line.count("{") - line.count("}")
        assert depth >= 0, line
        if addresses_in(line):  # a line carrying input: no statement separator, string or comment in it
            assert not set(line) & set(';"#%\\'), line
    assert depth == 0


def enabled(config: LBConfig) -> set[tuple[str, int, str]]:
    return {(vip, port, proto) for vip, port, proto in config.enabled_keys()}


# --------------------------------------------------------------------------------------------
# Normalization and the renderings of a whole cluster


def observed(services: Iterable[IpvsService]) -> list[ObservedService]:
    """The director's desired services as its nftables dataplane takes them."""
    return [ObservedService(ServiceId(s.vip, s.family, s.port, s.protocol), s.scheduler, s.flags,
                            dests=tuple(ObservedDest(d.address, d.port, d.forwarding, d.weight, d.u_threshold,
                                                     d.l_threshold) for d in s.dests)) for s in services]


def dsr_services(state: ClusterState) -> list[ObservedService]:
    """What the nftables dataplane can hold: direct routing only (IPIP is refused with DsrError)."""
    out = []
    for svc in observed(desired_ipvs(state, "bgp")):
        try:
            layout_of([svc], DSR.table_size)
        except DsrError:
            continue
        out.append(svc)
    return out


DSR = DsrSettings("eth0", table_size=13)


@FUZZ
@given(CLUSTERS)
def test_normalize_and_every_rendering_of_odd_objects_refer_only_to_the_input(cluster: Cluster) -> None:
    state = cluster.state()
    allowed, keys = cluster.allowed(), enabled(cluster.config)
    assert {vs.key for vs in state.services} <= keys
    for vs in state.services:
        assert all(b.address in allowed and all(e.address in allowed and 1 <= e.port <= 65535 for e in b.endpoints)
                   for b in vs.backends)
        assert all((":" in b.address) == (vs.family == 6) for b in vs.backends)
        assert all((":" in e.address) == (vs.family == 6) for b in vs.backends for e in b.endpoints)
    for mode in ("arp", "bgp"):
        text = render_ipvsadm(state, mode=mode)
        check_nft_well_formed(text)  # the same line rules hold for ipvsadm-restore input
        check_addresses(text, allowed)
        assert {(vip, int(port), "tcp" if p == "t" else "udp") for p, vip, port in _IPVS_KEY.findall(text)} <= keys
    check_addresses(render_bgp(state, nexthop="198.51.100.254"), allowed, extra=["198.51.100.254"])
    check_addresses(render_arp(state, interface="eth0"), set(cluster.config.vips()))
    json.loads(render_json(state))
    exempt = ["10.0.0.0/8", "2001:db8:1::/64"]
    for name in state.node_names():
        mine = state.for_node(name)
        for masquerade in (None, exempt):
            text = render_nft(mine, masquerade_exempt=masquerade)
            check_nft_well_formed(text)
            check_addresses(text, allowed, extra=["10.0.0.0", "2001:db8:1::"])
            assert nft_service_keys(text) <= keys
            check_addresses(render_iptables(mine, masquerade_exempt=masquerade), allowed,
                            extra=["10.0.0.0", "2001:db8:1::", "255.0.0.0"])
    layout = layout_of(dsr_services(state), DSR.table_size)
    for text in (render_table(layout, DSR), *render_load(layout, DSR, chunk=50)):
        check_nft_well_formed(text)
        check_addresses(text, allowed)
        assert nft_service_keys(text) <= keys


@FUZZ
@given(CLUSTERS, CLUSTERS)
def test_deltas_between_two_odd_clusters_refer_only_to_their_inputs(a: Cluster, b: Cluster) -> None:
    before, after = a.state(), b.state()
    allowed = a.allowed() | b.allowed()
    keys = enabled(a.config) | enabled(b.config)
    for name in NODE_NAMES:
        delta = render_nft_delta(before.for_node(name), after.for_node(name))
        check_nft_well_formed(delta)
        check_addresses(delta, allowed)
        assert nft_service_keys(delta) <= keys
    old = layout_of(dsr_services(before), DSR.table_size)
    new = {s.id: s for s in dsr_services(after)}
    updates: dict[ServiceId, ObservedService | None] = {sid: new.get(sid) for sid in old.services.keys() | new.keys()}
    text = change(old, updates, DSR).text
    check_nft_well_formed(text)
    check_addresses(text, allowed)
    assert nft_service_keys(text) <= keys


# --------------------------------------------------------------------------------------------
# Bucket values: one field of a good value replaced by anything


def _good_service() -> VirtualService:
    from tests.test_render_nft import virtual_service
    return virtual_service("192.0.2.10", 80, endpoints=[("10.1.1.2", 8080), ("10.1.1.3", 8080)])


GOOD_VALUE = json.loads(service_value(_good_service()))
LEAVES = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(-5, 70_000), st.floats(), st.text(max_size=20),
                   st.sampled_from(ODD_ADDRESSES), st.sampled_from(["udp", "sctp", "i", "m", "mh", "wrr; reboot"]),
                   st.lists(st.integers(-1, 5), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(),
                                                                              max_size=2))


def _paths(doc: Any, here: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [here] if here else []
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, (*here, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _paths(v, (*here, i))
    return out


PATHS = _paths(GOOD_VALUE)


@st.composite
def bucket_values(draw: st.DrawFn) -> bytes:
    doc = json.loads(json.dumps(GOOD_VALUE))
    for path in draw(st.lists(st.sampled_from(PATHS), min_size=1, max_size=3)):
        target = doc
        try:
            for step in path[:-1]:
                target = target[step]
            target[path[-1]] = draw(LEAVES)
        except (KeyError, IndexError, TypeError):
            continue  # an earlier replacement removed this path
    text = json.dumps(doc, allow_nan=True).encode()
    return text[: draw(st.integers(1, len(text)))] if draw(st.booleans()) and draw(st.booleans()) else text


def decoded(value: bytes) -> VirtualService | str:
    """The service a bucket value holds, or the ProtocolError's message."""
    try:
        return decode_node_service(value)
    except ProtocolError as exc:
        return str(exc)


@FUZZ
@given(bucket_values())
def test_a_mutated_bucket_value_is_refused_or_renders_only_its_own_addresses(value: bytes) -> None:
    vs = decoded(value)
    if isinstance(vs, str):
        assert vs.isprintable()
        return
    allowed = {vs.vip, *(b.address for b in vs.backends), *(e.address for b in vs.backends for e in b.endpoints)}
    assert all("%" not in a for a in allowed)
    assert 1 <= vs.port <= 65535
    desired = desired_state(NodeSlice("node-a", (vs.vip,), (vs,)), Settings(masquerade_exempt=("10.0.0.0/8",)))
    check_nft_well_formed(desired.nft)
    check_addresses(desired.nft, allowed, extra=["10.0.0.0"])
    assert nft_service_keys(desired.nft) <= {(vs.vip, vs.port, vs.protocol)}
    protocol: Protocol = vs.protocol
    text = render_ipvsadm(ClusterState(1, (vs.vip,), (vs,), ()), mode="bgp")
    check_addresses(text, allowed)
    assert not text or f"{vs.vip}:{vs.port}" in text or f"[{vs.vip}]:{vs.port}" in text
    assert protocol in ("tcp", "udp")
