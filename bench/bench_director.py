"""Director benchmark: a full IPVS load and one-endpoint changes, by the director's netlink path
and by `ipvsadm`, against real IPVS. Run it in the qemu VM (the host kernel has no IPVS):

    bench/run_director_bench.sh [--scale 0.1 | --services 1000] [--changes 50] [--repeat 3]
    vm/run.sh --sh '.venv/bin/python bench/bench_director.py --services 1000'   # by hand

The desired state: --services virtual services (10,000 at --scale 1) with 5 direct-routed real
servers each (50,000), synthesized with a fixed seed: VIPs in 192.0.2.0/24 and 198.51.100.0/24
with 20 ports each (every tenth one UDP), real servers among 2,000 node addresses in
198.18.0.0/15, weights 1-20, a mix of wrr, wlc and mh (mh-fallback, mh-port), thresholds on
every tenth service.

Measured (median and p99 of the runs; one run of a full load is repeated only while the runs so
far took less than REPEAT_BUDGET_SECONDS):

(a) full load by the director's path, from an empty IPVS: `plan(desired, LinuxIpvs().observe())`
    and `LinuxIpvs().apply(ops)`, timed apart; then one full `observe()` and a second plan, which
    must be empty
(b) the same rules with `ipvsadm -R` (the text of `kube2ipvs.render.ipvsadm.service_lines`, after
    `ipvsadm -C`); `ipvsadm -Sn` after (a) and after (b) must list the same rules
(c) one-endpoint changes by the director's change path: one real server's weight changed, and
    separately one real server added; each plan must be exactly one op; timed plan + apply, with
    the observed state carried forward by `observed_after(previous, ops)` as the director does
    between resyncs (no dump); the time of one full `observe()` dump at this size is reported too
(d) the original method for one change: the whole table again (`ipvsadm -R` of `-C` and every
    rule, one exec), and `ipvsadm -e` / `ipvsadm -a` of the one real server (one exec each)

Under TCG emulation (the VM) every figure is 10-100x a native one: compare the ratios, not the
absolute times. --services 1000 takes about 10 minutes there; 10,000 about ten times that.
Prints a table and writes JSON (--output; in the VM the default is
$KUBE2IPVS_VM_OUT/bench_director.json, as the host root is read-only there, which
bench/run_director_bench.sh copies to bench/results/).

It clears IPVS (`ipvsadm -C`) before each load and at the end: outside the VM it refuses to run
when IPVS holds any virtual service.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Final

from kube2ipvs.ipvs import IpvsDest, IpvsService
from kube2ipvs.lbconfig import Protocol
from kube2ipvs.render.ipvsadm import service_lines
from kube2ipvs_director.kernel import KernelError, LinuxIpvs
from kube2ipvs_director.plan import (
    AddDest,
    CanonicalVips,
    EditDest,
    Observed,
    Op,
    canonical_vips,
    observed_after,
    plan,
    service_id,
    service_order,
)

SERVICES_AT_SCALE_1: Final = 10_000
DESTS_PER_SERVICE: Final = 5
PORTS_PER_VIP: Final = 20
NODE_ADDRESSES: Final = 2_000
REPEAT_BUDGET_SECONDS: Final = 60.0
IN_VM: Final = os.environ.get("KUBE2IPVS_IN_VM") == "1"
VM_OUT: Final = os.environ.get("KUBE2IPVS_VM_OUT")
HOST_OUTPUT: Final = Path(__file__).resolve().parent / "results" / "bench_director.json"
DEFAULT_OUTPUT: Final = Path(VM_OUT) / "bench_director.json" if IN_VM and VM_OUT else HOST_OUTPUT
STARTED: Final = time.perf_counter()
TCG_NOTE: Final = ("timings under qemu TCG emulation (no KVM): 10-100x slower than native; "
                   "compare the ratios, not the absolute times")


# ---------------------------------------------------------------------------------------------
# The desired state


def vip(index: int) -> str:
    """192.0.2.1-250, then 198.51.100.1-250, then 203.0.113.1-250, then 198.19.x.y past that."""
    for block, prefix in enumerate(("192.0.2", "198.51.100", "203.0.113")):
        if index < (block + 1) * 250:
            return f"{prefix}.{index - block * 250 + 1}"
    rest = index - 750
    return f"198.19.{128 + rest // 250}.{rest % 250 + 1}"


def node_address(index: int) -> str:
    """Node addresses in 198.18.0.0/15 (RFC 2544), below 198.19.128.0 (the spare VIPs)."""
    return f"198.18.{index // 250}.{index % 250 + 1}" if index < 64_000 else f"198.19.{(index - 64_000) // 250}.1"


def build_desired(count: int, seed: int) -> list[IpvsService]:
    rng = random.Random(seed)
    ports_per_vip = max(PORTS_PER_VIP, math.ceil(count / 500))
    services = []
    for s in range(count):
        scheduler, flags = (("wrr", ()), ("mh", (1, 2)), ("wlc", ()), ("wrr", ()))[s % 4]
        thresholds = (200, 100) if s % 10 == 0 else (0, 0)
        port = 8000 + s % ports_per_vip
        protocol: Protocol = "udp" if s % 10 == 9 else "tcp"
        nodes = sorted(rng.sample(range(NODE_ADDRESSES), DESTS_PER_SERVICE))
        dests = tuple(IpvsDest(node_address(n), port, "g", rng.randint(1, 20), *thresholds) for n in nodes)
        services.append(IpvsService(vip(s // ports_per_vip), 4, port, protocol, scheduler, flags, dests))
    return services


def ipvsadm_text(desired: Sequence[IpvsService]) -> str:
    return "".join(line + "\n" for line in service_lines(desired))


# ---------------------------------------------------------------------------------------------
# Timing and ipvsadm


def ms(seconds: Sequence[float]) -> dict[str, float]:
    ordered = sorted(s * 1000 for s in seconds)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {"runs": len(ordered), "median_ms": round(statistics.median(ordered), 3), "p99_ms": round(p99, 3),
            "min_ms": round(ordered[0], 3), "max_ms": round(ordered[-1], 3)}


def clock(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def say(message: str) -> None:
    """Progress on stderr (the VM console streams it), with the time since the start."""
    print(f"bench_director: [{time.perf_counter() - STARTED:7.1f} s] {message}", file=sys.stderr, flush=True)


def ipvsadm(*args: str, stdin: str | None = None) -> str:
    done = subprocess.run(["ipvsadm", *args], input=stdin, capture_output=True, text=True, check=False,
                          timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"ipvsadm {' '.join(args)}: exit {done.returncode}: {done.stderr.strip()[:1000]}")
    return done.stdout


def saved_rules() -> list[str]:
    return sorted(ipvsadm("-Sn").splitlines())


def refuse_reason() -> str | None:
    """Why the benchmark cannot run here, or None."""
    if shutil.which("ipvsadm") is None:
        return "ipvsadm is not installed (make system-packages installs it)"
    if not Path("/proc/net/ip_vs").exists():
        return ("IPVS is not available in this kernel (no /proc/net/ip_vs; the host kernel of the CI machines "
                "has none): run the benchmark in the qemu VM with bench/run_director_bench.sh, or "
                "vm/run.sh --sh '.venv/bin/python bench/bench_director.py ...'")
    kernel = LinuxIpvs()
    try:
        held = len(kernel.observe().services)
    except KernelError as exc:
        return f"IPVS cannot be read: {exc} (it needs root and IPVS: run it in the VM)"
    finally:
        kernel.close()
    if held and not IN_VM:
        return (f"IPVS holds {held} virtual services and the benchmark clears IPVS (ipvsadm -C): run it in the "
                "VM (bench/run_director_bench.sh) or on a host whose IPVS is empty")
    return None


# ---------------------------------------------------------------------------------------------
# (a) + (b) full loads


def director_full_loads(kernel: LinuxIpvs, desired: Sequence[IpvsService], owned: CanonicalVips,
                        repeat: int) -> tuple[dict[str, Any], list[str]]:
    plans, applies, totals, ops_count = [], [], [], 0
    for _ in range(repeat):
        ipvsadm("-C")
        t0 = time.perf_counter()
        observed = kernel.observe()
        t1 = time.perf_counter()
        p = plan(desired, observed, owned_vips=owned)
        t2 = time.perf_counter()
        kernel.apply(p.ops)
        t3 = time.perf_counter()
        plans.append(t2 - t1)
        applies.append(t3 - t2)
        totals.append(t3 - t0)
        ops_count = len(p.ops)
        if sum(totals) > REPEAT_BUDGET_SECONDS:
            break
    t0 = time.perf_counter()
    observed = kernel.observe()
    observe_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    again = plan(desired, observed, owned_vips=owned)
    replan_s = time.perf_counter() - t0
    result = {"ops": ops_count, "plan": ms(plans), "apply": ms(applies), "observe_plan_apply": ms(totals),
              "observe_after_load": ms([observe_s]), "second_plan": ms([replan_s]),
              "second_plan_ops": len(again.ops)}
    return result, saved_rules()


def ipvsadm_full_loads(text: str, repeat: int) -> tuple[dict[str, Any], list[str]]:
    clears, loads = [], []
    for _ in range(repeat):
        clears.append(clock(lambda: ipvsadm("-C")))
        loads.append(clock(lambda: ipvsadm("-R", stdin=text)))
        if sum(loads) > REPEAT_BUDGET_SECONDS:
            break
    return {"clear": ms(clears), "restore": ms(loads)}, saved_rules()


# ---------------------------------------------------------------------------------------------
# (c) + (d) one-endpoint changes


@dataclass(frozen=True, slots=True)
class Change:
    index: int  # the service's index in the desired list
    dest: IpvsDest  # the real server as it is after the change
    added: bool  # a new real server (else: a weight change)


def weight_change(desired: Sequence[IpvsService], rng: random.Random) -> Change:
    i = rng.randrange(len(desired))
    d = rng.choice(desired[i].dests)
    return Change(i, replace(d, weight=d.weight % 20 + 1), added=False)


def dest_addition(desired: Sequence[IpvsService], rng: random.Random) -> Change:
    i = rng.randrange(len(desired))
    taken = {d.address for d in desired[i].dests}
    while True:
        address = node_address(rng.randrange(NODE_ADDRESSES))
        if address not in taken:
            break
    svc = desired[i]
    return Change(i, IpvsDest(address, svc.port, "g", rng.randint(1, 20), 0, 0), added=True)


def changed(svc: IpvsService, change: Change) -> IpvsService:
    if change.added:
        return replace(svc, dests=(*svc.dests, change.dest))
    key = (change.dest.address, change.dest.port)
    return replace(svc, dests=tuple(change.dest if (d.address, d.port) == key else d for d in svc.dests))


def director_changes(kernel: LinuxIpvs, desired: list[IpvsService], owned: CanonicalVips, observed: Observed,
                     changes: int, make: Callable[[Sequence[IpvsService], random.Random], Change],
                     rng: random.Random) -> tuple[dict[str, Any], Observed]:
    """`changes` one-endpoint changes as the director's change path makes them
    (kube2ipvs_director.app `_plan_change`): plan of the services whose desired state changed
    (here the one) against what the last apply left of them, apply, observed_after of those
    services alone, kept by service id; `desired` is updated."""
    plans, applies, totals, op_counts = [], [], [], []
    kinds: set[str] = set()
    by_id = {s.id: s for s in observed.services}
    for _ in range(changes):
        change = make(desired, rng)
        desired[change.index] = changed(desired[change.index], change)
        t0 = time.perf_counter()
        touched = service_id(desired[change.index])
        before = Observed((by_id[touched],) if touched in by_id else ())
        ops: Sequence[Op] = plan([desired[change.index]], before, owned_vips=owned).ops
        t1 = time.perf_counter()
        kernel.apply(ops)
        t2 = time.perf_counter()
        for svc in observed_after(before, ops).services:
            by_id[svc.id] = svc
        t3 = time.perf_counter()
        plans.append(t1 - t0)
        applies.append(t2 - t1)
        totals.append(t3 - t0)
        op_counts.append(len(ops))
        kinds.update(type(op).__name__ for op in ops)
    want = AddDest if make is dest_addition else EditDest
    return {"plan": ms(plans), "apply": ms(applies), "plan_apply_observed_after": ms(totals),
            "ops_per_change": sorted(set(op_counts)), "op_kinds": sorted(kinds),
            "exactly_one_op": all(n == 1 for n in op_counts) and kinds == {want.__name__}}, \
        Observed(tuple(by_id[k] for k in sorted(by_id, key=service_order)))


def comparable(observed: Observed) -> set[tuple[Any, ...]]:
    """The observed services and real servers, whatever order the kernel or `observed_after` gives."""
    return {(s.id, s.scheduler, s.flags, s.persistent, s.one_packet, frozenset(s.dests)) for s in observed.services}


def ipvsadm_one_change_args(svc: IpvsService, change: Change) -> list[str]:
    d = change.dest
    args = ["-a" if change.added else "-e", "-u" if svc.protocol == "udp" else "-t", f"{svc.vip}:{svc.port}",
            "-r", f"{d.address}:{d.port}", "-g", "-w", str(d.weight)]
    if d.u_threshold:
        args += ["-x", str(d.u_threshold)]
    if d.l_threshold:
        args += ["-y", str(d.l_threshold)]
    return args


def ipvsadm_changes(desired: list[IpvsService], changes: int,
                    make: Callable[[Sequence[IpvsService], random.Random], Change],
                    rng: random.Random) -> dict[str, float]:
    runs = []
    for _ in range(changes):
        change = make(desired, rng)
        desired[change.index] = svc = changed(desired[change.index], change)
        args = ipvsadm_one_change_args(svc, change)
        runs.append(clock(partial(ipvsadm, *args)))
    return ms(runs)


def ipvsadm_whole_table(desired: list[IpvsService], repeat: int, rng: random.Random) -> dict[str, Any]:
    """One weight change applied as the whole table again: `-C` and every rule in one `ipvsadm -R`."""
    renders, loads = [], []
    for _ in range(repeat):
        change = weight_change(desired, rng)
        desired[change.index] = changed(desired[change.index], change)
        t0 = time.perf_counter()
        text = "-C\n" + ipvsadm_text(desired)
        t1 = time.perf_counter()
        ipvsadm("-R", stdin=text)
        t2 = time.perf_counter()
        renders.append(t1 - t0)
        loads.append(t2 - t1)
        if sum(loads) > REPEAT_BUDGET_SECONDS:
            break
    return {"render": ms(renders), "restore": ms(loads)}


# ---------------------------------------------------------------------------------------------
# The run


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    t0 = time.perf_counter()
    desired = build_desired(args.services, args.seed)
    build_s = time.perf_counter() - t0
    owned = canonical_vips(s.vip for s in desired)  # as the director holds them (app.py): canonical once
    t0 = time.perf_counter()
    text = ipvsadm_text(desired)
    render_s = time.perf_counter() - t0
    results: dict[str, Any] = {
        "benchmark": "bench_director",
        "note": TCG_NOTE if IN_VM else "native kernel (not the VM)",
        "in_vm": IN_VM,
        "services": len(desired),
        "destinations": sum(len(s.dests) for s in desired),
        "vips": len(owned),
        "seed": args.seed,
        "build_desired_s": round(build_s, 3),
        "render_ipvsadm_text": {**ms([render_s]), "bytes": len(text), "lines": text.count("\n")},
        "environment": {"python": platform.python_version(), "kernel": platform.release(),
                        "machine": platform.machine(), "cpus": os.cpu_count(),
                        "ipvsadm": ipvsadm("--version").strip()},
    }
    kernel = LinuxIpvs()
    try:
        # (a) the director's full load, (b) ipvsadm -R of the same rules
        say(f"(a) full load by the director: {len(desired)} services, {results['destinations']} real servers")
        results["full_director"], rules_director = director_full_loads(kernel, desired, owned, args.repeat)
        say(f"(a) done: {results['full_director']['apply']}; (b) full load by ipvsadm -R")
        results["full_ipvsadm"], rules_ipvsadm = ipvsadm_full_loads(text, args.repeat)
        results["full_same_rules"] = rules_director == rules_ipvsadm
        results["full_rules_lines"] = len(rules_director)
        if not results["full_same_rules"]:
            only_d = sorted(set(rules_director) - set(rules_ipvsadm))[:5]
            only_i = sorted(set(rules_ipvsadm) - set(rules_director))[:5]
            results["full_rules_diff_sample"] = {"director_only": only_d, "ipvsadm_only": only_i}

        # (c) one-endpoint changes, from the table ipvsadm -R left (the same as the director's)
        say(f"(b) done: {results['full_ipvsadm']['restore']}; (c) observe() dumps and one-endpoint changes")
        dumps: list[float] = []
        observed = Observed()
        while len(dumps) < args.dumps and sum(dumps) < REPEAT_BUDGET_SECONDS:
            t0 = time.perf_counter()
            observed = kernel.observe()
            dumps.append(time.perf_counter() - t0)
        results["observe_full_dump"] = ms(dumps)
        rng = random.Random(args.seed + 1)
        results["change_weight_director"], observed = director_changes(
            kernel, desired, owned, observed, args.changes, weight_change, rng)
        results["change_add_dest_director"], observed = director_changes(
            kernel, desired, owned, observed, args.changes, dest_addition, rng)
        fresh = kernel.observe()
        differ = comparable(fresh).symmetric_difference(comparable(observed))
        results["observed_after_matches_kernel"] = not differ
        if differ:
            results["observed_after_diff_sample"] = [repr(x) for x in sorted(differ, key=repr)[:6]]
        results["after_changes_plan_ops"] = len(plan(desired, fresh, owned_vips=owned).ops)

        # (d) the original method for one change
        say("(c) done; (d) ipvsadm -e / -a of one real server, and the whole table by ipvsadm -R")
        results["change_weight_ipvsadm_e"] = ipvsadm_changes(desired, args.changes, weight_change, rng)
        results["change_add_dest_ipvsadm_a"] = ipvsadm_changes(desired, args.changes, dest_addition, rng)
        results["change_whole_table_ipvsadm_R"] = ipvsadm_whole_table(desired, args.repeat, rng)
        results["after_ipvsadm_plan_ops"] = len(plan(desired, kernel.observe(), owned_vips=owned).ops)
    finally:
        kernel.close()
        ipvsadm("-C")
    results["wall_s"] = round(time.perf_counter() - started, 1)
    return results


def summarize(results: dict[str, Any]) -> list[str]:
    """The table printed; the ratios and targets are added to `results`."""
    full_d, full_i = results["full_director"], results["full_ipvsadm"]
    rows = [
        ("render ipvsadm text (Python)", results["render_ipvsadm_text"]),
        ("(a) full load, director: plan", full_d["plan"]),
        ("(a) full load, director: apply (netlink)", full_d["apply"]),
        ("(a) full load, director: observe+plan+apply", full_d["observe_plan_apply"]),
        ("(a) second plan after the load (no-op)", full_d["second_plan"]),
        ("(b) full load, ipvsadm -C", full_i["clear"]),
        ("(b) full load, ipvsadm -R", full_i["restore"]),
        ("(c) full observe() dump", results["observe_full_dump"]),
        ("(c) weight change, director: plan", results["change_weight_director"]["plan"]),
        ("(c) weight change, director: apply", results["change_weight_director"]["apply"]),
        ("(c) weight change, director: total", results["change_weight_director"]["plan_apply_observed_after"]),
        ("(c) add real server, director: plan", results["change_add_dest_director"]["plan"]),
        ("(c) add real server, director: apply", results["change_add_dest_director"]["apply"]),
        ("(c) add real server, director: total",
         results["change_add_dest_director"]["plan_apply_observed_after"]),
        ("(d) weight change, ipvsadm -e (1 exec)", results["change_weight_ipvsadm_e"]),
        ("(d) add real server, ipvsadm -a (1 exec)", results["change_add_dest_ipvsadm_a"]),
        ("(d) one change, whole table: render", results["change_whole_table_ipvsadm_R"]["render"]),
        ("(d) one change, whole table: ipvsadm -R", results["change_whole_table_ipvsadm_R"]["restore"]),
    ]
    lines = [f"kube2ipvs director benchmark: {results['services']} virtual services, {results['destinations']} "
             f"real servers on {results['vips']} VIPs ({results['note']})",
             f"{'':46}{'median ms':>12}{'p99 ms':>12}{'runs':>6}"]
    lines += [f"{label:46}{r['median_ms']:>12.1f}{r['p99_ms']:>12.1f}{r['runs']:>6}" for label, r in rows]

    director_full = full_d["plan"]["median_ms"] + full_d["apply"]["median_ms"]
    restore = full_i["restore"]["median_ms"]
    weight_total = results["change_weight_director"]["plan_apply_observed_after"]["median_ms"]
    ratios = {
        "full_director_plan_apply/ipvsadm_R": round(director_full / restore, 2),
        "whole_table_ipvsadm_R/director_weight_change":
            round(results["change_whole_table_ipvsadm_R"]["restore"]["median_ms"] / weight_total, 1),
        "ipvsadm_e/director_weight_change":
            round(results["change_weight_ipvsadm_e"]["median_ms"] / weight_total, 2),
        "observe_full_dump/director_weight_change":
            round(results["observe_full_dump"]["median_ms"] / weight_total, 1),
    }
    targets = {
        "full_load_no_slower_than_ipvsadm_R": director_full <= restore,
        "weight_change_exactly_1_op": results["change_weight_director"]["exactly_one_op"],
        "add_dest_exactly_1_op": results["change_add_dest_director"]["exactly_one_op"],
    }
    checks = {
        "second_plan_empty": full_d["second_plan_ops"] == 0,
        "same_ipvsadm_Sn_after_both_loads": results["full_same_rules"],
        "observed_after_matches_kernel": results["observed_after_matches_kernel"],
        "no_ops_left_after_changes": results["after_changes_plan_ops"] == 0,
        "no_ops_left_after_ipvsadm": results["after_ipvsadm_plan_ops"] == 0,
    }
    results.update(ratios=ratios, targets=targets, checks=checks)
    lines.append(f"full load: director plan+apply {director_full:.0f} ms ({full_d['ops']} ops) vs ipvsadm -R "
                 f"{restore:.0f} ms: {ratios['full_director_plan_apply/ipvsadm_R']}x")
    lines += [f"ratio {k}: {v}" for k, v in ratios.items()]
    lines += [f"target {k}: {'PASS' if v else 'MISS'}" for k, v in targets.items()]
    lines += [f"check {k}: {'ok' if v else 'FAILED'}" for k, v in checks.items()]
    lines.append(f"wall time {results['wall_s']} s; {TCG_NOTE if results['in_vm'] else results['note']}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--scale", type=float, default=1.0, help="1.0: 10,000 virtual services, 50,000 real servers")
    ap.add_argument("--services", type=int, default=None, help="virtual services (overrides --scale)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3, help="runs of each full load (within a time budget)")
    ap.add_argument("--changes", type=int, default=50, help="one-endpoint changes per method")
    ap.add_argument("--dumps", type=int, default=3, help="timed full observe() dumps (within a time budget)")
    ap.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help=f"JSON results (default {DEFAULT_OUTPUT})")
    args = ap.parse_args(argv)
    if args.services is None:
        args.services = max(1, round(SERVICES_AT_SCALE_1 * args.scale))
    if args.services < 1 or args.repeat < 1 or args.changes < 1 or args.dumps < 1:
        ap.error("--services/--scale, --repeat, --changes and --dumps must be positive")
    reason = refuse_reason()
    if reason is not None:
        print(f"bench_director: {reason}", file=sys.stderr)
        return 2
    print(f"bench_director: {args.services} services x {DESTS_PER_SERVICE} real servers "
          f"({'in the VM, TCG' if IN_VM else 'native'})", flush=True)
    results = run(args)
    lines = summarize(results)
    print("\n".join(lines))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    args.output.with_suffix(".txt").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.output}")
    failed = [k for k, v in results["checks"].items() if not v]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
