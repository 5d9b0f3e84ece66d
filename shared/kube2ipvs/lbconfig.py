"""The LB configuration: the Ravel-compatible JSON value held under one ConfigMap key.

Pure: parsing and validation do no I/O. Validation is total: it walks the whole document and
reports every problem with the JSON path of the offending field, so an operator fixes a
config in one round. Keys match case-insensitively (`IPVSOptions` and `ipvsOptions` alike);
unknown keys are accepted with a warning, because real configs carry keys such as
`persistenceEnabled` that this implementation does not act on.

The only exception this module raises is `ConfigError` (and only from the `parse_*`/`load_*`
functions); arbitrary JSON of any shape never escapes as anything else.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import math
import re
import socket
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Final, Literal

import yaml

Family = Literal[4, 6]
Forwarding = Literal["g", "i"]
Protocol = Literal["tcp", "udp"]

SCHEDULERS: Final = ("rr", "wrr", "lc", "wlc", "lblc", "lblcr", "dh", "sh", "sed", "nq", "fo", "ovf", "mh")
# IPVS scheduler flags are three generic bits; sh and mh give bits 1 and 2 their own names.
_FLAG_BITS: Final[Mapping[str, int]] = {
    "flag-1": 1, "flag-2": 2, "flag-3": 3,
    "sh-fallback": 1, "sh-port": 2, "mh-fallback": 1, "mh-port": 2,
}
MTU_MIN: Final = 576
MTU_MAX: Final = 9216
THRESHOLD_MAX: Final = 2**32 - 1
# A ConfigMap holds at most 1 MiB in all, so a larger value can never have come from one.
MAX_CONFIG_BYTES: Final = 1024 * 1024
MAX_DOCUMENT_BYTES: Final = 4 * MAX_CONFIG_BYTES
MAX_REPORTED_ERRORS: Final = 200

_DNS1123_LABEL: Final = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?\Z")
_DNS1035_LABEL: Final = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?\Z")
_LABEL_NAME: Final = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]\Z")
_DNS1123_SUBDOMAIN: Final = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*\Z")
_PORT_KEY: Final = re.compile(r"[1-9][0-9]{0,4}\Z")


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    """One problem (or warning) with the JSON path of the field it is about."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class ConfigError(ValueError):
    """The LB configuration was rejected; `issues` lists every reason with its path."""

    def __init__(self, issues: Sequence[ConfigIssue]) -> None:
        self.issues: tuple[ConfigIssue, ...] = tuple(issues)
        super().__init__(self.summary())

    def summary(self) -> str:
        shown = [str(i) for i in self.issues[:MAX_REPORTED_ERRORS]]
        hidden = len(self.issues) - len(shown)
        if hidden > 0:
            shown.append(f"... and {hidden} more")
        return "; ".join(shown)


@dataclass(frozen=True, slots=True)
class IPVSOptions:
    scheduler: str | None  # None: the mode's default (wrr; mh for BGP directors)
    forwarding: Forwarding
    u_threshold: int
    l_threshold: int
    flags: tuple[int, ...]  # scheduler flag bits 1..3, sorted


DEFAULT_IPVS_OPTIONS: Final = IPVSOptions(
    scheduler=None, forwarding="g", u_threshold=0, l_threshold=0, flags=()
)


@dataclass(frozen=True, slots=True)
class PortConfig:
    """One VIP:port of the config, mapped to a Kubernetes service port."""

    vip: str  # canonical text form
    family: Family
    port: int
    namespace: str
    service: str
    port_name: str
    tcp: bool
    udp: bool
    ipvs: IPVSOptions

    @property
    def protocols(self) -> tuple[Protocol, ...]:
        both: tuple[Protocol, ...] = ("tcp", "udp")
        return tuple(p for p, on in zip(both, (self.tcp, self.udp), strict=True) if on)


@dataclass(frozen=True, slots=True)
class LBConfig:
    vip_pool: tuple[str, ...]
    labels: tuple[tuple[str, str], ...]  # sorted; a backend node must carry all of them
    mtu: tuple[tuple[str, int], ...]  # VIP -> MTU, both families, sorted
    entries: tuple[PortConfig, ...]  # sorted by family, VIP, port
    warnings: tuple[ConfigIssue, ...] = field(default=(), compare=False)

    def mtu_of(self, vip: str) -> int | None:
        return dict(self.mtu).get(vip)

    def vips(self) -> tuple[str, ...]:
        """Every VIP the config names (pool and entries), sorted."""
        return tuple(sorted({*self.vip_pool, *(e.vip for e in self.entries)}, key=address_sort_key))

    def enabled_keys(self) -> frozenset[tuple[str, int, Protocol]]:
        return frozenset((e.vip, e.port, p) for e in self.entries for p in e.protocols)


