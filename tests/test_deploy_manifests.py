"""The deployment files, checked for structure: Docker and Kubernetes cannot run on the development
machine, so nothing here starts a container. What is checked instead:

- Dockerfiles: Debian bookworm, the project installed with constraints.txt, `kube2ipvs <role>` as
  the entry point, non-root where no capability is needed, only the role's apt packages.
- deploy/kubernetes (kustomize): every manifest listed and present, the expected kinds, RBAC that
  allows the watcher exactly what it calls and nothing wider, every role container's arguments
  and KUBE2IPVS_* variables accepted by that role's own argparse parser, probes on /healthz at
  the port the role listens on, security contexts that drop every capability but the role's.
- docker-compose.yml: every build names an existing Dockerfile, role commands parse, the shared
  network namespaces and BGP addresses agree with each other and with the FRR config.
- deploy/systemd: ExecStart flags parse, the hardening each role allows.
Where the real tool is installed (kubectl, nats-server, gobgpd, vtysh, systemd-analyze), the files
are also fed to it; those checks are skipped, with the reason, where it is not.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import yaml

from kube2ipvs.cli import main as cli_main
from kube2ipvs.kube import load_objects_text, parse_nodes
from kube2ipvs.roleargs import DEFAULT_PORTS, ENV_PREFIX, RoleUsageError
from kube2ipvs_bgp_speaker.main import build_parser as bgp_speaker_parser
from kube2ipvs_director.main import build_parser as director_parser
from kube2ipvs_realserver.main import build_parser as realserver_parser
from kube2ipvs_watcher.main import build_parser as watcher_parser

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "kubernetes"
COMPOSE = ROOT / "docker-compose.yml"
SYSTEMD = ROOT / "deploy" / "systemd"
NAMESPACE = "platform-load-balancer"

PARSERS: dict[str, Callable[[], argparse.ArgumentParser]] = {
    "watcher": watcher_parser, "director": director_parser,
    "bgp-speaker": bgp_speaker_parser, "realserver": realserver_parser,
}
ROLES = tuple(PARSERS)
# The images the manifests name (kustomization.yaml points them at a registry) and what builds them.
IMAGE_DOCKERFILES = {
    **{f"kube2ipvs-{role}": ROOT / "services" / role / "Dockerfile" for role in ROLES},
    "kube2ipvs-gobgpd": ROOT / "deploy" / "gobgpd" / "Dockerfile",
}
THIRD_PARTY_IMAGES = {"nats", "busybox"}  # each with a tag other than latest
# Capabilities each role's container may add (everything else dropped).
ROLE_CAPS = {"watcher": set(), "bgp-speaker": set(), "director": {"NET_ADMIN", "NET_RAW"},
             "realserver": {"NET_ADMIN"}}
ROOT_ROLES = {"director", "realserver"}  # root in the image: NET_ADMIN without file capabilities
# Final-stage apt packages of each role's image.
ROLE_PACKAGES = {"watcher": {"python3"}, "bgp-speaker": {"python3"},
                 "director": {"python3", "nftables", "iproute2", "ipvsadm"},
                 "realserver": {"python3", "nftables", "iproute2"}}


# ---- helpers ------------------------------------------------------------------------------------


@functools.cache  # parsed once per run; nothing here changes what it returns
def yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def kustomization() -> dict[str, Any]:
    return yaml_docs(K8S / "kustomization.yaml")[0]


def k8s_objects() -> list[dict[str, Any]]:
    return [d for name in kustomization()["resources"] for d in yaml_docs(K8S / name)]


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [o for o in k8s_objects() if o["kind"] == kind]


def one(kind: str, name: str) -> dict[str, Any]:
    found = [o for o in by_kind(kind) if o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def workloads() -> list[dict[str, Any]]:
    return [o for o in k8s_objects() if o["kind"] in ("Deployment", "DaemonSet", "StatefulSet")]


def pod_spec(workload: Mapping[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def image_name(image: str) -> str:
    return image.rsplit("/", 1)[-1].split(":", 1)[0]


def dockerfile_stages(path: Path) -> list[list[str]]:
    """The instructions of each stage, continuation lines joined, comments dropped."""
    lines: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        if raw.lstrip().startswith("#") and not pending:
            continue
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        line = (pending + raw).strip()
        pending = ""
        if line:
            lines.append(line)
    stages: list[list[str]] = []
    for line in lines:
        if line.upper().startswith("FROM "):
            stages.append([])
        assert stages, f"{path}: an instruction before FROM: {line}"
        stages[-1].append(line)
    return stages


def instructions(stage: Sequence[str], keyword: str) -> list[str]:
    return [line[len(keyword) + 1:].strip() for line in stage if line.upper().startswith(keyword + " ")]


def entrypoint(path: Path) -> list[str]:
    """The final stage's ENTRYPOINT (exec form), [] without one."""
    found = instructions(dockerfile_stages(path)[-1], "ENTRYPOINT")
    assert len(found) <= 1, f"{path}: several ENTRYPOINTs in the final stage"
    value: list[str] = json.loads(found[0]) if found else []
    return value


