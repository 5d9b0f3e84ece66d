"""What `kube2ipvs collect` concludes from the answers of every instance: pure, no I/O.

The troubleshooting guide's "rules should be identical across all BGP directors", done without
ssh: each director's `/config?format=ipvsadm` (the owned services it holds, canonical and sorted)
is compared with a reference, and every director that differs is reported with a unified diff.
The reference is, in order: the rules a strict majority of the directors hold; else the desired
rules, when every director that answered wants the same ones; else the rules of the director with
the newest applied generation (a director that missed an update is the one behind).

Fetching (aiohttp) and discovery through Kubernetes live in `collectcmd`; this module turns the
raw answers (`Fetched`) into a `Report` and renders it as a table or JSON.
"""

from __future__ import annotations

import difflib
import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final

ROLES: Final = ("watcher", "director", "bgp-speaker", "realserver")
# roleargs.DEFAULT_PORTS, repeated because roleargs imports the NATS client (a test keeps them equal).
DEFAULT_PORTS: Final = {"watcher": 9871, "director": 9872, "bgp-speaker": 9873, "realserver": 9874}
# Repairs a director's resync made without a change of the desired state: someone changed its
# rules by hand. A director reports the rules of its last reconcile, so a hand-made change shows
# in the comparison only if it is not repaired; this count is its trace once it is.
DRIFT_REPAIRS: Final = "kube2ipvs_director_drift_repairs_total"
_ROLE_ORDER: Final = {role: i for i, role in enumerate(("director", "bgp-speaker", "realserver", "watcher"))}


@dataclass(frozen=True, slots=True, order=True)
class Target:
    host: str
    port: int
    role: str | None = None  # known from Kubernetes; else learned from /config
    name: str = ""  # the pod, when found through Kubernetes

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_target(text: str) -> Target:
    """`HOST:PORT` or `[V6]:PORT`; ValueError with a readable message otherwise."""
    host, sep, port = text.strip().rpartition(":")
    host = host.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"{text!r}: write an IPv6 address as [ADDRESS]:PORT")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{text!r} is not HOST:PORT")
    return Target(host, int(port))


def parse_targets(text: str) -> tuple[Target, ...]:
    targets = [parse_target(t) for t in text.split(",") if t.strip()]
    if not targets:
        raise ValueError("no HOST:PORT given")
    return tuple(dict.fromkeys(targets))


def _listen_port(args: Sequence[str]) -> int | None:
    """The port of `--listen HOST:PORT` / `--listen=HOST:PORT` (HOST may be `$(HOST_IP)`)."""
    for i, arg in enumerate(args):
        value = arg.partition("=")[2] if arg.startswith("--listen=") else (
            args[i + 1] if arg == "--listen" and i + 1 < len(args) else None)
        if value is not None:
            port = value.rpartition(":")[2]
            if port.isdigit() and 1 <= int(port) <= 65535:
                return int(port)
    return None


def _env_port(container: Mapping[str, Any]) -> int | None:
    for env in container.get("env") or ():
        if isinstance(env, Mapping) and env.get("name") == "KUBE2IPVS_LISTEN" and isinstance(env.get("value"), str):
            return _listen_port(["--listen", env["value"]])
    return None


def targets_from_pods(pods: Iterable[Mapping[str, Any]]) -> tuple[list[Target], list[str]]:
    """The targets of running pods (raw Pod objects, as the API serves them): one per container
    whose name or command names a role, at the pod IP and the port of its `--listen` flag (or
    KUBE2IPVS_LISTEN, else the role's default). Also notes on the pods left out, and why."""
    targets: list[Target] = []
    notes: list[str] = []
    for pod in pods:
        meta, spec, status = (pod.get(k) or {} for k in ("metadata", "spec", "status"))
        name = f"{meta.get('namespace', '')}/{meta.get('name', '?')}"
        ip = status.get("podIP")
        if status.get("phase", "Running") != "Running":
            notes.append(f"{name}: not running ({status.get('phase')})")
            continue
        if not ip:
            notes.append(f"{name}: no pod IP ({status.get('phase', 'unknown phase')})")
            continue
        found = False
        for container in spec.get("containers") or ():
            words = [str(w) for w in (*(container.get("command") or ()), *(container.get("args") or ()))]
            role = container.get("name") if container.get("name") in ROLES else next(
                (w for w in words if w in ROLES), None)
            if role is None:
                continue
            port = _listen_port(words) or _env_port(container) or DEFAULT_PORTS[role]
            targets.append(Target(str(ip), port, role, name))
            found = True
        if not found:
            notes.append(f"{name}: no container of a kube2ipvs role")
    return sorted(set(targets)), notes


