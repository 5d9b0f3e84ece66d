"""Small builders of model objects for tests."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from kube2ipvs.lbconfig import LBConfig, parse_lbconfig_value
from kube2ipvs.model import EndpointSlice, Node, Service, ServicePort, SliceEndpoint, SlicePort

ZONE = {"example.com/lb-zone": "green"}


def node(name: str, *ips: str, ready: bool = True, labels: Mapping[str, str] = ZONE,
         cordoned: bool = False) -> Node:
    return Node(name=name, ready=ready, unschedulable=cordoned, labels=dict(labels), internal_ips=tuple(ips))


def service(namespace: str, name: str, *ports: tuple[str, int, str], headless: bool = False) -> Service:
    return Service(namespace=namespace, name=name, headless=headless,
                   ports=tuple(ServicePort(n, p, proto) for n, p, proto in ports))


def endpointslice(namespace: str, service_name: str, name: str, ports: Sequence[tuple[str, int, str]],
                  endpoints: Sequence[tuple[str, str | None, bool]], *, family: int = 4) -> EndpointSlice:
    return EndpointSlice(
        namespace=namespace, name=name, service_name=service_name, family=6 if family == 6 else 4,
        ports=tuple(SlicePort(n, p, proto) for n, p, proto in ports),
        endpoints=tuple(SliceEndpoint(a, r, n) for a, n, r in endpoints),
    )


def config(entries: Mapping[str, Mapping[str, Mapping[str, object]]], *, labels: Mapping[str, str] = ZONE,
           config6: Mapping[str, Mapping[str, Mapping[str, object]]] | None = None,
           pool: Sequence[str] = ()) -> LBConfig:
    return parse_lbconfig_value({"vipPool": list(pool), "labels": dict(labels), "config": entries,
                                 "config6": config6 or {}})


def web_entry(**extra: object) -> dict[str, object]:
    return {"namespace": "shop", "service": "web", "portName": "http", **extra}
