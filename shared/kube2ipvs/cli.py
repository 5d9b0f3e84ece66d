"""`kube2ipvs`: one command for every role and every operator tool.

Roles (watcher, director, bgp-speaker, realserver) are found through the `kube2ipvs.roles`
entry-point group and imported only when run, so this module never imports a service and each
service can be installed on its own.

Exit codes: 0 success; 1 the input was read but is invalid (a rejected config); 2 usage errors
(bad flags, unreadable files). User errors are one clear line each, never a traceback.
"""

from __future__ import annotations

import argparse
import ipaddress
import re
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, NoReturn, TextIO

from kube2ipvs import __version__
from kube2ipvs.bgp import parse_community
from kube2ipvs.ipvs import MODES
from kube2ipvs.kube import (
    ObjectFileError,
    load_objects_text,
    parse_endpointslices,
    parse_nodes,
    parse_services,
)
from kube2ipvs.lbconfig import (
    ConfigError,
    DefaultService,
    LBConfig,
    load_config_document,
    with_default_service,
)
from kube2ipvs.model import ClusterState, Skip
from kube2ipvs.normalize import normalize
from kube2ipvs.render import FORMATS, RenderError, render_format

ROLE_GROUP = "kube2ipvs.roles"
ROLES = ("watcher", "director", "bgp-speaker", "realserver")
MAX_INPUT_BYTES = 512 * 1024 * 1024


class UsageError(Exception):
    """A user error: printed as one line, exit code 2."""


