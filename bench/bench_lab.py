"""End-to-end convergence in the lab (issue 8), as root: from an edit of the lab's
endpointslices.yaml to the traffic effect, through the whole path (the watcher reading the
feed, NATS, the directors and realservers applying, the lab starting or stopping the pod).

It starts its own lab (`--name bench`) on a copy of lab/cluster/, then makes `--changes` edits,
alternately adding a web pod and removing it again, and measures from the write of the file:
- added: until the first request to 192.0.2.10:80 is served by the new pod, split into the lab's
  own part (it starts the pod, then lists it in the feed the watcher reads, as Kubernetes lists a
  pod once it is ready) and the load balancer's (from the feed to the first request served);
- removed: until the first request after which the next 20 all avoid it, split the same way
  (the lab takes it out of the feed; from there to the first of those requests).
Requests are made from the client namespace by a thread that entered it, about 1-2 ms each.
Prints p50/p99/max and writes JSON.

With --vip-ports N, the same edits are made with N more VIP:ports loaded first (bench_render's
synthetic cluster: 10 endpoints per VIP:port, 1,000 nodes of which node-1..3 are the lab's):
their objects are written beside the lab's feed as JSON files of their own, with the lab's
ConfigMap plus N entries (VIPs in 198.19.0.0/16, node addresses in 198.18.0.0/16, pods that
exist nowhere: nothing is sent to them). Every service carries the full load, so the change
path is measured at that scale; the lab's supervisor never reads these files, so its own part
stays what it is at the lab's size.

    sudo .venv/bin/python bench/bench_lab.py [--changes 50] [--vip-ports 10000]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import platform
import random
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Final

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_render import as_list, build_cluster, node_object, service_object, slice_object
from bench.original_pipeline import OriginalPipeline
from pyroute2 import netns as pyroute2_netns

from kube2ipvs.cli import main as cli_main
from kube2ipvs.kube import load_objects_text
from kube2ipvs.lab import PORTS, STATE_ROOT, in_ns, prefix
from kube2ipvs.labplan import DIRECTORS

NAME: Final = "bench"
REPO: Final = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT: Final = REPO / "bench" / "results" / "bench_lab.json"
VIP: Final = ("192.0.2.10", 80)
ANCHOR: Final = ("      - {addresses: [10.244.3.11], nodeName: node-3, conditions: {ready: true}, "
                 "targetRef: {kind: Pod, name: web-2}}\n")
AVOID_RUN: Final = 20
TIMEOUT: Final = 15.0
ORIGINAL_TIMEOUT: Final = 300.0  # the original's pipeline at 10k VIP:ports: seconds per whole-table load


class Client:
    """Requests from inside the client namespace, on a thread that entered it."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self._jobs: list[tuple[threading.Event, list[str | None]]] = []
        self._cv = threading.Condition()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        pyroute2_netns.pushns(self.namespace)
        while True:
            with self._cv:
                while not self._jobs:
                    self._cv.wait()
                done, out = self._jobs.pop(0)
            out.append(self._get())
            done.set()

    @staticmethod
    def _get() -> str | None:
        try:
            with socket.create_connection(VIP, timeout=1.0) as s:
                s.sendall(b"GET / HTTP/1.0\r\nHost: lab\r\n\r\n")
                data = b""
                while chunk := s.recv(4096):
                    data += chunk
        except OSError:
            return None
        body = data.split(b"\r\n\r\n", 1)[-1].decode(errors="replace").split()
        return body[0] if body else None

    def get(self) -> str | None:
        done, out = threading.Event(), list[str | None]()
        with self._cv:
            self._jobs.append((done, out))
            self._cv.notify()
        done.wait()
        return out[0]


def until_served(client: Client, pod: str, since: float, feed: Path, address: str) -> tuple[float, float] | None:
    """(seconds until the lab's feed lists the new pod, seconds until a request is served by it)."""
    listed: float | None = None
    while time.monotonic() - since < TIMEOUT:
        if listed is None:
            with contextlib.suppress(OSError):
                if f'"{address}"' in feed.read_text():
                    listed = time.monotonic() - since
        if client.get() == pod:
            served = time.monotonic() - since
            return (listed if listed is not None else served), served
    return None


