#!/usr/bin/env python3
"""Scaling curves (issue 10): every component benchmark at 1k, 10k and 30k VIP:ports, one
subprocess per benchmark and size, each writing its own JSON to bench/results/scaling/.

    sudo .venv/bin/python bench/bench_scaling.py [--sizes 1000,10000,30000] [--only watcher,dsr]
        [--skip-vm] [--repeat 3] [--timeout 3600] [--vm-timeout 10800] [--resources-seconds 30]

Steps, in this order for each size (the size is the cluster's VIP:ports, 10 endpoints each):

    watcher         bench_watcher.py --scale S            real nats-server; full publish, one change
    change_scaling  bench_change_scaling.py --sizes N     in one process, stage by stage
    realserver      bench_realserver.py --scale S --repeat R      root; one node holding every service
    dsr             bench_dsr.py --services N             root; the director's nftables dataplane
    bgp             bench_bgp.py --vips V                 root; gobgpd + FRR, V = that cluster's VIPs
    resources       bench_resources.py --scale S --repeat R      root; every service as a process
    director        bench_director.py --services N --repeat R    in the qemu VM (real IPVS)

S is N / 10,000 (bench_render's VIP_PORTS_AT_SCALE_1); V is the number of VIPs that
`build_cluster(S, seed)` has. `--repeat` goes only to the scripts that repeat runs themselves
(realserver, resources, director); the others run once per size, and the report says so.

The director step runs bench_director.py in the VM the way bench/run_director_bench.sh does
(vm/build.sh, then vm/run.sh --sh), but with its own --output in the VM's out share, copied
from there: run_director_bench.sh refuses --output and would overwrite
bench/results/bench_director.json, the 10k figures the report's director section shows.

Each step's output JSON is deleted before it runs, so a JSON present is one the last run of that
step wrote; its console output goes to scaling/<step>-<size>.log (`tail -f` it to follow). A step
that fails, writes no JSON or runs past --timeout (--vm-timeout in the VM) is recorded and the others still run; on a
timeout the step is sent SIGINT (the scripts clean up namespaces and servers in `finally`), then
after a grace period SIGTERM and SIGKILL, to the process group it leads and nothing else.

The index, bench/results/bench_scaling.json, lists the sizes and every step with its command,
status, exit code, duration, JSON and log; bench/report.py reads it. A run without --only starts
a new index; with --only the steps run replace their entries in the existing one.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_render import VIP_PORTS_AT_SCALE_1, build_cluster

REPO: Final = Path(__file__).resolve().parents[1]
BENCHES: Final = ("watcher", "change_scaling", "realserver", "dsr", "bgp", "resources", "director")
VM_BENCHES: Final = frozenset({"director"})
NODES: Final = 1000  # the curves: 10 endpoints per VIP:port over 1,000 nodes, at every size
SEED: Final = 1  # the seed the component scripts build their cluster with by default
INDEX_VERSION: Final = 1
# After SIGINT, time for a script's `finally` (namespaces, nats-server, gobgpd, FRR) before SIGTERM.
GRACE_SECONDS: Final = 60.0


@dataclass(frozen=True, slots=True)
class Step:
    bench: str
    size: int
    argv: tuple[str, ...]
    output: Path
    log: Path

    @property
    def key(self) -> str:
        return f"{self.bench}-{self.size}"


def vips_at(size: int) -> int:
    """The VIPs of bench_render's cluster of `size` VIP:ports: what BGP announces at that size."""
    cluster = build_cluster(size / VIP_PORTS_AT_SCALE_1, SEED)
    return len({e.vip for e in cluster.config.entries})


