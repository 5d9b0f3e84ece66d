"""`kube2ipvs doctor`: reads this host (the local service's /healthz and /config, /proc, sysctls,
nft sets, gobgpd, NATS, the VIPs) and hands the readings to the checks of `kube2ipvs.doctor`.

Blocking, one reading after another; every reading has a timeout. Any failure to read becomes
an `Unread` with the reason, so a check that cannot run reports why instead of raising. The
only programs run are `gobgp` and `ipvsadm`, with fixed arguments (addresses taken from the
services' /config are validated as IP addresses and ports first), never through a shell.
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TextIO

from kube2ipvs import doctor
from kube2ipvs.doctor import Http, NftDataplane, NftTable, Result, RstCounts, Unread

# The roles' default ports (kube2ipvs.roleargs.DEFAULT_PORTS, which imports the NATS client:
# not loaded for every CLI start).
DEFAULT_PORTS: Final = {"director": 9872, "bgp-speaker": 9873, "realserver": 9874}
REALSERVER_TABLE: Final = "kube2ipvs"
NFT_FAMILIES: Final = ("ip", "ip6")
DEFAULT_GOBGPD: Final = "127.0.0.1:50051"
_OPENER: Final = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through a proxy


@dataclass(frozen=True, slots=True)
class Options:
    role: str = "auto"  # director, realserver or auto
    host: str = "127.0.0.1"  # where the local service listens
    port: int | None = None  # its port (default: the role's)
    speaker: tuple[str, int] | None = None  # the bgp-speaker (default: host, its default port)
    nats: str | None = None  # default: the service's own NATS server
    vips: tuple[str, ...] = ()  # curl these VIPs (default: the service's VIPs)
    unicorns_port: int = 70
    interface: str | None = None  # the primary interface (default: the service's, else the default route's)
    rst_interval: float = 1.0
    rst_rate: float = doctor.RST_RATE
    fin_wait_share: float = doctor.FIN_WAIT_SHARE
    timeout: float = 3.0
    token: str | None = field(default=None, repr=False)  # the services' --config-token, if they require one
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False)


# -- readers --------------------------------------------------------------------------------------

def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def http_get(url: str, timeout: float, token: str | None = None) -> Http | Unread:
    """GET `url`; with `token`, as `Authorization: Bearer` (a service's --config-token)."""
    if not url.startswith("http://"):
        return Unread(f"not an http URL: {url}")
    request = urllib.request.Request(  # noqa: S310  (http:// only, checked above)
        url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with _OPENER.open(request, timeout=timeout) as answer:
            return Http(answer.status, answer.read(4 << 20).decode(errors="replace"))
    except urllib.error.HTTPError as exc:
        return Http(exc.code, exc.read(1 << 20).decode(errors="replace"))
    except urllib.error.URLError as exc:
        return Unread(_reason(exc.reason))
    except (OSError, ValueError) as exc:
        return Unread(_reason(exc))


def _reason(exc: object) -> str:
    if isinstance(exc, TimeoutError | socket.timeout):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc)


def read_text(path: str) -> str | Unread:
    try:
        return Path(path).read_text()
    except OSError as exc:
        return Unread(f"{path}: {exc.strerror or exc}")


def read_sysctl(device: str, name: str) -> int | None:
    text = read_text(f"/proc/sys/net/ipv4/conf/{device}/{name}")
    return int(text) if isinstance(text, str) and text.strip().isdigit() else None


def default_route_device() -> str | None:
    """The device of the IPv4 default route (/proc/net/route), the host's primary interface."""
    text = read_text("/proc/net/route")
    if isinstance(text, Unread):
        return None
    for line in text.splitlines()[1:]:
        words = line.split()
        if len(words) > 2 and words[1] == "00000000":
            return words[0]
    return None


def run_tool(argv: Sequence[str], timeout: float) -> str | Unread:
    if shutil.which(argv[0]) is None:
        return Unread(f"{argv[0]} is not installed")
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return Unread(f"`{' '.join(argv)}` timed out")
    except OSError as exc:
        return Unread(f"{argv[0]}: {exc.strerror or exc}")
    if done.returncode != 0:
        return Unread(f"`{' '.join(argv)}`: {(done.stderr or done.stdout).strip()[:300] or 'failed'}")
    return done.stdout


def tcp_line(host: str, port: int, timeout: float) -> str | Unread:
    """The first line a TCP server sends (a NATS server's INFO)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            data = b""
            while b"\n" not in data and len(data) < 65536:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
    except OSError as exc:
        return Unread(_reason(exc))
    return data.split(b"\n", 1)[0].decode(errors="replace").rstrip("\r")


def tcp_open(host: str, port: int, timeout: float) -> Unread | None:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as exc:
        return Unread(f"{_url_host(host)}:{port}: {_reason(exc)}")


def is_local(address: str) -> bool:
    """Whether `address` is one of this host's (network namespace's) addresses: only those can be bound."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.bind((address, 0))
    except OSError:
        return False
    return True