def _read(path: str, what: str) -> bytes:
    try:
        p = Path(path)
        if p.is_file() and p.stat().st_size > MAX_INPUT_BYTES:
            raise UsageError(f"{what} {path}: larger than {MAX_INPUT_BYTES} bytes")
        return sys.stdin.buffer.read() if path == "-" else p.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def _address(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an IP address") from None


def _cidr(text: str) -> str:
    try:
        return str(ipaddress.ip_network(text, strict=False))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a CIDR") from None


def _communities(text: str) -> tuple[str, ...]:
    try:
        return tuple(parse_community(c.strip()) for c in text.split(",") if c.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port 1-65535")
    return int(text)


def _interface(text: str) -> str:
    if not text or len(text) > 15 or any(c in text for c in " /\t\n") or text in (".", ".."):
        raise argparse.ArgumentTypeError(f"{text!r} is not a network interface name")
    return text


# ---------------------------------------------------------------------------------------------
# rules


def load_state(args: argparse.Namespace, err: TextIO) -> ClusterState:
    """Read the four files of `rules` and normalize them; UsageError/ConfigError on bad input."""
    missing = [f"--{n}" for n in ("configmap", "nodes", "services", "endpointslices") if getattr(args, n) is None]
    if missing:
        raise UsageError(
            f"{', '.join(missing)} required: give the files `kubectl get ... -o json` wrote "
            "(reading a live cluster comes with the watcher)"
        )
    config, _key = load_config_document(_read(args.configmap, "configmap"), args.config_key)
    for warning in config.warnings:
        print(f"warning: {warning}", file=err)
    config = _apply_default_service(config, args)
    skips: list[Skip] = []
    try:
        nodes, s1 = parse_nodes(load_objects_text(_read(args.nodes, "nodes"), source=args.nodes))
        services, s2 = parse_services(load_objects_text(_read(args.services, "services"), source=args.services))
        slices, s3 = parse_endpointslices(
            load_objects_text(_read(args.endpointslices, "endpointslices"), source=args.endpointslices)
        )
    except ObjectFileError as exc:
        raise UsageError(str(exc)) from None
    skips.extend([*s1, *s2, *s3])
    return normalize(nodes, services, slices, config, exclude_cordoned=args.exclude_cordoned, skipped=skips)


def _apply_default_service(config: LBConfig, args: argparse.Namespace) -> LBConfig:
    if args.default_service is None:
        return config
    try:
        default = DefaultService.parse(args.default_service, args.default_port)
    except ValueError as exc:
        raise UsageError(f"--default-service: {exc}") from None
    return with_default_service(config, default)


def render(state: ClusterState, args: argparse.Namespace) -> str:
    try:
        return render_format(
            state, args.format, node=args.node, mode=args.mode, nexthop=args.nexthop, nexthop6=args.nexthop6,
            communities=args.communities, interface=args.interface,
            masquerade_exempt=args.masquerade_exempt if args.masquerade else None,
        )
    except RenderError as exc:
        if exc.problem == "node required":
            raise UsageError(f"--format {exc.fmt} renders one realserver's rules: choose it with --node "
                             f"(nodes: {exc.nodes})") from None
        raise UsageError(f"--node {exc.node}: no such node (nodes: {exc.nodes})") from None


def cmd_rules(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    if args.masquerade_exempt and not args.masquerade:
        raise UsageError("--masquerade-exempt needs --masquerade")
    state = load_state(args, err)
    text = render(state, args)
    if not args.quiet:
        for skip in state.skipped:
            print(f"note: {skip.subject}: {skip.reason}", file=err)
    out.write(text)
    return 0


# ---------------------------------------------------------------------------------------------
# validate-config


def cmd_validate_config(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    data = _read(args.file, "config")
    try:
        config, key = load_config_document(data, args.config_key)
    except ConfigError as exc:
        print(f"{args.file}: invalid LB config ({len(exc.issues)} error{'s' * (len(exc.issues) != 1)})",
              file=err)
        for issue in exc.issues:
            print(f"  {issue}", file=err)
        return 1
    for warning in config.warnings:
        print(f"warning: {warning}", file=err)
    where = f" (key {key})" if key else ""
    enabled = len(config.enabled_keys())
    print(f"{args.file}{where}: valid: {len(config.vips())} VIPs, {len(config.entries)} VIP:ports, "
          f"{enabled} enabled VIP:port/protocols", file=out)
    return 0


# ---------------------------------------------------------------------------------------------
# roles


def _role_runner(role: str) -> Callable[[Sequence[str]], int] | None:
    for ep in entry_points(group=ROLE_GROUP):
        if ep.name == role:
            runner: Callable[[Sequence[str]], int] = ep.load()
            return runner
    return None


def cmd_role(role: str, argv: Sequence[str], err: TextIO) -> int:
    runner = _role_runner(role)
    if runner is None:
        print(f"kube2ipvs: the {role} role is not installed in this build", file=err)
        return 2
    return runner(argv)


# ---------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kube2ipvs", description="Bare-metal Kubernetes load balancer: roles and operator tools.")
    parser.add_argument("--version", action="version", version=f"kube2ipvs {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    rules = sub.add_parser(
        "rules",
        help="print the cardinal rules from `kubectl get -o json` files",
        description="Print the rules every component would apply, from `kubectl get ... -o json` files "
        "(a List or a single object per file). Notes on what was left out, and why, go to stderr.",
    )
    rules.add_argument("--configmap", metavar="F", help="the LB ConfigMap (JSON/YAML), or its bare JSON value")
    rules.add_argument("--nodes", metavar="F", help="kubectl get nodes -o json")
    rules.add_argument("--services", metavar="F", help="kubectl get services -A -o json")
    rules.add_argument("--endpointslices", metavar="F", help="kubectl get endpointslices -A -o json")
    rules.add_argument("--config-key", metavar="K", help="ConfigMap data key (optional when it has one key)")
    rules.add_argument("--format", choices=FORMATS, default="ipvsadm", help="output format (default ipvsadm)")
    rules.add_argument("--node", metavar="NAME", help="the realserver whose rules to print (nft, iptables, json)")
    rules.add_argument("--mode", choices=MODES, default="arp",
                       help="director mode: the default scheduler is wrr for arp, mh for bgp (default arp)")
    rules.add_argument("--default-service", metavar="NS/SVC:PORTNAME",
                       help='the "unicorns" service to add on --default-port of every pool VIP')
    rules.add_argument("--default-port", type=_port, default=70, metavar="PORT", help="default 70")
    rules.add_argument("--exclude-cordoned", action="store_true", help="cordoned nodes are not backends")
    rules.add_argument("--nexthop", type=_address, metavar="IP", help="BGP next hop of IPv4 VIPs (default self)")
    rules.add_argument("--nexthop6", type=_address, metavar="IP", help="BGP next hop of IPv6 VIPs (default self)")
    rules.add_argument("--communities", type=_communities, default=(), metavar="C[,C...]",
                       help="BGP communities, e.g. 64512:100")
    rules.add_argument("--interface", type=_interface, default="eth0", metavar="IF",
                       help="interface of gratuitous ARPs (arp format, default eth0)")
    rules.add_argument("--masquerade", action="store_true",
                       help="realserver masquerades VIP traffic (off by default: client IPs are preserved)")
    rules.add_argument("--masquerade-exempt", type=_cidr, action="append", default=[], metavar="CIDR",
                       help="sources never masqueraded (the pod CIDRs); repeatable")
    rules.add_argument("-q", "--quiet", action="store_true", help="no notes on stderr")
    rules.set_defaults(handler=cmd_rules)

    validate = sub.add_parser(
        "validate-config",
        help="validate an LB config: exit 0 when valid, else 1 and every error with its JSON path",
        description="Validate an LB config: a ConfigMap (JSON or YAML) or the bare JSON value. "
        "Exit 0 when valid; otherwise exit 1 and list every error with its JSON path.",
    )
    validate.add_argument("file", metavar="FILE", help="ConfigMap file or bare JSON value ('-' for stdin)")
    validate.add_argument("--config-key", metavar="K", help="ConfigMap data key (optional when it has one key)")
    validate.set_defaults(handler=cmd_validate_config)

    from kube2ipvs.publish import add_parser as add_publish_config  # kubernetes-asyncio loads only when run

    add_publish_config(sub)

    lab = sub.add_parser("lab", help="the whole system on this host, in network namespaces (root)",
                         description="Run the whole system on this host in network namespaces: a client, an FRR "
                         "router, two BGP directors, compute nodes with pods, NATS and the watcher reading "
                         "lab/cluster/. Needs root.")
    lab_sub = lab.add_subparsers(dest="lab_command", metavar="up|status|down|probe|restart", parser_class=_Parser,
                                 required=True)
    for name, text in (("up", "start the lab and return once every VIP answers"),
                       ("status", "what runs and whether it is healthy"),
                       ("down", "stop every process and delete every namespace the lab started"),
                       ("probe", "one request to a VIP from the client namespace"),
                       ("restart", "stop and start one component (e.g. nats, watcher, dir1-director)"),
                       ("run", "the lab's supervisor (started by `up`)")):
        lp = lab_sub.add_parser(name, help=text if name != "run" else argparse.SUPPRESS, description=text)
        lp.add_argument("--name", type=_lab_name, default="lab", help="the lab's name (default lab)")
        lp.add_argument("--state-root", type=Path, default=Path("/run/kube2ipvs-lab"), help=argparse.SUPPRESS)
        if name in ("up", "run"):
            lp.add_argument("--cluster", type=Path, default=Path("lab/cluster"), metavar="DIR",
                            help="directory of Nodes, Services, EndpointSlices and the LB ConfigMap "
                                 "(default lab/cluster)")
        if name == "status":
            lp.add_argument("--json", action="store_true", help="machine-readable")
        if name == "probe":
            lp.add_argument("url", metavar="URL", help="http://VIP:PORT/ or udp://VIP:PORT")
        if name == "restart":
            lp.add_argument("component", metavar="COMPONENT", help="a process of `kube2ipvs lab status`")
        lp.set_defaults(handler=cmd_lab)

    from kube2ipvs.collectcmd import add_collect_command  # aiohttp only loads when collect runs

    add_collect_command(sub)

    from kube2ipvs.doctorio import add_parser as add_doctor  # pyroute2 and libnftables load only when it runs

    add_doctor(sub)

    for role in ROLES:
        rp = sub.add_parser(role, help=f"run the {role} service", add_help=False)
        rp.add_argument("role_args", nargs=argparse.REMAINDER)
        rp.set_defaults(role=role)
    return parser


# ---------------------------------------------------------------------------------------------
# lab


def _lab_name(text: str) -> str:
    from kube2ipvs.lab import LabUsageError, validate_name

    try:
        return validate_name(text)
    except LabUsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def cmd_lab(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    import json

    from kube2ipvs import lab
    from kube2ipvs.labplan import LabVip

    try:
        if args.lab_command == "up":
            return lab.lab_up(args.name, args.cluster, out, root=args.state_root)
        if args.lab_command == "run":
            return lab.supervise(args.name, args.cluster, args.state_root)
        if args.lab_command == "down":
            return lab.lab_down(args.name, out, root=args.state_root)
        if args.lab_command == "restart":
            started = lab.lab_control(args.name, "restart", args.component, root=args.state_root)
            print(f"{args.component} restarted: {started}", file=out)
            return 0
        if args.lab_command == "status":
            report = lab.status(args.name, root=args.state_root)
            if args.json:
                out.write(json.dumps(report, indent=2) + "\n")
            else:
                lab.print_status(report, out)
            return 0 if report["phase"] == "ready" else 1
        match = re.fullmatch(r"(http|udp)://([0-9.]+):(\d+)/?", args.url)
        if match is None:
            raise UsageError(f"{args.url!r}: give http://VIP:PORT/ or udp://VIP:PORT")
        record = lab.running(args.name, args.state_root)
        if record is None:
            raise UsageError(f"no lab named {args.name!r} is running")
        vip = LabVip(match[2], int(match[3]), "tcp" if match[1] == "http" else "udp")
        answer = lab.probe(record.client_namespace, vip, timeout=2.0)
        if answer is None:
            print(f"no answer from {args.url}", file=err)
            return 1
        print(answer, file=out)
        return 0
    except lab.LabUsageError as exc:
        raise UsageError(str(exc)) from None


def main(argv: Sequence[str] | None = None, *, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ROLES:
        return cmd_role(argv[0], argv[1:], err)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        handler: Any = getattr(args, "handler", None)
        if handler is None:
            parser.print_help(err)
            return 2
        result: int = handler(args, out, err)
        return result
    except UsageError as exc:
        print(f"error: {exc}", file=err)
        return 2
    except ConfigError as exc:
        print(f"error: invalid LB config ({len(exc.issues)} error{'s' * (len(exc.issues) != 1)}):", file=err)
        for issue in exc.issues:
            print(f"  {issue}", file=err)
        return 1
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
