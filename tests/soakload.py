"""The load of the soak test (tests/test_soak.py): a synthetic cluster, the EndpointSlice churn
that drives it, and what the test measures (convergence lag, RSS over time). No I/O but /proc.

- `SoakCluster` builds the Kubernetes objects (nodes, services, one EndpointSlice per service,
  the LB ConfigMap) and keeps its own copy of every slice's endpoints. `change()` makes one
  random change (add a ready pod, remove a pod, flip a pod's readiness) and returns the slice's
  new endpoints; the caller writes them to the fake API server. The number of endpoints of a
  slice stays within [0, MAX_ENDPOINTS], so the cluster's size is bounded however long it runs.
- `LagTracker` measures convergence lag for one consumer: each change registers what the
  consumer should come to show for one key (a service, or a service on one node); each state
  the consumer applies is checked against the pending changes of every key.
- `rss_bytes` and `MemoryTrack` sample and judge resident memory.
"""

from __future__ import annotations

import json
import random
from array import array
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

JSON = dict[str, Any]
NAMESPACE: Final = "soak"
LB_NAMESPACE: Final = "platform-load-balancer"
LB_NAME: Final = "kube2ipvs"
LB_KEY: Final = "green"
ZONE: Final = {"example.com/lb-zone": "green"}
PORTS_PER_VIP: Final = 30
MAX_ENDPOINTS: Final = 10
TARGET_PORT: Final = 8080

Endpoint = tuple[str, str]  # (pod address, node name) of a ready pod
ChangeKind = Literal["add", "remove", "flip"]


def node_name(i: int) -> str:
    return f"node-{i:02d}"


def service_name(i: int) -> str:
    return f"svc-{i:03d}"


def vip_port(i: int) -> tuple[str, int]:
    """Service i is served on one VIP:port; 30 services per VIP."""
    return f"192.0.2.{1 + i // PORTS_PER_VIP}", 8000 + i % PORTS_PER_VIP


@dataclass(frozen=True, slots=True)
class Change:
    service: int
    kind: ChangeKind
    node: str  # where the pod that changed runs
    # The service's ready endpoints after the change, and whether the change altered them (a
    # removed pod that was not ready changes nothing a consumer can see).
    ready: frozenset[Endpoint]
    visible: bool


@dataclass
class _Pod:
    address: str
    node: str
    ready: bool


@dataclass
class SoakCluster:
    services: int
    nodes: int
    seed: int = 11
    initial_endpoints: int = 4
    _rng: random.Random = field(init=False)
    _pods: list[list[_Pod]] = field(init=False)
    _next_address: int = field(init=False, default=1)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        self._pods = [[self._new_pod() for _ in range(self.initial_endpoints)] for _ in range(self.services)]

    # -- objects ----------------------------------------------------------------------------

    def objects(self) -> list[JSON]:
        """Every object of the cluster, for `FakeKubeAPI.create`."""
        out: list[JSON] = [self._node(i) for i in range(self.nodes)]
        out += [self._service(i) for i in range(self.services)]
        out += [self.slice_object(i) for i in range(self.services)]
        out.append(self.configmap())
        return out

    def configmap(self) -> JSON:
        config: dict[str, dict[str, JSON]] = {}
        for i in range(self.services):
            vip, port = vip_port(i)
            config.setdefault(vip, {})[str(port)] = {
                "namespace": NAMESPACE, "service": service_name(i), "portName": "http",
                "tcpEnabled": True, "udpEnabled": False,
                "ipvsOptions": {"scheduler": "wrr", "forwardingMethod": "g", "uThreshold": 0, "lThreshold": 0,
                                "flags": ""}}
        doc = {"vipPool": sorted(config), "labels": ZONE, "config": config, "config6": {}}
        return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"namespace": LB_NAMESPACE, "name": LB_NAME},
                "data": {LB_KEY: json.dumps(doc, indent=1)}}

    def _node(self, i: int) -> JSON:
        name = node_name(i)
        return {"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, **ZONE}},
                "status": {"conditions": [{"type": "Ready", "status": "True"}],
                           "addresses": [{"type": "InternalIP", "address": f"198.51.100.{10 + i}"},
                                         {"type": "Hostname", "address": name}]}}

    def _service(self, i: int) -> JSON:
        return {"apiVersion": "v1", "kind": "Service",
                "metadata": {"namespace": NAMESPACE, "name": service_name(i)},
                "spec": {"type": "ClusterIP", "clusterIP": f"10.96.{i // 250}.{1 + i % 250}",
                         "ports": [{"name": "http", "port": 80, "targetPort": TARGET_PORT, "protocol": "TCP"}]}}

    @staticmethod
    def slice_name(i: int) -> str:
        return f"{service_name(i)}-x7k2q"

    def slice_object(self, i: int) -> JSON:
        return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"namespace": NAMESPACE, "name": self.slice_name(i),
                             "labels": {"kubernetes.io/service-name": service_name(i),
                                        "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}},
                "addressType": "IPv4",
                "ports": [{"name": "http", "port": TARGET_PORT, "protocol": "TCP"}],
                "endpoints": self.slice_endpoints(i)}

    def slice_endpoints(self, i: int) -> list[JSON]:
        return [{"addresses": [p.address], "conditions": {"ready": p.ready, "serving": p.ready, "terminating": False},
                 "nodeName": p.node} for p in self._pods[i]]

    # -- churn ------------------------------------------------------------------------------

    def ready(self, i: int) -> frozenset[Endpoint]:
        return frozenset((p.address, p.node) for p in self._pods[i] if p.ready)

    def change(self) -> Change:
        """One random change to one slice: add a ready pod, remove a pod or flip one's readiness."""
        i = self._rng.randrange(self.services)
        pods = self._pods[i]
        kinds: list[ChangeKind] = []
        if len(pods) < MAX_ENDPOINTS:
            kinds.append("add")
        if pods:
            kinds += ["remove", "flip"]
        kind = self._rng.choice(kinds)
        if kind == "add":
            pod = self._new_pod()
            pods.append(pod)
            visible = True
        elif kind == "remove":
            pod = pods.pop(self._rng.randrange(len(pods)))
            visible = pod.ready
        else:
            pod = self._rng.choice(pods)
            pod.ready = not pod.ready
            visible = True
        return Change(service=i, kind=kind, node=pod.node, ready=self.ready(i), visible=visible)

    def _new_pod(self) -> _Pod:
        n = self._next_address  # a fresh address for every pod: 10.0.0.1, 10.0.0.2, ...
        self._next_address += 1
        return _Pod(f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}", node_name(self._rng.randrange(self.nodes)),
                    ready=True)