def device_addresses(device: str) -> frozenset[str] | Unread:
    from kube2ipvs.vipaddrs import AddressError, VipAddresses

    try:
        with VipAddresses(device) as vips:
            ours, foreign = vips.addresses()
    except AddressError as exc:
        return Unread(str(exc))
    except Exception as exc:  # pyroute2's own errors (NetlinkError is no OSError): the reason is the reading
        return Unread(f"{type(exc).__name__}: {exc}")
    return ours | foreign


def _set_elements(family: str, table: str, name: str) -> list[Any]:
    from kube2ipvs.nfsets import SetReader

    with SetReader() as reader:
        return reader.elements(family, table, name)


def realserver_table() -> NftTable | Unread:
    """The chains of the realserver's tables (`list chains`: cheap even at 10,000 services) and
    the keys of their `class` maps (a netlink dump)."""
    from kube2ipvs import libnft
    from kube2ipvs.nfsets import service_key

    try:
        with libnft.Nft() as nft:
            items = nft.json("list chains")
        chains = frozenset((c["chain"]["family"], c["chain"]["name"]) for c in items
                           if "chain" in c and c["chain"]["table"] == REALSERVER_TABLE
                           and c["chain"]["family"] in NFT_FAMILIES)
        services: set[doctor.NftKey] = set()
        for family in sorted({f for f, _ in chains}):
            for element in _set_elements(family, REALSERVER_TABLE, "class"):
                if (key := service_key(family, element.key)) is not None:
                    services.add(key)
    except (libnft.NftError, OSError, ValueError, KeyError) as exc:
        return Unread(_reason(exc))
    return NftTable(chains, frozenset(services))


def rst_counts() -> RstCounts | Unread:
    """RST packets (rst_in + rst_out) per service from the realserver's counter sets."""
    from kube2ipvs.nfsets import service_key

    counts: dict[doctor.NftKey, int] = {}
    found = False
    try:
        for family in NFT_FAMILIES:
            for name in ("rst_in", "rst_out"):
                try:
                    elements = _set_elements(family, REALSERVER_TABLE, name)
                except OSError as exc:
                    if exc.errno == errno.ENOENT:
                        continue  # no table (or no TCP service) in this family
                    raise
                found = True
                for element in elements:
                    if (key := service_key(family, element.key)) is not None:
                        counts[key] = counts.get(key, 0) + (element.packets or 0)
    except OSError as exc:
        return Unread(_reason(exc))
    return counts if found else Unread("no RST counter set (table ip kube2ipvs missing?)")