EMPTY_CONFIG: Final = LBConfig(vip_pool=(), labels=(), mtu=(), entries=())


@functools.lru_cache(maxsize=1 << 18)
def address_sort_key(address: str) -> tuple[int, int]:
    """(family, integer value): numeric address order, IPv4 before IPv6.

    On every sort of cluster state, so it avoids the `ipaddress` module (10x slower) and caches:
    node addresses recur across thousands of services.
    """
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        return (6 if family == socket.AF_INET6 else 4, int.from_bytes(socket.inet_pton(family, address)))
    except OSError:
        ip = ipaddress.ip_address(address)  # raises ValueError, as callers expect of a bad address
        return (ip.version, int(ip))


@functools.lru_cache(maxsize=1 << 17)
def canonical_address(address: str) -> str | None:
    """The address as the kernel and `ipaddress` write it (lower case, shortest IPv6 form), or
    None when it is not an IP address. Cached: VIPs and node addresses recur on every change."""
    try:
        return str(ipaddress.ip_address(address))
    except ValueError:
        return None


def usable_as_vip(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """False for addresses no router can send a client's packet to: unspecified, loopback,
    multicast, and the IPv4 limited broadcast."""
    return not (ip.is_unspecified or ip.is_multicast or ip.is_loopback
                or (ip.version == 4 and int(ip) == 0xFFFF_FFFF))


# --------------------------------------------------------------------------------------------
# Parsing


def _quote(key: str) -> str:
    """JSON string syntax with every unprintable character escaped.

    Control characters, lone surrogates (which no encoder accepts, so printing the message would
    fail) and bidi overrides (which make a message read differently from what it says) all come
    out as \\uXXXX.
    """
    text = json.dumps(key, ensure_ascii=False)
    return text if text.isprintable() else "".join(c if c.isprintable() else _escape(c) for c in text)


def _escape(char: str) -> str:
    code = ord(char)
    if code > 0xFFFF:  # JSON spells astral characters as a surrogate pair
        code -= 0x10000
        return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"
    return f"\\u{code:04x}"


def _typename(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return f"a {type(value).__name__}"  # only YAML (or a Python caller) makes other types


def _show(value: object) -> str:
    if isinstance(value, str):
        text = _quote(value)
    elif isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 256:
        # str() refuses ints over 4300 digits (ValueError); past 77 digits the text would be cut anyway.
        return "a very large number"
    elif isinstance(value, int | float):
        text = json.dumps(value)
    else:
        return _typename(value)
    return text if len(text) <= 80 else text[:77] + "..."


class _JSONObject(dict[str, object]):
    """A decoded JSON object that remembers the keys written more than once.

    `json` silently keeps the last of repeated keys, so a port entry pasted twice would lose one
    without a word; the walker reports them instead (as it does keys repeated in another case).
    """

    __slots__ = ("repeated",)

    def __init__(self, pairs: list[tuple[str, object]]) -> None:
        super().__init__(pairs)
        self.repeated: tuple[str, ...] = ()
        if len(self) != len(pairs):
            counts = Counter(key for key, _ in pairs)
            self.repeated = tuple(key for key, n in counts.items() if n > 1)


_Known = Mapping[str, Callable[[object], bool] | None]


@dataclass(frozen=True, slots=True)
class _Fields:
    """The members of one object, found case-insensitively."""

    path: str
    found: Mapping[str, tuple[str, object]]  # lowercase key -> (key as written, value)

    def get(self, name: str) -> tuple[str, object]:
        """(path, value) of a field given its canonical spelling; the value is None when absent."""
        key, value = self.found.get(name.lower(), (name, None))
        return _join(self.path, key), value

    def __contains__(self, name: str) -> bool:
        return name.lower() in self.found


class _Walker:
    """Collects errors and warnings while walking one document."""

    def __init__(self) -> None:
        self.errors: list[ConfigIssue] = []
        self.warnings: list[ConfigIssue] = []

    def error(self, path: str, message: str) -> None:
        self.errors.append(ConfigIssue(path, message))

    def warn(self, path: str, message: str) -> None:
        self.warnings.append(ConfigIssue(path, message))

    def items(self, obj: Mapping[object, object], path: str, *, quote: bool = False) -> list[tuple[str, object]]:
        """The members of an object; keys that are not strings (YAML allows them) and keys repeated
        in the JSON text are errors."""
        for key in getattr(obj, "repeated", ()):
            self.error(_join(path, key, quote=quote), "key given more than once")
        members: list[tuple[str, object]] = []
        for key, value in obj.items():
            if isinstance(key, str):
                members.append((key, value))
            else:
                self.error(path, f"{_show(key)} is not allowed as a key (keys are strings)")
        return members

    def fields(self, obj: Mapping[object, object], path: str, known: _Known) -> _Fields:
        """Case-insensitive field lookup.

        `known` maps each field's canonical spelling to None (a field we use) or to a predicate
        that says whether a recognised-but-unsupported value is harmless (no warning then).
        """
        by_lower = {name.lower(): check for name, check in known.items()}
        found: dict[str, tuple[str, object]] = {}
        for key, value in self.items(obj, path):
            lower = key.lower()
            here = _join(path, key)
            if lower in found:
                self.error(here, f"duplicate key (also given as {_quote(found[lower][0])})")
                continue
            found[lower] = (key, value)
            if lower not in by_lower:
                self.warn(here, "unknown key, ignored")
                continue
            harmless = by_lower[lower]
            if harmless is not None and not harmless(value):
                self.warn(here, "not supported by kube2ipvs, ignored")
        return _Fields(path, found)


def _join(path: str, key: str, *, quote: bool = False) -> str:
    part = _quote(key) if quote or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key) else key
    return f"{path}.{part}" if path else part


def _falsy(value: object) -> bool:
    return value in (None, False, 0, "", {}, [])


# Canonical spellings: a missing field's path is written this way.
_TOP_KNOWN: Final[_Known] = {
    "vipPool": None, "labels": None, "mtuConfig": None, "mtuConfig6": None,
    "config": None, "config6": None, "ipv6": _falsy,
}
_ENTRY_KNOWN: Final[_Known] = {
    "namespace": None, "service": None, "portName": None, "tcpEnabled": None, "udpEnabled": None,
    "ipvsOptions": None,
    # Ravel's per-family switches: the family here follows config/config6, so they carry no meaning.
    "ipv4Enabled": lambda v: True, "ipv6Enabled": lambda v: True,
    "proxyProtocolEnabled": _falsy,
}
_IPVS_KNOWN: Final[_Known] = {
    "scheduler": None, "forwardingMethod": None, "uThreshold": None, "lThreshold": None, "flags": None,
    "persistenceEnabled": _falsy, "persistenceTimeout": _falsy, "persistenceNetmask": _falsy,
}


def _parse_address(w: _Walker, path: str, value: object, family: Family | None) -> str | None:
    if not isinstance(value, str):
        w.error(path, f"{_show(value)} is not an IP address")
        return None
    try:
        ip = ipaddress.ip_address(value)
    except ValueError:
        w.error(path, f"{_show(value)} is not an IP address")
        return None
    if family is not None and ip.version != family:
        w.error(path, f"{_show(value)} is not an IPv{family} address")
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id is not None:
        # Python accepts "addr%anything" as a scoped address; the text after % would reach
        # nft and ip(8) command lines verbatim.
        w.error(path, f"{_show(value)} cannot be a VIP (a zone index is not allowed)")
        return None
    if not usable_as_vip(ip):
        w.error(path, f"{_show(value)} cannot be a VIP (unspecified, loopback, multicast or broadcast)")
        return None
    return str(ip)


def _parse_vip_key(w: _Walker, path: str, key: str, family: Family) -> str | None:
    return _parse_address(w, _join(path, key, quote=True), key, family)


def _parse_bool(w: _Walker, path: str, value: object, default: bool) -> bool:
    if value is None:
        return default
    if not isinstance(value, bool):
        w.error(path, f"{_show(value)} is not true or false")
        return default
    return value


def _parse_int(w: _Walker, path: str, value: object, low: int, high: int) -> int | None:
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            w.error(path, f"{_show(value)} must be written as a whole number without a fraction")
        else:
            w.error(path, f"{_show(value)} is not a whole number")
        return None
    if not low <= value <= high:
        w.error(path, f"{_show(value)} is outside {low}-{high}")
        return None
    return value


def _parse_name(w: _Walker, path: str, value: object, what: str, pattern: re.Pattern[str]) -> str | None:
    if value is None:
        w.error(path, f"a {what} is required")
        return None
    if not isinstance(value, str) or not value:
        w.error(path, f"{_show(value)} is not a valid {what} (a non-empty string is required)")
        return None
    if len(value) > 63 or not pattern.match(value):
        w.error(path, f"{_show(value)} is not a valid {what}")
        return None
    return value


def _parse_ipvs(w: _Walker, path: str, value: object) -> IPVSOptions:
    if value is None:
        return DEFAULT_IPVS_OPTIONS
    if not isinstance(value, dict):
        w.error(path, f"{_show(value)} is not an object")
        return DEFAULT_IPVS_OPTIONS
    f = w.fields(value, path, _IPVS_KNOWN)

    p, raw = f.get("scheduler")
    scheduler: str | None = None
    if raw is not None and raw != "":
        if not isinstance(raw, str) or raw not in SCHEDULERS:
            w.error(p, f"{_show(raw)} is not one of {', '.join(SCHEDULERS)}")
        else:
            scheduler = raw

    p, raw = f.get("forwardingMethod")
    forwarding: Forwarding = "g"
    if raw == "i":
        forwarding = "i"
    elif raw not in (None, "", "g"):
        w.error(p, f"{_show(raw)} is not g (direct routing) or i (IPIP tunnel)")

    up, raw_u = f.get("uThreshold")
    lp, raw_l = f.get("lThreshold")
    upper = _parse_int(w, up, raw_u, 0, THRESHOLD_MAX)
    lower = _parse_int(w, lp, raw_l, 0, THRESHOLD_MAX)
    if upper is not None and lower is not None and lower > upper:
        w.error(lp, f"{lower} is greater than uThreshold {upper}")

    p, raw = f.get("flags")
    flags: set[int] = set()
    if raw not in (None, ""):
        if not isinstance(raw, str):
            w.error(p, f"{_show(raw)} is not a comma-separated string of scheduler flags")
        else:
            for token in (t.strip() for t in raw.split(",")):
                bit = _FLAG_BITS.get(token)
                if bit is None:
                    w.error(p, f"{_show(token)} is not one of {', '.join(_FLAG_BITS)}")
                elif token.startswith("sh-") and scheduler != "sh":
                    w.error(p, f"{_show(token)} needs scheduler sh")
                elif token.startswith("mh-") and scheduler not in ("mh", None):
                    w.error(p, f"{_show(token)} needs scheduler mh")
                else:
                    flags.add(bit)
    return IPVSOptions(
        scheduler=scheduler,
        forwarding=forwarding,
        u_threshold=upper or 0,
        l_threshold=lower or 0,
        flags=tuple(sorted(flags)),
    )


def _parse_entry(w: _Walker, path: str, vip: str, family: Family, port: int, value: object) -> PortConfig | None:
    if not isinstance(value, dict):
        w.error(path, f"{_show(value)} is not an object")
        return None
    before = len(w.errors)
    f = w.fields(value, path, _ENTRY_KNOWN)
    namespace = _parse_name(w, *f.get("namespace"), "Kubernetes namespace name", _DNS1123_LABEL)
    service = _parse_name(w, *f.get("service"), "Kubernetes service name", _DNS1035_LABEL)
    port_name = _parse_name(w, *f.get("portName"), "Kubernetes port name", _DNS1123_LABEL)
    # An entry written without the switches serves TCP: that is what a user writing one by hand means.
    tcp = _parse_bool(w, *f.get("tcpEnabled"), default=True)
    udp = _parse_bool(w, *f.get("udpEnabled"), default=False)
    for name in ("ipv4Enabled", "ipv6Enabled", "proxyProtocolEnabled"):
        if name in f:
            _parse_bool(w, *f.get(name), default=False)
    ipvs = _parse_ipvs(w, *f.get("ipvsOptions"))
    if len(w.errors) != before or namespace is None or service is None or port_name is None:
        return None
    return PortConfig(
        vip=vip, family=family, port=port, namespace=namespace, service=service,
        port_name=port_name, tcp=tcp, udp=udp, ipvs=ipvs,
    )


def _parse_services(w: _Walker, path: str, value: object, family: Family) -> list[PortConfig]:
    if value is None:
        return []
    if not isinstance(value, dict):
        w.error(path, f"{_show(value)} is not an object mapping VIP to ports")
        return []
    entries: list[PortConfig] = []
    seen: dict[str, str] = {}
    for vip_key, ports in w.items(value, path, quote=True):
        vpath = _join(path, vip_key, quote=True)
        vip = _parse_vip_key(w, path, vip_key, family)
        if vip is None:
            continue
        if vip in seen:
            w.error(vpath, f"same address as {_quote(seen[vip])}")
            continue
        seen[vip] = vip_key
        if not isinstance(ports, dict):
            w.error(vpath, f"{_show(ports)} is not an object mapping port to service")
            continue
        for port_key, entry in w.items(ports, vpath, quote=True):
            ppath = _join(vpath, port_key, quote=True)
            if not _PORT_KEY.match(port_key) or not 1 <= int(port_key) <= 65535:
                w.error(ppath, f"{_quote(port_key)} is not a port number 1-65535 (decimal, no leading zeros)")
                continue
            parsed = _parse_entry(w, ppath, vip, family, int(port_key), entry)
            if parsed is not None:
                entries.append(parsed)
    return entries


def _parse_mtu(w: _Walker, path: str, value: object, family: Family) -> list[tuple[str, int]]:
    if value is None:
        return []
    if not isinstance(value, dict):
        w.error(path, f"{_show(value)} is not an object mapping VIP to MTU")
        return []
    out: list[tuple[str, int]] = []
    seen: dict[str, str] = {}
    for key, raw in w.items(value, path, quote=True):
        here = _join(path, key, quote=True)
        vip = _parse_vip_key(w, path, key, family)
        if vip is not None and vip in seen:
            w.error(here, f"same address as {_quote(seen[vip])}")
            continue
        if vip is not None:
            seen[vip] = key
        number: object = raw
        if isinstance(raw, str) and re.fullmatch(r"[0-9]{1,5}", raw):
            number = int(raw)  # Ravel writes MTUs as strings
        mtu = _parse_int(w, here, number, MTU_MIN, MTU_MAX) if raw is not None else None
        if raw is None:
            w.error(here, "null is not an MTU")
        if vip is not None and mtu is not None:
            out.append((vip, mtu))
    return out


def label_problem(key: str, value: object) -> str | None:
    """Why (key, value) is not a valid Kubernetes label, or None when it is one."""
    prefix, _, name = key.rpartition("/")
    if (
        len(name) > 63
        or not _LABEL_NAME.match(name)
        or (prefix and (len(prefix) > 253 or not _DNS1123_SUBDOMAIN.match(prefix)))
        or (not prefix and key.startswith("/"))
    ):
        return f"{_quote(key)} is not a valid Kubernetes label key"
    if not isinstance(value, str) or (value and (len(value) > 63 or not _LABEL_NAME.match(value))):
        return f"{_show(value)} is not a valid Kubernetes label value"
    return None


def parse_label_selector(text: str) -> tuple[tuple[str, str], ...]:
    """`key=value[,key=value...]` (equality only, as `kubectl -l` writes it) -> sorted pairs;
    ValueError naming the part that is wrong."""
    pairs: dict[str, str] = {}
    for part in text.split(","):
        key, eq, value = part.strip().partition("=")
        key, value = key.strip(), value.strip().removeprefix("=").strip()  # `k==v` means `k=v`
        if not eq or key.endswith("!"):
            raise ValueError(f"{part.strip()!r}: write key=value (only equality is supported)")
        if (problem := label_problem(key, value)) is not None:
            raise ValueError(problem)
        if pairs.setdefault(key, value) != value:
            raise ValueError(f"{key!r} given twice with different values")
    return tuple(sorted(pairs.items()))


def _parse_labels(w: _Walker, path: str, value: object) -> list[tuple[str, str]]:
    if value is None:
        return []
    if not isinstance(value, dict):
        w.error(path, f"{_show(value)} is not an object of label key to value")
        return []
    out: list[tuple[str, str]] = []
    for key, val in w.items(value, path, quote=True):
        problem = label_problem(key, val)
        if problem is not None or not isinstance(val, str):
            w.error(_join(path, key, quote=True), problem or "not a string")
            continue
        out.append((key, val))
    return out


def _parse_pool(w: _Walker, path: str, value: object) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list):
        w.error(path, f"{_show(value)} is not an array of addresses")
        return []
    pool: list[str] = []
    for i, item in enumerate(value):
        vip = _parse_address(w, f"{path}[{i}]", item, None)
        if vip is not None:
            if vip in pool:
                w.warn(f"{path}[{i}]", f"{_show(item)} is listed twice")
            else:
                pool.append(vip)
    return pool


