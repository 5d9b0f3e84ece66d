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
The gap is the window in which requests failed, from the first failed request's start to the
last one's end (a failed TCP request waits 2 s, a UDP one 1 s); about half the flows hash to
dir1, so about half the requests of that time fail.

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
from kube2ipvs.lab import Record, lab_control, prefix, router_routes, state_dir
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
    return router_routes(NAME, VIPS)


def both_routes() -> bool:
    return all(frr_hops().get(v) == set(DIRECTORS.values()) for v in VIPS)


def dir2_alone() -> bool:
    return all(frr_hops().get(v) == {DIRECTORS["dir2"]} for v in VIPS)


# -- the ways dir1 breaks, and its repair -------------------------------------------------------

def kill_gobgpd() -> None:
    """SIGKILL to the PID the lab recorded (state.json; `lab status` would also ask every service)."""
    record = Record.load(state_dir(NAME))
    assert record is not None, "the lab is not running"
    os.kill(int(record.processes[f"{DIR1}-gobgpd"]["pid"]), 9)


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


def failure_window(samples: list[Any], protocol: str) -> float:
    """From the first failed request's start to the last one's end: with ECMP only the flows
    hashed to the broken director fail, so failures interleave with answers through the other
    one, and the longest run of consecutive failures would understate the outage."""
    failed = [s for s in samples if s.protocol == protocol and s.answer is None]
    return max(s.start + s.took for s in failed) - min(s.start for s in failed) if failed else 0.0


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
                window = {p: failure_window(samples, p) for p in ("tcp", "udp")}
                row = {"withdrawn_s": round(withdrawn, 3), "routes_back_after_repair_s": round(back, 3),
                       **{f"{p}_gap_s": round(w, 3) for p, w in window.items()},
                       **{f"{p}_failed": t.failed for p, t in seen.items()},
                       **{f"{p}_requests": t.requests for p, t in seen.items()}}
                results[name].append(row)
                print(f"  round {r + 1} {name}: FRR had dir2 alone after {withdrawn:.2f} s; failures over "
                      f"{window['tcp']:.2f} s for tcp ({seen['tcp'].failed} failed), {window['udp']:.2f} s for udp "
                      f"({seen['udp'].failed} failed); both routes back {back:.2f} s after the repair", flush=True)
    finally:
        prober.stop()
    return results


# -- ARP ------------------------------------------------------------------------------------------

def arp_rounds(rounds: int) -> list[dict[str, float]]:
    """tests/root/test_arp_failover_netns.py's scenario, `rounds` times, each in a new topology."""
    from tests.natsfixture import running_nats_server
    from tests.root.conftest import Lab
    from tests.root.test_arp_failover_netns import failover_round, topology

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
                took = asyncio.run(failover_round(router, a_ns, b_ns, client, nats))
        finally:
            lab.close()
            shutil.rmtree(workdir, ignore_errors=True)
        results.append({"neighbour_moved_s": round(took.neighbour_moved, 3),
                        "traffic_back_s": round(took.traffic_back, 3),
                        "unanswered": float(took.unanswered), "requests": float(took.requests)})
        print(f"  round {r + 1} ARP: router moved to the standby after {took.neighbour_moved:.2f} s; answers again "
              f"after {took.traffic_back:.2f} s ({took.unanswered} of {took.requests} requests unanswered)", flush=True)
    return results


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
