"""Root-lane fixtures: throw-away network namespaces and the processes started inside them.

Every namespace is named with this run's prefix (`k2i-t<pid>-`), so concurrent runs and other
software on the machine never see or lose theirs; the finalizers kill only the processes these
fixtures started (by PID) and delete only the namespaces they created. Nothing here touches the
root namespace's links, addresses or rules, and test traffic only flows between these namespaces.

`dataplane` builds a realserver topology once per test module:

    client 203.0.113.2 ──veth── node (VIP 192.0.2.10 and 2001:db8::10 on lo) ──veth── pod1 10.0.1.2
      2001:db8:c::2                                                           ──veth── pod2 10.0.2.2

The client routes the VIPs to the node; the pods' default route is the node. Each pod runs a
small server (HTTP over TCP and an echo over UDP, on the same port) that answers with its name
and the client address it sees. The tests load the rules under test into the node.
"""

from __future__ import annotations

import os
import selectors
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import pytest

from kube2ipvs.lab import end_process
from kube2ipvs.lbconfig import Protocol
from kube2ipvs.model import VirtualService
from tests.test_render_nft import virtual_service

PREFIX = f"k2i-t{os.getpid()}-"
TOOLS = ("ip", "nft", "curl")

VIP, VIP6 = "192.0.2.10", "2001:db8::10"
PORT = 8080
CLIENT, CLIENT6 = "203.0.113.2", "2001:db8:c::2"
PODS = {"pod1": ("10.0.1.2", "2001:db8:1:1::2"), "pod2": ("10.0.2.2", "2001:db8:1:2::2")}


def skip_reason(tools: Sequence[str] = TOOLS) -> str | None:
    if os.geteuid() != 0:
        return "needs root: creates network namespaces and loads rules in them"
    missing = [t for t in tools if shutil.which(t) is None]
    return f"needs {', '.join(missing)} on PATH" if missing else None


@pytest.fixture(autouse=True)
def _needs_root_and_tools() -> None:
    if (reason := skip_reason()) is not None:
        pytest.skip(reason)


def run(*cmd: str, stdin: str | None = None, timeout: float = 20) -> str:
    """Run `cmd`, return stdout; fail the test with stderr when it exits non-zero."""
    done = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {done.returncode}: {done.stderr.strip()}")
    return done.stdout


T = TypeVar("T")


def wait_for(read: Callable[[], T], done: Callable[[T], bool], timeout: float = 5) -> T:
    """Re-read until `done` holds or `timeout` passes; return the last value read.

    Counters are read right after the client returns, while its last packets (the final ACK
    or FIN) may still be crossing the veths.
    """
    deadline = time.monotonic() + timeout
    value = read()
    while not done(value) and time.monotonic() < deadline:
        time.sleep(0.02)
        value = read()
    return value


@dataclass
class Netns:
    name: str

    def exec(self, *cmd: str, stdin: str | None = None, timeout: float = 20) -> str:
        return run("ip", "netns", "exec", self.name, *cmd, stdin=stdin, timeout=timeout)

    def exit_code(self, *cmd: str, timeout: float = 20) -> int:
        """Run `cmd` for its exit code alone (for commands expected to fail)."""
        done = subprocess.run(["ip", "netns", "exec", self.name, *cmd], capture_output=True, timeout=timeout,
                              check=False)
        return done.returncode

    def ip(self, *args: str) -> str:
        return run("ip", "-n", self.name, *args)

    def nft(self, text: str) -> None:
        self.exec("nft", "-f", "-", stdin=text)


