"""Fixtures of the real-IPVS lane, whose tests run inside the qemu VM that `make test-vm` boots.

vm/run.sh boots the VM and runs `pytest -m vm tests/vm` there, chrooted into the host's root
(read-only; write to tmp_path, which lives on the VM's /dev/shm). vm/init sets KUBE2IPVS_IN_VM=1.
Anywhere else every test below this directory is skipped, before any fixture is set up: the host
kernel has no IPVS.

Every test here gets the `vm` marker whether or not its module sets it, so `-m vm` never drops a
test silently and the other lanes (`-m "not root and not vm"`, `-m root`) never pick one up.

The VM and its kernel are ours alone: `ipvs` removes every virtual service, before the test and
after it, whoever created it. The other fixtures remove exactly what they created. Tests run one
after the other in one process; the backends are threads of that process.
"""

from __future__ import annotations

import http.client
import http.server
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pyroute2 import IPVS, IPRoute, IPVSService

IN_VM = os.environ.get("KUBE2IPVS_IN_VM") == "1"
SKIP_REASON = "needs the qemu VM with real IPVS (the host kernel has none); run `make test-vm`"
HERE = Path(__file__).resolve().parent

# The project's test addresses: VIPs in 192.0.2.0/24 (TEST-NET-1). Backends listen on 127.0.0.1.
VIP = "192.0.2.10"
VIP_LINK = "k2i-vip"
BACKEND_ADDRESS = "127.0.0.1"

# pyroute2 has no type information; its sockets are Any to mypy.
IPVSSocket = Any


class KeepAliveHandler(http.server.BaseHTTPRequestHandler):
    """An HTTP/1.1 backend (keeps connections open) that answers with the port it was reached on."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = f"{self.connection.getsockname()[1]}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.hookimpl(tryfirst=True)  # before the mark plugin's -m deselection sees the items
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.vm)
            if not IN_VM:
                item.add_marker(pytest.mark.skip(reason=SKIP_REASON))


def remove_every_service(ipvs: IPVSSocket) -> None:
    """What `ipvsadm -C` does; removing a service removes its destinations."""
    for message in ipvs.service("dump"):
        ipvs.service("del", service=IPVSService.from_message(message))


@pytest.fixture
def ipvs() -> Iterator[IPVSSocket]:
    """A pyroute2 IPVS socket on a kernel without virtual services; it removes them all at teardown."""
    sock = IPVS()
    try:
        remove_every_service(sock)
        yield sock
        remove_every_service(sock)
    finally:
        sock.close()


@dataclass(frozen=True, slots=True)
class Vip:
    address: str
    ifname: str
    index: int


@pytest.fixture
def vip() -> Iterator[Vip]:
    """VIP/32 on an up dummy link, deleted (with its address) at teardown."""
    with IPRoute() as ipr:
        ipr.link("add", ifname=VIP_LINK, kind="dummy")
        (index,) = ipr.link_lookup(ifname=VIP_LINK)
        try:
            ipr.addr("add", index=index, address=VIP, prefixlen=32)
            ipr.link("set", index=index, state="up")
            yield Vip(VIP, VIP_LINK, index)
        finally:
            ipr.link("del", index=index)


@dataclass(frozen=True, slots=True)
class Backend:
    """An HTTP server that answers every GET with its name and a newline."""

    name: str
    address: str
    port: int


def backend_server(name: str) -> http.server.ThreadingHTTPServer:
    body = f"{name}\n".encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer((BACKEND_ADDRESS, 0), Handler)
    server.daemon_threads = True
    return server


@pytest.fixture
def http_backends() -> Iterator[Callable[[int], list[Backend]]]:
    """`http_backends(n)` starts n backends on free ports of 127.0.0.1, named backend1..n; all stop at teardown."""
    servers: list[http.server.ThreadingHTTPServer] = []
    threads: list[threading.Thread] = []

    def start(count: int) -> list[Backend]:
        started = []
        for _ in range(count):
            name = f"backend{len(servers) + 1}"
            server = backend_server(name)
            servers.append(server)
            thread = threading.Thread(target=server.serve_forever, name=name, daemon=True)
            thread.start()
            threads.append(thread)
            started.append(Backend(name, BACKEND_ADDRESS, server.server_address[1]))
        return started

    try:
        yield start
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()
        for thread in threads:
            thread.join(timeout=5)


def http_get(address: str, port: int, path: str = "/", timeout: float = 5) -> str:
    """One GET on a new connection (so IPVS schedules each one); the response body."""
    conn = http.client.HTTPConnection(address, port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        response = conn.getresponse()
        body = response.read().decode()
        if response.status != 200:
            pytest.fail(f"GET http://{address}:{port}{path} answered {response.status}: {body}")
        return body
    finally:
        conn.close()