def dsr_table(table: str) -> NftDataplane | Unread:
    """The services and nodes (with weights) of the director's nftables dataplane, from its
    `svc4/6` and `dests4/6` maps (see kube2ipvs_director.dsr for the layout)."""
    from kube2ipvs.nfsets import service_key

    found: NftDataplane = {}
    try:
        for fam, size in (("ip", 4), ("ip6", 16)):
            suffix = "4" if fam == "ip" else "6"
            for element in _set_elements("netdev", table, f"svc{suffix}"):
                if (key := service_key(fam, element.key)) is not None:
                    found[(key[2], key[0], key[1])] = {}
            for element in _set_elements("netdev", table, f"dests{suffix}"):
                key = service_key(fam, element.key)
                raw = element.key[size + 8:size + 8 + size]
                if key is None or len(raw) != size:
                    continue
                node = str(ipaddress.ip_address(raw))
                weight = int.from_bytes(element.data, sys.byteorder) if element.data else 0
                found.setdefault((key[2], key[0], key[1]), {})[node] = weight
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return Unread("the table is missing")
        return Unread(_reason(exc))
    return found


# -- the run --------------------------------------------------------------------------------------

@dataclass
class _Service:
    role: str
    base: str
    health: Http | Unread
    config: dict[str, Any]
    token: str | None = None

    @property
    def doc(self) -> dict[str, Any]:
        return (self.health.json() or {}) if isinstance(self.health, Http) else {}

    @property
    def settings(self) -> dict[str, Any]:
        settings = self.config.get("settings")
        return settings if isinstance(settings, dict) else {}

    def get(self, query: str, timeout: float) -> Http | Unread:
        return http_get(f"{self.base}/config?{query}", timeout, *([self.token] if self.token else []))


def _service(role: str, host: str, port: int | None, timeout: float, token: str | None = None) -> _Service:
    base = f"http://{_url_host(host)}:{port or DEFAULT_PORTS[role]}"
    health = http_get(f"{base}/healthz", timeout)
    config: dict[str, Any] = {}
    if isinstance(health, Http):
        answer = http_get(f"{base}/config", timeout, *([token] if token else []))
        config = (answer.json() or {}) if isinstance(answer, Http) else {}
    return _Service(role, base, health, config, token)


def _detect(options: Options) -> _Service:
    if options.role != "auto":
        return _service(options.role, options.host, options.port, options.timeout, options.token)
    first: _Service | None = None
    for role in ("director", "realserver"):
        found = _service(role, options.host, options.port, options.timeout, options.token)
        if isinstance(found.health, Http) and found.config.get("role", role) == role:
            return found
        first = first or found
    assert first is not None
    return first


def _str_list(value: object) -> list[str]:
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


def run(options: Options) -> list[Result]:
    service = _detect(options)
    if options.role == "auto" and isinstance(service.health, Unread):
        # Nothing says which role this host has: only what the flags name can still be checked.
        ports = ", ".join(str(options.port or DEFAULT_PORTS[r]) for r in ("director", "realserver"))
        results = [Result("service", "FAIL", f"neither a director nor a realserver answers on "
                          f"{_url_host(options.host)} (ports {ports}): {service.health.reason}",
                          "start the service, or give --role and the --listen-address it serves on")]
        if options.nats:
            results.append(_nats(service, options))
        return results + [doctor.check_unicorns(v, options.unicorns_port, _curl(v, options)) for v in options.vips]
    results = [doctor.check_service(service.role, f"{service.base}/healthz", service.health)]
    role_checks = _director if service.role == "director" else _realserver
    results += _guarded(f"{service.role} checks", lambda: role_checks(service, options))
    results += _guarded("NATS", lambda: [_nats(service, options)])
    results += _guarded(f"curl VIP:{options.unicorns_port}", lambda: _unicorns(service, options))
    return results


def _guarded(name: str, checks: Callable[[], list[Result]]) -> list[Result]:
    """The checks' results; a reader failing in a way none of them expected is a FAIL, not a traceback."""
    try:
        return checks()
    except Exception as exc:  # every failure of a check is reported as its result
        return [Result(name, "FAIL", f"could not run: {type(exc).__name__}: {exc}",
                       "a bug of doctor: report it with the --json output")]


def _interface(service: _Service, options: Options) -> str | None:
    named = options.interface or service.settings.get("interface")
    return named if isinstance(named, str) and named else default_route_device()


