"""`make bench`'s last step: every benchmark's JSON in bench/results/ as one report.

Writes `docs/performance.md` (tables, with the machine they ran on) and `bench/results.json`
(the machine description and every benchmark's results as they wrote them). A benchmark that did
not run (no JSON) is listed as such; nothing is invented. Comparisons with the original's
methods are the ratios each benchmark measured in its own run.

    .venv/bin/python bench/report.py [--results bench/results] [--markdown docs/performance.md]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

REPO: Final = Path(__file__).resolve().parents[1]
Doc = dict[str, Any]


def get(doc: Any, path: str, default: Any = None) -> Any:
    """`doc["a"]["b"]` for path "a.b"; `default` when any part is missing."""
    for part in path.split("."):
        if not isinstance(doc, dict) or part not in doc:
            return default
        doc = doc[part]
    return doc


def num(value: Any, digits: int = 1) -> str:
    if isinstance(value, bool) or value is None:
        return "-" if value is None else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def timing(doc: Any) -> str:
    """`median ms (min-max, p99 ..., n runs)` of a {median_ms, p99_ms, min_ms, max_ms, runs} dict."""
    if not isinstance(doc, dict) or "median_ms" not in doc:
        return "-"
    runs = doc.get("runs")
    spread = f"{num(doc.get('min_ms'), 2)}-{num(doc.get('max_ms'), 2)}"
    return (f"{num(doc['median_ms'], 2)} ms (min-max {spread}, p99 {num(doc.get('p99_ms'), 2)}"
            + (f", {runs} runs" if runs else "") + ")")


def table(header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return [*out, ""]


def _command(*cmd: str) -> str:
    if shutil.which(cmd[0]) is None:
        return "not installed"
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=10)
    return (done.stdout or done.stderr).strip().splitlines()[0] if (done.stdout or done.stderr).strip() else "?"


def machine() -> Doc:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = "?"
    try:
        kb = int(next(line for line in Path("/proc/meminfo").read_text().splitlines()
                      if line.startswith("MemTotal")).split()[1])
        memory = f"{kb / 1024 / 1024:.1f} GiB"
    except (OSError, StopIteration, ValueError):
        pass
    distro = "?"
    with contextlib.suppress(OSError, StopIteration):
        distro = next(line.split("=", 1)[1].strip('"') for line in Path("/etc/os-release").read_text().splitlines()
                      if line.startswith("PRETTY_NAME="))
    return {
        "cpu": cpu, "cpus": os.cpu_count(), "memory": memory, "os": distro, "kernel": platform.release(),
        "python": platform.python_version(), "nft": _command("nft", "--version"),
        "gobgpd": _command("gobgpd", "--version"), "nats-server": _command("nats-server", "--version"),
        "ipvs_on_host": Path("/proc/net/ip_vs").exists(), "generated_at": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                                        time.gmtime()),
    }


# -- one section per benchmark ---------------------------------------------------------------------

def render_section(d: Doc) -> list[str]:
    sizes = d.get("sizes", {})
    lines = [f"{num(sizes.get('vip_ports'))} VIP:ports, {num(sizes.get('endpoints'))} endpoints, "
             f"{num(sizes.get('nodes'))} nodes. Best of {get(d, 'environment.repeat')} runs per step.", ""]
    rows = [(s["name"], num(s.get("best_seconds"), 3), num(round((s.get("peak_bytes") or 0) / 2**20, 1)))
            for s in d.get("steps", []) if isinstance(s, dict)]
    lines += table(("step", "best s", "peak MiB"), rows)
    head = d.get("headline", {})
    lines.append(f"Files to cluster state (the headline): {num(head.get('seconds'), 2)} s "
                 f"({num(head.get('seconds_gc_off'), 2)} s with the GC off), target {head.get('target_seconds')} s.")
    return [*lines, ""]


def watcher_section(d: Doc) -> list[str]:
    return table(("what", "figure"), [
        ("cluster", f"{num(d.get('nodes'))} nodes, {num(d.get('services'))} VIP:ports, "
                    f"{num(d.get('endpoints'))} endpoints"),
        ("initial list → first complete publish", f"{num(d.get('initial_list_to_first_publish_s'), 2)} s "
                                                  f"({num((d.get('first_publish_bytes') or 0) / 2**20, 1)} MiB)"),
        ("one EndpointSlice change → published", f"p50 {num((d.get('change_to_publish_p50_s') or 0) * 1000, 1)} ms, "
                                                 f"p99 {num((d.get('change_to_publish_p99_s') or 0) * 1000, 1)} ms "
                                                 f"({d.get('changes')} changes)"),
        ("bytes written per change", f"median {num(d.get('change_bytes_median'), 0)}"),
        ("watcher max RSS", f"{num((d.get('max_rss_bytes') or 0) / 2**20, 0)} MiB"),
    ])


def realserver_section(d: Doc) -> list[str]:
    steps = [("render the node's nft table", "render_nft"), ("full load, nft -f", "full_apply_nft_f"),
             ("full load, libnftables", "full_apply_libnftables"),
             ("one endpoint: element delta through libnftables", "incremental_libnftables"),
             ("one endpoint: element delta through nft -f", "incremental_nft_f"),
             ("one endpoint: the whole realserver reconcile", "realserver_reconcile"),
             ("counters read over netlink", "counters_netlink"),
             ("original: iptables-restore of the nat table (nft backend)", "full_rewrite_iptables_nft"),
             ("original: iptables-restore (legacy)", "full_rewrite_iptables_legacy")]
    lines = [f"{num(d.get('vip_ports'))} VIP:ports, {num(d.get('endpoints'))} endpoints on one node.", ""]
    lines += table(("step", "time"), [(label, timing(d.get(key))) for label, key in steps])
    ratios = d.get("ratios", {})
    if ratios:
        lines += ["Ratios measured in the same run:", ""]
        lines += table(("original / ours", "x"), [(k, num(v, 1)) for k, v in ratios.items()])
    return lines


def director_section(d: Doc) -> list[str]:
    lines = [f"In the qemu VM (real IPVS, TCG emulation: {d.get('note', '')}). "
             f"{num(d.get('services'))} virtual services, {num(d.get('destinations'))} real servers.", ""]
    rows = [
        ("full load: plan + apply (netlink, batched)", timing(get(d, "full_director.observe_plan_apply"))),
        ("original: ipvsadm -R of the same rules", timing(get(d, "full_ipvsadm.restore"))),
        ("one weight change: plan", timing(get(d, "change_weight_director.plan"))),
        ("one weight change: apply", timing(get(d, "change_weight_director.apply"))),
        ("one weight change: plan + apply + observed_after",
         timing(get(d, "change_weight_director.plan_apply_observed_after"))),
        ("original: one ipvsadm -e exec", timing(d.get("change_weight_ipvsadm_e"))),
        ("original: the whole table again (ipvsadm -R)", timing(get(d, "change_whole_table_ipvsadm_R.restore"))),
        ("a full dump of IPVS (resyncs only)", timing(d.get("observe_full_dump"))),
    ]
    lines += table(("step", "time"), rows)
    ratios = d.get("ratios", {})
    if ratios:
        lines += table(("ratio", "x"), [(k, num(v, 2)) for k, v in ratios.items()])
    return lines


def dsr_section(d: Doc) -> list[str]:
    return table(("step", "figure"), [
        ("VIP:ports (each its own node set of 10)", num(d.get("services"))),
        ("first load", f"{num(d.get('full_load_s'), 2)} s, {num(d.get('full_load_elements'))} elements, "
                       f"peak RSS +{num(d.get('full_load_peak_rss_growth_mb'))} MB"),
        ("one weight change (element delta)", f"median {num(get(d, 'change_ms.median'), 2)} ms, "
                                              f"p99 {num(get(d, 'change_ms.p99'), 2)} ms"),
        ("a resync with nothing committed since", f"{num(d.get('observe_s'), 2)} s"),
        ("a restarted director adopts its table", f"{num(d.get('restart_adopt_s'), 2)} s"),
    ])


def maglev_section(d: Doc) -> list[str]:
    runs = d.get("runs", [])
    ns = sorted({int(n) for r in runs for n in r.get("moved_times_n", {})})
    header = ("slots", "build of 10,000 tables s", *(f"moved xN, N={n} (median/max)" for n in ns))
    rows = [(r.get("size"), num(r.get("build_s"), 2),
             *(f"{get(r, f'moved_times_n.{n}.median')}/{get(r, f'moved_times_n.{n}.max')}" for n in ns))
            for r in runs]
    return ["Flows moved by one backend change, times N (1.0 is ideal; the target is at most 1.2).", "",
            *table(header, rows)]


def bgp_section(d: Doc) -> list[str]:
    return table(("what", "figure"), [
        (f"VIP in state → in FRR's RIB ({d.get('latency_vips')} VIPs)",
         f"p50 {get(d, 'latency_ms.p50')} ms, p99 {get(d, 'latency_ms.p99')} ms"),
        (f"{num(d.get('vips'))} VIPs → all in gobgpd / in FRR",
         f"{get(d, 'bulk_s.to_gobgpd')} s / {get(d, 'bulk_s.to_frr')} s"),
        ("gobgpd restart → re-pushed / all in FRR", f"{get(d, 'restart_s.repushed_in_gobgpd')} s / "
                                                    f"{get(d, 'restart_s.in_frr')} s"),
        ("original: one `gobgp global rib add` exec per route", f"{get(d, 'original.execs_s')} s "
                                                               f"({get(d, 'original.per_route_ms')} ms each)"),
    ])


def garp_section(d: Doc) -> list[str]:
    return table(("what", "figure"), [
        (f"a gratuitous ARP round of {num(d.get('vips'))} VIPs", f"median {get(d, 'round_ms.median')} ms, "
                                                                 f"p99 {get(d, 'round_ms.p99')} ms"),
        ("original: one arping exec per VIP", f"{get(d, 'arping_exec_per_vip_ms')} ms each: "
                                              f"{get(d, 'arping_cycle_for_all_vips_s')} s a cycle"),
    ])


def lab_section(d: Doc) -> list[str]:
    def f(key: str, doc: Doc | None = None) -> str:
        x = (d if doc is None else doc).get(key)
        return f"p50 {x['p50_ms']} ms, p99 {x['p99_ms']} ms, max {x['max_ms']} ms ({x['count']})" if x else "-"
    scale = d.get("scale") or {}
    loaded = (f" With {num(scale.get('vip_ports'))} VIP:ports loaded (`--vip-ports`: synthetic services beside "
              f"the lab's, 10 endpoints each; both directors applied them {scale.get('directors_loaded_s')} s "
              "after the files were written). Target: listed → served p99 under 100 ms.") if scale else ""
    original = d.get("original_pipeline")
    rows = [
        ("endpoint added → first request served by it", f("added_pod_first_served")),
        ("  the lab starts the pod and lists it", f("added_pod_started_and_listed")),
        ("  listed → served (the load balancer)", f("added_pod_listed_to_first_served")),
        ("endpoint removed → requests avoid it", f("removed_pod_avoided")),
        ("  the lab takes it out of the feed", f("removed_pod_unlisted")),
        ("  unlisted → avoided (the load balancer)", f("removed_pod_unlisted_to_avoided")),
    ]
    if isinstance(original, dict):
        rows += [("original design, same feed: listed or unlisted → the node's nat table rewritten",
                  f("listed_to_applied", original)),
                 ("  of which the whole-table load (parse, normalize, render, iptables-restore)", f("load", original))]
    ratio = get(d, "ratios.original_listed_to_applied/ours_listed_to_effect_p50")
    return ["In the lab (`kube2ipvs lab`), from the write of `endpointslices.yaml`." + loaded
            + (" The original design's pipeline (`bench/original_pipeline.py`: 0.5 s debounce, a poll every 2 s, "
               "1 s delay, then the node's whole nat table by iptables-restore) ran on the same feed in the same run, "
               f"for {original.get('changes')} more edits of the same kind"
               + (f"; its p50 over ours (listed → effect, added and removed together): **{ratio}x**." if ratio else ".")
               if isinstance(original, dict) else ""), "",
            *table(("edit", "until"), rows)]


def failover_section(d: Doc) -> list[str]:
    def mm(x: Doc | None) -> str:
        return f"{x['median']} ({x['min']}-{x['max']})" if x else "-"
    rows = [(f"BGP: {name}", mm(r.get("withdrawn_s")), mm(r.get("tcp_gap_s")), mm(r.get("udp_gap_s")),
             mm(r.get("tcp_failed")), mm(r.get("udp_failed")))
            for name, r in (d.get("bgp") or {}).items()]
    a = d.get("arp") or {}
    rows.append(("ARP: active director gone", mm(a.get("neighbour_moved_s")), "-", mm(a.get("traffic_back_s")),
                 "-", mm(a.get("unanswered"))))
    return [f"dir1 broken {d.get('rounds')} times each way while a client opens a TCP connection and sends a UDP "
            "request every 20 ms (ARP: a UDP request every 50 ms). Seconds, median (min-max): until the router "
            "holds the other director alone (ARP: its neighbour entry has the standby's MAC), and the window in "
            "which requests failed, from the first failed one's start to the last one's end (a failed TCP request "
            "waits 2 s, a UDP one 1 s; ARP: from the director's loss to the next answer); in BGP mode about half "
            "the flows hash to the broken director. `silent` is the "
            "BGP hold timer (9 s in the lab), which BFD would shorten.", "",
            *table(("fault", "router moved s", "TCP gap s", "UDP gap s", "TCP failed", "UDP failed"), rows)]


def resources_section(d: Doc) -> list[str]:
    services = d.get("services") or {}
    sizes = d.get("sizes", {})
    lines = [f"{num(sizes.get('vip_ports'))} VIP:ports, {num(sizes.get('endpoints'))} endpoints; idle and under "
             f"{num(get(d, 'settings.changes_per_second'), 0)} endpoint changes/s. Targets: RSS under "
             f"{get(d, 'targets.rss_mib')} MiB, idle CPU under {get(d, 'targets.idle_cpu_percent')} % per service.",
             ""]
    rows = []
    for name, r in services.items():
        if isinstance(r, dict):
            rows.append((name, num(r.get("rss_mib_converged"), 1), num(r.get("hwm_mib"), 1),
                         num(get(r, "idle.cpu_percent"), 2), num(get(r, "load.cpu_percent"), 1)))
    return lines + table(("process", "RSS MiB", "peak MiB", "idle CPU %", "CPU % under load"), rows)


def change_scaling_section(d: Doc) -> list[str]:
    rows = []
    for r in d.get("runs", []):
        st = r.get("stages", {})
        rows.append((num(r.get("vip_ports")),
                     *(f"{get(st, f'{k}.median_ms')} / {get(st, f'{k}.p99_ms')}"
                       for k in ("watcher", "subscriber", "director", "total"))))
    return ["One endpoint change, in one process, stage by stage (median / p99 ms): the watcher's "
            "Normalizer and Encoder, the consumer's Assembler, the director's reconcile on its strict "
            "in-memory IPVS.", "",
            *table(("VIP:ports", "watcher", "subscriber", "director", "total"), rows)]


# -- scaling curves: one table over bench/results/scaling/ (bench_scaling.py) ------------------------

SCALING_TITLE: Final = "Scaling curves at 1k, 10k and 30k VIP:ports (`bench_scaling.py`)"
SCALING_BENCHES: Final = ("watcher", "change_scaling", "realserver", "dsr", "bgp", "resources", "director")


def median_range(doc: Any) -> str:
    """`median (min-max, n=runs)` in ms of a {median_ms, min_ms, max_ms, runs} dict."""
    if not isinstance(doc, dict) or "median_ms" not in doc:
        return "-"
    return (f"{num(doc['median_ms'], 2)} ({num(doc.get('min_ms'), 2)}-{num(doc.get('max_ms'), 2)}, "
            f"n={doc.get('runs', '?')})")


def _pair(a: Any, b: Any, scale: float = 1.0, digits: int = 2) -> str:
    if not isinstance(a, int | float) or not isinstance(b, int | float):
        return "-"
    return f"{num(float(a) * scale, digits)} / {num(float(b) * scale, digits)}"


def _ratio(first: Any, last: Any) -> str:
    if isinstance(first, int | float) and isinstance(last, int | float) and first > 0:
        return f"{num(last / first, 2)}x"
    return ""


def _stage(d: Doc, stage: str) -> Doc:
    runs = d.get("runs") or [{}]
    return get(runs[0], f"stages.{stage}", {}) or {}


# A row: label, step, the cell, and for one-change rows the median compared across sizes.
ScalingRow = tuple[str, str, Callable[[Doc], str], Callable[[Doc], Any] | None]
SCALING_ROWS: Final[tuple[ScalingRow, ...]] = (
    ("cluster: nodes / endpoints (watcher)", "watcher",
     lambda d: f"{num(d.get('nodes'))} / {num(d.get('endpoints'))}", None),
    ("watcher: initial list → first complete publish, s", "watcher",
     lambda d: num(d.get("initial_list_to_first_publish_s"), 2), None),
    ("watcher: one change → published, p50 / p99 ms", "watcher",
     lambda d: _pair(d.get("change_to_publish_p50_s"), d.get("change_to_publish_p99_s"), 1000, 1),
     lambda d: d.get("change_to_publish_p50_s")),
    ("watcher: max RSS, MiB", "watcher",
     lambda d: num(d["max_rss_bytes"] / 2**20, 0) if isinstance(d.get("max_rss_bytes"), int) else "-", None),
    *((f"one change in one process: {stage}, median / p99 ms", "change_scaling",
       (lambda d, s=stage: _pair(_stage(d, s).get("median_ms"), _stage(d, s).get("p99_ms"))),
       (lambda d, s=stage: _stage(d, s).get("median_ms")))
      for stage in ("watcher", "subscriber", "director", "total")),
    ("realserver: full load (libnftables), ms median (min-max)", "realserver",
     lambda d: median_range(d.get("full_apply_libnftables")), None),
    ("realserver: one-endpoint delta (libnftables), ms median (min-max)", "realserver",
     lambda d: median_range(d.get("incremental_libnftables")), lambda d: get(d, "incremental_libnftables.median_ms")),
    ("realserver: whole reconcile of one change, ms median (min-max)", "realserver",
     lambda d: median_range(d.get("realserver_reconcile")), lambda d: get(d, "realserver_reconcile.median_ms")),
    ("nftables dataplane (director): first load, s", "dsr", lambda d: num(d.get("full_load_s"), 2), None),
    ("nftables dataplane: one weight change, median / p99 ms", "dsr",
     lambda d: _pair(get(d, "change_ms.median"), get(d, "change_ms.p99")), lambda d: get(d, "change_ms.median")),
    ("nftables dataplane: first-load peak RSS growth, MB", "dsr",
     lambda d: num(d.get("full_load_peak_rss_growth_mb")), None),
    ("BGP: all VIPs → in gobgpd / in FRR, s", "bgp",
     lambda d: f"{_pair(get(d, 'bulk_s.to_gobgpd'), get(d, 'bulk_s.to_frr'), 1, 3)} ({num(d.get('vips'))} VIPs)",
     None),
    ("VM director (IPVS): full load observe + plan + apply, ms median (min-max)", "director",
     lambda d: median_range(get(d, "full_director.observe_plan_apply")), None),
    ("VM director: one weight change plan + apply, ms median (min-max)", "director",
     lambda d: median_range(get(d, "change_weight_director.plan_apply_observed_after")),
     lambda d: get(d, "change_weight_director.plan_apply_observed_after.median_ms")),
)


def load_scaling(results: Path) -> tuple[Doc | None, dict[str, Doc]]:
    """bench_scaling.json (the index) and every scaling/<step>-<size>.json, by `<step>-<size>`."""
    try:
        index = json.loads((results / "bench_scaling.json").read_text())
    except (OSError, ValueError):
        index = None
    docs: dict[str, Doc] = {}
    for path in sorted((results / "scaling").glob("*.json")):
        with contextlib.suppress(OSError, ValueError):
            docs[path.stem] = json.loads(path.read_text())
    return index if isinstance(index, dict) else None, docs


def scaling_section(index: Doc | None, docs: dict[str, Doc]) -> list[str]:
    """One row per metric, one column per size. With an index, a step's JSON counts only when the
    index says the step ran and wrote it (files of older runs left beside it are not shown)."""
    steps = {f"{s.get('bench')}-{s.get('size')}": s for s in (index or {}).get("steps", []) if isinstance(s, dict)}
    if index is not None:
        sizes = sorted(int(x) for x in index.get("sizes", []))
        have = {k: docs[k] for k, s in steps.items() if s.get("output") and k in docs}
    else:
        sizes = sorted({int(k.rsplit("-", 1)[1]) for k in docs if k.rsplit("-", 1)[-1].isdigit()})
        have = docs

    def why(bench: str, size: int) -> str:
        s = steps.get(f"{bench}-{size}")
        if s is None:
            return "not run"
        return f"{s.get('status')}: {s.get('reason') or 'no results'}"

    if not sizes:
        return ["No size has run yet (`bench/bench_scaling.py`).", ""]

    ratio_head = f"{num(sizes[-1])} / {num(sizes[0])}" if len(sizes) > 1 else ""
    header = ("metric", *(f"{num(n)} VIP:ports" for n in sizes), *((f"x ({ratio_head})",) if ratio_head else ()))
    rows: list[tuple[Any, ...]] = []
    for label, bench, cell, median in SCALING_ROWS:
        found = [have.get(f"{bench}-{n}") for n in sizes]
        ratio = (_ratio(*(median(d) if median and d else None for d in (found[0], found[-1]))),) \
            if ratio_head else ()
        rows.append((label, *(cell(d) if d else "-" for d in found), *ratio))
    memory = [have.get(f"resources-{n}") for n in sizes]
    names = list(dict.fromkeys(name for d in memory if d for name in (d.get("services") or {})))
    for i, name in enumerate(names or ["each service"]):
        cells = []
        for n, d in zip(sizes, memory, strict=True):
            r = get(d, f"services.{name}") if d else None
            # The reason once, in the first memory row; it would only repeat in the others.
            cells.append(f"{num(r.get('rss_mib_converged'))} ({num(r.get('hwm_mib'))})" if isinstance(r, dict)
                         else "-" if d else f"not run: {why('resources', n)}" if i == 0 else "not run")
        rows.append((f"memory: {name}, RSS MiB converged (peak)", *cells, *(("",) if ratio_head else ())))
    missing = [f"`{b}` at {num(n)}: {why(b, n)}" for n in sizes for b in SCALING_BENCHES
               if f"{b}-{n}" not in have]
    repeat = get(index, "settings.repeat")
    lines = [
        "Each size is bench_render's cluster of that many VIP:ports with about 10 endpoints each over 1,000 nodes "
        "(`--nodes 1000` for the watcher, the in-process stages and the resources run; the node count is in the "
        "first row); the realserver's benchmark gives one node every service, its worst case. Each step is one "
        "subprocess per size (`bench/bench_scaling.py`). Spread: the realserver's full loads"
        + (f" and the VM director's full loads (`--repeat {repeat}`, the director's within a time budget, so "
           "n says how many ran)" if repeat else " and the VM director's full loads (n runs)")
        + " are medians with min-max over runs; the one-change rows are medians with p99 or min-max over many "
        "changes in one run. The watcher's full publish, the dataplane's first load, BGP and the memory figures "
        "are one run per size: no spread is claimed for them. The nftables dataplane gives each VIP:port 10 nodes of "
        "its own; the VM director's benchmark synthesizes 5 real servers per service (TCG emulation: compare "
        "sizes, not absolute times). The last column divides the largest size's median by the smallest's "
        "for the one-change rows: 1x is a change that costs the same whatever the cluster's size.", "",
        *table(header, rows)]
    if missing:
        lines += ["Did not run (no figures): " + "; ".join(missing) + ".", ""]
    return lines


SECTIONS: Final[tuple[tuple[str, str, Callable[[Doc], list[str]]], ...]] = (
    ("bench_render", "Parsing, normalizing and rendering at cluster scale (`bench_render.py`)", render_section),
    ("bench_watcher", "The watcher with a real nats-server (`bench_watcher.py`)", watcher_section),
    ("bench_realserver", "Realserver: nftables full loads and one-endpoint deltas (`bench_realserver.py`, root)",
     realserver_section),
    ("bench_director", "Director: IPVS over netlink (`run_director_bench.sh`, VM)", director_section),
    ("bench_dsr", "Director: the nftables dataplane (`bench_dsr.py`, root)", dsr_section),
    ("bench_maglev", "Maglev tables (`bench_maglev.py`)", maglev_section),
    ("bench_bgp", "BGP speaker with gobgpd and FRR (`bench_bgp.py`, root)", bgp_section),
    ("bench_garp", "Gratuitous ARP (`bench_garp.py`, root)", garp_section),
    ("bench_lab", "End to end in the lab (`bench_lab.py`, root)", lab_section),
    ("bench_lab_10k", "End to end in the lab at 10,000 VIP:ports (`bench_lab.py --vip-ports 10000`, root)",
     lab_section),
    ("bench_failover", "Director failover, BGP and ARP (`bench_failover.py`, root)", failover_section),
    ("bench_change_scaling", "One change at 1k, 10k and 30k VIP:ports (`bench_change_scaling.py`)",
     change_scaling_section),
    ("bench_resources", "Memory and CPU of each service (`bench_resources.py`, root)", resources_section),
    ("bench_resources_1k", "Memory and CPU at 1,000 VIP:ports (`bench_resources.py --scale 0.1`, root)",
     resources_section),
)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--results", type=Path, default=REPO / "bench" / "results")
    ap.add_argument("--markdown", type=Path, default=REPO / "docs" / "performance.md")
    ap.add_argument("--json", type=Path, default=REPO / "bench" / "results.json")
    args = ap.parse_args()
    host = machine()
    collected: Doc = {}
    lines = ["# Performance", "",
             "Written by `make bench` (`bench/report.py`) from the JSON each benchmark wrote to `bench/results/`.",
             "Figures are medians unless said otherwise; comparisons with the original's methods are ratios "
             "measured in the same run. Absolute times depend on this machine:", "",
             *table(("", ""), [(k, v) for k, v in host.items()])]
    missing = []
    for name, title, section in SECTIONS:
        path = args.results / f"{name}.json"
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            missing.append(name)
            continue
        collected[name] = doc
        lines += [f"## {title}", "", *section(doc)]
        when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(path.stat().st_mtime))
        lines += [f"_Results of {when} UTC._", ""]
    index, scaling = load_scaling(args.results)
    if index is not None or scaling:
        collected["bench_scaling"] = {"index": index, "results": scaling}
        lines += [f"## {SCALING_TITLE}", "", *scaling_section(index, scaling)]
    else:
        missing.append("bench_scaling")
    if missing:
        lines += ["## Not run", "", "No results for: " + ", ".join(f"`{m}`" for m in missing) + ".", ""]
    args.markdown.parent.mkdir(parents=True, exist_ok=True)
    args.markdown.write_text("\n".join(lines))
    args.json.write_text(json.dumps({"machine": host, "benchmarks": collected}, indent=2) + "\n")
    print(f"wrote {args.markdown} and {args.json} ({len(collected)} benchmarks, {len(missing)} without results)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
