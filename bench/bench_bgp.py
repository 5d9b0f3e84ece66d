"""BGP speaker benchmark (issue 7): the speaker driving a real gobgpd over gRPC, FRR as the
top-of-rack router, the cluster state and the director's readiness on a real nats-server
(tests/root/bgpfixtures.py has the topology). Root only.

    sudo .venv/bin/python bench/bench_bgp.py [--vips 1000] [--latency-vips 100] [--output PATH]

Figures:
- latency: a VIP appears in the cluster state (KVPublisher.publish starts) -> FRR received the
  prefix, one VIP after the other. The director is modelled as already serving every VIP (its
  readiness, published once, lists them all): the director's own apply and the speaker's
  readiness poll (--readiness-interval) come on top of this in a cluster. FRR's arrival time is
  when bgpd logs the received prefix (`debug bgp updates in`), read by tailing its log every
  millisecond (vtysh itself takes ~40 ms a call here, too coarse for this).
- bulk: a state with --vips VIPs at once -> all of them in gobgpd (the speaker's reconcile) and
  all of them received by FRR.
- restart: gobgpd killed (SIGKILL) and started again -> from its API answering until the speaker
  has re-pushed BGP, the peers and every path, and until FRR received them all again (FRR
  reconnects on its 1 s connect timer).
- original: the same --vips routes added with one `gobgp global rib add` exec per route, as the
  original did, timed in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Final

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.bgp_speaker_builders import cluster as cluster_state
from tests.natsfixture import NatsServer, nats_server_binary
from tests.root.bgpfixtures import BGP, PEERS, BgpLab, cluster, missing_tools, new_lab, running_speaker

from kube2ipvs.natskv import NatsSettings
from kube2ipvs_bgp_speaker.app import SpeakerApp, SpeakerSettings
from kube2ipvs_bgp_speaker.plan import RouteSettings, canonical_communities

DEFAULT_OUTPUT: Final = Path(__file__).resolve().parent / "results" / "bench_bgp.json"
_RCVD: Final = re.compile(rb"rcvd (\S+/\d+) IPv[46] unicast$")


def vip(i: int) -> str:
    """198.18.0.0/15 (RFC 2544, benchmarking): room for 131,072 VIPs."""
    return f"198.{18 + i // 65536}.{i // 256 % 256}.{i % 256}"


class FrrArrivals:
    """Tails FRR's log: the first time each prefix was received after `mark()`."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._offset = path.stat().st_size
        self.seen: dict[str, float] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._tail())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def mark(self) -> None:
        self.seen = {}

    async def _tail(self) -> None:
        partial = b""
        with self._path.open("rb") as f:
            f.seek(self._offset)
            while True:
                chunk = f.read()
                if chunk:
                    now = time.perf_counter()
                    lines = (partial + chunk).split(b"\n")
                    partial = lines.pop()
                    for line in lines:
                        m = _RCVD.search(line)
                        if m:
                            self.seen.setdefault(m.group(1).decode(), now)
                await asyncio.sleep(0.001)

    async def wait(self, prefixes: Iterable[str], timeout: float) -> float:
        """The time the last of `prefixes` arrived."""
        want = list(prefixes)
        deadline = time.perf_counter() + timeout
        while any(p not in self.seen for p in want):
            if time.perf_counter() > deadline:
                missing = [p for p in want if p not in self.seen]
                raise TimeoutError(f"{len(missing)} prefixes not received by FRR, e.g. {missing[:3]}")
            await asyncio.sleep(0.001)
        return max(self.seen[p] for p in want)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def until(app: SpeakerApp, test: Any, timeout: float) -> float:
    deadline = time.perf_counter() + timeout
    while not test():
        if time.perf_counter() > deadline:
            raise TimeoutError("the speaker did not get there")
        app.reconciled.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(app.reconciled.wait(), 0.05)
    return time.perf_counter()


async def original(lab: BgpLab, frr: FrrArrivals, prefixes: list[str]) -> dict[str, float]:
    """The original's way: one `gobgp global rib add` exec per route."""
    frr.mark()
    started = time.perf_counter()
    for prefix in prefixes:
        await asyncio.to_thread(subprocess.run, ["gobgp", "--target", lab.api, "global", "rib", "-a", "ipv4",
                                                 "add", prefix], check=True, capture_output=True)
    execs_done = time.perf_counter()
    in_frr = await frr.wait(prefixes, timeout=60)
    out = {"execs_s": round(execs_done - started, 3),
           "per_route_ms": round((execs_done - started) / len(prefixes) * 1000, 1),
           "to_frr_s": round(in_frr - started, 3)}
    print(f"original method, {len(prefixes)} x `gobgp global rib add`: {out['execs_s']:.2f} s "
          f"({out['per_route_ms']} ms per route), all in FRR after {out['to_frr_s']:.2f} s")
    return out