def parse_lbconfig_value(doc: object) -> LBConfig:
    """Validate an already-decoded JSON value; raise ConfigError with every problem."""
    w = _Walker()
    if not isinstance(doc, dict):
        raise ConfigError([ConfigIssue("", f"the LB config must be a JSON object, not {_typename(doc)}")])
    f = w.fields(doc, "", _TOP_KNOWN)
    pool = _parse_pool(w, *f.get("vipPool"))
    labels = _parse_labels(w, *f.get("labels"))
    mtu = _parse_mtu(w, *f.get("mtuConfig"), 4) + _parse_mtu(w, *f.get("mtuConfig6"), 6)
    entries = _parse_services(w, *f.get("config"), 4) + _parse_services(w, *f.get("config6"), 6)
    if w.errors:
        raise ConfigError(w.errors)
    entries.sort(key=lambda e: (*address_sort_key(e.vip), e.port))
    return LBConfig(
        vip_pool=tuple(sorted(pool, key=address_sort_key)),
        labels=tuple(sorted(labels)),
        mtu=tuple(sorted(mtu, key=lambda m: address_sort_key(m[0]))),
        entries=tuple(entries),
        warnings=tuple(w.warnings),
    )


def _check_size(text: str | bytes, limit: int, what: str) -> None:
    # A str has at most as many characters as its UTF-8 bytes, so only a short one needs encoding.
    size = len(text)
    if isinstance(text, str) and size <= limit:
        size = len(text.encode("utf-8", "surrogatepass"))
    if size > limit:
        raise ConfigError([ConfigIssue("", f"{what} is {size} bytes; the limit is {limit} bytes")])


