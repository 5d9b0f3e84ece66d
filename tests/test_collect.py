"""`kube2ipvs collect` against in-process services on 127.0.0.1: real StatusServers serving small
fake roles, or the real DirectorApp over its strict fakes. A director whose rules differ is
reported with the diff and exit 1; all agreeing is exit 0; unreachable, timed-out and unhealthy
instances are reported. Also the pure parts: targets, Kubernetes pods, the choice of reference.
The lab version: tests/root/test_collect_lab.py."""

from __future__ import annotations

import asyncio
import io
import json
import socket
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from kube2ipvs import collect, roleargs
from kube2ipvs.cli import main
from kube2ipvs.collect import Fetched, Target, build_report, parse_targets, targets_from_pods
from kube2ipvs.model import ClusterState
from kube2ipvs.normalize import normalize
from kube2ipvs.statusserver import ConfigResponse, Health, StatusServer, json_response, text_response
from kube2ipvs_director.app import DirectorApp, DirectorSettings, default_vs_sysctls
from kube2ipvs_director.host import FakeHost
from kube2ipvs_director.kernel import FakeIpvs
from tests.builders import config, endpointslice, node, service, web_entry

RULES = """\
-A -t 192.0.2.10:80 -s mh -b flag-1,flag-2
-a -t 192.0.2.10:80 -r 10.99.0.21:80 -g -w 1
-a -t 192.0.2.10:80 -r 10.99.0.22:80 -g -w 1
-A -u 192.0.2.11:53 -s mh -b flag-1,flag-2
-a -u 192.0.2.11:53 -r 10.99.0.23:53 -g -w 1
"""
MISSING_ONE = RULES.replace("-a -t 192.0.2.10:80 -r 10.99.0.21:80 -g -w 1\n", "")


@dataclass
class FakeRole:
    """/healthz and /config of one role, as the real roles shape them."""

    role: str
    generation: int | None = 7
    healthy: bool = True
    reason: str = ""
    rules: str | None = None  # directors: ?format=ipvsadm (None: 503 "not reconciled yet")
    desired: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def health(self) -> Health:
        return Health(self.healthy, self.reason, {"generation": self.generation})

    def config(self, query: Mapping[str, str]) -> ConfigResponse:
        fmt = query.get("format")
        if fmt is None:
            key = "generation_applied" if self.role == "director" else "generation"
            return json_response({"role": self.role, "settings": {}, key: self.generation, **self.extra})
        text = self.rules if fmt == "ipvsadm" else self.desired if fmt == "desired" else None
        return text_response("not reconciled yet\n", 503) if text is None else text_response(text)


