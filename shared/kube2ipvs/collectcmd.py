"""`kube2ipvs collect`: find every instance, ask each one for `/config` and `/healthz` (and a
director for its rules, `?format=ipvsadm` and `?format=desired`, and its metrics, for the count of
changes made by hand that it repaired), then report what `kube2ipvs.collect` concludes.

One event loop, one task per target, at most `--concurrency` of them asking at once. Each target
has `--timeout` seconds for all its requests together; a target that times out or cannot be
reached is reported and never holds up the others. On a terminal, stderr shows how many have
answered. aiohttp and kubernetes_asyncio are imported when the command runs, so every other
command starts without them; the Kubernetes part is one pod list.

Exit codes: 0 every instance answered, is healthy, and all directors hold the same rules; 1
anything else; 2 usage errors (bad flags, no cluster configuration for discovery).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from collections.abc import Coroutine, Sequence
from typing import TYPE_CHECKING, Any, Final, TextIO, TypeVar

from kube2ipvs.collect import (
    DRIFT_REPAIRS,
    Fetched,
    Target,
    build_report,
    metric_value,
    parse_targets,
    render_json,
    render_table,
    targets_from_pods,
)

if TYPE_CHECKING:
    import aiohttp

DEFAULT_NAMESPACE: Final = "platform-load-balancer"
DEFAULT_SELECTOR: Final = "app.kubernetes.io/part-of=kube2ipvs"
T = TypeVar("T")


class DiscoveryError(Exception):
    """Kubernetes could not be asked for the pods: one line, exit code 2."""


# ---- flags -----------------------------------------------------------------------------------------


def _targets(text: str) -> tuple[Target, ...]:
    try:
        return parse_targets(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value < 3600:
        raise argparse.ArgumentTypeError(f"{text!r}: give seconds between 0 and 3600")
    return value


def _count(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 1024:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number 1-1024")
    return int(text)


def add_collect_command(sub: Any) -> None:
    """Register `collect` on the CLI's subparsers (`sub` is argparse's _SubParsersAction)."""
    p: argparse.ArgumentParser = sub.add_parser(
        "collect",
        help="ask every instance for its health and config; report directors whose rules differ",
        description="Find every kube2ipvs instance (--targets, or the pods of --namespace matching "
        "--selector), fetch /config and /healthz from each (and the rules of every director), and report "
        "health, applied generation and rule counts per instance, every director whose rules differ from "
        "the others (with a diff), and every unreachable or unhealthy instance. Exit 0 when all agree "
        "and are healthy, else 1.",
    )
    p.add_argument("--targets", type=_targets, metavar="HOST:PORT[,...]",
                   help="instances to ask (the role comes from their /config); else Kubernetes is asked")
    p.add_argument("--namespace", default=DEFAULT_NAMESPACE, metavar="NS",
                   help=f"namespace of the pods (default {DEFAULT_NAMESPACE})")
    p.add_argument("--selector", default=DEFAULT_SELECTOR, metavar="LABELS",
                   help=f"label selector of the pods (default {DEFAULT_SELECTOR})")
    p.add_argument("--kubeconfig", metavar="FILE", help="default $KUBECONFIG, ~/.kube/config, else in-cluster")
    p.add_argument("--timeout", type=_seconds, default=5.0, metavar="S",
                   help="seconds each instance has for all its answers (default 5)")
    p.add_argument("--concurrency", type=_count, default=16, metavar="N",
                   help="instances asked at once (default 16)")
    p.add_argument("--format", choices=("table", "json"), default="table", help="output format (default table)")
    p.add_argument("--token", metavar="TOKEN", help="bearer token of the services' /config (--config-token); "
                                                    "default $KUBE2IPVS_CONFIG_TOKEN")
    p.set_defaults(handler=cmd_collect)


def cmd_collect(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    try:
        return asyncio.run(collect(args, out, err))
    except DiscoveryError as exc:
        print(f"error: collect: {exc}", file=err)
        return 2


async def collect(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    if args.targets:
        targets = list(args.targets)
    else:
        targets, notes = await discover(args.namespace, args.selector, kubeconfig=args.kubeconfig)
        for note in notes:
            print(f"note: {note}", file=err)
    if not targets:
        print(f"error: collect: no instances found (namespace {args.namespace}, selector {args.selector})",
              file=err)
        return 1
    fetched = await fetch_all(targets, timeout=args.timeout, concurrency=args.concurrency,
                              progress=err if err.isatty() else None,
                              token=args.token or os.environ.get("KUBE2IPVS_CONFIG_TOKEN") or None)
    report = build_report(fetched)
    out.write(render_json(report) if args.format == "json" else render_table(report))
    return report.exit_code()


# ---- fetching --------------------------------------------------------------------------------------


async def fetch_all(targets: Sequence[Target], *, timeout: float, concurrency: int,
                    progress: TextIO | None = None, token: str | None = None) -> list[Fetched]:
    import aiohttp

    gate = asyncio.Semaphore(concurrency)

    async def one(session: aiohttp.ClientSession, target: Target) -> Fetched:
        async with gate:
            return await fetch(session, target, timeout=timeout)

    results: list[Fetched] = []
    connector = aiohttp.TCPConnector(limit=concurrency * 4, force_close=True)
    headers = {"Authorization": f"Bearer {token}"} if token else None  # the services' --config-token
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None),
                                     headers=headers) as session:
        tasks = [asyncio.ensure_future(one(session, t)) for t in targets]
        for done in asyncio.as_completed(tasks):
            results.append(await done)
            if progress is not None:
                progress.write(f"\rcollect: {len(results)}/{len(targets)} answered")
                progress.flush()
    if progress is not None:
        progress.write("\r\033[K")
        progress.flush()
    return results


async def fetch(session: aiohttp.ClientSession, target: Target, *, timeout: float) -> Fetched:
    """Everything `target` answers within `timeout` seconds; never raises for the target's faults."""
    import aiohttp

    base = f"http://{target.address}"
    try:
        async with asyncio.timeout(timeout):
            (config_status, config_text), (health_status, health_text) = await _all(
                _get(session, base + "/config"), _get(session, base + "/healthz"))
            config = _json_object(config_text) if config_status == 200 else None
            if config is None:
                return Fetched(target, error=f"not a kube2ipvs service: /config answered {config_status}"
                               + ("" if config_status != 200 else " without a JSON object"))
            health = _json_object(health_text) if health_status in (200, 503) else None
            if (config.get("role") or target.role) != "director":
                return Fetched(target, config=config, health=health, health_status=health_status)
            (rules_status, rules), (desired_status, desired), (metrics_status, metrics) = await _all(
                _get(session, base + "/config?format=ipvsadm"), _get(session, base + "/config?format=desired"),
                _get(session, base + "/metrics"))
            return Fetched(target, config=config, health=health, health_status=health_status,
                           ipvsadm=rules if rules_status == 200 else None,
                           ipvsadm_problem=None if rules_status == 200 else (rules.strip() or f"HTTP {rules_status}"),
                           desired=desired if desired_status == 200 else None,
                           drift_repairs=metric_value(metrics, DRIFT_REPAIRS) if metrics_status == 200 else None)
    except TimeoutError:
        return Fetched(target, error=f"timeout: no complete answer within {timeout:g} s")
    except aiohttp.ClientConnectorError as exc:
        cause = exc.os_error
        return Fetched(target, error=f"unreachable: {os.strerror(cause.errno) if cause.errno else cause}")
    except (aiohttp.ClientError, OSError) as exc:
        return Fetched(target, error=f"unreachable: {type(exc).__name__}: {exc}")


