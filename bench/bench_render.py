"""Render benchmark: cluster state and cardinal rules at the scale DESIGN.md section 5 names.

Builds a synthetic cluster (1,000 nodes, 10,000 VIP:ports, 100,000 endpoints at --scale 1) twice:
as model objects, which feed normalize, and as the Kubernetes JSON objects the API would return,
which feed the kube.py parsers, so parsing is timed on its own. Every step is measured in
isolation: wall time first (best of --repeat runs, garbage collected before each), then the
tracemalloc peak in a separate pass so tracing does not distort the timing.

The headline is "normalize + IPVS render" (a director's work on a full-state update) against
the target of < 2 s and < 500 MB peak on one core; the process is pinned to one CPU for that.

Renderers other teams are still writing are imported by name when the bench runs; one that
does not import yet is reported as "missing" and the rest still run.

Addresses: VIPs in 192.0.2.0/24 (then 198.19.0.0/16 past 250 VIPs), nodes in 198.18.0.0/16
(RFC 2544's benchmarking range: 198.51.100.0/24 is too small for 1,000 nodes), pods in 10.0.0.0/8.

    python bench/bench_render.py [--scale 0.1] [--repeat 3] [--output PATH]
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import math
import os
import platform
import random
import resource
import sys
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final

from kube2ipvs.kube import SERVICE_NAME_LABEL, parse_endpointslices, parse_nodes, parse_services
from kube2ipvs.lbconfig import LBConfig, parse_lbconfig_value
from kube2ipvs.model import (
    ClusterState,
    EndpointSlice,
    Node,
    Service,
    ServicePort,
    SliceEndpoint,
    SlicePort,
)
from kube2ipvs.normalize import normalize

NODES_AT_SCALE_1: Final = 1_000
VIP_PORTS_AT_SCALE_1: Final = 10_000
ENDPOINTS_AT_SCALE_1: Final = 100_000
PORTS_PER_VIP: Final = 40
NAMESPACES: Final = 100
ZONE_LABEL: Final = "example.com/lb-zone"
TARGET_SECONDS: Final = 2.0
TARGET_BYTES: Final = 500 * 1024 * 1024
# A step slower than this is not repeated: one run of a slow step already says what matters.
REPEAT_BUDGET_SECONDS: Final = 20.0
DEFAULT_OUTPUT: Final = Path(__file__).resolve().parent / "results" / "bench_render.json"
MIB: Final = 1024 * 1024


# ---------------------------------------------------------------------------------------------
# The synthetic cluster


@dataclass(frozen=True, slots=True)
class Cluster:
    nodes: tuple[Node, ...]
    services: tuple[Service, ...]
    slices: tuple[EndpointSlice, ...]
    config: LBConfig
    config_doc: dict[str, Any]


def _vip(index: int) -> str:
    if index < 250:
        return f"192.0.2.{index + 1}"
    rest = index - 250
    return f"198.19.{rest // 250}.{rest % 250 + 1}"


def _node_ip(index: int) -> str:
    return f"198.18.{index // 250}.{index % 250 + 1}"


def _pod_ip(index: int) -> str:
    n = index + 1
    return f"10.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}"


def build_nodes(count: int) -> tuple[Node, ...]:
    """1 % not Ready, 2 % in another zone (not backends), 1 % cordoned (still backends)."""
    nodes = []
    for i in range(count):
        name = f"node-{i:04d}"
        nodes.append(Node(
            name=name,
            ready=i % 100 != 99,
            unschedulable=i % 100 == 42,
            labels={ZONE_LABEL: "blue" if i % 50 == 7 else "green", "kubernetes.io/hostname": name},
            internal_ips=(_node_ip(i),),
        ))
    return tuple(nodes)


def build_services_and_slices(
    count: int, endpoints: int, node_names: Sequence[str], rng: random.Random
) -> tuple[tuple[Service, ...], tuple[EndpointSlice, ...]]:
    """One Service (and one EndpointSlice) per VIP:port; endpoints spread at random over nodes, 3 % unready."""
    services: list[Service] = []
    slices: list[EndpointSlice] = []
    pod = 0
    for s in range(count):
        namespace, name = f"ns-{s % NAMESPACES:02d}", f"svc-{s:05d}"
        services.append(Service(
            namespace=namespace,
            name=name,
            headless=False,
            ports=(ServicePort("http", 80, "TCP"), ServicePort("metrics", 9090, "TCP")),
        ))
        # Spread the remainder so the total is exact at any scale.
        here = endpoints // count + (1 if s < endpoints % count else 0)
        eps = []
        for _ in range(here):
            eps.append(SliceEndpoint(
                address=_pod_ip(pod), ready=rng.random() >= 0.03, node_name=rng.choice(node_names)
            ))
            pod += 1
        slices.append(EndpointSlice(
            namespace=namespace,
            name=f"{name}-{s % 997:03x}z",
            service_name=name,
            family=4,
            ports=(SlicePort("http", 8080, "TCP"), SlicePort("metrics", 9090, "TCP")),
            endpoints=tuple(eps),
        ))
    return tuple(services), tuple(slices)


def build_config_doc(services: Sequence[Service]) -> dict[str, Any]:
    """The ConfigMap value: PORTS_PER_VIP ports per VIP, one Service each, a mix of IPVS options."""
    vip_count = math.ceil(len(services) / PORTS_PER_VIP)
    schedulers = ("wrr", "", "mh", "wlc")
    config: dict[str, dict[str, Any]] = {}
    for s, svc in enumerate(services):
        vip, port = _vip(s // PORTS_PER_VIP), 8000 + s % PORTS_PER_VIP
        config.setdefault(vip, {})[str(port)] = {
            "namespace": svc.namespace,
            "service": svc.name,
            "portName": "http",
            "tcpEnabled": True,
            "udpEnabled": False,
            "ipvsOptions": {
                "scheduler": schedulers[s % len(schedulers)],
                "forwardingMethod": "g",
                "uThreshold": 1000 if s % 10 == 0 else 0,
                "lThreshold": 500 if s % 10 == 0 else 0,
                "flags": "",
            },
        }
    return {
        "vipPool": [_vip(v) for v in range(vip_count)],
        "labels": {ZONE_LABEL: "green"},
        "mtuConfig": {_vip(0): "9000"},
        "config": config,
        "config6": {},
    }


def build_cluster(scale: float, seed: int, nodes: int | None = None) -> Cluster:
    rng = random.Random(seed)
    """The synthetic cluster at `scale` (1.0: 10,000 VIP:ports, 100,000 endpoints, 1,000 nodes);
    `nodes` fixes the node count instead of scaling it (the scaling curves keep 1,000)."""
    nodes_ = build_nodes(nodes if nodes is not None else max(1, round(NODES_AT_SCALE_1 * scale)))
    vip_ports = max(1, round(VIP_PORTS_AT_SCALE_1 * scale))
    endpoints = max(vip_ports, round(ENDPOINTS_AT_SCALE_1 * scale))
    services, slices = build_services_and_slices(vip_ports, endpoints, [n.name for n in nodes_], rng)
    doc = build_config_doc(services)
    return Cluster(nodes_, services, slices, parse_lbconfig_value(doc), doc)


# The same cluster as the API serves it (fields kube2ipvs reads, plus a few it skips over).


def node_object(node: Node) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": node.name, "labels": dict(node.labels)},
        "spec": {"unschedulable": True} if node.unschedulable else {},
        "status": {
            "conditions": [
                {"type": "MemoryPressure", "status": "False", "reason": "KubeletHasSufficientMemory"},
                {"type": "Ready", "status": "True" if node.ready else "False", "reason": "KubeletReady"},
            ],
            "addresses": [{"type": "InternalIP", "address": ip} for ip in node.internal_ips]
            + [{"type": "Hostname", "address": node.name}],
        },
    }


def service_object(svc: Service, index: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"namespace": svc.namespace, "name": svc.name},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": f"10.96.{index // 250}.{index % 250 + 1}",
            "ports": [
                {"name": p.name, "port": p.port, "protocol": p.protocol, "targetPort": p.name} for p in svc.ports
            ],
        },
    }


def slice_object(es: EndpointSlice) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "namespace": es.namespace,
            "name": es.name,
            "labels": {SERVICE_NAME_LABEL: es.service_name},
        },
        "addressType": "IPv4",
        "ports": [{"name": p.name, "port": p.port, "protocol": p.protocol} for p in es.ports],
        "endpoints": [
            {
                "addresses": [e.address],
                "conditions": {"ready": e.ready, "serving": e.ready, "terminating": False},
                "nodeName": e.node_name,
            }
            for e in es.endpoints
        ],
    }


def as_list(kind: str, items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": kind, "items": items}


# ---------------------------------------------------------------------------------------------
# Measuring


@dataclass
class Step:
    name: str
    status: str = "ok"  # ok | missing (...) | error (...)
    times: list[float] | None = None
    peak_bytes: int | None = None
    output_bytes: int | None = None
    output_lines: int | None = None
    detail: str = ""

    @property
    def best(self) -> float | None:
        return min(self.times) if self.times else None


def time_runs(fn: Callable[[], object], repeat: int) -> list[float]:
    times: list[float] = []
    for _ in range(repeat):
        gc.collect()
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
        del result
        if sum(times) > REPEAT_BUDGET_SECONDS:
            break
    return times


def traced_peak(fn: Callable[[], object]) -> int:
    """Bytes allocated at the step's high-water mark, over what was already live when it began."""
    gc.collect()
    tracemalloc.start()
    try:
        result = fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    del result
    return peak