def role_of_dockerfile(path: Path) -> str | None:
    command = entrypoint(path)
    if command[:1] == ["kube2ipvs"] and len(command) == 2:
        assert command[1] in ROLES, f"{path}: {command[1]} is not a role"
        return command[1]
    return None


def apt_packages(stage: Sequence[str]) -> set[str]:
    packages: set[str] = set()
    for run in instructions(stage, "RUN"):
        for command in run.split("&&"):
            words = shlex.split(command)
            if "apt-get" in words and "install" in words:
                packages.update(w for w in words[words.index("install") + 1:] if not w.startswith("-"))
    return packages


def parse_role_args(role: str, args: Sequence[str], env: Mapping[str, str] | None = None) -> argparse.Namespace:
    """`args` and the KUBE2IPVS_* variables of `env`, through the role's own parser; a flag or
    variable it does not know, or a value it rejects, fails the test with the parser's message."""
    env = dict(env or {})
    role_env = {k: v for k, v in env.items() if k.startswith(ENV_PREFIX)}
    with mock.patch.dict(os.environ, role_env):
        for name in [k for k in os.environ if k.startswith(ENV_PREFIX) and k not in role_env]:
            del os.environ[name]
        try:
            parser = PARSERS[role]()
            known = {flag for flag in parser._option_string_actions if flag.startswith("--")}
            for name, value in role_env.items():
                flag = "--" + name[len(ENV_PREFIX):].lower().replace("_", "-")
                assert flag in known, f"{role}: {name} is no flag's variable ({flag} does not exist)"
                action = parser._option_string_actions[flag]
                if isinstance(action, argparse._AppendAction) and action.type is not None:
                    # roleargs.add leaves a list from the environment unconverted: check each item.
                    convert: Callable[[str], object] = action.type  # type: ignore[assignment]
                    for item in (v for v in value.split(",") if v):
                        convert(item)
            return parser.parse_args(list(args))
        except (RoleUsageError, argparse.ArgumentTypeError) as exc:
            pytest.fail(f"{role} {' '.join(args)} {role_env}: {exc}")


_K8S_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")
_SYSTEMD_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def placeholder(name: str) -> str:
    """A value for a variable only known at run time (a fieldRef)."""
    return "198.51.100.2" if name.endswith("_IP") else "node-a"