def until_avoided(client: Client, pod: str, since: float, feed: Path, address: str) -> tuple[float, float] | None:
    """(seconds until the lab's feed no longer lists the pod, seconds until the first request
    after which the next AVOID_RUN all avoid it)."""
    run_start: float | None = None
    unlisted: float | None = None
    run = 0
    while time.monotonic() - since < TIMEOUT:
        t = time.monotonic()
        if unlisted is None:
            with contextlib.suppress(OSError):
                if f'"{address}"' not in feed.read_text():
                    unlisted = t - since
        answer = client.get()
        if answer is not None and answer != pod:
            run_start = t if run == 0 else run_start
            run += 1
            if run >= AVOID_RUN:
                assert run_start is not None
                return (unlisted if unlisted is not None else run_start - since), run_start - since
        else:
            run = 0
    return None


def measure(client: Client, slices: Path, changes: int) -> dict[str, list[float]]:
    """Edit `slices` `changes` times (add a web pod, remove it, ...); the delays seen."""
    got: dict[str, list[float]] = {"added": [], "listed": [], "lb": [], "removed": [], "unlisted": [],
                                   "lb_removed": [], "missed": []}
    base = slices.read_text()
    for i in range(changes):
        n = i // 2
        node = ("node-1", "node-2", "node-3")[n % 3]
        pod = f"web-x{n}"
        address = f"10.244.{n % 3 + 1}.{100 + n % 100}"
        line = ANCHOR.replace("10.244.3.11", address).replace("node-3", node).replace("web-2", pod)
        started = time.monotonic()
        slices.write_text(base.replace(ANCHOR, ANCHOR + line) if i % 2 == 0 else base)
        feed = STATE_ROOT / NAME / "cluster" / "objects.json"
        if i % 2 == 0:
            seen = until_served(client, pod, started, feed, address)
            if seen is None:
                got["missed"].append(time.monotonic() - started)
            else:
                got["listed"].append(seen[0])
                got["added"].append(seen[1])
                got["lb"].append(seen[1] - seen[0])
        else:
            gone = until_avoided(client, pod, started, feed, address)
            if gone is None:
                got["missed"].append(time.monotonic() - started)
            else:
                got["unlisted"].append(gone[0])
                got["removed"].append(gone[1])
                got["lb_removed"].append(max(0.0, gone[1] - gone[0]))
        time.sleep(0.3)
    return got


def measure_original(slices: Path, changes: int, feed_dir: Path) -> dict[str, list[float]]:
    """The same edits, waited for through the original design's pipeline (original_pipeline.py)
    run on the same feed: from the lab listing (or unlisting) the pod until the node's whole nat
    table was rewritten with it."""
    got: dict[str, list[float]] = {"listed_to_applied": [], "write_to_applied": [], "load_s": [], "missed": []}
    base = slices.read_text()
    feed = feed_dir / "objects.json"
    rng = random.Random(5)
    with OriginalPipeline(feed_dir, rng) as pipeline:
        for i in range(changes):
            n = 1000 + i // 2  # pods of their own: not the ones the traffic phase used
            node = LAB_NODES[n % 3]
            address = f"10.244.{n % 3 + 1}.{200 + i // 2 % 50}"
            line = ANCHOR.replace("10.244.3.11", address).replace("node-3", node).replace("web-2", f"web-o{n}")
            pipeline.set_node(node)
            started = time.monotonic()
            slices.write_text(base.replace(ANCHOR, ANCHOR + line) if i % 2 == 0 else base)
            listed = None
            while listed is None and time.monotonic() - started < TIMEOUT:
                with contextlib.suppress(OSError):
                    if (f'"{address}"' in feed.read_text()) == (i % 2 == 0):
                        listed = time.monotonic()
                time.sleep(0.002)
            load = pipeline.wait_applied(listed, node, ORIGINAL_TIMEOUT) if listed is not None else None
            if listed is None or load is None:
                got["missed"].append(time.monotonic() - started)
                continue
            got["listed_to_applied"].append(load.done_at - listed)
            got["write_to_applied"].append(load.done_at - started)
            got["load_s"].append(load.seconds)
            # At a random phase of the 2 s poll: edits timed by the last apply would fall in step with it.
            time.sleep(rng.uniform(0.3, 2.3))
    return got


LAB_NODES: Final = ("node-1", "node-2", "node-3")
SCALE_FILES: Final = 10  # EndpointSlices in this many files (the watcher polls every file's stamp)


def scale_vip(index: int) -> str:
    return f"198.19.{index // 250}.{index % 250 + 1}"