def measure(name: str, fn: Callable[[], object], repeat: int, *, rules: bool = False) -> Step:
    """Time `fn`, then trace its peak; with `rules`, also record the size of the text it returns."""
    step = Step(name)
    try:
        step.times = time_runs(fn, repeat)
        step.peak_bytes = traced_peak(fn)
        output = fn()
    except Exception as exc:  # a renderer still being written may fail in any way
        step.status = f"error ({type(exc).__name__}: {exc})"
        return step
    if rules and isinstance(output, str):
        step.output_bytes = len(output.encode())
        step.output_lines = output.count("\n")
    return step


def load_renderer(module: str, function: str) -> Callable[..., object] | str:
    """The renderer function, or why it is missing (its module may not be written yet)."""
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        return f"missing ({exc})"
    except Exception as exc:  # a half-written module can fail to import in any way
        return f"missing ({module} does not import: {type(exc).__name__}: {exc})"
    fn = getattr(mod, function, None)
    if not callable(fn):
        return f"missing ({module}.{function} is not defined yet)"
    return fn  # type: ignore[no-any-return]


def measure_renderer(
    name: str, module: str, function: str, call: Callable[[Callable[..., object]], object], repeat: int
) -> Step:
    fn = load_renderer(module, function)
    if isinstance(fn, str):
        return Step(name, status=fn)
    return measure(name, lambda: call(fn), repeat, rules=True)


