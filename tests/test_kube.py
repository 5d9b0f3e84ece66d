"""Reading `kubectl get -o json` output (and YAML) into the model."""

from __future__ import annotations

import json

import pytest

from kube2ipvs.kube import (
    ObjectFileError,
    load_objects_text,
    parse_endpointslices,
    parse_nodes,
    parse_services,
)
from tests.conftest import REALISTIC


def test_a_list_file_yields_its_items() -> None:
    objs = load_objects_text((REALISTIC / "nodes.json").read_bytes())
    assert [o["metadata"]["name"] for o in objs] == ["node-a", "node-b", "node-c", "node-d", "node-e"]


def test_a_single_object_and_yaml_documents_are_read_too() -> None:
    one = {"kind": "Node", "metadata": {"name": "n1"}}
    assert load_objects_text(json.dumps(one)) == [one]
    yaml_text = "kind: Node\nmetadata: {name: n1}\n---\nkind: NodeList\nitems:\n- kind: Node\n  metadata: {name: n2}\n"
    assert [o["metadata"]["name"] for o in load_objects_text(yaml_text)] == ["n1", "n2"]


@pytest.mark.parametrize("text", ["[1, 2]", "{{{", "\"just a string\"", "items: 5\n"])
def test_files_that_are_not_kubernetes_objects_are_rejected_clearly(text: str) -> None:
    with pytest.raises(ObjectFileError, match=r"nodes\.json"):
        load_objects_text(text, source="nodes.json")


def test_node_fields_are_read() -> None:
    nodes, skipped = parse_nodes(load_objects_text((REALISTIC / "nodes.json").read_bytes()))
    by_name = {n.name: n for n in nodes}
    assert skipped == []
    assert by_name["node-a"].internal_ips == ("198.51.100.11", "2001:db8:100::11")
    assert by_name["node-a"].ready
    assert not by_name["node-d"].ready
    assert by_name["node-c"].unschedulable
    assert by_name["node-e"].labels["example.com/lb-zone"] == "blue"


def test_service_and_endpointslice_fields_are_read() -> None:
    services, _ = parse_services(load_objects_text((REALISTIC / "services.json").read_bytes()))
    headless = [s.name for s in services if s.headless]
    assert headless == ["headless"]
    slices, _ = parse_endpointslices(load_objects_text((REALISTIC / "endpointslices.json").read_bytes()))
    web = next(s for s in slices if s.name == "web-4xk2p")
    assert (web.service_name, web.family, [p.name for p in web.ports]) == ("web", 4, ["http", "http-alt"])
    assert [e.ready for e in web.endpoints].count(False) == 1
    assert next(s for s in slices if s.name == "web-v6-9qz7m").family == 6


def test_malformed_objects_are_skipped_with_a_reason_and_the_rest_is_kept() -> None:
    objs = [
        {"kind": "Node", "metadata": {"name": "good"}},
        {"kind": "Node", "metadata": {}},
        {"kind": "Pod", "metadata": {"name": "p"}},
        {"kind": "Node", "metadata": {"name": "weird"}, "status": {"addresses": "nope", "conditions": [5]}},
    ]
    nodes, skipped = parse_nodes(objs)
    assert [n.name for n in nodes] == ["good", "weird"]
    assert [(s.subject, s.reason) for s in skipped] == [
        ("Node/None", "malformed: metadata.name is missing"), ("Pod/p", "not a Node")]


def test_endpoint_addresses_that_are_not_ips_are_ignored() -> None:
    slices, _ = parse_endpointslices([{
        "kind": "EndpointSlice", "metadata": {"namespace": "n", "name": "s",
                                              "labels": {"kubernetes.io/service-name": "svc"}},
        "addressType": "IPv4", "ports": [{"name": "http", "port": 80}, {"name": "bad", "port": 0}],
        "endpoints": [{"addresses": ["not-an-ip"], "nodeName": "a"},
                      {"addresses": ["10.0.0.1"], "nodeName": "a", "conditions": {}}],
    }])
    (es,) = slices
    assert [p.name for p in es.ports] == ["http"]
    assert [(e.address, e.ready) for e in es.endpoints] == [("10.0.0.1", True)]