def _arp(service: _Service, options: Options, device: str) -> Result:
    devices = list(dict.fromkeys(["lo", device, *([i] if (i := _interface(service, options)) else [])]))
    values = {(dev, name): read_sysctl(dev, name) for dev in ["all", *devices]
              for name in ("arp_ignore", "arp_announce")}
    mode = service.settings.get("mode")
    return doctor.check_arp(service.role, devices, values, mode=mode if isinstance(mode, str) else None)


def _director(service: _Service, options: Options) -> list[Result]:
    settings = service.settings
    dataplane = settings.get("dataplane")
    if dataplane not in ("ipvs", "nftables"):
        dataplane = "ipvs" if os.path.exists("/proc/net/ip_vs") else "nftables"
    results: list[Result] = []
    desired = service.get("format=desired", options.timeout)
    if dataplane == "nftables":
        table = str(settings.get("nft_table") or "netdev kube2ipvs_dsr").split()[-1]
        results.append(doctor.check_nft_dataplane(f"netdev {table}", desired, dsr_table(table)))
    else:
        proc = read_text("/proc/net/ip_vs")
        kernel = doctor.parse_proc_ip_vs(proc) if isinstance(proc, str) else proc
        results.append(doctor.check_ipvs_rules(desired, kernel, service.get("format=ipvsadm", options.timeout)))
    timeouts: doctor.Timeouts | Unread = Unread("not read")
    conns: dict[str, int] | Unread = Unread("not read")
    if dataplane == "ipvs":
        text = run_tool(["ipvsadm", "-L", "-n", "--timeout"], options.timeout)
        parsed = doctor.parse_ipvsadm_timeouts(text) if isinstance(text, str) else None
        timeouts = parsed if parsed is not None else text if isinstance(text, Unread) else \
            Unread("ipvsadm printed no timeouts")
        conn_text = read_text("/proc/net/ip_vs_conn")
        conns = doctor.count_conn_states(conn_text) if isinstance(conn_text, str) else conn_text
    want = settings.get("timeouts", {}).get("tcpfin") if isinstance(settings.get("timeouts"), dict) else None
    wrong = service.doc.get("settings_wrong")
    results.append(doctor.check_ipvs_timeouts(dataplane, timeouts, want if isinstance(want, int) else None,
                                              wrong if isinstance(wrong, dict) else {}))
    results.append(doctor.check_conn_states(dataplane, conns, share=options.fin_wait_share))
    device = str(settings.get("device") or "kube2ipvs0")
    results.append(_arp(service, options, device))
    vips = _str_list(service.doc.get("vips"))
    results.append(doctor.check_vips("director", device, vips, device_addresses(device)))
    if settings.get("mode") == "arp":
        results.append(Result("BGP", "SKIP", "not applicable: this director attracts its VIPs by ARP"))
    else:
        results.append(_bgp(service, options, vips))
    return results


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _bgp(service: _Service, options: Options, vips: Sequence[str]) -> Result:
    host, port = options.speaker or (options.host, DEFAULT_PORTS["bgp-speaker"])
    speaker = _service("bgp-speaker", host, port, options.timeout, options.token)
    api = str(speaker.settings.get("gobgpd") or DEFAULT_GOBGPD)
    api_host, _, api_port = api.rpartition(":")
    api_host = api_host.strip("[]")
    if not api_port.isdigit() or not _is_address(api_host):
        return doctor.check_bgp(vips, speaker.health, Unread(f"the speaker's gobgpd address {api!r} is not "
                                                              "ADDRESS:PORT"), {})
    refused = tcp_open(api_host, int(api_port), options.timeout)
    if refused is not None:
        return doctor.check_bgp(vips, speaker.health, Unread(f"gobgpd API {refused.reason}"), {})
    neighbors: dict[str, bool] | Unread
    adj_out: dict[str, set[str] | Unread] = {}
    base = ["gobgp", "-u", api_host, "-p", api_port, "-j"]
    if shutil.which("gobgp") is not None:
        text = run_tool([*base, "neighbor"], options.timeout)
        parsed = doctor.parse_gobgp_neighbors(text) if isinstance(text, str) else None
        neighbors = parsed if parsed is not None else text if isinstance(text, Unread) else \
            Unread("`gobgp neighbor` printed no peer list")
        for peer in sorted(neighbors) if isinstance(neighbors, dict) else ():
            if not _is_address(peer):  # gobgp's own output, but it becomes an argument
                adj_out[peer] = Unread(f"{peer!r} is not an address")
                continue
            out = run_tool([*base, "neighbor", peer, "adj-out"], options.timeout)
            prefixes = doctor.parse_gobgp_adj_out(out) if isinstance(out, str) else None
            adj_out[peer] = prefixes if prefixes is not None else out if isinstance(out, Unread) else \
                Unread("not the JSON of `gobgp neighbor PEER adj-out`")
    else:  # no gobgp client here: what the bgp-speaker read from gobgpd
        peers = speaker.config.get("peers")
        if not isinstance(peers, list):
            neighbors = Unread("gobgp is not installed and the bgp-speaker lists no peers")
        else:
            neighbors = {p["address"]: p.get("state") == "established" for p in peers
                         if isinstance(p, dict) and isinstance(p.get("address"), str)}
            routes = {r.split()[0] for r in _str_list(speaker.config.get("routes"))}
            adj_out = dict.fromkeys(neighbors, routes)
    return doctor.check_bgp(vips, speaker.health, neighbors, adj_out)


