"""IPVS rules in `ipvsadm-save -n` format. Pure.

    -A -t 192.0.2.10:8080 -s wrr
    -a -t 192.0.2.10:8080 -r 198.51.100.11:8080 -g -w 3

Sorted by VIP, port, protocol, then real server, so the output of two directors can be diffed
line by line (the troubleshooting guide's "IPVS rules should be identical across directors").
The text loads with `ipvsadm-restore`.
"""

from __future__ import annotations

from collections.abc import Iterable

from kube2ipvs.ipvs import IpvsService, Mode, desired_ipvs, flag_names
from kube2ipvs.model import ClusterState, hostport

_PROTO_FLAG = {"tcp": "-t", "udp": "-u"}
_FWD_FLAG = {"g": "-g", "i": "-i"}


def service_lines(services: Iterable[IpvsService]) -> list[str]:
    lines: list[str] = []
    for svc in services:
        target = f"{_PROTO_FLAG[svc.protocol]} {hostport(svc.vip, svc.port)}"
        head = f"-A {target} -s {svc.scheduler}"
        if svc.flags:
            head += " -b " + ",".join(flag_names(svc.scheduler, svc.flags))
        lines.append(head)
        for d in svc.dests:
            line = f"-a {target} -r {hostport(d.address, d.port)} {_FWD_FLAG[d.forwarding]} -w {d.weight}"
            if d.u_threshold:
                line += f" -x {d.u_threshold}"
            if d.l_threshold:
                line += f" -y {d.l_threshold}"
            if d.forwarding == "i":
                line += " --tun-type ipip"  # as ipvsadm-save (1.31) prints tunnel real servers
            lines.append(line)
    return lines


def render_ipvsadm(state: ClusterState, *, mode: Mode = "arp") -> str:
    lines = service_lines(desired_ipvs(state, mode))
    return "\n".join(lines) + ("\n" if lines else "")
