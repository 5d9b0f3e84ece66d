"""What `kube2ipvs publish-config` would do: the config text to publish, its diff against the live
ConfigMap, and the write that applies it. Pure: no I/O, no clock; `publish.py` runs it.

The diff is by identity, VIP:port/protocol (an entry with neither protocol enabled is its own
identity, shown as "(disabled)"), with the fields that changed; the VIP pool, node labels and MTUs
are listed apart.

The mass-removal rule is the watcher's (`lbconfig.removal_check`, default share 0.5): a config that
would remove more than half of the live enabled VIP:port/protocols (so also every one of them) is
refused unless forced. A forced publish also sets the watcher's confirmation annotation for that
exact text, so the watcher applies it rather than holding it back.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Final, Literal

import yaml

from kube2ipvs.lbconfig import (
    EMPTY_CONFIG,
    ConfigError,
    ConfigIssue,
    LBConfig,
    PortConfig,
    Protocol,
    RemovalCheck,
    address_sort_key,
    configmap_value,
    load_config_document,
    parse_lbconfig,
    removal_check,
)

JSON = dict[str, Any]

# The watcher's (kube2ipvs_watcher.core): `shared` cannot import a service, so these are repeated
# here and a test checks that both agree.
CONFIRM_ANNOTATION: Final = "kube2ipvs.io/confirm-removal"
MAX_REMOVAL_SHARE: Final = 0.5


def confirm_token(config_text: str) -> str:
    """The annotation value that confirms a held config: a short digest of its exact text."""
    return hashlib.sha256(config_text.encode()).hexdigest()[:12]


# ---- the file --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Source:
    """The config to publish, as validated, and the exact text that goes under the key."""

    config: LBConfig
    text: str
    file_namespace: str | None = None  # metadata of a ConfigMap file, when it names one
    file_name: str | None = None
    other_keys: tuple[str, ...] = ()  # data keys of a ConfigMap file that are not published


_YAML_LOADER: Final[type[yaml.SafeLoader]] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def read_source(data: bytes, key: str) -> Source:
    """Validate a file as `validate-config` does and take the text to publish; ConfigError otherwise.

    A ConfigMap file (JSON or YAML) gives its value under `key` verbatim. A bare JSON value is taken
    verbatim; a bare YAML value is published as JSON (what the watcher parses). The text is then
    checked as the watcher will read it (`parse_lbconfig`, with its size limit).
    """
    try:
        load_config_document(data, key)
        configmap = True
    except ConfigError as exc:
        # `--key` names the ConfigMap key to set, so a bare value is fine too (validate-config
        # without --config-key); any other problem is the file's.
        if not _only_not_a_configmap(exc):
            raise
        load_config_document(data, None)
        configmap = False
    doc = _decode(data)
    if configmap:
        assert isinstance(doc, dict)
        text, _ = configmap_value(doc, key)
        meta = doc.get("metadata")
        meta = meta if isinstance(meta, dict) else {}
        ns, name = meta.get("namespace"), meta.get("name")
        data_keys = doc.get("data")
        others = sorted(str(k) for k in data_keys if k != key) if isinstance(data_keys, dict) else []
        return Source(config=parse_lbconfig(text), text=text,
                      file_namespace=ns if isinstance(ns, str) and ns else None,
                      file_name=name if isinstance(name, str) and name else None, other_keys=tuple(others))
    try:
        json.loads(data)
        text = data.decode(json.detect_encoding(data))
    except ValueError:
        try:
            text = json.dumps(doc, indent=2, ensure_ascii=False) + "\n"
        except (TypeError, ValueError):
            raise ConfigError([ConfigIssue("", "this YAML value has no JSON form (give the config as JSON)")]) from None
    return Source(config=parse_lbconfig(text), text=text)


def _only_not_a_configmap(exc: ConfigError) -> bool:
    return len(exc.issues) == 1 and exc.issues[0].path == "" and "but the file is not a ConfigMap" in str(
        exc.issues[0])


def _decode(data: bytes) -> object:
    try:
        return json.loads(data)
    except ValueError:
        return yaml.load(data, Loader=_YAML_LOADER)  # noqa: S506 - a safe loader


# ---- the diff --------------------------------------------------------------------------------------

Identity = tuple[str, int, Protocol | None]  # None: an entry with neither protocol enabled


@dataclass(frozen=True, slots=True)
class EntryChange:
    identity: Identity
    change: Literal["added", "removed", "changed"]
    before: PortConfig | None
    after: PortConfig | None
    fields: tuple[tuple[str, str, str], ...] = ()  # (field, before, after) of a changed entry


@dataclass(frozen=True, slots=True)
class ConfigDiff:
    entries: tuple[EntryChange, ...] = ()  # sorted by identity
    pool_added: tuple[str, ...] = ()
    pool_removed: tuple[str, ...] = ()
    labels: tuple[tuple[str, str | None, str | None], ...] = ()  # (key, before, after); None: absent
    mtu: tuple[tuple[str, int | None, int | None], ...] = ()  # (VIP, before, after); None: absent

    def __bool__(self) -> bool:
        return bool(self.entries or self.pool_added or self.pool_removed or self.labels or self.mtu)

    def count(self, change: str) -> int:
        return sum(1 for e in self.entries if e.change == change and e.identity[2] is not None)


def _by_identity(config: LBConfig) -> dict[Identity, PortConfig]:
    out: dict[Identity, PortConfig] = {}
    for entry in config.entries:
        for proto in entry.protocols or (None,):
            out[(entry.vip, entry.port, proto)] = entry
    return out


def _identity_key(identity: Identity) -> tuple[int, int, int, str]:
    return (*address_sort_key(identity[0]), identity[1], identity[2] or "")


def _fields(entry: PortConfig) -> dict[str, str]:
    ipvs = entry.ipvs
    return {
        "service": f"{entry.namespace}/{entry.service}:{entry.port_name}",
        "scheduler": ipvs.scheduler or "(default)",
        "forwarding": ipvs.forwarding,
        "uThreshold": str(ipvs.u_threshold),
        "lThreshold": str(ipvs.l_threshold),
        "flags": ",".join(f"flag-{b}" for b in ipvs.flags) or "(none)",
    }


def diff_configs(old: LBConfig, new: LBConfig) -> ConfigDiff:
    """What changes from `old` to `new`."""
    before, after = _by_identity(old), _by_identity(new)
    entries: list[EntryChange] = []
    for identity in sorted(before.keys() | after.keys(), key=_identity_key):
        was, now = before.get(identity), after.get(identity)
        if was is None:
            entries.append(EntryChange(identity, "added", None, now))
        elif now is None:
            entries.append(EntryChange(identity, "removed", was, None))
        else:
            f_was, f_now = _fields(was), _fields(now)
            changed = tuple((k, f_was[k], f_now[k]) for k in f_was if f_was[k] != f_now[k])
            if changed:
                entries.append(EntryChange(identity, "changed", was, now, changed))
    old_labels, new_labels = dict(old.labels), dict(new.labels)
    old_mtu, new_mtu = dict(old.mtu), dict(new.mtu)
    return ConfigDiff(
        entries=tuple(entries),
        pool_added=tuple(v for v in new.vip_pool if v not in old.vip_pool),
        pool_removed=tuple(v for v in old.vip_pool if v not in new.vip_pool),
        labels=tuple((k, old_labels.get(k), new_labels.get(k)) for k in sorted(old_labels.keys() | new_labels.keys())
                     if old_labels.get(k) != new_labels.get(k)),
        mtu=tuple((v, old_mtu.get(v), new_mtu.get(v))
                  for v in sorted(old_mtu.keys() | new_mtu.keys(), key=address_sort_key)
                  if old_mtu.get(v) != new_mtu.get(v)),
    )


def format_identity(identity: Identity) -> str:
    vip, port, proto = identity
    host = f"[{vip}]" if ":" in vip else vip
    return f"{host}:{port}/{proto}" if proto else f"{host}:{port} (disabled)"


def _summary(entry: PortConfig) -> str:
    f = _fields(entry)
    extra = [f"{k} {f[k]}" for k, default in (("scheduler", "(default)"), ("forwarding", "g"), ("uThreshold", "0"),
                                               ("lThreshold", "0"), ("flags", "(none)")) if f[k] != default]
    return "  ".join([f["service"], *extra])


def render_diff(diff: ConfigDiff) -> list[str]:
    """One line per change: `+` added, `-` removed, `~` changed (with each field's old -> new)."""
    lines: list[str] = []
    width = max((len(format_identity(e.identity)) for e in diff.entries), default=0)
    for e in diff.entries:
        name = format_identity(e.identity).ljust(width)
        if e.change == "added":
            assert e.after is not None
            lines.append(f"+ {name}  {_summary(e.after)}")
        elif e.change == "removed":
            assert e.before is not None
            lines.append(f"- {name}  {_summary(e.before)}")
        else:
            lines.append(f"~ {name}  " + "; ".join(f"{k} {a} -> {b}" for k, a, b in e.fields))
    lines += [f"+ vipPool {v}" for v in diff.pool_added]
    lines += [f"- vipPool {v}" for v in diff.pool_removed]
    for key, was, now in diff.labels:
        lines.append(f"+ label {key}={now}" if was is None else f"- label {key}={was}" if now is None
                     else f"~ label {key} {was} -> {now}")
    for vip, old_mtu, new_mtu in diff.mtu:
        lines.append(f"+ mtu {vip} {new_mtu}" if old_mtu is None else f"- mtu {vip} {old_mtu}" if new_mtu is None
                     else f"~ mtu {vip} {old_mtu} -> {new_mtu}")
    return lines


# ---- the plan --------------------------------------------------------------------------------------

Action = Literal["none", "create", "update"]


@dataclass(frozen=True, slots=True)
class Plan:
    action: Action
    diff: ConfigDiff
    removal: RemovalCheck
    body: JSON | None  # the object to create, or to replace the live one with (its resourceVersion kept)
    live_resource_version: str | None
    forced: bool = False
    notes: tuple[str, ...] = ()  # for the operator, about the live object
    text_changed: bool = True  # the value under the key differs from the live one (else: annotation only)

    @property
    def refused(self) -> bool:
        """A mass removal: publishing needs --force."""
        return self.removal.exceeds and self.action != "none" and not self.forced


def plan_publish(live: JSON | None, source: Source, *, namespace: str, name: str, key: str,
                 force: bool = False) -> Plan:
    """Compare the live ConfigMap (None: absent) with `source` and say what to write.

    Only `data[key]` changes (and, when forced, the confirmation annotation): every other key,
    label and annotation of the live object is kept.
    """
    notes: list[str] = []
    old, old_text, rv = EMPTY_CONFIG, None, None
    if live is not None:
        meta = live.get("metadata") or {}
        rv = str(meta.get("resourceVersion") or "") or None
        data = live.get("data") or {}
        value = data.get(key) if isinstance(data, dict) else None
        if isinstance(value, str):
            old_text = value
            try:
                old = parse_lbconfig(value)
            except ConfigError as exc:
                notes.append(f"the live value under key {key} is not a valid LB config ({len(exc.issues)} "
                             f"error{'s' * (len(exc.issues) != 1)}): the diff is against an empty config")
        else:
            notes.append(f"the live ConfigMap has no key {key}: it will be added")
    diff = diff_configs(old, source.config)
    removal = removal_check(old, source.config, max_share=MAX_REMOVAL_SHARE)
    token = confirm_token(source.text)
    if live is None:
        metadata: JSON = {"name": name, "namespace": namespace}
        if force:
            metadata["annotations"] = {CONFIRM_ANNOTATION: token}
        body = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": {key: source.text}}
        return Plan("create", diff, removal, body, None, force, tuple(notes))
    body = copy.deepcopy(live)
    body.setdefault("apiVersion", "v1")
    body.setdefault("kind", "ConfigMap")
    live_data = body.get("data")
    body["data"] = {**(live_data if isinstance(live_data, dict) else {}), key: source.text}
    live_meta = body.get("metadata")
    body_meta: JSON = live_meta if isinstance(live_meta, dict) else {}
    body["metadata"] = body_meta
    annotations = body_meta.get("annotations") or {}
    if force and annotations.get(CONFIRM_ANNOTATION) != token:
        body_meta["annotations"] = {**annotations, CONFIRM_ANNOTATION: token}
    text_changed = old_text != source.text
    unchanged = not text_changed and body.get("metadata") == live.get("metadata")
    return Plan("none" if unchanged else "update", diff, removal, body, rv, force, tuple(notes), text_changed)
