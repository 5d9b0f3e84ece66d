"""Kubernetes API objects (as `kubectl get -o json` or the API returns them) -> model. Pure.

Parsing never raises on a malformed object: it skips that object and says why, so one bad
object cannot stop the rest of the cluster from being served. Only the fields kube2ipvs needs are
read; everything else is ignored.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final, TypeVar

import yaml

from kube2ipvs.lbconfig import Family
from kube2ipvs.model import EndpointSlice, Node, Service, ServicePort, Skip, SliceEndpoint, SlicePort

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
# What the API server accepts as an object name (DNS-1123 subdomain) and a namespace (label).
# Names reach NATS keys and every rendering; one the API server would refuse (a file source
# has no API server) is skipped rather than allowed to make a key no NATS server accepts.
_NAME: Final = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*\Z")
_NAMESPACE: Final = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?\Z")

T = TypeVar("T")


class ObjectFileError(ValueError):
    """A file of Kubernetes objects could not be read as JSON or YAML."""


def load_objects_text(text: str | bytes, *, source: str = "input") -> list[dict[str, Any]]:
    """Decode a file of Kubernetes objects: JSON or YAML, a List, a single object, or YAML documents."""
    docs: list[object]
    try:
        docs = [json.loads(text)]
    except RecursionError:
        raise ObjectFileError(f"{source}: nested too deeply") from None
    except (ValueError, UnicodeDecodeError):
        try:
            docs = [d for d in yaml.safe_load_all(text) if d is not None]
        except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as exc:
            raise ObjectFileError(f"{source}: not valid JSON or YAML ({type(exc).__name__})") from None
    out: list[dict[str, Any]] = []
    for doc in docs:
        out.extend(flatten_list(doc, source=source))
    return out


def flatten_list(doc: object, *, source: str = "input") -> list[dict[str, Any]]:
    """A `List` (or `NodeList`, ...) -> its items; a single object -> [object]."""
    if not isinstance(doc, dict):
        raise ObjectFileError(f"{source}: expected a Kubernetes object or List, got {type(doc).__name__}")
    kind = doc.get("kind")
    if (isinstance(kind, str) and kind.endswith("List")) or ("items" in doc and "kind" not in doc):
        items = doc.get("items") or []
        if not isinstance(items, list):
            raise ObjectFileError(f"{source}: items is not an array")
        return [i for i in items if isinstance(i, dict)]
    return [doc]


def _meta(obj: Mapping[str, Any]) -> tuple[str, str]:
    meta = obj.get("metadata")
    if not isinstance(meta, dict) or not isinstance(meta.get("name"), str) or not meta["name"]:
        raise ValueError("metadata.name is missing")
    name, namespace = meta["name"], meta.get("namespace", "")
    if len(name) > 253 or not _NAME.match(name):
        raise ValueError(f"metadata.name {json.dumps(name[:64])} is not a valid Kubernetes name")
    if isinstance(namespace, str) and namespace and (len(namespace) > 63 or not _NAMESPACE.match(namespace)):
        raise ValueError(f"metadata.namespace {json.dumps(namespace[:64])} is not a valid Kubernetes namespace")
    return (namespace if isinstance(namespace, str) else ""), name


def _ident(obj: Mapping[str, Any], kind: str) -> str:
    meta = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
    assert isinstance(meta, dict)
    ns, name = meta.get("namespace"), meta.get("name")
    return f"{kind}/{ns}/{name}" if isinstance(ns, str) and ns else f"{kind}/{name}"


def _dict(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: object) -> list[Any]:
    return value if isinstance(value, list) else []


def _canonical_ip(value: object, family: Family | None = None) -> str | None:
    """The canonical address, or None for anything else: not an address, an address of another
    family than `family`, or one with a zone index (`fe80::1%eth0`: the text after % is
    free-form and would reach nft text and netlink verbatim; the API server never accepts one).

    An IPv4-mapped IPv6 address (`::ffff:10.0.0.5`) is the IPv4 address, as Kubernetes reads it
    (Go's net.ParseIP): the API server accepts one in an IPv4 EndpointSlice."""
    if not isinstance(value, str) or "%" in value:
        return None
    try:
        ip = ipaddress.ip_address(value)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip) if family is None or ip.version == family else None


