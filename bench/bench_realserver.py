"""Realserver benchmark: one node's nftables table, applied whole and changed one endpoint at a
time, against the original design's full `iptables-restore` of the nat table. Root only.

The node's share: the benchmark cluster of bench_render.py (`build_cluster(scale, seed)`,
normalized) with every backend folded into one for this node, so at --scale 1 the node serves
all 10,000 VIP:ports with the cluster's ~100,000 ready endpoints as its local pods: the largest
table a realserver can be asked to hold at the design's scale.

Measured, each in its own throw-away network namespace (prefix `k2i-bench-rs<pid>-`), through
the realserver's own kernel adapter (`LinuxKernel`):

(a) full apply: `render_nft` text loaded whole (libnftables on a throwaway context, as a restart
    or a resync after drift does), and the same text with `nft -f` (median of --repeat runs)
(b) one-endpoint change: `render_nft_delta(old, new)` applied by the adapter, in-process through
    its long-lived libnftables context, and again with the adapter's `nft -f` fallback (median
    and p99 over --changes changes each: a random service loses one endpoint, the next change
    gives it back). The pure Python cost of computing the delta is reported apart. After each
    method the table is compared with a full render of the final state.
(b2) the realserver's whole reconcile of one change: desired state from the node's slice
    (render included), plan against the kernel, apply (fewer runs: it renders the whole table)
(c) reading every counter: the adapter's netlink dumps, and `nft -j list set` of the 8 sets
(d) the original design's method: the whole nat table (RAVEL → one chain per service → one
    chain per endpoint with DNAT) in iptables-save form, loaded with `iptables-restore` (nft
    backend) and `iptables-legacy-restore` (median of --repeat runs). The original repeated
    this every 10 s whatever changed.

    sudo .venv/bin/python bench/bench_realserver.py [--scale 0.1] [--repeat 3] [--changes 60] [--output PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, Final

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_render import build_cluster

from kube2ipvs import libnft
from kube2ipvs.model import Backend, PodEndpoint, VirtualService, service_value
from kube2ipvs.names import COUNTER_KINDS, short_hash
from kube2ipvs.normalize import normalize
from kube2ipvs.protocol import NodeSlice, NodeSliceAssembler, node_service_key
from kube2ipvs.render.nft import TABLE, render_nft
from kube2ipvs_realserver.app import RealserverApp
from kube2ipvs_realserver.kernel import LinuxKernel
from kube2ipvs_realserver.plan import ReplaceTable, Settings, desired_state, table_delta

PREFIX: Final = f"k2i-bench-rs{os.getpid()}-"
NODE: Final = "node-bench"
NODE_IP: Final = "198.18.255.1"
DEFAULT_OUTPUT: Final = Path(__file__).resolve().parent / "results" / "bench_realserver.json"
INCREMENTAL_TARGET_MS: Final = 10.0
SPEEDUP_TARGET: Final = 100.0


# ---------------------------------------------------------------------------------------------
# The node's share


def node_share(scale: float, seed: int) -> list[VirtualService]:
    """Every virtual service of the benchmark cluster, with all its endpoints local to one node."""
    cluster = build_cluster(scale, seed)
    state = normalize(cluster.nodes, cluster.services, cluster.slices, cluster.config)
    share = []
    for vs in state.services:
        endpoints = tuple(sorted({ep for b in vs.backends for ep in b.endpoints}, key=lambda e: (e.address, e.port)))
        if endpoints:
            share.append(replace(vs, backends=(Backend(NODE, NODE_IP, endpoints),)))
    return share


def with_endpoints(vs: VirtualService, endpoints: tuple[PodEndpoint, ...]) -> VirtualService:
    return replace(vs, backends=(replace(vs.backends[0], endpoints=endpoints),))


def one_endpoint_changes(
    share: Sequence[VirtualService], count: int, rng: random.Random
) -> Iterator[tuple[list[VirtualService], list[VirtualService]]]:
    """`count` (old, new) pairs, each one endpoint apart from the last: a random service with two
    or more endpoints loses one, and the next change gives it back, so the share stays the same
    size however long the run."""
    current = list(share)
    candidates = [i for i, vs in enumerate(share) if len(vs.backends[0].endpoints) > 1]
    taken: tuple[int, VirtualService] | None = None
    for _ in range(count):
        new = list(current)
        if taken is None:
            i = rng.choice(candidates)
            endpoints = current[i].backends[0].endpoints
            drop = rng.randrange(len(endpoints))
            taken = (i, current[i])
            new[i] = with_endpoints(current[i], endpoints[:drop] + endpoints[drop + 1:])
        else:
            i, original = taken
            new[i], taken = original, None
        yield current, new
        current = new


# ---------------------------------------------------------------------------------------------
# The original design's rules: iptables-save text of the nat table


def ravel_nat_table(share: Sequence[VirtualService]) -> str:
    """The nat table the original realserver rewrote every 10 s: PREROUTING and OUTPUT jump to
    RAVEL, which matches each VIP:port and jumps to that service's chain; the service chain picks
    an endpoint chain with `statistic random` (probability 1/(n-i) for the i-th of n, so each
    gets 1/n), and the endpoint chain DNATs. Names carry a hash, as chain names are limited to
    28 characters."""
    chains = ["RAVEL"]
    rules = ["-A PREROUTING -j RAVEL", "-A OUTPUT -j RAVEL"]
    for vs in share:
        if vs.family != 4:
            continue  # ip6tables-restore's job; the benchmark cluster is IPv4 only
        identity = f"{vs.vip}:{vs.port}/{vs.protocol}"
        svc = f"RAVEL-SVC-{short_hash(identity)}"
        chains.append(svc)
        rules.append(f"-A RAVEL -d {vs.vip}/32 -p {vs.protocol} -m {vs.protocol} --dport {vs.port} -j {svc}")
        endpoints = vs.backends[0].endpoints
        for i, ep in enumerate(endpoints):
            chain = f"RAVEL-EP-{short_hash(f'{identity}>{ep.address}:{ep.port}')}"
            chains.append(chain)
            left = len(endpoints) - i
            pick = f"-m statistic --mode random --probability {1 / left:.11f} " if left > 1 else ""
            rules.append(f"-A {svc} {pick}-j {chain}")
            dnat = f"-j DNAT --to-destination {ep.address}:{ep.port}"
            rules.append(f"-A {chain} -p {vs.protocol} -m {vs.protocol} {dnat}")
    head = ["*nat", *(f":{c} ACCEPT [0:0]" for c in ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"))]
    return "\n".join([*head, *(f":{c} - [0:0]" for c in chains), *rules, "COMMIT", ""])


# ---------------------------------------------------------------------------------------------
# Namespaces and the two ways to talk to nftables


def ns_run(ns: str, *cmd: str, stdin: str | None = None) -> str:
    done = subprocess.run(["ip", "netns", "exec", ns, *cmd], input=stdin, capture_output=True, text=True,
                          check=False, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} in {ns}: {done.stderr.strip()[:1000]}")
    return done.stdout


@contextmanager
def namespace(suffix: str) -> Iterator[str]:
    name = PREFIX + suffix
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        ns_run(name, "ip", "link", "set", "lo", "up")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


# ---------------------------------------------------------------------------------------------
# Timing


def ms(seconds: Sequence[float]) -> dict[str, float]:
    ordered = sorted(s * 1000 for s in seconds)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {"runs": len(ordered), "median_ms": round(statistics.median(ordered), 3), "p99_ms": round(p99, 3),
            "min_ms": round(ordered[0], 3), "max_ms": round(ordered[-1], 3)}


def timed(fn: Callable[[], object], repeat: int) -> dict[str, float]:
    runs = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return ms(runs)


def incremental(
    share: Sequence[VirtualService], changes: int, seed: int, apply: Callable[[str], None]
) -> tuple[dict[str, float], dict[str, float], list[VirtualService]]:
    """Apply `changes` one-endpoint deltas; timings of computing them and of applying them, and the
    share as it ends. The delta is computed as the realserver does: its desired state built from
    the previous one, then `table_delta` (`render_entries_delta` of the two)."""
    compute, applied = [], []
    final = list(share)
    vips = tuple(dict.fromkeys(vs.vip for vs in share))
    previous = desired_state(NodeSlice(NODE, vips, tuple(share)), Settings())
    for _, new in one_endpoint_changes(share, changes, random.Random(seed)):
        t0 = time.perf_counter()
        desired = desired_state(NodeSlice(NODE, vips, tuple(new)), Settings(), previous)
        text = table_delta(desired, previous)
        assert text is not None  # (built from `previous`: always known)
        previous = desired
        t1 = time.perf_counter()
        apply(text)
        t2 = time.perf_counter()
        compute.append(t1 - t0)
        applied.append(t2 - t1)
        final = new
    return ms(compute), ms(applied), final


def check_matches_full_render(ns: str, final: Sequence[VirtualService]) -> bool:
    """The table after the deltas lists exactly as the full render of the final share."""
    via_delta = ns_run(ns, "nft", "list", "ruleset")
    ns_run(ns, "nft", "-f", "-", stdin=render_nft(final))
    return via_delta == ns_run(ns, "nft", "list", "ruleset")


def kernel_deltas(
    kernel: LinuxKernel, share: Sequence[VirtualService], changes: int, seed: int
) -> tuple[dict[str, float], dict[str, float], list[VirtualService]]:
    """One-endpoint changes applied as the realserver applies them (ReplaceTable with a delta)."""
    def apply(delta: str) -> None:
        kernel.apply(ReplaceTable("bench", delta))  # a digest standing for the new table

    return incremental(share, changes, seed, apply)


def reconciles(
    ns: str, share: Sequence[VirtualService], changes: int, seed: int, state_file: Path
) -> dict[str, float]:
    """The realserver's whole path for each change, as it runs: the changed `node.` value into the
    subscriber's NodeSliceAssembler, its slice (with the delta) -> desired state -> plan -> apply."""
    kernel = LinuxKernel(netns=ns, state_file=state_file)
    app = RealserverApp(kernel, source=None, settings=Settings())
    assembler = NodeSliceAssembler(NODE)
    for vs in share:
        assembler.update(node_service_key(NODE, vs.vip, vs.port, vs.protocol), service_value(vs))
    try:
        app.offer(assembler.slice())
        asyncio.run(app.reconcile_once())
        runs = []
        for old, new in one_endpoint_changes(share, changes, random.Random(seed)):
            vs = next(b for a, b in zip(old, new, strict=True) if a is not b)  # the one that changed
            value = service_value(vs)
            t0 = time.perf_counter()
            assembler.update(node_service_key(NODE, vs.vip, vs.port, vs.protocol), value)
            app.offer(assembler.slice())
            ops = asyncio.run(app.reconcile_once())
            runs.append(time.perf_counter() - t0)
            if app.apply_error is not None or not any(isinstance(op, ReplaceTable) and op.delta for op in ops):
                raise RuntimeError(f"reconcile did not apply a delta: {app.apply_error} {ops}")
        return ms(runs)
    finally:
        kernel.close()


