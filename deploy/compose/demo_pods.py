"""Stand-in pods for the docker-compose lab: one process per "node" container that serves, on
that node's network namespace, every ready endpoint the lab's EndpointSlices place on it.

Compose cannot give each pod a network namespace of its own the way `kube2ipvs lab` does, so
each endpoint address of this node (EndpointSlice `nodeName` = $NODE_NAME) is added to the node's
`lo`, and a server is bound to it on each of the slice's ports: HTTP on TCP (`pod ADDRESS on
NODE: NAMESPACE/SERVICE`), an echo of that same line on UDP. The realserver's DNAT to a pod
address therefore ends in this process. It also routes the client network through the
top-of-rack router, which is where direct-server-return replies go.

The files are read once, at start: after editing `lab/cluster/` (e.g. scaling a service),
`docker compose restart pods-a pods-b pods-c` follows.

Environment: NODE_NAME (required), CLUSTER_DIR (default /cluster), CLIENT_NETWORK and ROUTER
(a route to add; skipped when either is empty).
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from kube2ipvs.kube import load_objects_text, parse_endpointslices

log = logging.getLogger("demo-pods")


@dataclass(frozen=True, slots=True)
class Listener:
    address: str
    port: int
    protocol: str  # TCP or UDP
    reply: str


def listeners(directory: Path, node: str) -> list[Listener]:
    objects = []
    for path in sorted(directory.iterdir()):
        if path.suffix in (".json", ".yaml", ".yml"):
            objects.extend(load_objects_text(path.read_bytes(), source=str(path)))
    slices, _skipped = parse_endpointslices(o for o in objects if o.get("kind") == "EndpointSlice")
    found: dict[tuple[str, int, str], Listener] = {}
    for s in slices:
        for endpoint in s.endpoints:
            if endpoint.node_name != node or not endpoint.ready:
                continue
            for port in s.ports:
                if port.protocol in ("TCP", "UDP"):
                    reply = f"pod {endpoint.address} on {node}: {s.namespace}/{s.service_name}\n"
                    found.setdefault((endpoint.address, port.port, port.protocol),
                                     Listener(endpoint.address, port.port, port.protocol, reply))
    return sorted(found.values(), key=lambda x: (x.address, x.port, x.protocol))


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True)


class _Echo(asyncio.DatagramProtocol):
    def __init__(self, reply: bytes) -> None:
        self.reply = reply
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        if self.transport is not None:
            self.transport.sendto(self.reply, addr)


async def _http(reply: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while (await reader.readline()) not in (b"\r\n", b"\n", b""):  # the request head
            pass
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n"
                     + f"Content-Length: {len(reply)}\r\n\r\n".encode() + reply)
        await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def serve(items: list[Listener]) -> None:
    loop = asyncio.get_running_loop()
    for item in items:
        reply = item.reply.encode()
        if item.protocol == "TCP":
            await asyncio.start_server(functools.partial(_http, reply), item.address, item.port)
        else:
            await loop.create_datagram_endpoint(functools.partial(_Echo, reply), local_addr=(item.address, item.port))
        log.info("serving %s %s:%d", item.protocol, item.address, item.port)
    await asyncio.Event().wait()


def main() -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    node = os.environ.get("NODE_NAME", "")
    if not node:
        log.error("NODE_NAME is required")
        return 2
    items = listeners(Path(os.environ.get("CLUSTER_DIR", "/cluster")), node)
    for address in sorted({i.address for i in items}):
        prefix = 32 if ipaddress.ip_address(address).version == 4 else 128
        ip("address", "replace", f"{address}/{prefix}", "dev", "lo")
    network, router = os.environ.get("CLIENT_NETWORK", ""), os.environ.get("ROUTER", "")
    if network and router:
        ip("route", "replace", network, "via", router)
    if not items:
        log.warning("no ready endpoint on node %s in the cluster files", node)
    asyncio.run(serve(items))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