def _decode_json(text: str | bytes, limit: int) -> object:
    _check_size(text, limit, "input")
    try:
        return json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_JSONObject)
    except RecursionError:
        raise ConfigError([ConfigIssue("", "not valid JSON: nested too deeply")]) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError([ConfigIssue("", f"not valid JSON: {exc}")]) from None


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not valid JSON")


def parse_lbconfig(text: str | bytes) -> LBConfig:
    """Parse and validate the JSON text held under the ConfigMap key."""
    return parse_lbconfig_value(_decode_json(text, MAX_CONFIG_BYTES))


def load_config_document(text: str | bytes, key: str | None = None) -> tuple[LBConfig, str | None]:
    """Parse a file that is either a ConfigMap (JSON or YAML) or the bare JSON value.

    Returns the config and the ConfigMap key it came from (None for a bare value). `key` may be
    omitted when the ConfigMap has exactly one data key.
    """
    _check_size(text, MAX_DOCUMENT_BYTES, "file")
    doc: object
    try:
        doc = json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_JSONObject)
    except RecursionError:
        raise ConfigError([ConfigIssue("", "not valid JSON: nested too deeply")]) from None
    except (ValueError, UnicodeDecodeError):
        doc = _decode_yaml(text)
    if isinstance(doc, dict) and doc.get("kind") == "ConfigMap":
        value, key = configmap_value(doc, key)
        return parse_lbconfig(value), key
    if key is not None:
        raise ConfigError([ConfigIssue("", f"--config-key {_quote(key)} given, but the file is not a ConfigMap")])
    return parse_lbconfig_value(doc), None


