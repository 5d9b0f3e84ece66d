#!/usr/bin/env python3
"""Director failover as a traffic gap (issue 10), as root, repeated and summarised.

BGP, in the lab (`kube2ipvs lab up --name fobench`, two directors behind FRR with ECMP). A
prober in the client namespace opens a new TCP connection to 192.0.2.10:80 and sends a UDP
datagram to 192.0.2.11:53 every 20 ms (tests/root/test_faults_lab.py's prober); each round
breaks dir1 one way, measures until FRR holds dir2 alone and until every request is answered
again, then repairs dir1 and waits for both routes to be back:
- `speaker stopped`: dir1's bgp-speaker is stopped (SIGTERM), as for maintenance: it
  withdraws every route before it exits;
- `gobgpd killed`: dir1's gobgpd gets SIGKILL; its BGP session closes with the process;
- `silent`: every packet in and out of dir1's uplink is dropped (nft, in dir1's namespace),
  as when a host hangs or its link fails behind a switch that keeps the router's port up (the
  lab's fabric is a bridge, so a link down looks the same to the router): only the BGP hold
  timer (9 s in the lab; a production deployment would add BFD) tells FRR.
The gap is the longest run of failed requests, from the first failure to the next answer;
about half the flows hash to dir1, so about half the requests of that time fail.

ARP, the two-director topology of tests/root/test_arp_failover_netns.py (a router bridge, a
NATS lease with a 1.5 s TTL, gratuitous ARP): the active director's process and link go away
and the standby takes the VIP. Measured: until the router's neighbour entry holds the standby's
MAC, and until a client sending a UDP request every 50 ms is answered again.

    sudo .venv/bin/python bench/bench_failover.py [--rounds 5] [--output bench/results/bench_failover.json]

Only the namespaces this creates (the lab's `k2ilab-fobench-*`, tests/root/conftest's prefix for
the ARP topology) are created and deleted; only processes started here are stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kube2ipvs.cli import main as cli_main
from kube2ipvs.lab import STATE_ROOT, lab_control, prefix
from kube2ipvs.labplan import DIRECTORS

REPO: Final = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT: Final = REPO / "bench" / "results" / "bench_failover.json"
NAME: Final = "fobench"
VIPS: Final = ("192.0.2.10/32", "192.0.2.11/32")
DIR1: Final = "dir1"
UPLINK: Final = "eth0"  # a director's link to the fabric bridge, in its namespace (kube2ipvs.lab.link_fabric)


def ns(host: str) -> str:
    return prefix(NAME) + host


def run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=30)


def until(what: str, check: Callable[[], bool], seconds: float = 60.0) -> float:
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > seconds:
            raise TimeoutError(f"{what}: not within {seconds} s")
        time.sleep(0.02)
    return time.monotonic() - start


def frr_hops() -> dict[str, set[str]]:
    done = subprocess.run(["vtysh", "--vty_socket", str(STATE_ROOT / NAME / "frr"), "-c", "show ip route json"],
                          capture_output=True, text=True, timeout=10, check=False)
    try:
        rib = json.loads(done.stdout)
    except ValueError:
        return {}
    hops: dict[str, set[str]] = {}
    for vip in VIPS:
        for route in rib.get(vip, []):
            if route.get("installed"):
                hops.setdefault(vip, set()).update(h["ip"] for h in route.get("nexthops", [])
                                                   if h.get("active") and "ip" in h)
    return hops


def both_routes() -> bool:
    return all(frr_hops().get(v) == set(DIRECTORS.values()) for v in VIPS)


def dir2_alone() -> bool:
    return all(frr_hops().get(v) == {DIRECTORS["dir2"]} for v in VIPS)


# -- the ways dir1 breaks, and its repair -------------------------------------------------------

def kill_gobgpd() -> None:
    pid = json.loads(lab_status())["processes"][f"{DIR1}-gobgpd"]["pid"]
    os.kill(int(pid), 9)


def repair_gobgpd() -> None:
    lab_control(NAME, "start", f"{DIR1}-gobgpd")


def stop_speaker() -> None:
    lab_control(NAME, "stop", f"{DIR1}-bgp-speaker")


def start_speaker() -> None:
    lab_control(NAME, "start", f"{DIR1}-bgp-speaker")


SILENT_TABLE: Final = "k2i_bench_silent"


def go_silent() -> None:
    rules = (f"table netdev {SILENT_TABLE} {{\n"
             f"  chain in {{ type filter hook ingress device {UPLINK} priority -500; policy drop; }}\n"
             f"  chain out {{ type filter hook egress device {UPLINK} priority -500; policy drop; }}\n}}\n")
    subprocess.run(["ip", "netns", "exec", ns(DIR1), "nft", "-f", "-"], input=rules, check=True,
                   capture_output=True, text=True, timeout=30)


def speak_again() -> None:
    run("ip", "netns", "exec", ns(DIR1), "nft", "delete", "table", "netdev", SILENT_TABLE)


BGP_SCENARIOS: Final = {
    "speaker stopped": (stop_speaker, start_speaker),
    "gobgpd killed": (kill_gobgpd, repair_gobgpd),
    "silent": (go_silent, speak_again),
}


def lab_status() -> str:
    out = io.StringIO()
    cli_main(["lab", "status", "--json", "--name", NAME], out=out, err=io.StringIO())
    return out.getvalue()


def bgp_rounds(rounds: int) -> dict[str, list[dict[str, float]]]:
    from tests.root.test_faults_lab import Prober, traffic

    prober = Prober(prefix(NAME) + "client")
    prober.start()
    results: dict[str, list[dict[str, float]]] = {name: [] for name in BGP_SCENARIOS}
    try:
        for r in range(rounds):
            for name, (breaks, repairs) in BGP_SCENARIOS.items():
                until("both routes in FRR", both_routes)
                time.sleep(2.0)  # traffic over both directors before the fault
                started = time.monotonic()
                breaks()
                withdrawn = until("dir2 alone in FRR", dir2_alone, 30)
                time.sleep(2.0)  # a settled window after the move
                repairs()
                back = until("both routes back", both_routes, 60)
                time.sleep(1.0)
                samples = prober.since(started)
                seen = {p: traffic(samples, p) for p in ("tcp", "udp")}
                row = {"withdrawn_s": round(withdrawn, 3), "routes_back_after_repair_s": round(back, 3),
                       **{f"{p}_gap_s": round(t.outage, 3) for p, t in seen.items()},
                       **{f"{p}_failed": t.failed for p, t in seen.items()},
                       **{f"{p}_requests": t.requests for p, t in seen.items()}}
                results[name].append(row)
                print(f"  round {r + 1} {name}: FRR had dir2 alone after {withdrawn:.2f} s; gap tcp "
                      f"{seen['tcp'].outage:.2f} s ({seen['tcp'].failed} failed), udp {seen['udp'].outage:.2f} s "
                      f"({seen['udp'].failed} failed); both routes back {back:.2f} s after the repair", flush=True)
    finally:
        prober.stop()
    return results


# -- ARP ------------------------------------------------------------------------------------------

def arp_rounds(rounds: int) -> list[dict[str, float]]:
    from tests.natsfixture import running_nats_server
    from tests.root.conftest import Lab
    from tests.root.test_arp_failover_netns import VIP as ARP_VIP
    from tests.root.test_arp_failover_netns import Prober, director, router_mac_for, topology
    from tests.root.test_dsr_netns import NODES, state

    from kube2ipvs.natskv import NatsSettings

    results: list[dict[str, float]] = []
    for r in range(rounds):
        lab = Lab()
        workdir = Path(tempfile.mkdtemp(prefix="k2i-bench-failover-"))
        try:
            router, a_ns, b_ns, client = topology(lab)
            with running_nats_server(workdir / "nats") as server:
                nats = NatsSettings(servers=(server.url,), reconnect_wait=0.1, connect_timeout=1.0,
                                    request_timeout=2.0)
                results.append(asyncio.run(_arp_round(nats, router, a_ns, b_ns, Prober(client),
                                                      state(1, list(NODES), ARP_VIP), director, router_mac_for)))
            row = results[-1]
            print(f"  round {r + 1} ARP: router moved to the standby after {row['neighbour_moved_s']:.2f} s; "
                  f"answers again after {row['traffic_back_s']:.2f} s ({row['unanswered']:.0f} of "
                  f"{row['requests']:.0f} requests unanswered)", flush=True)
        finally:
            lab.close()
            shutil.rmtree(workdir, ignore_errors=True)
    return results


async def _arp_round(nats: Any, router: Any, a_ns: Any, b_ns: Any, prober: Any, target: Any,
                     director: Any, router_mac_for: Any) -> dict[str, float]:
    a, a_sender, a_lease = director(a_ns, "a0", nats, "dir-a")
    b, b_sender, b_lease = director(b_ns, "b0", nats, "dir-b")
    await a_lease.start()
    await b_lease.start()
    a_task = asyncio.create_task(a.run())
    b_task: asyncio.Task[None] | None = None

    async def wait(check: Callable[[], bool], seconds: float) -> float:
        start = time.monotonic()
        while not check():
            if time.monotonic() - start > seconds:
                raise TimeoutError(f"not within {seconds} s")
            await asyncio.sleep(0.02)
        return time.monotonic() - start

    try:
        a.offer(target)
        await wait(lambda: router_mac_for(router) == a_sender.mac.hex(":"), 10)
        b.offer(target)
        b_task = asyncio.create_task(b.run())
        await asyncio.sleep(3.0)
        prober.start()
        await wait(lambda: prober.answered_since(0) is not None, 5)
        a_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await a_task
        a_ns.ip("link", "set", "a0", "down")
        gone = time.monotonic()
        moved = await wait(lambda: router_mac_for(router) == b_sender.mac.hex(":"), 15)
        back = await wait(lambda: prober.answered_since(gone) is not None, 15)
        back_s = prober.answered_since(gone)
        await asyncio.sleep(1.0)
        after = [ok for sent, ok in prober.results if sent >= gone]
        return {"neighbour_moved_s": round(moved, 3),
                "traffic_back_s": round(back_s if back_s is not None else back, 3),
                "unanswered": float(sum(1 for ok in after if not ok)), "requests": float(len(after))}
    finally:
        prober.stop.set()
        for task in (a_task, b_task):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for app, sender, lease in ((a, a_sender, a_lease), (b, b_sender, b_lease)):
            app.close()
            sender.close()
            await lease.close()


def summary(rows: list[dict[str, float]], key: str) -> dict[str, float]:
    values = sorted(r[key] for r in rows)
    return {"median": round(statistics.median(values), 3), "min": values[0], "max": values[-1], "rounds": len(values)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("skipped: needs root (network namespaces)")
        return 0
    out = io.StringIO()
    print(f"BGP failover in the lab, {args.rounds} rounds of each way dir1 breaks ...", flush=True)
    if cli_main(["lab", "up", "--name", NAME], out=out, err=out) != 0:
        print(out.getvalue())
        return 1
    try:
        bgp = bgp_rounds(args.rounds)
    finally:
        cli_main(["lab", "down", "--name", NAME], out=io.StringIO(), err=io.StringIO())
    print(f"ARP failover, {args.rounds} rounds ...", flush=True)
    arp = arp_rounds(args.rounds)
    result: dict[str, Any] = {
        "environment": {"python": platform.python_version(), "kernel": platform.release()},
        "rounds": args.rounds,
        "bgp": {name: {"withdrawn_s": summary(rows, "withdrawn_s"), "tcp_gap_s": summary(rows, "tcp_gap_s"),
                       "udp_gap_s": summary(rows, "udp_gap_s"), "tcp_failed": summary(rows, "tcp_failed"),
                       "udp_failed": summary(rows, "udp_failed"),
                       "routes_back_after_repair_s": summary(rows, "routes_back_after_repair_s"), "runs": rows}
                for name, rows in bgp.items()},
        "arp": {"neighbour_moved_s": summary(arp, "neighbour_moved_s"),
                "traffic_back_s": summary(arp, "traffic_back_s"),
                "unanswered": summary(arp, "unanswered"), "runs": arp},
    }
    print("\nfailover (median over rounds, min-max):")
    for name, r in result["bgp"].items():
        print(f"  BGP {name:14s} FRR moved {r['withdrawn_s']['median']:.2f} s; "
              f"gap tcp {r['tcp_gap_s']['median']:.2f} s "
              f"({r['tcp_gap_s']['min']}-{r['tcp_gap_s']['max']}), udp {r['udp_gap_s']['median']:.2f} s "
              f"({r['udp_gap_s']['min']}-{r['udp_gap_s']['max']})")
    a = result["arp"]
    print(f"  ARP               neighbour moved {a['neighbour_moved_s']['median']:.2f} s; answers again "
          f"{a['traffic_back_s']['median']:.2f} s ({a['traffic_back_s']['min']}-{a['traffic_back_s']['max']})")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