@dataclass(frozen=True, slots=True)
class Fetched:
    """What one target answered. `error` when it could not be asked at all (unreachable,
    timeout, not a kube2ipvs service); `config` and `health` are the JSON documents."""

    target: Target
    error: str | None = None
    config: Mapping[str, Any] | None = None
    health: Mapping[str, Any] | None = None
    health_status: int | None = None
    ipvsadm: str | None = None  # directors: the owned services the kernel holds
    ipvsadm_problem: str | None = None  # why there is no ipvsadm text ("not reconciled yet")
    desired: str | None = None  # directors: the services they want
    drift_repairs: float | None = None  # directors: DRIFT_REPAIRS from /metrics


@dataclass(frozen=True, slots=True)
class Instance:
    address: str
    role: str
    node: str | None
    healthy: bool | None  # None: never answered
    reason: str
    generation: int | None
    counts: Mapping[str, int]
    error: str | None
    rules_differ: bool = False
    drift_repairs: int | None = None

    def as_json(self) -> dict[str, Any]:
        return {"address": self.address, "role": self.role, "node": self.node, "healthy": self.healthy,
                "reason": self.reason or None, "generation": self.generation, "counts": dict(self.counts),
                "error": self.error, "rules_differ": self.rules_differ, "drift_repairs": self.drift_repairs}


@dataclass(frozen=True, slots=True)
class RulesDiff:
    address: str
    reference: str  # what the rules were compared with, in words
    diff: tuple[str, ...]  # unified diff lines, reference first


@dataclass(frozen=True, slots=True)
class Report:
    instances: tuple[Instance, ...]
    diffs: tuple[RulesDiff, ...] = ()
    reference: str | None = None  # None: fewer than two directors' rules to compare
    problems: tuple[str, ...] = field(default=())
    notes: tuple[str, ...] = field(default=())  # worth knowing, not wrong now

    @property
    def ok(self) -> bool:
        return bool(self.instances) and not self.problems

    def exit_code(self) -> int:
        return 0 if self.ok else 1


def rule_lines(text: str) -> tuple[str, ...]:
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _generation(f: Fetched) -> int | None:
    for doc in (f.config, f.health):
        for key in ("generation_applied", "generation"):
            if doc is not None and (g := _int(doc.get(key))) is not None:
                return g
    return None


def _counts(role: str, f: Fetched) -> dict[str, int]:
    config = f.config or {}
    counts: dict[str, int] = {}
    if role == "director":
        if f.ipvsadm is not None:
            lines = rule_lines(f.ipvsadm)
            counts["services"] = sum(1 for line in lines if line.startswith("-A "))
            counts["real_servers"] = sum(1 for line in lines if line.startswith("-a "))
        elif (n := _int(config.get("virtual_services"))) is not None:
            counts["services"] = n
    elif role == "realserver":
        if (n := _int(config.get("services"))) is not None:
            counts["services"] = n
        if isinstance(config.get("vips"), list):
            counts["vips"] = len(config["vips"])
    elif role == "bgp-speaker":
        if isinstance(config.get("routes"), list):
            counts["routes"] = len(config["routes"])
    elif role == "watcher":
        state = config.get("state")
        if isinstance(state, Mapping):
            for key in ("services", "endpoints", "nodes"):
                if (n := _int(state.get(key))) is not None:
                    counts[key] = n
    return counts


def _node(f: Fetched) -> str | None:
    config = f.config or {}
    settings = config["settings"] if isinstance(config.get("settings"), Mapping) else {}
    for value in (config.get("node"), settings.get("host_name"), settings.get("node")):
        if isinstance(value, str) and value:
            return value
    return f.target.name or None


def _instance(f: Fetched) -> Instance:
    role = f.target.role or "unknown"
    if f.config is not None and isinstance(f.config.get("role"), str):
        role = f.config["role"]
    if f.error is not None:
        return Instance(f.target.address, role, f.target.name or None, None, "", None, {}, f.error)
    healthy: bool | None = None
    reason = ""
    if f.health is not None and isinstance(f.health.get("ok"), bool):
        healthy = f.health["ok"]
        reason = str(f.health.get("reason") or "")
    elif f.health_status is not None:
        healthy, reason = False, f"/healthz answered {f.health_status} without a health document"
    drift = None if f.drift_repairs is None else int(f.drift_repairs)
    return Instance(f.target.address, role, _node(f), healthy, reason, _generation(f), _counts(role, f), None,
                    drift_repairs=drift)


def metric_value(text: str, name: str) -> float | None:
    """The value of the unlabelled sample `name` in a Prometheus text exposition."""
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == name:
            try:
                return float(value.split()[0])
            except (ValueError, IndexError):
                return None
    return None


