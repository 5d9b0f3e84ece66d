"""Coverage-guided fuzzing with atheris (libFuzzer) of the three parsers that take bytes from
outside: the LB ConfigMap's value, a cluster-state bucket value, and a file of Kubernetes
objects. Hypothesis (tests/test_fuzz_properties.py) generates structured inputs; this one mutates
raw bytes, guided by which branches of our parsers they reach, which finds what structure-aware
strategies never write (broken UTF-8, JSON that is almost JSON, YAML tags and anchors).

    .venv/bin/python -m tests.fuzz.atheris_targets TARGET [libFuzzer flags, e.g. -runs=20000]

TARGET is `config`, `bucket` or `objects`. The seed corpus is the versioned bad-input corpus
(tests/corpus/). Every input must either parse or be refused with the parser's own error and a
printable message; and what parses must hold only what the watcher could have written: canonical
addresses, VIPs a router can send to, ports in range, and renderings that name nothing else.
Anything else (another exception, a broken invariant) is a finding: libFuzzer stops, prints the
input and exits non-zero (tests/test_atheris.py runs each target for a bounded number of inputs).
"""

from __future__ import annotations

import ipaddress
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import atheris

with atheris.instrument_imports(include=["kube2ipvs", "kube2ipvs_realserver"]):
    from kube2ipvs.kube import (
        ObjectFileError,
        endpointslice_from_object,
        load_objects_text,
        node_from_object,
        service_from_object,
    )
    from kube2ipvs.lbconfig import ConfigError, canonical_address, load_config_document, usable_as_vip
    from kube2ipvs.protocol import NodeSlice, ProtocolError, decode_node_service
    from kube2ipvs_realserver.plan import Settings, desired_state

CORPUS: Final = Path(__file__).resolve().parents[1] / "corpus"


def _printable(message: str) -> None:
    if not message.isprintable():
        raise AssertionError(f"an error message with unprintable characters: {message!r}")


def _canonical_vip(vip: str) -> None:
    if canonical_address(vip) != vip or not usable_as_vip(ipaddress.ip_address(vip)):
        raise AssertionError(f"accepted VIP {vip!r} is not canonical or cannot be a VIP")


def config(data: bytes) -> None:
    try:
        cfg, _ = load_config_document(data)
    except ConfigError as exc:
        _printable(str(exc))
        return
    for entry in cfg.entries:
        _canonical_vip(entry.vip)
        if not 1 <= entry.port <= 65535:
            raise AssertionError(f"accepted port {entry.port}")


def bucket(data: bytes) -> None:
    try:
        vs = decode_node_service(data)
    except ProtocolError as exc:
        _printable(str(exc))
        return
    _canonical_vip(vs.vip)
    addresses = {vs.vip, *(b.address for b in vs.backends), *(e.address for b in vs.backends for e in b.endpoints)}
    for address in addresses:
        if canonical_address(address) != address:
            raise AssertionError(f"accepted address {address!r} not in canonical form")
    nft = desired_state(NodeSlice("node-a", (vs.vip,), (vs,)), Settings()).nft
    for token in nft.replace(",", " ").replace("{", " ").replace("}", " ").split():
        word = token.strip(";").split("/")[0]
        if ("." in word or ":" in word) and canonical_address(word) is not None and word not in addresses:
            raise AssertionError(f"the rendered nft text names {word!r}, which the value does not hold")


def objects(data: bytes) -> None:
    try:
        found = load_objects_text(data, source="fuzz")
    except ObjectFileError as exc:
        _printable(str(exc))
        return
    parse: dict[str, Callable[[dict[str, Any]], object]] = {
        "Node": node_from_object, "Service": service_from_object, "EndpointSlice": endpointslice_from_object}
    for obj in found:
        kind = obj.get("kind")
        how = parse.get(kind) if isinstance(kind, str) else None
        if how is None:
            continue
        try:
            how(obj)
        except (ValueError, TypeError, AttributeError):  # what the watcher's core catches and reports
            continue


TARGETS: Final[dict[str, Callable[[bytes], None]]] = {"config": config, "bucket": bucket, "objects": objects}


def seeds(target: str, directory: Path) -> None:
    """The bad-input corpus's inputs for `target`, one file each."""
    texts: list[str] = []
    if target == "config":
        texts = [c["lb"] if isinstance(c["lb"], str) else json.dumps(c["lb"])
                 for c in json.loads((CORPUS / "configmaps.json").read_text())["cases"] if "lb" in c]
    elif target == "bucket":
        texts = [c["text"] for c in json.loads((CORPUS / "nats_values.json").read_text())["cases"] if "text" in c]
        texts.append('{"vip":"192.0.2.10","port":80,"protocol":"tcp","service":{"namespace":"a","name":"b",'
                     '"portName":"http"},"ipvs":{"scheduler":null,"forwarding":"g","uThreshold":0,"lThreshold":0,'
                     '"flags":[]},"mtu":null,"backends":[{"node":"node-a","address":"198.51.100.11","weight":1,'
                     '"endpoints":[{"address":"10.1.1.2","port":8080}]}]}')
    else:
        texts = [json.dumps(c["object"]) for c in json.loads((CORPUS / "kube_objects.json").read_text())["cases"]
                 if "object" in c]
    for i, text in enumerate(texts):
        (directory / f"seed-{i:04d}").write_text(text)


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        print(f"usage: {sys.argv[0]} {{{'|'.join(TARGETS)}}} [libFuzzer flags]", file=sys.stderr)
        return 2
    target = sys.argv[1]
    with tempfile.TemporaryDirectory(prefix=f"k2i-atheris-{target}-") as corpus:
        seeds(target, Path(corpus))
        atheris.Setup([sys.argv[0], *sys.argv[2:], corpus], TARGETS[target])
        atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main())