# ---------------------------------------------------------------------------------------------
# Convergence lag


class LagTracker:
    """Convergence lag of one consumer, change by change.

    A change to key K at time t, after which the source shows content C for K, is converged
    when the consumer first applies a state whose content for K is C or the content of a later
    change to K (a level-triggered consumer may skip intermediate states). The lag is the time
    from t to then. Content may repeat (a readiness flipped off and on again), so a consumer
    still showing an old value that is also a newer one counts as converged: it shows what the
    source held at some moment at or after t, which is what convergence means for a
    level-triggered system. Pending changes are bounded by rate x lag; lags are kept as
    8-byte floats.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._pending: dict[Hashable, deque[tuple[float, frozenset[Endpoint]]]] = {}
        self.lags: array[float] = array("d")
        self.registered = 0

    def changed(self, key: Hashable, at: float, content: frozenset[Endpoint]) -> None:
        self._pending.setdefault(key, deque()).append((at, content))
        self.registered += 1

    def applied(self, at: float, content_of: Callable[[Hashable], frozenset[Endpoint]]) -> None:
        """The consumer applied a state at `at`; `content_of(key)` is what it shows for a key."""
        for key in list(self._pending):
            queue = self._pending[key]
            shown = content_of(key)
            last = next((n for n in range(len(queue) - 1, -1, -1) if queue[n][1] == shown), None)
            if last is None:
                continue
            for _ in range(last + 1):
                self.lags.append(at - queue.popleft()[0])
            if not queue:
                del self._pending[key]

    @property
    def pending(self) -> int:
        return sum(len(q) for q in self._pending.values())

    def oldest_pending(self) -> list[str]:
        return [f"{key!r} since {q[0][0]:.1f}" for key, q in sorted(
            self._pending.items(), key=lambda kv: kv[1][0][0])[:5]]


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank percentile (q in [0, 100]); 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))  # ceil(n * q / 100), at least 1
    return ordered[int(rank) - 1]


# ---------------------------------------------------------------------------------------------
# Memory


def rss_bytes(pid: int | str = "self") -> int | None:
    """Resident set size of a process (VmRSS), None when it is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


@dataclass
class MemoryTrack:
    """RSS samples of one process over the run; judged by thirds of the run."""

    name: str
    samples: list[tuple[float, int]] = field(default_factory=list)  # (seconds into the run, bytes)

    def add(self, at: float, rss: int | None) -> None:
        if rss is not None:
            self.samples.append((at, rss))

    def thirds(self, duration: float) -> tuple[int, int, int]:
        """The largest sample of each third of [0, duration]."""
        out = []
        for k in range(3):
            lo, hi = duration * k / 3, duration * (k + 1) / 3
            out.append(max((b for t, b in self.samples if lo <= t <= hi), default=0))
        return out[0], out[1], out[2]

    def growth(self, duration: float) -> int:
        """How far the last third's largest sample is above the first third's."""
        first, _, last = self.thirds(duration)
        return last - first

    def describe(self, duration: float) -> str:
        first, middle, last = self.thirds(duration)
        tenths = [max((b for t, b in self.samples if duration * k / 10 <= t <= duration * (k + 1) / 10), default=0)
                  for k in range(10)]
        return (f"{self.name}: max RSS by third {_mib(first)} / {_mib(middle)} / {_mib(last)} MiB "
                f"(growth {_mib(last - first):+} MiB, {len(self.samples)} samples; by tenth "
                f"{' '.join(str(_mib(b)) for b in tenths)})")


def _mib(b: int) -> float:
    return round(b / 2**20, 1)


def group_lags(trackers: Iterable[LagTracker]) -> array[float]:
    out: array[float] = array("d")
    for t in trackers:
        out.extend(t.lags)
    return out
