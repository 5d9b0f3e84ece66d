"""The bgp-speaker's loop against the strict fake gobgpd (kube2ipvs_bgp_speaker.fake)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Mapping
from typing import Any

import pytest
from prometheus_client import generate_latest

from kube2ipvs.model import ClusterState
from kube2ipvs_bgp_speaker.app import SpeakerApp, SpeakerSettings, cleanup
from kube2ipvs_bgp_speaker.errors import GobgpRejectedError
from kube2ipvs_bgp_speaker.fake import FakeGobgp
from kube2ipvs_bgp_speaker.plan import GlobalSpec, PeerSpec, Route, RouteSettings, canonical_communities
from tests.bgp_speaker_builders import cluster, ready

BGP = GlobalSpec(asn=64512, router_id="198.51.100.2")
TOR = PeerSpec("198.51.100.1", 64500, hold_time=9, keepalive=3, connect_retry=1)
ROUTES = RouteSettings(communities=canonical_communities(["64512:100", "64512:200"]))
NOW = 1000.0


def speaker(gobgp: FakeGobgp | None = None, **kw: Any) -> SpeakerApp:
    settings = SpeakerSettings(**{"routes": ROUTES, "bgp": BGP, "peers": (TOR,), **kw})
    return SpeakerApp(gobgp or FakeGobgp(), settings=settings, wall_clock=lambda: NOW)


def reconcile(app: SpeakerApp, state: ClusterState | None = None, director: Mapping[str, Any] | str | None = "keep",
              *, resync: bool = False) -> list[str]:
    if state is not None:
        app.offer(state)
    if not isinstance(director, str):
        app.judge_director(director)
    return asyncio.run(app.reconcile_once(resync=resync))


def rib(app: SpeakerApp) -> list[str]:
    assert isinstance(app.gobgp, FakeGobgp)
    return app.gobgp.rib_lines()


def test_nothing_is_touched_before_the_first_state_and_the_first_director_answer() -> None:
    gobgp = FakeGobgp()
    gobgp.bgp = BGP
    gobgp.add_by_hand(Route("192.0.2.10/32"))
    app = speaker(gobgp)
    reconcile(app)
    reconcile(app, cluster(1, ["192.0.2.11"]))  # a state, but the director unknown
    assert rib(app) == ["192.0.2.10/32 nexthop=self"]
    assert gobgp.batches == []
    assert app.health().reason == "the local director's readiness was not read yet"


def test_bgp_is_started_peers_added_and_served_vips_announced_with_every_community() -> None:
    app = speaker()
    done = reconcile(app, cluster(1, ["192.0.2.10", "2001:db8::10"]), ready(["192.0.2.10", "2001:db8::10"]))
    assert done == ["StartBgp as=64512 router-id=198.51.100.2", "AddPeer 198.51.100.1 as=64500",
                    "Announce 192.0.2.10/32 nexthop=self communities=64512:100,64512:200",
                    "Announce 2001:db8::10/128 nexthop=self communities=64512:100,64512:200"]
    assert app.gobgp.peer_conf == {TOR.address: TOR}  # type: ignore[attr-defined]
    assert reconcile(app, resync=True) == []  # converged: a resync changes nothing


def test_a_vip_leaving_the_config_or_losing_its_last_pod_is_withdrawn() -> None:
    app = speaker()
    reconcile(app, cluster(1, ["192.0.2.10", "192.0.2.11", "192.0.2.12"]),
              ready(["192.0.2.10", "192.0.2.11", "192.0.2.12"]))
    done = reconcile(app, cluster(2, ["192.0.2.10"], unserved=["192.0.2.12"]))
    assert done == ["Withdraw 192.0.2.11/32", "Withdraw 192.0.2.12/32"]
    assert rib(app) == ["192.0.2.10/32 nexthop=self communities=64512:100,64512:200"]


def test_a_vip_is_announced_only_once_the_director_serves_it() -> None:
    app = speaker()
    reconcile(app, cluster(1, ["192.0.2.10", "192.0.2.11"]), ready(["192.0.2.10"]))
    assert [line.split()[0] for line in rib(app)] == ["192.0.2.10/32"]
    assert reconcile(app, director=ready(["192.0.2.10", "192.0.2.11"])) == [
        "Announce 192.0.2.11/32 nexthop=self communities=64512:100,64512:200"]


@pytest.mark.parametrize("director", [ready(["192.0.2.10"], healthy=False, reason="x"),
                                      ready(["192.0.2.10"], at=NOW - 31)],
                         ids=["unhealthy", "stale"])
def test_everything_is_withdrawn_when_the_director_is_unhealthy_or_stale(director: Any) -> None:
    app = speaker()
    reconcile(app, cluster(1, ["192.0.2.10", "192.0.2.11"]), ready(["192.0.2.10", "192.0.2.11"]))
    assert reconcile(app, director=director) == ["Withdraw 192.0.2.10/32", "Withdraw 192.0.2.11/32"]
    assert rib(app) == []
    assert app.health().ok  # the speaker does its job; /healthz says why nothing is announced
    assert app.health().detail["director"] == app.verdict.reason != ""  # type: ignore[union-attr]
    assert reconcile(app, director=ready(["192.0.2.10", "192.0.2.11"])) == [
        "Announce 192.0.2.10/32 nexthop=self communities=64512:100,64512:200",
        "Announce 192.0.2.11/32 nexthop=self communities=64512:100,64512:200"]


def test_a_readiness_that_disappears_is_no_news_until_the_last_one_goes_stale() -> None:
    """A document expires (TTL) only once stale anyway, and a nats-server restart hands back an
    empty board until the director publishes again: absence alone withdraws nothing."""
    now = [NOW]
    app = SpeakerApp(FakeGobgp(), settings=SpeakerSettings(routes=ROUTES, bgp=BGP, peers=(TOR,)),
                     wall_clock=lambda: now[0])
    reconcile(app, cluster(1, ["192.0.2.10", "192.0.2.11"]), ready(["192.0.2.10", "192.0.2.11"]))
    assert reconcile(app, director=None) == []
    assert len(rib(app)) == 2
    now[0] += 31  # the last readiness is now older than --director-stale (30 s)
    assert reconcile(app, director=None) == ["Withdraw 192.0.2.10/32", "Withdraw 192.0.2.11/32"]
    assert "old" in app.health().detail["director"]


def test_a_director_that_never_published_gets_nothing_announced() -> None:
    app = speaker()
    done = reconcile(app, cluster(1, ["192.0.2.10"]), None)
    assert not [op for op in done if op.startswith("Announce")]
    assert rib(app) == []
    assert "no readiness" in app.health().detail["director"]


def test_paths_we_do_not_own_stay_exactly_as_they_are() -> None:
    gobgp = FakeGobgp()
    app = speaker(gobgp)
    reconcile(app, cluster(1, ["192.0.2.10"]), ready(["192.0.2.10"]))
    gobgp.add_by_hand(Route("203.0.113.50/32"))
    gobgp.add_by_hand(Route("10.0.0.0/8"))
    reconcile(app, director=ready(["192.0.2.10"], healthy=False), resync=True)
    assert rib(app) == ["10.0.0.0/8 nexthop=self", "203.0.113.50/32 nexthop=self"]


def test_a_path_deleted_or_changed_by_hand_is_repaired_by_the_next_resync_and_counted() -> None:
    gobgp = FakeGobgp()
    app = speaker(gobgp)
    reconcile(app, cluster(1, ["192.0.2.10", "192.0.2.11"]), ready(["192.0.2.10", "192.0.2.11"]))
    before = rib(app)
    gobgp.delete_by_hand("192.0.2.10/32")
    gobgp.add_by_hand(Route("192.0.2.11/32"))  # same prefix, our communities gone
    assert reconcile(app) == []  # a change-path reconcile trusts what it last applied
    assert len(reconcile(app, resync=True)) == 2
    assert rib(app) == before
    assert "kube2ipvs_bgp_speaker_drift_repairs_total 2.0" in generate_latest(app.registry).decode()


def test_a_gobgpd_restart_is_seen_then_everything_is_pushed_again_once_it_answers() -> None:
    gobgp = FakeGobgp()
    app = speaker(gobgp)
    reconcile(app, cluster(1, ["192.0.2.10"]), ready(["192.0.2.10"]))
    before = (gobgp.bgp, dict(gobgp.peer_conf), rib(app))
    gobgp.stop()
    reconcile(app, resync=True)
    health = app.health()
    assert not health.ok
    assert health.reason.startswith("gobgpd unreachable: GetBgp: gobgpd unreachable (unavailable)")
    gobgp.start_again()
    done = reconcile(app)
    assert done[:2] == ["StartBgp as=64512 router-id=198.51.100.2", "AddPeer 198.51.100.1 as=64500"]
    assert (gobgp.bgp, dict(gobgp.peer_conf), rib(app)) == before
    assert app.gobgpd_error is None


def test_gobgpd_restarting_between_two_calls_is_started_again_on_the_next_reconcile() -> None:
    gobgp = FakeGobgp()
    app = speaker(gobgp)
    reconcile(app, cluster(1, ["192.0.2.10"]), ready(["192.0.2.10"]))
    gobgp.stop()
    gobgp.start_again()  # too fast for anyone to notice: only its empty state tells
    reconcile(app, cluster(2, ["192.0.2.10", "192.0.2.11"]), ready(["192.0.2.10", "192.0.2.11"]))
    assert app.apply_error is not None
    assert "bgp server hasn't started yet" in app.apply_error
    reconcile(app)
    assert len(rib(app)) == 2
    assert app.health().ok


def test_a_refused_announcement_is_reported_and_retried_from_a_fresh_read() -> None:
    gobgp = FakeGobgp()
    app = speaker(gobgp)
    reconcile(app, cluster(1, ["192.0.2.10"]), ready(["192.0.2.10", "192.0.2.11"]))
    gobgp.fail.append(GobgpRejectedError("AddPath", "nexthop not found"))
    reconcile(app, cluster(2, ["192.0.2.10", "192.0.2.11"]))
    assert app.health().reason == "last apply failed: AddPath: nexthop not found"
    assert "kube2ipvs_bgp_speaker_errors_total{kind=\"rejected\"} 1.0" in generate_latest(app.registry).decode()
    calls = len(gobgp.calls)
    reconcile(app)
    assert "ListPath" in gobgp.calls[calls:]
    assert app.health().ok


def test_an_existing_gobgpd_configuration_is_used_and_a_different_one_is_reported() -> None:
    gobgp = FakeGobgp()
    gobgp.bgp = GlobalSpec(asn=65000, router_id="203.0.113.1")
    app = speaker(gobgp)
    reconcile(app, cluster(1, ["192.0.2.10"]), ready(["192.0.2.10"]))
    assert "StartBgp" not in gobgp.calls  # a second StartBgp would fail in gobgpd
    assert app.health().reason.startswith("gobgpd runs AS 65000 router-id 203.0.113.1, configured AS 64512")
    assert len(rib(app)) == 1  # the routes go out all the same


def test_without_local_as_gobgpd_conf_starts_bgp_and_the_speaker_only_waits_for_it() -> None:
    gobgp = FakeGobgp()
    app = speaker(gobgp, bgp=None, peers=())
    reconcile(app, cluster(1, ["192.0.2.10"]), ready(["192.0.2.10"]))
    assert "StartBgp" not in gobgp.calls
    assert "gobgpd has not started BGP" in app.health().reason
    gobgp.bgp = BGP  # gobgpd.conf loaded
    reconcile(app)
    assert len(rib(app)) == 1
    assert "AddPeer" not in gobgp.calls


def test_a_peer_changed_by_hand_is_set_back() -> None:
    gobgp = FakeGobgp()
    app = speaker(gobgp)
    reconcile(app, cluster(1, ["192.0.2.10"]), ready(["192.0.2.10"]))
    gobgp.peer_conf[TOR.address] = PeerSpec(TOR.address, 64999)
    assert reconcile(app, resync=True) == ["UpdatePeer 198.51.100.1 as=64500"]
    assert gobgp.peer_conf[TOR.address] == TOR


def test_shutdown_withdraws_our_routes_after_a_graceful_shutdown_round() -> None:
    gobgp = FakeGobgp()
    app = speaker(gobgp, graceful_shutdown=True, shutdown_delay=0.01)
    reconcile(app, cluster(1, ["192.0.2.10"]), ready(["192.0.2.10"]))
    gobgp.add_by_hand(Route("203.0.113.50/32"))
    gobgp.batches.clear()
    asyncio.run(app.withdraw_all())
    assert [[str(op) for op in batch] for batch in gobgp.batches] == [
        ["Announce 192.0.2.10/32 nexthop=self communities=64512:100,64512:200,65535:0"],
        ["Withdraw 192.0.2.10/32"],
    ]
    assert rib(app) == ["203.0.113.50/32 nexthop=self"]


def test_cleanup_withdraws_every_host_route_and_deletes_our_peers() -> None:
    gobgp = FakeGobgp()
    app = speaker(gobgp)
    reconcile(app, cluster(1, ["192.0.2.10"]), ready(["192.0.2.10"]))
    gobgp.add_by_hand(Route("10.0.0.0/8"))
    done = asyncio.run(cleanup(gobgp, (TOR, PeerSpec("198.51.100.9", 1))))
    assert done == ["Withdraw 192.0.2.10/32", "DeletePeer 198.51.100.1"]
    assert rib(app) == ["10.0.0.0/8 nexthop=self"]
    assert gobgp.peer_conf == {}


def test_health_config_and_metrics_show_peers_routes_and_the_bgp_lines() -> None:
    gobgp = FakeGobgp()
    app = speaker(gobgp)
    reconcile(app, cluster(7, ["192.0.2.10", "2001:db8::10"]), ready(["192.0.2.10", "2001:db8::10"]))
    app.peer_state(TOR.address, "active")
    assert app.health().reason == "no BGP peer established"
    app.peer_state(TOR.address, "established")
    health = app.health()
    assert health.ok
    assert (health.detail["peers"], health.detail["peers_established"]) == ({TOR.address: "established"}, 1)
    assert (health.detail["routes_desired"], health.detail["routes_announced"]) == (2, 2)
    lines = app.config({"format": "bgp"})
    assert lines.body == ("192.0.2.10/32 nexthop=self communities=64512:100,64512:200\n"
                          "2001:db8::10/128 nexthop=self communities=64512:100,64512:200\n")
    doc = json.loads(app.config({}).body)
    assert doc["generation"] == 7
    assert doc["routes"] == lines.body.splitlines()
    assert doc["peers"][0]["state"] == "established"
    metrics = generate_latest(app.registry).decode()
    for line in ('kube2ipvs_bgp_speaker_peers{state="established"} 1.0',
                 'kube2ipvs_bgp_speaker_peer_established{peer="198.51.100.1"} 1.0',
                 "kube2ipvs_bgp_speaker_routes_desired 2.0", "kube2ipvs_bgp_speaker_routes_announced 2.0",
                 "kube2ipvs_bgp_speaker_director_ready 1.0", 'kube2ipvs_bgp_speaker_changes_total{op="Announce"} 2.0'):
        assert line in metrics
    with pytest.raises(ValueError, match="format must be one of"):
        app.config({"format": "nft"})


class Source:
    def __init__(self) -> None:
        self.queue: asyncio.Queue[ClusterState] = asyncio.Queue()
        self.connected = True
        self.status = "in sync"
        self.rejected: dict[str, str] = {}

    async def states(self) -> AsyncIterator[ClusterState]:
        while True:
            yield await self.queue.get()


class Director:
    def __init__(self) -> None:
        self.doc: Mapping[str, Any] | None = None
        self.reads = 0

    async def read(self) -> Mapping[str, Any] | None:
        self.reads += 1
        return self.doc


async def until(app: SpeakerApp, test: Any, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not test():
            app.reconciled.clear()
            await app.reconciled.wait()


def test_the_loop_follows_state_director_and_peer_events_and_comes_back_after_a_gobgpd_restart() -> None:
    async def scenario() -> None:
        gobgp, source, director = FakeGobgp(), Source(), Director()
        app = SpeakerApp(gobgp, source=source, director=director, wall_clock=lambda: NOW,
                         settings=SpeakerSettings(routes=ROUTES, bgp=BGP, peers=(TOR,), resync_interval=0.2,
                                                  readiness_interval=0.01, retry_min=0.01, retry_max=0.05))
        task = asyncio.create_task(app.run())
        try:
            director.doc = ready(["192.0.2.10"])
            source.queue.put_nowait(cluster(1, ["192.0.2.10"]))
            await until(app, lambda: len(gobgp.paths) == 1)
            gobgp.set_session(TOR.address, "established")
            await until(app, lambda: app.peers.get(TOR.address) == "established")

            director.doc = ready(["192.0.2.10"], healthy=False)
            await until(app, lambda: not gobgp.paths)

            director.doc = ready(["192.0.2.10"])
            await until(app, lambda: len(gobgp.paths) == 1)
            gobgp.delete_by_hand("192.0.2.10/32")
            await until(app, lambda: len(gobgp.paths) == 1)  # the next resync (0.2 s)

            gobgp.stop()
            await until(app, lambda: app.gobgpd_error is not None)
            assert app.peers == {}
            gobgp.start_again()
            await until(app, lambda: len(gobgp.paths) == 1 and app.gobgpd_error is None)
            assert gobgp.peer_conf == {TOR.address: TOR}
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    asyncio.run(scenario())


def test_the_part_of_a_batch_gobgpd_took_before_a_refusal_counts_as_done() -> None:
    gobgp = FakeGobgp()
    app = speaker(gobgp)
    reconcile(app, cluster(1, ["192.0.2.10", "192.0.2.11"]), ready(["192.0.2.10", "192.0.2.11"]))
    gobgp.refuse["192.0.2.11/32"] = GobgpRejectedError("DeletePath", "refused")
    done = reconcile(app, director=ready(["192.0.2.10", "192.0.2.11"], healthy=False))
    assert done == ["Withdraw 192.0.2.10/32"]
    assert app.apply_error == "DeletePath: refused"
    assert app.announced == frozenset({"192.0.2.11/32"})
    assert [line.split()[0] for line in rib(app)] == ["192.0.2.11/32"]
    del gobgp.refuse["192.0.2.11/32"]
    assert reconcile(app) == ["Withdraw 192.0.2.11/32"]


class WatchedDirector(Director):
    """A readiness source that can be watched, as the status board can: the speaker follows it
    instead of polling `read()`."""

    def __init__(self) -> None:
        super().__init__()
        self.updates: asyncio.Queue[Mapping[str, Any] | None] = asyncio.Queue()
        self.watches = 0

    async def watch(self) -> AsyncIterator[Mapping[str, Any] | None]:
        self.watches += 1
        yield self.doc
        while True:
            doc = await self.updates.get()
            if doc is END:
                return  # the connection went: the speaker watches again
            yield doc

    def put(self, doc: Mapping[str, Any] | None) -> None:
        self.doc = doc
        self.updates.put_nowait(doc)


END: Mapping[str, Any] = {"end": True}


def test_a_watched_director_is_followed_without_polling_and_goes_stale_when_it_stops_publishing() -> None:
    async def scenario() -> None:
        now = [NOW]
        gobgp, source, director = FakeGobgp(), Source(), WatchedDirector()
        app = SpeakerApp(gobgp, source=source, director=director, wall_clock=lambda: now[0],
                         settings=SpeakerSettings(routes=ROUTES, bgp=BGP, peers=(TOR,), resync_interval=5,
                                                  readiness_interval=0.01, retry_min=0.01, retry_max=0.05,
                                                  director_stale=30.0))
        task = asyncio.create_task(app.run())
        try:
            director.put(ready(["192.0.2.10"]))
            source.queue.put_nowait(cluster(1, ["192.0.2.10"]))
            await until(app, lambda: len(gobgp.paths) == 1)
            director.put(ready(["192.0.2.10"], healthy=False))
            await until(app, lambda: not gobgp.paths)
            director.put(ready(["192.0.2.10"]))
            await until(app, lambda: len(gobgp.paths) == 1)
            assert director.reads == 0  # followed, never polled
            director.updates.put_nowait(END)  # the watch breaks: watched again, the verdict kept
            await asyncio.sleep(0.1)
            assert director.watches >= 2
            assert len(gobgp.paths) == 1
            now[0] += 31  # no readiness for longer than director_stale: withdrawn at the next look
            await until(app, lambda: not gobgp.paths, timeout=5)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    asyncio.run(scenario())