def nft_list_counters(ns: str) -> int:
    """Every counter element through nft (`nft -j list set`, one process per set)."""
    return sum(len(json.loads(ns_run(ns, "nft", "-j", "list", "set", "ip", TABLE, kind))["nftables"])
               for kind in COUNTER_KINDS)


# ---------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    share = node_share(args.scale, args.seed)
    build_s = time.perf_counter() - t0
    endpoints = sum(len(vs.backends[0].endpoints) for vs in share)
    text = render_nft(share)
    results: dict[str, Any] = {
        "scale": args.scale, "seed": args.seed, "vip_ports": len(share), "endpoints": endpoints,
        "build_share_s": round(build_s, 2), "nft_text_bytes": len(text),
        "environment": {"python": platform.python_version(), "kernel": platform.release(),
                        "cpus": os.cpu_count(), "nft": ns_version("nft", "--version"),
                        "libnftables": libnft.available()},
    }
    results["render_nft"] = timed(lambda: render_nft(share), args.repeat)

    with namespace("nft") as ns, tempfile.TemporaryDirectory(prefix="k2i-bench-rs-") as tmp:
        state = Path(tmp) / "state.json"
        results["full_apply_nft_f"] = timed(lambda: ns_run(ns, "nft", "-f", "-", stdin=text), args.repeat)
        kernel = LinuxKernel(netns=ns, state_file=state)
        try:
            whole = ReplaceTable("bench", None, lambda: text)
            results["full_apply_libnftables"] = timed(lambda: kernel.apply(whole), args.repeat)
            # The table now holds render_nft(share): the deltas start from there.
            compute, applied, final = kernel_deltas(kernel, share, args.changes, args.seed)
            results["delta_compute_python"] = compute
            results["incremental_libnftables"] = applied
            results["incremental_libnftables_matches_full_render"] = check_matches_full_render(ns, final)
            results["counters_netlink"] = timed(kernel.counters, args.repeat)
            results["counter_elements"] = sum(len(kinds) for kinds in kernel.counters().values())
        finally:
            kernel.close()
        t0 = time.perf_counter()
        listed = nft_list_counters(ns)
        results["counters_nft_list_set"] = ms([time.perf_counter() - t0])
        results["counter_sets_listed"] = listed

        cli = LinuxKernel(netns=ns, state_file=state, use_libnftables=False)
        try:
            ns_run(ns, "nft", "-f", "-", stdin=text)
            _, applied_cli, final_cli = kernel_deltas(cli, share, args.changes, args.seed + 1)
        finally:
            cli.close()
        results["incremental_nft_f"] = applied_cli
        results["incremental_nft_f_matches_full_render"] = check_matches_full_render(ns, final_cli)

        ns_run(ns, "nft", "-f", "-", stdin="".join(f"table {f} {TABLE}\ndelete table {f} {TABLE}\n"
                                                   for f in ("ip", "ip6")))
        results["realserver_reconcile"] = reconciles(ns, share, args.reconciles, args.seed + 2, state)

    ravel = ravel_nat_table(share)
    results["iptables_text_bytes"] = len(ravel)
    results["iptables_chains"] = ravel.count("\n:") - 3  # less the 4 built-ins; the first line has no \n
    for tool, key, suffix in (("iptables-restore", "full_rewrite_iptables_nft", "ipt-nft"),
                              ("iptables-legacy-restore", "full_rewrite_iptables_legacy", "ipt-legacy")):
        if shutil.which(tool) is None:
            continue
        with namespace(suffix) as ns:
            results[key] = timed(partial(ns_run, ns, tool, stdin=ravel), args.repeat)
    return results


