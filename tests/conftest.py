"""Shared fixtures: the realistic cluster, golden-file comparison (`--update-golden`)."""

from __future__ import annotations

import difflib
from pathlib import Path

import pytest

from kube2ipvs.kube import load_objects_text, parse_endpointslices, parse_nodes, parse_services
from kube2ipvs.lbconfig import DefaultService, LBConfig, load_config_document, with_default_service
from kube2ipvs.model import ClusterState
from kube2ipvs.normalize import normalize

TESTS = Path(__file__).resolve().parent
REALISTIC = TESTS / "fixtures" / "realistic"
GOLDEN = TESTS / "golden"
UNICORNS = DefaultService.parse("rdei-system/unicorns:http", 70)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--update-golden", action="store_true", help="rewrite golden files from the current output")


def realistic_config() -> LBConfig:
    config, _ = load_config_document((REALISTIC / "configmap.json").read_bytes())
    return with_default_service(config, UNICORNS)


def realistic_state() -> ClusterState:
    nodes, _ = parse_nodes(load_objects_text((REALISTIC / "nodes.json").read_bytes()))
    services, _ = parse_services(load_objects_text((REALISTIC / "services.json").read_bytes()))
    slices, _ = parse_endpointslices(load_objects_text((REALISTIC / "endpointslices.json").read_bytes()))
    return normalize(nodes, services, slices, realistic_config())


@pytest.fixture
def state() -> ClusterState:
    return realistic_state()


class Golden:
    def __init__(self, update: bool) -> None:
        self.update = update

    def check(self, name: str, actual: str) -> None:
        path = GOLDEN / name
        if self.update:
            path.write_text(actual)
            return
        if not path.exists():
            pytest.fail(f"golden file {path} is missing; run pytest --update-golden and review it")
        expected = path.read_text()
        if actual != expected:
            diff = "".join(difflib.unified_diff(
                expected.splitlines(keepends=True), actual.splitlines(keepends=True),
                fromfile=f"golden/{name}", tofile="actual",
            ))
            pytest.fail(f"rendering differs from golden/{name} (pytest --update-golden to accept):\n{diff}")


@pytest.fixture
def golden(request: pytest.FixtureRequest) -> Golden:
    return Golden(bool(request.config.getoption("--update-golden")))
