"""The VM lane's smoke test: the kernel has IPVS, pyroute2 programs it, ipvsadm reads it back, and
a NAT service really spreads HTTP connections over two backends.

pyroute2 0.9.7 quirks these tests pin: an IPVSDest's `fwd_method` defaults to 3 (direct routing)
and `from_message` reports that default, not the kernel's value, which is in
IPVS_DEST_ATTR_FWD_METHOD; the "update" command deletes, "set" modifies.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from socket import IPPROTO_TCP

import pytest
from pyroute2 import IPVSDest, IPVSService

from tests.vm.conftest import Backend, IPVSSocket, Vip, http_get

pytestmark = pytest.mark.vm

MASQ = 0  # IP_VS_CONN_F_MASQ: NAT, `-m` in ipvsadm


def nat_service(ipvs: IPVSSocket, vip: Vip, backends: list[Backend], *, port: int = 80) -> IPVSService:
    service = IPVSService(addr=vip.address, port=port, protocol=IPPROTO_TCP, sched_name="rr")
    ipvs.service("add", service=service)
    for backend in backends:
        ipvs.dest("add", service=service, dest=IPVSDest(addr=backend.address, port=backend.port, fwd_method=MASQ))
    return service


def ipvsadm_save() -> list[str]:
    done = subprocess.run(["ipvsadm-save", "-n"], capture_output=True, text=True, timeout=10, check=True)
    return done.stdout.splitlines()


def test_the_kernel_has_ipvs_and_starts_without_virtual_services(ipvs: IPVSSocket) -> None:
    assert Path("/proc/net/ip_vs").exists()
    assert list(ipvs.service("dump")) == []


def test_a_round_robin_nat_service_alternates_between_its_two_backends(
    ipvs: IPVSSocket, vip: Vip, http_backends: Callable[[int], list[Backend]]
) -> None:
    backends = http_backends(2)
    service = nat_service(ipvs, vip, backends)

    answers = [http_get(vip.address, 80).strip() for _ in range(4)]

    assert sorted(answers[:2]) == ["backend1", "backend2"]
    assert answers[2:] == answers[:2]
    dests = [IPVSDest.from_message(m) for m in ipvs.dest("dump", service=service)]
    assert sorted((d["port"], d["IPVS_DEST_ATTR_FWD_METHOD"]) for d in dests) == sorted(
        (b.port, MASQ) for b in backends
    )


def test_ipvsadm_reads_back_what_pyroute2_programmed_and_set_changes_a_weight(
    ipvs: IPVSSocket, vip: Vip, http_backends: Callable[[int], list[Backend]]
) -> None:
    first, second = http_backends(2)
    service = nat_service(ipvs, vip, [first, second], port=8080)

    ipvs.dest("set", service=service, dest=IPVSDest(addr=second.address, port=second.port, fwd_method=MASQ, weight=5))

    # The kernel lists destinations in its own order; the golden-text renderer sorts them.
    assert sorted(ipvsadm_save()) == sorted([
        f"-A -t {vip.address}:8080 -s rr",
        f"-a -t {vip.address}:8080 -r {first.address}:{first.port} -m -w 1",
        f"-a -t {vip.address}:8080 -r {second.address}:{second.port} -m -w 5",
    ])
