"""The bgp-speaker's pure planning: communities, the director gate, routes and peers."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kube2ipvs.render.bgp import render_bgp
from kube2ipvs_bgp_speaker.plan import (
    AddPeer,
    Announce,
    PeerSpec,
    Route,
    RouteSettings,
    UpdatePeer,
    Withdraw,
    apply_route_ops,
    canonical_communities,
    configured_prefixes,
    desired_routes,
    director_verdict,
    large_value,
    plan_peers,
    plan_routes,
    standard_text,
    standard_value,
    with_graceful_shutdown,
)
from tests.bgp_speaker_builders import cluster, ready

ALL = ("192.0.2.10", "192.0.2.11", "2001:db8::10")


def test_communities_are_validated_deduplicated_and_put_in_one_order() -> None:
    assert canonical_communities(["64512:200", "no-export", "64512:100", "64512:1:2", "64512:100"]) == (
        "64512:100", "64512:200", "no-export", "64512:1:2")
    with pytest.raises(ValueError, match="is not a BGP community"):
        canonical_communities(["64512"])
    with pytest.raises(ValueError, match="at most 65535"):
        canonical_communities(["64512:70000"])


def test_community_values_are_the_wire_values_and_read_back_as_the_same_text() -> None:
    assert standard_value("64512:100") == 64512 * 65536 + 100
    assert standard_value("no-export") == 0xFFFFFF01
    assert standard_value("65535:0") == 0xFFFF0000  # GRACEFUL_SHUTDOWN
    assert standard_value("64512:1:2") is None
    assert large_value("64512:1:2") == (64512, 1, 2)
    assert large_value("64512:1") is None
    for text in ("64512:100", "no-export", "blackhole", "65535:0", "0:0"):
        value = standard_value(text)
        assert value is not None
        assert standard_text(value) == text


def test_a_route_line_is_what_kube2ipvs_rules_prints_for_the_same_state() -> None:
    state = cluster(1, ALL)
    verdict = director_verdict(ready(ALL), now=1000.0, stale_after=30)
    routes = desired_routes(state, verdict, RouteSettings(nexthop="198.51.100.2",
                                                          communities=canonical_communities(["64512:100"])))
    assert "".join(r.line() + "\n" for r in routes) == render_bgp(state, nexthop="198.51.100.2",
                                                                 communities=["64512:100"])
    assert [r.line() for r in routes] == [
        "192.0.2.10/32 nexthop=198.51.100.2 communities=64512:100",
        "192.0.2.11/32 nexthop=198.51.100.2 communities=64512:100",
        "2001:db8::10/128 nexthop=self communities=64512:100",
    ]


def test_local_pref_and_med_are_on_every_route_and_in_its_line() -> None:
    state = cluster(1, ["192.0.2.10"])
    routes = desired_routes(state, director_verdict(ready(["192.0.2.10"]), now=1000.0, stale_after=30),
                            RouteSettings(local_pref=200, med=10))
    assert [r.line() for r in routes] == ["192.0.2.10/32 nexthop=self local-pref=200 med=10"]


def test_only_vips_with_a_real_server_that_the_director_serves_are_desired() -> None:
    state = cluster(1, ["192.0.2.10", "192.0.2.11"], unserved=["192.0.2.20"])
    # The director serves .10 and .20 (it may still drain .20); .11 is not applied there yet.
    verdict = director_verdict(ready(["192.0.2.10", "192.0.2.20"]), now=1000.0, stale_after=30)
    assert [r.prefix for r in desired_routes(state, verdict, RouteSettings())] == ["192.0.2.10/32"]


def test_the_directors_vips_are_compared_as_addresses() -> None:
    state = cluster(1, ["2001:db8::10"])
    verdict = director_verdict(ready(["2001:DB8:0::10", "not-an-address"]), now=1000.0, stale_after=30)
    assert verdict.vips == frozenset({"2001:db8::10"})
    assert [r.prefix for r in desired_routes(state, verdict, RouteSettings())] == ["2001:db8::10/128"]


@pytest.mark.parametrize(("doc", "reason"), [
    (None, "no readiness from the local director"),
    (ready(ALL, at=900.0), "the director's readiness is 100s old (limit 30s)"),
    (ready(ALL, healthy=False, reason="last apply failed: EPERM"), "the director is unhealthy: last apply failed"),
    (ready(ALL, active=False), "the director is a standby"),
    ({"healthy": True, "at": 1000.0}, "lists no VIPs"),
    ({"healthy": True, "vips": list(ALL)}, "has no time"),
])
def test_an_unready_director_allows_no_route_and_says_why(doc: dict[str, object] | None, reason: str) -> None:
    verdict = director_verdict(doc, now=1000.0, stale_after=30)
    assert not verdict.ready
    assert reason in verdict.reason
    assert desired_routes(cluster(1, ALL), verdict, RouteSettings()) == ()


def r(prefix: str, **kw: object) -> Route:
    return Route(prefix, **kw)  # type: ignore[arg-type]


def test_missing_and_changed_routes_are_announced_and_owned_leftovers_withdrawn() -> None:
    desired = [r("192.0.2.10/32", communities=("64512:100",)), r("192.0.2.11/32")]
    held = [r("192.0.2.10/32"), r("192.0.2.12/32"), r("203.0.113.7/32"), r("10.0.0.0/8")]
    ops = plan_routes(desired, held, owned=frozenset({"192.0.2.10/32", "192.0.2.11/32", "192.0.2.12/32"}))
    assert ops == [Announce(desired[0]), Announce(desired[1]), Withdraw(held[1])]
    after = apply_route_ops(held, ops)
    assert [x.prefix for x in after] == ["10.0.0.0/8", "192.0.2.10/32", "192.0.2.11/32", "203.0.113.7/32"]


def test_planning_the_desired_routes_against_themselves_changes_nothing() -> None:
    desired = [r("192.0.2.10/32", nexthop="198.51.100.2"), r("2001:db8::10/128", med=5)]
    assert plan_routes(desired, desired, owned=configured_prefixes(cluster(1, ALL))) == []


def test_graceful_shutdown_adds_65535_0_to_a_routes_communities() -> None:
    route = r("192.0.2.10/32", communities=("64512:100",))
    assert with_graceful_shutdown(route).communities == ("64512:100", "65535:0")


PREFIXES = [f"192.0.2.{i}/32" for i in range(1, 7)] + ["2001:db8::1/128", "2001:db8::2/128"]
routes = st.builds(Route, st.sampled_from(PREFIXES), st.sampled_from([None, "198.51.100.2"]),
                   st.sampled_from([(), ("64512:100",), ("64512:100", "65535:0")]), st.sampled_from([None, 100]))


@given(st.lists(routes, unique_by=lambda x: x.prefix), st.lists(routes, unique_by=lambda x: x.prefix),
       st.sets(st.sampled_from(PREFIXES)))
@settings(max_examples=200, deadline=None)
def test_applying_a_plan_yields_the_desired_routes_and_leaves_unowned_ones_alone(
    desired: list[Route], held: list[Route], owned: set[str],
) -> None:
    owned_all = frozenset(owned) | {x.prefix for x in desired}
    after = apply_route_ops(held, plan_routes(desired, held, owned=owned_all))
    assert {x for x in after if x.prefix in owned_all} == set(desired)
    assert {x for x in after if x.prefix not in owned_all} == {x for x in held if x.prefix not in owned_all}
    assert plan_routes(desired, after, owned=owned_all) == []


def test_peers_missing_are_added_and_peers_configured_differently_are_updated() -> None:
    a = PeerSpec("198.51.100.1", 64500, hold_time=9, keepalive=3)
    b = PeerSpec("198.51.100.3", 64501)
    held = {"198.51.100.1": PeerSpec("198.51.100.1", 64500), "203.0.113.9": PeerSpec("203.0.113.9", 1)}
    assert plan_peers([b, a], held) == [UpdatePeer(a), AddPeer(b)]
    assert plan_peers([a], {"198.51.100.1": a}) == []


def test_a_peers_password_is_never_shown() -> None:
    peer = PeerSpec("198.51.100.1", 64500, password="s3cret")
    assert "s3cret" not in repr(peer)
    assert peer.describe()["password"] == "<set>"
