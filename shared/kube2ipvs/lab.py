"""`kube2ipvs lab up|status|down|probe`: the whole system on this host, in network namespaces.

`up` checks the tools and the cluster files, then starts a supervisor (`lab run`) in the
background and returns once every VIP answers from the client namespace (or says what failed).
The supervisor builds the topology of `kube2ipvs.labplan`, starts every process inside it, and
then keeps the pods and nodes equal to the cluster files (polled every 0.05 s), playing
kubelet and endpoint controller: an endpoint added in the files gets its pod started, and only
then appears in the feed the watcher reads (`<state>/cluster/objects.json`); an endpoint
removed leaves the feed at once and its pod stops GRACE seconds later. So traffic follows the
files without ever being sent to a pod that is not there yet. `down` stops the supervisor,
which stops every process it started (by PID) and deletes every namespace it created;
`status` reads what the supervisor recorded and asks every service's /healthz.

What the lab records lives in its state directory (`/run/kube2ipvs-lab/<name>/`): `state.json`
(namespaces, processes and their PIDs, VIPs, phase), the logs of every process, FRR's and NATS'
files, the services' state files. `down` removes it.

A component that dies stays dead (as an operator would see a crashed service) until someone asks
for it: `lab_control` (`stop`, `start`, `restart` one component) leaves a request in
`<state>/control/`, which the supervisor serves between two polls of the files. It starts the
component again with the namespace and argv it recorded, so it keeps owning the new PID and
`down` stops it like any other.

Everything runs as root (namespaces, nftables, FRR's zebra programs routes). Nothing is added to
the root namespace: every link is created inside the namespaces, and test traffic stays among
them.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final, TextIO

from kube2ipvs.labplan import (
    CLIENT,
    CLIENT_GATEWAY,
    CTL,
    DIRECTOR_AS,
    DIRECTORS,
    FABRIC,
    GOBGPD_API,
    NATS_PORT,
    ROUTER,
    ROUTER_AS,
    LabError,
    LabNode,
    LabPod,
    LabVip,
    LabWorld,
    feed,
    frr_config,
    read_cluster,
    veth_name,
)

STATE_ROOT: Final = Path("/run/kube2ipvs-lab")
FRR_DIR: Final = Path("/usr/lib/frr")
PORTS: Final = {"watcher": 9871, "director": 9872, "bgp-speaker": 9873, "realserver": 9874}
TOOLS: Final = ("ip", "nft", "curl", "gobgpd", "nats-server")
UP_TIMEOUT: Final = 180.0
POLL: Final = 0.05
GRACE: Final = 2.0  # seconds a pod that left the files keeps running (out of the feed already)
_NAME: Final = re.compile(r"[a-z0-9]{1,8}\Z")
CONTROL_ACTIONS: Final = ("stop", "start", "restart")
CONTROL_TIMEOUT: Final = 60.0


class LabUsageError(Exception):
    """The lab cannot start or be found: one clear line for the operator."""


def validate_name(name: str) -> str:
    if not _NAME.match(name):
        raise LabUsageError(f"lab name {name!r}: 1-8 lower-case letters or digits")
    return name


def state_dir(name: str, root: Path = STATE_ROOT) -> Path:
    return root / name


def prefix(name: str) -> str:
    return f"k2i{name}-"


def nats_binary() -> str | None:
    return shutil.which("nats-server") or next(
        (c for c in ("/usr/sbin/nats-server", "/usr/bin/nats-server") if os.access(c, os.X_OK)), None)


def missing_tools() -> list[str]:
    missing = [t for t in TOOLS if (nats_binary() if t == "nats-server" else shutil.which(t)) is None]
    missing += [f"{FRR_DIR}/{d} (frr)" for d in ("zebra", "bgpd") if not os.access(FRR_DIR / d, os.X_OK)]
    return missing


def _kube2ipvs(*args: str) -> list[str]:
    return [sys.executable, "-m", "kube2ipvs.cli", *args]


@dataclass
class Record:
    """What the supervisor started and created, as `state.json` holds it."""

    name: str
    cluster: str
    supervisor: int
    phase: str = "starting"  # starting, ready, failed, stopping
    error: str | None = None
    started_at: float = field(default_factory=time.time)
    ready_after: float | None = None
    dataplane: str | None = None
    dataplane_reason: str | None = None
    namespaces: list[str] = field(default_factory=list)
    processes: dict[str, dict[str, Any]] = field(default_factory=dict)  # key -> pid, namespace, argv
    vips: list[dict[str, Any]] = field(default_factory=list)
    nodes: dict[str, str] = field(default_factory=dict)
    pods: dict[str, dict[str, Any]] = field(default_factory=dict)  # address -> name, node, namespace
    skipped: list[str] = field(default_factory=list)

    @property
    def client_namespace(self) -> str:
        return prefix(self.name) + "client"

    def save(self, directory: Path) -> None:
        tmp = directory / "state.json.tmp"
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        os.replace(tmp, directory / "state.json")

    @classmethod
    def load(cls, directory: Path) -> Record | None:
        try:
            data = json.loads((directory / "state.json").read_text())
        except (OSError, ValueError):
            return None
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def _alive(pid: int) -> bool:
    with contextlib.suppress(ChildProcessError):  # our own child (a supervisor `up` started here): reap it
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2:][:1] not in ("Z", "X")  # a zombie has exited


def run(*cmd: str, timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if check and done.returncode != 0:
        raise LabError(f"{' '.join(cmd)}: {done.stderr.strip() or done.stdout.strip() or done.returncode}")
    return done


def in_ns(ns: str, *cmd: str, timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run("ip", "netns", "exec", ns, *cmd, timeout=timeout, check=check)


# -- probing from the client ---------------------------------------------------------------------

_UDP_PROBE: Final = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(float(sys.argv[3]))
s.sendto(b"probe", (sys.argv[1], int(sys.argv[2])))
try:
    print(s.recvfrom(2048)[0].decode().strip())
except OSError as exc:
    print(f"no answer: {exc}", file=sys.stderr)
    sys.exit(1)
"""


