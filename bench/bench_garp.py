"""Gratuitous ARP round benchmark (issue 6): the time `GarpSender` takes to announce 1,000 VIPs
(one frame each) on a veth between two throw-away namespaces, against the original design's one
`arping -U -c 1` exec per VIP (measured on a sample, then scaled). Root only.

    sudo .venv/bin/python bench/bench_garp.py [--vips 1000] [--rounds 20] [--output PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Final

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pyroute2 import netns as pyroute2_netns

from kube2ipvs_director.garp import GarpSender

PREFIX: Final = f"k2i-bench-garp{os.getpid()}-"
DEFAULT_OUTPUT: Final = Path(__file__).resolve().parent / "results" / "bench_garp.json"


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, timeout=60)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--vips", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--arping-sample", type=int, default=5, help="arping execs to time (each takes ~1 s)")
    ap.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root: creates network namespaces", file=sys.stderr)
        return 2
    a, b = PREFIX + "a", PREFIX + "b"
    vips = [f"10.{100 + i // 250}.{i % 250}.1" for i in range(args.vips)]
    sh("ip", "netns", "add", a)
    sh("ip", "netns", "add", b)
    try:
        sh("ip", "-n", a, "link", "add", "g0", "type", "veth", "peer", "name", "g1", "netns", b)
        sh("ip", "-n", a, "link", "set", "g0", "up")
        sh("ip", "-n", b, "link", "set", "g1", "up")
        pyroute2_netns.pushns(a)
        try:
            sender = GarpSender("g0")
        finally:
            pyroute2_netns.popns()
        rounds = []
        with contextlib.closing(sender):
            for _ in range(args.rounds):
                t0 = time.perf_counter()
                sender.announce(vips)
                rounds.append(time.perf_counter() - t0)
                time.sleep(0.05)
        results: dict[str, Any] = {
            "vips": args.vips, "rounds": args.rounds,
            "round_ms": {"median": round(statistics.median(rounds) * 1000, 2),
                         "p99": round(sorted(rounds)[min(len(rounds) - 1, round(0.99 * (len(rounds) - 1)))] * 1000, 2),
                         "max": round(max(rounds) * 1000, 2)},
        }
        if shutil.which("arping") is not None and args.arping_sample > 0:
            sh("ip", "-n", a, "addr", "add", "10.99.0.1/8", "dev", "g0")
            t0 = time.perf_counter()
            for vip in vips[: args.arping_sample]:
                subprocess.run(["ip", "netns", "exec", a, "arping", "-U", "-c", "1", "-I", "g0", "-s", vip, vip],
                               capture_output=True, timeout=10, check=False)
            per = (time.perf_counter() - t0) / args.arping_sample
            results["arping_exec_per_vip_ms"] = round(per * 1000, 1)
            results["arping_cycle_for_all_vips_s"] = round(per * args.vips, 1)
    finally:
        subprocess.run(["ip", "netns", "del", a], check=False)
        subprocess.run(["ip", "netns", "del", b], check=False)
    r = results["round_ms"]
    print(f"GARP round of {args.vips} VIPs (one frame each), {args.rounds} rounds: median {r['median']} ms, "
          f"p99 {r['p99']} ms, max {r['max']} ms")
    if "arping_exec_per_vip_ms" in results:
        print(f"original method, one `arping -U -c 1` exec per VIP: {results['arping_exec_per_vip_ms']} ms each, "
              f"so {results['arping_cycle_for_all_vips_s']} s for all {args.vips}")
    else:
        print("arping is not installed: the original method was not measured")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
