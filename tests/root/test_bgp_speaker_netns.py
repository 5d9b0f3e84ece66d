"""The bgp-speaker against a real gobgpd (Debian's) with FRR as the top-of-rack router, and a
real nats-server carrying the cluster state and the director's readiness (tests/root/bgpfixtures.py).
What is checked is what the router learned: FRR's RIB, read as JSON through vtysh."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kube2ipvs.natskv import NatsSettings
from kube2ipvs_bgp_speaker.app import SpeakerSettings
from kube2ipvs_bgp_speaker.errors import (
    ApplyError,
    GobgpExistsError,
    GobgpNotFoundError,
    GobgpNotStartedError,
    GobgpRejectedError,
    GobgpUnavailableError,
)
from kube2ipvs_bgp_speaker.gobgp import GobgpClient
from kube2ipvs_bgp_speaker.plan import (
    Announce,
    GlobalSpec,
    PeerSpec,
    Route,
    RouteSettings,
    Withdraw,
    canonical_communities,
)
from tests.bgp_speaker_builders import cluster as cluster_state
from tests.natsfixture import running_nats_server
from tests.root.bgpfixtures import (
    BGP,
    PEERS,
    SPK4,
    SPK6,
    TOR4,
    TOR6,
    BgpLab,
    cluster,
    communities_of,
    missing_tools,
    new_lab,
    nexthop_of,
    running_speaker,
)

pytestmark = pytest.mark.root

COMMUNITIES = canonical_communities(["64512:100", "64512:200", "no-export", "64512:1:2"])
FAST = {"resync_interval": 1.0, "readiness_interval": 0.05, "retry_min": 0.05, "retry_max": 0.5}


@pytest.fixture(scope="module")
def lab() -> Iterator[BgpLab]:
    if os.geteuid() != 0:
        pytest.skip("needs root: creates network namespaces")
    if missing := missing_tools():
        pytest.skip(f"needs {', '.join(missing)} (apt-get install gobgpd frr)")
    created = new_lab()
    try:
        yield created
    finally:
        created.close()


@pytest.fixture
def gobgpd(lab: BgpLab) -> Iterator[BgpLab]:
    """A fresh gobgpd (nothing configured) for each test."""
    lab.start_gobgpd()
    try:
        yield lab
    finally:
        lab.kill_gobgpd()


@pytest.fixture
def nats(tmp_path: Path) -> Iterator[NatsSettings]:
    with running_nats_server(tmp_path / "nats") as server:
        yield NatsSettings(servers=(server.url,), reconnect_wait=0.1, connect_timeout=1.0, request_timeout=2.0)


def speaker_settings(**kw: Any) -> SpeakerSettings:
    return SpeakerSettings(**{"routes": RouteSettings(communities=COMMUNITIES, med=10), "bgp": BGP, "peers": PEERS,
                              **FAST, **kw})


def test_a_vip_in_the_state_reaches_the_routers_rib_with_our_next_hop_and_communities_and_leaves_when_removed(
    gobgpd: BgpLab, nats: NatsSettings,
) -> None:
    lab = gobgpd

    async def scenario() -> None:
        async with cluster(nats) as c, running_speaker(lab.api, nats, speaker_settings()) as app:
            await c.director(["192.0.2.10", "192.0.2.11", "2001:db8::10"])
            await c.publish(cluster_state(1, ["192.0.2.10", "192.0.2.11", "2001:db8::10"]))
            path = await lab.until(lambda: lab.route("192.0.2.10/32"), lambda p: p is not None, timeout=15)
            assert nexthop_of(path) == SPK4  # next hop "self": gobgpd's address toward FRR
            assert communities_of(path) == ["64512:100", "64512:200", "noExport", "64512:1:2"]
            assert (path["metric"], path["aspath"]["string"], path["origin"]) == (10, "64512", "IGP")
            path6 = await lab.until(lambda: lab.route("2001:db8::10/128"), lambda p: p is not None, timeout=15)
            assert nexthop_of(path6) == SPK6
            assert communities_of(path6) == communities_of(path)
            await lab.until(lab.established, lambda peers: peers == {SPK4, SPK6})
            await lab.until(lambda: asyncio.sleep(0, app.health()), lambda h: h.ok)
            assert app.health().detail["peers"] == {TOR4: "established", TOR6: "established"}
            assert app.config({"format": "bgp"}).body == (
                "192.0.2.10/32 nexthop=self communities=64512:100,64512:200,no-export,64512:1:2 med=10\n"
                "192.0.2.11/32 nexthop=self communities=64512:100,64512:200,no-export,64512:1:2 med=10\n"
                "2001:db8::10/128 nexthop=self communities=64512:100,64512:200,no-export,64512:1:2 med=10\n")

            # .10 leaves the configuration, .11 loses its last pod.
            await c.publish(cluster_state(2, ["2001:db8::10"], unserved=["192.0.2.11"]))
            await lab.until(lab.rib, lambda rib: rib == {})
            assert set(await lab.rib(v6=True)) == {"2001:db8::10/128"}
        # The speaker stopped: it withdrew what it announced.
        await lab.until(lambda: lab.rib(v6=True), lambda rib: rib == {})

    asyncio.run(scenario())


def test_an_unhealthy_or_silent_director_gets_every_route_withdrawn_and_a_ready_one_gets_them_back(
    gobgpd: BgpLab, nats: NatsSettings,
) -> None:
    lab = gobgpd
    vips = ["192.0.2.10", "192.0.2.11"]

    async def scenario() -> None:
        async with cluster(nats) as c, running_speaker(lab.api, nats, speaker_settings(director_stale=1.5)) as app:
            await c.director(vips)
            await c.publish(cluster_state(1, vips))
            await lab.until(lab.rib, lambda rib: set(rib) == {"192.0.2.10/32", "192.0.2.11/32"}, 15)

            await c.director(vips, healthy=False)
            await lab.until(lab.rib, lambda rib: rib == {})
            assert app.health().detail["director"].startswith("the director is unhealthy")

            await c.director(vips)
            await lab.until(lab.rib, lambda rib: len(rib) == 2)
            # The director stops refreshing its readiness: stale after 1.5 s.
            await lab.until(lab.rib, lambda rib: rib == {}, timeout=5)
            assert "old (limit 1.5s)" in app.health().detail["director"]

    asyncio.run(scenario())


def test_a_route_deleted_with_gobgp_global_rib_del_is_back_within_the_resync_interval(
    gobgpd: BgpLab, nats: NatsSettings,
) -> None:
    lab = gobgpd

    async def scenario() -> None:
        async with cluster(nats) as c, running_speaker(lab.api, nats, speaker_settings(resync_interval=2.0)) as app:
            await c.director(["192.0.2.10"])
            await c.publish(cluster_state(1, ["192.0.2.10"]))
            before = await lab.until(lambda: lab.route("192.0.2.10/32"), lambda p: p is not None, timeout=15)
            await lab.until(lambda: asyncio.sleep(0, app.health()), lambda h: h.ok)
            await asyncio.to_thread(lab.gobgp, "global", "rib", "-a", "ipv4", "del", "192.0.2.10/32")
            deleted = time.monotonic()
            # Only a resync that found the path missing announces it again while nothing else
            # changed: that is what the drift counter counts.
            drift = "kube2ipvs_bgp_speaker_drift_repairs_total"
            await lab.until(lambda: asyncio.sleep(0, app.registry.get_sample_value(drift)), lambda n: n == 1,
                            timeout=4)
            assert time.monotonic() - deleted < 2.0 + 0.5  # within the resync interval
            # FRR numbers every change of its table: withdrawn and announced again, the path
            # comes back with a higher version.
            path = await lab.until(lambda: lab.route("192.0.2.10/32"),
                                   lambda p: p is not None and p["version"] > before["version"], timeout=2)
            assert communities_of(path) == ["64512:100", "64512:200", "noExport", "64512:1:2"]
            rib = await asyncio.to_thread(lab.gobgp, "global", "rib", "-a", "ipv4")
            assert "192.0.2.10/32" in rib

    asyncio.run(scenario())


def test_gobgpd_killed_and_restarted_gets_its_peers_and_routes_back(gobgpd: BgpLab, nats: NatsSettings) -> None:
    lab = gobgpd

    async def scenario() -> None:
        async with cluster(nats) as c, running_speaker(lab.api, nats, speaker_settings()) as app:
            await c.director(["192.0.2.10", "2001:db8::10"])
            await c.publish(cluster_state(1, ["192.0.2.10", "2001:db8::10"]))
            await lab.until(lab.rib, lambda rib: set(rib) == {"192.0.2.10/32"}, timeout=15)
            await lab.until(lambda: lab.rib(v6=True), lambda rib: set(rib) == {"2001:db8::10/128"}, timeout=15)

            lab.kill_gobgpd()
            await lab.until(lab.rib, lambda rib: rib == {})  # the session went down with it
            await lab.until(lambda: asyncio.sleep(0, app.health()), lambda h: not h.ok)
            assert app.health().reason.startswith("gobgpd unreachable")

            lab.start_gobgpd()
            await lab.until(lab.rib, lambda rib: set(rib) == {"192.0.2.10/32"}, timeout=15)
            await lab.until(lambda: lab.rib(v6=True), lambda rib: set(rib) == {"2001:db8::10/128"}, timeout=15)
            await lab.until(lambda: asyncio.sleep(0, app.health()), lambda h: h.ok)

    asyncio.run(scenario())


def test_a_real_gobgpds_refusals_arrive_as_the_projects_error_kinds(gobgpd: BgpLab, tmp_path: Path) -> None:
    lab = gobgpd

    async def scenario() -> None:
        client = GobgpClient(lab.api)
        try:
            assert await client.get_global() is None
            with pytest.raises(ApplyError) as failed:
                await client.apply([Announce(Route("192.0.2.10/32"))])
            assert isinstance(failed.value.cause, GobgpNotStartedError)
            assert failed.value.applied == ()
            with pytest.raises(GobgpRejectedError, match="invalid router-id format"):
                await client.start(GlobalSpec(asn=64512, router_id=""))
            await client.start(GlobalSpec(asn=64512, router_id=SPK4, listen_port=-1))
            assert await client.get_global() == GlobalSpec(64512, SPK4, -1, ("0.0.0.0", "::"))  # its defaults
            peer = PeerSpec("203.0.113.9", 64501, password="s3cret", multihop_ttl=2, passive=True)
            await client.add_peer(peer)
            with pytest.raises(GobgpExistsError, match=re.escape("can't overwrite the existing peer: 203.0.113.9")):
                await client.add_peer(peer)
            assert [p.spec for p in await client.list_peers()] == [peer]  # the configuration reads back equal
            missing = re.escape("can't delete a peer configuration for 203.0.113.10")
            with pytest.raises(GobgpNotFoundError, match=missing):
                await client.delete_peer("203.0.113.10")
            with pytest.raises(GobgpNotFoundError, match=re.escape("neighbor that has 203.0.113.10 doesn't exist")):
                await client.update_peer(PeerSpec("203.0.113.10", 64510))
            await client.delete_peer("203.0.113.9")
            await client.apply([Announce(Route("192.0.2.10/32", med=1)), Announce(Route("192.0.2.11/32"))])
            # Withdrawing a path gobgpd does not hold is no error.
            await client.apply([Withdraw(Route("192.0.2.11/32")), Withdraw(Route("192.0.2.99/32"))])
            assert await client.list_routes() == (Route("192.0.2.10/32", med=1),)
        finally:
            await client.close()
        nowhere = GobgpClient(f"unix://{tmp_path / 'no-gobgpd.sock'}", timeout=1.0)
        try:
            assert not await nowhere.wait_ready(0.3)
            with pytest.raises(GobgpUnavailableError, match="gobgpd unreachable"):
                await nowhere.get_global()
        finally:
            await nowhere.close()

    asyncio.run(scenario())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=2) as reply:
            body = reply.read().decode()
            return reply.status, json.loads(body) if reply.headers.get_content_type() == "application/json" else body
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read().decode())


def test_the_cli_speaker_serves_its_status_and_on_sigterm_shuts_down_gracefully_then_withdraws(
    gobgpd: BgpLab, nats: NatsSettings, tmp_path: Path,
) -> None:
    lab = gobgpd
    port = free_port()
    cmd = [sys.executable, "-m", "kube2ipvs.cli", "bgp-speaker", "--gobgpd", lab.api, "--local-as", "64512",
           "--router-id", SPK4, "--peer", f"{TOR4}@64500", "--hold-time", "9", "--keepalive", "3",
           "--connect-retry", "1", "--nexthop", "198.51.100.7", "--community", "64512:100", "--med", "5",
           "--graceful-shutdown", "--shutdown-delay", "1", "--readiness-interval", "0.1",
           "--nats", nats.servers[0], "--host-name", "dir-cli", "--listen", f"127.0.0.1:{port}"]
    log = (tmp_path / "speaker.log").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)

    async def scenario() -> None:
        async with cluster(nats, host="dir-cli") as c:
            await c.director(["192.0.2.10"])
            await c.publish(cluster_state(1, ["192.0.2.10"]))
            path = await lab.until(lambda: lab.route("192.0.2.10/32"), lambda p: p is not None, timeout=20)
            assert nexthop_of(path) == "198.51.100.7"  # the configured next hop, not gobgpd's address
            assert (communities_of(path), path["metric"]) == (["64512:100"], 5)
            health = await lab.until(lambda: asyncio.to_thread(get, f"http://127.0.0.1:{port}/healthz"),
                                     lambda h: h[0] == 200)
            assert (health[1]["routes_announced"], health[1]["peers"]) == (1, {TOR4: "established"})
            status, lines = await asyncio.to_thread(get, f"http://127.0.0.1:{port}/config?format=bgp")
            assert (status, lines) == (200, "192.0.2.10/32 nexthop=198.51.100.7 communities=64512:100 med=5\n")
            status, metrics = await asyncio.to_thread(get, f"http://127.0.0.1:{port}/metrics")
            assert 'kube2ipvs_bgp_speaker_peer_established{peer="198.51.100.1"} 1.0' in metrics

            proc.send_signal(signal.SIGTERM)
            stopped = time.monotonic()
            path = await lab.until(lambda: lab.route("192.0.2.10/32"),
                                   lambda p: p is None or "gracefulShutdown" in communities_of(p), timeout=5)
            assert path is not None
            assert communities_of(path) == ["64512:100", "gracefulShutdown"]
            assert path["locPrf"] == 0  # FRR acts on RFC 8326: least preferred while we drain
            await lab.until(lambda: lab.route("192.0.2.10/32"), lambda p: p is None, timeout=5)
            assert time.monotonic() - stopped >= 1.0  # --shutdown-delay
            assert await asyncio.to_thread(proc.wait, 10) == 0

    try:
        asyncio.run(scenario())
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)
        log.close()
    print((tmp_path / "speaker.log").read_text()[-3000:])


def test_cleanup_withdraws_gobgpds_host_routes_and_deletes_our_peers_only(gobgpd: BgpLab) -> None:
    lab = gobgpd
    peer = PeerSpec(TOR4, 64500, hold_time=9, keepalive=3, connect_retry=1)
    other = PeerSpec("198.51.100.9", 64509)

    async def prepare() -> None:
        client = GobgpClient(lab.api)
        try:
            await client.start(GlobalSpec(asn=64512, router_id=SPK4))
            await client.add_peer(peer)
            await client.add_peer(other)
            await client.apply([Announce(Route("192.0.2.10/32")), Announce(Route("2001:db8::10/128")),
                                Announce(Route("192.0.2.0/24"))])
        finally:
            await client.close()

    asyncio.run(prepare())
    done = subprocess.run([sys.executable, "-m", "kube2ipvs.cli", "bgp-speaker", "--cleanup", "--gobgpd", lab.api,
                           "--local-as", "64512", "--router-id", SPK4, "--peer", f"{TOR4}@64500"],
                          capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    assert "event=cleaned_up removed=3" in done.stderr
    assert "192.0.2.0/24" in lab.gobgp("global", "rib", "-a", "ipv4")  # not a VIP route: not ours
    assert "Network not in table" in lab.gobgp("global", "rib", "-a", "ipv6")
    neighbors = lab.gobgp("neighbor")
    assert "198.51.100.9" in neighbors
    assert TOR4 not in neighbors


GOBGPD_CONF = f"""
[global.config]
  as = 64512
  router-id = "{SPK4}"