def container_env(container: Mapping[str, Any], configmaps: Mapping[str, Mapping[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        name = source["configMapRef"]["name"]
        assert name in configmaps, f"{container['name']}: envFrom ConfigMap {name} does not exist"
        env.update(configmaps[name])
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
        else:
            field = item["valueFrom"]["fieldRef"]["fieldPath"]
            env[item["name"]] = placeholder(item["name"]) if field != "metadata.name" else "pod-0"
    return env


def expand_k8s(container: Mapping[str, Any], env: Mapping[str, str]) -> list[str]:
    """The container's args with $(VAR) expanded as the kubelet does; an undefined VAR (which the
    kubelet would leave as it is) fails the test."""
    out = []
    for arg in container.get("args", []):
        for ref in _K8S_REF.findall(str(arg)):
            assert ref in env, f"{container['name']}: {arg} refers to ${ref}, which it does not define"
        out.append(_K8S_REF.sub(lambda m: env[m.group(1)], str(arg)))
    return out


def all_containers(spec: Mapping[str, Any]) -> Iterator[tuple[bool, dict[str, Any]]]:
    for c in spec.get("initContainers", []):
        yield True, c
    for c in spec["containers"]:
        yield False, c


def role_containers() -> Iterator[tuple[str, str, dict[str, Any], argparse.Namespace]]:
    """(workload, role, container, parsed flags) of every container that runs a role."""
    configmaps = {c["metadata"]["name"]: c.get("data", {}) for c in by_kind("ConfigMap")}
    for w in workloads():
        for init, c in all_containers(pod_spec(w)):
            name = image_name(c["image"])
            if name not in IMAGE_DOCKERFILES or init or "command" in c:
                continue
            role = role_of_dockerfile(IMAGE_DOCKERFILES[name])
            if role is None:
                continue
            env = container_env(c, configmaps)
            yield w["metadata"]["name"], role, c, parse_role_args(role, expand_k8s(c, env), env)


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed")
    return path


@functools.cache
def gobgpd_long_options() -> set[str]:
    text = subprocess.run([tool("gobgpd"), "--help"], capture_output=True, text=True, check=False).stdout
    options = set(re.findall(r"--([a-z][a-z-]*)", text))
    assert "api-hosts" in options, "gobgpd --help did not list its options"
    return options


def assert_gobgpd_flags(args: Sequence[str], where: str) -> None:
    known = gobgpd_long_options()
    for arg in args:
        if arg.startswith("--"):
            name = arg[2:].split("=", 1)[0]
            assert name in known, f"{where}: gobgpd has no --{name}"


def compose() -> dict[str, Any]:
    return yaml_docs(COMPOSE)[0]


def compose_role(service: Mapping[str, Any]) -> str | None:
    build = service.get("build")
    if build is None or "entrypoint" in service:
        return None
    return role_of_dockerfile(ROOT / build.get("context", ".") / build["dockerfile"])


def listen_port(args: argparse.Namespace) -> int:
    port: int = args.listen[1]
    return port


# ---- Dockerfiles ----------------------------------------------------------------------------------


@pytest.mark.parametrize("role", ROLES)
def test_each_role_image_is_debian_bookworm_with_the_project_pinned_and_runs_its_role(role: str) -> None:
    path = ROOT / "services" / role / "Dockerfile"
    stages = dockerfile_stages(path)
    for stage in stages:
        assert stage[0].split()[1] == "debian:bookworm-slim", f"{path}: {stage[0]}"
    runs = " ".join(r for s in stages for r in instructions(s, "RUN"))
    assert re.search(r"pip install -c constraints\.txt \.", runs), f"{path}: not pip install -c constraints.txt ."
    for copy in (c for s in stages for c in instructions(s, "COPY") if not c.startswith("--from")):
        for source in copy.split()[:-1]:
            assert (ROOT / source).exists(), f"{path}: COPY {source}: not in the build context"
    assert entrypoint(path) == ["kube2ipvs", role]
    assert instructions(stages[-1], "EXPOSE") == [str(DEFAULT_PORTS[role])]


@pytest.mark.parametrize("role", ROLES)
def test_role_images_run_as_root_only_where_net_admin_is_needed(role: str) -> None:
    users = instructions(dockerfile_stages(ROOT / "services" / role / "Dockerfile")[-1], "USER")
    if role in ROOT_ROLES:
        assert users == []
    else:
        assert len(users) == 1
        uid = users[0].split(":")[0]
        assert uid.isdigit(), "numeric, so runAsNonRoot can check it"
        assert int(uid) != 0


@pytest.mark.parametrize("role", ROLES)
def test_role_images_install_only_their_roles_packages(role: str) -> None:
    assert apt_packages(dockerfile_stages(ROOT / "services" / role / "Dockerfile")[-1]) == ROLE_PACKAGES[role]


def test_the_bgp_speaker_image_generates_gobgpds_api_at_build_time_without_shipping_the_tools() -> None:
    build, final = dockerfile_stages(ROOT / "services" / "bgp-speaker" / "Dockerfile")
    assert "golang-github-osrg-gobgp-dev" in apt_packages(build)
    commands = [c.strip() for run in instructions(build, "RUN") for c in run.split("&&")]
    (generate,) = [i for i, c in enumerate(commands) if "-m kube2ipvs_bgp_speaker.genproto" in c]
    # grpcio-tools either goes into a virtualenv of its own or leaves the project's after use.
    for i, command in enumerate(commands):
        if "pip install" in command and "grpcio-tools" in command and command.startswith("/opt/kube2ipvs/"):
            assert i < generate
            assert any("pip uninstall -y grpcio-tools" in c for c in commands[generate:])
    assert instructions(final, "COPY") == ["--from=build /opt/kube2ipvs /opt/kube2ipvs"]
    assert "golang-github-osrg-gobgp-dev" not in apt_packages(final)


def test_the_gobgpd_image_keeps_its_api_on_loopback() -> None:
    path = IMAGE_DOCKERFILES["kube2ipvs-gobgpd"]
    final = dockerfile_stages(path)[-1]
    assert apt_packages(final) == {"gobgpd"}
    assert instructions(final, "USER")
    assert not instructions(final, "USER")[0].startswith("0")
    cmd = json.loads(instructions(final, "CMD")[0])
    assert "--api-hosts=127.0.0.1:50051" in cmd
    assert_gobgpd_flags(cmd, str(path))


# ---- Kubernetes -----------------------------------------------------------------------------------


def test_kustomization_lists_every_manifest_and_every_listed_file_exists() -> None:
    listed = kustomization()["resources"]
    assert len(listed) == len(set(listed))
    assert all((K8S / name).is_file() for name in listed)
    present = {p.name for p in K8S.glob("*.y*ml")} - {"kustomization.yaml"}
    assert set(listed) == present


def test_the_manifests_hold_the_expected_kinds_all_in_the_load_balancers_namespace() -> None:
    kinds = Counter(o["kind"] for o in k8s_objects())
    assert kinds == Counter({
        "Namespace": 1, "ServiceAccount": 4, "ClusterRole": 1, "ClusterRoleBinding": 1, "Role": 1,
        "RoleBinding": 1, "ConfigMap": 4, "Service": 3, "StatefulSet": 1, "Deployment": 2, "DaemonSet": 2,
    })
    for o in k8s_objects():
        if o["kind"] not in ("Namespace", "ClusterRole", "ClusterRoleBinding"):
            assert o["metadata"].get("namespace") == NAMESPACE, f"{o['kind']}/{o['metadata']['name']}"
    assert kustomization()["namespace"] == NAMESPACE


def test_every_image_is_built_here_or_a_pinned_third_party_one() -> None:
    rewritten = {i["name"] for i in kustomization()["images"]}
    for w in workloads():
        for _, c in all_containers(pod_spec(w)):
            name = image_name(c["image"])
            if name in IMAGE_DOCKERFILES:
                assert IMAGE_DOCKERFILES[name].is_file()
                assert name in rewritten, f"{name}: not in kustomization.yaml's images"
            else:
                assert name in THIRD_PARTY_IMAGES, f"{c['image']}: neither built here nor known"
                assert ":" in c["image"]
                assert not c["image"].endswith(":latest")


def rbac_rules() -> Iterator[tuple[str, dict[str, Any]]]:
    for role in by_kind("ClusterRole") + by_kind("Role"):
        for rule in role["rules"]:
            yield f"{role['kind']}/{role['metadata']['name']}", rule


def test_rbac_has_no_wildcards_and_only_reads_except_events_and_the_lease() -> None:
    for where, rule in rbac_rules():
        for key in ("verbs", "resources", "apiGroups", "resourceNames"):
            assert "*" not in rule.get(key, []), f"{where}: wildcard in {key}"
        verbs = set(rule["verbs"])
        for resource in rule["resources"]:
            if resource == "events":
                assert verbs <= {"create", "patch"}, where
            elif resource == "leases":
                assert rule["apiGroups"] == ["coordination.k8s.io"]
                assert verbs <= {"get", "create", "update"}, where
                if verbs - {"create"}:
                    assert rule.get("resourceNames"), f"{where}: get/update on every Lease"
            else:
                assert verbs <= {"get", "list", "watch"}, f"{where}: {resource}: {sorted(verbs)}"
            assert resource != "secrets", where


def granted(kind: str, resource: str, group: str) -> dict[str, set[str]]:
    """verb -> resourceNames ('' = any) the watcher's roles of `kind` grant on a resource."""
    out: dict[str, set[str]] = {}
    for role in by_kind(kind):
        for rule in role["rules"]:
            if resource in rule["resources"] and group in rule["apiGroups"]:
                for verb in rule["verbs"]:
                    out.setdefault(verb, set()).update(rule.get("resourceNames") or [""])
    return out


def test_rbac_grants_the_watcher_what_it_calls_with_the_names_its_flags_use() -> None:
    args = next(a for _, role, _, a in role_containers() if role == "watcher")
    for resource, group in (("nodes", ""), ("services", ""), ("endpointslices", "discovery.k8s.io")):
        assert set(granted("ClusterRole", resource, group)) == {"list", "watch"}, resource
    assert args.configmap_namespace == args.lease_namespace == NAMESPACE
    configmaps = granted("Role", "configmaps", "")
    assert {"list", "watch"} <= set(configmaps)
    assert all(names == {args.configmap_name} for names in configmaps.values())
    assert "create" in granted("Role", "events", "")
    leases = granted("Role", "leases", "coordination.k8s.io")
    assert leases == {"create": {""}, "get": {args.lease_name}, "update": {args.lease_name}}
    # Only the watcher's service account is bound; the other roles mount no token at all.
    for binding in by_kind("RoleBinding") + by_kind("ClusterRoleBinding"):
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "kube2ipvs-watcher",
                                        "namespace": NAMESPACE}]
    for w in workloads():
        if w["metadata"]["name"] != "kube2ipvs-watcher":
            assert pod_spec(w).get("automountServiceAccountToken") is False, w["metadata"]["name"]


def test_every_role_container_runs_its_role_with_flags_its_parser_accepts() -> None:
    seen = Counter(role for _, role, _, _ in role_containers())
    assert seen == Counter(ROLES)


def test_role_probes_hit_healthz_on_the_port_the_role_listens_on() -> None:
    for workload, role, c, args in role_containers():
        port = listen_port(args)
        where = f"{workload}/{c['name']}"
        assert port == DEFAULT_PORTS[role], where
        assert [p["containerPort"] for p in c["ports"]] == [port], where
        ready = c["readinessProbe"]["httpGet"]
        assert (ready["path"], ready["port"]) == ("/healthz", port), where
        live = c.get("livenessProbe")
        if live is not None:
            assert (live.get("httpGet") or live["tcpSocket"])["port"] == port, where
            assert live.get("httpGet", {}).get("path", "/healthz") == "/healthz", where
    for w in workloads():  # every other container with an HTTP probe: a health endpoint too
        for _, c in all_containers(pod_spec(w)):
            for probe in ("readinessProbe", "livenessProbe"):
                if "httpGet" in c.get(probe, {}) and image_name(c["image"]) != "busybox":
                    assert c[probe]["httpGet"]["path"].startswith("/healthz"), c["name"]


def test_containers_drop_every_capability_but_their_roles_and_only_node_agents_run_as_root() -> None:
    roles = {(w, c["name"]): role for w, role, c, _ in role_containers()}
    for w in workloads():
        name, spec = w["metadata"]["name"], pod_spec(w)
        pod_sc = spec.get("securityContext", {})
        for init, c in all_containers(spec):
            sc, where = c.get("securityContext", {}), f"{name}/{c['name']}"
            if init:  # one-shot sysctl writers: fixed shell text, no role, nothing else
                assert c["name"] == "host-sysctls", where
                assert c["command"][:2] == ["/bin/sh", "-c"], where
                assert spec.get("hostNetwork") is True, where
                continue
            assert sc.get("privileged", False) is False, where
            assert sc.get("allowPrivilegeEscalation") is False, where
            assert sc.get("readOnlyRootFilesystem") is True, where
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], where
            role = roles.get((name, c["name"]))
            allowed = ROLE_CAPS[role] if role else set()
            assert set(sc["capabilities"].get("add", [])) == allowed, where
            non_root = sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot"))
            if role in ROOT_ROLES:
                assert sc.get("runAsUser") == 0, where
            else:
                assert non_root is True, where
                assert sc.get("runAsUser", pod_sc.get("runAsUser", 0)) != 0, where
        if spec.get("hostNetwork"):
            assert {roles.get((name, c["name"])) for c in spec["containers"]} & ROOT_ROLES, name
            assert spec.get("dnsPolicy") == "ClusterFirstWithHostNet", name


