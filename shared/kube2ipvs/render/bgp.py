"""BGP announcements as RIB-style lines, one per prefix. Pure.

    192.0.2.10/32 nexthop=198.51.100.2 communities=64512:100

`nexthop=self` means the speaker's own address (gobgpd fills it in).
"""

from __future__ import annotations

from collections.abc import Sequence

from kube2ipvs.bgp import desired_announcements
from kube2ipvs.model import ClusterState


def render_bgp(
    state: ClusterState,
    *,
    nexthop: str | None = None,
    nexthop6: str | None = None,
    communities: Sequence[str] = (),
) -> str:
    lines = []
    for a in desired_announcements(state, nexthop=nexthop, nexthop6=nexthop6, communities=communities):
        line = f"{a.prefix} nexthop={a.nexthop or 'self'}"
        if a.communities:
            line += " communities=" + ",".join(a.communities)
        lines.append(line)
    return "\n".join(lines) + ("\n" if lines else "")
