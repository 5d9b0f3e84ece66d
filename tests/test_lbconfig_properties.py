"""Properties of the LB config parser, over generated documents.

(a) Nothing but ConfigError ever escapes, whatever the input; (b) a valid config means the same
whatever the order or case of its keys and survives its canonical JSON; (c) the removal check and
the default service behave as their contracts say.
"""

from __future__ import annotations

import ipaddress
import json
import random
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kube2ipvs.lbconfig import (
    SCHEDULERS,
    ConfigError,
    DefaultService,
    LBConfig,
    address_sort_key,
    config_to_json,
    load_config_document,
    parse_lbconfig,
    parse_lbconfig_value,
    removal_check,
    with_default_service,
)

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEWER = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --------------------------------------------------------------------------------------------
# (a) Arbitrary input

JSON_LEAVES = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
JSON_VALUES = st.recursive(
    JSON_LEAVES,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=20,
)
# What YAML or a Python caller can hand over besides JSON: keys that are not strings, huge ints.
# (Ints past 4300 digits are in the corpus: Hypothesis itself cannot print them.)
ODD_LEAVES = st.sampled_from([10**4000, -(10**400), float("nan"), float("inf")])
ODD_VALUES = st.recursive(
    JSON_LEAVES | ODD_LEAVES,
    lambda kids: st.lists(kids, max_size=3)
    | st.dictionaries(st.text(max_size=6) | st.integers() | st.none() | st.booleans(), kids, max_size=3),
    max_leaves=12,
)

ADDRESS_LIKE = (
    st.sampled_from(["192.0.2.10", "2001:db8::10", "2001:DB8::10", "0.0.0.0", "::", "224.0.0.1", "ff02::1",
                     "fe80::1%eth0", "192.0.2.300", "192.0.2.010", "", "web"])
    | st.ip_addresses().map(str)
    | st.text(max_size=10)
)
PORT_LIKE = st.integers(-5, 70_000).map(str) | st.sampled_from(["080", "http", "", "+80"]) | st.text(max_size=5)
LEAF_LIKE = (
    JSON_LEAVES
    | ODD_LEAVES
    | st.sampled_from(["", "wrr", "mh", "sh", "i", "g", "m", "flag-1,flag-2", "sh-port", "mh-port", "9000",
                       "web", "web; flush ruleset", 0, -1, 576, 2**32, 1.0])
)
IPVS_LIKE = st.dictionaries(
    st.sampled_from(["scheduler", "forwardingMethod", "uThreshold", "lThreshold", "flags", "persistenceEnabled",
                     "Scheduler", "FLAGS", "other"]),
    LEAF_LIKE, max_size=6,
)
ENTRY_LIKE = st.dictionaries(
    st.sampled_from(["namespace", "service", "portName", "tcpEnabled", "udpEnabled", "ipvsOptions", "IPVSOptions",
                     "ipv4Enabled", "proxyProtocolEnabled", "Service", "other"]),
    LEAF_LIKE | IPVS_LIKE, max_size=8,
)
SERVICES_LIKE = st.dictionaries(
    ADDRESS_LIKE, st.dictionaries(PORT_LIKE, ENTRY_LIKE | LEAF_LIKE, max_size=3) | LEAF_LIKE, max_size=3,
)
CONFIG_LIKE = st.fixed_dictionaries({}, optional={
    "vipPool": st.lists(ADDRESS_LIKE | LEAF_LIKE, max_size=4) | LEAF_LIKE,
    "VIPPOOL": st.lists(ADDRESS_LIKE, max_size=2),
    "labels": st.dictionaries(st.sampled_from(["zone", "example.com/zone", "-x", "a/b/c", ""]) | st.text(max_size=8),
                              LEAF_LIKE, max_size=3) | LEAF_LIKE,
    "mtuConfig": st.dictionaries(ADDRESS_LIKE, LEAF_LIKE, max_size=3) | LEAF_LIKE,
    "mtuConfig6": st.dictionaries(ADDRESS_LIKE, LEAF_LIKE, max_size=3),
    "config": SERVICES_LIKE | LEAF_LIKE,
    "Config6": SERVICES_LIKE,
    "ipv6": JSON_VALUES,
    "other": JSON_VALUES,
})


