"""Command-line plumbing every role shares: flags with environment fallbacks, NATS and listen flags,
logging, and running a role's main coroutine with SIGTERM/SIGINT handling.

Every flag `--some-flag` also reads `KUBE2IPVS_SOME_FLAG` from the environment (the flag wins),
which is how the Kubernetes manifests configure the roles.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any, Final, NoReturn

from kube2ipvs.natskv import DEFAULT_BUCKET, NatsSettings

ENV_PREFIX = "KUBE2IPVS_"
DEFAULT_PORTS = {"watcher": 9871, "director": 9872, "bgp-speaker": 9873, "realserver": 9874}


class RoleUsageError(Exception):
    """A bad flag or setting of a role: one line, exit code 2."""


class RoleParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise RoleUsageError(f"{self.prog}: {message}")


def env_name(flag: str) -> str:
    return ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()


def add(parser: argparse.ArgumentParser, flag: str, *, default: Any = None, **kwargs: Any) -> None:
    """`parser.add_argument(flag, ...)` whose default comes from KUBE2IPVS_<FLAG> when set."""
    env = os.environ.get(env_name(flag))
    action = kwargs.get("action")
    if env is not None:
        if action in ("store_true", "store_false"):
            default = env.strip().lower() in ("1", "true", "yes", "on")
        elif action == "append":
            default = [v for v in env.split(",") if v]
        else:
            convert = kwargs.get("type")
            try:
                default = convert(env) if convert is not None else env
            except (argparse.ArgumentTypeError, ValueError) as exc:
                raise RoleUsageError(f"{env_name(flag)}={env!r}: {exc}") from None
    help_text = kwargs.pop("help", "")
    kwargs["help"] = f"{help_text} [env {env_name(flag)}]".strip()
    parser.add_argument(flag, default=default, **kwargs)


def listen_address(text: str) -> tuple[str, int]:
    """HOST:PORT, [V6]:PORT, or :PORT for the default hosts (`listen_hosts`)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


# The downward-API variables the Kubernetes manifests set (status.podIP, status.hostIP).
ADDRESS_ENV: Final = ("POD_IP", "HOST_IP")


def route_source(family: socket.AddressFamily) -> str | None:
    """The address this host sends from on its default route, or None without one. A UDP
    connect only looks the route up; it sends nothing."""
    target = "192.0.2.1" if family == socket.AF_INET else "2001:db8::1"
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect((target, 9))
            address: str = s.getsockname()[0]
    except OSError:
        return None
    return address


def listen_hosts(host: str, env: Mapping[str, str] | None = None,
                 lookup: Callable[[socket.AddressFamily], str | None] = route_source) -> tuple[str, ...]:
    """Where the status server binds. An explicit host is used as given (0.0.0.0 included). The
    default is loopback (for doctor and local curl) plus this pod's or host's own address:
    POD_IP or HOST_IP when set, else the source address of the default route. Not 0.0.0.0: a
    realserver holds every VIP on lo and a director may too, and a wildcard socket would answer
    /config and /metrics on VIP:port to anyone the load balancer lets in."""
    if host:
        return (host,)
    env = os.environ if env is None else env
    for name in ADDRESS_ENV:
        value = env.get(name, "").strip()
        if value:
            try:
                return ("127.0.0.1", str(ipaddress.ip_address(value)))
            except ValueError:
                raise RoleUsageError(f"{name}={value!r} is not an IP address "
                                     "(it sets the default --listen host)") from None
    own = lookup(socket.AF_INET) or lookup(socket.AF_INET6)
    return ("127.0.0.1",) if own is None or own == "127.0.0.1" else ("127.0.0.1", own)


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number >= 0")
    return value


def share(text: str) -> float:
    value = positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a share between 0 and 1")
    return value


def add_common(parser: argparse.ArgumentParser, role: str) -> None:
    add(parser, "--listen", type=listen_address, default=("", DEFAULT_PORTS[role]),
        metavar="HOST:PORT", help=f"address of /healthz, /config, /metrics (default :{DEFAULT_PORTS[role]}: "
                                  "127.0.0.1 and this host's address, $POD_IP or $HOST_IP when set, else the "
                                  "default route's source; never the VIPs)")
    add(parser, "--config-token", metavar="TOKEN",
        help="require `Authorization: Bearer TOKEN` on /config (and /ui); /healthz and /metrics stay open "
             "(prefer the environment variable)")
    add(parser, "--log-level", choices=("debug", "info", "warning", "error"), default="info", help="log level")
    add(parser, "--nats", action="append", metavar="URL", help="NATS server URL, repeatable (default nats://127.0.0.1:4222)")
    add(parser, "--nats-bucket", default=DEFAULT_BUCKET, help=f"JetStream KV bucket (default {DEFAULT_BUCKET})")
    add(parser, "--nats-user", help="NATS user")
    add(parser, "--nats-password", help="NATS password (prefer the environment variable)")
    add(parser, "--nats-token", help="NATS token (prefer the environment variable)")
    add(parser, "--nats-creds", metavar="FILE", help="NATS credentials file (nkeys/JWT)")
    add(parser, "--nats-tls-ca", metavar="FILE", help="CA bundle that signs the NATS server's certificate")
    add(parser, "--nats-tls-cert", metavar="FILE", help="client certificate for NATS")
    add(parser, "--nats-tls-key", metavar="FILE", help="client key for NATS")


def nats_settings(args: argparse.Namespace, *, name: str) -> NatsSettings:
    for flag in ("nats_creds", "nats_tls_ca", "nats_tls_cert", "nats_tls_key"):
        path = getattr(args, flag)
        if path is not None and not os.path.isfile(path):
            raise RoleUsageError(f"--{flag.replace('_', '-')} {path}: no such file")
    return NatsSettings(
        servers=tuple(args.nats or ("nats://127.0.0.1:4222",)), bucket=args.nats_bucket,
        user=args.nats_user, password=args.nats_password, token=args.nats_token,
        creds_file=args.nats_creds, tls_ca_file=args.nats_tls_ca, tls_cert_file=args.nats_tls_cert,
        tls_key_file=args.nats_tls_key, name=name,
    )


def setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")


def run_role(
    prog: str, argv: Sequence[str], build: Callable[[], argparse.ArgumentParser],
    main: Callable[[argparse.Namespace, asyncio.Event], Coroutine[Any, Any, int]],
) -> int:
    """Parse flags, then run `main(args, stop)` until it returns; SIGTERM/SIGINT set `stop`."""
    try:
        args = build().parse_args(list(argv))
    except RoleUsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    setup_logging(args.log_level)

    async def runner() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        return await main(args, stop)

    try:
        return asyncio.run(runner())
    except RoleUsageError as exc:
        print(f"error: {prog}: {exc}", file=sys.stderr)
        return 2