def _realserver(service: _Service, options: Options) -> list[Result]:
    settings = service.settings
    device = str(settings.get("device") or "lo")
    results = [_arp(service, options, device)]
    results.append(doctor.check_vips("realserver", device, _str_list(service.doc.get("vips")),
                                     device_addresses(device)))
    results.append(doctor.check_nft_table(service.get("format=nft", options.timeout), realserver_table()))
    first = rst_counts()
    if not isinstance(first, Unread):
        options.sleep(options.rst_interval)
    second = rst_counts() if not isinstance(first, Unread) else first
    results.append(doctor.check_rst(first, second, options.rst_interval, rate=options.rst_rate))
    return results


def _nats(service: _Service, options: Options) -> Result:
    url = options.nats
    if url is None:
        nats = service.settings.get("nats")
        servers = _str_list(nats.get("servers")) if isinstance(nats, dict) else []
        url = servers[0] if servers else "nats://127.0.0.1:4222"
    try:
        parts = urllib.parse.urlsplit(url if "://" in url else f"nats://{url}")
        host, port = parts.hostname, parts.port or 4222
    except ValueError as exc:
        return doctor.check_nats(url, Unread(f"not a NATS URL: {exc}"))
    if host is None:
        return doctor.check_nats(url, Unread("not a NATS URL: no host"))
    return doctor.check_nats(url, tcp_line(host, port, options.timeout))


def _local_endpoints(service: _Service, port: int, timeout: float) -> set[str]:
    """VIPs whose TCP `port` this realserver DNATs to a local pod."""
    answer = service.get("format=json", timeout)
    doc = answer.json() if isinstance(answer, Http) else None
    services = doc.get("services") if doc else None
    return {s["vip"] for s in services or () if isinstance(s, dict) and s.get("port") == port
            and s.get("protocol") == "tcp" and any(b.get("endpoints") for b in s.get("backends") or ())}


def _curl(vip: str, options: Options) -> Http | Unread:
    return http_get(f"http://{_url_host(vip)}:{options.unicorns_port}/", options.timeout)


def _unicorns(service: _Service, options: Options) -> list[Result]:
    port = options.unicorns_port
    vips = list(options.vips) or _str_list(service.doc.get("vips"))
    served = _local_endpoints(service, port, options.timeout) if service.role == "realserver" else set()
    results = []
    for vip in vips:
        answer = None if is_local(vip) and vip not in served else _curl(vip, options)
        results.append(doctor.check_unicorns(vip, port, answer))
    if not vips:
        results.append(Result(f"curl VIP:{port}", "WARN", "no VIP to try: the service serves none",
                              "give --vip-check VIP"))
    return results


