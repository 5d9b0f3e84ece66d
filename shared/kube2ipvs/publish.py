"""`kube2ipvs publish-config`: validate an LB config file, show its diff against the ConfigMap in the
cluster, and write it with optimistic concurrency.

One request at a time, in this order: GET the ConfigMap, then (unless it is unchanged, refused or a
dry run) PUT it with the resourceVersion the GET returned, or POST it when it was absent. A 409 on
either write means someone else wrote in between: nothing of ours was written, and a re-run shows
the diff against their version. An invalid file never reaches the API.

Exit codes (as for every command): 0 published, unchanged, or a dry run that would publish; 1 the
config is invalid, the removal is refused, the write lost a race, or the server refused the object;
2 usage errors and an unusable cluster connection (kubeconfig, unreachable, unauthorized, forbidden).

kubernetes-asyncio (slow to import) is imported only when the command runs, by `configmapapi`.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol, TextIO

from kube2ipvs.lbconfig import ConfigError
from kube2ipvs.publishplan import CONFIRM_ANNOTATION, Plan, Source, plan_publish, read_source, render_diff

JSON = dict[str, Any]
DEFAULT_TIMEOUT: Final = 30.0
MAX_FILE_BYTES: Final = 512 * 1024 * 1024  # as cli.MAX_INPUT_BYTES: larger files are usage errors there too

_DNS1123_LABEL: Final = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?\Z")
_DNS1123_SUBDOMAIN: Final = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*\Z")
_DATA_KEY: Final = re.compile(r"[-._a-zA-Z0-9]+\Z")


class KubeAccessError(Exception):
    """No usable connection to the API server (kubeconfig, network, timeout): exit 2."""


class KubeStatusError(Exception):
    """The API server answered with an error Status."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}" if reason else f"{status}: {message}")
        self.status = status
        self.reason = reason
        self.message = message


class ConfigMapAPI(Protocol):
    """The three requests publish-config makes. `get` returns None when the ConfigMap is absent;
    all raise KubeAccessError or KubeStatusError."""

    async def get(self, namespace: str, name: str) -> JSON | None: ...

    async def create(self, namespace: str, body: JSON) -> JSON: ...

    async def replace(self, namespace: str, name: str, body: JSON) -> JSON: ...


@dataclass(frozen=True, slots=True)
class Target:
    namespace: str
    name: str
    key: str

    def __str__(self) -> str:
        return f"configmap {self.namespace}/{self.name}"


class _FailedError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


# ---- the command -----------------------------------------------------------------------------------


