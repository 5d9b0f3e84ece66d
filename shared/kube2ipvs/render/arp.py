"""The gratuitous ARP (IPv4) / unsolicited neighbour advertisement (IPv6) plan of an ARP director. Pure.

    192.0.2.10 dev eth0 garp
    2001:db8::10 dev eth0 unsolicited-na

Every configured VIP is attracted, whether or not it has real servers yet, so that the first
endpoint to appear is reachable at once.
"""

from __future__ import annotations

from kube2ipvs.model import ClusterState


def render_arp(state: ClusterState, *, interface: str) -> str:
    lines = [f"{vip} dev {interface} {'unsolicited-na' if ':' in vip else 'garp'}" for vip in state.vips]
    return "\n".join(lines) + ("\n" if lines else "")