def probe(client_ns: str, vip: LabVip, timeout: float = 1.0) -> str | None:
    """The answer of `vip` to one request from the client namespace; None without one."""
    if vip.protocol == "tcp":
        done = in_ns(client_ns, "curl", "-sS", "-m", str(timeout), vip.url(), timeout=timeout + 5, check=False)
    else:
        done = in_ns(client_ns, sys.executable, "-c", _UDP_PROBE, vip.vip, str(vip.port), str(timeout),
                     timeout=timeout + 5, check=False)
    return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else None


# -- the supervisor ----------------------------------------------------------------------------

class Supervisor:
    """Builds the lab and keeps it equal to the cluster files; tears it down on SIGTERM."""

    def __init__(self, name: str, cluster: Path, directory: Path) -> None:
        self.name, self.cluster, self.dir = name, cluster, directory
        self.prefix = prefix(name)
        self.record = Record(name=name, cluster=str(cluster), supervisor=os.getpid())
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.stopping = False
        self.logs = directory / "logs"
        self.nats_url = f"nats://{CTL}:{NATS_PORT}"
        self._stamp: tuple[tuple[str, int, int], ...] = ()
        self._last_error: str | None = None
        self._fabric_ports = 0
        self.feed_dir = directory / "cluster"
        self._feed = ""
        self._doomed: dict[str, float] = {}  # pod address -> when to stop it (out of the feed already)
        self._doomed_nodes: dict[str, float] = {}  # node -> when to remove it (out of the feed already)
        self._ready: dict[str, str] = {}  # key -> the line its log prints once it serves (for restarts)
        self.control_dir = directory / "control"

    # -- bookkeeping -------------------------------------------------------------------------

    def save(self) -> None:
        self.record.save(self.dir)

    def ns(self, suffix: str) -> str:
        return self.prefix + suffix

    def add_ns(self, suffix: str) -> str:
        name = self.ns(suffix)
        run("ip", "netns", "add", name)
        self.record.namespaces.append(name)
        self.save()
        run("ip", "-n", name, "link", "set", "lo", "up")
        in_ns(name, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1", check=False)
        return name

    def del_ns(self, name: str) -> None:
        run("ip", "netns", "del", name, check=False)
        if name in self.record.namespaces:
            self.record.namespaces.remove(name)
        self.save()

    def spawn(self, key: str, ns: str, argv: Sequence[str], *, ready: str | None = None,
              timeout: float = 15) -> None:
        """Start `argv` in `ns`, its output to logs/<key>.log; with `ready`, wait for that line."""
        log = self.logs / f"{key}.log"
        with log.open("ab") as out:
            start = out.tell()  # a restarted component appends: only what it prints from here counts
            proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL)
        self.procs[key] = proc  # `ip netns exec` execs the command: this PID is the service's
        self.record.processes[key] = {"pid": proc.pid, "namespace": ns, "argv": list(argv)}
        self.save()
        if ready is None:
            return
        self._ready[key] = ready
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise LabError(f"{key} exited with {proc.returncode}: {_tail(log)}")
            with contextlib.suppress(OSError), log.open("rb") as text:
                text.seek(start)
                if ready in text.read().decode(errors="replace"):
                    return
            time.sleep(0.02)
        raise LabError(f"{key} did not print {ready!r} within {timeout} s: {_tail(log)}")

    def stop(self, key: str) -> None:
        proc = self.procs.pop(key, None)
        self.record.processes.pop(key, None)
        if proc is not None:
            end_process(proc, grace=10)
        self.save()

    def halt(self, key: str) -> None:
        """Stop one component (SIGTERM, then SIGKILL after 10 s) and keep its record, so that it
        can be started again as it was."""
        proc = self.procs.get(key)
        entry = self.record.processes[key]
        if proc is not None:
            end_process(proc, grace=10)
        entry.setdefault("exited", proc.returncode if proc is not None else None)
        entry["stopped"] = True
        self.save()

    def control(self, action: str, key: str) -> dict[str, Any]:
        """One operator request: stop, start or restart the component `key` with its recorded
        namespace and argv (waiting for its ready line, where it has one)."""
        entry = self.record.processes.get(key)
        if entry is None:
            return {"error": f"no component {key!r} (the lab runs: {', '.join(sorted(self.record.processes))})"}
        if action not in CONTROL_ACTIONS:
            return {"error": f"{action!r} is not one of {', '.join(CONTROL_ACTIONS)}"}
        proc = self.procs.get(key)
        if action == "start" and proc is not None and proc.poll() is None:
            return {"error": f"{key} is running (PID {proc.pid}): restart it, or stop it first"}
        if action in ("stop", "restart"):
            self.halt(key)
        if action in ("start", "restart"):
            try:
                self.spawn(key, str(entry["namespace"]), [str(a) for a in entry["argv"]],
                           ready=self._ready.get(key), timeout=30)
            except LabError as exc:
                return {"error": str(exc)}
        print(f"lab: {action} {key}: PID {self.record.processes[key]['pid']}", flush=True)
        return {"action": action, "component": key, "pid": self.record.processes[key]["pid"],
                "running": action != "stop"}

    def serve_requests(self) -> None:
        """Answer the requests `lab_control` left in the control directory, oldest first."""
        try:
            requests = sorted(self.control_dir.glob("*.json"), key=lambda p: p.stat().st_mtime_ns)
        except OSError:
            return
        for path in requests:
            try:
                asked = json.loads(path.read_text())
                answer = self.control(str(asked["action"]), str(asked["component"]))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                answer = {"error": f"unreadable request {path.name}: {exc}"}
            tmp = path.with_name(f".{path.stem}.done.tmp")
            tmp.write_text(json.dumps(answer) + "\n")
            os.replace(tmp, path.with_suffix(".done"))
            path.unlink(missing_ok=True)

    def reap(self) -> None:
        """Record the exit of a process that ended on its own (a lab component is not restarted:
        `status` shows it gone, as an operator would see a crashed service, until `lab_control`
        starts it again)."""
        for key, proc in self.procs.items():
            code = proc.poll()
            entry = self.record.processes.get(key)
            if code is not None and entry is not None and "exited" not in entry:
                entry["exited"] = code
                print(f"lab: {key} exited with {code}", flush=True)
                self.save()

    def link_fabric(self, ns: str, address: str) -> None:
        """`ns`'s eth0 on the router's bridge, with `address`/24 and the router as gateway."""
        self._fabric_ports += 1
        port = f"f{self._fabric_ports}"
        run("ip", "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", port, "netns", self.ns("router"))
        run("ip", "-n", self.ns("router"), "link", "set", port, "master", "br0", "up")
        run("ip", "-n", ns, "addr", "add", f"{address}/{FABRIC.prefixlen}", "dev", "eth0")
        run("ip", "-n", ns, "link", "set", "eth0", "up")
        run("ip", "-n", ns, "route", "add", "default", "via", ROUTER)

    # -- the fixed part ----------------------------------------------------------------------

    def build_router(self) -> None:
        router = self.add_ns("router")
        in_ns(router, "sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv4.fib_multipath_hash_policy=1",
              "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0")
        run("ip", "-n", router, "link", "add", "br0", "type", "bridge")
        run("ip", "-n", router, "addr", "add", f"{ROUTER}/{FABRIC.prefixlen}", "dev", "br0")
        run("ip", "-n", router, "link", "set", "br0", "up")
        client = self.add_ns("client")
        run("ip", "-n", client, "link", "add", "eth0", "type", "veth", "peer", "name", "uplink", "netns", router)
        run("ip", "-n", client, "addr", "add", f"{CLIENT}/24", "dev", "eth0")
        run("ip", "-n", client, "link", "set", "eth0", "up")
        run("ip", "-n", client, "route", "add", "default", "via", CLIENT_GATEWAY)
        run("ip", "-n", router, "addr", "add", f"{CLIENT_GATEWAY}/24", "dev", "uplink")
        run("ip", "-n", router, "link", "set", "uplink", "up")
        frr = self.dir / "frr"
        frr.mkdir(exist_ok=True)
        frr.chmod(0o777)  # zebra and bgpd drop to the frr user, and write their sockets here
        (frr / "frr.conf").write_text(frr_config())
        (frr / "frr.conf").chmod(0o644)
        common = ["-z", str(frr / "zserv.api"), "--vty_socket", str(frr), "-P", "0", "-u", "frr", "-g", "frr"]
        self.spawn("zebra", router, [str(FRR_DIR / "zebra"), *common, "-i", str(frr / "zebra.pid")])
        deadline = time.monotonic() + 10
        while not (frr / "zserv.api").exists():
            if time.monotonic() > deadline:
                raise LabError(f"zebra did not open its socket: {_tail(self.logs / 'zebra.log')}")
            time.sleep(0.02)
        self.spawn("bgpd", router, [str(FRR_DIR / "bgpd"), *common, "-i", str(frr / "bgpd.pid"),
                                    "-f", str(frr / "frr.conf")])

    def build_control(self) -> None:
        ctl = self.add_ns("ctl")
        self.link_fabric(ctl, CTL)
        store = self.dir / "nats"
        store.mkdir(exist_ok=True)
        nats = nats_binary()
        assert nats is not None  # checked by `up`
        self.spawn("nats", ctl, [nats, "-js", "-a", CTL, "-p", str(NATS_PORT), "-sd", str(store),
                                 "--server_name", f"kube2ipvs-lab-{self.name}"], ready="Server is ready")

    def start_watcher(self) -> None:
        """The watcher reads the feed (`labplan.feed`), which lists a pod once it serves. It
        reads a new feed when inotify tells it one was renamed in; the 1 s poll is its fallback."""
        self.spawn("watcher", self.ns("ctl"), _kube2ipvs(
            "watcher", "--source", "files", "--files", str(self.feed_dir), "--files-interval", "1",
            "--no-leader-elect", "--default-service", "default/unicorns:http", "--min-interval", "0.02",
            "--nats", self.nats_url, "--listen", f"{CTL}:{PORTS['watcher']}"))

    def build_directors(self) -> None:
        gobgpd = shutil.which("gobgpd")
        assert gobgpd is not None  # checked by `up`
        for host, address in DIRECTORS.items():
            ns = self.add_ns(host)
            self.link_fabric(ns, address)
            self.spawn(f"{host}-gobgpd", ns, [gobgpd, "--pprof-disable", "--api-hosts", GOBGPD_API])
            self.spawn(f"{host}-director", ns, _kube2ipvs(
                "director", "--mode", "bgp", "--dataplane", "auto", "--interface", "eth0", "--device", "lo",
                "--host-name", host, "--nats", self.nats_url, "--state-file", str(self.dir / f"{host}-director.json"),
                "--listen", f"{address}:{PORTS['director']}"))
            self.spawn(f"{host}-bgp-speaker", ns, _kube2ipvs(
                "bgp-speaker", "--gobgpd", GOBGPD_API, "--local-as", str(DIRECTOR_AS), "--router-id", address,
                "--peer", f"{ROUTER}@{ROUTER_AS}", "--passive", "--hold-time", "9", "--keepalive", "3",
                "--host-name", host, "--nats", self.nats_url, "--listen", f"{address}:{PORTS['bgp-speaker']}"))

    # -- what follows the files --------------------------------------------------------------

    def add_node(self, node: LabNode) -> None:
        ns = self.add_ns(node.name)
        self.link_fabric(ns, node.address)
        in_ns(ns, "sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv4.conf.all.rp_filter=0",
              "net.ipv4.conf.default.rp_filter=0", "net.ipv4.conf.eth0.rp_filter=0")
        self.spawn(f"realserver-{node.name}", ns, _kube2ipvs(
            "realserver", "--node", node.name, "--interface", "eth0", "--nats", self.nats_url,
            "--state-file", str(self.dir / f"realserver-{node.name}.json"),
            "--listen", f"{node.address}:{PORTS['realserver']}"))
        self.record.nodes[node.name] = ns
        self.save()

    def remove_node(self, name: str) -> None:
        for address, pod in list(self.record.pods.items()):
            if pod["node"] == name:
                self.remove_pod(address)
        self.stop(f"realserver-{name}")
        ns = self.record.nodes.pop(name, None)
        if ns is not None:
            self.del_ns(ns)

    def add_pod(self, pod: LabPod) -> None:
        node_ns = self.record.nodes[pod.node]
        host_if = veth_name("p", pod.address)
        ns = self.add_ns(veth_name("p", pod.address))
        run("ip", "-n", node_ns, "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", ns)
        run("ip", "-n", node_ns, "link", "set", host_if, "up")
        # The pod's gateway is 169.254.1.1, answered by proxy ARP on the node's side, at once
        # (proxy_delay's default holds each answer back by up to 0.8 s).
        in_ns(node_ns, "sysctl", "-qw", f"net.ipv4.conf.{host_if}.proxy_arp=1", f"net.ipv4.conf.{host_if}.rp_filter=0",
              f"net.ipv4.neigh.{host_if}.proxy_delay=0")
        run("ip", "-n", node_ns, "route", "add", f"{pod.address}/32", "dev", host_if)
        run("ip", "-n", ns, "addr", "add", f"{pod.address}/32", "dev", "eth0")
        run("ip", "-n", ns, "link", "set", "eth0", "up")
        run("ip", "-n", ns, "route", "add", "169.254.1.1", "dev", "eth0", "scope", "link")
        run("ip", "-n", ns, "route", "add", "default", "via", "169.254.1.1", "dev", "eth0")
        argv = [sys.executable, "-m", "kube2ipvs.labpod", pod.name, pod.node]
        if pod.tcp_ports:
            argv += ["--tcp", ",".join(map(str, pod.tcp_ports))]
        if pod.udp_ports:
            argv += ["--udp", ",".join(map(str, pod.udp_ports))]
        self.record.pods[pod.address] = {"name": pod.name, "node": pod.node, "namespace": ns,
                                         "tcp": list(pod.tcp_ports), "udp": list(pod.udp_ports)}
        self.spawn(f"pod-{pod.address}", ns, argv, ready="ready")

    def remove_pod(self, address: str) -> None:
        self.stop(f"pod-{address}")
        pod = self.record.pods.pop(address, None)
        if pod is not None:
            self.del_ns(pod["namespace"])  # its veth goes with it

    def _files_stamp(self) -> tuple[tuple[str, int, int], ...]:
        stamp = []
        with contextlib.suppress(OSError):
            for p in sorted(self.cluster.iterdir()):
                with contextlib.suppress(OSError):
                    st = p.stat()
                    stamp.append((p.name, st.st_mtime_ns, st.st_size))
        return tuple(stamp)

    def reconcile(self, world: LabWorld) -> None:
        """Pods and nodes to the files, in Kubernetes' order: a new pod is started before the feed
        lists it; a pod that goes leaves the feed first and stops GRACE seconds later, once the
        load balancer no longer sends it anything (its connections end as they would on a
        terminating pod)."""
        want_nodes = {n.name: n for n in world.nodes}
        for name in want_nodes:
            self._doomed_nodes.pop(name, None)
        for name in sorted(want_nodes.keys() - self.record.nodes.keys()):
            self.add_node(want_nodes[name])
        want_pods = {p.address: p for p in world.pods}
        now = time.monotonic()
        for address, pod in sorted(self.record.pods.items()):
            wanted = want_pods.get(address)
            if wanted is not None and address in self._doomed:
                del self._doomed[address]  # back before it stopped: it just serves again
            if wanted is None:
                self._doomed.setdefault(address, now + GRACE)
            elif (wanted.name, wanted.node, list(wanted.tcp_ports), list(wanted.udp_ports)) != \
                    (pod["name"], pod["node"], pod["tcp"], pod["udp"]):
                self.remove_pod(address)  # changed: a new pod in its place
        for address in sorted(want_pods.keys() - self.record.pods.keys()):
            self.add_pod(want_pods[address])
        serving = [a for a in self.record.pods if a not in self._doomed]
        self.write_feed(feed(world.objects, serving))
        for name in sorted(self.record.nodes.keys() - want_nodes.keys()):
            self._doomed_nodes.setdefault(name, now + GRACE)
        self.record.vips = [asdict(v) for v in world.vips]
        self.record.skipped = list(world.skipped)
        self.save()

    def write_feed(self, text: str) -> None:
        if text == self._feed:
            return
        self.feed_dir.mkdir(exist_ok=True)
        tmp = self.feed_dir / ".objects.json.tmp"  # a dot file: the watcher reads *.json only
        tmp.write_text(text)
        os.replace(tmp, self.feed_dir / "objects.json")
        self._feed = text

    def stop_due(self) -> None:
        now = time.monotonic()
        for address, when in sorted(self._doomed.items()):
            if when <= now:
                del self._doomed[address]
                self.remove_pod(address)
        for name, when in sorted(self._doomed_nodes.items()):
            if when <= now:
                del self._doomed_nodes[name]
                self.remove_node(name)

    def follow_files(self) -> None:
        stamp = self._files_stamp()
        if stamp == self._stamp:
            return
        try:
            world = read_cluster(self.cluster)
        except LabError as exc:
            if str(exc) != self._last_error:
                print(f"lab: cluster files rejected, the lab stays as it was: {exc}", flush=True)
                self._last_error = str(exc)
            self._stamp = stamp
            return
        self._last_error = None
        self.reconcile(world)
        self._stamp = stamp

    # -- whole runs ------------------------------------------------------------------------

    def wait_vips(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        pending = [LabVip(**v) for v in self.record.vips]
        while pending:
            if self.stopping:
                raise LabError("stopped while starting")
            pending = [v for v in pending if probe(self.record.client_namespace, v) is None]
            if pending and time.monotonic() > deadline:
                raise LabError("no answer within {:.0f} s from {}".format(timeout, ", ".join(v.url() for v in pending)))
            if pending:
                self.follow_files()
                time.sleep(0.2)

    def wait_healthy(self, timeout: float) -> None:
        """Until every service says it is healthy: a VIP can answer through one director while
        the other has not received its first state yet."""
        deadline = time.monotonic() + timeout
        while True:
            sick = {k: h["reason"] for k, h in all_health(self.record).items() if not h["ok"]}
            if not sick:
                return
            if self.stopping or time.monotonic() > deadline:
                raise LabError("not healthy within {:.0f} s: {}".format(
                    timeout, "; ".join(f"{k}: {why}" for k, why in sorted(sick.items()))))
            self.follow_files()
            time.sleep(0.2)

    def read_dataplane(self) -> None:
        host, address = next(iter(DIRECTORS.items()))
        done = in_ns(self.ns(host), "curl", "-sS", "-m", "2", f"http://{address}:{PORTS['director']}/config",
                     check=False)
        try:
            settings = json.loads(done.stdout).get("settings", {})
        except ValueError:
            return
        self.record.dataplane = settings.get("dataplane")
        log = _tail(self.logs / f"{host}-director.log", 200)
        reason = re.search(r"event=dataplane dataplane=nftables reason=('[^']*'|\"[^\"]*\")", log)
        self.record.dataplane_reason = reason.group(1).strip("'\"") if reason else None

    def up(self) -> int:
        self.logs.mkdir(parents=True, exist_ok=True)
        self.control_dir.mkdir(exist_ok=True)
        self.save()
        started = time.monotonic()
        try:
            world = read_cluster(self.cluster)
            self.build_router()
            self.build_control()
            self.build_directors()
            self.reconcile(world)
            self._stamp = self._files_stamp()
            self.start_watcher()
            self.wait_vips(UP_TIMEOUT)
            self.wait_healthy(UP_TIMEOUT)
            self.read_dataplane()
        except (LabError, OSError, subprocess.SubprocessError) as exc:
            self.record.phase, self.record.error = "failed", str(exc)
            self.save()
            print(f"lab: failed: {exc}", flush=True)
            self.teardown(keep_state=True)
            return 1
        self.record.phase = "ready"
        self.record.ready_after = round(time.monotonic() - started, 2)
        self.save()
        print(f"lab: ready after {self.record.ready_after} s", flush=True)
        while not self.stopping:
            self.reap()
            try:
                self.serve_requests()
                self.stop_due()
                self.follow_files()
            except (LabError, OSError, subprocess.SubprocessError) as exc:
                print(f"lab: could not follow the files or serve a request: {exc}", flush=True)
            time.sleep(POLL)
        self.teardown()
        return 0

    def teardown(self, *, keep_state: bool = False) -> None:
        """Stop every process we started (pods first, the router last) and delete our namespaces."""
        self.record.phase = "stopping" if not keep_state else self.record.phase
        for key in sorted(self.procs, key=_stop_rank):
            self.stop(key)
        for ns in reversed(list(self.record.namespaces)):
            self.del_ns(ns)
        if not keep_state:
            shutil.rmtree(self.dir, ignore_errors=True)


_STOP_ORDER: Final = ("pod-", "realserver-", "bgp-speaker", "director", "gobgpd", "watcher", "nats", "bgpd", "zebra")


def _stop_rank(key: str) -> int:
    """Teardown order: pods first, then the services, the control plane, the router last."""
    return next((i for i, part in enumerate(_STOP_ORDER) if part in key), len(_STOP_ORDER))


def end_process(proc: subprocess.Popen[Any], *, grace: float) -> None:
    """End a process we started (by its PID): SIGTERM, then SIGKILL when it is still there after
    `grace` seconds; reaped either way. Nothing when it has ended already."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=grace)


def _tail(path: Path, lines: int = 8) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def supervise(name: str, cluster: Path, root: Path = STATE_ROOT) -> int:
    """`lab run`: the supervisor's whole life (started by `up`, in the background)."""
    supervisor = Supervisor(name, cluster, state_dir(name, root))

    def stop(_signum: int, _frame: object) -> None:
        supervisor.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    return supervisor.up()


# -- the operator's commands -------------------------------------------------------------------

def running(name: str, root: Path = STATE_ROOT) -> Record | None:
    record = Record.load(state_dir(name, root))
    return record if record is not None and _alive(record.supervisor) else None


def lab_up(name: str, cluster: Path, out: TextIO, *, root: Path = STATE_ROOT, timeout: float = UP_TIMEOUT) -> int:
    if os.geteuid() != 0:
        raise LabUsageError("the lab needs root (network namespaces, nftables, routes): run it with sudo")
    if (missing := missing_tools()):
        raise LabUsageError(f"missing: {', '.join(missing)} (`make install` installs them)")
    try:
        world = read_cluster(cluster)
    except LabError as exc:
        raise LabUsageError(f"{cluster}: {exc}") from None
    if (record := running(name, root)) is not None:
        print(f"the lab {name!r} is already running (supervisor PID {record.supervisor}):", file=out)
        summary(record, out)
        return 0
    directory = state_dir(name, root)
    leftovers = Record.load(directory)
    if leftovers is not None:
        cleanup(leftovers, directory)
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o755)
    print(f"starting the lab {name!r}: {len(world.nodes)} nodes, {len(world.pods)} pods, "
          f"{len(DIRECTORS)} BGP directors behind an FRR router, from {cluster} ...", file=out, flush=True)
    with (directory / "supervisor.log").open("ab") as log:
        proc = subprocess.Popen(_kube2ipvs("lab", "run", "--name", name, "--cluster", str(cluster.resolve()),
                                           "--state-root", str(root)),
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    deadline = time.monotonic() + timeout + 30
    while time.monotonic() < deadline:
        record = Record.load(directory)
        if record is not None and record.phase == "ready":
            summary(record, out)
            return 0
        if (record is not None and record.phase == "failed") or proc.poll() is not None:
            break
        time.sleep(0.2)
    record = Record.load(directory)
    error = record.error if record is not None and record.error else _tail(directory / "supervisor.log")
    print(f"the lab did not come up: {error}", file=out)
    print(f"logs: {directory / 'logs'}", file=out)
    lab_down(name, out, root=root, quiet=True)
    return 1


def lab_control(name: str, action: str, component: str, *, root: Path = STATE_ROOT,
                timeout: float = CONTROL_TIMEOUT) -> dict[str, Any]:
    """Ask the supervisor of the lab `name` to stop, start or restart one component (a key of
    `status()["processes"]`, e.g. `nats`, `watcher`, `dir1-director`, `realserver-node-2`); its
    answer: the component's PID once it runs (after its ready line, where it has one)."""
    if action not in CONTROL_ACTIONS:
        raise LabUsageError(f"{action!r}: give one of {', '.join(CONTROL_ACTIONS)}")
    record = running(name, root)
    if record is None:
        raise LabUsageError(f"no lab named {name!r} is running")
    if component not in record.processes:
        raise LabUsageError(f"no component {component!r} (the lab runs: {', '.join(sorted(record.processes))})")
    control = state_dir(name, root) / "control"
    control.mkdir(exist_ok=True)
    request = f"{os.getpid()}-{time.monotonic_ns()}"
    tmp = control / f".{request}.tmp"  # a dot file: the supervisor reads *.json only
    tmp.write_text(json.dumps({"action": action, "component": component}) + "\n")
    os.replace(tmp, control / f"{request}.json")
    done = control / f"{request}.done"
    deadline = time.monotonic() + timeout
    while not done.exists():
        if time.monotonic() > deadline or not _alive(record.supervisor):
            (control / f"{request}.json").unlink(missing_ok=True)
            raise LabUsageError(f"the lab's supervisor did not answer {action} {component} within {timeout:.0f} s")
        time.sleep(0.02)
    answer: dict[str, Any] = json.loads(done.read_text())
    done.unlink(missing_ok=True)
    if "error" in answer:
        raise LabUsageError(f"{action} {component}: {answer['error']}")
    return answer


def summary(record: Record, out: TextIO) -> None:
    client = record.client_namespace
    print(f"the lab {record.name!r} is up (ready after {record.ready_after} s): {len(record.nodes)} nodes, "
          f"{len(record.pods)} pods, directors dir1 and dir2 (BGP, ECMP through the FRR router)", file=out)
    if record.dataplane == "nftables":
        why = f" ({record.dataplane_reason})" if record.dataplane_reason else ""
        print(f"director dataplane: nftables, because this kernel has no usable IPVS{why}: stateless direct "
              "routing by Maglev tables", file=out)
    else:
        print(f"director dataplane: {record.dataplane or 'unknown'}", file=out)
    print("VIPs:", file=out)
    for v in record.vips:
        print(f"  {v['protocol']:<4} {v['vip']}:{v['port']}", file=out)
    first_tcp = next((v for v in record.vips if v["protocol"] == "tcp"), None)
    first_udp = next((v for v in record.vips if v["protocol"] == "udp"), None)
    print("try:", file=out)
    if first_tcp:
        print(f"  ip netns exec {client} curl http://{first_tcp['vip']}:{first_tcp['port']}/", file=out)
    if first_udp:
        print(f"  kube2ipvs lab probe udp://{first_udp['vip']}:{first_udp['port']}", file=out)
    print(f"  edit {record.cluster}/endpointslices.yaml (add or remove an endpoint) and ask again", file=out)
    print("  kube2ipvs lab status; kube2ipvs lab down", file=out)


def _health(ns: str, url: str) -> dict[str, Any]:
    done = in_ns(ns, "curl", "-sS", "-m", "2", url, timeout=10, check=False)
    try:
        body = json.loads(done.stdout)
    except ValueError:
        return {"ok": False, "reason": done.stderr.strip() or "no answer"}
    return {"ok": bool(body.get("ok")), "reason": body.get("reason") or ""}


def all_health(record: Record) -> dict[str, dict[str, Any]]:
    """Every service's /healthz (ok, reason), asked in its namespace."""
    name = record.name
    endpoints = {f"{h}-{role}": (prefix(name) + h, f"http://{a}:{PORTS[role]}/healthz")
                 for h, a in DIRECTORS.items() for role in ("director", "bgp-speaker")}
    endpoints["watcher"] = (prefix(name) + "ctl", f"http://{CTL}:{PORTS['watcher']}/healthz")
    for node, ns in record.nodes.items():
        address = next((p["argv"][p["argv"].index("--listen") + 1] for k, p in record.processes.items()
                        if k == f"realserver-{node}"), None)
        if address:
            endpoints[f"realserver-{node}"] = (ns, f"http://{address}/healthz")
    return {key: _health(ns, url) for key, (ns, url) in sorted(endpoints.items())}


def router_routes(name: str, prefixes: Iterable[str], *, root: Path = STATE_ROOT) -> dict[str, set[str]]:
    """The lab router's installed next hops for each of `prefixes` (FRR's RIB, through vtysh on
    the lab's FRR socket); a prefix without an installed route is absent."""
    done = subprocess.run(["vtysh", "--vty_socket", str(state_dir(name, root) / "frr"), "-c", "show ip route json"],
                          capture_output=True, text=True, timeout=10, check=False)
    try:
        rib = json.loads(done.stdout)
    except ValueError:
        return {}
    hops: dict[str, set[str]] = {}
    for prefix_ in prefixes:
        for route in rib.get(prefix_, []):
            if route.get("installed"):
                hops.setdefault(prefix_, set()).update(h["ip"] for h in route.get("nexthops", [])
                                                       if h.get("active") and "ip" in h)
    return hops


def status(name: str, *, root: Path = STATE_ROOT) -> dict[str, Any]:
    record = Record.load(state_dir(name, root))
    if record is None:
        raise LabUsageError(f"no lab named {name!r} is running (start one with `kube2ipvs lab up`)")
    alive = _alive(record.supervisor)
    health = all_health(record) if alive else {}
    return {
        "name": name, "phase": record.phase if alive else "supervisor not running", "error": record.error,
        "client_namespace": record.client_namespace, "dataplane": record.dataplane,
        "dataplane_reason": record.dataplane_reason, "cluster": record.cluster,
        "vips": record.vips, "nodes": record.nodes, "pods": record.pods, "skipped": record.skipped,
        "processes": {k: {**v, "alive": "exited" not in v and _alive(int(v["pid"]))}
                      for k, v in sorted(record.processes.items())},
        "namespaces": record.namespaces, "health": health,
    }


def print_status(report: dict[str, Any], out: TextIO) -> None:
    print(f"lab {report['name']!r}: {report['phase']}; dataplane {report['dataplane']}; "
          f"client namespace {report['client_namespace']}", file=out)
    for v in report["vips"]:
        print(f"  {v['protocol']:<4} {v['vip']}:{v['port']}", file=out)
    for key, h in report["health"].items():
        print(f"  {key:<22} {'ok' if h['ok'] else 'NOT OK: ' + h['reason']}", file=out)
    dead = [k for k, p in report["processes"].items() if not p["alive"]]
    if dead:
        print(f"  not running: {', '.join(dead)}", file=out)
    for line in report["skipped"]:
        print(f"  skipped: {line}", file=out)


def cleanup(record: Record, directory: Path) -> None:
    """What a supervisor that died left: its processes (by PID, if still alive) and namespaces.
    A PID recorded as exited may belong to another process by now: it is left alone."""
    live = [entry for entry in record.processes.values() if "exited" not in entry]
    for entry in live:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(int(entry["pid"]), signal.SIGTERM)
    time.sleep(0.2)
    for entry in live:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(int(entry["pid"]), signal.SIGKILL)
    for ns in reversed(record.namespaces):
        run("ip", "netns", "del", ns, check=False)
    shutil.rmtree(directory, ignore_errors=True)


def lab_down(name: str, out: TextIO, *, root: Path = STATE_ROOT, quiet: bool = False) -> int:
    directory = state_dir(name, root)
    record = Record.load(directory)
    if record is None:
        if not quiet:
            print(f"no lab named {name!r} is running", file=out)
        shutil.rmtree(directory, ignore_errors=True)
        return 0
    if _alive(record.supervisor):
        os.kill(record.supervisor, signal.SIGTERM)
        deadline = time.monotonic() + 60
        while _alive(record.supervisor) and time.monotonic() < deadline:
            time.sleep(0.1)
    if directory.exists():  # the supervisor died, or did not finish: clean up after it
        left = Record.load(directory)
        cleanup(left or record, directory)
    if not quiet:
        print(f"the lab {name!r} is down: {len(record.namespaces)} namespaces and "
              f"{len(record.processes)} processes removed", file=out)
    return 0

