"""kube2ipvs.nfsets: decoding set element keys and netlink attributes (the kernel round trip is
tested in tests/root: the realserver's counters equal what `nft -j list set` shows)."""

from __future__ import annotations

import socket
import struct

from kube2ipvs.nfsets import _element, service_key


def key(address: str, proto: int, port: int) -> bytes:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    return socket.inet_pton(family, address) + bytes([proto, 0, 0, 0]) + struct.pack(">H", port) + b"\0\0"


def nla(kind: int, payload: bytes) -> bytes:
    attr = struct.pack("=HH", 4 + len(payload), kind) + payload
    return attr + b"\0" * (-len(attr) % 4)


def test_service_keys_decode_to_canonical_vip_port_and_protocol() -> None:
    assert service_key("ip", key("192.0.2.10", 6, 8080)) == ("192.0.2.10", 8080, "tcp")
    assert service_key("ip", key("192.0.2.10", 17, 53)) == ("192.0.2.10", 53, "udp")
    assert service_key("ip6", key("2001:db8::10", 6, 443)) == ("2001:db8::10", 443, "tcp")


def test_keys_of_another_shape_or_protocol_are_not_services() -> None:
    assert service_key("ip", key("192.0.2.10", 1, 0)) is None  # icmp
    assert service_key("ip6", key("192.0.2.10", 6, 80)) is None  # too short for an IPv6 key
    assert service_key("ip", b"") is None


def test_an_element_with_a_verdict_and_a_counter_is_read_whole() -> None:
    k = key("192.0.2.10", 6, 80)
    counter = nla(1, b"counter\0") + nla(2 | 0x8000, nla(1, struct.pack(">Q", 1500)) + nla(2, struct.pack(">Q", 20)))
    verdict = nla(2, nla(1, struct.pack(">i", -4)) + nla(2, b"dnat_2\0"))  # goto dnat_2
    body = nla(1 | 0x8000, nla(1, k)) + nla(2, verdict) + nla(7 | 0x8000, counter)
    element = _element(body, 0, len(body))
    assert (element.key, element.chain, element.packets, element.octets) == (k, "dnat_2", 20, 1500)
    assert element.data is None
