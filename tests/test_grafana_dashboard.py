"""deploy/grafana/kube2ipvs-dashboard.json: a Grafana dashboard model whose queries name only
metrics the services export (so renaming a metric without the dashboard fails here), through a
Prometheus datasource variable."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric

import kube2ipvs_bgp_speaker.app as speaker
import kube2ipvs_director.app as director
import kube2ipvs_realserver.app as realserver
import kube2ipvs_watcher.app as watcher

DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "kube2ipvs-dashboard.json"


def load() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return doc


def panels(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in doc["panels"]:
        yield panel
        yield from panel.get("panels", [])


def exported_names(families: Iterable[Metric]) -> set[str]:
    """The series names Prometheus scrapes for these metric families."""
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
                "gauge": ("",), "summary": ("", "_sum", "_count", "_created")}
    return {f.name + s for f in families for s in suffixes.get(f.type, ("",))}


def every_exported_metric() -> set[str]:
    registry = CollectorRegistry()
    for metrics in (director.Metrics, realserver.Metrics, speaker.Metrics, watcher.Metrics):
        metrics(registry)
    names = exported_names(registry.collect())
    snapshot = SimpleNamespace(conn_states={}, services=(), conntrack=SimpleNamespace(count=1, max=2))
    stats = SimpleNamespace(stats=snapshot, owned_vips=frozenset())
    names |= exported_names(director.DirectorStats(stats).collect())  # type: ignore[arg-type]
    counters = SimpleNamespace(desired=None, counters={})
    names |= exported_names(realserver.KernelCounters(counters).collect())  # type: ignore[arg-type]
    return names


def test_the_dashboard_is_a_grafana_model_with_a_prometheus_datasource_variable() -> None:
    doc = load()
    assert doc["uid"] == "kube2ipvs"
    assert isinstance(doc["schemaVersion"], int)
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in panels(doc)]
    assert len(ids) == len(set(ids))
    for panel in panels(doc):
        assert {"h", "w", "x", "y"} <= panel["gridPos"].keys()
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"


def test_panels_do_not_overlap() -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in panels(load()):
        g = panel["gridPos"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, (panel["title"], cells.get((x, y)))
                cells[(x, y)] = panel["title"]


def test_every_query_names_metrics_the_services_export_and_defined_variables() -> None:
    doc = load()
    exported = every_exported_metric()
    variables = {v["name"] for v in doc["templating"]["list"]} | {"__rate_interval", "__interval", "__range"}
    used: set[str] = set()
    queries = [t["expr"] for p in panels(doc) for t in p.get("targets", [])]
    queries += [v["query"]["query"] for v in doc["templating"]["list"] if isinstance(v.get("query"), dict)]
    for expr in queries:
        for name in re.findall(r"\bkube2ipvs_[a-z_]+\b", expr):
            assert name in exported, f"{name} (in {expr}) is not exported by any service"
            used.add(name)
        for var in re.findall(r"\$(\w+)", expr):
            assert var in variables, f"${var} in {expr}"
    # The list: generations, reconcile durations, apply errors, drift repairs, virtual
    # services/real servers, realserver SYN/RST, BGP peers/routes, GARP max interval.
    for wanted in ("kube2ipvs_watcher_generation", "kube2ipvs_director_generation_desired",
                   "kube2ipvs_director_generation_applied", "kube2ipvs_director_reconcile_seconds_bucket",
                   "kube2ipvs_bgp_speaker_reconcile_seconds_bucket", "kube2ipvs_director_apply_errors_total",
                   "kube2ipvs_realserver_apply_errors_total", "kube2ipvs_director_drift_repairs_total",
                   "kube2ipvs_bgp_speaker_drift_repairs_total", "kube2ipvs_director_virtual_services",
                   "kube2ipvs_director_real_servers", "kube2ipvs_realserver_tcp_flags_total",
                   "kube2ipvs_bgp_speaker_peers", "kube2ipvs_bgp_speaker_routes_announced",
                   "kube2ipvs_director_garp_max_interval_seconds"):
        assert wanted in used, wanted