def test_the_watcher_runs_two_replicas_that_elect_a_leader_and_add_the_unicorns_service() -> None:
    watcher = one("Deployment", "kube2ipvs-watcher")
    assert watcher["spec"]["replicas"] == 2
    assert pod_spec(watcher)["serviceAccountName"] == "kube2ipvs-watcher"
    args = next(a for _, role, _, a in role_containers() if role == "watcher")
    assert args.leader_elect is True
    assert args.source == "kubernetes"
    assert args.identity == "pod-0", "each replica its own identity (the pod name)"
    one("ConfigMap", args.configmap_name)
    namespace, rest = args.default_service.split("/")
    service, port_name = rest.split(":")
    unicorns = one("Service", service)
    assert unicorns["metadata"]["namespace"] == namespace
    assert {"name": port_name, "port": args.default_port} == {
        k: v for k, v in unicorns["spec"]["ports"][0].items() if k in ("name", "port")}
    assert args.default_port == 70
    pods = one("Deployment", service)
    assert pods["spec"]["selector"]["matchLabels"] == unicorns["spec"]["selector"]


def test_directors_run_with_their_speaker_and_gobgpd_on_labelled_hosts_sharing_one_name() -> None:
    ds = one("DaemonSet", "kube2ipvs-director")
    spec = pod_spec(ds)
    assert spec["hostNetwork"] is True
    assert spec["nodeSelector"] == {"kube2ipvs.io/director": "true"}
    assert [c["name"] for c in spec["containers"]] == ["director", "bgp-speaker", "gobgpd"]
    parsed = {role: a for w, role, _, a in role_containers() if w == "kube2ipvs-director"}
    assert parsed["director"].mode == "bgp"
    assert parsed["director"].host_name == parsed["bgp-speaker"].host_name
    gobgpd = spec["containers"][2]
    assert f"--api-hosts={parsed['bgp-speaker'].gobgpd}" in gobgpd["args"]
    assert parsed["bgp-speaker"].local_as is not None
    assert parsed["bgp-speaker"].peer
    assert parsed["bgp-speaker"].bgp_port == -1, "gobgpd runs without NET_BIND_SERVICE"
    state = {m["mountPath"]: m["name"] for m in spec["containers"][0]["volumeMounts"]}
    assert Path(parsed["director"].state_file).parent == Path("/run/kube2ipvs")
    assert state["/run/kube2ipvs"] in {v["name"] for v in spec["volumes"] if "hostPath" in v}
    assert_gobgpd_flags(gobgpd["args"], "director.yaml gobgpd")  # last: skipped without gobgpd