def _choose_reference(directors: Sequence[tuple[Fetched, tuple[str, ...]]]) -> tuple[tuple[str, ...], str]:
    """The rules every director is compared with, and how they were chosen (see the module doc)."""
    tally = Counter(lines for _, lines in directors)
    (top, count), = tally.most_common(1)
    if count * 2 > len(directors):
        return top, f"the majority ({count} of {len(directors)} directors)"
    desired = {rule_lines(f.desired) for f, _ in directors if f.desired is not None}
    if len(desired) == 1:
        return desired.pop(), "the desired rules (every director wants the same)"
    # max() keeps the first of equals: the lowest address, as the directors come sorted.
    newest = max(directors, key=lambda d: (-1 if (g := _generation(d[0])) is None else g, tally[d[1]]))
    generation = _generation(newest[0])
    return newest[1], (f"{newest[0].target.address}, the newest applied generation ({generation})"
                       if generation is not None else f"{newest[0].target.address} (no majority, no generation)")


def build_report(fetched: Iterable[Fetched]) -> Report:
    pairs = sorted(((f, _instance(f)) for f in fetched), key=lambda p: (_ROLE_ORDER.get(p[1].role, 9), p[0].target))
    answers, instances = [f for f, _ in pairs], [i for _, i in pairs]
    problems: list[str] = []
    for inst in instances:
        if inst.error is not None:
            problems.append(f"{inst.address} ({inst.role}): {inst.error}")
        elif inst.healthy is None:
            problems.append(f"{inst.address} ({inst.role}): health unknown")
        elif not inst.healthy:
            problems.append(f"{inst.address} ({inst.role}): unhealthy: {inst.reason or 'no reason given'}")
    notes = tuple(f"{i.address} (director): repaired {i.drift_repairs} change{'s' * (i.drift_repairs != 1)} "
                  "made by hand since it started" for i in instances if i.drift_repairs)
    directors = [(f, rule_lines(f.ipvsadm)) for f, inst in zip(answers, instances, strict=True)
                 if inst.role == "director" and f.error is None and f.ipvsadm is not None]
    for f, inst in zip(answers, instances, strict=True):
        if inst.role == "director" and f.error is None and f.ipvsadm is None:
            problems.append(f"{inst.address} (director): no rules to compare: {f.ipvsadm_problem or 'not served'}")
    if len(directors) < 2:
        return Report(tuple(instances), (), None, tuple(problems), notes)
    reference, how = _choose_reference(directors)
    diffs: list[RulesDiff] = []
    differing: set[str] = set()
    for f, lines in directors:
        if lines == reference:
            continue
        diff = difflib.unified_diff(reference, lines, fromfile="reference", tofile=f.target.address, lineterm="", n=2)
        diffs.append(RulesDiff(f.target.address, how, tuple(diff)))
        differing.add(f.target.address)
        added = len(set(lines) - set(reference))
        removed = len(set(reference) - set(lines))
        problems.append(f"{f.target.address} (director): rules differ from {how}: {removed} missing, {added} extra")
    instances = [replace(i, rules_differ=i.address in differing) for i in instances]
    return Report(tuple(instances), tuple(diffs), how, tuple(problems), notes)


# ---------------------------------------------------------------------------------------------
# rendering


def _health_cell(inst: Instance) -> str:
    if inst.error is not None:
        return "unreachable" if not inst.error.startswith("timeout") else "timeout"
    if inst.healthy is None:
        return "unknown"
    return "ok" if inst.healthy else "UNHEALTHY"


def render_table(report: Report) -> str:
    head = ("ROLE", "ADDRESS", "NODE", "HEALTH", "GENERATION", "RULES", "")
    rows = [head] + [(
        i.role, i.address, i.node or "-", _health_cell(i), "-" if i.generation is None else str(i.generation),
        " ".join(f"{k}={v}" for k, v in i.counts.items()) or "-", "RULES DIFFER" if i.rules_differ else "",
    ) for i in report.instances]
    widths = [max(len(r[c]) for r in rows) for c in range(len(head))]
    out = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    for d in report.diffs:
        out += ["", f"director {d.address}: rules differ from {d.reference}:", *d.diff]
    if report.notes:
        out += ["", "notes:", *(f"  {n}" for n in report.notes)]
    if report.problems:
        out += ["", "problems:", *(f"  {p}" for p in report.problems)]
    directors = sum(1 for i in report.instances if i.role == "director")
    if report.ok:
        agree = f", {directors} directors hold the same rules" if report.reference else ""
        out += ["", f"ok: {len(report.instances)} instances healthy{agree}"]
    elif not report.instances:
        out += ["", "no instances found"]
    else:
        out += ["", f"{len(report.problems)} problem{'s' * (len(report.problems) != 1)}"]
    return "\n".join(out) + "\n"


def render_json(report: Report) -> str:
    return json.dumps({
        "ok": report.ok,
        "instances": [i.as_json() for i in report.instances],
        "directors": {
            "reference": report.reference,
            "differ": [{"address": d.address, "reference": d.reference, "diff": "\n".join(d.diff) + "\n"}
                       for d in report.diffs],
        },
        "problems": list(report.problems),
        "notes": list(report.notes),
    }, indent=2) + "\n"