# libyaml when present: the pure-Python loader takes tens of seconds on a few MB of YAML, and
# libyaml also bounds nesting depth itself.
_YAML_LOADER: Final[type[yaml.SafeLoader]] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _decode_yaml(text: str | bytes) -> object:
    try:
        return yaml.load(text, Loader=_YAML_LOADER)  # noqa: S506 - a safe loader
    except RecursionError:
        raise ConfigError([ConfigIssue("", "not valid JSON or YAML: nested too deeply")]) from None
    except (yaml.YAMLError, UnicodeDecodeError, ValueError) as exc:
        problem = getattr(exc, "problem", None)
        what = f": {problem}" if isinstance(problem, str) else ""
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise ConfigError([ConfigIssue("", f"not valid JSON or YAML{what}{where}")]) from None


def _configmap_key(key: object) -> str:
    # Kubernetes allows only these characters in data keys; anything else is shown quoted.
    return key if isinstance(key, str) and re.fullmatch(r"[-._a-zA-Z0-9]+", key) else _show(key)


def configmap_value(configmap: Mapping[str, object], key: str | None) -> tuple[str, str]:
    """The text under `key` of a ConfigMap object (the only key when `key` is None)."""
    data = configmap.get("data")
    if not isinstance(data, dict) or not data:
        raise ConfigError([ConfigIssue("data", "the ConfigMap has no data")])
    keys = ", ".join(sorted(_configmap_key(k) for k in data))
    if key is None:
        if len(data) != 1:
            raise ConfigError([ConfigIssue("data", f"the ConfigMap has several keys ({keys}); choose one")])
        key = str(next(iter(data)))
    path = _join("data", key)
    if key not in data:
        raise ConfigError([ConfigIssue(path, f"no such key in the ConfigMap (it has: {keys})")])
    if key in getattr(data, "repeated", ()):
        raise ConfigError([ConfigIssue(path, "key given more than once")])
    value = data[key]
    if not isinstance(value, str):
        raise ConfigError([ConfigIssue(path, "ConfigMap data values must be strings")])
    return value, key


