"""What one endpoint change costs, stage by stage, at 1k, 10k and 30k VIP:ports (issue 10): the
work of a change should follow the change, not the size of the cluster.

In one process, without NATS or a kernel (those are measured by bench_watcher, bench_realserver,
bench_director and bench_dsr): the watcher's side (the incremental Normalizer and the Encoder,
down to the values it would write), the consumer's side (the Assembler turning those values into
the next complete state, as a director's subscriber does) and the director's reconcile against
its strict in-memory IPVS (plan, apply, and what it keeps of the kernel). Each stage's median and
p99 over 2 x `--changes` one-endpoint changes (a pod added next to another on its node, then
removed: weight changes, which never start a drain), per size.

    .venv/bin/python bench/bench_change_scaling.py [--sizes 1000,10000,30000] [--changes 100]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Final

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_render import VIP_PORTS_AT_SCALE_1, build_cluster

from kube2ipvs.normalize import Normalizer
from kube2ipvs.protocol import Assembler, Encoder, plan_writes
from kube2ipvs_director.app import DirectorApp, DirectorSettings
from kube2ipvs_director.host import FakeHost
from kube2ipvs_director.kernel import FakeIpvs

DEFAULT_OUTPUT: Final = Path(__file__).resolve().parent / "results" / "bench_change_scaling.json"


def figures(seconds: list[float]) -> dict[str, float]:
    ordered = sorted(seconds)
    return {"median_ms": round(statistics.median(ordered) * 1000, 3),
            "p99_ms": round(ordered[max(0, int(len(ordered) * 0.99) - 1)] * 1000, 3),
            "min_ms": round(ordered[0] * 1000, 3), "max_ms": round(ordered[-1] * 1000, 3), "runs": len(ordered)}


def measure(size: int, changes: int, seed: int, nodes: int | None = None) -> dict[str, Any]:
    rng = random.Random(seed)
    cluster = build_cluster(size / VIP_PORTS_AT_SCALE_1, seed, nodes)
    normalizer = Normalizer(cluster.config)
    normalizer.replace_all(cluster.nodes, cluster.services, cluster.slices)
    state = normalizer.state(generation=1)
    encoder = Encoder()
    encoder.update(state)
    assembler = Assembler()
    for w in plan_writes(None, encoder.snapshot(1)):
        assembler.update(w.key, w.value)
    first = assembler.complete()
    assert first is not None
    app = DirectorApp(FakeIpvs(), FakeHost(), source=None,
                      settings=DirectorSettings(mode="bgp", vs_sysctls={}, drain_timeout=0.0))
    app.offer(first)
    asyncio.run(app.reconcile_once())
    slices = [s for s in cluster.slices if len(s.endpoints) > 1]
    stages: dict[str, list[float]] = {"watcher": [], "subscriber": [], "director": [], "total": []}
    ops_per_change: list[int] = []
    for n in range(changes):
        original = slices[rng.randrange(len(slices))]
        # One more pod on a node that has one already (a weight change, never a drain), then gone.
        extra = dataclasses.replace(original.endpoints[0], address=f"10.255.{n // 250 % 250}.{n % 250 + 1}")
        grown = dataclasses.replace(original, endpoints=(*original.endpoints, extra))
        for generation, es in ((2 * n + 2, grown), (2 * n + 3, original)):
            t0 = time.perf_counter()
            normalizer.upsert_endpointslice(es)
            new_state = normalizer.state(generation=generation)
            writes = encoder.update(new_state).writes(encoder.meta(generation))
            t1 = time.perf_counter()
            for w in writes:
                assembler.update(w.key, w.value)
            assembled = assembler.complete()
            assert assembled is not None
            t2 = time.perf_counter()
            app.offer(assembled)
            done = asyncio.run(app.reconcile_once())
            t3 = time.perf_counter()
            stages["watcher"].append(t1 - t0)
            stages["subscriber"].append(t2 - t1)
            stages["director"].append(t3 - t2)
            stages["total"].append(t3 - t0)
            ops_per_change.append(len(done))
    app.close()
    return {"vip_ports": len(state.services), "endpoints": sum(len(s.endpoints) for s in cluster.slices),
            "stages": {k: figures(v) for k, v in stages.items()},
            "ops_per_change": sorted(set(ops_per_change))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--sizes", default="1000,10000,30000")
    ap.add_argument("--changes", type=int, default=100)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--nodes", type=int, default=None, help="node count (default: 1,000 x size / 10,000)")
    ap.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = ap.parse_args()
    runs = [measure(int(size), args.changes, args.seed, args.nodes) for size in args.sizes.split(",")]
    print("one endpoint change, stage by stage (median / p99 ms); the work should follow the change, not the size")
    print(f"{'VIP:ports':>10}{'watcher':>18}{'subscriber':>18}{'director':>18}{'total':>18}")
    for r in runs:
        cells = "".join(f"{r['stages'][k]['median_ms']:>9.2f} /{r['stages'][k]['p99_ms']:>7.2f}"
                        for k in ("watcher", "subscriber", "director", "total"))
        print(f"{r['vip_ports']:>10}{cells}")
    result = {"environment": {"python": platform.python_version(), "machine": platform.machine()}, "runs": runs}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