def test_realservers_take_their_node_name_from_the_pod_spec() -> None:
    spec = pod_spec(one("DaemonSet", "kube2ipvs-realserver"))
    assert spec["hostNetwork"] is True
    (c,) = spec["containers"]
    env = {e["name"]: e for e in c["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert "--node=$(NODE_NAME)" in c["args"]


def test_every_role_reaches_nats_through_its_service() -> None:
    service = one("Service", "nats")
    port = service["spec"]["ports"][0]["port"]
    for workload, role, _, args in role_containers():
        assert args.nats == [f"nats://nats.{NAMESPACE}.svc:{port}"], f"{workload}/{role}"
    conf = one("ConfigMap", "nats")["data"]["nats.conf"]
    assert re.search(r"^\s*jetstream\s*\{", conf, re.MULTILINE)
    assert re.search(rf"^\s*port:\s*{port}\s*$", conf, re.MULTILINE)


def test_the_lb_configmap_example_is_a_valid_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["validate-config", str(K8S / "lb-config.yaml")]) == 0, capsys.readouterr().err


def test_kustomize_builds_the_manifests_with_every_image_rewritten() -> None:
    done = subprocess.run([tool("kubectl"), "kustomize", str(K8S)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    images = re.findall(r"^\s*image:\s*(\S+)", done.stdout, re.MULTILINE)
    assert images
    assert not [i for i in images if i.split(":")[0] in IMAGE_DOCKERFILES]


def test_nats_server_accepts_the_nats_config(tmp_path: Path) -> None:
    conf = one("ConfigMap", "nats")["data"]["nats.conf"].replace("/data", str(tmp_path / "data"))
    (tmp_path / "nats.conf").write_text(conf)
    done = subprocess.run([tool("nats-server"), "-c", str(tmp_path / "nats.conf"), "-t"], capture_output=True,
                          text=True, check=False, env={**os.environ, "POD_NAME": "nats-0"})
    assert done.returncode == 0, done.stderr


# ---- docker-compose -------------------------------------------------------------------------------


def test_every_compose_build_names_an_existing_dockerfile_in_the_repository_context() -> None:
    services = compose()["services"]
    built = {s["image"] for s in services.values() if "build" in s}
    for name, service in services.items():
        if "build" in service:
            build = service["build"]
            assert build["context"] == ".", name
            assert (ROOT / build["dockerfile"]).is_file(), f"{name}: {build['dockerfile']}"
        else:
            assert service["image"] in built or image_name(service["image"]) in THIRD_PARTY_IMAGES, name


def test_every_compose_role_service_runs_flags_its_roles_parser_accepts() -> None:
    services = compose()["services"]
    roles: Counter[str] = Counter()
    for name, service in services.items():
        role = compose_role(service)
        if role is None:
            continue
        roles[role] += 1
        env = {k: str(v) for k, v in (service.get("environment") or {}).items()}
        args = parse_role_args(role, [str(a) for a in service.get("command", [])], env)
        assert listen_port(args) == DEFAULT_PORTS[role], name
        nats_ip = services["nats"]["networks"]["fabric"]["ipv4_address"]
        assert args.nats == [f"nats://{nats_ip}:4222"], name
    assert roles == Counter({"watcher": 1, "director": 2, "bgp-speaker": 2, "realserver": 3})


def test_compose_speakers_share_their_directors_namespace_name_and_address_and_peer_with_the_tor() -> None:
    services = compose()["services"]
    tor = services["tor"]["networks"]["fabric"]["ipv4_address"]
    frr = (ROOT / "deploy" / "frr" / "frr.conf").read_text()
    frr_neighbors = set(re.findall(r"^\s*neighbor (\d+\.\d+\.\d+\.\d+) peer-group", frr, re.MULTILINE))
    directors: set[str] = set()
    for name, service in services.items():
        if compose_role(service) != "bgp-speaker":
            continue
        mode = service["network_mode"]
        assert mode.startswith("service:"), name
        director = services[mode.removeprefix("service:")]
        assert compose_role(director) == "director", name
        d_args = parse_role_args("director", director["command"])
        s_args = parse_role_args("bgp-speaker", service["command"])
        address = director["networks"]["fabric"]["ipv4_address"]
        directors.add(address)
        assert s_args.host_name == d_args.host_name, name
        assert s_args.router_id == address, name
        assert [a for a, _ in s_args.peer] == [tor], name
        assert s_args.bgp_port == -1, f"{name}: gobgpd runs without NET_BIND_SERVICE"
        asn = re.search(r"remote-as (\d+)", frr)
        assert asn is not None, "frr.conf: no remote-as"
        assert int(asn.group(1)) == s_args.local_as, name
        assert re.search(rf"^router bgp {s_args.peer[0][1]}$", frr, re.MULTILINE), name
        gobgpd = [s for s in services.values() if s.get("network_mode") == mode and "gobgpd" in s["image"]]
        assert len(gobgpd) == 1, f"{name}: one gobgpd in {mode}"
        assert f"127.0.0.1:{s_args.gobgpd.rsplit(':', 1)[1]}" == s_args.gobgpd
    assert directors == frr_neighbors


def test_compose_runs_the_labs_nodes_directors_router_and_default_service() -> None:
    """The compose lab and `kube2ipvs lab` read the same lab/cluster/: same names, same addresses."""
    labplan = pytest.importorskip("kube2ipvs.labplan")
    cluster = ROOT / "lab" / "cluster"
    objects = [o for p in sorted(cluster.glob("*.y*ml")) for o in load_objects_text(p.read_bytes(), source=str(p))]
    nodes, _ = parse_nodes(o for o in objects if o.get("kind") == "Node")
    services = compose()["services"]
    agents = {}
    for name, service in services.items():
        role = compose_role(service)
        if role == "realserver":
            agents[parse_role_args(role, service["command"]).node] = service["networks"]["fabric"]["ipv4_address"]
        elif role == "director":
            args = parse_role_args(role, service["command"])
            assert labplan.DIRECTORS[args.host_name] == service["networks"]["fabric"]["ipv4_address"], name
        elif role == "watcher":
            args = parse_role_args(role, service["command"])
            assert args.default_service == labplan.DEFAULT_SERVICE
            assert (args.configmap_namespace, args.configmap_name) == labplan.CONFIGMAP
    assert agents == {n.name: n.address(4) for n in nodes}
    assert services["tor"]["networks"]["fabric"]["ipv4_address"] == labplan.ROUTER
    assert services["client"]["networks"]["clients"]["ipv4_address"] == labplan.CLIENT
    assert services["tor"]["networks"]["clients"]["ipv4_address"] == labplan.CLIENT_GATEWAY
    assert services["nats"]["networks"]["fabric"]["ipv4_address"] == labplan.CTL
    frr = (ROOT / "deploy" / "frr" / "frr.conf").read_text()
    assert f"router bgp {labplan.ROUTER_AS}\n" in frr
    assert f"remote-as {labplan.DIRECTOR_AS}\n" in frr


def test_compose_node_agents_add_only_their_capabilities_and_mounted_files_exist() -> None:
    for name, service in compose()["services"].items():
        role = compose_role(service)
        if role is not None:
            assert service.get("cap_drop") == ["ALL"], name
            assert set(service.get("cap_add", [])) == ROLE_CAPS[role], name
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./") and not source.startswith("./lab/"):  # lab/ is the lab's own
                assert (ROOT / source).exists(), f"{name}: {source}"


def test_the_compose_demo_pods_serve_this_nodes_ready_endpoints(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    spec = importlib.util.spec_from_file_location("demo_pods", ROOT / "deploy" / "compose" / "demo_pods.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "demo_pods", module)  # its dataclasses resolve their module
    spec.loader.exec_module(module)
    (tmp_path / "slices.yaml").write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": [{
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
        "metadata": {"name": "web-1", "namespace": "shop", "labels": {"kubernetes.io/service-name": "web"}},
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}, {"name": "dns", "port": 53, "protocol": "UDP"}],
        "endpoints": [
            {"addresses": ["10.0.1.11"], "nodeName": "node-a", "conditions": {"ready": True}},
            {"addresses": ["10.0.1.12"], "nodeName": "node-a", "conditions": {"ready": False}},
            {"addresses": ["10.0.2.11"], "nodeName": "node-b", "conditions": {"ready": True}},
        ]}]}))
    found = [(x.address, x.port, x.protocol) for x in module.listeners(tmp_path, "node-a")]
    assert found == [("10.0.1.11", 53, "UDP"), ("10.0.1.11", 8080, "TCP")]