def attempt(parse: Callable[[], LBConfig]) -> LBConfig | ConfigError:
    """The config, or the ConfigError that rejected it; any other exception fails the test."""
    try:
        return parse()
    except ConfigError as error:
        return error


def check_outcome(outcome: LBConfig | ConfigError) -> None:
    """A rejection must read cleanly; an acceptance must survive its canonical JSON."""
    if isinstance(outcome, ConfigError):
        assert outcome.issues
        assert all(str(issue).isprintable() for issue in outcome.issues)
        str(outcome).encode("utf-8")
    else:
        assert parse_lbconfig_value(config_to_json(outcome)) == outcome


@FAST
@given(JSON_VALUES)
def test_any_json_value_is_accepted_or_rejected_with_config_error_only(doc: object) -> None:
    check_outcome(attempt(lambda: parse_lbconfig_value(doc)))


@FAST
@given(CONFIG_LIKE)
def test_any_config_shaped_value_is_accepted_or_rejected_with_config_error_only(doc: object) -> None:
    check_outcome(attempt(lambda: parse_lbconfig_value(doc)))


@FAST
@given(ODD_VALUES | st.fixed_dictionaries({"config": st.dictionaries(ADDRESS_LIKE, ODD_VALUES, max_size=2)}))
def test_values_json_cannot_express_are_rejected_with_config_error_only(doc: object) -> None:
    check_outcome(attempt(lambda: parse_lbconfig_value(doc)))


@FAST
@given(st.text(max_size=60) | st.binary(max_size=60) | JSON_VALUES.map(json.dumps) | CONFIG_LIKE.map(json.dumps))
def test_any_text_is_accepted_or_rejected_with_config_error_only(text: str | bytes) -> None:
    check_outcome(attempt(lambda: parse_lbconfig(text)))
    check_outcome(attempt(lambda: load_config_document(text)[0]))


# --------------------------------------------------------------------------------------------
# (b) Valid configs

# Built from plain text rather than st.from_regex, which is several times slower to draw.
LOWER = "abcdefghijklmnopqrstuvwxyz0123456789"
ANY_CASE = LOWER + "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
DNS1123 = st.text(LOWER + "-", min_size=1, max_size=15).map(lambda s: s.strip("-") or "x")
DNS1035 = st.text(LOWER + "-", max_size=14).map(lambda s: ("w" + s).rstrip("-"))
LABEL_NAMES = st.text(ANY_CASE + "-_.", min_size=1, max_size=10).map(lambda s: s.strip("-_.") or "k")
LABEL_PREFIXES = st.lists(st.text(LOWER, min_size=1, max_size=6), min_size=1, max_size=3).map(".".join)
LABEL_KEYS = st.tuples(st.none() | LABEL_PREFIXES, LABEL_NAMES).map(lambda t: f"{t[0]}/{t[1]}" if t[0] else t[1])
LABEL_VALUES = st.just("") | LABEL_NAMES
IPV4 = st.ip_addresses(v=4, network="192.0.2.0/24")
IPV6 = st.ip_addresses(v=6, network="2001:db8::/32")


@st.composite
def ipvs_options(draw: st.DrawFn) -> dict[str, object]:
    kept = draw(st.lists(st.sampled_from(["scheduler", "forwardingMethod", "uThreshold", "lThreshold", "flags"]),
                         unique=True))
    scheduler = draw(st.sampled_from(("", *SCHEDULERS))) if "scheduler" in kept else ""
    flags = ["flag-1", "flag-2", "flag-3"]
    if scheduler == "sh":
        flags += ["sh-fallback", "sh-port"]
    if scheduler in ("mh", ""):
        flags += ["mh-fallback", "mh-port"]
    upper = draw(st.integers(0, 2**32 - 1)) if "uThreshold" in kept else 0  # absent means 0
    options: dict[str, object] = {
        "scheduler": scheduler,
        "forwardingMethod": draw(st.sampled_from(["g", "i", ""])),
        "uThreshold": upper,
        "lThreshold": draw(st.integers(0, upper)),
        "flags": ",".join(draw(st.lists(st.sampled_from(flags), max_size=3))),
    }
    return {key: options[key] for key in kept}


