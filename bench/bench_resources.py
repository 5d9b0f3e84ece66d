#!/usr/bin/env python3
"""Resource benchmark (issue 10): resident memory and CPU of every service, each a real process,
at cluster scale, idle and under a steady stream of endpoint changes.

    sudo .venv/bin/python bench/bench_resources.py [--scale 1.0] [--idle-seconds 60]
        [--changes-per-second 100] [--load-seconds 60] [--repeat 1] [--py-spy PATH]
        [--role-args ROLE=FLAGS] [--output bench/results/bench_resources.json]

The cluster is bench_render's synthetic one (1,000 nodes, 10,000 VIP:ports, 100,000 endpoints at
--scale 1), written as Kubernetes JSON files: Nodes, Services and the LB ConfigMap one file each,
the EndpointSlices ten to a file. The services run as `kube2ipvs <role>` processes:

    hub   (netns k2ires-<pid>-hub)   nats-server -js on 0.0.0.0:4222, the watcher (--source files),
          │                          gobgpd (API on 127.0.0.1:50051, BGP listener off) and the
          │                          bgp-speaker (--local-as, no peers: it announces into gobgpd's RIB)
          ├─ veth h1 198.51.100.1/30 ── n0 198.51.100.2/30
          │  dir  (netns k2ires-<pid>-dir)   the director, nftables dataplane on d0 (a veth whose
          │                                  two ends are both in this namespace), VIPs on lo
          └─ veth h2 198.51.100.5/30 ── n0 198.51.100.6/30
             node (netns k2ires-<pid>-node)  one realserver for the node that backs the most
                                             services (VIPs on lo, its nft table)

Why this shape: the director and the realserver each own kernel state (nft tables, VIPs on lo),
so each gets a namespace of its own; the watcher, the speaker, gobgpd and nats-server own none
and share the hub, where NATS and gobgpd are on 127.0.0.1; the director and the realserver reach
NATS over their veth. No link reaches the root namespace: this process reads the status ports
through sockets it creates inside the namespaces (setns(2) around the socket() call only).

Phases, all measured from /proc/PID/{stat,status} (never over HTTP while a CPU window runs, so
the probes do not show up in the figures):
1. start everything at once and wait until each service has converged: /healthz 200, the
   watcher's content hash equal to the one computed here from the same files, the director's
   and speaker's generation equal to the watcher's, the realserver's rules equal to its node's
   slice computed here. Cold-start convergence times are reported per service.
2. --settle-seconds of rest, then an idle window of --idle-seconds: CPU = (utime + stime) over
   the window, in % of one core (children's time, e.g. an exec'd `nft`, reported apart);
   VmRSS sampled every second; VmHWM (peak, the cold start included) at the end.
3. --markers single endpoint flips, one at a time on an idle system: lag from the file write
   until each service shows it (the watcher's lag includes up to --files-interval of polling).
4. a load window of --load-seconds with --changes-per-second endpoint `ready` flips written to
   the files (every 0.1 s a batch; --node-share of them on the realserver's node, the rest
   uniformly over all endpoints), CPU and RSS as in the idle window; then the drain: time from
   the last write until every service holds the final state (its hash computed here beforehand).
5. the file source's own cost, measured in this process on the same directory: one poll of an
   unchanged directory, and one poll after a second's worth of changes. This is work the
   Kubernetes source does not do (it is told what changed): subtract it from the watcher's
   figures to estimate the watcher against a real API server.

Phases 2-4 (the markers once) run --repeat times; CPU figures are the median of the windows,
with min/max. With --py-spy (a py-spy binary; the default is one on PATH), every service is
sampled through the first idle and load window, without being stopped, and the report lists
its hottest frames (collapsed stacks beside the JSON, in <output stem>-profiles/). --role-args
adds flags to one role (e.g. `--role-args "director=--resync-interval 60"`), to see what a
setting costs without editing anything.

Prints a table and writes JSON. Targets (issue 10): every service under 300 MB resident at 10k
VIP:ports / 100k endpoints; idle CPU under 1% per service. Needs root, nats-server and gobgpd.
Only the namespaces named k2ires-<pid>-* are created and deleted, and only the processes started
here are stopped, by PID. Other jobs on the machine change the lags, much less the CPU seconds;
the load average at start and end is recorded with the environment.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import http.client
import json
import os
import platform
import random
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_render import (
    build_cluster,
    busiest_node,
    node_object,
    service_object,
    slice_object,
)
from bench.bench_watcher import SHARD_LABEL, config_values
from tests.natsfixture import nats_server_binary

from kube2ipvs.kube import SERVICE_NAME_LABEL, parse_endpointslices, parse_nodes, parse_services
from kube2ipvs.lbconfig import MAX_CONFIG_BYTES, LBConfig
from kube2ipvs.model import ClusterState, service_to_dict
from kube2ipvs.normalize import normalize
from kube2ipvs_watcher.files import FileSource

DEFAULT_OUTPUT: Final = Path(__file__).resolve().parent / "results" / "bench_resources.json"
KUBE2IPVS: Final = Path(sys.executable).with_name("kube2ipvs")
PREFIX: Final = f"k2ires-{os.getpid()}-"
SLICES_PER_FILE: Final = 10
TICK: Final = 0.1  # the load writer writes a batch this often
CLK_TCK: Final = os.sysconf("SC_CLK_TCK")
CLONE_NEWNET: Final = 0x40000000
TARGET_RSS_MIB: Final = 300.0
TARGET_IDLE_CPU: Final = 1.0
HUB_TO_DIR: Final = ("198.51.100.1", "198.51.100.2")
HUB_TO_NODE: Final = ("198.51.100.5", "198.51.100.6")
NATS_PORT: Final = 4222
GOBGPD_API: Final = "127.0.0.1:50051"
PORTS: Final = {"watcher": 9871, "director": 9872, "bgp-speaker": 9873, "realserver": 9874}
SERVICES: Final = ("watcher", "director", "realserver", "bgp-speaker")
DIRECTOR_HOST: Final = "k2ires-director"

_libc = ctypes.CDLL(None, use_errno=True)


def sh(*cmd: str) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {done.returncode}: {done.stderr.strip()}")


# ---------------------------------------------------------------------------------------------
# Processes, namespaces, and reading them


@dataclass
class Proc:
    name: str
    ns: str
    popen: subprocess.Popen[bytes]
    log: Path
    port: int | None = None  # status port on 127.0.0.1 inside `ns`

    @property
    def pid(self) -> int:
        return self.popen.pid

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


@dataclass
class Topology:
    workdir: Path
    namespaces: list[str] = field(default_factory=list)
    procs: dict[str, Proc] = field(default_factory=dict)

    hub: str = PREFIX + "hub"
    dir: str = PREFIX + "dir"
    node: str = PREFIX + "node"

    def up(self) -> None:
        for ns in (self.hub, self.dir, self.node):
            sh("ip", "netns", "add", ns)
            self.namespaces.append(ns)
            sh("ip", "-n", ns, "link", "set", "dev", "lo", "up")
        for hub_dev, ns, (hub_ip, ns_ip) in (("h1", self.dir, HUB_TO_DIR), ("h2", self.node, HUB_TO_NODE)):
            sh("ip", "-n", self.hub, "link", "add", hub_dev, "type", "veth", "peer", "name", "n0", "netns", ns)
            sh("ip", "-n", self.hub, "addr", "add", f"{hub_ip}/30", "dev", hub_dev)
            sh("ip", "-n", ns, "addr", "add", f"{ns_ip}/30", "dev", "n0")
            sh("ip", "-n", self.hub, "link", "set", hub_dev, "up")
            sh("ip", "-n", ns, "link", "set", "n0", "up")
        # The director's dataplane interface: both ends inside its namespace.
        sh("ip", "-n", self.dir, "link", "add", "d0", "type", "veth", "peer", "name", "d1")
        for dev in ("d0", "d1"):
            sh("ip", "-n", self.dir, "link", "set", dev, "up")

    def start(self, name: str, ns: str, argv: Sequence[str], *, port: int | None = None) -> Proc:
        log = self.workdir / f"{name}.log"
        # `ip netns exec` execs the command: the PID is the service's own.
        popen = subprocess.Popen(["ip", "netns", "exec", ns, *argv], stdout=log.open("ab"),
                                 stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        proc = Proc(name, ns, popen, log, port)
        self.procs[name] = proc
        return proc

    def close(self) -> None:
        for proc in reversed(list(self.procs.values())):
            if proc.popen.poll() is None:
                proc.popen.send_signal(signal.SIGTERM)  # by PID: started here
        for proc in reversed(list(self.procs.values())):
            try:
                proc.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait(timeout=10)
        for ns in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        self.namespaces.clear()


@contextlib.contextmanager
def _in_netns(ns: str) -> Iterator[None]:
    with open("/proc/thread-self/ns/net", "rb") as home, open(f"/run/netns/{ns}", "rb") as there:
        if _libc.setns(there.fileno(), CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {ns}")
        try:
            yield
        finally:
            if _libc.setns(home.fileno(), CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back to this process' namespace")


def http_get(proc: Proc, path: str, timeout: float = 5.0) -> tuple[int, Any]:
    """GET http://127.0.0.1:<port><path> inside the process' namespace -> (status, JSON or text)."""
    assert proc.port is not None
    with _in_netns(proc.ns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # stays in that namespace
    try:
        sock.settimeout(timeout)
        sock.connect(("127.0.0.1", proc.port))
        conn = http.client.HTTPConnection("127.0.0.1", proc.port, timeout=timeout)
        conn.sock = sock
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
    finally:
        sock.close()
    try:
        return resp.status, json.loads(body)
    except ValueError:
        return resp.status, body.decode(errors="replace")


def try_get(proc: Proc, path: str) -> tuple[int, Any]:
    try:
        return http_get(proc, path)
    except OSError:
        return 0, None


def port_open(ns: str, port: int) -> bool:
    with _in_netns(ns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def cpu_ticks(pid: int) -> tuple[int, int]:
    """(utime + stime, cutime + cstime) of a process, every thread counted, in clock ticks."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return int(fields[11]) + int(fields[12]), int(fields[13]) + int(fields[14])


def memory_kib(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "Threads"):
                out[key] = int(value.split()[0])
    return out


# ---------------------------------------------------------------------------------------------
# The cluster as files, and the changes


class ClusterFiles:
    """The synthetic cluster as API objects, written to `directory`, changed in place."""

    def __init__(self, scale: float, directory: Path, nodes: int | None = None) -> None:
        cluster = build_cluster(scale, seed=1, nodes=nodes)
        self.directory = directory
        self.config: LBConfig = cluster.config
        self.nodes = [node_object(n) for n in cluster.nodes]
        self.services = [service_object(s, i) for i, s in enumerate(cluster.services)]
        self.slices = [slice_object(es) for es in cluster.slices]
        # One ConfigMap while the config fits one (1 MiB; about 10,600 VIP:ports of these names),
        # else several, labelled, that the watcher merges (--configmap-selector).
        texts = config_values(cluster.config_doc)
        self.config_bytes = sum(len(t.encode()) for t in texts)
        self.selector = f"{SHARD_LABEL[0]}={SHARD_LABEL[1]}" if len(texts) > 1 else None
        self.configmaps = [{"apiVersion": "v1", "kind": "ConfigMap",
                            "metadata": {"namespace": "platform-load-balancer",
                                         **({"name": "kube2ipvs"} if len(texts) == 1 else
                                            {"name": f"kube2ipvs-{n}", "labels": dict([SHARD_LABEL])})},
                            "data": {"lb": text}} for n, text in enumerate(texts)]
        self.vip_ports = len(cluster.services)
        self.endpoints = sum(len(s["endpoints"]) for s in self.slices)

    def write_all(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._write("nodes.json", {"apiVersion": "v1", "kind": "NodeList", "items": self.nodes})
        self._write("services.json", {"apiVersion": "v1", "kind": "ServiceList", "items": self.services})
        for n, configmap in enumerate(self.configmaps):
            self._write(f"configmap-{n}.json", configmap)
        for shard in range((len(self.slices) + SLICES_PER_FILE - 1) // SLICES_PER_FILE):
            self.write_shard(shard)

    def write_shard(self, shard: int) -> None:
        items = self.slices[shard * SLICES_PER_FILE:(shard + 1) * SLICES_PER_FILE]
        self._write(f"endpointslices-{shard:05d}.json",
                    {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSliceList", "items": items})

    def _write(self, name: str, doc: dict[str, Any]) -> None:
        tmp = self.directory / f".{name}.tmp"  # not *.json: the watcher never reads it half-written
        tmp.write_text(json.dumps(doc, separators=(",", ":")))
        os.replace(tmp, self.directory / name)

    def flip(self, change: tuple[int, int]) -> int:
        """Flip one endpoint's `ready` (and `serving`); returns the shard to rewrite."""
        flip(self.slices, change)
        return change[0] // SLICES_PER_FILE

    def state(self, slices: list[dict[str, Any]] | None = None) -> ClusterState:
        """The cluster state of these objects (or of these objects with other `slices`)."""
        nodes, _ = parse_nodes(self.nodes)
        services, _ = parse_services(self.services)
        parsed, _ = parse_endpointslices(self.slices if slices is None else slices)
        return normalize(nodes, services, parsed, self.config)

    def endpoints_on(self, node: str) -> list[tuple[int, int]]:
        return [(s, e) for s, es in enumerate(self.slices) for e, ep in enumerate(es["endpoints"])
                if ep["nodeName"] == node]

    def ready_on(self, s: int, node: str) -> set[str]:
        return {ep["addresses"][0] for ep in self.slices[s]["endpoints"]
                if ep["nodeName"] == node and ep["conditions"]["ready"]}

    def service_of(self, s: int) -> tuple[str, str]:
        meta = self.slices[s]["metadata"]
        return meta["namespace"], meta["labels"][SERVICE_NAME_LABEL]


def flip(slices: list[dict[str, Any]], change: tuple[int, int]) -> None:
    s, e = change
    conditions = slices[s]["endpoints"][e]["conditions"]
    conditions["ready"] = conditions["serving"] = not conditions["ready"]


def plan_changes(files: ClusterFiles, count: int, node: str, node_share: float,
                 rng: random.Random) -> list[tuple[int, int]]:
    everywhere = [(s, e) for s, es in enumerate(files.slices) for e in range(len(es["endpoints"]))]
    local = files.endpoints_on(node)
    return [rng.choice(local) if local and rng.random() < node_share else rng.choice(everywhere)
            for _ in range(count)]


def canonical_services(services: Sequence[dict[str, Any]]) -> list[str]:
    return sorted(json.dumps(s, sort_keys=True) for s in services)


# ---------------------------------------------------------------------------------------------
# Starting and converging


def start_all(topo: Topology, files_dir: Path, node: str, files_interval: float,
              extra: dict[str, list[str]]) -> None:
    nats = nats_server_binary()
    assert nats is not None
    store = topo.workdir / "nats"
    store.mkdir()
    topo.start("nats-server", topo.hub, [nats, "-js", "-a", "0.0.0.0", "-p", str(NATS_PORT), "-sd", str(store),
                                         "--server_name", "k2ires"])
    deadline = time.monotonic() + 15
    while not port_open(topo.hub, NATS_PORT):
        if time.monotonic() > deadline or topo.procs["nats-server"].popen.poll() is not None:
            raise RuntimeError(f"nats-server did not start:\n{topo.procs['nats-server'].tail()}")
        time.sleep(0.05)
    topo.start("gobgpd", topo.hub, ["gobgpd", "--pprof-disable", "--log-level", "warn", f"--api-hosts={GOBGPD_API}"])
    local_nats = f"nats://127.0.0.1:{NATS_PORT}"
    roles: dict[str, tuple[str, list[str]]] = {
        "watcher": (topo.hub, ["--source", "files", "--files", str(files_dir), "--files-interval", str(files_interval),
                               "--no-leader-elect", "--nats", local_nats]),
        "director": (topo.dir, ["--dataplane", "nftables", "--interface", "d0", "--device", "lo", "--mode", "bgp",
                                "--host-name", DIRECTOR_HOST, "--state-file", str(topo.workdir / "director-state.json"),
                                "--nats", f"nats://{HUB_TO_DIR[0]}:{NATS_PORT}"]),
        "realserver": (topo.node, ["--node", node, "--device", "lo",
                                   "--state-file", str(topo.workdir / "realserver-state.json"),
                                   "--nats", f"nats://{HUB_TO_NODE[0]}:{NATS_PORT}"]),
        "bgp-speaker": (topo.hub, ["--gobgpd", GOBGPD_API, "--host-name", DIRECTOR_HOST, "--local-as", "64512",
                                   "--router-id", HUB_TO_DIR[0], "--bgp-port=-1", "--nats", local_nats]),
    }
    for role, (ns, flags) in roles.items():
        topo.start(role, ns, [str(KUBE2IPVS), role, *flags, "--listen", f"127.0.0.1:{PORTS[role]}",
                              *extra.get(role, [])], port=PORTS[role])


@dataclass
class Expected:
    """What every service holds once it has caught up with the files."""

    hash: str
    realserver: list[str]  # canonical_services of the node's slice
    routes: int

    @classmethod
    def of(cls, files: ClusterFiles, node: str, slices: list[dict[str, Any]] | None = None) -> Expected:
        state = files.state(slices)
        return cls(state.content_hash, canonical_services([service_to_dict(vs) for vs in state.for_node(node)]),
                   len({vs.vip for vs in state.services if vs.backends}))


class Probe:
    """Each service's view, read over its status port (never during a CPU window)."""

    def __init__(self, topo: Topology) -> None:
        self.p = topo.procs

    def watcher(self) -> tuple[bool, int, str | None]:
        status, body = try_get(self.p["watcher"], "/healthz")
        if not isinstance(body, dict):
            return False, 0, None
        return status == 200, int(body.get("generation") or 0), body.get("hash")

    def director_generation(self) -> int:
        status, body = try_get(self.p["director"], "/healthz")
        return int(body.get("generation_applied") or 0) if status == 200 and isinstance(body, dict) else -1

    def speaker(self) -> tuple[int, str | None, int]:
        """(generation, content hash, routes announced) once healthy, else (-1, None, 0)."""
        status, health = try_get(self.p["bgp-speaker"], "/healthz")
        if status != 200 or not isinstance(health, dict):
            return -1, None, 0
        _, config = try_get(self.p["bgp-speaker"], "/config")
        digest = config.get("content_hash") if isinstance(config, dict) else None
        return int(health.get("generation") or 0), digest, int(health.get("routes_announced") or 0)

    def realserver_services(self) -> list[dict[str, Any]] | None:
        status, _ = try_get(self.p["realserver"], "/healthz")
        if status != 200:
            return None
        status, body = try_get(self.p["realserver"], "/config?format=json")
        return list(body["services"]) if status == 200 and isinstance(body, dict) else None


def wait_all(checks: dict[str, Callable[[], bool]], since: float, timeout: float,
             procs: dict[str, Proc], poll: float = 0.02) -> dict[str, float | None]:
    """Seconds from `since` until each check first held (None: not within `timeout`)."""
    done: dict[str, float | None] = dict.fromkeys(checks)
    pending = list(checks)
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for name in list(pending):
            if checks[name]():
                done[name] = round(time.monotonic() - since, 4)
                pending.remove(name)
        for name, proc in procs.items():
            if proc.popen.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.popen.returncode}:\n{proc.tail()}")
        if pending:
            time.sleep(poll)
    return done


def converged_checks(probe: Probe, want: Expected) -> dict[str, Callable[[], bool]]:
    """Every service holds `want`. The director's and speaker's generations are compared with the
    watcher's once the watcher holds the wanted hash."""
    final_gen: list[int] = []

    def watcher() -> bool:
        ok, gen, digest = probe.watcher()
        if ok and digest == want.hash and not final_gen:
            final_gen.append(gen)
        return bool(final_gen)

    def director() -> bool:
        return bool(final_gen) and probe.director_generation() >= final_gen[0]

    def speaker() -> bool:
        gen, digest, routes = probe.speaker()
        return digest == want.hash and routes == want.routes and gen >= 0

    def realserver() -> bool:
        services = probe.realserver_services()
        return services is not None and canonical_services(services) == want.realserver

    return {"watcher": watcher, "director": director, "realserver": realserver, "bgp-speaker": speaker}


# ---------------------------------------------------------------------------------------------
# Windows


@dataclass
class Window:
    seconds: float
    cpu: dict[str, float]  # % of one core over the window
    cpu_children: dict[str, float]
    cpu_per_second: dict[str, list[float]]
    rss_mib: dict[str, list[float]]
    changes_written: int = 0
    bench_cpu_percent: float = 0.0


def summarize(windows: Sequence[Window], name: str) -> dict[str, Any]:
    """One process over repeated windows: the median CPU with min/max; per-second CPU and RSS
    samples pooled over the windows."""
    runs = [w.cpu[name] for w in windows]
    per_s = sorted(x for w in windows for x in w.cpu_per_second[name])
    rss = [x for w in windows for x in w.rss_mib[name]]
    return {
        "cpu_percent": round(statistics.median(runs), 3),
        "cpu_percent_min": round(min(runs), 3),
        "cpu_percent_max": round(max(runs), 3),
        "cpu_percent_runs": [round(x, 3) for x in runs],
        "cpu_children_percent": round(statistics.median(w.cpu_children[name] for w in windows), 3),
        "cpu_percent_per_second": {"median": round(statistics.median(per_s), 2),
                                   "p95": round(per_s[min(len(per_s) - 1, int(len(per_s) * 0.95))], 2),
                                   "max": round(per_s[-1], 2)} if per_s else None,
        "rss_mib": {"median": round(statistics.median(rss), 1), "min": round(min(rss), 1),
                    "max": round(max(rss), 1)} if rss else None,
    }


def measure_window(procs: dict[str, Proc], seconds: float, step: Callable[[float], int] | None = None) -> Window:
    """CPU and RSS of every process over `seconds`; `step(elapsed)` (the load writer) is called
    every TICK and returns how many changes it wrote."""
    names = list(procs)
    pids = {n: procs[n].pid for n in names}
    self_start = resource.getrusage(resource.RUSAGE_SELF)
    start = {n: cpu_ticks(p) for n, p in pids.items()}
    t0 = time.monotonic()
    last, last_t = dict(start), t0
    per_second: dict[str, list[float]] = {n: [] for n in names}
    rss: dict[str, list[float]] = {n: [] for n in names}
    written = 0
    next_sample, next_tick = t0 + 1.0, t0
    end = t0 + seconds
    while True:
        now = time.monotonic()
        if now >= end:
            break
        if step is not None and now >= next_tick:
            written += step(now - t0)
            next_tick += TICK
        if now >= next_sample:
            for n, p in pids.items():
                ticks = cpu_ticks(p)
                per_second[n].append(100.0 * (ticks[0] - last[n][0]) / CLK_TCK / (now - last_t))
                last[n] = ticks
                rss[n].append(memory_kib(p)["VmRSS"] / 1024)
            last_t = now
            next_sample += 1.0
        wake = min(next_sample, end, next_tick if step is not None else end)
        time.sleep(max(0.0, wake - time.monotonic()))
    elapsed = time.monotonic() - t0
    stop = {n: cpu_ticks(p) for n, p in pids.items()}
    self_end = resource.getrusage(resource.RUSAGE_SELF)
    own = (self_end.ru_utime + self_end.ru_stime) - (self_start.ru_utime + self_start.ru_stime)
    return Window(
        seconds=round(elapsed, 2),
        cpu={n: 100.0 * (stop[n][0] - start[n][0]) / CLK_TCK / elapsed for n in names},
        cpu_children={n: 100.0 * (stop[n][1] - start[n][1]) / CLK_TCK / elapsed for n in names},
        cpu_per_second=per_second, rss_mib=rss, changes_written=written,
        bench_cpu_percent=round(100.0 * own / elapsed, 2),
    )


class LoadWriter:
    """Writes `changes` in batches every TICK, at `rate` per second, as the clock says."""

    def __init__(self, files: ClusterFiles, changes: list[tuple[int, int]], rate: float) -> None:
        self.files, self.changes, self.rate = files, changes, rate
        self.done = 0
        self.last_write_at = 0.0

    def __call__(self, elapsed: float) -> int:
        due = min(len(self.changes), round((elapsed + TICK) * self.rate))
        if due <= self.done:
            return 0
        shards = {self.files.flip(c) for c in self.changes[self.done:due]}
        for shard in sorted(shards):
            self.files.write_shard(shard)
        self.last_write_at = time.monotonic()
        count, self.done = due - self.done, due
        return count


# ---------------------------------------------------------------------------------------------
# Single changes, the file source's own cost


def marker_lags(files: ClusterFiles, probe: Probe, procs: dict[str, Proc], node: str, count: int,
                rng: random.Random) -> list[dict[str, float | None]]:
    """One endpoint flip on the realserver's node at a time, on an idle system: seconds from the
    file write until each service shows it."""
    candidates = [c for c in files.endpoints_on(node) if len(files.ready_on(c[0], node)) >= 2]
    lags = []
    for _ in range(count):
        s, e = rng.choice(candidates or files.endpoints_on(node))
        ok, gen0, _ = probe.watcher()
        assert ok, "the watcher is not healthy before a marker"
        shard = files.flip((s, e))
        checks = _marker_checks(probe, gen0, files.service_of(s), files.ready_on(s, node))
        since = time.monotonic()
        files.write_shard(shard)
        lags.append(wait_all(checks, since, 30.0, procs))
        time.sleep(1.0)
    return lags


def _marker_checks(probe: Probe, gen0: int, service: tuple[str, str],
                   want_local: set[str]) -> dict[str, Callable[[], bool]]:
    """The watcher published a newer generation, the director and speaker took it, the
    realserver DNATs the service to `want_local`."""
    def local() -> set[str]:
        return {ep["address"] for vs in probe.realserver_services() or []
                if (vs["service"]["namespace"], vs["service"]["name"]) == service
                for b in vs["backends"] for ep in b["endpoints"]}

    return {
        "watcher": lambda: probe.watcher()[1] > gen0,
        "director": lambda: probe.director_generation() > gen0,
        "realserver": lambda: local() == want_local,
        "bgp-speaker": lambda: probe.speaker()[0] > gen0,
    }


def file_source_cost(files: ClusterFiles, changes: list[tuple[int, int]], interval: float) -> dict[str, Any]:
    """The file source's polling, in this process on the same directory: an unchanged poll, and a
    poll after one interval's worth of changes (`changes`, written here)."""
    source = FileSource(files.directory, interval=interval)
    t0 = time.process_time()
    source.scan()
    first = time.process_time() - t0
    idle = []
    for _ in range(5):
        t0 = time.process_time()
        source.poll()
        idle.append(time.process_time() - t0)
    shards = {files.flip(c) for c in changes}
    for shard in sorted(shards):
        files.write_shard(shard)
    t0 = time.process_time()
    events = source.poll()
    busy = time.process_time() - t0
    for c in reversed(changes):  # back as it was (the services have long converged; they follow)
        files.flip(c)
    for shard in sorted(shards):
        files.write_shard(shard)
    return {
        "files": len(list(files.directory.glob("*.json"))),
        "first_scan_s": round(first, 3),
        "unchanged_poll_ms": round(statistics.median(idle) * 1000, 2),
        "unchanged_poll_cpu_percent_at_interval": round(100 * statistics.median(idle) / interval, 2),
        "poll_after_changes_ms": round(busy * 1000, 2),
        "changes_in_that_poll": len(changes),
        "events": len(events),
        "shards_rewritten": len(shards),
    }


# ---------------------------------------------------------------------------------------------
# The run


def environment() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    return {"cpu": model, "cores": os.cpu_count(), "kernel": platform.release(),
            "python": platform.python_version(), "loadavg_start": Path("/proc/loadavg").read_text().split()[:3]}


class Profiler:
    """py-spy (when given) samples every kube2ipvs service through the first idle and load
    windows, without stopping it (--nonblocking: the services' CPU figures stay theirs; py-spy's
    own CPU is not counted in them). Collapsed stacks go to `directory`; the report gets the
    frames that held the most samples."""

    def __init__(self, binary: str | None, directory: Path) -> None:
        self.binary, self.directory = binary, directory
        self.running: list[tuple[str, subprocess.Popen[bytes], Path]] = []
        self.results: dict[str, dict[str, Any]] = {}

    def start(self, procs: dict[str, Proc], window: str, seconds: float) -> None:
        if self.binary is None:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        for name in SERVICES:
            out = self.directory / f"pyspy-{name}-{window}.txt"
            popen = subprocess.Popen([self.binary, "record", "--pid", str(procs[name].pid), "--duration",
                                      str(max(1, int(seconds))), "--rate", "50", "--nonblocking", "--format", "raw",
                                      "--output", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.running.append((f"{name}/{window}", popen, out))

    def finish(self) -> None:
        for key, popen, out in self.running:
            try:
                popen.wait(timeout=30)
            except subprocess.TimeoutExpired:
                popen.kill()  # by PID: started here
                popen.wait(timeout=10)
            name, _, window = key.partition("/")
            self.results.setdefault(name, {})[window] = top_frames(out)
        self.running.clear()


def top_frames(path: Path, count: int = 12) -> dict[str, Any]:
    """Samples, and the frames with the most of them: as the innermost frame (self) and anywhere
    on the stack (inclusive; the event loop's and threads' own frames left out)."""
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return {"samples": 0, "error": f"py-spy wrote no {path.name}"}
    for line in lines:
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        frames = stack.split(";")
        total += int(n)
        own[frames[-1]] = own.get(frames[-1], 0) + int(n)
        for frame in set(frames):
            if "kube2ipvs" in frame and not frame.startswith(("<module>", "run (", "cmd_role", "main (", "run_role")):
                inclusive[frame] = inclusive.get(frame, 0) + int(n)
    return {"samples": total, "file": str(path),
            "self": sorted(own.items(), key=lambda kv: -kv[1])[:count],
            "inclusive": sorted(inclusive.items(), key=lambda kv: -kv[1])[:count]}


@dataclass
class Measured:
    cold: dict[str, float | None]
    rss_converged: dict[str, dict[str, int]]
    peak: dict[str, dict[str, int]]
    idles: list[Window]
    loads: list[Window]
    markers: list[dict[str, float | None]]
    drains: list[dict[str, float | None]]
    changes: list[tuple[int, int]]
    file_source: dict[str, Any]


def start_and_converge(topo: Topology, files: ClusterFiles, node: str, want: Expected,
                       args: argparse.Namespace) -> dict[str, float | None]:
    topo.up()
    started = time.monotonic()
    extra: dict[str, list[str]] = {}
    for item in args.role_args or ():
        role, _, text = item.partition("=")
        extra.setdefault(role, []).extend(shlex.split(text))
    if files.selector is not None:
        extra = {**extra, "watcher": [*extra.get("watcher", []), "--configmap-selector", files.selector]}
    start_all(topo, files.directory, node, args.files_interval, extra)
    timeout = 120 + 1200 * args.scale
    cold = wait_all(converged_checks(Probe(topo), want), started, timeout, topo.procs, poll=0.25)
    if any(v is None for v in cold.values()):
        late = [n for n, v in cold.items() if v is None]
        raise RuntimeError(f"not converged within {timeout:.0f} s: {late}\n"
                           + "\n".join(f"--- {n}\n{topo.procs[n].tail()}" for n in late))
    print(f"converged from a cold start: {cold}", file=sys.stderr)
    return cold


def load_window(topo: Topology, files: ClusterFiles, node: str, args: argparse.Namespace, rng: random.Random,
                profiler: Profiler | None) -> tuple[Window, dict[str, float | None], list[tuple[int, int]]]:
    """One load window and the drain after it; the changes it wrote."""
    count = int(args.changes_per_second * args.load_seconds)
    changes = plan_changes(files, count, node, args.node_share, rng)
    final_slices = json.loads(json.dumps(files.slices))  # the final state, computed before the window
    for c in changes:
        flip(final_slices, c)
    final = Expected.of(files, node, final_slices)
    del final_slices
    writer = LoadWriter(files, changes, args.changes_per_second)
    print(f"load window: {args.changes_per_second}/s for {args.load_seconds} s ...", file=sys.stderr)
    if profiler is not None:
        profiler.start(topo.procs, "load", args.load_seconds)
    window = measure_window(topo.procs, args.load_seconds, writer)
    while writer.done < len(changes):  # the window ended before the last batch was due
        writer(len(changes) / args.changes_per_second)
    drain = wait_all(converged_checks(Probe(topo), final), writer.last_write_at, 120 + 600 * args.scale, topo.procs)
    if profiler is not None:
        profiler.finish()
    return window, drain, changes


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    rng = random.Random(7)
    print(f"building the cluster at scale {args.scale} ...", file=sys.stderr)
    files = ClusterFiles(args.scale, workdir / "cluster", args.nodes)
    if files.selector is not None:
        print(f"the LB config is {files.config_bytes:,} bytes, over the {MAX_CONFIG_BYTES:,} of one ConfigMap: "
              f"{len(files.configmaps)} ConfigMaps labelled {files.selector}", file=sys.stderr)
    files.write_all()
    node = busiest_node(files.state())
    want = Expected.of(files, node)
    print(f"{files.vip_ports} VIP:ports, {files.endpoints} endpoints, {len(files.nodes)} nodes; "
          f"realserver for {node} ({len(want.realserver)} services)", file=sys.stderr)
    env = environment()
    topo = Topology(workdir)
    profiler = Profiler(args.py_spy, args.output.with_name(args.output.stem + "-profiles")) if args.py_spy else None
    idles: list[Window] = []
    loads: list[Window] = []
    drains: list[dict[str, float | None]] = []
    changes: list[tuple[int, int]] = []
    markers: list[dict[str, float | None]] = []
    try:
        cold = start_and_converge(topo, files, node, want, args)
        rss_converged = {n: memory_kib(p.pid) for n, p in topo.procs.items()}
        for repeat in range(args.repeat):
            first = profiler if repeat == 0 else None
            time.sleep(args.settle_seconds)
            print(f"idle window {repeat + 1}/{args.repeat}: {args.idle_seconds} s ...", file=sys.stderr)
            if first is not None:
                first.start(topo.procs, "idle", args.idle_seconds)
            idles.append(measure_window(topo.procs, args.idle_seconds))
            if first is not None:
                first.finish()
            if repeat == 0 and args.markers:
                markers = marker_lags(files, Probe(topo), topo.procs, node, args.markers, rng)
                # The markers left the files as they were written last: what every service now holds.
                wait_all(converged_checks(Probe(topo), Expected.of(files, node)), time.monotonic(), 60, topo.procs)
            time.sleep(args.settle_seconds)
            window, drain, changes = load_window(topo, files, node, args, rng, first)
            loads.append(window)
            drains.append(drain)
        peak = {n: memory_kib(p.pid) for n, p in topo.procs.items()}
        time.sleep(1.0)
        source_cost = file_source_cost(files, changes[:max(1, int(args.changes_per_second * args.files_interval))],
                                       args.files_interval)
    finally:
        if profiler is not None:
            for _, popen, _ in profiler.running:
                if popen.poll() is None:
                    popen.kill()  # by PID: started here
        topo.close()
    env["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
    measured = Measured(cold, rss_converged, peak, idles, loads, markers, drains, changes, source_cost)
    report = build_report(args, files, node, want, topo, measured, env)
    if profiler is not None:
        report["profiles"] = profiler.results
    return report


def build_report(args: argparse.Namespace, files: ClusterFiles, node: str, want: Expected, topo: Topology,
                 m: Measured, env: dict[str, Any]) -> dict[str, Any]:
    node_changes = sum(1 for s, e in m.changes if files.slices[s]["endpoints"][e]["nodeName"] == node)
    per_service: dict[str, Any] = {}
    for name in topo.procs:
        drains = [d.get(name) for d in m.drains]
        per_service[name] = {
            "kube2ipvs_service": name in SERVICES,
            "cold_start_converged_s": m.cold.get(name),
            "rss_mib_converged": round(m.rss_converged[name]["VmRSS"] / 1024, 1),
            "rss_mib_end": round(m.peak[name]["VmRSS"] / 1024, 1),
            "hwm_mib": round(m.peak[name]["VmHWM"] / 1024, 1),
            "threads": m.peak[name].get("Threads"),
            "idle": summarize(m.idles, name),
            "load": summarize(m.loads, name),
            "marker_lag_s": _lag_summary([x.get(name) for x in m.markers]) if name in SERVICES else None,
            # The same, from the watcher's publish on (the lag without the file source's polling).
            "marker_lag_after_watcher_s": _lag_summary([_minus(x.get(name), x.get("watcher")) for x in m.markers])
            if name in SERVICES and name != "watcher" else None,
            "drain_after_load_s": _lag_summary(drains) if name in SERVICES else None,
        }
        if name in SERVICES:
            per_service[name]["verdict"] = verdict(per_service[name])
    return {
        "scale": args.scale,
        "sizes": {"vip_ports": files.vip_ports, "endpoints": files.endpoints, "nodes": len(files.nodes),
                  "realserver_node": node, "realserver_services": len(want.realserver),
                  "vips_announced": want.routes, "config_bytes": files.config_bytes,
                  "configmaps": len(files.configmaps)},
        "settings": {"files_interval_s": args.files_interval, "repeat": args.repeat,
                     "role_args": list(args.role_args or ()),
                     "idle_seconds": m.idles[0].seconds, "load_seconds": m.loads[0].seconds,
                     "changes_per_second": args.changes_per_second, "node_share": args.node_share,
                     "changes_per_window": len(m.changes), "changes_on_realserver_node_last_window": node_changes,
                     "markers": args.markers,
                     "bench_cpu_percent_idle": round(statistics.median(w.bench_cpu_percent for w in m.idles), 2),
                     "bench_cpu_percent_load": round(statistics.median(w.bench_cpu_percent for w in m.loads), 2)},
        "targets": {"rss_mib": TARGET_RSS_MIB, "idle_cpu_percent": TARGET_IDLE_CPU},
        "services": per_service,
        "file_source": m.file_source,
        "environment": env,
    }


def verdict(s: dict[str, Any]) -> str:
    over = []
    if s["hwm_mib"] >= TARGET_RSS_MIB:
        over.append(f"peak RSS {s['hwm_mib']:.0f} MiB")
    if s["idle"]["cpu_percent"] >= TARGET_IDLE_CPU:
        over.append(f"idle CPU {s['idle']['cpu_percent']:.2f}%")
    return "ok" if not over else "OVER: " + ", ".join(over)


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a - b, 4)


def _lag_summary(values: list[float | None]) -> dict[str, Any] | None:
    got = sorted(v for v in values if v is not None)
    if not values:
        return None
    return {"median": round(statistics.median(got), 3) if got else None, "min": got[0] if got else None,
            "max": got[-1] if got else None, "missed": len(values) - len(got)}


def print_table(report: dict[str, Any]) -> None:
    sizes, st = report["sizes"], report["settings"]
    print(f"\nscale {report['scale']}: {sizes['vip_ports']} VIP:ports, {sizes['endpoints']} endpoints, "
          f"{sizes['nodes']} nodes; realserver {sizes['realserver_node']} ({sizes['realserver_services']} services)")
    print(f"{st['repeat']} x (idle {st['idle_seconds']} s, load {st['changes_per_second']}/s for "
          f"{st['load_seconds']} s, {st['changes_on_realserver_node_last_window']} of {st['changes_per_window']} "
          f"on the realserver's node); CPU: median of the windows; the watcher polls its files every "
          f"{st['files_interval_s']} s")
    head = (f"{'process':<12} {'RSS MiB':>8} {'HWM MiB':>8} {'idle CPU%':>9} {'load CPU%':>9} "
            f"{'load RSS max':>12} {'cold s':>7} {'marker s':>8} {'(after w.)':>10} {'drain s':>7}  verdict")
    print(head)
    print("-" * len(head))
    for name, s in report["services"].items():
        lag = s["marker_lag_s"] or {}
        after = s["marker_lag_after_watcher_s"] or {}
        drain = s["drain_after_load_s"] or {}
        def num(v: Any, fmt: str) -> str:
            return "-" if v is None else format(v, fmt)
        print(f"{name:<12} {s['rss_mib_end']:>8.1f} {s['hwm_mib']:>8.1f} {s['idle']['cpu_percent']:>9.2f} "
              f"{s['load']['cpu_percent']:>9.2f} {num((s['load']['rss_mib'] or {}).get('max'), '.1f'):>12} "
              f"{num(s['cold_start_converged_s'], '.1f'):>7} {num(lag.get('median'), '.3f'):>8} "
              f"{num(after.get('median'), '.3f'):>10} "
              f"{num(drain.get('median'), '.2f'):>7}  {s.get('verdict', '')}")
    fs = report["file_source"]
    print(f"\nfile source (the watcher's, measured apart): unchanged poll {fs['unchanged_poll_ms']} ms "
          f"= {fs['unchanged_poll_cpu_percent_at_interval']}% at the poll interval; a poll after "
          f"{fs['changes_in_that_poll']} changes {fs['poll_after_changes_ms']} ms ({fs['files']} files)")
    print(f"targets: RSS (peak) < {TARGET_RSS_MIB:.0f} MiB and idle CPU < {TARGET_IDLE_CPU}% per kube2ipvs service")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--scale", type=float, default=1.0, help="1.0: 10,000 VIP:ports, 100,000 endpoints")
    parser.add_argument("--nodes", type=int, default=None, help="node count (default: 1,000 x --scale)")
    parser.add_argument("--idle-seconds", type=float, default=60.0)
    parser.add_argument("--changes-per-second", type=float, default=100.0)
    parser.add_argument("--load-seconds", type=float, default=60.0)
    parser.add_argument("--node-share", type=float, default=0.1,
                        help="share of the changes on the realserver's node (default 0.1; 0: uniform)")
    parser.add_argument("--markers", type=int, default=5, help="single-change lags measured at idle")
    parser.add_argument("--settle-seconds", type=float, default=15.0,
                        help="rest after converging, before a window (first resyncs, collections)")
    parser.add_argument("--files-interval", type=float, default=1.0, help="the watcher's --files-interval")
    parser.add_argument("--repeat", type=int, default=1, help="idle + load windows, repeated (medians reported)")
    beside = Path(sys.executable).with_name("py-spy")  # the project's .venv installs it (make install)
    parser.add_argument("--py-spy", metavar="PATH", default=str(beside) if beside.exists() else shutil.which("py-spy"),
                        help="py-spy binary: profile every service through the first idle and load windows "
                             "(default: the one beside this Python, else py-spy on PATH, if any; '' for none)")
    parser.add_argument("--role-args", action="append", metavar="ROLE=ARGS",
                        help="more flags for one role, repeatable, e.g. director='--resync-interval 60'")
    parser.add_argument("--output", type=Path,
                        help="default bench/results/bench_resources.json at --scale 1, else "
                             "bench_resources_<VIP:ports in thousands>k.json (the report's size curve)")
    args = parser.parse_args()
    if args.output is None:
        args.output = DEFAULT_OUTPUT if args.scale == 1 else \
            DEFAULT_OUTPUT.with_name(f"bench_resources_{round(args.scale * 10)}k.json")
    if os.geteuid() != 0:
        print("needs root (network namespaces, nftables)", file=sys.stderr)
        return 2
    missing = [t for t, found in (("nats-server", nats_server_binary()), ("gobgpd", shutil.which("gobgpd")),
                                  ("ip", shutil.which("ip")), ("kube2ipvs", KUBE2IPVS.exists() or None))
               if not found]
    if missing:
        print(f"missing: {', '.join(missing)} (make install brings them)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="k2ires-") as tmp:
        report = run(args, Path(tmp))
    print_table(report)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