def cmd_doctor(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """The `doctor` subcommand's handler (arguments from `kube2ipvs.doctor.add_parser`)."""
    host, port = args.listen_address
    options = Options(role=args.role, host=host, port=port, speaker=args.speaker_address, nats=args.nats,
                      vips=tuple(args.vip_check), unicorns_port=args.unicorns_port, interface=args.interface,
                      rst_interval=args.rst_interval, timeout=args.timeout,
                      token=args.token or os.environ.get("KUBE2IPVS_CONFIG_TOKEN") or None)
    if os.geteuid() != 0:
        print("note: not root: the kernel's nft sets and IPVS tables cannot be read", file=err)
    results = run(options)
    out.write(doctor.render_json(results) if args.json else doctor.render_text(results))
    return doctor.exit_code(results)


# -- the command line ---------------------------------------------------------------------------------

def _host_port_arg(text: str) -> tuple[str, int | None]:
    """ADDRESS, ADDRESS:PORT or [V6ADDRESS]:PORT; the port defaults to the role's."""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else rest or ""
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host, port = text, ""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not ADDRESS[:PORT]") from None
    if port and (not port.isdigit() or not 1 <= int(port) <= 65535):
        raise argparse.ArgumentTypeError(f"{text!r}: {port!r} is not a port 1-65535")
    return host, int(port) if port else None


def _speaker_arg(text: str) -> tuple[str, int]:
    host, port = _host_port_arg(text)
    return host, port if port is not None else DEFAULT_PORTS["bgp-speaker"]


def _vip_arg(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an IP address") from None


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value <= 60:
        raise argparse.ArgumentTypeError(f"{text!r} is not between 0 and 60 seconds")
    return value


def add_parser(sub: Any) -> None:
    """Register `kube2ipvs doctor` on the CLI's subparsers."""
    p = sub.add_parser(
        "doctor", help="run the troubleshooting guide's checks on this director or node host",
        description="Run the troubleshooting guide's checks on this host (a director or a node): the local "
        "service's health, IPVS (or nftables dataplane) rules against the desired ones, IPVS timeouts and "
        "connection states, ARP sysctls, VIP addresses, gobgpd peers and adj-out, the realserver's nft table "
        "and RST counters, NATS, and `curl VIP:70`. Prints PASS/WARN/FAIL/SKIP with the fix; exit 0 when "
        "nothing FAILs, 1 otherwise. Run it as root in the host's network namespace.")
    p.add_argument("--role", choices=("director", "realserver", "auto"), default="auto",
                   help="which service runs here (default auto: the one that answers)")
    p.add_argument("--listen-address", type=_host_port_arg, default=("127.0.0.1", None), metavar="ADDR[:PORT]",
                   help="where the local service serves /healthz (default 127.0.0.1, the role's default port)")
    p.add_argument("--speaker-address", type=_speaker_arg, metavar="ADDR[:PORT]",
                   help="the bgp-speaker on a director host (default: the --listen-address host, port 9873)")
    p.add_argument("--nats", metavar="URL", help="NATS server to try (default: the one the service uses)")
    p.add_argument("--vip-check", type=_vip_arg, action="append", default=[], metavar="VIP",
                   help="VIP to curl on --unicorns-port, repeatable (default: the service's VIPs)")
    p.add_argument("--unicorns-port", type=int, default=70, metavar="PORT", help="default 70")
    p.add_argument("--interface", metavar="DEV", help="the primary interface (default: the service's, else "
                   "the default route's)")
    p.add_argument("--rst-interval", type=_seconds, default=1.0, metavar="S",
                   help="time between the two reads of the RST counters (default 1)")
    p.add_argument("--timeout", type=_seconds, default=3.0, metavar="S", help="per request (default 3)")
    p.add_argument("--json", action="store_true", help="a JSON list of the results")
    p.add_argument("--token", metavar="TOKEN", help="bearer token of the services' /config (--config-token); "
                                                    "default $KUBE2IPVS_CONFIG_TOKEN")
    p.set_defaults(handler=cmd_doctor)
