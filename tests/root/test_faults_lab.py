"""Faults in the lab (issue 11), as root: real processes killed and restarted while real traffic
flows, one scenario at a time, on one lab for the module (a copy of lab/cluster/).

A prober in the client namespace makes a new TCP connection to 192.0.2.10:80 (web) and sends a
UDP datagram to 192.0.2.11:53 (dns) every 20 ms, each on its own thread, and records every
answer or failure (TCP: no answer within 2 s, that is after one SYN retransmission; UDP: none
within 1 s, no retry). Every scenario prints the requests it saw, how many failed, the longest
outage (from the first failed request of a run to the next answered one) and the time the fault
took to heal, and asserts the guarantee that fault comes with.

The components are stopped and started again through the lab's supervisor (`lab_control`), so
it keeps owning every PID and `lab down` stops them; SIGKILLs go to the PID the lab recorded.
Kernel changes are counted three ways: the services' op counters, their `event=kernel_changed`
log lines, and `nft monitor` run in the namespace (every rule, set element or table change
there). Kubernetes API outages and 410 storms are tested against the in-process API server in
tests/test_watcher_kube.py.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import pytest

from kube2ipvs.cli import main
from kube2ipvs.lab import STATE_ROOT, lab_control, prefix, router_routes
from kube2ipvs.labplan import DIRECTORS
from tests.root.labfixture import running_lab

pytestmark = pytest.mark.root

REPO: Final = Path(__file__).resolve().parents[2]
NAME: Final = f"f{os.getpid() % 1_000_000}"
WEB: Final = ("192.0.2.10", 80)
DNS: Final = ("192.0.2.11", 53)
VIPS: Final = ("192.0.2.10/32", "192.0.2.11/32")
INTERVAL: Final = 0.02
TCP_TIMEOUT: Final = 2.0
UDP_TIMEOUT: Final = 1.0
# Bounds on recovery, generous on purpose: this 2-core machine runs other tests at the same time,
# and one restart costs a Python start (~1-2 s under load) plus one reconcile.
HEAL: Final = 30.0
NODES: Final = {"node-1": "10.99.0.21", "node-2": "10.99.0.22", "node-3": "10.99.0.23"}
WEB2: Final = ("      - {addresses: [10.244.3.11], nodeName: node-3, conditions: {ready: true}, targetRef: {kind: Pod, "
               "name: web-2}}\n")
WEB3: Final = WEB2.replace("10.244.3.11", "10.244.2.13").replace("node-3", "node-2").replace("web-2", "web-3")


# -- the prober --------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Sample:
    protocol: str
    start: float
    took: float
    answer: str | None  # the pod that answered; None: no answer


@dataclass
class Prober:
    """Two threads in the client namespace, one per protocol, one request every INTERVAL."""

    namespace: str
    samples: list[Sample] = field(default_factory=list)
    stopping: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> None:
        for protocol in ("tcp", "udp"):
            thread = threading.Thread(target=self._run, args=(protocol,), name=f"prober-{protocol}", daemon=True)
            thread.start()
            self.threads.append(thread)

    def stop(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=5)

    def _run(self, protocol: str) -> None:
        from pyroute2 import netns  # setns(2) moves this thread alone into the client namespace

        netns.pushns(self.namespace)
        ask = _tcp if protocol == "tcp" else _udp
        while not self.stopping.is_set():
            start = time.monotonic()
            answer = ask()
            took = time.monotonic() - start
            with self.lock:
                self.samples.append(Sample(protocol, start, took, answer))
            self.stopping.wait(max(0.0, INTERVAL - took))

    def since(self, start: float) -> list[Sample]:
        with self.lock:
            return [s for s in self.samples if s.start >= start]


def _tcp() -> str | None:
    try:
        with socket.create_connection(WEB, timeout=TCP_TIMEOUT) as s:
            s.sendall(b"GET / HTTP/1.0\r\nHost: lab\r\n\r\n")
            data = b""
            while chunk := s.recv(4096):
                data += chunk
    except OSError:
        return None
    body = data.split(b"\r\n\r\n", 1)[-1].split()
    return body[0].decode() if body and body[0].startswith(b"web-") else None


def _udp() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # a new source port: a new flow each time
        s.settimeout(UDP_TIMEOUT)
        try:
            s.sendto(b"probe", DNS)
            data = s.recv(2048).split()
        except OSError:
            return None
    return data[0].decode() if data and data[0].startswith(b"dns-") else None


@dataclass(frozen=True, slots=True)
class Traffic:
    """What the prober saw for one protocol during one scenario."""

    requests: int
    failed: int
    outage: float  # the longest run of failures, until the next answer, in seconds
    slowest: float

    def line(self, protocol: str) -> str:
        return (f"{protocol}: {self.requests} requests, {self.failed} failed, longest outage {self.outage:.2f} s, "
                f"slowest answer {self.slowest * 1000:.0f} ms")


def assert_no_failed_request(seen: dict[str, Traffic]) -> None:
    assert seen["tcp"].failed == 0, seen
    assert seen["udp"].failed == 0, seen


def traffic(samples: list[Sample], protocol: str) -> Traffic:
    mine = sorted((s for s in samples if s.protocol == protocol), key=lambda s: s.start)
    outage, first_failed = 0.0, None
    for s in mine:
        if s.answer is None and first_failed is None:
            first_failed = s.start
        elif s.answer is not None and first_failed is not None:
            outage, first_failed = max(outage, s.start - first_failed), None
    if first_failed is not None:  # still failing at the end
        outage = max(outage, mine[-1].start + mine[-1].took - first_failed)
    answered = [s.took for s in mine if s.answer is not None]
    return Traffic(len(mine), sum(1 for s in mine if s.answer is None), outage, max(answered, default=0.0))


@dataclass
class Scenario:
    """One fault's window of traffic; `report()` prints and returns what it saw."""

    name: str
    prober: Prober
    start: float = field(default_factory=time.monotonic)

    def note(self, text: str) -> None:
        print(f"[{self.name}] +{time.monotonic() - self.start:.2f} s {text}", flush=True)

    def report(self) -> dict[str, Traffic]:
        time.sleep(1.0)  # a second of traffic after the recovery belongs to the window
        samples = self.prober.since(self.start)
        seen = {p: traffic(samples, p) for p in ("tcp", "udp")}
        for protocol, t in seen.items():
            print(f"[{self.name}] {t.line(protocol)}", flush=True)
            assert t.requests > 20, f"the prober stalled: {t}"  # it ran throughout
        failed = [f"{s.protocol} +{s.start - self.start:.2f} s" for s in samples if s.answer is None]
        if failed:  # when, against the notes' times, to tell which step a failure belongs to
            print(f"[{self.name}] failed requests sent at: {', '.join(failed[:20])}", flush=True)
        return seen