def ns_version(*cmd: str) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    return done.stdout.strip()


def summarize(results: dict[str, Any]) -> list[str]:
    """The table printed, and the ratios added to `results`."""
    rows = [("render_nft (Python)", "render_nft"),
            ("(a) full apply, libnftables", "full_apply_libnftables"),
            ("(a) full apply, nft -f", "full_apply_nft_f"),
            ("delta computed (Python, incremental state)", "delta_compute_python"),
            ("(b) one endpoint, libnftables", "incremental_libnftables"),
            ("(b) one endpoint, nft -f", "incremental_nft_f"),
            ("(b2) one endpoint, whole reconcile", "realserver_reconcile"),
            ("(c) all counters, netlink dump", "counters_netlink"),
            ("(c) all counters, nft -j list set", "counters_nft_list_set"),
            ("(d) full rewrite, iptables-restore (nft)", "full_rewrite_iptables_nft"),
            ("(d) full rewrite, iptables-legacy-restore", "full_rewrite_iptables_legacy")]
    lines = [f"node share: {results['vip_ports']} VIP:ports, {results['endpoints']} endpoints "
             f"(scale {results['scale']})", f"{'':44}{'median ms':>12}{'p99 ms':>12}{'runs':>6}"]
    for label, key in rows:
        if key in results:
            r = results[key]
            lines.append(f"{label:44}{r['median_ms']:>12.3f}{r['p99_ms']:>12.3f}{r['runs']:>6}")
    lines.append(f"tables after the deltas equal the full render: libnftables "
                 f"{results.get('incremental_libnftables_matches_full_render')}, nft -f "
                 f"{results.get('incremental_nft_f_matches_full_render')}")
    incs = ("incremental_libnftables", "incremental_nft_f", "realserver_reconcile")
    ratios: dict[str, float] = {}
    for inc in incs:
        for full in ("full_rewrite_iptables_nft", "full_rewrite_iptables_legacy"):
            if inc in results and full in results:
                ratios[f"{full}/{inc}"] = round(results[full]["median_ms"] / results[inc]["median_ms"], 1)
    results["ratios"] = ratios
    lines += [f"  {k}: {v}x" for k, v in ratios.items()]
    rewrite = results.get("full_rewrite_iptables_nft", {}).get("median_ms")
    results["targets"] = {
        inc: {"under_10ms": results[inc]["median_ms"] < INCREMENTAL_TARGET_MS,
              "100x_faster_than_iptables_restore": rewrite is not None
              and rewrite / results[inc]["median_ms"] >= SPEEDUP_TARGET}
        for inc in incs if inc in results
    }
    lines += [f"targets, {k}: {v}" for k, v in results["targets"].items()]
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--scale", type=float, default=1.0, help="1.0: 10,000 VIP:ports, ~100,000 endpoints")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3, help="runs of each full apply or rewrite")
    ap.add_argument("--changes", type=int, default=200, help="one-endpoint changes per method")
    ap.add_argument("--reconciles", type=int, default=10, help="changes through the whole realserver reconcile")
    ap.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root: creates network namespaces and loads rules in them", file=sys.stderr)
        return 2
    results = run(args)
    for line in summarize(results):
        print(line)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
