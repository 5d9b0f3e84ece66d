"""What a cluster source (Kubernetes API or a directory of files) hands the watcher.

A source puts `Resync` and `ObjectEvent` items on an asyncio queue:
- `Resync(kind, objects)` replaces every object of that kind: sent once the initial list of
  the kind completed, and again after every relist (410 Gone, reconnect after an outage).
  The watcher publishes nothing until it has had a Resync of every kind in `KINDS`.
- `ObjectEvent(kind, type, obj)` is one ADDED/MODIFIED/DELETED watch event after that.
Objects are the API's JSON as dicts (what `kubectl get -o json` shows for one item).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, Literal, Protocol

Kind = Literal["Node", "Service", "EndpointSlice", "ConfigMap"]
KINDS: Final[tuple[Kind, ...]] = ("Node", "Service", "EndpointSlice", "ConfigMap")
EventType = Literal["ADDED", "MODIFIED", "DELETED"]


@dataclass(frozen=True, slots=True)
class Resync:
    kind: Kind
    objects: tuple[dict[str, Any], ...]


@dataclass(frozen=True, slots=True)
class ObjectEvent:
    kind: Kind
    type: EventType
    obj: dict[str, Any]


SourceItem = Resync | ObjectEvent


class Sink(Protocol):
    def put_nowait(self, item: SourceItem) -> None: ...


def object_key(obj: dict[str, Any]) -> str:
    """`namespace/name` (or `name` for cluster-scoped objects); "" when the object has no name."""
    meta = obj.get("metadata")
    if not isinstance(meta, dict):
        return ""
    name, namespace = meta.get("name"), meta.get("namespace")
    if not isinstance(name, str):
        return ""
    return f"{namespace}/{name}" if isinstance(namespace, str) and namespace else name