# -- the lab -------------------------------------------------------------------------------------

def cli(*args: str) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(["lab", *args, "--name", NAME], out=out, err=err)
    return code, out.getvalue() + err.getvalue()


def status() -> dict[str, Any]:
    code, text = cli("status", "--json")
    report: dict[str, Any] = json.loads(text)
    assert code in (0, 1), text
    return report


def ns(host: str) -> str:
    return prefix(NAME) + host


def logs() -> Path:
    return STATE_ROOT / NAME / "logs"


def until(what: str, check: Callable[[], bool], seconds: float = HEAL) -> float:
    """Seconds until `check()` holds; fails the test after `seconds`."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > seconds:
            pytest.fail(f"{what}: not within {seconds} s")
        time.sleep(0.05)
    return time.monotonic() - start


def fetch(namespace: str, url: str) -> str | None:
    done = subprocess.run(["ip", "netns", "exec", namespace, "curl", "-sS", "-m", "2", url], capture_output=True,
                          text=True, timeout=10, check=False)
    return done.stdout if done.returncode == 0 else None


def healthy(namespace: str, url: str) -> bool:
    text = fetch(namespace, url)
    try:
        return text is not None and bool(json.loads(text).get("ok"))
    except ValueError:
        return False


ENDPOINTS: Final = {
    **{f"{h}-{role}": (h, f"http://{a}:{port}") for h, a in DIRECTORS.items()
       for role, port in (("director", 9872), ("bgp-speaker", 9873))},
    **{f"realserver-{n}": (n, f"http://{a}:9874") for n, a in NODES.items()},
    "watcher": ("ctl", "http://10.99.0.5:9871"),
}
KERNEL_METRICS: Final = {"director": "kube2ipvs_director_ops_total",
                         "realserver": "kube2ipvs_realserver_kernel_changes_total"}


def component_healthy(key: str) -> bool:
    host, base = ENDPOINTS[key]
    return healthy(ns(host), base + "/healthz")


def all_healthy() -> bool:
    return all(component_healthy(k) for k in ENDPOINTS)


def metric(key: str, name: str) -> float | None:
    """The sum of every sample of `name` in `key`'s /metrics (None: no answer)."""
    host, base = ENDPOINTS[key]
    text = fetch(ns(host), base + "/metrics")
    if text is None:
        return None
    pattern = re.compile(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? (\S+)$", re.MULTILINE)
    return sum(float(v) for v in pattern.findall(text))


def kernel_ops(key: str) -> float | None:
    return metric(key, KERNEL_METRICS["director" if key.endswith("-director") else "realserver"])


def kernel_changed_lines(key: str, since: int = 0) -> list[str]:
    text = (logs() / f"{key}.log").read_bytes()[since:].decode(errors="replace")
    return [line for line in text.splitlines() if "event=kernel_changed" in line]


def log_size(key: str) -> int:
    return (logs() / f"{key}.log").stat().st_size


def kernel_consumers() -> list[str]:
    return [*(f"{h}-director" for h in DIRECTORS), *(f"realserver-{n}" for n in NODES)]


def pid(key: str) -> int:
    return int(status()["processes"][key]["pid"])


def sigkill(key: str) -> None:
    """SIGKILL the PID the lab recorded for `key`, and wait until `status` shows it gone."""
    os.kill(pid(key), signal.SIGKILL)
    until(f"{key} recorded as exited", lambda: not status()["processes"][key]["alive"], 10)


@contextlib.contextmanager
def nft_monitor(host: str) -> Iterator[list[str]]:
    """Every ruleset change in `host`'s namespace while the block runs (`nft monitor`)."""
    out = STATE_ROOT / NAME / f"nft-monitor-{host}-{time.monotonic_ns()}.txt"
    with out.open("wb") as sink:
        proc = subprocess.Popen(["ip", "netns", "exec", ns(host), "nft", "monitor"], stdout=sink,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    changes: list[str] = []
    try:
        time.sleep(0.3)  # it subscribes to the netlink events before the fault
        yield changes
    finally:
        time.sleep(0.3)
        proc.terminate()
        proc.wait(timeout=10)
        changes.extend(line for line in out.read_text(errors="replace").splitlines() if line.strip())
        out.unlink(missing_ok=True)


def frr_routes() -> dict[str, set[str]]:
    """The router's installed next hops for each VIP."""
    return router_routes(NAME, VIPS)


def bgp_neighbors() -> dict[str, Any]:
    done = subprocess.run(["vtysh", "--vty_socket", str(STATE_ROOT / NAME / "frr"), "-c", "show bgp neighbors json"],
                          capture_output=True, text=True, timeout=10, check=True)
    peers: dict[str, Any] = json.loads(done.stdout)
    return peers


def bgp_sessions_dropped() -> dict[str, int]:
    """How many times FRR's session with each director has gone down."""
    peers = bgp_neighbors()
    return {address: int(peers.get(address, {}).get("connectionsDropped", 0)) for address in DIRECTORS.values()}


def established_since(addresses: Iterable[str], since: float) -> bool:
    """Each of FRR's sessions with `addresses` is Established, and came up after `since` (a
    monotonic time): a new session, not the one a clear has not taken down yet."""
    peers = bgp_neighbors()
    age = time.monotonic() - since
    return all(peers.get(a, {}).get("bgpState") == "Established"
               and peers[a].get("bgpTimerUpMsec", 1e12) / 1000 < age for a in addresses)


BOTH: Final = set(DIRECTORS.values())


def both_paths() -> bool:
    routes = frr_routes()
    return all(routes.get(v) == BOTH for v in VIPS)


def answers_from(pod: str) -> bool:
    return web_answer() == pod


def web_answer() -> str | None:
    done = subprocess.run(["ip", "netns", "exec", ns("client"), "curl", "-sS", "-m", "2", "http://192.0.2.10:80/"],
                          capture_output=True, text=True, timeout=10, check=False)
    return done.stdout.split()[0] if done.returncode == 0 and done.stdout.split() else None


@dataclass
class Lab:
    cluster: Path
    prober: Prober

    def scenario(self, name: str) -> Scenario:
        until("every service healthy before the fault", all_healthy)
        until("both directors' routes in FRR before the fault", both_paths)
        return Scenario(name, self.prober)

    def resyncs(self, scenario: Scenario) -> None:
        """A change made now reaches the kernel: web-3 is served, then gone again."""
        slices = self.cluster / "endpointslices.yaml"
        before = slices.read_text()
        slices.write_text(before.replace(WEB2, WEB2 + WEB3))
        took = until("a new pod served after the fault", lambda: any(answers_from("web-3") for _ in range(4)))
        scenario.note(f"resynced: a pod added after the fault was served {took:.2f} s after the file changed")
        slices.write_text(before)
        until("web-3 gone", lambda: "10.244.2.13" not in status()["pods"])


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    if shutil.which("vtysh") is None:
        pytest.skip("needs vtysh (frr)")
    prober = Prober(prefix(NAME) + "client")
    with running_lab(NAME, tmp_path_factory.mktemp("lab")) as running:
        try:
            until("every service healthy", all_healthy, 60)
            until("both directors' routes in FRR", both_paths, 60)
            prober.start()
            yield Lab(running.cluster, prober)
        finally:
            prober.stop()


# -- the scenarios -------------------------------------------------------------------------------

def test_a_killed_watcher_changes_nothing_and_its_restart_makes_no_kernel_change(lab: Lab) -> None:
    s = lab.scenario("watcher killed")
    ops = {k: kernel_ops(k) for k in kernel_consumers()}
    sizes = {k: log_size(k) for k in kernel_consumers()}
    with nft_monitor("dir1") as dir1_changes, nft_monitor("node-1") as node1_changes:
        sigkill("watcher")
        killed = time.monotonic()
        time.sleep(3)
        lab_control(NAME, "start", "watcher")
        took = until("the watcher healthy and publishing",
                     lambda: component_healthy("watcher")
                     and (metric("watcher", "kube2ipvs_watcher_generation") or 0) > 0)
        s.note(f"the restarted watcher was healthy and had published {took:.2f} s after it was started "
               f"({time.monotonic() - killed:.2f} s after the kill)")
        time.sleep(3)  # every consumer has read what it published
    after = {k: kernel_ops(k) for k in kernel_consumers()}
    lines = {k: kernel_changed_lines(k, sizes[k]) for k in kernel_consumers()}
    s.note(f"kernel ops before {ops}, after {after}; kernel_changed lines {sum(map(len, lines.values()))}; "
           f"nft monitor dir1 {len(dir1_changes)} node-1 {len(node1_changes)}")
    assert after == ops
    assert all(not v for v in lines.values()), lines
    assert dir1_changes == []
    assert node1_changes == []
    assert all_healthy()
    lab.resyncs(s)
    seen = s.report()
    assert_no_failed_request(seen)


def test_a_killed_director_restarts_by_adopting_its_table_and_its_vips_never_stop_answering(lab: Lab) -> None:
    s = lab.scenario("director killed")
    size = log_size("dir1-director")
    with nft_monitor("dir1") as changes:
        sigkill("dir1-director")
        killed = time.monotonic()
        time.sleep(3)
        s.note(f"dir1's routes while its director is dead: {frr_routes()}")
        lab_control(NAME, "start", "dir1-director")
        took = until("dir1-director healthy", lambda: component_healthy("dir1-director"))
        s.note(f"the restarted director was healthy {took:.2f} s after it was started "
               f"({time.monotonic() - killed:.2f} s after the kill)")
        routes = until("both paths in FRR", both_paths)
        s.note(f"both directors' routes in FRR {routes:.2f} s later")
        time.sleep(2)
    ops = kernel_ops("dir1-director")
    lines = kernel_changed_lines("dir1-director", size)
    s.note(f"restarted director: ops_total {ops}, kernel_changed lines {len(lines)}, nft monitor {len(changes)} lines")
    assert changes == [], changes[:20]  # adopted: not one element, map, chain or table written
    # What it logs and counts: only EditService ops setting the scheduler and flags, which the
    # nftables dataplane does not keep in its table (a restarted process observes none), and
    # which write nothing. No destination is added, edited or removed.
    assert all(" op=EditService(" in line for line in lines), lines
    assert ops == len(lines)
    seen = s.report()
    assert_no_failed_request(seen)


def test_a_director_restarted_after_a_change_it_missed_applies_only_that_change(lab: Lab) -> None:
    s = lab.scenario("director killed, change while dead")
    slices = lab.cluster / "endpointslices.yaml"
    before = slices.read_text()
    size = log_size("dir1-director")
    try:
        with nft_monitor("dir1") as changes:
            sigkill("dir1-director")
            s.note("dir1-director killed")
            slices.write_text(before.replace(WEB2, WEB2 + WEB3))  # web-3 on node-2: 192.0.2.10:80 changes
            until("web-3 served through dir2", lambda: any(answers_from("web-3") for _ in range(4)))
            s.note("web-3 answers")
            lab_control(NAME, "start", "dir1-director")
            s.note("dir1-director started")
            took = until("dir1-director healthy", lambda: component_healthy("dir1-director"))
            s.note(f"the restarted director was healthy {took:.2f} s after it was started")
            time.sleep(2)
        lines = [line for line in kernel_changed_lines("dir1-director", size) if " op=EditService(" not in line]
        kinds = sorted({" ".join(c.split()[:2]) for c in changes})
        s.note(f"restarted director: kernel changes {[line.split('op=', 1)[1] for line in lines]}; "
               f"nft monitor: {len(changes)} lines of {kinds}")
        assert len(lines) == 1, lines  # node-2's weight for 192.0.2.10:80, and nothing else
        assert "op=EditDest(service=ServiceId(vip='192.0.2.10', family=4, port=80," in lines[0], lines
        assert "address='10.99.0.22'" in lines[0], lines
        # Elements of the changed service only: no table replaced or flushed, no chain or rule written.
        assert changes, "nft monitor saw nothing"
        assert not [c for c in changes if c.split()[1:2] in (["table"], ["chain"], ["rule"]) or
                    c.startswith("flush")], changes[:20]
    finally:
        slices.write_text(before)
        s.note("web-3 removed from the slices")
        until("web-3 gone", lambda: "10.244.2.13" not in status()["pods"])
        s.note("web-3 gone")
    seen = s.report()
    assert_no_failed_request(seen)


def test_a_gobgpd_restart_moves_traffic_to_dir2_and_its_routes_come_back(lab: Lab) -> None:
    s = lab.scenario("gobgpd restart on dir1")
    started = time.monotonic()
    lab_control(NAME, "stop", "dir1-gobgpd")
    gone = until("dir1's routes gone from FRR",
                 lambda: all(frr_routes().get(v) == {DIRECTORS["dir2"]} for v in VIPS))
    s.note(f"FRR dropped dir1's routes {gone:.2f} s after gobgpd stopped; traffic through dir2 alone")
    time.sleep(2)
    lab_control(NAME, "start", "dir1-gobgpd")
    back = until("dir1's routes back in FRR", both_paths)
    s.note(f"dir1's routes back in FRR {back:.2f} s after gobgpd started ({time.monotonic() - started:.2f} s "
           "after it stopped)")
    seen = s.report()
    assert_no_failed_request(seen)


def test_an_frr_session_reset_with_one_director_drops_no_request(lab: Lab) -> None:
    s = lab.scenario("FRR clears dir1's session")
    vtysh = ["vtysh", "--vty_socket", str(STATE_ROOT / NAME / "frr"), "-c"]
    dropped = bgp_sessions_dropped()[DIRECTORS["dir1"]]
    subprocess.run([*vtysh, f"clear bgp {DIRECTORS['dir1']}"], capture_output=True, check=True, timeout=10)
    cleared = time.monotonic()
    until("dir1's session reset", lambda: bgp_sessions_dropped()[DIRECTORS["dir1"]] > dropped, 10)
    # A new session first: right after the reset FRR can still list the old session's routes.
    back = until("dir1's new session", lambda: established_since([DIRECTORS["dir1"]], cleared))
    back += until("both paths back", both_paths)
    s.note(f"both paths back {time.monotonic() - cleared:.2f} s after the clear "
           f"({back:.2f} s after the reset was seen)")
    seen = s.report()
    assert_no_failed_request(seen)


def test_an_frr_reset_of_every_session_heals_within_seconds(lab: Lab) -> None:
    s = lab.scenario("FRR clears every session")
    vtysh = ["vtysh", "--vty_socket", str(STATE_ROOT / NAME / "frr"), "-c"]
    dropped = bgp_sessions_dropped()
    subprocess.run([*vtysh, "clear bgp *"], capture_output=True, check=True, timeout=10)
    cleared = time.monotonic()
    until("both sessions reset", lambda: all(n > dropped[p] for p, n in bgp_sessions_dropped().items()), 10)
    # New sessions first: right after the reset FRR can still list the old sessions' routes (a
    # CI run saw "both paths back" 0.06 s after the clear, and the window ended too early).
    until("both new sessions", lambda: established_since(DIRECTORS.values(), cleared))
    until("both paths back", both_paths)
    healed = time.monotonic() - cleared
    s.note(f"both directors' routes back in FRR {healed:.2f} s after `clear bgp *`")
    time.sleep(3)  # traffic after the recovery belongs to the window
    seen = s.report()
    # Both sessions go at once: the router has no route until one comes back (connect timer 1 s,
    # hold 9 s). Requests fail meanwhile; the outage is bounded by the sessions' return.
    for t in seen.values():
        assert t.outage < HEAL, seen
    after = traffic(lab.prober.since(cleared + healed + 0.5), "tcp")
    assert after.failed == 0, after


def test_a_killed_realserver_leaves_its_node_serving_and_its_restart_changes_nothing(lab: Lab) -> None:
    s = lab.scenario("realserver killed on node-2")
    ops = {k: kernel_ops(k) for k in kernel_consumers() if k != "realserver-node-2"}
    size = log_size("realserver-node-2")
    with nft_monitor("node-2") as changes:
        sigkill("realserver-node-2")
        killed = time.monotonic()
        time.sleep(5)
        served = {(web_answer() or "none") for _ in range(12)}
        s.note(f"with node-2's realserver dead, web answered from: {sorted(served)}")
        lab_control(NAME, "start", "realserver-node-2")
        took = until("realserver-node-2 healthy", lambda: component_healthy("realserver-node-2"))
        s.note(f"the restarted realserver was healthy {took:.2f} s after it was started "
               f"({time.monotonic() - killed:.2f} s after the kill)")
        time.sleep(2)
    mine = kernel_ops("realserver-node-2")
    lines = kernel_changed_lines("realserver-node-2", size)
    others = {k: kernel_ops(k) for k in ops}
    s.note(f"restarted realserver: kernel_changes_total {mine}, kernel_changed lines {len(lines)}, "
           f"nft monitor {len(changes)} lines; the others' ops before {ops}, after {others}")
    assert mine == 0, lines
    assert lines == []
    assert changes == [], changes[:20]
    seen = s.report()
    assert_no_failed_request(seen)


# Last. It found that a nats-server restart withdrew every route for good: the status board
# (memory storage) was never created again, and the bgp-speaker took "no readiness" for a stop.
# Now the board is created again when found gone, and absence is no news until it goes stale.
def test_a_nats_restart_drops_no_request_and_every_consumer_resyncs_after(lab: Lab) -> None:
    s = lab.scenario("nats restart")
    ops = {k: kernel_ops(k) for k in kernel_consumers()}
    lab_control(NAME, "stop", "nats")
    stopped = time.monotonic()
    time.sleep(5)  # long enough for every client to see the connection gone
    during = {k: component_healthy(k) for k in ENDPOINTS}
    s.note(f"NATS down 5 s; healthy meanwhile: {sorted(k for k, ok in during.items() if ok)}; "
           f"reporting not ok: {sorted(k for k, ok in during.items() if not ok)}")
    lab_control(NAME, "start", "nats")
    back = time.monotonic()
    took = until("every service healthy after NATS is back", all_healthy)
    s.note(f"every service healthy {took:.2f} s after nats-server was ready again "
           f"({back - stopped + took:.2f} s after it stopped)")
    assert {k: kernel_ops(k) for k in kernel_consumers()} == ops  # the kernel stayed as it was
    with contextlib.suppress(pytest.fail.Exception):
        until("both directors' routes in FRR", both_paths, 15)
    s.note(f"FRR's routes 15 s after NATS was back: {frr_routes()}")
    seen = s.report()
    assert both_paths(), frr_routes()
    assert_no_failed_request(seen)
    lab.resyncs(s)