# --------------------------------------------------------------------------------------------
# A config split over several ConfigMaps (pure)


def in_configmap(name: str, issue: ConfigIssue) -> ConfigIssue:
    """`issue` of the config held by ConfigMap `name` (one of several shards)."""
    return ConfigIssue(f"ConfigMap {name}" + (f", {issue.path}" if issue.path else ""), issue.message)


class MergeConflictError(ConfigError):
    """Shards of a config that contradict each other; `configmap` is the one of the first conflict."""

    def __init__(self, issues: Sequence[ConfigIssue], configmap: str) -> None:
        super().__init__(issues)
        self.configmap = configmap


def merge_lbconfigs(shards: Sequence[tuple[str, LBConfig]]) -> LBConfig:
    """One config from the configs of several ConfigMaps (name, config), for a config too large
    for one: a ConfigMap holds at most 1 MiB, about 10,000 VIP:ports. Pools, entries and MTUs are
    united. A VIP:port may be configured by one shard only, and a label or a VIP's MTU may not be
    given different values by two shards: each such conflict is an error naming both ConfigMaps,
    and the whole merged config is rejected (MergeConflictError; so no shard's half of a move is ever
    applied)."""
    issues: list[ConfigIssue] = []
    first: str | None = None  # the ConfigMap of the first conflict
    warnings: list[ConfigIssue] = []
    owner: dict[tuple[str, int], str] = {}
    labels: dict[str, tuple[str, str]] = {}  # key -> (value, shard)
    mtus: dict[str, tuple[int, str]] = {}  # vip -> (mtu, shard)
    pool: set[str] = set()
    entries: list[PortConfig] = []
    for name, config in sorted(shards, key=lambda s: s[0]):
        pool.update(config.vip_pool)
        warnings.extend(in_configmap(name, w) for w in config.warnings)
        for key, value in config.labels:
            have = labels.setdefault(key, (value, name))
            if have[0] != value:
                first = first or name
                issues.append(in_configmap(name, ConfigIssue(
                    _join("labels", key, quote=True), f"{value!r} here, {have[0]!r} in ConfigMap {have[1]}")))
        for vip, mtu in config.mtu:
            had = mtus.setdefault(vip, (mtu, name))
            if had[0] != mtu:
                section = "mtuConfig6" if ":" in vip else "mtuConfig"
                first = first or name
                issues.append(in_configmap(name, ConfigIssue(
                    _join(section, vip, quote=True), f"{mtu} here, {had[0]} in ConfigMap {had[1]}")))
        for e in config.entries:
            first = owner.setdefault((e.vip, e.port), name)
            if first != name:
                section = "config" if e.family == 4 else "config6"
                first = first or name
                issues.append(in_configmap(name, ConfigIssue(
                    _join(_join(section, e.vip, quote=True), str(e.port), quote=True),
                    f"also configured in ConfigMap {first}")))
            else:
                entries.append(e)
    if issues:
        raise MergeConflictError(issues, first or "")
    return LBConfig(
        vip_pool=tuple(sorted(pool, key=address_sort_key)),
        labels=tuple(sorted((k, v) for k, (v, _) in labels.items())),
        mtu=tuple(sorted(((vip, m) for vip, (m, _) in mtus.items()), key=lambda x: address_sort_key(x[0]))),
        entries=tuple(sorted(entries, key=lambda e: (*address_sort_key(e.vip), e.port))),
        warnings=tuple(warnings),
    )


