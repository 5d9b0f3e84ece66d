"""Cluster state (or one node's slice of it) as canonical JSON. Pure.

Keys and lists are in a fixed order, so the text is stable and diffable; it is the shape
`/config?format=json` serves and the NATS protocol (docs/protocol.md) builds on.
"""

from __future__ import annotations

import json
from typing import Any

from kube2ipvs.model import ClusterState, VirtualService

SCHEMA_VERSION = 1


def service_to_dict(vs: VirtualService) -> dict[str, Any]:
    return {
        "vip": vs.vip,
        "port": vs.port,
        "protocol": vs.protocol,
        "service": {"namespace": vs.namespace, "name": vs.service, "portName": vs.port_name},
        "ipvs": {
            "scheduler": vs.scheduler,
            "forwarding": vs.forwarding,
            "uThreshold": vs.u_threshold,
            "lThreshold": vs.l_threshold,
            "flags": list(vs.flags),
        },
        "mtu": vs.mtu,
        "backends": [
            {
                "node": b.node,
                "address": b.address,
                "weight": b.weight,
                "endpoints": [{"address": e.address, "port": e.port} for e in b.endpoints],
            }
            for b in vs.backends
        ],
    }


def state_to_dict(state: ClusterState, *, node: str | None = None) -> dict[str, Any]:
    services = state.for_node(node) if node is not None else state.services
    doc: dict[str, Any] = {
        "version": SCHEMA_VERSION,
        "generation": state.generation,
        "hash": state.content_hash,
        "vips": list(state.vips),
        "services": [service_to_dict(vs) for vs in services],
        "nodes": [
            {"name": n.name, "addresses": list(n.addresses), "eligible": n.eligible, "reason": n.reason}
            for n in state.nodes
        ],
        "skipped": [{"subject": s.subject, "reason": s.reason} for s in state.skipped],
    }
    if node is not None:
        doc["node"] = node
    return doc


def render_json(state: ClusterState, *, node: str | None = None) -> str:
    return json.dumps(state_to_dict(state, node=node), indent=2) + "\n"