def command(bench: str, size: int, *, output: Path, repeat: int, vips: int,
            resources_seconds: float) -> tuple[str, ...]:
    """The subprocess for one benchmark at one size (pure: no I/O)."""
    py = sys.executable
    scale = f"{size / VIP_PORTS_AT_SCALE_1:g}"
    if bench == "watcher":
        return (py, "bench/bench_watcher.py", "--scale", scale, "--nodes", str(NODES), "--output", str(output))
    if bench == "change_scaling":
        return (py, "bench/bench_change_scaling.py", "--sizes", str(size), "--nodes", str(NODES),
                "--output", str(output))
    if bench == "realserver":
        return (py, "bench/bench_realserver.py", "--scale", scale, "--repeat", str(repeat), "--output", str(output))
    if bench == "dsr":
        return (py, "bench/bench_dsr.py", "--services", str(size), "--output", str(output))
    if bench == "bgp":
        return (py, "bench/bench_bgp.py", "--vips", str(vips), "--latency-vips", str(min(100, vips)),
                "--output", str(output))
    if bench == "resources":
        window = f"{resources_seconds:g}"
        # No py-spy: profiles are not what this run is for, and they would land beside the JSON.
        return (py, "bench/bench_resources.py", "--scale", scale, "--nodes", str(NODES), "--repeat", str(repeat),
                "--idle-seconds", window,
                "--load-seconds", window, "--py-spy", "", "--output", str(output))
    if bench == "director":
        # The host's / is read-only in the VM: the JSON goes to the out share (/dev/shm/out there).
        inner = (f".venv/bin/python bench/bench_director.py --services {size} --repeat {repeat} "
                 f"--output /dev/shm/out/{output.name}")
        return ("bash", "-c", f"vm/build.sh && vm/run.sh --sh {shlex.quote(inner)}")
    raise ValueError(f"unknown benchmark {bench!r}")


def last_line(log: Path) -> str:
    """The last non-empty line of a step's log: usually why it failed."""
    try:
        lines = [x.strip() for x in log.read_text(errors="replace").splitlines() if x.strip()]
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGINT to the script (its `finally` cleans up), then SIGTERM and SIGKILL to its group."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGINT)
    for sig, wait in ((signal.SIGTERM, GRACE_SECONDS), (signal.SIGKILL, 10.0)):
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
        else:
            break
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10.0)


