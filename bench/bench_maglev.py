"""Maglev table benchmark (issue 6): what a table size buys and costs.

For each table size (a prime): the build time of the lookup tables for 10,000 VIP:ports with 10
backends each (weights 1-3, from 1,000 nodes), and, for services of N = 3, 5, 10 and 20
backends, the share of flows (slots) that one backend change moves, times N (1.0 is the ideal;
the issue's target is at most 1.2). The cost side: the nftables dataplane holds `size` map
elements per distinct node set (services with the same nodes and weights share one table).
Pure Python; prints a table and writes JSON.

    .venv/bin/python bench/bench_maglev.py [--scale 0.1] [--sizes 251,1021,2039] [--output PATH]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Final

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kube2ipvs.maglev import DEFAULT_SIZE, maglev_table, moved

SERVICES_AT_SCALE_1: Final = 10_000
BACKENDS: Final = 10
CHANGE_SIZES: Final = (3, 5, 10, 20)
CHANGES: Final = 300  # backend changes measured per N and size
DEFAULT_OUTPUT: Final = Path(__file__).resolve().parent / "results" / "bench_maglev.json"
NODES: Final = [f"198.18.{i // 250}.{i % 250 + 1}" for i in range(1000)]


def build_time(services: int, size: int, seed: int) -> float:
    rng = random.Random(seed)
    sets = [{n: rng.randint(1, 3) for n in rng.sample(NODES, BACKENDS)} for _ in range(services)]
    t0 = time.perf_counter()
    for backends in sets:
        maglev_table(backends, size)
    return time.perf_counter() - t0


def moved_times_n(n: int, size: int, seed: int) -> dict[str, float]:
    """Median and max over CHANGES changes: a backend leaves (half) or joins (half)."""
    rng = random.Random(seed)
    shares = []
    for i in range(CHANGES):
        backends = rng.sample(NODES, n)
        before = maglev_table(dict.fromkeys(backends, 1), size)
        if i % 2 == 0:
            gone = rng.choice(backends)
            shares.append(moved(before, maglev_table({b: 1 for b in backends if b != gone}, size)) * n)
        else:
            joiner = next(x for x in NODES if x not in backends)
            shares.append(moved(before, maglev_table(dict.fromkeys([*backends, joiner], 1), size)) * (n + 1))
    return {"median": round(statistics.median(shares), 3), "max": round(max(shares), 3)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--scale", type=float, default=1.0, help="1.0: 10,000 VIP:ports")
    ap.add_argument("--sizes", default=f"{DEFAULT_SIZE},1021,2039", help="table sizes (primes), comma-separated")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = ap.parse_args()
    services = max(1, round(SERVICES_AT_SCALE_1 * args.scale))
    runs = []
    for size in (int(s) for s in args.sizes.split(",")):
        built = build_time(services, size, args.seed)
        runs.append({"size": size, "services": services, "backends": BACKENDS, "build_s": round(built, 3),
                     "build_per_table_ms": round(built / services * 1000, 4),
                     "nft_elements_per_table": size,
                     "moved_times_n": {str(n): moved_times_n(n, size, args.seed) for n in CHANGE_SIZES}})
    print(f"Maglev tables: build of {services} tables of {BACKENDS} weighted backends; flows moved by one backend "
          f"change, times N (median/max of {CHANGES}; 1.0 is ideal, the target is at most 1.2)")
    print(f"{'size':>6}{'build s':>9}{'ms/table':>10}" + "".join(f"{f'N={n}':>14}" for n in CHANGE_SIZES))
    for r in runs:
        cells = "".join(f"{r['moved_times_n'][str(n)]['median']:>8}/{r['moved_times_n'][str(n)]['max']:<5}"
                        for n in CHANGE_SIZES)
        print(f"{r['size']:>6}{r['build_s']:>9}{r['build_per_table_ms']:>10}{cells}")
    print("cost: the nftables dataplane holds `size` elements per distinct node set")
    results = {"environment": {"python": platform.python_version(), "machine": platform.machine()}, "runs": runs}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
