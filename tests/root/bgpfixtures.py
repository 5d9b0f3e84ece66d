"""A real gobgpd and an FRR top-of-rack router in throw-away namespaces, for the bgp-speaker's
root tests and its benchmark (bench/bench_bgp.py). Needs root, gobgpd and FRR (bgpd, vtysh).

    speaker netns  s0 198.51.100.2/24, 2001:db8:100::2/64   gobgpd, AS 64512
        │ veth
    tor netns      t0 198.51.100.1/24, 2001:db8:100::1/64   FRR bgpd -Z (no zebra), AS 64500

gobgpd serves its gRPC API on a unix socket (a file, so the speaker under test can run in the
test process, in the root namespace, without any link into it) and on 127.0.0.1:50051 inside
the speaker namespace for the `gobgp` CLI. FRR connects to gobgpd every second (`timers connect
1`; gobgpd's own outbound connects wait 5-10 s) and needs `no bgp ebgp-requires-policy` to take
routes without a policy. Its RIB is read as JSON through vtysh on FRR's vty socket directory.

Only the namespaces named with this process' prefix are created and deleted, only the processes
started here are stopped (by PID), and no packet leaves the two namespaces.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from kube2ipvs.lab import end_process
from kube2ipvs.model import ClusterState
from kube2ipvs.natskv import KVPublisher, NatsSettings, StateSubscriber, StatusBoard
from kube2ipvs.protocol import Encoded, encode_state, plan_writes
from kube2ipvs_bgp_speaker.app import SpeakerApp, SpeakerSettings
from kube2ipvs_bgp_speaker.gobgp import GobgpClient
from kube2ipvs_bgp_speaker.main import BoardDirector
from kube2ipvs_bgp_speaker.plan import GlobalSpec, PeerSpec

PREFIX: Final = f"k2ibgp-{os.getpid()}-"
SPK4, TOR4 = "198.51.100.2", "198.51.100.1"
SPK6, TOR6 = "2001:db8:100::2", "2001:db8:100::1"
SPEAKER_AS, TOR_AS = 64512, 64500
FRR_BGPD: Final = "/usr/lib/frr/bgpd"
TOOLS: Final = ("ip", "gobgpd", "gobgp", "vtysh", FRR_BGPD)

BGP = GlobalSpec(asn=SPEAKER_AS, router_id=SPK4)
PEERS = (PeerSpec(TOR4, TOR_AS, hold_time=9, keepalive=3, connect_retry=1),
         PeerSpec(TOR6, TOR_AS, hold_time=9, keepalive=3, connect_retry=1, ipv4=False, ipv6=True))

FRR_CONF = f"""frr defaults traditional
hostname k2ibgp-tor
router bgp {TOR_AS}
 bgp router-id {TOR4}
 no bgp ebgp-requires-policy
 no bgp network import-check
 timers bgp 3 9
 neighbor {SPK4} remote-as {SPEAKER_AS}
 neighbor {SPK4} timers connect 1
 neighbor {SPK6} remote-as {SPEAKER_AS}
 neighbor {SPK6} timers connect 1
 address-family ipv4 unicast
  neighbor {SPK4} activate
  no neighbor {SPK6} activate
 exit-address-family
 address-family ipv6 unicast
  neighbor {SPK6} activate
 exit-address-family