[[neighbors]]
  [neighbors.config]
    neighbor-address = "{TOR4}"
    peer-as = 64500
  [neighbors.timers.config]
    connect-retry = 5
    hold-time = 9
    keepalive-interval = 3
"""


def test_with_an_operators_gobgpd_conf_the_speaker_only_announces(lab: BgpLab, nats: NatsSettings) -> None:
    lab.start_gobgpd(config=GOBGPD_CONF)
    try:
        async def scenario() -> None:
            settings = speaker_settings(bgp=None, peers=())
            async with cluster(nats) as c, running_speaker(lab.api, nats, settings) as app:
                await c.director(["192.0.2.10"])
                await c.publish(cluster_state(1, ["192.0.2.10"]))
                path = await lab.until(lambda: lab.route("192.0.2.10/32"), lambda p: p is not None, timeout=20)
                assert nexthop_of(path) == SPK4
                await lab.until(lambda: asyncio.sleep(0, app.health()), lambda h: h.ok)
                client = GobgpClient(lab.api)
                try:
                    # gobgpd.conf's neighbour only: the speaker added none.
                    assert [p.spec.address for p in await client.list_peers()] == [TOR4]
                finally:
                    await client.close()

        asyncio.run(scenario())
    finally:
        lab.kill_gobgpd()