class Services:
    """StatusServers on 127.0.0.1 ephemeral ports, in an event loop of their own (a thread), so the
    CLI under test runs its own `asyncio.run` in the test's thread as it does for an operator."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="services", daemon=True)
        self.thread.start()
        self.servers: list[StatusServer] = []
        self.sockets: list[socket.socket] = []
        self.runners: list[web.AppRunner] = []

    def serve(self, role: FakeRole | DirectorApp) -> str:
        registry = role.registry if isinstance(role, DirectorApp) else CollectorRegistry()
        server = StatusServer(host="127.0.0.1", port=0, health=role.health, config=role.config, registry=registry)
        asyncio.run_coroutine_threadsafe(server.start(), self.loop).result(timeout=10)
        self.servers.append(server)
        return f"127.0.0.1:{server.port}"

    def pods_api(self, namespace: str, pods: list[dict[str, Any]]) -> str:
        """The pod list of kube-apiserver (only that), at the URL returned; records each selector."""
        self.selectors: list[str] = []

        async def list_pods(request: web.Request) -> web.Response:
            if request.match_info["ns"] != namespace:
                return web.json_response({"kind": "PodList", "items": []})
            self.selectors.append(request.query.get("labelSelector", ""))
            return web.json_response({"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": pods})

        async def start() -> int:
            app = web.Application()
            app.router.add_get("/api/v1/namespaces/{ns}/pods", list_pods)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            self.runners.append(runner)
            port: int = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            return port

        port = asyncio.run_coroutine_threadsafe(start(), self.loop).result(timeout=10)
        return f"http://127.0.0.1:{port}"

    def silent(self) -> str:
        """A port that accepts connections (the kernel's backlog) and never answers."""
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        self.sockets.append(sock)
        return f"127.0.0.1:{sock.getsockname()[1]}"

    def close(self) -> None:
        for server in self.servers:
            asyncio.run_coroutine_threadsafe(server.stop(), self.loop).result(timeout=10)
        for runner in self.runners:
            asyncio.run_coroutine_threadsafe(runner.cleanup(), self.loop).result(timeout=10)
        for sock in self.sockets:
            sock.close()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


@pytest.fixture
def services() -> Iterator[Services]:
    running = Services()
    try:
        yield running
    finally:
        running.close()


def closed_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


def run_collect(*targets: str, fmt: str = "table", timeout: float = 5) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(["collect", "--targets", ",".join(targets), "--timeout", str(timeout), "--format", fmt],
                out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def run_json(*targets: str, timeout: float = 5) -> tuple[int, dict[str, Any]]:
    code, out, err = run_collect(*targets, fmt="json", timeout=timeout)
    assert not err
    doc: dict[str, Any] = json.loads(out)
    return code, doc


def by_address(doc: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {i["address"]: i for i in doc["instances"]}


# ---- against running services ----------------------------------------------------------------------


def test_a_director_whose_rules_differ_is_reported_with_the_diff_and_exit_1(services: Services) -> None:
    good1 = services.serve(FakeRole("director", rules=RULES, desired=RULES))
    good2 = services.serve(FakeRole("director", rules=RULES, desired=RULES))
    altered = services.serve(FakeRole("director", rules=MISSING_ONE, desired=RULES))
    node1 = services.serve(FakeRole("realserver", extra={"node": "node-1", "services": 2, "vips": ["192.0.2.10"]}))

    code, out, _ = run_collect(good1, good2, altered, node1)

    assert code == 1
    assert f"director {altered}: rules differ from the majority (2 of 3 directors):" in out
    assert "--- reference\n" in out
    assert f"+++ {altered}\n" in out
    assert "\n--a -t 192.0.2.10:80 -r 10.99.0.21:80 -g -w 1\n" in out
    assert f"{altered} (director): rules differ from the majority (2 of 3 directors): 1 missing, 0 extra" in out
    table = {line.split()[1]: line for line in out.splitlines()[1:5]}
    assert table[altered].endswith("services=2 real_servers=2  RULES DIFFER")
    assert "RULES DIFFER" not in table[good1]
    assert table[good1].split()[:6] == ["director", good1, "-", "ok", "7", "services=2"]
    assert table[node1].split()[:7] == ["realserver", node1, "node-1", "ok", "7", "services=2", "vips=1"]


def test_every_instance_healthy_and_every_director_the_same_is_exit_0(services: Services) -> None:
    targets = [services.serve(FakeRole("director", rules=RULES)) for _ in range(2)]
    targets.append(services.serve(FakeRole("bgp-speaker", extra={"routes": ["192.0.2.10/32", "192.0.2.11/32"]})))
    targets.append(services.serve(FakeRole("watcher", extra={"state": {"services": 3, "endpoints": 7, "nodes": 3}})))

    code, out, err = run_collect(*targets)

    assert (code, err) == (0, "")
    assert out.endswith("\nok: 4 instances healthy, 2 directors hold the same rules\n")
    assert "problems" not in out
    assert "routes=2" in out
    assert "services=3 endpoints=7 nodes=3" in out


def test_json_names_the_differing_director_its_reference_and_its_diff(services: Services) -> None:
    good1 = services.serve(FakeRole("director", rules=RULES))
    good2 = services.serve(FakeRole("director", rules=RULES))
    extra = services.serve(FakeRole("director", rules=RULES + "-a -u 192.0.2.11:53 -r 10.99.0.21:53 -g -w 1\n"))

    code, doc = run_json(good1, good2, extra)

    assert code == 1
    assert doc["ok"] is False
    assert doc["directors"]["reference"] == "the majority (2 of 3 directors)"
    [differ] = doc["directors"]["differ"]
    assert differ["address"] == extra
    assert "\n+-a -u 192.0.2.11:53 -r 10.99.0.21:53 -g -w 1\n" in differ["diff"]
    instances = by_address(doc)
    assert [instances[a]["rules_differ"] for a in (good1, good2, extra)] == [False, False, True]
    assert instances[extra]["counts"] == {"services": 2, "real_servers": 4}


def test_an_unreachable_target_and_one_that_never_answers_are_reported(services: Services) -> None:
    ok = services.serve(FakeRole("watcher"))
    refused, silent = closed_port(), services.silent()

    code, doc = run_json(ok, refused, silent, timeout=0.5)

    assert code == 1
    instances = by_address(doc)
    assert instances[refused]["error"] == "unreachable: Connection refused"
    assert instances[silent]["error"] == "timeout: no complete answer within 0.5 s"
    assert instances[ok]["healthy"] is True
    assert instances[refused]["healthy"] is None
    assert sorted(doc["problems"]) == sorted([f"{refused} (unknown): unreachable: Connection refused",
                                              f"{silent} (unknown): timeout: no complete answer within 0.5 s"])


def test_an_unhealthy_instance_is_reported_with_its_reason(services: Services) -> None:
    sick = services.serve(FakeRole("realserver", healthy=False, reason="sysctls wrong: lo/arp_ignore want 1, have 0"))

    code, out, _ = run_collect(sick)

    assert code == 1
    assert f"{sick} (realserver): unhealthy: sysctls wrong: lo/arp_ignore want 1, have 0" in out
    assert out.splitlines()[1].split()[3] == "UNHEALTHY"


def test_a_director_not_reconciled_yet_has_no_rules_to_compare(services: Services) -> None:
    ready = services.serve(FakeRole("director", rules=RULES))
    starting = services.serve(FakeRole("director", rules=None, healthy=False, reason="not reconciled yet"))

    code, doc = run_json(ready, starting)

    assert code == 1
    assert f"{starting} (director): no rules to compare: not reconciled yet" in doc["problems"]
    assert doc["directors"] == {"reference": None, "differ": []}


class NotKube2ipvs(FakeRole):
    def config(self, query: Mapping[str, str]) -> ConfigResponse:
        return text_response("<html>hello</html>\n")


def test_a_service_that_is_not_kube2ipvs_is_reported(services: Services) -> None:
    other = services.serve(NotKube2ipvs("watcher"))
    code, doc = run_json(other)
    assert code == 1
    assert doc["problems"] == [
        f"{other} (unknown): not a kube2ipvs service: /config answered 200 without a JSON object"]


def test_targets_may_be_host_names(services: Services) -> None:
    server = services.serve(FakeRole("watcher"))
    code, doc = run_json(server.replace("127.0.0.1", "localhost"))
    assert code == 0
    assert doc["instances"][0]["role"] == "watcher"


def test_instances_are_found_through_the_pods_of_a_namespace(services: Services, tmp_path: Path) -> None:
    director, realserver = services.serve(FakeRole("director", rules=RULES)), services.serve(FakeRole("realserver"))
    director_port, realserver_port = director.rpartition(":")[2], realserver.rpartition(":")[2]
    pods = [pod("director-a", "127.0.0.1", {"name": "director", "args": [f"--listen=$(HOST_IP):{director_port}"]},
                {"name": "gobgpd"}),
            pod("realserver-b", "127.0.0.1",
                {"name": "realserver", "args": ["--listen", f"0.0.0.0:{realserver_port}"]}),
            pod("realserver-c", None, {"name": "realserver"}, phase="Pending")]
    url = services.pods_api("lb", pods)
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "t",
        "clusters": [{"name": "t", "cluster": {"server": url}}], "users": [{"name": "t", "user": {}}],
        "contexts": [{"name": "t", "context": {"cluster": "t", "user": "t"}}]}))
    out, err = io.StringIO(), io.StringIO()

    code = main(["collect", "--namespace", "lb", "--selector", "app=kube2ipvs", "--kubeconfig", str(kubeconfig),
                 "--format", "json"], out=out, err=err)

    assert code == 0, out.getvalue()
    assert services.selectors == ["app=kube2ipvs"]
    assert err.getvalue() == "note: lb/realserver-c: not running (Pending)\n"
    doc = json.loads(out.getvalue())
    assert [(i["role"], i["address"], i["node"]) for i in doc["instances"]] == [
        ("director", director, "lb/director-a"), ("realserver", realserver, "lb/realserver-b")]