"""


def missing_tools() -> list[str]:
    return [t for t in TOOLS if shutil.which(t) is None and not os.access(t, os.X_OK)]


def sh(*cmd: str, timeout: float = 20) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {done.returncode}: {done.stderr.strip()}")
    return done.stdout


@dataclass
class BgpLab:
    workdir: Path
    spk: str = PREFIX + "spk"
    tor: str = PREFIX + "tor"
    gobgpd: subprocess.Popen[bytes] | None = None
    frr: subprocess.Popen[bytes] | None = None
    log_updates: bool = False  # FRR logs each UPDATE it receives (bench: the arrival time)
    namespaces: list[str] = field(default_factory=list)

    @property
    def api(self) -> str:
        return f"unix://{self.workdir / 'gobgpd.sock'}"

    @property
    def vty(self) -> str:
        return str(self.workdir / "frrvty")

    def up(self) -> None:
        for ns in (self.spk, self.tor):
            sh("ip", "netns", "add", ns)
            self.namespaces.append(ns)
            sh("ip", "-n", ns, "link", "set", "dev", "lo", "up")
        sh("ip", "-n", self.spk, "link", "add", "name", "s0", "type", "veth", "peer", "name", "t0", "netns", self.tor)
        for ns, dev, v4, v6 in ((self.spk, "s0", SPK4, SPK6), (self.tor, "t0", TOR4, TOR6)):
            sh("ip", "-n", ns, "addr", "add", f"{v4}/24", "dev", dev)
            sh("ip", "-n", ns, "addr", "add", f"{v6}/64", "dev", dev, "nodad")
            sh("ip", "-n", ns, "link", "set", "dev", dev, "up")
        os.makedirs(self.vty, exist_ok=True)
        conf = self.workdir / "frr.conf"
        debug = "log stdout debugging\ndebug bgp updates in\n" if self.log_updates else ""
        conf.write_text(FRR_CONF.replace("router bgp", debug + "router bgp", 1))
        self.frr = subprocess.Popen(
            ["ip", "netns", "exec", self.tor, FRR_BGPD, "-Z", "-S", "-f", str(conf), "-i",
             str(self.workdir / "frr.pid"), "--vty_socket", self.vty, "-P", "0"],
            stdout=(self.workdir / "frr.log").open("ab"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while subprocess.run(["vtysh", "--vty_socket", self.vty, "-c", "show bgp summary"], capture_output=True,
                             check=False).returncode != 0:
            if time.monotonic() > deadline or self.frr.poll() is not None:
                raise RuntimeError(f"FRR did not start: {(self.workdir / 'frr.log').read_text()[-2000:]}")
            time.sleep(0.05)

    def start_gobgpd(self, config: str | None = None) -> None:
        """gobgpd without configuration (the speaker configures it), or with `config` (TOML,
        an operator's gobgpd.conf)."""
        assert self.gobgpd is None or self.gobgpd.poll() is not None, "gobgpd is running"
        sock = self.workdir / "gobgpd.sock"
        sock.unlink(missing_ok=True)
        conf: list[str] = []
        if config is not None:
            (self.workdir / "gobgpd.conf").write_text(config)
            conf = ["-f", str(self.workdir / "gobgpd.conf")]
        # `ip netns exec` execs gobgpd: this PID is gobgpd's.
        self.gobgpd = subprocess.Popen(
            ["ip", "netns", "exec", self.spk, "gobgpd", "--pprof-disable", "--log-level", "info",
             f"--api-hosts={self.api},127.0.0.1:50051", *conf],
            stdout=(self.workdir / "gobgpd.log").open("ab"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not sock.exists():
            if time.monotonic() > deadline or self.gobgpd.poll() is not None:
                raise RuntimeError(f"gobgpd did not start: {self.gobgpd_log()}")
            time.sleep(0.01)

    def kill_gobgpd(self) -> None:
        """SIGKILL: no goodbye to the peers, as a crash."""
        if self.gobgpd is not None and self.gobgpd.poll() is None:
            self.gobgpd.send_signal(signal.SIGKILL)
            self.gobgpd.wait(timeout=10)

    def gobgpd_log(self) -> str:
        try:
            return (self.workdir / "gobgpd.log").read_text()[-2000:]
        except OSError:
            return "(no log)"

    def gobgp(self, *args: str) -> str:
        """The gobgp CLI inside the speaker namespace (the operator's tool)."""
        return sh("ip", "netns", "exec", self.spk, "gobgp", *args)

    def close(self) -> None:
        for proc in (self.gobgpd, self.frr):
            if proc is not None:
                end_process(proc, grace=5)
        for ns in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        self.namespaces.clear()
        shutil.rmtree(self.workdir, ignore_errors=True)

    # -- FRR's view (async: the speaker under test shares the event loop) ----------------

    async def vtysh(self, command: str) -> Any:
        proc = await asyncio.create_subprocess_exec("vtysh", "--vty_socket", self.vty, "-c", command,
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"vtysh -c {command!r}: {err.decode().strip()}")
        return json.loads(out or b"{}")

    async def rib(self, v6: bool = False) -> dict[str, Any]:
        """FRR's best path per prefix: {prefix: path} (the JSON of `show bgp ... json`)."""
        doc = await self.vtysh(f"show bgp {'ipv6' if v6 else 'ipv4'} unicast json")
        return {prefix: next((p for p in paths if p.get("bestpath")), paths[0])
                for prefix, paths in (doc.get("routes") or {}).items()}

    async def route(self, prefix: str) -> dict[str, Any] | None:
        """The best path of `prefix` with every detail (next hops, communities), or None."""
        doc = await self.vtysh(f"show bgp {'ipv6' if ':' in prefix else 'ipv4'} unicast {prefix} json")
        paths = doc.get("paths") or []
        return next((p for p in paths if p.get("bestpath", {}).get("overall")), paths[0] if paths else None)

    async def established(self) -> set[str]:
        doc = await self.vtysh("show bgp neighbors json")
        return {addr for addr, n in doc.items() if isinstance(n, dict) and n.get("bgpState") == "Established"}

    async def until(self, read: Callable[[], Any], test: Callable[[Any], bool], timeout: float = 10.0,
                    every: float = 0.02) -> Any:
        """Re-read until `test` holds; the value. TimeoutError with the last value otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            value = await read()
            if test(value):
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"still {value!r} after {timeout}s; gobgpd log:\n{self.gobgpd_log()}")
            await asyncio.sleep(every)


def communities_of(path: Mapping[str, Any]) -> list[str]:
    return list(path.get("community", {}).get("list", [])) + list(path.get("largeCommunity", {}).get("list", []))


def nexthop_of(path: Mapping[str, Any]) -> str:
    return str(path["nexthops"][0]["ip"])


@dataclass
class Cluster:
    """Plays the watcher (cluster state in the NATS bucket) and the local director (its readiness
    on the status board) for a speaker under test."""

    publisher: KVPublisher
    board: StatusBoard
    host: str
    last: Encoded | None = None

    async def publish(self, state: ClusterState) -> None:
        encoded = encode_state(state)
        await self.publisher.publish(plan_writes(self.last, encoded))
        self.last = encoded

    async def director(self, vips: Sequence[str], *, healthy: bool = True) -> None:
        await self.board.put("director", self.host, {
            "version": 1, "role": "director", "mode": "bgp", "active": True, "healthy": healthy,
            "reason": "" if healthy else "last apply failed: test", "generation": 1, "content_hash": "",
            "vips": sorted(vips), "at": time.time()})


@asynccontextmanager
async def cluster(nats: NatsSettings, host: str = "dir-1") -> AsyncIterator[Cluster]:
    board = StatusBoard(nats)
    async with KVPublisher(nats) as publisher:
        await board.start()
        try:
            yield Cluster(publisher, board, host)
        finally:
            await board.close()


@asynccontextmanager
async def running_speaker(api: str, nats: NatsSettings, settings: SpeakerSettings,
                          host: str = "dir-1") -> AsyncIterator[SpeakerApp]:
    """The speaker as `kube2ipvs bgp-speaker` wires it, in this event loop; on exit it withdraws
    its routes as on SIGTERM."""
    client = GobgpClient(api)
    subscriber, board = StateSubscriber(nats), StatusBoard(nats)
    await subscriber.start()
    await board.start()
    app = SpeakerApp(client, source=subscriber, director=BoardDirector(board, host), settings=settings)
    task = asyncio.create_task(app.run())
    try:
        yield app
    finally:
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task
        await app.withdraw_all()
        await subscriber.close()
        await board.close()
        await client.close()


def new_lab(*, log_updates: bool = False) -> BgpLab:
    lab = BgpLab(Path(tempfile.mkdtemp(prefix="k2ibgp-")), log_updates=log_updates)
    try:
        lab.up()
    except BaseException:
        lab.close()
        raise
    return lab