def test_compose_gobgpd_and_frr_configs_are_accepted_by_the_real_tools(tmp_path: Path) -> None:
    for name, service in compose()["services"].items():
        if "gobgpd" in service["image"] and "command" in service:
            assert_gobgpd_flags(service["command"], name)
    done = subprocess.run([tool("vtysh"), "-C", "-f", str(ROOT / "deploy" / "frr" / "frr.conf")],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


# ---- systemd --------------------------------------------------------------------------------------


def unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    sections: dict[str, list[tuple[str, str]]] = {}
    current = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = line.strip("[]")
            sections.setdefault(current, [])
            continue
        key, _, value = line.partition("=")
        sections[current].append((key.strip(), value.strip()))
    return sections


def values(sections: Mapping[str, list[tuple[str, str]]], key: str, section: str = "Service") -> list[str]:
    return [v for k, v in sections.get(section, []) if k == key]


def env_file() -> dict[str, str]:
    env = {}
    for raw in (SYSTEMD / "kube2ipvs.default").read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key] = value
    return env


SYSTEMD_ROLES = {"kube2ipvs-director.service": "director", "kube2ipvs-bgp-speaker.service": "bgp-speaker"}


@pytest.mark.parametrize(("name", "role"), sorted(SYSTEMD_ROLES.items()))
def test_systemd_units_start_their_role_with_flags_its_parser_accepts(name: str, role: str) -> None:
    sections = unit(SYSTEMD / name)
    assert values(sections, "EnvironmentFile") == ["/etc/default/kube2ipvs"]
    env = env_file()
    (start,) = values(sections, "ExecStart")
    for braced, bare in _SYSTEMD_REF.findall(start):
        assert (braced or bare) in env, f"{name}: ${braced or bare} is not in kube2ipvs.default"
    words = shlex.split(_SYSTEMD_REF.sub(lambda m: env[m.group(1) or m.group(2)], start))
    assert words[:2] == ["/opt/kube2ipvs/bin/kube2ipvs", role]
    args = parse_role_args(role, words[2:], env)
    assert listen_port(args) == DEFAULT_PORTS[role]
    assert args.nats
    assert args.nats[0].startswith("nats://")


