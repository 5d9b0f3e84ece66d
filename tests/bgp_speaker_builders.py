"""Cluster states and director readiness documents for the bgp-speaker tests."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from kube2ipvs.model import ClusterState
from kube2ipvs.normalize import normalize
from tests.builders import config, endpointslice, node, service, web_entry

NODES = [node("a", "198.51.100.11", "2001:db8:100::11")]
WEB = service("shop", "web", ("http", 80, "TCP"))
IDLE = service("shop", "idle", ("http", 80, "TCP"))  # no endpoints: its VIPs have no real server


def cluster(generation: int, served: Sequence[str] = ("192.0.2.10",), *, unserved: Sequence[str] = ()) -> ClusterState:
    """shop/web (one ready pod) on port 80 of every VIP in `served` (IPv4 or IPv6), and shop/idle
    (no endpoints) on the VIPs in `unserved`."""
    v4 = {vip: {"80": web_entry()} for vip in served if ":" not in vip}
    v6 = {vip: {"80": web_entry()} for vip in served if ":" in vip}
    for vip in unserved:
        (v6 if ":" in vip else v4)[vip] = {"80": web_entry(service="idle")}
    slices = [endpointslice("shop", "web", "w4", [("http", 8080, "TCP")], [("10.0.0.1", "a", True)]),
              endpointslice("shop", "web", "w6", [("http", 8080, "TCP")], [("2001:db8:1::1", "a", True)], family=6)]
    return replace(normalize(NODES, [WEB, IDLE], slices, config(v4, config6=v6)), generation=generation)


def ready(vips: Sequence[str], *, at: float = 1000.0, healthy: bool = True, reason: str = "",
          active: bool = True) -> dict[str, Any]:
    """A director's readiness document, as kube2ipvs_director.app.DirectorApp.readiness() writes it."""
    return {"version": 1, "role": "director", "mode": "bgp", "active": active, "healthy": healthy,
            "reason": reason, "generation": 1, "content_hash": "x", "vips": sorted(vips), "at": at}