def busiest_node(state: ClusterState) -> str:
    """The node that backs the most virtual services: the largest realserver ruleset."""
    counts = Counter(b.node for vs in state.services for b in vs.backends)
    return counts.most_common(1)[0][0] if counts else (state.nodes[0].name if state.nodes else "")


# ---------------------------------------------------------------------------------------------
# The run


@dataclass
class Report:
    scale: float
    sizes: dict[str, Any]
    steps: list[Step]
    headline: dict[str, Any]
    environment: dict[str, Any]


def _max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def pin_one_cpu() -> str:
    try:
        cpus = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpus[-1]})
    except (AttributeError, OSError) as exc:
        return f"not pinned ({exc})"
    return f"pinned to CPU {cpus[-1]} of {len(cpus)}"


def parse_steps(cluster: Cluster, repeat: int) -> tuple[list[Step], dict[str, Any]]:
    node_objs = [node_object(n) for n in cluster.nodes]
    svc_objs = [service_object(s, i) for i, s in enumerate(cluster.services)]
    slice_objs = [slice_object(es) for es in cluster.slices]
    texts = [json.dumps(as_list(k, objs)) for k, objs in
             (("NodeList", node_objs), ("ServiceList", svc_objs), ("EndpointSliceList", slice_objs))]
    steps = [
        measure("json.loads of the 3 List files", lambda: [json.loads(t) for t in texts], repeat),
        measure("parse nodes", lambda: parse_nodes(node_objs), repeat),
        measure("parse services", lambda: parse_services(svc_objs), repeat),
        measure("parse endpointslices", lambda: parse_endpointslices(slice_objs), repeat),
    ]
    same = (
        parse_nodes(node_objs)[0] == list(cluster.nodes)
        and parse_services(svc_objs)[0] == list(cluster.services)
        and parse_endpointslices(slice_objs)[0] == list(cluster.slices)
    )
    steps[0].detail = f"{sum(len(t) for t in texts) / MIB:.1f} MiB of JSON"
    steps[-1].detail = "parsed objects equal the model objects" if same else "MISMATCH with the model objects"
    return steps, {"json_bytes": sum(len(t) for t in texts), "parsed_equals_model": same}


