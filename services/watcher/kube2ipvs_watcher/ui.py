"""The watcher's status page (`GET /ui`): a page model in, one HTML document out. Pure.

No clock (the caller passes `now`), no I/O, no external assets: inline CSS, no scripts, and a
Content-Security-Policy that forbids loading anything, so the page works from an air-gapped
browser and cannot be made to fetch or run anything. Every value from the cluster, the LB
config or the status board is escaped (`html.escape`): names come from Kubernetes objects and
status documents this process does not control.

The page shows VIPs -> ports -> services -> nodes (weights) -> pods, every role's health and
applied generation as published on the NATS status board, and the recent config rejections.
Rows beyond `max_rows` backends are summarized rather than drawn: at cluster scale (10,000
VIP:ports) the full tree is for `/config?format=json`, not for a browser refreshing every 5 s.
"""

from __future__ import annotations

import html
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from kube2ipvs.model import Backend, ClusterState, VirtualService, hostport

REFRESH_SECONDS: Final = 5
ROLES: Final = ("director", "bgp-speaker", "realserver")  # the roles expected on the status board
MAX_ROWS: Final = 5000


@dataclass(frozen=True, slots=True)
class Member:
    """One role instance's status: the watcher itself, or a document on the status board."""

    role: str
    host: str
    healthy: bool | None  # None: the document does not say
    reason: str
    generation: int | None
    content_hash: str | None
    age: float | None  # seconds since it was published
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Rejection:
    at: float  # unix time
    kind: str  # "rejected" or "held"
    reason: str
    errors: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class StatusPage:
    now: float  # unix time of the rendering
    watcher: Member
    state: ClusterState | None  # the state last published (None: nothing yet)
    members: tuple[Member, ...]  # from the status board, sorted by role and host
    board_error: str | None  # why the status board could not be read (None: it was)
    rejections: tuple[Rejection, ...]  # newest first
    config_problem: str = ""  # the LB config currently rejected or held ("" when none)


def members_from_board(docs: Mapping[str, Mapping[str, Any]], now: float) -> tuple[Member, ...]:
    """Status board documents (key `role.host`) as members. Fields that are missing or of the
    wrong type show as unknown rather than failing the page."""
    out: list[Member] = []
    for key, doc in docs.items():
        role, _, host = key.partition(".")
        role, host = _str(doc.get("role")) or role, _str(doc.get("host")) or host  # keys carry "_" for "."
        healthy = doc.get("healthy")
        at = doc.get("at")
        generation = doc.get("generation")
        vips = doc.get("vips")
        detail = ", ".join(part for part in (
            f"mode {_str(doc.get('mode'))}" if doc.get("mode") is not None else "",
            ("active" if doc.get("active") else "standby") if isinstance(doc.get("active"), bool) else "",
            f"{len(vips)} VIPs" if isinstance(vips, list) else "",
        ) if part)
        out.append(Member(
            role=role, host=host,
            healthy=healthy if isinstance(healthy, bool) else None,
            reason=_str(doc.get("reason")),
            generation=generation if isinstance(generation, int) and not isinstance(generation, bool) else None,
            content_hash=_str(doc.get("content_hash")) or None,
            age=max(0.0, now - at) if isinstance(at, int | float) and not isinstance(at, bool) else None,
            detail=detail,
        ))
    return tuple(sorted(out, key=lambda m: (m.role, m.host)))


def _str(value: object) -> str:
    return value if isinstance(value, str) else ""


def e(value: object) -> str:
    return html.escape(str(value), quote=True)


