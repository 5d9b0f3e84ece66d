"""The raw netlink client (`kube2ipvs_director.ipvsnl`) against the real kernel: what a batch
with a refused op in the middle leaves in IPVS and reports, batches larger than one `send`, and
the encodings ipvsadm reads back (IPv6 netmask, mixed-family IPIP, thresholds, flags).

Every test uses the `ipvs` fixture, which empties IPVS before and after it.
"""

from __future__ import annotations

import errno
import subprocess
from collections.abc import Iterator

import pytest

from kube2ipvs_director import ipvsnl
from kube2ipvs_director.kernel import ApplyError, LinuxIpvs
from kube2ipvs_director.plan import (
    AddDest,
    AddService,
    DelDest,
    DelService,
    EditDest,
    ObservedDest,
    ObservedService,
    Op,
    ServiceId,
)
from tests.vm.conftest import IPVSSocket

pytestmark = pytest.mark.vm

SID = ServiceId("192.0.2.10", 4, 80, "tcp")


@pytest.fixture
def kernel(ipvs: IPVSSocket) -> Iterator[LinuxIpvs]:
    adapter = LinuxIpvs()
    try:
        yield adapter
    finally:
        adapter.close()


def save() -> list[str]:
    out = subprocess.run(["ipvsadm", "-S", "-n"], capture_output=True, text=True, timeout=20, check=True).stdout
    return sorted(out.splitlines())


def test_a_refused_op_in_a_batch_is_named_with_the_ops_that_ran(kernel: LinuxIpvs) -> None:
    ops: list[Op] = [AddService(SID, "wrr", ()),
                     EditDest(SID, "198.51.100.1", 80, "g", 2, 0, 0),  # no such real server: ENOENT
                     AddDest(SID, "198.51.100.2", 80, "g", 1, 0, 0),
                     AddService(SID, "rr", ()),  # EEXIST after the refusal: not set, not counted
                     DelDest(SID, "198.51.100.3", 80)]  # a withdrawal: not sent after a refusal
    with pytest.raises(ApplyError) as caught:
        kernel.apply(ops)
    assert (caught.value.index, caught.value.op, caught.value.code) == (1, ops[1], errno.ENOENT)
    assert caught.value.applied == (0, 2)
    assert save() == ["-A -t 192.0.2.10:80 -s wrr", "-a -t 192.0.2.10:80 -r 198.51.100.2:80 -g -w 1"]


def test_an_existing_add_is_set_even_after_later_ops_of_its_batch(kernel: LinuxIpvs) -> None:
    kernel.apply([AddService(SID, "rr", ()), AddDest(SID, "198.51.100.1", 80, "g", 1, 0, 0)])
    kernel.apply([AddService(SID, "mh", (1, 2)), AddDest(SID, "198.51.100.1", 80, "i", 5, 100, 10),
                  AddDest(SID, "198.51.100.2", 80, "g", 1, 0, 0)])
    (svc,) = kernel.observe().services
    assert svc == ObservedService(SID, "mh", (1, 2), dests=(ObservedDest("198.51.100.1", 80, "i", 5, 100, 10),
                                                            ObservedDest("198.51.100.2", 80, "g", 1)))
    kernel.apply([DelService(SID), DelService(SID), DelDest(SID, "198.51.100.1", 80)])  # ESRCH twice: done
    assert kernel.observe().services == ()


def test_many_batches_and_both_families_read_back_as_applied(kernel: LinuxIpvs) -> None:
    six = ServiceId("2001:db8::10", 6, 53, "udp")
    ops: list[Op] = [AddService(six, "wlc", ()), AddDest(six, "2001:db8::1", 53, "m", 3, 0, 0),
                     AddDest(six, "198.51.100.9", 53, "i", 1, 0, 0)]  # IPIP may cross families
    want = [ObservedService(six, "wlc", dests=(ObservedDest("198.51.100.9", 53, "i", 1),
                                               ObservedDest("2001:db8::1", 53, "m", 3)))]
    for port in range(1000, 1000 + 200):  # 600 ops: three sends at 256 messages each
        sid = ServiceId("192.0.2.10", 4, port, "tcp")
        ops += [AddService(sid, "sh", (2,)), AddDest(sid, "198.51.100.1", port, "g", 1, 0, 0),
                AddDest(sid, "198.51.100.2", port, "g", 2, 9, 3)]
        want.append(ObservedService(sid, "sh", (2,), dests=(ObservedDest("198.51.100.1", port, "g", 1),
                                                            ObservedDest("198.51.100.2", port, "g", 2, 9, 3))))
    kernel.apply(ops)
    assert sorted(kernel.observe().services, key=lambda s: s.id) == sorted(want, key=lambda s: s.id)
    assert "-A -u [2001:db8::10]:53 -s wlc" in save()
    assert len(kernel.stats()) == len(want)


def test_the_raw_client_resolves_the_family_and_dumps_what_pyroute2_made(ipvs: IPVSSocket) -> None:
    subprocess.run(["ipvsadm", "-A", "-t", "192.0.2.10:443", "-s", "rr", "-p", "60"], check=True, timeout=20)
    client = ipvsnl.NetlinkIpvs()
    try:
        assert client.family >= 0x10
        parts = client.dump(ipvsnl.CMD_GET_SERVICE)
        decoded = [ipvsnl.decode_service(p) for p in parts]
        assert [d[0] for d in decoded if d is not None] == [
            ObservedService(ServiceId("192.0.2.10", 4, 443, "tcp"), "rr", persistent=True, timeout=60)]
    finally:
        client.close()


def test_a_refused_add_withholds_the_withdrawals_so_the_old_real_server_keeps_serving(kernel: LinuxIpvs) -> None:
    kernel.apply([AddService(SID, "wrr", ()), AddDest(SID, "198.51.100.1", 80, "g", 1, 0, 0)])
    replace_node: list[Op] = [AddDest(SID, "2001:db8::1", 80, "g", 1, 0, 0),  # direct routing across families: refused
                              EditDest(SID, "198.51.100.1", 80, "g", 0, 0, 0),  # the old node's drain start
                              DelDest(SID, "198.51.100.1", 80)]
    with pytest.raises(ApplyError) as caught:
        kernel.apply(replace_node)
    assert (caught.value.index, caught.value.applied) == (0, ())
    assert save() == ["-A -t 192.0.2.10:80 -s wrr", "-a -t 192.0.2.10:80 -r 198.51.100.1:80 -g -w 1"]
