#!/usr/bin/env python3
"""Watcher benchmark: initial list -> first complete publish, and one EndpointSlice change -> its
published update, with the real WatcherApp and a real nats-server on 127.0.0.1.

The cluster is bench_render's synthetic one (1,000 nodes, 10,000 VIP:ports, 100,000 endpoints at
--scale 1), handed to the watcher as API objects through an in-memory source, so the figures are
the watcher's own work plus NATS, not a Kubernetes API server's.

Prints a table and writes JSON (bench/results/bench_watcher.json). Targets (issue 3): one-change
p99 under 50 ms, bytes in proportion to the change, resident memory under 1 GB.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Final

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_render import build_cluster, node_object, service_object, slice_object
from tests.natsfixture import NatsServer, nats_server_binary

from kube2ipvs.lbconfig import MAX_CONFIG_BYTES
from kube2ipvs.natskv import KVPublisher, NatsSettings
from kube2ipvs_watcher.app import AppSettings, WatcherApp
from kube2ipvs_watcher.core import WatcherCore, WatcherSettings
from kube2ipvs_watcher.source import ObjectEvent, Resync, SourceItem

DEFAULT_OUTPUT: Final = Path(__file__).resolve().parent / "results" / "bench_watcher.json"
TARGET_P99: Final = 0.050
TARGET_RSS: Final = 1024 * 1024 * 1024


class MemorySource:
    """Hands the watcher a full list of every kind, then whatever the benchmark feeds it."""

    def __init__(self, objects: dict[str, list[dict[str, Any]]]) -> None:
        self._objects = objects
        self.events: asyncio.Queue[SourceItem] = asyncio.Queue()
        self.listed_at = 0.0

    async def run(self, sink: asyncio.Queue[SourceItem]) -> None:
        self.listed_at = time.perf_counter()
        for kind in ("Node", "Service", "EndpointSlice", "ConfigMap"):
            sink.put_nowait(Resync(kind, tuple(self._objects[kind])))
        while True:
            sink.put_nowait(await self.events.get())


def compact_config(doc: dict[str, Any]) -> str:
    """The config as an operator at this scale must write it: defaults left out, no spaces.

    Written out in full, 10,000 entries are about 2.3 MB, over the 1 MiB a ConfigMap can hold.
    """
    defaults = {"tcpEnabled": True, "udpEnabled": False}
    ipvs_defaults = {"scheduler": "", "forwardingMethod": "g", "uThreshold": 0, "lThreshold": 0, "flags": ""}
    out = dict(doc)
    out["config"] = {
        vip: {port: {**{k: v for k, v in e.items() if k != "ipvsOptions" and defaults.get(k) != v},
                     **({"ipvsOptions": o} if (o := {k: v for k, v in e["ipvsOptions"].items()
                                                     if ipvs_defaults.get(k) != v}) else {})}
              for port, e in ports.items()}
        for vip, ports in doc["config"].items()
    }
    return json.dumps(out, separators=(",", ":"))


SHARD_LABEL: Final = ("kube2ipvs.io/config", "bench")
SHARD_BYTES: Final = 900 * 1024  # each of several: under the 1 MiB of a ConfigMap, with room to grow


def config_values(doc: dict[str, Any]) -> list[str]:
    """The config as its operator writes it (compact_config): one value when it fits a ConfigMap,
    else split by VIP into values that each do (the first keeps the pool, labels and MTUs)."""
    whole = compact_config(doc)
    if len(whole.encode()) <= MAX_CONFIG_BYTES:
        return [whole]
    compact = json.loads(whole)
    head = {k: v for k, v in compact.items() if k not in ("config", "config6")}
    shards: list[dict[str, Any]] = [{**head, "config": {}}]
    size = len(json.dumps(shards[0], separators=(",", ":")))
    for vip, ports in compact["config"].items():
        part = len(json.dumps({vip: ports}, separators=(",", ":")))
        if size + part > SHARD_BYTES:
            shards.append({"config": {}})
            size = 20
        shards[-1]["config"][vip] = ports
        size += part
    return [json.dumps(s, separators=(",", ":")) for s in shards]


def configmaps(values: list[str]) -> list[dict[str, Any]]:
    """The LB ConfigMap, or several labelled ones when the config does not fit one (config_values)."""
    return [{"apiVersion": "v1", "kind": "ConfigMap",
             "metadata": {"namespace": "platform-load-balancer",
                          **({"name": "kube2ipvs"} if len(values) == 1 else
                             {"name": f"kube2ipvs-{n}", "labels": dict([SHARD_LABEL])})},
             "data": {"lb": text}} for n, text in enumerate(values)]


def _max_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


async def measure(scale: float, changes: int, url: str, nodes: int | None = None) -> dict[str, Any]:
    cluster = build_cluster(scale, seed=1, nodes=nodes)
    slices = [slice_object(es) for es in cluster.slices]
    objects = {
        "Node": [node_object(n) for n in cluster.nodes],
        "Service": [service_object(s, i) for i, s in enumerate(cluster.services)],
        "EndpointSlice": slices,
        "ConfigMap": configmaps(config_values(cluster.config_doc)),
    }
    sharded = len(objects["ConfigMap"]) > 1
    source = MemorySource(objects)
    publisher = KVPublisher(NatsSettings(servers=(url,)))
    await publisher.start()
    settings = WatcherSettings(configmap_selector=(SHARD_LABEL,) if sharded else None)
    app = WatcherApp(WatcherCore(settings, clock=time.monotonic), source=source, publisher=publisher,
                     settings=AppSettings(min_interval=0.0))
    task = asyncio.create_task(app.run())
    try:
        await asyncio.wait_for(app.published_event.wait(), 600)
        first = time.perf_counter() - source.listed_at
        full_bytes = app.metrics.publish_bytes._value.get()
        state = app.last_state
        assert state is not None
        latencies: list[float] = []
        sizes: list[float] = []
        for i in range(changes):
            original = slices[i % len(slices)]
            changed = copy.deepcopy(original)
            endpoint = changed["endpoints"][0]
            endpoint["conditions"]["ready"] = not endpoint["conditions"]["ready"]  # one endpoint flips
            slices[i % len(slices)] = changed
            before = app.metrics.publish_bytes._value.get()
            app.published_event.clear()
            started = time.perf_counter()
            source.events.put_nowait(ObjectEvent("EndpointSlice", "MODIFIED", changed))
            await asyncio.wait_for(app.published_event.wait(), 60)
            latencies.append(time.perf_counter() - started)
            sizes.append(app.metrics.publish_bytes._value.get() - before)
        latencies.sort()
        return {
            "scale": scale,
            "services": len(state.services),
            "endpoints": sum(len(b.endpoints) for vs in state.services for b in vs.backends),
            "nodes": len(state.nodes),
            "initial_list_to_first_publish_s": first,
            "first_publish_bytes": full_bytes,
            "configmaps": len(objects["ConfigMap"]),
            "changes": changes,
            "change_to_publish_p50_s": statistics.median(latencies),
            "change_to_publish_p99_s": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
            "change_to_publish_max_s": latencies[-1],
            "change_bytes_median": statistics.median(sizes),
            "change_bytes_max": max(sizes),
            "max_rss_bytes": _max_rss(),
        }
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await publisher.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--changes", type=int, default=200)
    parser.add_argument("--nodes", type=int, default=None, help="node count (default: 1,000 x --scale)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args()
    binary = nats_server_binary()
    if binary is None:
        print("nats-server is not installed (make install brings it)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="k2i-bench-") as tmp:
        server = NatsServer(binary, Path(tmp))
        server.start()
        try:
            result = asyncio.run(measure(args.scale, args.changes, server.url, args.nodes))
        finally:
            server.stop()
    rows = [
        ("cluster", f"{result['nodes']} nodes, {result['services']} VIP:ports, {result['endpoints']} endpoints"),
        ("initial list -> first complete publish", f"{result['initial_list_to_first_publish_s']:.2f} s"
                                                   f" ({result['first_publish_bytes'] / 1e6:.1f} MB written)"),
        (f"one EndpointSlice change -> published (n={result['changes']})",
         f"p50 {result['change_to_publish_p50_s'] * 1000:.1f} ms, "
         f"p99 {result['change_to_publish_p99_s'] * 1000:.1f} ms, "
         f"max {result['change_to_publish_max_s'] * 1000:.1f} ms (target p99 < {TARGET_P99 * 1000:.0f} ms)"),
        ("bytes written per change",
         f"median {result['change_bytes_median']:.0f}, max {result['change_bytes_max']:.0f}"),
        ("watcher process max RSS",
         f"{result['max_rss_bytes'] / 2**20:.0f} MiB (target < {TARGET_RSS / 2**20:.0f} MiB)"),
    ]
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