_CSS: Final = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#1d2733;background:#f7f8fa}
h1{font-size:1.4em;margin:0 0 .2em}h2{font-size:1.15em;margin:1.4em 0 .4em}
table{border-collapse:collapse;background:#fff;margin:.3em 0 1em;min-width:50%}
th,td{border:1px solid #d5dae1;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#eef1f5}code{font:12px ui-monospace,monospace}
.ok{color:#17663a;font-weight:600}.bad{color:#b3261e;font-weight:600}.warn{color:#8a5a00;font-weight:600}
.muted{color:#6b7785}.vip{border-left:4px solid #3a6ea5;padding-left:.8em}
nav a{margin-right:.8em}ul{margin:.2em 0}
"""


def render(page: StatusPage, *, max_rows: int = MAX_ROWS) -> str:
    state = page.state
    parts = [
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">",
        f"<meta http-equiv=\"refresh\" content=\"{REFRESH_SECONDS}\">",
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">",
        "<title>kube2ipvs status</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>kube2ipvs status</h1>",
        f"<p class=\"muted\">rendered {e(_utc(page.now))}; refreshes every {REFRESH_SECONDS} s</p>",
        *_summary(page),
        *_members(page),
        *_rejections(page),
    ]
    if state is None:
        parts.append("<h2>VIPs</h2><p class=\"warn\">no cluster state published yet (a standby replica "
                     "publishes nothing: see the leader's page)</p>")
    else:
        parts += _vips(state, max_rows)
        parts += _nodes(state)
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _utc(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(at))


def _health(healthy: bool | None, reason: str) -> str:
    if healthy is None:
        return "<span class=\"muted\">unknown</span>"
    if healthy:
        return "<span class=\"ok\">healthy</span>"
    return f"<span class=\"bad\">unhealthy</span>{': ' + e(reason) if reason else ''}"


def _summary(page: StatusPage) -> list[str]:
    w, state = page.watcher, page.state
    rows = [
        ("watcher", f"{e(w.host)} — {_health(w.healthy, w.reason)}{' — ' + e(w.detail) if w.detail else ''}"),
        ("generation", e(w.generation if w.generation is not None else "none")),
        ("content hash", f"<code>{e(w.content_hash or 'none')}</code>"),
    ]
    if page.config_problem:
        rows.append(("LB config", f"<span class=\"bad\">{e(page.config_problem)}</span>"))
    if state is not None:
        endpoints = sum(b.weight for vs in state.services for b in vs.backends)
        rows.append(("in the state", f"{len(state.vips)} VIPs, {len(state.services)} virtual services, "
                                     f"{endpoints} pod endpoints, {len(state.nodes)} nodes"))
    return ["<table class=\"summary\">", *(f"<tr><th>{e(k)}</th><td>{v}</td></tr>" for k, v in rows), "</table>"]


def _members(page: StatusPage) -> list[str]:
    out = ["<h2>Directors, speakers and realservers</h2>"]
    if page.board_error is not None:
        out.append(f"<p class=\"bad\">status board unavailable: {e(page.board_error)}</p>")
    want_gen, want_hash = page.watcher.generation, page.watcher.content_hash
    rows = []
    for m in page.members:
        if m.generation is None:
            gen = "<span class=\"muted\">unknown</span>"
        elif m.content_hash is not None and m.content_hash == want_hash:
            gen = f"{e(m.generation)} <span class=\"ok\">in sync</span>"
        elif want_gen is not None and m.generation < want_gen:
            gen = f"{e(m.generation)} <span class=\"warn\">behind ({e(want_gen)} published)</span>"
        else:
            gen = e(m.generation)
        age = "" if m.age is None else f"{m.age:.0f} s ago"
        rows.append(f"<tr><td>{e(m.role)}</td><td>{e(m.host)}</td><td>{_health(m.healthy, m.reason)}</td>"
                    f"<td>{gen}</td><td>{e(m.detail)}</td><td>{e(age)}</td></tr>")
    if rows:
        out += ["<table class=\"members\"><tr><th>role</th><th>host</th><th>health</th><th>applied generation</th>"
                "<th>detail</th><th>published</th></tr>", *rows, "</table>"]
    present = {m.role for m in page.members}
    missing = [r for r in ROLES if r not in present]
    if missing and page.board_error is None:
        out.append("<p class=\"muted\">nothing on the status board from: " + e(", ".join(missing))
                   + " (a role shows here once it publishes its status there)</p>")
    return out


def _rejections(page: StatusPage) -> list[str]:
    out = ["<h2>Recent config rejections</h2>"]
    if not page.rejections:
        return [*out, "<p class=\"muted\">none since this watcher started</p>"]
    out.append("<table class=\"rejections\"><tr><th>when</th><th>what</th><th>reason</th></tr>")
    for r in page.rejections:
        errors = "".join(f"<li><code>{e(x)}</code></li>" for x in r.errors)
        out.append(f"<tr><td>{e(_utc(r.at))}</td><td class=\"{'bad' if r.kind == 'rejected' else 'warn'}\">"
                   f"{e(r.kind)}</td><td>{e(r.reason)}{f'<ul>{errors}</ul>' if errors else ''}</td></tr>")
    out.append("</table>")
    return out


def _vips(state: ClusterState, max_rows: int) -> list[str]:
    by_vip: dict[str, list[VirtualService]] = {}
    for vs in state.services:
        by_vip.setdefault(vs.vip, []).append(vs)
    configured = set(state.vips)
    vips = list(state.vips) + [v for v in by_vip if v not in configured]
    out = ["<h2>VIPs</h2>",
           "<nav class=\"vips\">" + "".join(f"<a href=\"#vip-{e(v)}\">{e(v)}</a>" for v in vips) + "</nav>"]
    rows_left = max_rows
    hidden = 0
    for vip in vips:
        services = by_vip.get(vip, [])
        out.append(f"<section class=\"vip\" id=\"vip-{e(vip)}\"><h2>VIP <code>{e(vip)}</code></h2>")
        if not services:
            out.append("<p class=\"muted\">no ports configured</p></section>")
            continue
        shown = []
        for vs in services:
            if rows_left <= 0:
                hidden += 1
                continue
            rows_left -= max(1, len(vs.backends))
            shown.append(vs)
        if shown:
            out.append("<table><tr><th>port</th><th>service</th><th>scheduling</th><th>node</th><th>weight</th>"
                       "<th>pods</th></tr>")
            for vs in shown:
                out += _service_rows(vs)
            out.append("</table>")
        if len(shown) < len(services):
            out.append(f"<p class=\"muted\">{len(services) - len(shown)} more ports not drawn</p>")
        out.append("</section>")
    if hidden:
        out.append(f"<p class=\"warn\">{hidden} virtual services not drawn (over {max_rows} rows): "
                   "see <code>/config?format=json</code></p>")
    return out


def _service_rows(vs: VirtualService) -> Iterable[str]:
    span = max(1, len(vs.backends))
    sched = vs.scheduler or "mode default"
    how = {"g": "direct routing", "i": "IPIP"}.get(vs.forwarding, vs.forwarding)
    extra = [f"mtu {vs.mtu}"] if vs.mtu else []
    if vs.u_threshold or vs.l_threshold:
        extra.append(f"thresholds {vs.l_threshold}-{vs.u_threshold}")
    head = (f"<td rowspan=\"{span}\"><code>{e(vs.port)}/{e(vs.protocol)}</code></td>"
            f"<td rowspan=\"{span}\">{e(vs.service_ref)}</td>"
            f"<td rowspan=\"{span}\">{e(', '.join([sched, how, *extra]))}</td>")
    if not vs.backends:
        yield f"<tr>{head}<td colspan=\"3\" class=\"warn\">no ready endpoints</td></tr>"
        return
    for i, b in enumerate(vs.backends):
        yield f"<tr>{head if i == 0 else ''}{_backend_cells(b)}</tr>"


def _backend_cells(b: Backend) -> str:
    pods = ", ".join(hostport(p.address, p.port) for p in b.endpoints)
    return (f"<td>{e(b.node)} <span class=\"muted\">{e(b.address)}</span></td><td>{e(b.weight)}</td>"
            f"<td><code>{e(pods)}</code></td>")


def _nodes(state: ClusterState) -> list[str]:
    out = ["<h2>Nodes</h2>", "<table class=\"nodes\"><tr><th>node</th><th>addresses</th><th>backend</th></tr>"]
    for n in state.nodes:
        verdict = ("<span class=\"ok\">eligible</span>" if n.eligible
                   else f"<span class=\"warn\">no</span>: {e(n.reason)}")
        out.append(f"<tr><td>{e(n.name)}</td><td>{e(', '.join(n.addresses))}</td><td>{verdict}</td></tr>")
    out.append("</table>")
    if state.skipped:
        out.append("<h2>Left out of the state</h2><ul>")
        out += [f"<li>{e(s.subject)}: {e(s.reason)}</li>" for s in state.skipped]
        out.append("</ul>")
    return out
