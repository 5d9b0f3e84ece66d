"""The gobgpd adapter's pure parts: routes and peers to gobgp's messages and back, and gobgpd's
error texts to the project's error kinds. (The same calls against a real gobgpd are in
tests/root/test_bgp_speaker_netns.py.)"""

from __future__ import annotations

import pytest
from kube2ipvs_gobgpapi import attribute_pb2 as attr
from kube2ipvs_gobgpapi import gobgp_pb2 as api

from kube2ipvs_bgp_speaker.errors import (
    GobgpError,
    GobgpExistsError,
    GobgpIncompatibleError,
    GobgpNotFoundError,
    GobgpNotStartedError,
    GobgpRejectedError,
    GobgpUnavailableError,
    translate,
)
from kube2ipvs_bgp_speaker.gobgp import path_of, peer_message, peer_spec, route_of_path
from kube2ipvs_bgp_speaker.plan import PeerSpec, Route

ROUTES = [
    Route("192.0.2.10/32"),
    Route("192.0.2.11/32", nexthop="198.51.100.7", communities=("64512:100", "64512:200", "no-export", "64512:1:2"),
          local_pref=200, med=10),
    Route("2001:db8::10/128"),
    Route("2001:db8::11/128", nexthop="2001:db8:100::2", communities=("65535:0",), med=0),
]


@pytest.mark.parametrize("route", ROUTES, ids=lambda x: x.line())
def test_a_route_survives_the_trip_through_gobgps_path_message(route: Route) -> None:
    wire = api.Path.FromString(path_of(route).SerializeToString())
    wire.neighbor_ip = "<nil>"  # what ListPath reports for a path gobgpd originated
    assert route_of_path(wire) == route


def test_an_ipv4_path_carries_a_next_hop_attribute_and_an_ipv6_path_mp_reach_nlri() -> None:
    v4, v6 = path_of(ROUTES[0]), path_of(ROUTES[2])
    assert [p.TypeName() for p in v4.pattrs] == ["apipb.OriginAttribute", "apipb.NextHopAttribute"]
    hop = attr.NextHopAttribute()
    v4.pattrs[1].Unpack(hop)
    assert hop.next_hop == "0.0.0.0"  # "self": gobgpd sends its address toward each peer
    assert [p.TypeName() for p in v6.pattrs] == ["apipb.OriginAttribute", "apipb.MpReachNLRIAttribute"]
    reach = attr.MpReachNLRIAttribute()
    v6.pattrs[1].Unpack(reach)
    assert (list(reach.next_hops), reach.family.afi) == (["::"], api.Family.AFI_IP6)


def test_several_communities_go_out_as_one_attribute_with_every_value() -> None:
    comms = attr.CommunitiesAttribute()
    next(p for p in path_of(ROUTES[1]).pattrs if p.TypeName() == "apipb.CommunitiesAttribute").Unpack(comms)
    assert list(comms.communities) == [64512 << 16 | 100, 64512 << 16 | 200, 0xFFFFFF01]


def test_paths_learned_from_peers_and_shorter_prefixes_are_not_ours() -> None:
    learned = path_of(ROUTES[0])
    learned.neighbor_ip = "198.51.100.1"
    assert route_of_path(learned) is None
    wide = path_of(Route("192.0.2.0/24"))
    wide.neighbor_ip = "<nil>"
    assert route_of_path(wide) is None


def test_a_peer_survives_the_trip_through_gobgps_peer_message() -> None:
    peer = PeerSpec("198.51.100.1", 64500, hold_time=9, keepalive=3, connect_retry=1, password="s3cret",
                    multihop_ttl=3, port=1179, passive=True)
    assert peer_spec(api.Peer.FromString(peer_message(peer).SerializeToString())) == peer
    v6 = PeerSpec("2001:db8:100::1", 64500, ipv4=False, ipv6=True)
    assert peer_spec(peer_message(v6)) == v6


# Texts as gobgpd 3.10 sends them (seen on this machine; see errors.py).
@pytest.mark.parametrize(("code", "text", "kind"), [
    ("UNKNOWN", "bgp server hasn't started yet", GobgpNotStartedError),
    ("UNKNOWN", "can't overwrite the existing peer: 198.51.100.1", GobgpExistsError),
    ("UNKNOWN", "can't find a specified path", GobgpNotFoundError),
    ("UNKNOWN", "can't delete a peer configuration for 192.0.2.1", GobgpNotFoundError),
    ("UNKNOWN", "neighbor that has 192.0.2.1 doesn't exist", GobgpNotFoundError),
    ("UNKNOWN", "invalid router-id format: ", GobgpRejectedError),
    ("UNKNOWN", "nexthop not found", GobgpRejectedError),
    ("UNKNOWN", "listen tcp4 0.0.0.0:179: bind: address already in use", GobgpRejectedError),
    ("UNAVAILABLE", "failed to connect to all addresses", GobgpUnavailableError),
    ("DEADLINE_EXCEEDED", "Deadline Exceeded", GobgpUnavailableError),
    ("UNIMPLEMENTED", "unknown service gobgpapi.GobgpApi", GobgpIncompatibleError),
])
def test_gobgpd_errors_are_sorted_by_what_to_do_next(code: str, text: str, kind: type[GobgpError]) -> None:
    error = translate(code, text, "AddPath")
    assert type(error) is kind
    assert str(error).startswith("AddPath: ")
    assert text in str(error)


def test_nexthop_not_found_is_a_rejection_not_a_missing_object() -> None:
    # "not found" appears in both; only the texts of missing objects mean "converged".
    assert not isinstance(translate("UNKNOWN", "nexthop not found"), GobgpNotFoundError)