def test_without_targets_or_a_cluster_configuration_collect_is_a_usage_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    err = io.StringIO()
    assert main(["collect"], out=io.StringIO(), err=err) == 2
    assert err.getvalue() == ("error: collect: no kubeconfig (--kubeconfig, $KUBECONFIG, ~/.kube/config) and not "
                              "running in a pod: give --targets\n")


def test_on_a_terminal_stderr_counts_the_answers(services: Services) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    targets = [services.serve(FakeRole("watcher")) for _ in range(2)]
    err = Terminal()
    assert main(["collect", "--targets", ",".join(targets)], out=io.StringIO(), err=err) == 0
    assert err.getvalue() == "\rcollect: 1/2 answered\rcollect: 2/2 answered\r\x1b[K"


# ---- the real director ----------------------------------------------------------------------------


WEB = service("shop", "web", ("http", 80, "TCP"))
NODES = [node("a", "198.51.100.1"), node("b", "198.51.100.2")]


def cluster(generation: int, endpoints: list[tuple[str, str]]) -> ClusterState:
    """shop/web on 192.0.2.1:80 with (pod address, node) endpoints; directors forward to the nodes."""
    cfg = config({"192.0.2.1": {"80": web_entry()}})
    slices = [endpointslice("shop", "web", "w", [("http", 8080, "TCP")], [(a, n, True) for a, n in endpoints])]
    return replace(normalize(NODES, [WEB], slices, cfg), generation=generation)


