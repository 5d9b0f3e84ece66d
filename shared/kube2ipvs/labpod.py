"""A lab pod: answers on its TCP ports over HTTP and on its UDP ports by datagram, each time with
`<pod> <node> <client address>` (so a request shows which pod served it and that the client's
address arrived unchanged). Prints `ready` once every port is bound.

    python -m kube2ipvs.labpod NAME NODE [--tcp 8080,7070] [--udp 5353]
"""

from __future__ import annotations

import argparse
import http.server
import socket
import socketserver
import sys
import threading
from collections.abc import Sequence


def _ports(text: str) -> list[int]:
    return [int(p) for p in text.split(",") if p]


def serve(name: str, node: str, tcp: Sequence[int], udp: Sequence[int]) -> list[threading.Thread]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            body = f"{name} {node} {self.client_address[0]}\n".encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            return

    class Server(socketserver.ThreadingTCPServer):
        allow_reuse_address = True
        daemon_threads = True

    threads = []
    for port in tcp:
        server = Server(("0.0.0.0", port), Handler)  # noqa: S104  (inside the pod's own namespace)
        threads.append(threading.Thread(target=server.serve_forever, daemon=True))
    for port in udp:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("0.0.0.0", port))  # noqa: S104

        def echo(sock: socket.socket = sock) -> None:
            while True:
                _, peer = sock.recvfrom(2048)
                sock.sendto(f"{name} {node} {peer[0]}\n".encode(), peer)

        threads.append(threading.Thread(target=echo, daemon=True))
    for t in threads:
        t.start()
    return threads


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="kube2ipvs-labpod", description="a lab pod's servers")
    ap.add_argument("name")
    ap.add_argument("node")
    ap.add_argument("--tcp", type=_ports, default=[])
    ap.add_argument("--udp", type=_ports, default=[])
    args = ap.parse_args(argv)
    threads = serve(args.name, args.node, args.tcp, args.udp)
    print("ready", flush=True)
    threading.Event().wait() if threads else None
    return 0


if __name__ == "__main__":
    sys.exit(main())