# --------------------------------------------------------------------------------------------
# Policy helpers (pure)


@dataclass(frozen=True, slots=True)
class RemovalCheck:
    """How much of what is in force a new config would remove."""

    removed: tuple[tuple[str, int, Protocol], ...]
    in_force: int
    max_share: float

    @property
    def share(self) -> float:
        return len(self.removed) / self.in_force if self.in_force else 0.0

    @property
    def exceeds(self) -> bool:
        return self.share > self.max_share

    def describe(self) -> str:
        return (
            f"would remove {len(self.removed)} of {self.in_force} VIP:port/protocols in force "
            f"({self.share:.0%}, limit {self.max_share:.0%})"
        )


def removal_check(
    in_force: LBConfig | frozenset[tuple[str, int, Protocol]] | None, new: LBConfig, *, max_share: float = 0.5
) -> RemovalCheck:
    """Would `new` remove more than `max_share` of the VIP:port/protocols `in_force` serves?

    `in_force` is the config applied before, or the (vip, port, protocol) keys of the published
    state when the config behind it is not known (a watcher that just started).
    """
    if not 0.0 <= max_share <= 1.0:
        raise ValueError(f"max_share {max_share} is outside 0..1")
    if in_force is None:
        old: frozenset[tuple[str, int, Protocol]] = frozenset()
    elif isinstance(in_force, LBConfig):
        old = in_force.enabled_keys()
    else:
        old = in_force
    removed = old - new.enabled_keys()
    ordered = sorted(removed, key=lambda k: (*address_sort_key(k[0]), k[1], k[2]))
    return RemovalCheck(removed=tuple(ordered), in_force=len(old), max_share=max_share)