def reconciled_director(state: ClusterState) -> DirectorApp:
    app = DirectorApp(FakeIpvs(), FakeHost(), source=None,
                      settings=DirectorSettings(mode="bgp", vs_sysctls=default_vs_sysctls("bgp")))
    app.offer(state)
    asyncio.run(app.reconcile_once())
    return app


def test_a_real_director_that_missed_an_update_is_the_one_reported(services: Services) -> None:
    # Two directors: no majority, and each wants what it was told; the newest generation decides.
    old = reconciled_director(cluster(4, [("10.0.0.1", "a")]))
    new = reconciled_director(cluster(5, [("10.0.0.1", "a"), ("10.0.1.1", "b")]))
    try:
        stale, current = services.serve(old), services.serve(new)

        code, doc = run_json(stale, current)

        assert code == 1
        [differ] = doc["directors"]["differ"]
        assert differ["address"] == stale
        assert differ["reference"] == f"{current}, the newest applied generation (5)"
        assert differ["diff"].splitlines()[-1] == "--a -t 192.0.2.1:80 -r 198.51.100.2:80 -g -w 1"
        instances = by_address(doc)
        assert (instances[stale]["generation"], instances[current]["generation"]) == (4, 5)
        assert instances[current]["counts"] == {"services": 1, "real_servers": 2}
    finally:
        old.close()
        new.close()


def test_real_directors_with_the_same_state_agree(services: Services) -> None:
    apps = [reconciled_director(cluster(5, [("10.0.0.1", "a"), ("10.0.1.1", "b")])) for _ in range(2)]
    try:
        code, out, _ = run_collect(*(services.serve(app) for app in apps))
        assert code == 0, out
        assert out.endswith("2 directors hold the same rules\n")
    finally:
        for app in apps:
            app.close()


def test_a_hand_made_change_a_director_repaired_is_noted_without_failing(services: Services) -> None:
    # A director reports the rules of its last reconcile, so by the time an operator looks, a
    # change made by hand is repaired (at the next resync); the repair count is what remains.
    apps = [reconciled_director(cluster(5, [("10.0.0.1", "a"), ("10.0.1.1", "b")])) for _ in range(2)]
    try:
        ipvs = apps[0].ipvs
        assert isinstance(ipvs, FakeIpvs)
        [sid] = ipvs.services
        svc = ipvs.services[sid]
        ipvs.services[sid] = replace(svc, dests=svc.dests[:1])  # `ipvsadm -d` by hand
        asyncio.run(apps[0].reconcile_once())  # the resync
        repaired, other = (services.serve(app) for app in apps)

        code, out, _ = run_collect(repaired, other)

        assert code == 0, out
        assert f"notes:\n  {repaired} (director): repaired 1 change made by hand since it started\n" in out
    finally:
        for app in apps:
            app.close()


# ---- the pure parts --------------------------------------------------------------------------------


def director_answer(address: str, rules: str, *, desired: str | None = None, generation: int = 1) -> Fetched:
    host, port = address.split(":")
    return Fetched(Target(host, int(port)), config={"role": "director", "generation_applied": generation},
                   health={"ok": True}, health_status=200, ipvsadm=rules, desired=desired)