def render_steps(state: ClusterState, node: str, repeat: int) -> list[Step]:
    mine = state.for_node(node)
    return [
        measure("content_hash", lambda: replace(state).content_hash, repeat),
        measure_renderer("render ipvsadm (arp)", "kube2ipvs.render.ipvsadm", "render_ipvsadm",
                         lambda f: f(state, mode="arp"), repeat),
        measure(f"for_node({node})", lambda: state.for_node(node), repeat),
        measure_renderer(f"render nft ({node})", "kube2ipvs.render.nft", "render_nft",
                         lambda f: f(mine), repeat),
        measure_renderer(f"render iptables ({node})", "kube2ipvs.render.iptables", "render_iptables",
                         lambda f: f(mine), repeat),
        measure_renderer("render bgp", "kube2ipvs.render.bgp", "render_bgp",
                         lambda f: f(state, nexthop="198.51.100.2", communities=("64512:100",)), repeat),
        measure_renderer("render json", "kube2ipvs.render.json", "render_json", lambda f: f(state), repeat),
    ]


def without_gc(fn: Callable[[], object]) -> Callable[[], object]:
    def call() -> object:
        gc.disable()
        try:
            return fn()
        finally:
            gc.enable()

    return call


def headline(cluster: Cluster, repeat: int, input_bytes: int) -> tuple[list[Step], dict[str, Any]]:
    """The director's full-state update, as run (collector on), and with the collector off.

    The second figure is what tuning the cyclic collector (gc.freeze, thresholds) could at most
    win back: a full collection walks every live object, and the state is many small ones.
    """
    name = "normalize + IPVS render"
    fn = load_renderer("kube2ipvs.render.ipvsadm", "render_ipvsadm")
    if isinstance(fn, str):
        steps = [Step(name, status=fn)]
    else:
        render = fn

        def pipeline() -> object:
            state = normalize(cluster.nodes, cluster.services, cluster.slices, cluster.config)
            return render(state, mode="arp")

        steps = [
            measure(name, pipeline, repeat, rules=True),
            measure(f"{name}, gc off", without_gc(pipeline), repeat, rules=True),
        ]
    best, peak = steps[0].best, steps[0].peak_bytes
    verdict: dict[str, Any] = {
        "seconds": best,
        "seconds_gc_off": steps[-1].best if len(steps) > 1 else None,
        "peak_bytes": peak,
        "input_bytes": input_bytes,
        "target_seconds": TARGET_SECONDS,
        "target_bytes": TARGET_BYTES,
        "time_ok": best is not None and best < TARGET_SECONDS,
        # The director holds the state it renders from; count the inputs in, to be conservative.
        "memory_ok": peak is not None and peak + input_bytes < TARGET_BYTES,
    }
    return steps, verdict


def run(scale: float, repeat: int, seed: int) -> Report:
    pinned = pin_one_cpu()
    gc.collect()
    tracemalloc.start()
    cluster = build_cluster(scale, seed)
    input_bytes = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    rss_after_build = _max_rss_bytes()

    steps, parse_info = parse_steps(cluster, repeat)
    normalize_step = measure(
        "normalize", lambda: normalize(cluster.nodes, cluster.services, cluster.slices, cluster.config), repeat
    )
    steps.append(normalize_step)
    state = normalize(cluster.nodes, cluster.services, cluster.slices, cluster.config)
    node = busiest_node(state)
    steps += render_steps(state, node, repeat)
    head_steps, verdict = headline(cluster, repeat, input_bytes)
    steps += head_steps

    sizes: dict[str, Any] = {
        "nodes": len(cluster.nodes),
        "eligible_nodes": sum(n.eligible for n in state.nodes),
        "vips": len(cluster.config.vips()),
        "vip_ports": len(cluster.config.entries),
        "services": len(cluster.services),
        "endpoints": sum(len(es.endpoints) for es in cluster.slices),
        "virtual_services": len(state.services),
        "real_servers": sum(len(vs.backends) for vs in state.services),
        "ready_endpoints_in_state": sum(vs.total_weight for vs in state.services),
        "skipped": len(state.skipped),
        "busiest_node": node,
        "busiest_node_services": len(state.for_node(node)),
        "input_model_bytes": input_bytes,
        **parse_info,
    }
    environment = {
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "cpu": pinned,
        "repeat": repeat,
        "seed": seed,
        "max_rss_after_build_bytes": rss_after_build,
        "max_rss_bytes": _max_rss_bytes(),
    }
    return Report(scale, sizes, steps, verdict, environment)