@dataclass
class Lab:
    """Creates namespaces and processes, and remembers them so that teardown removes exactly those."""

    namespaces: list[Netns] = field(default_factory=list)
    processes: list[subprocess.Popen[str]] = field(default_factory=list)

    def netns(self, suffix: str) -> Netns:
        ns = Netns(PREFIX + suffix)
        run("ip", "netns", "add", ns.name)
        self.namespaces.append(ns)
        ns.ip("link", "set", "dev", "lo", "up")
        # Duplicate address detection keeps new IPv6 link-local addresses tentative for a while,
        # and the first packets of a test then go missing (a SYN retransmitted a second later).
        ns.exec("sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0")
        return ns

    def link(self, a: Netns, a_if: str, b: Netns, b_if: str) -> None:
        """A veth pair created inside the namespaces, so it never appears in the root one."""
        a.ip("link", "add", "name", a_if, "type", "veth", "peer", "name", b_if, "netns", b.name)
        a.ip("link", "set", "dev", a_if, "up")
        b.ip("link", "set", "dev", b_if, "up")

    def spawn_ready(self, ns: Netns, cmd: Sequence[str], timeout: float = 10) -> subprocess.Popen[str]:
        """Start `cmd` in `ns` and wait until it prints `ready` (it does once its sockets are bound)."""
        proc = subprocess.Popen(["ip", "netns", "exec", ns.name, *cmd],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.processes.append(proc)  # `ip netns exec` execs the command: this PID is the server's
        assert proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            deadline = time.monotonic() + timeout
            while (left := deadline - time.monotonic()) > 0:
                if sel.select(left):
                    line = proc.stdout.readline()
                    if line.strip() == "ready":
                        return proc
                    if not line:  # EOF: it died
                        break
        stderr = proc.stderr.read() if proc.poll() is not None and proc.stderr else ""
        pytest.fail(f"{' '.join(cmd)} in {ns.name} did not get ready within {timeout}s: {stderr}")

    def close(self) -> None:
        for proc in self.processes:
            end_process(proc, grace=5)
            for pipe in (proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()
        for ns in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", ns.name], capture_output=True, check=False)


@pytest.fixture
def lab() -> Iterator[Lab]:
    created = Lab()
    try:
        yield created
    finally:
        created.close()


SERVER = r"""
import http.server, ipaddress, socket, socketserver, sys, threading
name, port = sys.argv[1], int(sys.argv[2])

def peer(address):
    ip = ipaddress.ip_address(address)
    return str(ip.ipv4_mapped or ip)

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"{name} {peer(self.client_address[0])}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass

class Server(socketserver.ThreadingTCPServer):
    address_family = socket.AF_INET6
    allow_reuse_address = True
    daemon_threads = True
    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()

httpd = Server(("::", port), Handler)
udp = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
udp.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
udp.bind(("::", port))

def echo():
    while True:
        _, addr = udp.recvfrom(2048)
        udp.sendto(f"{name} {peer(addr[0])}".encode(), addr)

threading.Thread(target=echo, daemon=True).start()
print("ready", flush=True)
httpd.serve_forever()
"""


@dataclass
class Dataplane:
    node: Netns
    client: Netns

    def curl(self, url: str, times: int, ns: Netns | None = None) -> list[str]:
        """`times` GETs of `url` from the client (or `ns`), each its own connection; the answers."""
        # Connection: close, so every request is a new connection and a new DNAT decision.
        out = (ns or self.client).exec("curl", "-sS", "-m", "5", "-H", "Connection: close", *[url] * times)
        return out.splitlines()


def build_dataplane(lab: Lab, *, prefix: str = "") -> tuple[Netns, Netns]:
    """A node with two pods serving on PORT, and a client routed to VIP and VIP6 through the node.

    The VIPs are not put on the node: holding them is what the callers test or do themselves.
    """
    node, client = lab.netns(prefix + "node"), lab.netns(prefix + "client")
    node.exec("sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1")
    lab.link(node, "vc", client, "eth0")
    node.ip("addr", "add", "203.0.113.1/24", "dev", "vc")
    node.ip("addr", "add", "2001:db8:c::1/64", "dev", "vc")
    client.ip("addr", "add", f"{CLIENT}/24", "dev", "eth0")
    client.ip("addr", "add", f"{CLIENT6}/64", "dev", "eth0")
    client.ip("route", "add", f"{VIP}/32", "via", "203.0.113.1")
    client.ip("-6", "route", "add", f"{VIP6}/128", "via", "2001:db8:c::1")
    for i, (name, (v4, v6)) in enumerate(sorted(PODS.items()), start=1):
        pod = lab.netns(prefix + name)
        lab.link(node, f"vp{i}", pod, "eth0")
        node.ip("addr", "add", f"10.0.{i}.1/24", "dev", f"vp{i}")
        node.ip("addr", "add", f"2001:db8:1:{i}::1/64", "dev", f"vp{i}")
        pod.ip("addr", "add", f"{v4}/24", "dev", "eth0")
        pod.ip("addr", "add", f"{v6}/64", "dev", "eth0")
        pod.ip("route", "add", "default", "via", f"10.0.{i}.1")
        pod.ip("-6", "route", "add", "default", "via", f"2001:db8:1:{i}::1")
        lab.spawn_ready(pod, [sys.executable, "-c", SERVER, name, str(PORT)])
    return node, client


@pytest.fixture(scope="module")
def dataplane() -> Iterator[Dataplane]:
    # Module fixtures are set up before the autouse skip above runs, so check here too.
    if (reason := skip_reason()) is not None:
        pytest.skip(reason)
    lab = Lab()
    try:
        node, client = build_dataplane(lab)
        node.ip("addr", "add", f"{VIP}/32", "dev", "lo")
        node.ip("addr", "add", f"{VIP6}/128", "dev", "lo")
        yield Dataplane(node, client)
    finally:
        lab.close()


def web(protocol: Protocol = "tcp", *, vip: str = VIP, port: int = PORT, target: int = PORT) -> VirtualService:
    """`vip`:`port` served by both pods of the dataplane on `target`."""
    v6 = ":" in vip
    return virtual_service(vip, port, protocol, endpoints=[(PODS[p][v6], target) for p in sorted(PODS)])