def run_step(step: Step, *, timeout: float, vm_out: Path) -> dict[str, Any]:
    step.output.unlink(missing_ok=True)
    vm_copy = vm_out / step.output.name
    env = dict(os.environ)
    if step.bench in VM_BENCHES:
        vm_copy.unlink(missing_ok=True)
        # qemu's own timeout first, so vm/run.sh reports it rather than being killed.
        env["KUBE2IPVS_VM_TIMEOUT"] = str(max(60, int(timeout - 2 * GRACE_SECONDS)))
    started = time.perf_counter()
    timed_out = False
    with step.log.open("wb") as log:
        log.write(f"$ {shlex.join(step.argv)}\n".encode())
        log.flush()
        proc = subprocess.Popen(step.argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            stop(proc)
            rc = proc.returncode
        except KeyboardInterrupt:
            stop(proc)
            raise
    duration = round(time.perf_counter() - started, 1)
    if step.bench in VM_BENCHES and vm_copy.exists():
        shutil.copyfile(vm_copy, step.output)
    wrote = step.output.exists()
    if timed_out:
        status, reason = "timeout", f"still running after {timeout:g} s"
    elif rc != 0:
        status, reason = "failed", f"exit {rc}: {last_line(step.log)}"
    elif not wrote:
        status, reason = "no results", f"exit 0 without writing its JSON: {last_line(step.log)}"
    else:
        status, reason = "ok", ""
    return {"bench": step.bench, "size": step.size, "status": status, "reason": reason, "exit_code": rc,
            "duration_s": duration, "command": shlex.join(step.argv),
            "output": rel(step.output) if wrote else None, "log": rel(step.log),
            "finished_at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}


def rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def load_index(path: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and doc.get("version") == INDEX_VERSION else None


def write_index(path: Path, sizes: list[int], steps: dict[str, dict[str, Any]], settings: dict[str, Any]) -> None:
    ordered = sorted(steps.values(), key=lambda s: (s["size"], BENCHES.index(s["bench"])
                                                     if s["bench"] in BENCHES else len(BENCHES)))
    doc = {"version": INDEX_VERSION, "sizes": sizes, "settings": settings, "steps": ordered}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")


def print_summary(steps: list[dict[str, Any]]) -> None:
    print("\n==================== scaling curves: steps")
    print(f"{'step':<16}{'size':>8}  {'status':<11}{'seconds':>9}  output / reason")
    for s in steps:
        where = s["output"] if s["status"] == "ok" else s["reason"]
        print(f"{s['bench']:<16}{s['size']:>8}  {s['status']:<11}{s['duration_s'] or 0:>9.1f}  {where}")
    bad = [s for s in steps if s["status"] not in ("ok", "skipped")]
    print(f"{len(steps) - len(bad)} of {len(steps)} steps ok or skipped" + (f"; not ok: {len(bad)}" if bad else ""))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--sizes", default="1000,10000,30000", help="VIP:ports, comma-separated")
    ap.add_argument("--only", default="", help=f"comma-separated steps among {','.join(BENCHES)}")
    ap.add_argument("--skip-vm", action="store_true", help="leave out the director in the qemu VM")
    ap.add_argument("--repeat", type=int, default=3, help="passed to the scripts that repeat runs themselves")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per step on the host")
    ap.add_argument("--vm-timeout", type=float, default=10800.0,
                    help="seconds for the director in the VM (TCG: 10k with --repeat 1 took ~450 s)")
    ap.add_argument("--resources-seconds", type=float, default=30.0,
                    help="bench_resources' idle and load windows, each (seconds)")
    ap.add_argument("--results", type=Path, default=REPO / "bench" / "results",
                    help="writes <results>/scaling/<step>-<size>.json and <results>/bench_scaling.json")
    args = ap.parse_args()
    try:
        sizes = [int(x) for x in args.sizes.split(",") if x.strip()]
    except ValueError:
        ap.error("--sizes: comma-separated integers")
    only = [x.strip() for x in args.only.split(",") if x.strip()]
    if unknown := sorted(set(only) - set(BENCHES)):
        ap.error(f"--only: unknown steps {', '.join(unknown)} (known: {', '.join(BENCHES)})")
    if not sizes or min(sizes) < 1 or args.repeat < 1 or args.timeout <= 0 or args.vm_timeout <= 0:
        ap.error("--sizes, --repeat, --timeout and --vm-timeout must be positive")
    selected = [b for b in BENCHES if not only or b in only]
    if os.geteuid() != 0:
        print("note: not root: realserver, dsr, bgp, resources and the VM need root and will fail", file=sys.stderr)

    outdir = args.results / "scaling"
    outdir.mkdir(parents=True, exist_ok=True)
    index_path = args.results / "bench_scaling.json"
    vm_out = Path(os.environ.get("KUBE2IPVS_VM_CACHE", REPO / ".cache" / "vm")) / "out"
    previous = load_index(index_path) if only else None
    steps: dict[str, dict[str, Any]] = {f"{s['bench']}-{s['size']}": s for s in (previous or {}).get("steps", [])}
    index_sizes = sorted({*sizes, *(previous or {}).get("sizes", [])})
    settings = {"repeat": args.repeat, "timeout_s": args.timeout, "vm_timeout_s": args.vm_timeout,
                "resources_seconds": args.resources_seconds,
                "seed": SEED, "only": only, "skip_vm": args.skip_vm, "python": sys.executable}
    ran: list[dict[str, Any]] = []
    for size in sizes:
        vips = vips_at(size) if "bgp" in selected else 0
        for bench in selected:
            output = outdir / f"{bench}-{size}.json"
            step = Step(bench, size, command(bench, size, output=output, repeat=args.repeat, vips=vips,
                                             resources_seconds=args.resources_seconds),
                        output, outdir / f"{bench}-{size}.log")
            if bench in VM_BENCHES and args.skip_vm:
                result = {"bench": bench, "size": size, "status": "skipped", "reason": "--skip-vm", "exit_code": None,
                          "duration_s": None, "command": shlex.join(step.argv), "output": None, "log": None,
                          "finished_at": None}
            else:
                print(f"==> {step.key}: {shlex.join(step.argv)}\n    log: {rel(step.log)}", flush=True)
                result = run_step(step, timeout=args.vm_timeout if bench in VM_BENCHES else args.timeout,
                                  vm_out=vm_out)
                print(f"    {result['status']} after {result['duration_s']} s"
                      + (f": {result['reason']}" if result["reason"] else ""), flush=True)
            if bench == "bgp":
                result["vips"] = vips
            steps[step.key] = result
            ran.append(result)
            # Written after every step, so an interrupted run still leaves an index of what it did.
            write_index(index_path, index_sizes, steps, settings)
    print_summary(ran)
    print(f"wrote {rel(index_path)}")
    return 0 if all(s["status"] in ("ok", "skipped") for s in ran) else 1


if __name__ == "__main__":
    sys.exit(main())
