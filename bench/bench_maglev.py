"""Maglev table benchmark (issue 6): build time of the lookup tables for 10,000 VIP:ports with 10
backends each, and the share of flows (slots) one backend change moves, for a small table (the
default size, cheap enough to hold as nft map elements) and a large one (which keeps the change
under 1.2/N), side by side. Pure Python; prints a table and writes JSON.

    .venv/bin/python bench/bench_maglev.py [--scale 0.1] [--sizes 251,16381] [--output PATH]
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
from typing import Any, Final

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kube2ipvs.maglev import DEFAULT_SIZE, maglev_table, moved

SERVICES_AT_SCALE_1: Final = 10_000
BACKENDS: Final = 10
DEFAULT_OUTPUT: Final = Path(__file__).resolve().parent / "results" / "bench_maglev.json"


def run(services: int, size: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    nodes = [f"198.18.{i // 250}.{i % 250 + 1}:8080" for i in range(1000)]
    sets = [rng.sample(nodes, BACKENDS) for _ in range(services)]
    t0 = time.perf_counter()
    tables = [maglev_table(dict.fromkeys(backends, 1), size) for backends in sets]
    build = time.perf_counter() - t0
    # One backend change per service: a node leaves (its slots must move), and one joins.
    removal, addition = [], []
    for backends, table in zip(sets[:500], tables[:500], strict=True):
        gone = rng.choice(backends)
        removal.append(moved(table, maglev_table({b: 1 for b in backends if b != gone}, size)))
        joiner = next(n for n in nodes if n not in backends)
        addition.append(moved(table, maglev_table(dict.fromkeys([*backends, joiner], 1), size)))
    return {
        "size": size, "services": services, "backends": BACKENDS, "build_s": round(build, 3),
        "build_per_table_ms": round(build / services * 1000, 4),
        "moved_on_removal_times_n": {"median": round(statistics.median(removal) * BACKENDS, 3),
                                     "max": round(max(removal) * BACKENDS, 3)},
        "moved_on_addition_times_n_plus_1": {"median": round(statistics.median(addition) * (BACKENDS + 1), 3),
                                             "max": round(max(addition) * (BACKENDS + 1), 3)},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--scale", type=float, default=1.0, help="1.0: 10,000 VIP:ports")
    ap.add_argument("--sizes", default=f"{DEFAULT_SIZE},16381", help="table sizes (primes), comma-separated")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = ap.parse_args()
    services = max(1, round(SERVICES_AT_SCALE_1 * args.scale))
    results: dict[str, Any] = {"environment": {"python": platform.python_version()},
                               "runs": [run(services, int(size), args.seed) for size in args.sizes.split(",")]}
    print(f"Maglev tables: {services} VIP:ports x {BACKENDS} backends; moved = share of slots (flows) "
          f"that change backend, times N (1.0 is the ideal, the target is at most 1.2)")
    print(f"{'size':>7}{'build s':>10}{'per table ms':>14}{'removal med/max':>18}{'addition med/max':>19}")
    for r in results["runs"]:
        rem, add = r["moved_on_removal_times_n"], r["moved_on_addition_times_n_plus_1"]
        print(f"{r['size']:>7}{r['build_s']:>10}{r['build_per_table_ms']:>14}"
              f"{rem['median']:>10}/{rem['max']:<7}{add['median']:>11}/{add['max']:<7}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
