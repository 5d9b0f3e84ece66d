"""The director's nftables dataplane (issue 6), as root in a throw-away network namespace:
a first load of S VIP:ports with 10 weighted nodes each (each its own node set, so its own Maglev
table: the worst case for sharing), one-real-server changes applied as element deltas, a read
back, and a restarted director adopting the table.
Prints a table and writes JSON.

    sudo .venv/bin/python bench/bench_dsr.py [--services 1000] [--changes 100] [--size 251]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Final

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kube2ipvs_director.dsr import LOAD_CHUNK, DsrSettings
from kube2ipvs_director.nftdsr import NftDsr
from kube2ipvs_director.plan import AddDest, AddService, EditDest, Op, ServiceId

DEFAULT_OUTPUT: Final = Path(__file__).resolve().parent / "results" / "bench_dsr.json"
NODES: Final = [f"10.{64 + i // 250}.{i % 250}.1" for i in range(1000)]


def ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


def cluster(count: int, rng: random.Random) -> tuple[list[tuple[ServiceId, list[tuple[str, int]]]], list[Op]]:
    """`count` services on port 80 of distinct VIPs, 10 random nodes each, and the ops that add them."""
    services: list[tuple[ServiceId, list[tuple[str, int]]]] = []
    for i in range(count):
        sid = ServiceId(f"192.{168 + i // 65536 % 8}.{i // 256 % 256}.{i % 256}", 4, 80, "tcp")
        services.append((sid, [(n, rng.randint(1, 3)) for n in rng.sample(NODES, 10)]))
    ops: list[Op] = []
    for sid, dests in services:
        ops.append(AddService(sid, "mh", ()))
        ops += [AddDest(sid, n, 80, "g", w, 0, 0) for n, w in dests]
    return services, ops


def restart(ns: str, size: int) -> float:
    """Seconds a restarted director takes to read the table back and adopt it (no reload)."""
    restarted = NftDsr(DsrSettings("d0", table_size=size), netns=ns)
    t0 = time.perf_counter()
    restarted.observe()
    took = time.perf_counter() - t0
    assert restarted.adoptions == 1
    restarted.close()
    return took


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--services", type=int, default=1000)
    ap.add_argument("--changes", type=int, default=100)
    ap.add_argument("--size", type=int, default=251, help="Maglev table size (prime)")
    ap.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("skipped: needs root (a network namespace and an nft table in it)")
        return 0
    ns = f"k2i-bench-dsr-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        for cmd in (("link", "add", "d0", "type", "veth", "peer", "name", "d1"), ("link", "set", "d0", "up")):
            subprocess.run(["ip", "-n", ns, *cmd], check=True)
        rng = random.Random(1)
        services, ops = cluster(args.services, rng)
        dsr = NftDsr(DsrSettings("d0", table_size=args.size), netns=ns)
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        dsr.observe()
        t0 = time.perf_counter()
        dsr.apply(ops)
        full = time.perf_counter() - t0
        rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        elements = dsr.last_elements
        timings, sizes = [], []
        for _ in range(args.changes):
            sid, dests = rng.choice(services)
            k = rng.randrange(len(dests))
            node, weight = dests[k]
            dests[k] = (node, weight % 3 + 1)
            t0 = time.perf_counter()
            dsr.apply([EditDest(sid, node, 80, "g", dests[k][1], 0, 0)])
            timings.append(time.perf_counter() - t0)
            sizes.append(dsr.last_elements)
        t0 = time.perf_counter()
        observed = dsr.observe()
        observe = time.perf_counter() - t0
        assert len(observed.services) == args.services
        dsr.close()
        adopt = restart(ns, args.size)
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
    timings.sort()
    result = {
        "environment": {"python": platform.python_version(), "kernel": platform.release()},
        "services": args.services, "nodes_per_service": 10, "table_size": args.size,
        "full_load_s": round(full, 3), "full_load_elements": elements,
        "full_load_peak_rss_growth_mb": round((rss1 - rss0) / 1024, 1),
        "change_ms": {"median": ms(statistics.median(timings)), "p99": ms(timings[int(len(timings) * 0.99) - 1])},
        "change_elements_median": statistics.median(sizes),
        "observe_s": round(observe, 3),
        "restart_adopt_s": round(adopt, 3),
    }
    print(f"nftables dataplane: {args.services} VIP:ports x 10 nodes, Maglev tables of {args.size} slots")
    print(f"  first load ({elements} elements, transactions of {LOAD_CHUNK:,}): {result['full_load_s']} s, "
          f"peak RSS +{result['full_load_peak_rss_growth_mb']} MB (libnftables parses in-process)")
    print(f"  one weight change ({args.changes}): median {result['change_ms']['median']} ms, "
          f"p99 {result['change_ms']['p99']} ms, {result['change_elements_median']} elements")
    print(f"  a resync with nothing committed since (one nf_tables generation request): {result['observe_s']} s")
    print(f"  a restarted director reads the table back and adopts it: {result['restart_adopt_s']} s, no reload")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
