"""`kube2ipvs doctor`, pure part: the troubleshooting guide's manual checks as small functions
over readings taken elsewhere (`kube2ipvs.doctorio` reads the host). No I/O, no clock.

Each check returns one `Result`: PASS, WARN or FAIL, what was seen (`detail`) and, when it is
not PASS, what to do (`fix`, the guide's remedy). A check whose reading could not be taken gets
the reason as its reading (`Unread`) and says so in a WARN or FAIL; no check raises. SKIP is for
a check that does not apply on this host (IPVS connection states on the nftables dataplane, a
`curl VIP:70` from a host that holds the VIP itself); it does not fail the run.

The parsers read what the kernel and the tools print: `ipvsadm-save -n` lines (the director's
`/config?format=ipvsadm|desired`), `/proc/net/ip_vs`, `/proc/net/ip_vs_conn`, the INFO line a
NATS server sends first, and the realserver's `nft -f` text (its chains and `class` map).
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Final, Literal, TypeAlias

Status: TypeAlias = Literal["PASS", "WARN", "FAIL", "SKIP"]

FIN_WAIT_SHARE: Final = 0.5  # WARN above this share of FIN_WAIT entries in ip_vs_conn ...
FIN_WAIT_MIN_ENTRIES: Final = 100  # ... once there are this many entries (a few idle ones say nothing)
TCPFIN_LONG: Final = 60  # seconds; the kernel's default is 120, the director sets 30, the guide 10
RST_RATE: Final = 10.0  # RST packets per second (in + out, one VIP:port) that count as a burst
ARP_IGNORE: Final = 1
ARP_ANNOUNCE: Final = 2


@dataclass(frozen=True, slots=True)
class Result:
    name: str
    status: Status
    detail: str
    fix: str = ""

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Unread:
    """A reading that could not be taken, and why."""

    reason: str


@dataclass(frozen=True, slots=True)
class Http:
    """One HTTP answer: its status and body."""

    status: int
    body: str

    def json(self) -> dict[str, Any] | None:
        try:
            doc = json.loads(self.body)
        except ValueError:
            return None
        return doc if isinstance(doc, dict) else None


def _pass(name: str, detail: str) -> Result:
    return Result(name, "PASS", detail)


def _skip(name: str, detail: str) -> Result:
    return Result(name, "SKIP", detail)


def exit_code(results: Iterable[Result]) -> int:
    """0 when no check failed, 1 otherwise (WARNs do not fail)."""
    return 1 if any(r.status == "FAIL" for r in results) else 0


def render_text(results: Sequence[Result]) -> str:
    lines: list[str] = []
    for r in results:
        lines.append(f"{r.status:<4}  {r.name}: {r.detail}")
        if r.fix and r.status in ("WARN", "FAIL"):
            lines.extend(f"      fix: {line}" for line in r.fix.splitlines())
    counts = {s: sum(r.status == s for r in results) for s in ("PASS", "WARN", "FAIL", "SKIP")}
    lines.append(f"{counts['PASS']} passed, {counts['WARN']} warnings, {counts['FAIL']} failed, "
                 f"{counts['SKIP']} skipped")
    return "\n".join(lines) + "\n"


def render_json(results: Sequence[Result]) -> str:
    return json.dumps([r.to_dict() for r in results], indent=2) + "\n"


# -- the service --------------------------------------------------------------------------------

def check_service(role: str, url: str, health: Http | Unread) -> Result:
    """The local service answers /healthz with ok (the guide: "is the director running? working?")."""
    name = f"{role} service"
    unit = f"kube2ipvs-{role}"
    if isinstance(health, Unread):
        return Result(name, "FAIL", f"{url}: {health.reason}",
                      f"start the {role} (`systemctl status {unit}`, or its pod's logs); check --listen-address "
                      "names the address it serves on")
    doc = health.json()
    if doc is None:
        return Result(name, "FAIL", f"{url}: HTTP {health.status}, not a JSON health document",
                      f"another program answers on that port: give the {role}'s --listen address")
    if health.status == 200 and doc.get("ok") is True:
        generation = doc.get("generation_applied", doc.get("generation"))
        extra = f", generation {generation} applied" if generation is not None else ""
        return _pass(name, f"{url}: healthy{extra}")
    reason = doc.get("reason") or f"HTTP {health.status}"
    return Result(name, "FAIL", f"{url}: unhealthy: {reason}",
                  f"follow the reason; the {role}'s log says more (`journalctl -u {unit}` or its pod's logs)")


# -- IPVS rules ---------------------------------------------------------------------------------

ServiceKey: TypeAlias = tuple[str, str, int]  # protocol (tcp/udp), VIP, port
# service -> (scheduler or None, {(real server, port): (forwarding, weight)})
Rules: TypeAlias = dict[ServiceKey, tuple[str | None, dict[tuple[str, int], tuple[str, int]]]]

_PROTO_FLAGS: Final = {"-t": "tcp", "-u": "udp"}
_FWD_FLAGS: Final = {"-g": "g", "-i": "i", "-m": "m"}
_PROC_FWD: Final = {"Route": "g", "Tunnel": "i", "Masq": "m", "Local": "g"}


def _host_port(text: str) -> tuple[str, int] | None:
    m = re.fullmatch(r"\[?([0-9A-Fa-f.:]+?)\]?:(\d+)", text)
    if m is None:
        return None
    try:
        return str(ipaddress.ip_address(m[1])), int(m[2])
    except ValueError:
        return None


def parse_ipvsadm(text: str) -> Rules:
    """Rules from `ipvsadm-save -n` lines (`-A -t VIP:PORT -s SCHED ...`, `-a -t VIP:PORT -r RS:PORT -g -w W`);
    lines of another shape (fwmark services, comments) are left out."""
    rules: Rules = {}
    for line in text.splitlines():
        words = line.split()
        if len(words) < 3 or words[0] not in ("-A", "-a") or words[1] not in _PROTO_FLAGS:
            continue
        vip = _host_port(words[2])
        if vip is None:
            continue
        key = (_PROTO_FLAGS[words[1]], *vip)
        opts: dict[str, str] = {}
        fwd = "g"
        rest = iter(words[3:])
        for word in rest:
            if word in _FWD_FLAGS:
                fwd = _FWD_FLAGS[word]
            elif word.startswith("-"):
                opts[word] = next(rest, "")
        if words[0] == "-A":
            rules[key] = (opts.get("-s"), rules.get(key, (None, {}))[1])
            continue
        real = _host_port(opts.get("-r", ""))
        if real is None:
            continue
        weight = int(opts["-w"]) if opts.get("-w", "").isdigit() else 1
        rules.setdefault(key, (None, {}))[1][real] = (fwd, weight)
    return rules


def _proc_address(text: str) -> str | None:
    try:
        if text.startswith("["):
            return str(ipaddress.ip_address(text.strip("[]")))
        return str(ipaddress.IPv4Address(int(text, 16)))
    except ValueError:
        return None


def parse_proc_ip_vs(text: str) -> Rules:
    """Rules from /proc/net/ip_vs (the kernel's own listing: IPv4 in hex, IPv6 in brackets)."""
    rules: Rules = {}
    current: ServiceKey | None = None
    for line in text.splitlines():
        words = line.split()
        if len(words) >= 3 and words[0] in ("TCP", "UDP"):
            addr, _, port = words[1].rpartition(":")
            vip = _proc_address(addr)
            current = (words[0].lower(), vip, int(port, 16)) if vip is not None else None
            if current is not None:
                rules[current] = (words[2], {})
        elif len(words) >= 4 and words[0] == "->" and current is not None:
            addr, _, port = words[1].rpartition(":")
            real = _proc_address(addr)
            if real is None or not port or not words[3].isdigit():
                continue
            rules[current][1][(real, int(port, 16))] = (_PROC_FWD.get(words[2], words[2]), int(words[3]))
        elif words and words[0] == "FWM":
            current = None
    return rules


def _service_text(key: ServiceKey) -> str:
    proto, vip, port = key
    return f"{proto} {'[' + vip + ']' if ':' in vip else vip}:{port}"


def rules_diff(desired: Rules, kernel: Rules, *, vips: Iterable[str] = ()) -> list[str]:
    """What the kernel holds that desired does not, and the reverse, for the desired VIPs (and
    `vips`): other services in the kernel are someone else's. Empty when they agree. Real servers
    at weight 0 in the kernel and not desired are draining, not a difference."""
    owned = {k[1] for k in desired} | set(vips)
    diff: list[str] = []
    for key in sorted(desired.keys() | {k for k in kernel if k[1] in owned}):
        want, have = desired.get(key), kernel.get(key)
        svc = _service_text(key)
        if have is None:
            diff.append(f"missing {svc}")
            continue
        if want is None:
            diff.append(f"unexpected {svc}")
            continue
        if want[0] is not None and have[0] is not None and want[0] != have[0]:
            diff.append(f"{svc}: scheduler {have[0]}, want {want[0]}")
        for real in sorted(want[1].keys() | have[1].keys()):
            w, h = want[1].get(real), have[1].get(real)
            where = f"{svc} -> {real[0]}:{real[1]}"
            if h is None:
                diff.append(f"missing {where}")
            elif w is None:
                if h[1] != 0:
                    diff.append(f"unexpected {where} (weight {h[1]})")
            elif w != h:
                diff.append(f"{where}: {h[0]} weight {h[1]}, want {w[0]} weight {w[1]}")
    return diff


_RULES_FIX: Final = ("the director repairs its rules at its next resync (--resync-interval, 10 s by default); if "
                     "they stay wrong, its /healthz reason and log say why. Never edit them with ipvsadm: the "
                     "director puts them back")


def check_ipvs_rules(desired: Http | Unread, kernel: Rules | Unread, service_view: Http | Unread) -> Result:
    """IPVS present, and its rules equal the desired ones. `kernel` is /proc/net/ip_vs read now;
    `service_view` is the director's own /config?format=ipvsadm (as of its last reconcile)."""
    name = "IPVS rules"
    if isinstance(desired, Unread) or desired.status != 200:
        why = desired.reason if isinstance(desired, Unread) else f"HTTP {desired.status}: {desired.body.strip()}"
        return Result(name, "FAIL", f"the director's desired rules (/config?format=desired): {why}",
                      "the director has not reconciled yet, or is not answering: see the service check")
    want = parse_ipvsadm(desired.body)
    if isinstance(kernel, Unread):
        return Result(name, "FAIL", f"IPVS is not available: {kernel.reason}",
                      "load the modules (`modprobe ip_vs ip_vs_mh ip_vs_wrr`; `lsmod | grep ip_vs`), or run the "
                      "director with --dataplane nftables on a kernel without IPVS")
    diff = rules_diff(want, kernel)
    if diff:
        return Result(name, "FAIL", f"the kernel differs from the desired rules: {'; '.join(diff[:10])}"
                      + (f" (and {len(diff) - 10} more)" if len(diff) > 10 else ""), _RULES_FIX)
    if isinstance(service_view, Http) and service_view.status == 200:
        seen = rules_diff(want, parse_ipvsadm(service_view.body))
        if seen:
            return Result(name, "WARN", f"the kernel holds the desired rules, but the director's last reconcile "
                          f"saw: {'; '.join(seen[:5])}", _RULES_FIX)
    dests = sum(len(d) for _, d in want.values())
    return _pass(name, f"{len(want)} virtual services, {dests} real servers, as desired")


# -- the nftables dataplane -------------------------------------------------------------------

# (protocol, VIP, port) -> {node: weight}, as the director's nft table holds it
NftDataplane: TypeAlias = dict[ServiceKey, dict[str, int]]


def check_nft_dataplane(table: str, desired: Http | Unread, kernel: NftDataplane | Unread) -> Result:
    """The director's nftables dataplane: its table is there and holds the desired services and
    nodes with their weights."""
    name = "nftables dataplane"
    fix = (f"the director reloads its table at its next resync (--resync-interval); inspect it with "
           f"`nft list table {table}`")
    if isinstance(desired, Unread) or desired.status != 200:
        why = desired.reason if isinstance(desired, Unread) else f"HTTP {desired.status}: {desired.body.strip()}"
        return Result(name, "FAIL", f"the director's desired rules (/config?format=desired): {why}",
                      "the director has not reconciled yet, or is not answering: see the service check")
    if isinstance(kernel, Unread):
        return Result(name, "FAIL", f"table {table}: {kernel.reason}", fix)
    want = {key: {real[0]: weight for real, (_, weight) in dests.items() if weight > 0}
            for key, (_, dests) in parse_ipvsadm(desired.body).items()}
    have = {key: {node: w for node, w in dests.items() if w > 0} for key, dests in kernel.items()}
    diff = []
    for key in sorted(want.keys() | have.keys()):
        if key not in have:
            diff.append(f"missing {_service_text(key)}")
        elif key not in want:
            diff.append(f"unexpected {_service_text(key)}")
        elif want[key] != have[key]:
            diff.append(f"{_service_text(key)}: nodes {_weights(have[key])}, want {_weights(want[key])}")
    if diff:
        return Result(name, "FAIL", f"table {table} differs from the desired rules: {'; '.join(diff[:10])}", fix)
    nodes = sum(len(d) for d in want.values())
    return _pass(name, f"table {table}: {len(want)} services, {nodes} real servers, as desired")


def _weights(nodes: Mapping[str, int]) -> str:
    return ",".join(f"{n}*{w}" for n, w in sorted(nodes.items())) or "none"


# -- IPVS timeouts and connections ----------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Timeouts:
    tcp: int
    tcpfin: int
    udp: int


def parse_ipvsadm_timeouts(text: str) -> Timeouts | None:
    """From `ipvsadm -L --timeout`: `Timeout (tcp tcpfin udp): 900 120 300`."""
    m = re.search(r"Timeout \(tcp tcpfin udp\):\s*(\d+)\s+(\d+)\s+(\d+)", text)
    return Timeouts(int(m[1]), int(m[2]), int(m[3])) if m else None


def check_ipvs_timeouts(dataplane: str, have: Timeouts | Unread, want_tcpfin: int | None,
                        settings_wrong: Mapping[str, str]) -> Result:
    """tcpfin short: FIN_WAIT entries pile up on a director, which sees only half a teardown."""
    name = "IPVS timeouts"
    if dataplane == "nftables":
        return _skip(name, "not applicable: the nftables dataplane keeps no connections")
    fix = ("the director sets them (--tcpfin-timeout, default 30); by hand: "
           "`ipvsadm --set TCP TCPFIN UDP`, e.g. `ipvsadm --set 900 30 300`")
    wrong = {k: v for k, v in settings_wrong.items() if k.startswith("timeout")}
    if wrong:
        return Result(name, "FAIL", "the director could not set: " + ", ".join(f"{k} {v}" for k, v in
                                                                          sorted(wrong.items())), fix)
    if isinstance(have, Unread):
        return Result(name, "WARN", f"cannot read the timeouts: {have.reason}",
                      "install ipvsadm to read them (`ipvsadm -L --timeout`)")
    shown = f"tcp {have.tcp} s, tcpfin {have.tcpfin} s, udp {have.udp} s"
    if want_tcpfin and have.tcpfin != want_tcpfin:
        return Result(name, "FAIL", f"{shown}; the director wants tcpfin {want_tcpfin} s", fix)
    if have.tcpfin > TCPFIN_LONG:
        return Result(name, "WARN", f"{shown}: tcpfin longer than {TCPFIN_LONG} s keeps half-closed "
                      "connections in FIN_WAIT that long", fix)
    return _pass(name, shown)


def count_conn_states(text: str) -> dict[str, int]:
    """TCP state -> entries, from /proc/net/ip_vs_conn (the state is the eighth field)."""
    counts: dict[str, int] = {}
    for line in text.splitlines()[1:]:
        words = line.split()
        if len(words) > 7:
            counts[words[7]] = counts.get(words[7], 0) + 1
    return counts


def check_conn_states(dataplane: str, counts: Mapping[str, int] | Unread, *,
                      share: float = FIN_WAIT_SHARE, minimum: int = FIN_WAIT_MIN_ENTRIES) -> Result:
    name = "IPVS connection states"
    if dataplane == "nftables":
        return _skip(name, "not applicable: the nftables dataplane keeps no connections")
    if isinstance(counts, Unread):
        return Result(name, "WARN", f"cannot read /proc/net/ip_vs_conn: {counts.reason}",
                      "run doctor as root on the director host")
    total = sum(counts.values())
    fin = counts.get("FIN_WAIT", 0)
    shown = ", ".join(f"{s} {n}" for s, n in sorted(counts.items(), key=lambda i: (-i[1], i[0]))) or "no entries"
    if total >= minimum and fin / total > share:
        return Result(name, "WARN", f"{fin} of {total} entries in FIN_WAIT ({fin / total:.0%}): {shown}",
                      "shorten tcpfin (the director's --tcpfin-timeout; by hand `ipvsadm --set 900 10 300`)")
    return _pass(name, f"{total} entries: {shown}")


# -- ARP ------------------------------------------------------------------------------------------

SysctlKey: TypeAlias = tuple[str, str]  # device, name


def check_arp(role: str, devices: Sequence[str], values: Mapping[SysctlKey, int | None], *,
              mode: str | None = None) -> Result:
    """arp_ignore=1 and arp_announce=2 on lo and the primary interface. The kernel uses the larger of
    `all` and the device's value, so a device at 0 is fine when `all` holds the value.

    A realserver must not answer ARP for the VIPs it holds on lo (the guide's "ARP configuration").
    A director in ARP mode must answer for its VIPs, and one in BGP mode is reached by routes;
    for either this check only reports the values."""
    name = "ARP sysctls"
    shown, wrong, missing = [], [], []
    for dev in devices:
        for sysctl, want in (("arp_ignore", ARP_IGNORE), ("arp_announce", ARP_ANNOUNCE)):
            value, everywhere = values.get((dev, sysctl)), values.get(("all", sysctl))
            if value is None:
                missing.append(f"{dev}/{sysctl}")
                continue
            effective = max(value, everywhere or 0)
            shown.append(f"{dev}/{sysctl}={effective}")
            if effective != want:
                wrong.append((dev, sysctl, effective, want))
    detail = ", ".join(shown) or "nothing read"
    if role != "realserver":
        why = "ARP mode: this director answers ARP for its VIPs" if mode == "arp" else \
            "BGP mode: the routers reach the VIPs by routes, not ARP"
        return _pass(name, f"{detail} ({why})")
    if missing:
        return Result(name, "FAIL", f"cannot read {', '.join(missing)}; {detail}",
                      "give doctor the realserver's --interface; check the device exists (`ip link`)")
    if wrong:
        fix = "; ".join(f"sysctl -w net.ipv4.conf.{dev}.{sysctl}={want}" for dev, sysctl, _, want in wrong)
        return Result(name, "FAIL", f"{detail}: this node may answer ARP for the VIPs, and the router may then "
                      "send all VIP traffic to it", f"{fix} (the realserver sets them at its next resync; if they "
                      "stay wrong, something else on the host writes them)")
    return _pass(name, detail)


# -- VIPs -------------------------------------------------------------------------------------------

def check_vips(role: str, device: str, expected: Iterable[str], present: Iterable[str] | Unread) -> Result:
    name = "VIP addresses"
    want = sorted(set(expected), key=_address_key)
    if isinstance(present, Unread):
        return Result(name, "FAIL", f"cannot read the addresses of {device}: {present.reason}",
                      f"the {role} holds its VIPs on {device} (`ip addr show dev {device}`; the director creates "
                      "its dummy device at start); run doctor as root in the host's network namespace")
    missing = [v for v in want if v not in set(present)]
    if missing:
        return Result(name, "FAIL", f"missing on {device}: {', '.join(missing)}",
                      f"the {role} adds them at its next resync; `ip addr show dev {device}` shows them "
                      "(our addresses carry `proto 149`)")
    if not want:
        return Result(name, "WARN", f"the {role} serves no VIP", "check the LB ConfigMap and the service's /config")
    return _pass(name, f"on {device}: {', '.join(want)}")


def _address_key(text: str) -> tuple[int, int]:
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return (9, 0)
    return (ip.version, int(ip))


# -- BGP ------------------------------------------------------------------------------------------

ESTABLISHED_STATE: Final = 6  # gobgp's session_state for ESTABLISHED


def parse_gobgp_neighbors(text: str) -> dict[str, bool] | None:
    """Peer address -> established, from `gobgp -j neighbor`; None when it is not that JSON."""
    try:
        doc = json.loads(text)
    except ValueError:
        return None
    if not isinstance(doc, list):
        return None
    peers: dict[str, bool] = {}
    for item in doc:
        state = item.get("state", {}) if isinstance(item, dict) else {}
        address = state.get("neighbor_address") or item.get("conf", {}).get("neighbor_address")
        if isinstance(address, str):
            peers[address] = state.get("session_state") in (ESTABLISHED_STATE, "ESTABLISHED", "established")
    return peers


def parse_gobgp_adj_out(text: str) -> set[str] | None:
    """The prefixes of `gobgp -j neighbor PEER adj-out` (a JSON object keyed by prefix)."""
    try:
        doc = json.loads(text)
    except ValueError:
        return None
    if doc is None:
        return set()
    return {str(ipaddress.ip_network(p, strict=False)) for p in doc} if isinstance(doc, dict) else None


def vip_prefix(vip: str) -> str:
    return str(ipaddress.ip_network(vip))


_BGP_FIX: Final = ("restart gobgpd (`systemctl restart gobgpd`: it withdraws the routes, so ongoing connections "
                   "drop; peers are back in under 30 s); check router-id, as and neighbor-address in "
                   "/etc/gobgpd.conf (the ToR's own address, not the default gateway)")


def check_bgp(vips: Iterable[str], speaker: Http | Unread, neighbors: Mapping[str, bool] | Unread,
              adj_out: Mapping[str, set[str] | Unread]) -> Result:
    """gobgpd answers, its peers are ESTABLISHED and each one's adj-out holds every VIP the director
    serves (the guide's `gobgp n` and `gobgp n PEER adj-out`). `speaker` is the bgp-speaker's
    /healthz, used for the reason when gobgpd itself cannot be asked."""
    name = "BGP"
    want = {vip_prefix(v) for v in vips}
    speaker_doc = speaker.json() if isinstance(speaker, Http) else None
    if isinstance(neighbors, Unread):
        said = f"; the bgp-speaker says: {speaker_doc.get('reason') or 'healthy'}" if speaker_doc else \
            f"; the bgp-speaker: {speaker.reason}" if isinstance(speaker, Unread) else ""
        return Result(name, "FAIL", f"gobgpd does not answer: {neighbors.reason}{said}", _BGP_FIX)
    if not neighbors:
        return Result(name, "FAIL", "gobgpd has no peers", "the bgp-speaker configures them (--peer); see its "
                      "/healthz and log")
    established = sorted(p for p, up in neighbors.items() if up)
    down = sorted(p for p, up in neighbors.items() if not up)
    if not established:
        return Result(name, "FAIL", f"no peer ESTABLISHED ({', '.join(down)})", _BGP_FIX)
    problems = []
    for peer in established:
        out = adj_out.get(peer, Unread("not read"))
        if isinstance(out, Unread):
            problems.append(f"{peer} adj-out unread: {out.reason}")
        elif want - out:
            problems.append(f"{peer} adj-out lacks {', '.join(sorted(want - out, key=_prefix_key))}")
    if problems:
        return Result(name, "FAIL", "; ".join(problems),
                      "the bgp-speaker announces the VIPs its director serves once the director is healthy: see "
                      "its /healthz; `gobgp global rib` shows what gobgpd originates")
    if speaker_doc is not None and speaker_doc.get("ok") is not True:
        return Result(name, "WARN", f"peers {', '.join(established)} hold every VIP, but the bgp-speaker is "
                      f"unhealthy: {speaker_doc.get('reason')}", "see the bgp-speaker's log")
    if isinstance(speaker, Unread):
        return Result(name, "WARN", f"peers {', '.join(established)} hold every VIP, but the bgp-speaker does not "
                      f"answer: {speaker.reason}", "start the bgp-speaker: without it routes are not kept in step")
    detail = f"{len(established)} peer(s) ESTABLISHED ({', '.join(established)}); adj-out holds all {len(want)} VIPs"
    if down:
        return Result(name, "WARN", f"{detail}; not established: {', '.join(down)}", _BGP_FIX)
    return _pass(name, detail)


def _prefix_key(text: str) -> tuple[int, int]:
    return _address_key(text.split("/", maxsplit=1)[0])


# -- the realserver's nft table ------------------------------------------------------------------

_TABLE_RE: Final = re.compile(r"^table (ip6?) kube2ipvs \{\n(.*?)^\}$", re.M | re.S)
_CHAIN_RE: Final = re.compile(r"^\tchain (\S+) \{$", re.M)
_CLASS_MAP_RE: Final = re.compile(r"^\tmap class \{\n(.*?)^\t\}$", re.M | re.S)
_CLASS_ELEMENT_RE: Final = re.compile(r"^\t\t\t(\S+) \. (tcp|udp) \. (\d+) : goto ", re.M)

NftKey: TypeAlias = tuple[str, int, str]  # VIP, port, protocol (the `class` map's key)


@dataclass(frozen=True, slots=True)
class NftTable:
    """Chains (family, name) and the services of the `class` maps of the realserver's tables."""

    chains: frozenset[tuple[str, str]]
    services: frozenset[NftKey]


def expected_nft(text: str) -> NftTable:
    """What the realserver's `nft -f` text (its /config?format=nft) puts in the kernel."""
    chains: set[tuple[str, str]] = set()
    services: set[NftKey] = set()
    for m in _TABLE_RE.finditer(text):
        chains.update((m[1], c) for c in _CHAIN_RE.findall(m[2]))
        if (cls := _CLASS_MAP_RE.search(m[2])) is not None:
            services.update((vip, int(port), proto) for vip, proto, port in _CLASS_ELEMENT_RE.findall(cls[1]))
    return NftTable(frozenset(chains), frozenset(services))


def check_nft_table(desired: Http | Unread, kernel: NftTable | Unread) -> Result:
    name = "nft table"
    fix = ("the realserver reloads its table at its next resync (--resync-interval, 10 s by default); "
           "`nft list table ip kube2ipvs` shows it. If it stays wrong, the realserver's log says why")
    if isinstance(desired, Unread) or desired.status != 200:
        why = desired.reason if isinstance(desired, Unread) else f"HTTP {desired.status}: {desired.body.strip()}"
        return Result(name, "FAIL", f"the realserver's rules (/config?format=nft): {why}",
                      "the realserver has no slice yet, or is not answering: see the service check")
    want = expected_nft(desired.body)
    if isinstance(kernel, Unread):
        return Result(name, "FAIL", f"cannot read table kube2ipvs: {kernel.reason}", fix)
    families = sorted({f for f, _ in want.chains})
    absent = [f for f in families if not any(f == g for g, _ in kernel.chains)]
    if absent:
        return Result(name, "FAIL", f"table {', '.join(f + ' kube2ipvs' for f in absent)} is missing", fix)
    problems = []
    if missing := want.chains - kernel.chains:
        problems.append(f"{len(missing)} chains missing ({', '.join(f'{f} {c}' for f, c in sorted(missing)[:5])})")
    if lacking := want.services - kernel.services:
        problems.append(f"{len(lacking)} services missing from the class map "
                        f"({', '.join(f'{v}:{p}/{t}' for v, p, t in sorted(lacking)[:5])})")
    if extra := kernel.services - want.services:
        problems.append(f"{len(extra)} services not desired "
                        f"({', '.join(f'{v}:{p}/{t}' for v, p, t in sorted(extra)[:5])})")
    if problems:
        return Result(name, "FAIL", "; ".join(problems), fix)
    return _pass(name, f"{len(kernel.chains)} chains, {len(kernel.services)} services in the class map, as desired")


# -- RST counters ---------------------------------------------------------------------------------

# (VIP, port, protocol) -> RST packets (rst_in + rst_out)
RstCounts: TypeAlias = Mapping[NftKey, int]


def check_rst(first: RstCounts | Unread, second: RstCounts | Unread, interval: float, *,
              rate: float = RST_RATE) -> Result:
    """RST bursts between two reads of the realserver's RST counters `interval` seconds apart (the
    guide's "TCP Resets": a pulse of RSTs points at the leaf/ToR routers re-hashing flows)."""
    name = "RST counters"
    for reading in (first, second):
        if isinstance(reading, Unread):
            return Result(name, "WARN", f"cannot read the RST counter sets: {reading.reason}",
                          "check the nft table (see that check); run doctor as root")
    assert not isinstance(first, Unread)
    assert not isinstance(second, Unread)
    rates = {k: (second.get(k, 0) - first.get(k, 0)) / interval for k in second if interval > 0}
    bursts = sorted(((r, k) for k, r in rates.items() if r > rate), reverse=True)
    total = sum(second.values())
    if bursts:
        shown = ", ".join(f"{v}:{p}/{t} {r:.1f}/s" for r, (v, p, t) in bursts[:5])
        return Result(name, "WARN", f"RST burst over {interval:g} s: {shown}",
                      "a pulse of RSTs points at the routers re-hashing flows over the directors (leaf/ToR "
                      "trouble); check the directors' BGP and that every director uses the mh scheduler "
                      "(DESIGN 4.1); watch with `tcpdump -n -i IF 'tcp[tcpflags] & tcp-rst != 0'`")
    return _pass(name, f"{len(second)} services, {total} RSTs counted, no burst over {interval:g} s "
                 f"(threshold {rate:g}/s)")


# -- NATS -----------------------------------------------------------------------------------------

def parse_nats_info(line: str) -> dict[str, Any] | None:
    """The JSON of a NATS server's first line, `INFO {...}`; None for anything else."""
    if not line.startswith("INFO "):
        return None
    try:
        doc = json.loads(line[5:])
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def check_nats(url: str, info: str | Unread) -> Result:
    name = "NATS"
    fix = ("start nats-server (with -js) or fix the network to it; the services keep the kernel as it is while "
           "NATS is away, and resync when it is back")
    if isinstance(info, Unread):
        return Result(name, "FAIL", f"{url}: {info.reason}", fix)
    doc = parse_nats_info(info)
    if doc is None:
        return Result(name, "FAIL", f"{url}: answered, but not with a NATS INFO line: {info[:80]!r}",
                      "the URL points at something other than a NATS server")
    if doc.get("jetstream") is False:
        return Result(name, "FAIL", f"{url}: NATS {doc.get('version', '?')} without JetStream",
                      "run nats-server with -js: the cluster state lives in a JetStream key-value bucket")
    return _pass(name, f"{url}: NATS {doc.get('version', '?')} ({doc.get('server_name') or doc.get('server_id', '?')})")


# -- curl VIP:70 -------------------------------------------------------------------------------------

def check_unicorns(vip: str, port: int, answer: Http | Unread | None) -> Result:
    """The guide's first check, `curl http://$VIP:70`: the "unicorns" service answers on every VIP.

    A request from a host that holds the VIP (a director; a node without a local unicorns pod)
    never leaves the host, so it says nothing about the service: `answer` None, SKIP. On a node
    with a local unicorns pod the request goes through that node's DNAT to its pod."""
    name = f"curl {vip}:{port}"
    host = f"[{vip}]" if ":" in vip else vip
    if answer is None:
        return _skip(name, f"this host holds {vip} itself (and no local endpoint of port {port}), so a request "
                     "from here never reaches the service: curl it from a client outside")
    if isinstance(answer, Unread):
        return Result(name, "FAIL", f"http://{host}:{port}/: {answer.reason}",
                      "check the director (IPVS rules, BGP) and the realservers of the unicorns service; "
                      "run doctor on each")
    if 200 <= answer.status < 400:
        first = answer.body.strip().splitlines()[0][:80] if answer.body.strip() else "(empty body)"
        return _pass(name, f"HTTP {answer.status}: {first}")
    return Result(name, "FAIL", f"http://{host}:{port}/: HTTP {answer.status}",
                  "the unicorns pods answer with an error: check them (`kubectl get pods`)")