def cmd_publish_config(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    target = Target(args.namespace, args.name, args.key)
    try:
        source = _read_source(args.file, target, err)
        if source is None:
            return 1
        return asyncio.run(_run(args, source, target, out, err))
    except _FailedError as exc:
        print(f"error: {exc}", file=err)
        return exc.code


def _read_source(path: str, target: Target, err: TextIO) -> Source | None:
    try:
        p = Path(path)
        if p.is_file() and p.stat().st_size > MAX_FILE_BYTES:
            raise _FailedError(2, f"config {path}: larger than {MAX_FILE_BYTES} bytes")
        data = sys.stdin.buffer.read() if path == "-" else p.read_bytes()
    except OSError as exc:
        raise _FailedError(2, f"cannot read config {path}: {exc.strerror or exc}") from None
    try:
        source = read_source(data, target.key)
    except ConfigError as exc:
        # The same report as validate-config.
        print(f"{path}: invalid LB config ({len(exc.issues)} error{'s' * (len(exc.issues) != 1)})", file=err)
        for issue in exc.issues:
            print(f"  {issue}", file=err)
        return None
    for warning in source.config.warnings:
        print(f"warning: {warning}", file=err)
    named = (source.file_namespace or target.namespace, source.file_name or target.name)
    if named != (target.namespace, target.name):
        raise _FailedError(2, f"{path} is the ConfigMap {named[0]}/{named[1]}, but --namespace/--name say "
                         f"{target.namespace}/{target.name}")
    if source.other_keys:
        print(f"note: only key {target.key} is published; the file's other keys ({', '.join(source.other_keys)}) "
              "are not", file=err)
    return source


async def _run(args: argparse.Namespace, source: Source, target: Target, out: TextIO, err: TextIO) -> int:
    from kube2ipvs.configmapapi import connect

    try:
        async with connect(args.kubeconfig, args.context, timeout=args.timeout) as api:
            return await publish(api, source, target, file=args.file, dry_run=args.dry_run, force=args.force,
                                 out=out, err=err)
    except KubeAccessError as exc:
        raise _FailedError(2, str(exc)) from None


async def publish(api: ConfigMapAPI, source: Source, target: Target, *, file: str, dry_run: bool, force: bool,
                  out: TextIO, err: TextIO) -> int:
    """Read, diff, and write (unless unchanged, refused or a dry run); returns the exit code.

    The diff and outcome go to `out`; notes and errors, one line each, to `err`."""
    try:
        return await _publish(api, source, target, file=file, dry_run=dry_run, force=force, out=out, err=err)
    except KubeAccessError as exc:
        print(f"error: {exc}", file=err)
        return 2
    except _FailedError as exc:
        print(f"error: {exc}", file=err)
        return exc.code


async def _publish(api: ConfigMapAPI, source: Source, target: Target, *, file: str, dry_run: bool, force: bool,
                   out: TextIO, err: TextIO) -> int:
    try:
        live = await api.get(target.namespace, target.name)
    except KubeStatusError as exc:
        raise _FailedError(2, f"cannot read {target}: {_explain(exc)}") from None
    plan = plan_publish(live, source, namespace=target.namespace, name=target.name, key=target.key, force=force)
    _show(plan, target, file, out, err)
    if plan.action == "none":
        print("no changes", file=out)
        return 0
    if plan.refused:
        print(f"error: refusing to publish: it {plan.removal.describe()}. Check the diff above; to publish it "
              "anyway, re-run with --force", file=err)
        return 1
    verb = "create" if plan.action == "create" else "update"
    if dry_run:
        print(f"dry run: would {verb} {target} key {target.key}; nothing was written", file=out)
        return 0
    assert plan.body is not None
    try:
        if plan.action == "create":
            written = await api.create(target.namespace, plan.body)
        else:
            written = await api.replace(target.namespace, target.name, plan.body)
    except KubeStatusError as exc:
        raise _write_failed(exc, plan, target) from None
    rv = (written.get("metadata") or {}).get("resourceVersion")
    since = f"{plan.live_resource_version} -> " if plan.live_resource_version else ""
    print(f"{verb}d {target} key {target.key} (resourceVersion {since}{rv})", file=out)
    return 0


def _show(plan: Plan, target: Target, file: str, out: TextIO, err: TextIO) -> None:
    for note in plan.notes:
        print(f"note: {note}", file=err)
    live = (f"{target} key {target.key} (resourceVersion {plan.live_resource_version})"
            if plan.action != "create" else f"{target}: absent, it will be created")
    print(f"--- {live}", file=out)
    print(f"+++ {file}", file=out)
    for line in render_diff(plan.diff):
        print(line, file=out)
    d = plan.diff
    if d:
        print(f"{d.count('added')} added, {d.count('removed')} removed, {d.count('changed')} changed "
              f"VIP:port/protocols ({plan.removal.in_force} in force now)", file=out)
    elif plan.action != "none" and plan.text_changed:
        print("no change to the rules; the text differs (formatting or ignored keys)", file=out)
    if plan.forced and plan.action != "none":
        print(f"confirming for the watcher: annotation {CONFIRM_ANNOTATION}", file=out)


def _explain(exc: KubeStatusError) -> str:
    if exc.status == 401:
        return f"unauthorized (401): the kubeconfig's credentials were refused{_detail(exc)}"
    if exc.status == 403:
        return f"forbidden (403){_detail(exc)}"
    return f"the API server answered {exc.status} {exc.reason}{_detail(exc)}".rstrip()


def _detail(exc: KubeStatusError) -> str:
    message = " ".join(exc.message.split())
    return f": {message[:300]}" if message else ""


def _write_failed(exc: KubeStatusError, plan: Plan, target: Target) -> _FailedError:
    again = "nothing was written; re-run publish-config to see the diff against the current version"
    if exc.status == 409:
        if plan.action == "create":
            return _FailedError(1, f"{target} was created by someone else after it was read; {again}")
        return _FailedError(1, f"{target} was changed by someone else since it was read (resourceVersion "
                          f"{plan.live_resource_version}); {again}")
    if exc.status == 404:
        if plan.action == "create":
            return _FailedError(2, f"cannot create {target}: the namespace {target.namespace} must exist "
                              f"(kubectl create namespace {target.namespace}){_detail(exc)}")
        return _FailedError(1, f"{target} was deleted by someone else since it was read; {again}")
    if exc.status in (400, 422):
        return _FailedError(1, f"the API server refused {target}{_detail(exc)}")
    code = 2 if exc.status in (401, 403) else 1
    return _FailedError(code, f"cannot write {target}: {_explain(exc)}")


# ---- registration ----------------------------------------------------------------------------------


def _checked(pattern: re.Pattern[str], what: str, limit: int) -> Any:
    def check(text: str) -> str:
        if len(text) > limit or not pattern.match(text):
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid {what}")
        return text
    return check


def _timeout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds (0-3600)")
    return value


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register `publish-config` on the CLI's subparsers."""
    p: argparse.ArgumentParser = sub.add_parser(
        "publish-config",
        help="validate an LB config, show its diff against the cluster's ConfigMap, and publish it",
        description="Validate FILE as validate-config does (a ConfigMap, JSON or YAML, or the bare JSON value), "
        "show what changes against the ConfigMap's key in the cluster (by VIP:port/protocol), and write it: "
        "a PUT with the resourceVersion that was read (someone else's write in between fails, nothing is "
        "written), or a create when the ConfigMap is absent. Only that key changes. A config that would remove "
        "more than half of the live VIP:port/protocols (or all of them) is refused without --force.",
    )
    p.add_argument("file", metavar="FILE", help="ConfigMap file or bare JSON value ('-' for stdin)")
    p.add_argument("--namespace", required=True, metavar="NS", type=_checked(_DNS1123_LABEL, "namespace", 63),
                   help="the ConfigMap's namespace (it must exist)")
    p.add_argument("--name", required=True, metavar="NAME", type=_checked(_DNS1123_SUBDOMAIN, "ConfigMap name", 253),
                   help="the ConfigMap's name")
    p.add_argument("--key", required=True, metavar="K", type=_checked(_DATA_KEY, "ConfigMap data key", 253),
                   help="the data key that holds the config (also the key read from a ConfigMap FILE)")
    p.add_argument("--dry-run", action="store_true", help="show the diff and what would be done; write nothing")
    p.add_argument("--force", action="store_true",
                   help=f"publish a mass removal, and confirm it for the watcher ({CONFIRM_ANNOTATION})")
    p.add_argument("--kubeconfig", metavar="PATH", help="default: $KUBECONFIG, ~/.kube/config, or in-cluster")
    p.add_argument("--context", metavar="NAME", help="kubeconfig context (default: its current context)")
    p.add_argument("--timeout", type=_timeout, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                   help=f"per request (default {DEFAULT_TIMEOUT:g})")
    p.set_defaults(handler=cmd_publish_config)
    return p
