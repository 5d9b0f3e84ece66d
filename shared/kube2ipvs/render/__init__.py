"""Pure renderers of the cardinal rules (DESIGN.md 4): one canonical, sorted text per format.

`render_format` is what `kube2ipvs rules` and every service's `/config?format=` call, so the
offline tool and the running services print the same rules the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from kube2ipvs.ipvs import Mode
from kube2ipvs.model import ClusterState

FORMATS: Final = ("ipvsadm", "nft", "iptables", "bgp", "json", "arp")


class RenderError(ValueError):
    """The request cannot be rendered: `problem` is "format", "node required" or "no such node"."""

    def __init__(self, problem: str, *, fmt: str, node: str | None = None, nodes: Sequence[str] = ()) -> None:
        self.problem, self.fmt, self.node = problem, fmt, node
        self.nodes = ", ".join(nodes) or "none"
        super().__init__(f"{problem}: {fmt if problem != 'no such node' else node}")


def _check_node(state: ClusterState, node: str | None, fmt: str, *, required: bool) -> None:
    if node is None:
        if required:
            raise RenderError("node required", fmt=fmt, nodes=state.node_names())
    elif node not in state.node_names():
        raise RenderError("no such node", fmt=fmt, node=node, nodes=state.node_names())


def render_format(
    state: ClusterState,
    fmt: str,
    *,
    node: str | None = None,
    mode: Mode = "arp",
    nexthop: str | None = None,
    nexthop6: str | None = None,
    communities: Sequence[str] = (),
    interface: str = "eth0",
    masquerade_exempt: Sequence[str] | None = None,
) -> str:
    if fmt == "ipvsadm":
        from kube2ipvs.render.ipvsadm import render_ipvsadm

        return render_ipvsadm(state, mode=mode)
    if fmt in ("nft", "iptables"):
        _check_node(state, node, fmt, required=True)
        assert node is not None
        services = state.for_node(node)
        if fmt == "nft":
            from kube2ipvs.render.nft import render_nft

            return render_nft(services, masquerade_exempt=masquerade_exempt)
        from kube2ipvs.render.iptables import render_iptables

        return render_iptables(services, masquerade_exempt=masquerade_exempt)
    if fmt == "bgp":
        from kube2ipvs.render.bgp import render_bgp

        return render_bgp(state, nexthop=nexthop, nexthop6=nexthop6, communities=communities)
    if fmt == "arp":
        from kube2ipvs.render.arp import render_arp

        return render_arp(state, interface=interface)
    if fmt == "json":
        from kube2ipvs.render.json import render_json

        _check_node(state, node, fmt, required=False)
        return render_json(state, node=node)
    raise RenderError("format", fmt=fmt)
