"""A corpus of bad LB configs: each is rejected with ConfigError alone, naming the field at fault.

Every case changes one thing in an otherwise good config (or is a whole bad text), so each must
produce exactly one issue, at the expected JSON path. The message must read as one clean line:
printable, no Python repr or traceback, and encodable (a lone surrogate in a name must not make
printing the error fail).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass

import pytest

from kube2ipvs.lbconfig import (
    MAX_CONFIG_BYTES,
    MAX_DOCUMENT_BYTES,
    ConfigError,
    load_config_document,
    parse_lbconfig,
    parse_lbconfig_value,
)

VIP = "192.0.2.10"
VIP6 = "2001:db8::10"
ENTRY = f'config."{VIP}"."8080"'
IPVS = f"{ENTRY}.ipvsOptions"


def good_entry() -> dict[str, object]:
    return {
        "namespace": "shop", "service": "web", "portName": "http", "tcpEnabled": True, "udpEnabled": False,
        "ipvsOptions": {"scheduler": "wrr", "forwardingMethod": "g", "uThreshold": 0, "lThreshold": 0,
                        "flags": ""},
    }


BASE: dict[str, object] = {
    "vipPool": [VIP, VIP6],
    "labels": {"example.com/lb-zone": "green"},
    "mtuConfig": {VIP: "9000"},
    "mtuConfig6": {VIP6: "1500"},
    "config": {VIP: {"8080": good_entry()}},
    "config6": {VIP6: {"80": good_entry()}},
}

NOISE = ("<class", "Traceback", "object at 0x", "Error(")


@dataclass(frozen=True)
class Bad:
    """A bad JSON value, its one expected issue, and whether its JSON text can be written."""

    name: str
    doc: object
    path: str
    fragment: str
    as_text: bool = True  # False where json.dumps itself cannot write the value (huge ints)


def changed(keys: tuple[str, ...], value: object) -> dict[str, object]:
    """BASE with the member at `keys` set to `value`."""
    doc = copy.deepcopy(BASE)
    target: dict[str, object] = doc
    for key in keys[:-1]:
        nested = target[key]
        assert isinstance(nested, dict)
        target = nested
    target[keys[-1]] = value
    return doc


def entry_field(field: str, value: object) -> dict[str, object]:
    return changed(("config", VIP, "8080", field), value)


def ipvs_fields(**fields: object) -> dict[str, object]:
    options = {**good_entry()["ipvsOptions"], **fields}  # type: ignore[dict-item]
    return entry_field("ipvsOptions", options)


def quoted(key: str) -> str:
    return json.dumps(key, ensure_ascii=False)


def check_only_issue(error: ConfigError, path: str, fragment: str) -> None:
    assert [i.path for i in error.issues] == [path], str(error)
    assert fragment in error.issues[0].message
    check_clean(error)


def check_clean(error: ConfigError) -> None:
    for issue in error.issues:
        text = str(issue)
        assert text.isprintable(), text
        assert not any(noise in text for noise in NOISE), text
    str(error).encode("utf-8")


# --------------------------------------------------------------------------------------------
# The corpus of values

BAD_NAMES = [
    "web; flush ruleset", "$(reboot)", "`reboot`", "a b", "web\n", "web\t", "UPPER", "Web", "a" * 64, "web}",
    'x"y', "x'y", "-web", "web-", "we_b", "web.example", "wéb", "web\u202e", "web\x00", "\ud800", "web/x",
]
BAD_LABEL_KEYS = ["-bad", "bad-", "example.com/", "/name", "Example.com/x", "a/b/c", "a" * 64, "", "a b",
                  "ex_ample.com/x", "x" * 254 + "/n", "zone;drop"]
BAD_LABEL_VALUES: list[object] = ["a b", "-x", "x-", "x" * 64, 5, None, True, "x\n", "$(reboot)", []]


def _cases() -> list[Bad]:
    cases: list[Bad] = []

    def add(name: str, doc: object, path: str, fragment: str, *, as_text: bool = True) -> None:
        cases.append(Bad(name, doc, path, fragment, as_text))

    # wrong types everywhere
    for value in ["x", [VIP], 5, True]:
        add(f"config={value!r}", changed(("config",), value), "config", "is not an object mapping VIP to ports")
    add("config6=[]", changed(("config6",), []), "config6", "is not an object mapping VIP to ports")
    for value in ["web", [], 5]:
        add(f"ports={value!r}", changed(("config", VIP), value), f'config."{VIP}"',
            "is not an object mapping port to service")
    for value in ["web", [], 8080, None, True]:
        add(f"entry={value!r}", changed(("config", VIP, "8080"), value), ENTRY, "is not an object")
    for value in ["yes", "true", 1, 0, []]:
        add(f"tcpEnabled={value!r}", entry_field("tcpEnabled", value), f"{ENTRY}.tcpEnabled",
            "is not true or false")
    add("udpEnabled='no'", entry_field("udpEnabled", "no"), f"{ENTRY}.udpEnabled", '"no" is not true or false')
    for value in ["wrr", [], 5]:
        add(f"ipvsOptions={value!r}", entry_field("ipvsOptions", value), f"{ENTRY}.ipvsOptions", "is not an object")
    for value in ["x", {}, 5]:
        add(f"vipPool={value!r}", changed(("vipPool",), value), "vipPool", "is not an array of addresses")
    for value in ["zone", [], 5]:
        add(f"labels={value!r}", changed(("labels",), value), "labels", "is not an object of label key")
    for value in ["9000", [], 5]:
        add(f"mtuConfig={value!r}", changed(("mtuConfig",), value), "mtuConfig", "is not an object mapping VIP")

    # thresholds
    for field in ("uThreshold", "lThreshold"):
        for value, fragment in [
            ("5", '"5" is not a whole number'),
            (1.5, "1.5 is not a whole number"),
            (5.0, "5.0 must be written as a whole number without a fraction"),
            (True, "true is not a whole number"),
            (False, "false is not a whole number"),
            (-1, "-1 is outside 0-4294967295"),
            (2**32, "4294967296 is outside 0-4294967295"),
            (10**30, "1000000000000000000000000000000 is outside 0-4294967295"),
            ([], "an array is not a whole number"),
        ]:
            add(f"{field}={value!r}", ipvs_fields(**{field: value}), f"{IPVS}.{field}", fragment)
        add(f"{field}=10**5000", ipvs_fields(**{field: 10**5000}), f"{IPVS}.{field}",
            "a very large number is outside 0-4294967295", as_text=False)
    add("lThreshold>uThreshold", ipvs_fields(uThreshold=100, lThreshold=101), f"{IPVS}.lThreshold",
        "101 is greater than uThreshold 100")

    # addresses
    for key, fragment in [
        (VIP6, "is not an IPv4 address"), ("192.0.2.300", "is not an IP address"), ("", "is not an IP address"),
        ("example.com", "is not an IP address"), ("0.0.0.0", "cannot be a VIP"), ("224.0.0.1", "cannot be a VIP"),
        ("127.0.0.1", "cannot be a VIP"), ("255.255.255.255", "cannot be a VIP"),
        ("192.0.2.010", "is not an IP address"), (" 192.0.2.11", "is not an IP address"),
        ("192.0.2.11/32", "is not an IP address"), ("3221225995", "is not an IP address"),
    ]:
        add(f"config[{key!r}]", changed(("config", key), {"80": good_entry()}), f"config.{quoted(key)}", fragment)
    for key, fragment in [
        (VIP, "is not an IPv6 address"), ("::", "cannot be a VIP"), ("ff02::1", "cannot be a VIP"),
        ("::1", "cannot be a VIP"), ("2001:db8::1%eth0", "a zone index is not allowed"),
        ("2001:db8::1%; flush ruleset", "a zone index is not allowed"), ("2001:db8::g", "is not an IP address"),
    ]:
        add(f"config6[{key!r}]", changed(("config6", key), {"80": good_entry()}), f"config6.{quoted(key)}",
            fragment)
    for item, fragment in [
        ("x", '"x" is not an IP address'), (3221225995, "3221225995 is not an IP address"),
        (None, "null is not an IP address"), ("0.0.0.0", "cannot be a VIP"), ("ff02::1", "cannot be a VIP"),
        ("fe80::1%eth0", "a zone index is not allowed"),
    ]:
        add(f"vipPool[{item!r}]", changed(("vipPool",), [VIP, item]), "vipPool[1]", fragment)
    add("mtuConfig[v6]", changed(("mtuConfig",), {VIP6: "1500"}), f"mtuConfig.{quoted(VIP6)}",
        "is not an IPv4 address")
    add("mtuConfig6[v4]", changed(("mtuConfig6",), {VIP: "1500"}), f"mtuConfig6.{quoted(VIP)}",
        "is not an IPv6 address")
    add("config6 same address twice", changed(("config6",), {VIP6: {"80": good_entry()},
                                                              "2001:DB8::10": {"81": good_entry()}}),
        'config6."2001:DB8::10"', f'same address as "{VIP6}"')

    # ports
    for key in ["0", "65536", "080", "-1", "http", "", "\uff11\uff12", "8080 ", "1e3", "+80", "8_080", "0x50",
                "99999999999999999999"]:
        add(f"port {key!r}", changed(("config", VIP), {key: good_entry()}), f'config."{VIP}".{quoted(key)}',
            "is not a port number 1-65535")

    # MTUs
    for value, fragment in [
        ("100", "100 is outside 576-9216"), ("10000", "10000 is outside 576-9216"), (575, "575 is outside"),
        (9217, "9217 is outside"), ("abc", '"abc" is not a whole number'), ("", '"" is not a whole number'),
        ("1500.0", "is not a whole number"), (1500.5, "is not a whole number"), (True, "is not a whole number"),
        ([], "is not a whole number"), ("-1500", "is not a whole number"), ("0x5dc", "is not a whole number"),
        (None, "null is not an MTU"),
    ]:
        add(f"mtu={value!r}", changed(("mtuConfig", VIP), value), f"mtuConfig.{quoted(VIP)}", fragment)

    # IPVS options
    for value in ["m", "G", "tun", "gi", 1, True, []]:
        add(f"forwardingMethod={value!r}", ipvs_fields(forwardingMethod=value), f"{IPVS}.forwardingMethod",
            "is not g (direct routing) or i (IPIP tunnel)")
    for value in ["fastest", "WRR", "rr ", 5, True, ["rr"]]:
        add(f"scheduler={value!r}", ipvs_fields(scheduler=value), f"{IPVS}.scheduler",
            "is not one of rr, wrr, lc, wlc, lblc, lblcr, dh, sh, sed, nq, fo, ovf, mh")
    for scheduler, flags, fragment in [
        ("wrr", "sh-port", '"sh-port" needs scheduler sh'),
        ("mh", "sh-fallback", '"sh-fallback" needs scheduler sh'),
        ("rr", "mh-port", '"mh-port" needs scheduler mh'),
        ("wrr", "bogus", '"bogus" is not one of flag-1, flag-2, flag-3'),
        ("wrr", "flag-4", '"flag-4" is not one of'),
        ("wrr", "flag-1,,flag-2", '"" is not one of'),
        ("wrr", "flag-1;reboot", '"flag-1;reboot" is not one of'),
        ("wrr", "FLAG-1", '"FLAG-1" is not one of'),
        ("wrr", 3, "3 is not a comma-separated string of scheduler flags"),
        ("wrr", ["flag-1"], "an array is not a comma-separated string"),
    ]:
        add(f"flags={flags!r} with {scheduler}", ipvs_fields(scheduler=scheduler, flags=flags), f"{IPVS}.flags",
            fragment)

    # names that carry nft or shell syntax, or are not Kubernetes names
    for field, what in [("namespace", "namespace"), ("service", "service"), ("portName", "port")]:
        for bad in BAD_NAMES:
            add(f"{field}={bad!r}", entry_field(field, bad), f"{ENTRY}.{field}",
                f"is not a valid Kubernetes {what} name")
        for value in [5, True, [], {}, ""]:
            add(f"{field}={value!r}", entry_field(field, value), f"{ENTRY}.{field}",
                f"is not a valid Kubernetes {what} name (a non-empty string is required)")
        add(f"{field}=null", entry_field(field, None), f"{ENTRY}.{field}", f"a Kubernetes {what} name is required")
    add("service='1web'", entry_field("service", "1web"), f"{ENTRY}.service",
        '"1web" is not a valid Kubernetes service name')
    missing = copy.deepcopy(BASE)
    del missing["config"][VIP]["8080"]["portName"]  # type: ignore[index]
    add("portName missing", missing, f"{ENTRY}.portName", "a Kubernetes port name is required")

    # labels
    for key in BAD_LABEL_KEYS:
        add(f"label key {key[:20]!r}", changed(("labels",), {key: "x"}), f"labels.{quoted(key)}",
            "is not a valid Kubernetes label key")
    for value in BAD_LABEL_VALUES:
        add(f"label value {value!r}", changed(("labels",), {"zone": value}), 'labels."zone"',
            "is not a valid Kubernetes label value")

    # keys repeated in another case
    add("VIPPOOL and vipPool", {**BASE, "VIPPOOL": [VIP]}, "VIPPOOL", 'duplicate key (also given as "vipPool")')
    add("Service and service", entry_field("Service", "api"), f"{ENTRY}.Service",
        'duplicate key (also given as "service")')
    add("Scheduler and scheduler", ipvs_fields(Scheduler="rr"), f"{IPVS}.Scheduler",
        'duplicate key (also given as "scheduler")')
    return cases


CASES = _cases()


def test_the_corpus_starts_from_a_good_config() -> None:
    config = parse_lbconfig_value(BASE)
    assert len(config.entries) == 2
    assert config.warnings == ()


def test_the_corpus_names_each_case_once() -> None:
    names = [case.name for case in CASES]
    assert len(names) == len(set(names))


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_a_bad_value_is_rejected_with_one_issue_at_its_path(case: Bad) -> None:
    with pytest.raises(ConfigError) as info:
        parse_lbconfig_value(case.doc)
    check_only_issue(info.value, case.path, case.fragment)


@pytest.mark.parametrize("case", [c for c in CASES if c.as_text], ids=[c.name for c in CASES if c.as_text])
def test_the_same_bad_value_written_as_json_text_is_rejected_alike(case: Bad) -> None:
    with pytest.raises(ConfigError) as from_value:
        parse_lbconfig_value(case.doc)
    with pytest.raises(ConfigError) as from_text:
        parse_lbconfig(json.dumps(case.doc))
    assert from_text.value.issues == from_value.value.issues


def test_a_name_with_a_newline_is_shown_escaped_on_one_line() -> None:
    with pytest.raises(ConfigError) as info:
        parse_lbconfig_value(entry_field("service", "web\n"))
    assert str(info.value) == f'{ENTRY}.service: "web\\n" is not a valid Kubernetes service name'


def test_a_name_with_a_bidi_override_is_shown_escaped() -> None:
    with pytest.raises(ConfigError) as info:
        parse_lbconfig_value(entry_field("service", "web\u202e"))
    assert str(info.value) == f'{ENTRY}.service: "web\\u202e" is not a valid Kubernetes service name'


def test_a_name_with_a_lone_surrogate_is_shown_escaped() -> None:
    with pytest.raises(ConfigError) as info:
        parse_lbconfig('{"config": {"192.0.2.10": {"8080": {"namespace": "\\ud800", "service": "web", '
                       '"portName": "http"}}}}')
    assert str(info.value) == f'{ENTRY}.namespace: "\\ud800" is not a valid Kubernetes namespace name'


def test_a_very_long_bad_value_is_shortened_in_the_message() -> None:
    with pytest.raises(ConfigError) as info:
        parse_lbconfig_value(entry_field("service", "x" * 10_000))
    assert len(str(info.value)) < 200


def test_an_entry_at_fault_is_dropped_but_the_others_are_still_checked() -> None:
    doc = changed(("config", VIP, "8081"), {**good_entry(), "service": "Bad"})
    doc = {**doc, "config6": {VIP6: {"80": {**good_entry(), "namespace": "Bad"}}}}
    with pytest.raises(ConfigError) as info:
        parse_lbconfig_value(doc)
    assert [i.path for i in info.value.issues] == [f'config."{VIP}"."8081".service',
                                                   f'config6."{VIP6}"."80".namespace']


# --------------------------------------------------------------------------------------------
# Texts that are not a JSON object at all

DEEP_ARRAYS = "[" * 100_000 + "]" * 100_000

TEXTS: list[tuple[str, str | bytes, str]] = [
    ("unclosed", "{", "not valid JSON: Expecting property name"),
    ("single quotes", "{'vipPool': []}", "not valid JSON"),
    ("empty", "", "not valid JSON: Expecting value: line 1 column 1"),
    ("blank", "  \n ", "not valid JSON"),
    ("NaN", "NaN", "not valid JSON: NaN is not valid JSON"),
    ("NaN inside", '{"mtuConfig": {"192.0.2.10": NaN}}', "not valid JSON"),
    ("Infinity", '{"a": -Infinity}', "not valid JSON"),
    ("trailing garbage", "{}x", "not valid JSON: Extra data"),
    ("trailing comma", '{"vipPool": [],}', "not valid JSON"),
    ("comment", '{"vipPool": []} // green', "not valid JSON"),
    ("BOM in text", "\ufeff{}", "not valid JSON"),
    ("bad UTF-8", b'{"vipPool": ["\xff"]}', "not valid JSON"),
    ("binary", b"\xff\xfe\xfd", "not valid JSON"),
    ("NUL", "\x00", "not valid JSON"),
    ("int with 5000 digits", '{"a": 1' + "0" * 5000 + "}", "not valid JSON"),
    ("array", "[]", "the LB config must be a JSON object, not an array"),
    ("string", '"{}"', "the LB config must be a JSON object, not a string"),
    ("null", "null", "the LB config must be a JSON object, not null"),
    ("number", "42", "the LB config must be a JSON object, not a number"),
    ("float", "1.5", "the LB config must be a JSON object, not a number"),
    ("boolean", "true", "the LB config must be a JSON object, not a boolean"),
    ("10 MB", " " * (10 * 1024 * 1024) + "{}", f"is 10485762 bytes; the limit is {MAX_CONFIG_BYTES} bytes"),
    ("10 MB of bytes", b"[" * (10 * 1024 * 1024), f"is 10485760 bytes; the limit is {MAX_CONFIG_BYTES} bytes"),
    ("few characters but many bytes", '{"a": "' + "\u00e9" * (MAX_CONFIG_BYTES // 2) + '"}',
     f"is {MAX_CONFIG_BYTES + 9} bytes; the limit is {MAX_CONFIG_BYTES} bytes"),
    ("100000 nested arrays", DEEP_ARRAYS, "not valid JSON: nested too deeply"),
    ("100000 nested objects", '{"a":' * 100_000 + "1" + "}" * 100_000, "not valid JSON: nested too deeply"),
    ("nesting under a known key", '{"config": ' + DEEP_ARRAYS + "}", "not valid JSON: nested too deeply"),
    ("unterminated nesting", "[" * 100_000, "not valid JSON"),
]


@pytest.mark.parametrize(("text", "fragment"), [t[1:] for t in TEXTS], ids=[t[0] for t in TEXTS])
def test_a_text_that_is_not_a_json_object_is_rejected_with_one_clear_issue(text: str | bytes, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_lbconfig(text)
    check_only_issue(info.value, "", fragment)


def test_a_text_just_under_the_size_limit_is_not_refused_for_its_size() -> None:
    text = '{"a": "' + "x" * (MAX_CONFIG_BYTES - 9) + '"}'
    assert len(text.encode()) == MAX_CONFIG_BYTES
    assert [w.path for w in parse_lbconfig(text).warnings] == ["a"]


# --------------------------------------------------------------------------------------------
# Whole files: ConfigMaps and bare values, JSON or YAML


def configmap_yaml(**data: str) -> str:
    lines = ["apiVersion: v1", "kind: ConfigMap", "metadata:", "  name: kube2ipvs", "data:"]
    lines += [f"  {key}: {json.dumps(value)}" for key, value in data.items()]
    return "\n".join(lines) + "\n"


GOOD = json.dumps(BASE)

DOCUMENTS: list[tuple[str, str | bytes, str | None, str, str]] = [
    ("YAML list", "- vipPool\n- config\n", None, "", "the LB config must be a JSON object, not an array"),
    ("YAML scalar", "green\n", None, "", "the LB config must be a JSON object, not a string"),
    ("empty file", "", None, "", "the LB config must be a JSON object, not null"),
    ("YAML date", "2024-01-01\n", None, "", "the LB config must be a JSON object, not a date"),
    ("YAML with a Python tag", "a: !!python/object/apply:os.system ['true']\n", None, "",
     "not valid JSON or YAML: could not determine a constructor"),
    ("YAML syntax error", "a: [\n", None, "", "not valid JSON or YAML"),
    ("YAML tab indentation", "a:\n\t- b\n", None, "", "not valid JSON or YAML"),
    ("deep YAML", "- " * 100_000 + "x\n", None, "", "not valid JSON or YAML"),
    ("deep flow YAML", "a: " + "[" * 100_000, None, "", "not valid JSON"),
    ("deep JSON", DEEP_ARRAYS, None, "", "nested too deeply"),
    ("binary", b"\x89PNG\r\n\x1a\n\x00\x00", None, "", "not valid JSON or YAML"),
    ("10 MB", b" " * (10 * 1024 * 1024), None, "", f"the limit is {MAX_DOCUMENT_BYTES} bytes"),
    ("YAML numeric port key", f"config:\n  '{VIP}':\n    8080: {{namespace: a, service: b, portName: c}}\n", None,
     f'config."{VIP}"', "8080 is not allowed as a key (keys are strings)"),
    ("YAML null key", "~: 1\n", None, "", "null is not allowed as a key"),
    ("key on a bare value", GOOD, "green", "", '--config-key "green" given, but the file is not a ConfigMap'),
    ("several keys, none chosen", configmap_yaml(green=GOOD, blue=GOOD), None, "data",
     "the ConfigMap has several keys (blue, green); choose one"),
    ("missing key", configmap_yaml(green=GOOD, blue=GOOD), "red", "data.red",
     "no such key in the ConfigMap (it has: blue, green)"),
    ("no data", "kind: ConfigMap\nmetadata: {name: kube2ipvs}\n", None, "data", "the ConfigMap has no data"),
    ("empty data", '{"kind": "ConfigMap", "data": {}}', None, "data", "the ConfigMap has no data"),
    ("data a list", "kind: ConfigMap\ndata: [a]\n", None, "data", "the ConfigMap has no data"),
    ("value not a string", "kind: ConfigMap\ndata:\n  green: {vipPool: []}\n", "green", "data.green",
     "ConfigMap data values must be strings"),
    ("key repeated", '{"kind": "ConfigMap", "data": {"green": "{}", "green": "{}"}}', "green", "data.green",
     "key given more than once"),
    ("value not JSON", configmap_yaml(green="vipPool: []"), "green", "", "not valid JSON"),
    ("value not an object", configmap_yaml(green="[]"), None, "", "must be a JSON object, not an array"),
    ("value with a bad address", configmap_yaml(green='{"vipPool": ["x"]}'), "green", "vipPool[0]",
     '"x" is not an IP address'),
    ("value over 1 MiB", json.dumps({"kind": "ConfigMap", "data": {"green": " " * (2 * MAX_CONFIG_BYTES)}}),
     None, "", f"the limit is {MAX_CONFIG_BYTES} bytes"),
]


@pytest.mark.parametrize(("text", "key", "path", "fragment"), [d[1:] for d in DOCUMENTS],
                         ids=[d[0] for d in DOCUMENTS])
def test_a_bad_file_is_rejected_with_one_issue_at_its_path(
    text: str | bytes, key: str | None, path: str, fragment: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_config_document(text, key)
    check_only_issue(info.value, path, fragment)