# ---------------------------------------------------------------------------------------------
# Output


def _fmt(value: float | None, spec: str) -> str:
    """`value` in `spec` (e.g. "9.4f"), or a dash padded to the same width."""
    width = int(spec.split(".", maxsplit=1)[0] or 0)
    return "-".rjust(width) if value is None else format(value, spec)


def print_report(report: Report) -> None:
    s = report.sizes
    print(f"kube2ipvs render benchmark, scale {report.scale:g}: {s['nodes']} nodes ({s['eligible_nodes']} "
          f"eligible), {s['vip_ports']} VIP:ports on {s['vips']} VIPs, {s['endpoints']} endpoints")
    print(f"state: {s['virtual_services']} virtual services, {s['real_servers']} real servers, "
          f"{s['ready_endpoints_in_state']} ready endpoints, {s['skipped']} skipped; "
          f"input model objects {s['input_model_bytes'] / MIB:.1f} MiB")
    print(f"python {report.environment['python']}, {report.environment['cpu']}; "
          f"wall time = best of up to {report.environment['repeat']} runs; "
          "peak = tracemalloc, separate pass")
    print()
    header = f"{'step':<34} {'best s':>9} {'runs':>4} {'peak MiB':>9} {'output':>16}  status"
    print(header)
    print("-" * len(header))
    for step in report.steps:
        output = "" if step.output_bytes is None else f"{step.output_bytes / 1024:.0f} KiB/{step.output_lines} l"
        status = step.status + (f"; {step.detail}" if step.detail else "")
        peak = None if step.peak_bytes is None else step.peak_bytes / MIB
        runs = len(step.times) if step.times else 0
        print(f"{step.name:<34} {_fmt(step.best, '9.4f')} {runs:>4} {_fmt(peak, '9.2f')} {output:>16}  {status}")
    print()
    h = report.headline
    seconds = "n/a" if h["seconds"] is None else f"{h['seconds']:.3f} s"
    total = None if h["peak_bytes"] is None else (h["peak_bytes"] + h["input_bytes"]) / MIB
    print(f"headline: normalize + IPVS render = {seconds} (target < {h['target_seconds']:g} s: "
          f"{'PASS' if h['time_ok'] else 'MISS'}); peak {_fmt(total, '.1f')} MiB incl. inputs "
          f"(target < {h['target_bytes'] // MIB} MiB: {'PASS' if h['memory_ok'] else 'MISS'})")
    if h["seconds_gc_off"] is not None:
        print(f"          the same with the cyclic collector off: {h['seconds_gc_off']:.3f} s")
    env = report.environment
    print(f"process max RSS: {env['max_rss_bytes'] / MIB:.1f} MiB at the end "
          f"({env['max_rss_after_build_bytes'] / MIB:.1f} MiB after building the inputs; the rest is "
          "mostly the JSON steps and tracemalloc's own bookkeeping)")


def write_json(report: Report, path: Path) -> None:
    doc = {
        "benchmark": "bench_render",
        "scale": report.scale,
        "sizes": report.sizes,
        "steps": [
            {
                "name": st.name,
                "status": st.status,
                "best_seconds": st.best,
                "seconds": st.times,
                "peak_bytes": st.peak_bytes,
                "output_bytes": st.output_bytes,
                "output_lines": st.output_lines,
                "detail": st.detail,
            }
            for st in report.steps
        ],
        "headline": report.headline,
        "environment": report.environment,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the full size (default 1)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per step, best kept (default 3)")
    parser.add_argument("--seed", type=int, default=1, help="random seed of the synthetic cluster")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help=f"JSON results (default {DEFAULT_OUTPUT})")
    args = parser.parse_args(argv)
    if args.scale <= 0 or args.repeat < 1:
        parser.error("--scale must be > 0 and --repeat >= 1")
    report = run(args.scale, args.repeat, args.seed)
    print_report(report)
    write_json(report, args.output)
    print(f"results: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