def test_systemd_units_are_hardened_as_far_as_each_role_allows() -> None:
    common = {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
              "ProtectKernelModules": "yes", "RestrictNamespaces": "yes", "SystemCallArchitectures": "native"}
    director = unit(SYSTEMD / "kube2ipvs-director.service")
    speaker = unit(SYSTEMD / "kube2ipvs-bgp-speaker.service")
    gobgpd = unit(SYSTEMD / "gobgpd.service.d" / "kube2ipvs.conf")
    for sections in (director, speaker, gobgpd):
        for key, value in common.items():
            assert values(sections, key) == [value], key
    assert set(values(director, "CapabilityBoundingSet")[0].split()) == {"CAP_NET_ADMIN", "CAP_NET_RAW"}
    assert values(director, "RuntimeDirectoryPreserve") == ["yes"], "the director's state outlives a restart"
    assert values(speaker, "CapabilityBoundingSet") == [""]
    assert values(speaker, "DynamicUser") == ["yes"]
    assert values(speaker, "ProtectKernelTunables") == ["yes"]
    assert values(gobgpd, "CapabilityBoundingSet") == ["CAP_NET_BIND_SERVICE"]
    assert "gobgpd.service" in values(speaker, "After", "Unit")[0].split()


def test_gobgpds_drop_in_keeps_its_api_on_loopback_and_the_speaker_uses_that_address() -> None:
    gobgpd = unit(SYSTEMD / "gobgpd.service.d" / "kube2ipvs.conf")
    starts = values(gobgpd, "ExecStart")
    assert starts[0] == "", "resets Debian's ExecStart"
    words = shlex.split(starts[1])
    assert "--api-hosts=127.0.0.1:50051" in words
    (start,) = values(unit(SYSTEMD / "kube2ipvs-bgp-speaker.service"), "ExecStart")
    assert "--gobgpd=127.0.0.1:50051" in start.split()
    assert_gobgpd_flags(words, "gobgpd drop-in")  # last: skipped without gobgpd