def write_scale(feed_dir: Path, cluster: Path, vip_ports: int) -> int:
    """The synthetic objects beside the lab's feed; returns the VIP:ports a director should hold."""
    synthetic = build_cluster(vip_ports / 10_000, seed=1)
    lab_objects = [o for f in sorted(cluster.iterdir()) if f.suffix in (".yaml", ".yml", ".json")
                   for o in load_objects_text(f.read_bytes(), source=str(f))]
    configmap = next(o for o in lab_objects if o.get("kind") == "ConfigMap")
    key, text = next(iter(configmap["data"].items()))
    doc = json.loads(text)
    rename = {f"node-{i:04d}": LAB_NODES[i] for i in range(len(LAB_NODES))}  # they get their share
    lab_label = dict(doc.get("labels") or {})
    nodes = []
    for n in synthetic.nodes:
        if n.name in rename:
            continue
        obj = node_object(n)
        obj["metadata"]["labels"] = {**obj["metadata"]["labels"], **lab_label}
        nodes.append(obj)
    slices = []
    for es in synthetic.slices:
        obj = slice_object(es)
        for ep in obj["endpoints"]:
            ep["nodeName"] = rename.get(ep["nodeName"], ep["nodeName"])
        slices.append(obj)
    per_vip = 40
    for i, svc in enumerate(synthetic.services):
        port = str(8000 + i % per_vip)
        doc["config"].setdefault(scale_vip(i // per_vip), {})[port] = {
            "namespace": svc.namespace, "service": svc.name, "portName": "http"}
    if doc.get("vipPool") is not None:
        doc["vipPool"] = [*doc["vipPool"], *(scale_vip(v) for v in range((len(synthetic.services) + per_vip - 1)
                                                                       // per_vip))]
    merged = {**configmap, "data": {key: json.dumps(doc, separators=(",", ":"))}}

    def put(name: str, obj: dict[str, Any]) -> None:
        tmp = feed_dir / f".{name}.tmp"
        tmp.write_text(json.dumps(obj, separators=(",", ":")))
        os.replace(tmp, feed_dir / name)

    put("scale-nodes.json", as_list("NodeList", nodes))
    put("scale-services.json", as_list("ServiceList", [service_object(s, i) for i, s in enumerate(synthetic.services)]))
    step = (len(slices) + SCALE_FILES - 1) // SCALE_FILES
    for k in range(SCALE_FILES):
        put(f"scale-slices-{k:02d}.json", as_list("EndpointSliceList", slices[k * step:(k + 1) * step]))
    # Written last, and named after objects.json: of the two ConfigMaps, the watcher takes this one.
    put("zz-scale-configmap.json", merged)
    return sum(len(ports) for ports in doc["config"].values())


def director_detail(host: str) -> dict[str, Any]:
    done = in_ns(prefix(NAME) + host, "curl", "-sS", "-m", "5",
                 f"http://{DIRECTORS[host]}:{PORTS['director']}/healthz", timeout=10, check=False)
    try:
        detail = json.loads(done.stdout)  # /healthz: ok, reason, and the detail's fields
    except ValueError:
        return {}
    return detail if isinstance(detail, dict) else {}


def wait_loaded(vip_ports: int, timeout: float) -> float:
    """Until both directors hold `vip_ports` virtual services, applied; the seconds it took."""
    started = time.monotonic()
    while True:
        details = [director_detail(h) for h in DIRECTORS]
        if all(d.get("virtual_services", 0) >= vip_ports and d.get("generation_applied") is not None
               and d.get("generation_applied") == d.get("generation_desired") for d in details):
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"the directors did not load {vip_ports} VIP:ports within {timeout:.0f} s: "
                               f"{[(d.get('virtual_services'), d.get('generation_applied')) for d in details]}")
        time.sleep(2)


def figures(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"p50_ms": round(statistics.median(ordered) * 1000, 1),
            "p99_ms": round(ordered[max(0, math.ceil(len(ordered) * 0.99) - 1)] * 1000, 1),  # nearest rank
            "max_ms": round(ordered[-1] * 1000, 1), "count": len(ordered)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--changes", type=int, default=50)
    ap.add_argument("--vip-ports", type=int, default=0, help="synthetic VIP:ports loaded before the edits")
    ap.add_argument("--original-changes", type=int, default=20,
                    help="edits then waited for through the original design's pipeline (0: none)")
    ap.add_argument("--output", type=Path)
    args = ap.parse_args()
    if args.output is None:
        args.output = DEFAULT_OUTPUT if not args.vip_ports else \
            DEFAULT_OUTPUT.with_name(f"bench_lab_{args.vip_ports // 1000}k.json")
    if os.geteuid() != 0:
        print("skipped: needs root (the lab)")
        return 0
    cluster = Path(tempfile.mkdtemp(prefix="k2i-bench-lab-"))
    for f in (REPO / "lab" / "cluster").iterdir():
        shutil.copy(f, cluster / f.name)
    out = io.StringIO()
    if cli_main(["lab", "up", "--name", NAME, "--cluster", str(cluster)], out=out, err=out) != 0:
        print(out.getvalue())
        return 1
    loaded: dict[str, Any] = {}
    try:
        if args.vip_ports:
            t0 = time.monotonic()
            total = write_scale(STATE_ROOT / NAME / "cluster", cluster, args.vip_ports)
            loaded = {"vip_ports": total, "written_s": round(time.monotonic() - t0, 1),
                      "directors_loaded_s": round(wait_loaded(total, 900), 1)}
            print(f"loaded {total} VIP:ports: files written in {loaded['written_s']} s, both directors "
                  f"applied {loaded['directors_loaded_s']} s later", flush=True)
            time.sleep(10)  # the first resyncs after the load
        got = measure(Client(prefix(NAME) + "client"), cluster / "endpointslices.yaml", args.changes)
        original = measure_original(cluster / "endpointslices.yaml", args.original_changes,
                                    STATE_ROOT / NAME / "cluster") if args.original_changes else None
    finally:
        cli_main(["lab", "down", "--name", NAME], out=io.StringIO(), err=io.StringIO())
        shutil.rmtree(cluster, ignore_errors=True)
    result: dict[str, Any] = {
        "environment": {"python": platform.python_version(), "kernel": platform.release()},
        "changes": args.changes, "missed": len(got["missed"]), "scale": loaded or None,
        "added_pod_first_served": figures(got["added"]) if got["added"] else None,
        "added_pod_started_and_listed": figures(got["listed"]) if got["listed"] else None,
        "added_pod_listed_to_first_served": figures(got["lb"]) if got["lb"] else None,
        "removed_pod_avoided": figures(got["removed"]) if got["removed"] else None,
        "removed_pod_unlisted": figures(got["unlisted"]) if got["unlisted"] else None,
        "removed_pod_unlisted_to_avoided": figures(got["lb_removed"]) if got["lb_removed"] else None,
    }
    if original is not None:
        result["original_pipeline"] = {
            "about": "debounce 0.5 s, poll every 2 s, 1 s delay, the node's whole nat table by iptables-restore",
            "changes": args.original_changes, "missed": len(original["missed"]),
            "listed_to_applied": figures(original["listed_to_applied"]) if original["listed_to_applied"] else None,
            "write_to_applied": figures(original["write_to_applied"]) if original["write_to_applied"] else None,
            "load": figures(original["load_s"]) if original["load_s"] else None,
        }
        ours = [*got["lb"], *got["lb_removed"]]
        theirs = original["listed_to_applied"]
        if ours and theirs:
            result["ratios"] = {"original_listed_to_applied/ours_listed_to_effect_p50":
                                round(statistics.median(theirs) / statistics.median(ours), 1)}
    at = f", {loaded['vip_ports']} VIP:ports loaded" if loaded else ""
    print(f"lab end-to-end convergence over {args.changes} edits of endpointslices.yaml{at} (target: listed -> "
          "served p99 < 100 ms; the original design: 0.5 s debounce + 2 s poll + 1 s delay)")
    for label, key in (("endpoint added -> first request served by it", "added_pod_first_served"),
                       ("  of which: the lab starts the pod and lists it", "added_pod_started_and_listed"),
                       ("  of which: listed -> served (the load balancer)", "added_pod_listed_to_first_served"),
                       ("endpoint removed -> requests avoid it", "removed_pod_avoided"),
                       ("  of which: the lab takes it out of the feed", "removed_pod_unlisted"),
                       ("  of which: unlisted -> avoided (the load balancer)", "removed_pod_unlisted_to_avoided")):
        f = result[key]
        if f:
            print(f"  {label}: p50 {f['p50_ms']} ms, p99 {f['p99_ms']} ms, max {f['max_ms']} ms ({f['count']})")
    if got["missed"]:
        print(f"  {len(got['missed'])} edits had no effect within {TIMEOUT} s")
    if original is not None and (o := result["original_pipeline"]["listed_to_applied"]):
        print(f"  the original design's pipeline on the same feed ({args.original_changes} edits): listed -> node's "
              f"table rewritten p50 {o['p50_ms']} ms, p99 {o['p99_ms']} ms, max {o['max_ms']} ms; "
              f"{result.get('ratios', {})}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0 if not got["missed"] else 1


if __name__ == "__main__":
    sys.exit(main())