def test_without_a_majority_the_desired_rules_are_the_reference_when_all_want_the_same() -> None:
    report = build_report([director_answer("10.0.0.1:1", RULES, desired=RULES, generation=9),
                           director_answer("10.0.0.2:1", MISSING_ONE, desired=RULES, generation=3)])
    assert report.reference == "the desired rules (every director wants the same)"
    assert [d.address for d in report.diffs] == ["10.0.0.2:1"]
    assert report.exit_code() == 1


def test_without_a_majority_or_agreed_desired_rules_the_newest_generation_is_the_reference() -> None:
    report = build_report([director_answer("10.0.0.1:1", RULES, generation=3),
                           director_answer("10.0.0.2:1", MISSING_ONE, generation=9)])
    assert report.reference == "10.0.0.2:1, the newest applied generation (9)"
    assert [d.address for d in report.diffs] == ["10.0.0.1:1"]


def test_rules_compare_line_by_line_ignoring_blank_lines_and_trailing_space() -> None:
    report = build_report([director_answer("10.0.0.1:1", RULES), director_answer("10.0.0.2:1", RULES + "\n  \n"),
                           director_answer("10.0.0.3:1", RULES.replace("\n", "  \n"))])
    assert report.ok
    assert report.diffs == ()


def test_nothing_found_is_not_ok() -> None:
    assert build_report([]).exit_code() == 1


def test_targets_parse_hosts_ports_and_bracketed_ipv6() -> None:
    assert parse_targets("10.0.0.1:9872, [2001:db8::1]:9873,host.example:1,10.0.0.1:9872") == (
        Target("10.0.0.1", 9872), Target("2001:db8::1", 9873), Target("host.example", 1))
    assert Target("2001:db8::1", 9873).address == "[2001:db8::1]:9873"
    for bad in ("10.0.0.1", "10.0.0.1:0", "10.0.0.1:x", "2001:db8::1:80", ":80", ","):
        with pytest.raises(ValueError):
            parse_targets(bad)


def test_a_bad_target_is_a_usage_error() -> None:
    err = io.StringIO()
    assert main(["collect", "--targets", "10.0.0.1"], out=io.StringIO(), err=err) == 2
    assert err.getvalue() == "error: kube2ipvs collect: argument --targets: '10.0.0.1' is not HOST:PORT\n"


def pod(name: str, ip: str | None, *containers: dict[str, Any], phase: str = "Running") -> dict[str, Any]:
    return {"metadata": {"namespace": "lb", "name": name}, "spec": {"containers": list(containers)},
            "status": {"phase": phase, **({"podIP": ip} if ip else {})}}


def test_pods_give_a_target_per_role_container_at_its_listen_port_or_the_default() -> None:
    pods = [
        pod("director-x", "10.0.0.11",
            {"name": "director", "args": ["--mode=bgp", "--listen=$(HOST_IP):19872"]},
            {"name": "bgp-speaker", "args": ["--listen", "$(HOST_IP):19873"]},
            {"name": "gobgpd", "args": ["-f", "/etc/gobgpd.conf"]}),
        pod("watcher-0", "10.244.0.5", {"name": "main", "command": ["kube2ipvs", "watcher"],
                                        "env": [{"name": "KUBE2IPVS_LISTEN", "value": "0.0.0.0:19871"}]}),
        pod("realserver-y", "10.0.0.21", {"name": "realserver", "args": ["--node=$(NODE_NAME)"]}),
        pod("realserver-z", None, {"name": "realserver"}, phase="Pending"),
        pod("realserver-w", None, {"name": "realserver"}),
        pod("nats-0", "10.244.0.9", {"name": "nats", "args": ["--config", "/etc/nats/nats.conf"]}),
    ]
    targets, notes = targets_from_pods(pods)
    assert [(t.address, t.role, t.name) for t in targets] == [
        ("10.0.0.11:19872", "director", "lb/director-x"),
        ("10.0.0.11:19873", "bgp-speaker", "lb/director-x"),
        ("10.0.0.21:9874", "realserver", "lb/realserver-y"),
        ("10.244.0.5:19871", "watcher", "lb/watcher-0"),
    ]
    assert notes == ["lb/realserver-z: not running (Pending)", "lb/realserver-w: no pod IP (Running)",
                     "lb/nats-0: no container of a kube2ipvs role"]


def test_the_default_ports_are_the_roles_own() -> None:
    assert collect.DEFAULT_PORTS == roleargs.DEFAULT_PORTS