def node_from_object(obj: Mapping[str, Any]) -> Node:
    _, name = _meta(obj)
    status = _dict(obj.get("status"))
    ready = any(
        _dict(c).get("type") == "Ready" and _dict(c).get("status") == "True"
        for c in _list(status.get("conditions"))
    )
    ips: list[str] = []
    for a in _list(status.get("addresses")):
        if _dict(a).get("type") == "InternalIP":
            ip = _canonical_ip(_dict(a).get("address"))
            if ip is not None:
                ips.append(ip)
    labels = {
        str(k): str(v) for k, v in _dict(_dict(obj.get("metadata")).get("labels")).items() if isinstance(v, str)
    }
    return Node(
        name=name,
        ready=ready,
        unschedulable=_dict(obj.get("spec")).get("unschedulable") is True,
        labels=labels,
        internal_ips=tuple(ips),
    )


def service_from_object(obj: Mapping[str, Any]) -> Service:
    namespace, name = _meta(obj)
    spec = _dict(obj.get("spec"))
    ports: list[ServicePort] = []
    for raw in _list(spec.get("ports")):
        p = _dict(raw)
        number = p.get("port")
        if isinstance(number, int) and not isinstance(number, bool):
            ports.append(ServicePort(name=str(p.get("name") or ""), port=number,
                                     protocol=str(p.get("protocol") or "TCP")))
    return Service(
        namespace=namespace,
        name=name,
        headless=spec.get("clusterIP") == "None",
        ports=tuple(ports),
    )


def endpointslice_from_object(obj: Mapping[str, Any]) -> EndpointSlice:
    namespace, name = _meta(obj)
    labels = _dict(_dict(obj.get("metadata")).get("labels"))
    service_name = labels.get(SERVICE_NAME_LABEL)
    address_type = obj.get("addressType")
    family: Family | None = 4 if address_type == "IPv4" else 6 if address_type == "IPv6" else None
    ports: list[SlicePort] = []
    for raw in _list(obj.get("ports")):
        p = _dict(raw)
        number = p.get("port")
        if isinstance(number, int) and not isinstance(number, bool) and 1 <= number <= 65535:
            ports.append(SlicePort(name=str(p.get("name") or ""), port=number,
                                   protocol=str(p.get("protocol") or "TCP")))
    endpoints: list[SliceEndpoint] = []
    for raw in _list(obj.get("endpoints")):
        e = _dict(raw)
        # An address of the other family (`::ffff:10.0.0.5` in an IPv4 slice) could be neither
        # DNATed to nor weighed by the director: left out like one that is no address at all.
        addresses = [a for a in (_canonical_ip(x, family) for x in _list(e.get("addresses"))) if a is not None]
        if not addresses:
            continue
        node_name = e.get("nodeName")
        endpoints.append(SliceEndpoint(
            # Addresses of one endpoint are fungible (the API says so); the first one serves.
            address=addresses[0],
            ready=_dict(e.get("conditions")).get("ready") is not False,
            node_name=node_name if isinstance(node_name, str) and node_name else None,
        ))
    return EndpointSlice(
        namespace=namespace,
        name=name,
        service_name=service_name if isinstance(service_name, str) else None,
        family=family,
        ports=tuple(ports),
        endpoints=tuple(endpoints),
    )


def parse_many(
    objects: Iterable[Mapping[str, Any]], kind: str, parse: Callable[[Mapping[str, Any]], T]
) -> tuple[list[T], list[Skip]]:
    """Parse each object of `kind`; skip (with a reason) the ones that are not of that kind or malformed."""
    parsed: list[T] = []
    skipped: list[Skip] = []
    for obj in objects:
        if obj.get("kind") not in (None, kind):
            skipped.append(Skip(_ident(obj, str(obj.get("kind"))), f"not a {kind}"))
            continue
        try:
            parsed.append(parse(obj))
        except (ValueError, TypeError, AttributeError) as exc:
            skipped.append(Skip(_ident(obj, kind), f"malformed: {exc}"))
    return parsed, skipped


def parse_nodes(objects: Iterable[Mapping[str, Any]]) -> tuple[list[Node], list[Skip]]:
    return parse_many(objects, "Node", node_from_object)


def parse_services(objects: Iterable[Mapping[str, Any]]) -> tuple[list[Service], list[Skip]]:
    return parse_many(objects, "Service", service_from_object)


def parse_endpointslices(objects: Iterable[Mapping[str, Any]]) -> tuple[list[EndpointSlice], list[Skip]]:
    return parse_many(objects, "EndpointSlice", endpointslice_from_object)
