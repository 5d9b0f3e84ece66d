"""`kube2ipvs watcher`: flags, wiring, and staged shutdown.

Start-up: status server (with the status page, `/ui`), NATS, then the source (Kubernetes or a
directory) and, with the Kubernetes source, the leader election. The status board `/ui` reads
connects in the background. Shutdown on SIGTERM: stop consuming and publishing, then release the
Lease (a standby takes over at once), then close NATS and the status server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kube2ipvs.lbconfig import DefaultService, parse_label_selector
from kube2ipvs.natskv import KVPublisher, StatusBoard
from kube2ipvs.roleargs import (
    RoleParser,
    RoleUsageError,
    add,
    add_common,
    listen_hosts,
    nats_settings,
    positive_float,
    run_role,
    share,
)
from kube2ipvs.statusserver import StatusServer
from kube2ipvs_watcher.app import AppSettings, EventSink, Leadership, Source, WatcherApp
from kube2ipvs_watcher.core import WatcherCore, WatcherSettings
from kube2ipvs_watcher.files import FileSource
from kube2ipvs_watcher.uiroute import StatusPageRoute

log = logging.getLogger("kube2ipvs.watcher")


def build_parser() -> argparse.ArgumentParser:
    p = RoleParser(prog="kube2ipvs watcher",
                   description="Watch Kubernetes (or a directory of objects) and publish the normalized "
                               "cluster state to NATS JetStream.")
    add(p, "--source", choices=("kubernetes", "files"), default="kubernetes", help="where objects come from")
    add(p, "--files", metavar="DIR", help="directory of Kubernetes objects (with --source files)")
    add(p, "--files-interval", type=positive_float, default=1.0, metavar="S",
        help="poll interval of --files (inotify reads a change at once; the poll catches what it cannot see)")
    add(p, "--kubeconfig", metavar="FILE", help="kubeconfig (default: in-cluster, then KUBECONFIG, ~/.kube/config)")
    add(p, "--configmap-namespace", default="platform-load-balancer", help="namespace of the LB ConfigMap")
    add(p, "--configmap-name", default="kube2ipvs", help="name of the LB ConfigMap")
    add(p, "--config-key", metavar="K", help="data key of the ConfigMap (optional when it has one key)")
    add(p, "--configmap-selector", type=label_selector, metavar="KEY=VALUE[,...]",
        help="a config split over several ConfigMaps (one holds at most 1 MiB, about 10,000 VIP:ports): every "
             "ConfigMap of --configmap-namespace with these labels, merged; replaces --configmap-name")
    add(p, "--default-service", metavar="NS/SVC:PORTNAME", help='the "unicorns" service on every pool VIP')
    add(p, "--default-port", type=int, default=70, metavar="PORT", help="port of --default-service (default 70)")
    add(p, "--exclude-cordoned", action="store_true", help="cordoned nodes are not backends")
    add(p, "--max-removal-share", type=share, default=0.5, metavar="F",
        help="hold back configs removing more than this share of what is in force (default 0.5)")
    add(p, "--min-interval", type=positive_float, default=0.2, metavar="S",
        help="at most one publish per this many seconds; bursts coalesce (default 0.2)")
    add(p, "--leader-elect", action=argparse.BooleanOptionalAction, default=True,
        help="elect one publishing replica with a Lease (Kubernetes source only)")
    add(p, "--lease-namespace", default="platform-load-balancer", help="namespace of the Lease")
    add(p, "--lease-name", default="kube2ipvs-watcher", help="name of the Lease")
    add(p, "--identity", default=socket.gethostname(), help="this replica's identity in the Lease")
    add_common(p, "watcher")
    return p


def label_selector(text: str) -> tuple[tuple[str, str], ...]:
    try:
        return parse_label_selector(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def watcher_settings(args: argparse.Namespace) -> WatcherSettings:
    default = None
    if args.default_service:
        try:
            default = DefaultService.parse(args.default_service, args.default_port)
        except ValueError as exc:
            raise RoleUsageError(f"--default-service: {exc}") from None
    return WatcherSettings(
        configmap_namespace=args.configmap_namespace, configmap_name=args.configmap_name,
        config_key=args.config_key, configmap_selector=args.configmap_selector, default_service=default,
        exclude_cordoned=args.exclude_cordoned,
        max_removal_share=args.max_removal_share,
    )


async def _kubernetes(args: argparse.Namespace) -> tuple[Source, Leadership | None, EventSink, Any]:
    from kube2ipvs.kubeclient import load_api_client
    from kube2ipvs_watcher import kube

    client = await load_api_client(args.kubeconfig)
    source = kube.KubeSource(client, configmap_namespace=args.configmap_namespace,
                             configmap_name=args.configmap_name, configmap_selector=args.configmap_selector)
    leadership = None
    if args.leader_elect:
        leadership = kube.LeaderElector(client, namespace=args.lease_namespace, name=args.lease_name,
                                        identity=args.identity)
    return source, leadership, kube.EventRecorder(client), client


async def amain(args: argparse.Namespace, stop: asyncio.Event) -> int:
    settings = watcher_settings(args)
    nats = nats_settings(args, name=f"kube2ipvs-watcher-{args.identity}")
    leadership: Leadership | None = None
    events: EventSink | None = None
    client: Any = None
    source: Source
    if args.source == "files":
        if not args.files:
            raise RoleUsageError("--source files needs --files DIR")
        if not Path(args.files).is_dir():
            raise RoleUsageError(f"--files {args.files}: not a directory")
        source = FileSource(Path(args.files), interval=args.files_interval)
    else:
        source, leadership, events, client = await _kubernetes(args)

    # `app` does not exist yet; the lambda looks it up when NATS reconnects.
    publisher = KVPublisher(nats, on_reconnect=lambda: app.nats_reconnected())  # noqa: PLW0108
    app = WatcherApp(
        WatcherCore(settings, clock=asyncio.get_running_loop().time),
        source=source, publisher=publisher, leadership=leadership, events=events,
        settings=AppSettings(min_interval=args.min_interval),
        describe={"source": args.source, "configmap": f"{settings.configmap_namespace}/{settings.configmap_name}"
                  if settings.configmap_selector is None else f"{settings.configmap_namespace}/*, labelled "
                  + ",".join(f"{k}={v}" for k, v in settings.configmap_selector),
                  "config_key": settings.config_key, "max_removal_share": settings.max_removal_share,
                  "min_interval": args.min_interval, "nats": nats.describe(),
                  "leader_elect": leadership is not None, "identity": args.identity},
    )
    host, port = args.listen
    board = StatusBoard(nats)  # read by /ui: every director's (and any role's) published status
    server = StatusServer(host=listen_hosts(host), port=port, health=app.health, config=app.config,
                          registry=app.registry, config_token=args.config_token,
                          pages={"/ui": StatusPageRoute(app, board, identity=args.identity)})
    await server.start()
    board_start = asyncio.create_task(board.start(), name="status-board")  # connects in the background
    board_start.add_done_callback(_board_failed)
    log.info("event=started role=watcher listen=%s source=%s", server.listening, args.source)
    try:
        if not await _until_stopped(publisher.start(), stop):
            return 0
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(app.run())]
            if leadership is not None:
                tasks.append(tg.create_task(leadership.run()))
            await stop.wait()
            log.info("event=stopping role=watcher")
            tasks[0].cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await tasks[0]
            for task in tasks[1:]:  # the Lease goes last: a standby takes over once we are quiet
                task.cancel()
    finally:
        board_start.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await board_start
        await board.close()
        await publisher.close()
        await server.stop()
        if client is not None:
            await client.close()
    return 0


def _board_failed(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:  # /ui then says the board is unavailable
        log.warning("event=status-board-failed error=%r", exc)


async def _until_stopped(coro: Any, stop: asyncio.Event) -> bool:
    """Await `coro` unless `stop` is set first (then cancel it and return False)."""
    task = asyncio.ensure_future(coro)
    stopper = asyncio.ensure_future(stop.wait())
    await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    stopper.cancel()
    if task.done():
        task.result()
        return True
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return False


def run(argv: Sequence[str]) -> int:
    return run_role("watcher", argv, build_parser, amain)