ENTRIES = st.fixed_dictionaries(
    {"namespace": DNS1123, "service": DNS1035, "portName": DNS1123},
    optional={"tcpEnabled": st.booleans(), "udpEnabled": st.booleans(), "ipvsOptions": ipvs_options(),
              "ipv4Enabled": st.booleans(), "ipv6Enabled": st.booleans(), "proxyProtocolEnabled": st.just(False)},
)
PORTS = st.dictionaries(st.integers(1, 65535).map(str), ENTRIES, max_size=3)


def spelled(draw: st.DrawFn, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """One of the ways an operator may write an address (IPv6 has several)."""
    if address.version == 4:
        return str(address)
    return draw(st.sampled_from([str(address), address.exploded, str(address).upper(), address.exploded.upper()]))


@st.composite
def valid_documents(draw: st.DrawFn) -> dict[str, object]:
    v4 = draw(st.lists(IPV4, unique=True, max_size=4))
    v6 = draw(st.lists(IPV6, unique=True, max_size=3))
    doc: dict[str, object] = {
        "vipPool": [spelled(draw, a) for a in draw(st.lists(st.sampled_from(v4 + v6), unique=True))] if v4 + v6
        else [],
        "labels": draw(st.dictionaries(LABEL_KEYS, LABEL_VALUES, max_size=3)),
        "mtuConfig": {str(a): draw(st.integers(576, 9216).map(str) | st.integers(576, 9216))
                      for a in v4 if draw(st.booleans())},
        "mtuConfig6": {spelled(draw, a): draw(st.integers(576, 9216).map(str)) for a in v6 if draw(st.booleans())},
        "config": {str(a): draw(PORTS) for a in v4},
        "config6": {spelled(draw, a): draw(PORTS) for a in v6},
    }
    return {key: value for key, value in doc.items() if value or draw(st.booleans())}


def shuffled(value: Any, rnd: random.Random) -> Any:
    """The same document with every object's keys (and the pool) in another order."""
    if isinstance(value, dict):
        keys = list(value)
        rnd.shuffle(keys)
        return {key: shuffled(value[key], rnd) for key in keys}
    if isinstance(value, list):
        items = [shuffled(v, rnd) for v in value]
        rnd.shuffle(items)
        return items
    return value


def recase(key: str, rnd: random.Random) -> str:
    return "".join(c.upper() if rnd.random() < 0.5 else c.lower() for c in key)


def recased(doc: dict[str, Any], rnd: random.Random) -> dict[str, Any]:
    """The same document with field names (not VIPs, ports or label keys) in random case."""
    out: dict[str, Any] = {}
    for key, member in doc.items():
        value = member
        if key in ("config", "config6"):
            value = {
                vip: {port: {
                    recase(field, rnd): ({recase(k, rnd): v for k, v in fv.items()} if isinstance(fv, dict) else fv)
                    for field, fv in entry.items()
                } for port, entry in ports.items()}
                for vip, ports in value.items()
            }
        out[recase(key, rnd)] = value
    return out


@FEWER
@given(valid_documents())
def test_a_generated_valid_config_is_accepted_without_warnings(doc: dict[str, Any]) -> None:
    config = parse_lbconfig_value(doc)
    assert config.warnings == ()
    assert len(config.entries) == sum(len(ports) for section in ("config", "config6")
                                      for ports in doc.get(section, {}).values())


@FEWER
@given(valid_documents())
def test_a_parsed_config_is_canonical_and_sorted(doc: dict[str, Any]) -> None:
    config = parse_lbconfig_value(doc)
    for vip in config.vips():
        assert str(ipaddress.ip_address(vip)) == vip
    keys = [(address_sort_key(e.vip), e.port) for e in config.entries]
    assert keys == sorted(set(keys))
    assert list(config.vip_pool) == sorted(set(config.vip_pool), key=address_sort_key)
    assert list(config.labels) == sorted(config.labels)


@FEWER
@given(valid_documents())
def test_parsing_is_deterministic_and_text_or_value_make_no_difference(doc: dict[str, Any]) -> None:
    config = parse_lbconfig_value(doc)
    again = parse_lbconfig_value(json.loads(json.dumps(doc)))
    assert again == config
    assert again.warnings == config.warnings
    assert parse_lbconfig(json.dumps(doc)) == config


@FEWER
@given(valid_documents(), st.randoms(use_true_random=False))
def test_the_order_of_keys_does_not_change_the_meaning(doc: dict[str, Any], rnd: random.Random) -> None:
    assert parse_lbconfig_value(shuffled(doc, rnd)) == parse_lbconfig_value(doc)


@FEWER
@given(valid_documents(), st.randoms(use_true_random=False))
def test_the_case_of_field_names_does_not_change_the_meaning(doc: dict[str, Any], rnd: random.Random) -> None:
    config = parse_lbconfig_value(recased(doc, rnd))
    assert config == parse_lbconfig_value(doc)
    assert config.warnings == ()


@FEWER
@given(valid_documents())
def test_a_config_survives_its_canonical_json(doc: dict[str, Any]) -> None:
    config = parse_lbconfig_value(doc)
    canonical = config_to_json(config)
    assert parse_lbconfig_value(canonical) == config
    assert parse_lbconfig(json.dumps(canonical)) == config
    assert config_to_json(parse_lbconfig_value(canonical)) == canonical


# --------------------------------------------------------------------------------------------
# (c) Removal check and default service

CONFIGS = valid_documents().map(parse_lbconfig_value)
DEFAULTS = st.builds(DefaultService, namespace=DNS1123, service=DNS1035, port_name=DNS1123,
                     port=st.integers(1, 65535) | st.sampled_from([70, 80, 8080]))


@FEWER
@given(CONFIGS, CONFIGS, st.floats(0.0, 1.0))
def test_the_removal_share_is_in_zero_to_one_and_held_back_only_above_the_limit_and_listed_in_order(
    old: LBConfig, new: LBConfig, limit: float
) -> None:
    check = removal_check(old, new, max_share=limit)
    assert 0.0 <= check.share <= 1.0
    assert check.exceeds == (check.share > limit)
    assert set(check.removed) == old.enabled_keys() - new.enabled_keys()
    assert list(check.removed) == sorted(set(check.removed), key=lambda k: (address_sort_key(k[0]), k[1], k[2]))
    assert check.in_force == len(old.enabled_keys())


@FEWER
@given(CONFIGS)
def test_a_config_removes_nothing_from_itself(config: LBConfig) -> None:
    check = removal_check(config, config, max_share=0.0)
    assert check.removed == ()
    assert not check.exceeds


@FEWER
@given(CONFIGS, DEFAULTS)
def test_adding_the_default_service_removes_nothing(config: LBConfig, default: DefaultService) -> None:
    check = removal_check(config, with_default_service(config, default), max_share=0.0)
    assert check.removed == ()


@FEWER
@given(CONFIGS, DEFAULTS)
def test_after_the_default_service_every_pool_vip_answers_on_its_port(
    config: LBConfig, default: DefaultService
) -> None:
    result = with_default_service(config, default)
    enabled = {(vip, port) for vip, port, _ in result.enabled_keys()}
    assert all((vip, default.port) in enabled for vip in config.vip_pool)
    untouched = [e for e in config.entries if e.port != default.port or e.protocols or e.vip not in config.vip_pool]
    assert set(untouched) <= set(result.entries)
    assert with_default_service(result, default) == result
    assert parse_lbconfig_value(config_to_json(result)) == result