def test_gobgpd_accepts_the_example_config() -> None:
    done = subprocess.run([tool("gobgpd"), "-f", str(SYSTEMD / "gobgpd.conf.example"), "-d"],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_systemd_analyze_verifies_the_units(tmp_path: Path) -> None:
    analyze = tool("systemd-analyze")
    kube2ipvs = shutil.which("kube2ipvs") or str(ROOT / ".venv" / "bin" / "kube2ipvs")
    if not Path(kube2ipvs).is_file():
        pytest.skip("no kube2ipvs executable to stand in for /opt/kube2ipvs/bin/kube2ipvs")
    for name in SYSTEMD_ROLES:  # the install path replaced by one that exists here
        text = (SYSTEMD / name).read_text().replace("/opt/kube2ipvs/bin/kube2ipvs", kube2ipvs)
        (tmp_path / name).write_text(text)
    units = [str(tmp_path / name) for name in SYSTEMD_ROLES]
    vendor = Path("/lib/systemd/system/gobgpd.service")
    if vendor.is_file():  # Debian's gobgpd unit with our drop-in
        shutil.copy(vendor, tmp_path / "gobgpd.service")
        (tmp_path / "gobgpd.service.d").mkdir()
        shutil.copy(SYSTEMD / "gobgpd.service.d" / "kube2ipvs.conf", tmp_path / "gobgpd.service.d")
        units.append(str(tmp_path / "gobgpd.service"))
    done = subprocess.run([analyze, "verify", *units], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert not (done.stdout + done.stderr).strip(), "systemd-analyze warns"