async def _get(session: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    async with session.get(url, allow_redirects=False) as response:
        return response.status, await response.text(errors="replace")


async def _all(*requests: Coroutine[Any, Any, T]) -> list[T]:
    """Every result, in order; the first failure raised as itself (and the other requests cancelled)."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(r) for r in requests]
    except ExceptionGroup as failed:
        raise failed.exceptions[0] from None
    return [t.result() for t in tasks]


def _json_object(text: str) -> dict[str, Any] | None:
    try:
        doc = json.loads(text)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


# ---- Kubernetes ------------------------------------------------------------------------------------


async def discover(namespace: str, selector: str, *, kubeconfig: str | None = None) -> tuple[list[Target], list[str]]:
    """The targets of the pods matching `selector` in `namespace` (one list call)."""
    try:
        from kubernetes_asyncio import client

        from kube2ipvs.kubeclient import KubeConfigError, load_api_client
    except ImportError:
        raise DiscoveryError("kubernetes_asyncio is not installed: give --targets") from None
    try:
        api_client = await load_api_client(kubeconfig)
    except KubeConfigError as exc:
        raise DiscoveryError(f"{exc}: give --targets") from None
    async with api_client as api:
        try:
            response: Any = await client.CoreV1Api(api).list_namespaced_pod(
                namespace, label_selector=selector, _preload_content=False)
            body = await response.read()
            status = response.status
        except Exception as exc:  # the client raises aiohttp and its own errors alike: report, exit 2
            raise DiscoveryError(f"listing pods in {namespace}: {type(exc).__name__}: {exc}") from None
    doc = _json_object(body.decode(errors="replace"))
    if status != 200 or doc is None:
        message = (doc or {}).get("message") or f"HTTP {status}"
        raise DiscoveryError(f"listing pods in {namespace}: {message}")
    items = doc.get("items")
    return targets_from_pods(item for item in items if isinstance(item, dict)) if isinstance(items, list) \
        else ([], [])