@dataclass(frozen=True, slots=True)
class DefaultService:
    """The "unicorns" service answering on one port of every pool VIP."""

    namespace: str
    service: str
    port_name: str
    port: int = 70

    @classmethod
    def parse(cls, spec: str, port: int = 70) -> DefaultService:
        """`NS/SVC:PORTNAME` -> DefaultService; ValueError with the reason otherwise."""
        match = re.fullmatch(r"([^/]+)/([^:]+):(.+)", spec)
        if match is None:
            raise ValueError(f"{_quote(spec)} is not NAMESPACE/SERVICE:PORTNAME")
        w = _Walker()
        ns = _parse_name(w, "namespace", match[1], "Kubernetes namespace name", _DNS1123_LABEL)
        svc = _parse_name(w, "service", match[2], "Kubernetes service name", _DNS1035_LABEL)
        pn = _parse_name(w, "portName", match[3], "Kubernetes port name", _DNS1123_LABEL)
        if not 1 <= port <= 65535:
            w.error("port", f"{port} is outside 1-65535")
        if w.errors or ns is None or svc is None or pn is None:
            raise ValueError("; ".join(str(e) for e in w.errors))
        return cls(namespace=ns, service=svc, port_name=pn, port=port)


def with_default_service(config: LBConfig, default: DefaultService) -> LBConfig:
    """Add a TCP entry for `default` to every pool VIP that has no enabled entry on its port.

    A VIP whose entry on that port has neither TCP nor UDP enabled (as Ravel configs write the
    unicorns port) counts as lacking it: such an entry does nothing, and the point of the default
    service is that `curl http://$VIP:70` answers on every VIP.
    """
    taken = {(e.vip, e.port) for e in config.entries if e.protocols}
    needs = [vip for vip in config.vip_pool if (vip, default.port) not in taken]
    if not needs:
        return config
    added = [
        PortConfig(
            vip=vip, family=6 if ":" in vip else 4, port=default.port,
            namespace=default.namespace, service=default.service, port_name=default.port_name,
            tcp=True, udp=False, ipvs=DEFAULT_IPVS_OPTIONS,
        )
        for vip in needs
    ]
    kept = [e for e in config.entries if not (e.port == default.port and e.vip in needs)]
    merged = sorted([*kept, *added], key=lambda e: (*address_sort_key(e.vip), e.port))
    return replace(config, entries=tuple(merged))


def config_to_json(config: LBConfig) -> dict[str, object]:
    """The canonical JSON value of a parsed config (round-trips through parse_lbconfig_value)."""
    sections: dict[str, dict[str, dict[str, object]]] = {"config": {}, "config6": {}}
    for e in config.entries:
        section = sections["config" if e.family == 4 else "config6"]
        flags = ",".join(f"flag-{b}" for b in e.ipvs.flags)
        section.setdefault(e.vip, {})[str(e.port)] = {
            "namespace": e.namespace, "service": e.service, "portName": e.port_name,
            "tcpEnabled": e.tcp, "udpEnabled": e.udp,
            "ipvsOptions": {
                "scheduler": e.ipvs.scheduler or "", "forwardingMethod": e.ipvs.forwarding,
                "uThreshold": e.ipvs.u_threshold, "lThreshold": e.ipvs.l_threshold, "flags": flags,
            },
        }
    return {
        "vipPool": list(config.vip_pool),
        "labels": dict(config.labels),
        "mtuConfig": {v: str(m) for v, m in config.mtu if ":" not in v},
        "mtuConfig6": {v: str(m) for v, m in config.mtu if ":" in v},
        **sections,
    }

