"""Cluster state (or one node's slice of it) as canonical JSON. Pure.

Keys and lists are in a fixed order, so the text is stable and diffable; it is the shape
`/config?format=json` serves and the NATS protocol (docs/protocol.md) builds on.
"""

from __future__ import annotations

import json
from typing import Any

from kube2ipvs.model import ClusterState, node_status_to_dict, service_to_dict

SCHEMA_VERSION = 1


def state_to_dict(state: ClusterState, *, node: str | None = None) -> dict[str, Any]:
    services = state.for_node(node) if node is not None else state.services
    doc: dict[str, Any] = {
        "version": SCHEMA_VERSION,
        "generation": state.generation,
        "hash": state.content_hash,
        "vips": list(state.vips),
        "services": [service_to_dict(vs) for vs in services],
        "nodes": [node_status_to_dict(n) for n in state.nodes],
        "skipped": [{"subject": s.subject, "reason": s.reason} for s in state.skipped],
    }
    if node is not None:
        doc["node"] = node
    return doc


def render_json(state: ClusterState, *, node: str | None = None) -> str:
    return json.dumps(state_to_dict(state, node=node), indent=2) + "\n"
