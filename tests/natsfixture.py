"""A real `nats-server -js` for tests: 127.0.0.1 only, a free port, a temporary store.

`NatsServer.stop()` and `start()` can be called again mid-test. The server comes back on the
same port with the same store directory (or an empty one, `wipe=True`), which is what a server
restart or a lost volume looks like to clients. The process is stopped by its PID at the end.
`running_nats_server` skips the test, with the reason, when nats-server is not installed
(`apt-get install nats-server`; Debian puts it in /usr/sbin).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from kube2ipvs.lab import end_process

_CANDIDATES = ("/usr/sbin/nats-server", "/usr/bin/nats-server")
_READY_TIMEOUT = 10.0


def nats_server_binary() -> str | None:
    found = shutil.which("nats-server")
    if found:
        return found
    return next((c for c in _CANDIDATES if os.access(c, os.X_OK)), None)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class NatsServer:
    def __init__(self, binary: str, workdir: Path, args: Sequence[str] = ()) -> None:
        self.binary = binary
        self.workdir = workdir
        self.args = tuple(args)  # e.g. --user/--pass, --auth, --tls...
        self.store = workdir / "store"
        self.log = workdir / "nats-server.log"
        self.port = _free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, *, wipe: bool = False) -> None:
        assert self.process is None, "already running"
        if wipe:
            shutil.rmtree(self.store, ignore_errors=True)
        self.store.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [self.binary, "-js", "-a", "127.0.0.1", "-p", str(self.port), "-sd", str(self.store),
                 "--server_name", "kube2ipvs-test", *self.args],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        self._wait_ready()

    def _wait_ready(self) -> None:
        # The server opens its client port after JetStream has recovered its store, so the first
        # accepted connection means ready. Nothing to wait on but the port itself.
        deadline = time.monotonic() + _READY_TIMEOUT
        assert self.process is not None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"nats-server exited with {self.process.returncode}:\n{self.tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.01)
        self.stop()
        raise RuntimeError(f"nats-server did not accept connections within {_READY_TIMEOUT} s:\n{self.tail()}")

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None:
            end_process(process, grace=10)  # by PID: this object started it

    def restart(self, *, wipe: bool = False) -> None:
        self.stop()
        self.start(wipe=wipe)

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


@contextlib.contextmanager
def running_nats_server(workdir: Path, args: Sequence[str] = ()) -> Iterator[NatsServer]:
    """A started server, stopped on exit; skips the test when nats-server is not installed.

    Use it from a fixture: `with running_nats_server(tmp_path / "nats") as server: yield server`.
    """
    binary = nats_server_binary()
    if binary is None:
        pytest.skip("nats-server is not installed (apt-get install nats-server)")
    workdir.mkdir(parents=True, exist_ok=True)
    server = NatsServer(binary, workdir, args)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_tls_files(directory: Path) -> TlsFiles:
    """A throw-away CA, a server certificate for 127.0.0.1 and a client certificate (openssl CLI).

    Skips the test when openssl is not installed.
    """
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed (apt-get install openssl)")
    directory.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=directory, check=True, capture_output=True)

    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=kube2ipvs-test-ca")
    for name, extensions in (("server", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth"),
                             ("client", "extendedKeyUsage=clientAuth")):
        (directory / f"{name}.ext").write_text(extensions + "\n")
        run("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN=kube2ipvs-test-{name}")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "1", "-extfile", f"{name}.ext")
    return TlsFiles(ca=directory / "ca.pem", server_cert=directory / "server.pem",
                    server_key=directory / "server.key", client_cert=directory / "client.pem",
                    client_key=directory / "client.key")
