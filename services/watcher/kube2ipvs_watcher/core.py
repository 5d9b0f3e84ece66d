"""The watcher's state machine: source items in, the desired cluster state out. No I/O, no clock.

It parses each object as it arrives and keeps an incremental Normalizer up to date. It decides
which LB config is in force:
- a config that does not validate is rejected: the last good one stays in force;
- a config that would remove more than `max_removal_share` of what is in force is held back
  until the ConfigMap carries the annotation `kube2ipvs.io/confirm-removal: <token>`, where the
  token (reported with the hold) is derived from that exact config text, so a confirmation
  left behind never waves through a later config.
`ready` turns true only once every kind has had its initial list (Resync): nothing is published
from a partial picture.

A config too large for one ConfigMap (1 MiB, about 10,000 VIP:ports) is split over several:
with `configmap_selector`, the config is every ConfigMap of the namespace carrying those labels,
merged (lbconfig.merge_lbconfigs); a problem in any of them rejects the whole, named by the
ConfigMap it is in, and the last good merged config stays in force.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from kube2ipvs.kube import endpointslice_from_object, node_from_object, service_from_object
from kube2ipvs.lbconfig import (
    EMPTY_CONFIG,
    ConfigError,
    ConfigIssue,
    DefaultService,
    LBConfig,
    MergeConflictError,
    Protocol,
    RemovalCheck,
    configmap_value,
    in_configmap,
    merge_lbconfigs,
    parse_lbconfig,
    removal_check,
    with_default_service,
)
from kube2ipvs.model import ClusterState, Skip
from kube2ipvs.normalize import Normalizer
from kube2ipvs_watcher.source import KINDS, Kind, ObjectEvent, Resync, SourceItem, object_key

CONFIRM_ANNOTATION: Final = "kube2ipvs.io/confirm-removal"


def confirm_token(config_text: str | None) -> str:
    """The annotation value that confirms a held config: a short digest of its exact text."""
    if config_text is None:
        return "delete"
    return hashlib.sha256(config_text.encode()).hexdigest()[:12]


@dataclass(frozen=True, slots=True)
class WatcherSettings:
    configmap_namespace: str = "platform-load-balancer"
    configmap_name: str = "kube2ipvs"
    config_key: str | None = None
    # Labels that select the ConfigMaps of a config split over several (None: the one ConfigMap
    # named configmap_name). Equality only: (("kube2ipvs.io/config", "green"),).
    configmap_selector: tuple[tuple[str, str], ...] | None = None
    default_service: DefaultService | None = None
    exclude_cordoned: bool = False
    max_removal_share: float = 0.5


# Notices the adapter turns into logs, metrics and Kubernetes Events.
@dataclass(frozen=True, slots=True)
class ConfigAccepted:
    entries: int
    warnings: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ConfigRejected:
    reason: str
    errors: tuple[str, ...]
    uid: str | None = None  # of the ConfigMap, so its Events show in `kubectl describe`
    name: str | None = None  # of the ConfigMap at fault (None: the configured one)


@dataclass(frozen=True, slots=True)
class ConfigHeld:
    check: RemovalCheck
    token: str
    uid: str | None = None
    name: str | None = None
    sharded: bool = False

    @property
    def reason(self) -> str:
        where = "any one of the LB ConfigMaps" if self.sharded else "the ConfigMap"
        return (f"config held: it {self.check.describe()}; to apply it, annotate {where} "
                f"{CONFIRM_ANNOTATION}={self.token}")


Notice = ConfigAccepted | ConfigRejected | ConfigHeld


@dataclass(slots=True)
class ConfigStatus:
    """What /healthz and /config say about the LB config."""

    decided: bool = False  # a config (possibly the empty one) is in force
    rejected: ConfigRejected | None = None
    held: ConfigHeld | None = None
    since: float | None = None  # clock() when rejected/held began
    warnings: tuple[str, ...] = ()

    @property
    def problem(self) -> str:
        if self.rejected is not None:
            return f"config rejected: {self.rejected.reason}"
        if self.held is not None:
            return self.held.reason
        return ""


@dataclass(slots=True)
class _Objects:
    synced: set[Kind] = field(default_factory=set)
    skips: dict[tuple[Kind, str], Skip] = field(default_factory=dict)


class WatcherCore:
    def __init__(self, settings: WatcherSettings, *, clock: Callable[[], float]) -> None:
        self.settings = settings
        self._clock = clock
        self._normalizer = Normalizer(EMPTY_CONFIG, exclude_cordoned=settings.exclude_cordoned)
        self._objects = _Objects()
        self._in_force: LBConfig | frozenset[tuple[str, int, Protocol]] | None = None
        self._shards: dict[str, dict[str, Any]] = {}  # name -> ConfigMap, with configmap_selector
        self.config_status = ConfigStatus()
        self.changed = False  # something that may change the state arrived since state() was last read

    # -- inputs ---------------------------------------------------------------------------------

    def set_in_force_keys(self, keys: frozenset[tuple[str, int, Protocol]]) -> None:
        """What the bucket serves now, as the baseline of the mass-removal guard after a restart."""
        if not isinstance(self._in_force, LBConfig):
            self._in_force = keys

    def apply(self, item: SourceItem) -> list[Notice]:
        self.changed = True
        if isinstance(item, Resync):
            return self._resync(item)
        return self._event(item)

    @property
    def ready(self) -> bool:
        return len(self._objects.synced) == len(KINDS) and self.config_status.decided

    @property
    def waiting_for(self) -> list[str]:
        missing = [k for k in KINDS if k not in self._objects.synced]
        reasons = [f"initial list of {', '.join(missing)}"] if missing else []
        if not self.config_status.decided:
            reasons.append("a valid LB config")
        return reasons

    def state(self, *, generation: int) -> ClusterState:
        self.changed = False
        return self._normalizer.state(generation=generation, skipped=tuple(self._objects.skips.values()))

    @property
    def config(self) -> LBConfig:
        return self._normalizer.config

    # -- internals ------------------------------------------------------------------------------

    def _resync(self, item: Resync) -> list[Notice]:
        self._objects.synced.add(item.kind)
        for key in [k for k in self._objects.skips if k[0] == item.kind]:
            del self._objects.skips[key]
        if item.kind == "ConfigMap":
            mine = [o for o in item.objects if self._is_our_configmap(o)]
            if self.settings.configmap_selector is not None:
                self._shards = {_name(o): o for o in mine}
                return self._sharded()
            return self._configmap(mine[0] if mine else None)
        if item.kind == "Node":
            self._normalizer.replace_nodes(self._parse_all(item, node_from_object))
        elif item.kind == "Service":
            self._normalizer.replace_services(self._parse_all(item, service_from_object))
        else:
            self._normalizer.replace_endpointslices(self._parse_all(item, endpointslice_from_object))
        return []

    def _parse_all(self, item: Resync, parse: Callable[[dict[str, Any]], Any]) -> list[Any]:
        out = []
        for obj in item.objects:
            parsed = self._parse(item.kind, obj, parse)
            if parsed is not None:
                out.append(parsed)
        return out

    def _parse(self, kind: Kind, obj: dict[str, Any], parse: Callable[[dict[str, Any]], Any]) -> Any:
        key = (kind, object_key(obj))
        try:
            parsed = parse(obj)
        except (ValueError, TypeError, AttributeError) as exc:
            self._objects.skips[key] = Skip(f"{kind}/{key[1] or '?'}", f"malformed: {exc}")
            return None
        self._objects.skips.pop(key, None)
        return parsed

    def _event(self, item: ObjectEvent) -> list[Notice]:
        obj, kind = item.obj, item.kind
        deleted = item.type == "DELETED"
        if kind == "ConfigMap":
            if self.settings.configmap_selector is not None:
                return self._shard_event(obj, deleted)
            if not self._is_our_configmap(obj):
                return []
            return self._configmap(None if deleted else obj)
        key = object_key(obj)
        namespace, _, name = key.rpartition("/")
        if kind == "Node":
            if deleted:
                self._normalizer.delete_node(name)
            elif (node := self._parse(kind, obj, node_from_object)) is not None:
                self._normalizer.upsert_node(node)
        elif kind == "Service":
            if deleted:
                self._normalizer.delete_service(namespace, name)
            elif (svc := self._parse(kind, obj, service_from_object)) is not None:
                self._normalizer.upsert_service(svc)
        elif deleted:
            self._normalizer.delete_endpointslice(namespace, name)
        elif (es := self._parse(kind, obj, endpointslice_from_object)) is not None:
            self._normalizer.upsert_endpointslice(es)
        if deleted:
            self._objects.skips.pop((kind, key), None)
        return []

    def _is_our_configmap(self, obj: dict[str, Any]) -> bool:
        selector = self.settings.configmap_selector
        if selector is None:
            return object_key(obj) == f"{self.settings.configmap_namespace}/{self.settings.configmap_name}"
        meta = obj.get("metadata") or {}
        labels = meta.get("labels") if isinstance(meta, dict) else None
        return (isinstance(labels, dict) and meta.get("namespace") == self.settings.configmap_namespace
                and all(labels.get(k) == v for k, v in selector))

    def _shard_event(self, obj: dict[str, Any], deleted: bool) -> list[Notice]:
        name = _name(obj)
        if not deleted and self._is_our_configmap(obj):
            self._shards[name] = obj
        elif (obj.get("metadata") or {}).get("namespace") != self.settings.configmap_namespace \
                or self._shards.pop(name, None) is None:  # (deleted, or no longer labelled: its part goes)
            return []  # not one of ours, and never was
        return self._sharded()

    def _configmap(self, obj: dict[str, Any] | None) -> list[Notice]:
        if obj is None:  # the ConfigMap is gone: that is a request to remove everything
            return self._settle(EMPTY_CONFIG, None, [])
        try:
            text, _key = configmap_value(obj, self.settings.config_key)
            config = parse_lbconfig(text)
        except ConfigError as exc:
            return self._reject(exc, obj)
        return self._settle(config, text, [obj])

    def _sharded(self) -> list[Notice]:
        """The merged config of every shard held; a problem in any rejects the whole."""
        if not self._shards:
            return self._configmap(None)
        shards = [self._shards[name] for name in sorted(self._shards)]
        parsed: list[tuple[str, LBConfig]] = []
        texts: list[str] = []
        issues: list[ConfigIssue] = []
        first_bad: dict[str, Any] | None = None
        for obj in shards:
            try:
                text, _key = configmap_value(obj, self.settings.config_key)
                parsed.append((_name(obj), parse_lbconfig(text)))
                texts.append(f"{_name(obj)}\n{text}")
            except ConfigError as exc:
                issues.extend(in_configmap(_name(obj), i) for i in exc.issues)
                first_bad = first_bad or obj
        if issues:
            return self._reject(ConfigError(issues), first_bad)
        try:
            config = merge_lbconfigs(parsed)
        except MergeConflictError as exc:  # the Event goes on the ConfigMap of the first conflict
            return self._reject(exc, self._shards[exc.configmap])
        return self._settle(config, "\n".join(texts), shards)

    def _reject(self, exc: ConfigError, obj: dict[str, Any] | None) -> list[Notice]:
        status = self.config_status
        rejected = ConfigRejected(reason=exc.summary(), errors=tuple(str(i) for i in exc.issues),
                                  uid=_uid(obj), name=_name(obj) if obj is not None else None)
        if status.rejected is None:
            status.since = self._clock()
        status.rejected = rejected
        status.held = None
        return [rejected]

    def _settle(self, config: LBConfig, text: str | None, objs: list[dict[str, Any]]) -> list[Notice]:
        """`config` (from `text`, in the ConfigMaps `objs`) goes in force, or is held back."""
        status = self.config_status
        if self.settings.default_service is not None:
            config = with_default_service(config, self.settings.default_service)
        status.rejected = None

        check = removal_check(self._in_force, config, max_share=self.settings.max_removal_share)
        token = confirm_token(text)
        confirmed = any(_annotations(o).get(CONFIRM_ANNOTATION) == token for o in objs)
        if check.exceeds and not confirmed:
            first = objs[0] if objs else None
            held = ConfigHeld(check=check, token=token, uid=_uid(first), name=_name(first) if first else None,
                              sharded=self.settings.configmap_selector is not None)
            if status.held is None:
                status.since = self._clock()
            # Until confirmed, the config in force stays; after a restart, nothing is published at
            # all (not `decided`), so the bucket keeps serving what it serves.
            status.held = held
            return [held]

        status.held = None
        status.since = None
        status.decided = True
        status.warnings = tuple(str(w) for w in config.warnings)
        self._in_force = config
        if config != self._normalizer.config:
            self._normalizer.set_config(config)
        return [ConfigAccepted(entries=len(config.entries), warnings=status.warnings)]


def _name(obj: dict[str, Any]) -> str:
    return object_key(obj).rpartition("/")[2]


def _annotations(obj: dict[str, Any]) -> dict[str, Any]:
    meta = obj.get("metadata") or {}
    annotations = meta.get("annotations") if isinstance(meta, dict) else None
    return annotations if isinstance(annotations, dict) else {}


def _uid(obj: dict[str, Any] | None) -> str | None:
    uid = ((obj or {}).get("metadata") or {}).get("uid")
    return uid if isinstance(uid, str) else None