async def run(lab: BgpLab, nats: NatsSettings, args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"vips": args.vips, "latency_vips": args.latency_vips}
    settings = SpeakerSettings(routes=RouteSettings(communities=canonical_communities(["64512:100"])), bgp=BGP,
                               peers=PEERS, resync_interval=10.0)
    frr = FrrArrivals(lab.workdir / "frr.log")
    frr.start()
    try:
        everything = [vip(i) for i in range(max(args.vips, args.latency_vips))]
        async with cluster(nats) as c, running_speaker(lab.api, nats, settings) as app:
            await c.director(everything)  # the director serves them all (see the docstring)
            await c.publish(cluster_state(1, []))
            await lab.until(lab.established, lambda s: len(s) == 2, timeout=20)

            # 1. one VIP after the other: state -> FRR
            latencies, publishing = [], []
            for i in range(args.latency_vips):
                state = cluster_state(2 + i, everything[: i + 1])
                frr.mark()
                started = time.perf_counter()
                await c.publish(state)  # encode + write to NATS: the watcher's share
                publishing.append((time.perf_counter() - started) * 1000)
                arrived = await frr.wait([f"{everything[i]}/32"], timeout=10)
                latencies.append((arrived - started) * 1000)
            out["latency_ms"] = {"p50": round(pct(latencies, 0.5), 1), "p99": round(pct(latencies, 0.99), 1),
                                 "max": round(max(latencies), 1), "mean": round(statistics.fmean(latencies), 1),
                                 "of_which_publishing_p50": round(pct(publishing, 0.5), 1)}
            print(f"VIP in cluster state -> prefix received by FRR, {args.latency_vips} VIPs one by one: "
                  f"p50 {out['latency_ms']['p50']} ms, p99 {out['latency_ms']['p99']} ms, "
                  f"max {out['latency_ms']['max']} ms (publishing the state: p50 "
                  f"{out['latency_ms']['of_which_publishing_p50']} ms of it)")

            # 2. all VIPs at once (from none)
            await c.publish(cluster_state(1000, []))
            await until(app, lambda: not app.in_force(), timeout=30)
            await lab.until(lab.rib, lambda rib: not rib, timeout=30)
            state = cluster_state(1001, everything[: args.vips])
            frr.mark()
            started = time.perf_counter()
            await c.publish(state)
            published = time.perf_counter()
            in_gobgpd = await until(app, lambda: len(app.in_force()) == args.vips, timeout=60)
            in_frr = await frr.wait([f"{v}/32" for v in everything[: args.vips]], timeout=60)
            out["bulk_s"] = {"to_gobgpd": round(in_gobgpd - started, 3), "to_frr": round(in_frr - started, 3),
                             "of_which_publishing": round(published - started, 3)}
            rib = await lab.rib()
            assert len(rib) == args.vips, f"FRR holds {len(rib)} prefixes, not {args.vips}"
            print(f"{args.vips} VIPs at once: in gobgpd after {out['bulk_s']['to_gobgpd']:.3f} s, "
                  f"all received by FRR after {out['bulk_s']['to_frr']:.3f} s (publishing the state: "
                  f"{out['bulk_s']['of_which_publishing']:.3f} s of it)")

            # 3. gobgpd restart
            lab.kill_gobgpd()
            await until(app, lambda: app.gobgpd_error is not None, timeout=10)
            frr.mark()
            lab.start_gobgpd()
            answered = time.perf_counter()
            pushed = await until(app, lambda: app.gobgpd_error is None and len(app.in_force()) == args.vips,
                                 timeout=60)
            in_frr = await frr.wait([f"{v}/32" for v in everything[: args.vips]], timeout=60)
            out["restart_s"] = {"repushed_in_gobgpd": round(pushed - answered, 3),
                                "in_frr": round(in_frr - answered, 3)}
            print(f"gobgpd restart ({args.vips} routes): re-pushed {out['restart_s']['repushed_in_gobgpd']:.3f} s "
                  f"after its API answered; all in FRR after {out['restart_s']['in_frr']:.3f} s (FRR reconnects "
                  "on its 1 s connect timer)")
        await lab.until(lab.rib, lambda rib: not rib, timeout=30)  # the speaker withdrew on exit

        out["original"] = await original(lab, frr, [f"{vip(args.vips + i)}/32" for i in range(args.vips)])
    finally:
        await frr.stop()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--vips", type=int, default=1000)
    ap.add_argument("--latency-vips", type=int, default=100)
    ap.add_argument("--scale", type=float, default=1.0, help="multiplies --vips and --latency-vips (make bench)")
    ap.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = ap.parse_args()
    args.vips = max(1, int(args.vips * args.scale))
    args.latency_vips = max(1, int(args.latency_vips * args.scale))
    if os.geteuid() != 0:
        print("needs root: creates network namespaces", file=sys.stderr)
        return 2
    if missing := missing_tools():
        print(f"needs {', '.join(missing)} (apt-get install gobgpd frr)", file=sys.stderr)
        return 2
    binary = nats_server_binary()
    if binary is None:
        print("needs nats-server (apt-get install nats-server)", file=sys.stderr)
        return 2
    lab = new_lab(log_updates=True)
    server = NatsServer(binary, lab.workdir / "nats")
    try:
        lab.start_gobgpd()
        server.start()
        nats = NatsSettings(servers=(server.url,), reconnect_wait=0.1, connect_timeout=1.0, request_timeout=5.0)
        result = asyncio.run(run(lab, nats, args))
    finally:
        server.stop()
        lab.close()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
