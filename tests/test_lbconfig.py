"""The LB config schema (DESIGN 3.1): what a good config means, and how a bad one is reported."""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kube2ipvs.lbconfig import (
    DEFAULT_IPVS_OPTIONS,
    EMPTY_CONFIG,
    MAX_REPORTED_ERRORS,
    ConfigError,
    ConfigIssue,
    DefaultService,
    IPVSOptions,
    LBConfig,
    PortConfig,
    config_to_json,
    load_config_document,
    merge_lbconfigs,
    parse_label_selector,
    parse_lbconfig,
    parse_lbconfig_value,
    removal_check,
    with_default_service,
)
from tests.conftest import realistic_config

VIP = "192.0.2.10"
VIP2 = "192.0.2.11"
VIP6 = "2001:db8::10"
WEB = f'config."{VIP}"."8080"'

DESIGN_EXAMPLE = """
{"vipPool": ["192.0.2.10", "192.0.2.11"],
 "labels": {"example.com/lb-zone": "green"},
 "mtuConfig": {"192.0.2.10": "9000"},
 "config": {"192.0.2.10": {"8080": {"namespace": "shop", "service": "web", "portName": "http",
            "tcpEnabled": true, "udpEnabled": false,
            "ipvsOptions": {"scheduler": "wrr", "forwardingMethod": "g",
                            "uThreshold": 0, "lThreshold": 0, "flags": ""}}}},
 "config6": {}}
"""


def entry(**fields: object) -> dict[str, object]:
    return {"namespace": "shop", "service": "web", "portName": "http", **fields}


def one_entry(**fields: object) -> dict[str, object]:
    """A config whose only entry is VIP:8080 with `fields` on top of the usual names."""
    return {"vipPool": [VIP], "config": {VIP: {"8080": entry(**fields)}}}


def port(vip: str, number: int, *, tcp: bool = True, udp: bool = False, service: str = "web",
         ipvs: IPVSOptions = DEFAULT_IPVS_OPTIONS) -> PortConfig:
    return PortConfig(vip=vip, family=6 if ":" in vip else 4, port=number, namespace="shop", service=service,
                      port_name="http", tcp=tcp, udp=udp, ipvs=ipvs)


def issues(doc: object) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_lbconfig_value(doc)
    return [str(issue) for issue in info.value.issues]


# --------------------------------------------------------------------------------------------
# What a good config means


def test_the_design_example_parses_to_its_meaning() -> None:
    assert parse_lbconfig(DESIGN_EXAMPLE) == LBConfig(
        vip_pool=(VIP, VIP2),
        labels=(("example.com/lb-zone", "green"),),
        mtu=((VIP, 9000),),
        entries=(port(VIP, 8080, ipvs=IPVSOptions(scheduler="wrr", forwarding="g", u_threshold=0,
                                                  l_threshold=0, flags=())),),
    )


def test_the_design_example_draws_no_warning() -> None:
    assert parse_lbconfig(DESIGN_EXAMPLE).warnings == ()


def test_text_and_bytes_parse_alike() -> None:
    assert parse_lbconfig(DESIGN_EXAMPLE.encode()) == parse_lbconfig(DESIGN_EXAMPLE)


def test_an_empty_object_is_the_empty_config() -> None:
    assert parse_lbconfig("{}") == EMPTY_CONFIG


def test_addresses_come_out_in_canonical_form() -> None:
    config = parse_lbconfig_value({
        "vipPool": ["2001:DB8:0:0:0:0:0:10"],
        "mtuConfig6": {"2001:0db8::0010": "1500"},
        "config6": {"2001:db8:0000::10": {"80": entry()}},
    })
    assert config.vip_pool == (VIP6,)
    assert config.mtu == ((VIP6, 1500),)
    assert [e.vip for e in config.entries] == [VIP6]
    assert config.entries[0].family == 6


def test_entries_are_sorted_by_family_then_address_then_port_numerically() -> None:
    config = parse_lbconfig_value({
        "config6": {VIP6: {"80": entry()}},
        "config": {
            "192.0.2.100": {"80": entry()},
            "192.0.2.9": {"8080": entry(), "443": entry(), "80": entry()},
        },
    })
    assert [(e.vip, e.port) for e in config.entries] == [
        ("192.0.2.9", 80), ("192.0.2.9", 443), ("192.0.2.9", 8080), ("192.0.2.100", 80), (VIP6, 80),
    ]


def test_the_pool_is_sorted_numerically_with_ipv4_first() -> None:
    config = parse_lbconfig_value({"vipPool": [VIP6, "192.0.2.100", "192.0.2.9"]})
    assert config.vip_pool == ("192.0.2.9", "192.0.2.100", VIP6)


def test_vips_lists_pool_and_entry_addresses_once_each() -> None:
    config = parse_lbconfig_value({"vipPool": [VIP, VIP2], "config": {VIP: {"80": entry()}},
                                   "config6": {VIP6: {"80": entry()}}})
    assert config.vips() == (VIP, VIP2, VIP6)


def test_mtus_written_as_strings_or_numbers_are_read_as_numbers() -> None:
    config = parse_lbconfig_value({"mtuConfig": {VIP: "9000", VIP2: 1500}, "mtuConfig6": {VIP6: "576"}})
    assert config.mtu == ((VIP, 9000), (VIP2, 1500), (VIP6, 576))
    assert config.mtu_of(VIP) == 9000
    assert config.mtu_of("192.0.2.99") is None


def test_labels_are_kept_sorted_by_key() -> None:
    config = parse_lbconfig_value({"labels": {"zone": "green", "example.com/rack": "", "a.io/b": "c-d_e.f"}})
    assert config.labels == (("a.io/b", "c-d_e.f"), ("example.com/rack", ""), ("zone", "green"))


def test_an_entry_without_switches_or_options_serves_tcp_with_default_options() -> None:
    (only,) = parse_lbconfig_value(one_entry()).entries
    assert (only.tcp, only.udp, only.protocols) == (True, False, ("tcp",))
    assert only.ipvs == IPVSOptions(scheduler=None, forwarding="g", u_threshold=0, l_threshold=0, flags=())


def test_null_switches_mean_their_defaults() -> None:
    (only,) = parse_lbconfig_value(one_entry(tcpEnabled=None, udpEnabled=None, ipvsOptions=None)).entries
    assert only.protocols == ("tcp",)
    assert only.ipvs == DEFAULT_IPVS_OPTIONS


def test_empty_scheduler_and_forwarding_method_mean_the_defaults() -> None:
    (only,) = parse_lbconfig_value(one_entry(ipvsOptions={"scheduler": "", "forwardingMethod": "",
                                                          "flags": ""})).entries
    assert only.ipvs.scheduler is None
    assert only.ipvs.forwarding == "g"


@pytest.mark.parametrize("scheduler", ["rr", "wrr", "lc", "wlc", "lblc", "lblcr", "dh", "sh", "sed", "nq",
                                       "fo", "ovf", "mh"])
def test_every_ipvs_scheduler_is_accepted(scheduler: str) -> None:
    (only,) = parse_lbconfig_value(one_entry(ipvsOptions={"scheduler": scheduler})).entries
    assert only.ipvs.scheduler == scheduler


def test_forwarding_method_i_selects_ipip_tunnelling() -> None:
    (only,) = parse_lbconfig_value(one_entry(ipvsOptions={"scheduler": "mh", "forwardingMethod": "i"})).entries
    assert (only.ipvs.scheduler, only.ipvs.forwarding) == ("mh", "i")


def test_thresholds_are_kept() -> None:
    (only,) = parse_lbconfig_value(one_entry(ipvsOptions={"uThreshold": 300, "lThreshold": 200})).entries
    assert (only.ipvs.u_threshold, only.ipvs.l_threshold) == (300, 200)


@pytest.mark.parametrize(("scheduler", "flags", "bits"), [
    ("mh", "flag-1,flag-2", (1, 2)),
    ("wrr", " flag-3 , flag-1", (1, 3)),
    ("sh", "sh-fallback,sh-port", (1, 2)),
    ("mh", "mh-port", (2,)),
    ("", "mh-fallback", (1,)),  # an unset scheduler may become mh (BGP mode), so mh flags are allowed
    ("mh", "flag-2,mh-port", (2,)),
    ("rr", "", ()),
])
def test_scheduler_flags_become_sorted_bits(scheduler: str, flags: str, bits: tuple[int, ...]) -> None:
    (only,) = parse_lbconfig_value(one_entry(ipvsOptions={"scheduler": scheduler, "flags": flags})).entries
    assert only.ipvs.flags == bits


def test_an_entry_with_tcp_and_udp_disabled_serves_nothing() -> None:
    config = parse_lbconfig_value(one_entry(tcpEnabled=False, udpEnabled=False))
    assert config.entries[0].protocols == ()
    assert config.enabled_keys() == frozenset()


def test_udp_and_tcp_together_give_two_protocols() -> None:
    config = parse_lbconfig_value(one_entry(udpEnabled=True))
    assert config.enabled_keys() == {(VIP, 8080, "tcp"), (VIP, 8080, "udp")}


def test_an_address_listed_twice_in_the_pool_is_kept_once_with_a_warning() -> None:
    config = parse_lbconfig_value({"vipPool": [VIP, "2001:db8::1", "2001:DB8::1"]})
    assert config.vip_pool == (VIP, "2001:db8::1")
    assert [str(w) for w in config.warnings] == ['vipPool[2]: "2001:DB8::1" is listed twice']


# --------------------------------------------------------------------------------------------
# Keys: case-insensitive, unknown ones warned about


def test_keys_match_case_insensitively() -> None:
    shouting = {
        "VIPPOOL": [VIP],
        "Labels": {"zone": "green"},
        "MTUCONFIG": {VIP: "1500"},
        "CONFIG": {VIP: {"8080": {
            "NameSpace": "shop", "SERVICE": "web", "PortName": "http", "TcpEnabled": False, "UDPENABLED": True,
            "IPVSOptions": {"Scheduler": "sh", "ForwardingMethod": "i", "UTHRESHOLD": 9, "lthreshold": 3,
                            "FLAGS": "sh-port"},
        }}},
    }
    plain = {
        "vipPool": [VIP],
        "labels": {"zone": "green"},
        "mtuConfig": {VIP: "1500"},
        "config": {VIP: {"8080": {
            "namespace": "shop", "service": "web", "portName": "http", "tcpEnabled": False, "udpEnabled": True,
            "ipvsOptions": {"scheduler": "sh", "forwardingMethod": "i", "uThreshold": 9, "lThreshold": 3,
                            "flags": "sh-port"},
        }}},
    }
    loud = parse_lbconfig_value(shouting)
    assert loud == parse_lbconfig_value(plain)
    assert loud.warnings == ()
    assert loud.entries[0].ipvs == IPVSOptions(scheduler="sh", forwarding="i", u_threshold=9, l_threshold=3,
                                               flags=(2,))


def test_values_are_not_case_insensitive() -> None:
    assert issues(one_entry(ipvsOptions={"scheduler": "WRR"})) == [
        f'{WEB}.ipvsOptions.scheduler: "WRR" is not one of rr, wrr, lc, wlc, lblc, lblcr, dh, sh, sed, nq, fo, '
        "ovf, mh",
    ]


def test_a_top_level_key_given_twice_in_different_case_is_an_error() -> None:
    assert issues({"vipPool": [VIP], "VIPPOOL": [VIP2]}) == ['VIPPOOL: duplicate key (also given as "vipPool")']


def test_an_entry_key_given_twice_in_different_case_is_an_error() -> None:
    assert issues(one_entry(tcpEnabled=True, TcpEnabled=False)) == [
        f'{WEB}.TcpEnabled: duplicate key (also given as "tcpEnabled")',
    ]


def test_an_ipvs_option_given_twice_in_different_case_is_an_error() -> None:
    doc = one_entry(ipvsOptions={"scheduler": "rr", "Scheduler": "wrr"})
    assert issues(doc) == [f'{WEB}.ipvsOptions.Scheduler: duplicate key (also given as "scheduler")']


def test_ipvs_options_given_in_both_spellings_is_an_error() -> None:
    doc = one_entry(ipvsOptions={}, IPVSOptions={})
    assert issues(doc) == [f'{WEB}.IPVSOptions: duplicate key (also given as "ipvsOptions")']


def test_a_port_written_twice_in_the_json_text_is_an_error_rather_than_silently_dropped() -> None:
    text = ('{"config": {"192.0.2.10": {"8080": {"namespace": "shop", "service": "web", "portName": "http"},'
            ' "8080": {"namespace": "shop", "service": "api", "portName": "http"}}}}')
    with pytest.raises(ConfigError) as info:
        parse_lbconfig(text)
    assert [str(i) for i in info.value.issues] == [f"{WEB}: key given more than once"]


def test_a_field_written_twice_in_the_json_text_is_an_error() -> None:
    text = '{"vipPool": ["192.0.2.10"], "vipPool": ["192.0.2.11"]}'
    with pytest.raises(ConfigError) as info:
        parse_lbconfig(text)
    assert [str(i) for i in info.value.issues] == ["vipPool: key given more than once"]


def test_unknown_keys_are_accepted_with_a_warning_naming_their_path() -> None:
    doc = one_entry(weight=3, ipvsOptions={"scheduler": "rr", "timeout": 5})
    doc["colour"] = "green"
    config = parse_lbconfig_value(doc)
    assert [str(w) for w in config.warnings] == [
        "colour: unknown key, ignored",
        f"{WEB}.weight: unknown key, ignored",
        f"{WEB}.ipvsOptions.timeout: unknown key, ignored",
    ]
    assert config == parse_lbconfig_value(one_entry(ipvsOptions={"scheduler": "rr"}))


def test_an_unknown_key_that_is_not_an_identifier_is_quoted_in_its_path() -> None:
    config = parse_lbconfig_value({"my key": 1})
    assert [str(w) for w in config.warnings] == ['"my key": unknown key, ignored']


def test_ravel_switches_left_off_draw_no_warning() -> None:
    doc = one_entry(ipv4Enabled=True, ipv6Enabled=False, proxyProtocolEnabled=False,
                    IPVSOptions={"persistenceEnabled": False, "persistenceTimeout": 0, "persistenceNetmask": ""})
    doc["ipv6"] = None
    config = parse_lbconfig_value(doc)
    assert config.warnings == ()
    assert config == parse_lbconfig_value(one_entry())


@pytest.mark.parametrize(("where", "key", "path"), [
    ("entry", "proxyProtocolEnabled", f"{WEB}.proxyProtocolEnabled"),
    ("ipvs", "persistenceEnabled", f"{WEB}.ipvsOptions.persistenceEnabled"),
    ("top", "ipv6", "ipv6"),
])
def test_ravel_features_turned_on_are_accepted_with_a_warning(where: str, key: str, path: str) -> None:
    doc = one_entry(ipvsOptions={})
    if where == "entry":
        doc["config"][VIP]["8080"][key] = True  # type: ignore[index]
    elif where == "ipvs":
        doc["config"][VIP]["8080"]["ipvsOptions"][key] = True  # type: ignore[index]
    else:
        doc[key] = {VIP: "2001:db8::10"}
    config = parse_lbconfig_value(doc)
    assert [str(w) for w in config.warnings] == [f"{path}: not supported by kube2ipvs, ignored"]
    assert len(config.entries) == 1


def test_ravel_switches_must_still_be_booleans() -> None:
    assert issues(one_entry(ipv4Enabled="yes")) == [f'{WEB}.ipv4Enabled: "yes" is not true or false']


# --------------------------------------------------------------------------------------------
# Errors: one line each, with the JSON path, in the words of DESIGN 3.1


@pytest.mark.parametrize(("doc", "expected"), [
    (one_entry(ipvsOptions={"scheduler": "fastest"}),
     f'{WEB}.ipvsOptions.scheduler: "fastest" is not one of rr, wrr, lc, wlc, lblc, lblcr, dh, sh, sed, nq, fo, '
     "ovf, mh"),
    (one_entry(ipvsOptions={"forwardingMethod": "m"}),
     f'{WEB}.ipvsOptions.forwardingMethod: "m" is not g (direct routing) or i (IPIP tunnel)'),
    (one_entry(ipvsOptions={"uThreshold": 5, "lThreshold": 10}),
     f"{WEB}.ipvsOptions.lThreshold: 10 is greater than uThreshold 5"),
    (one_entry(ipvsOptions={"uThreshold": -1}), f"{WEB}.ipvsOptions.uThreshold: -1 is outside 0-4294967295"),
    (one_entry(ipvsOptions={"uThreshold": 2.0}),
     f"{WEB}.ipvsOptions.uThreshold: 2.0 must be written as a whole number without a fraction"),
    (one_entry(ipvsOptions={"lThreshold": "5"}), f'{WEB}.ipvsOptions.lThreshold: "5" is not a whole number'),
    (one_entry(ipvsOptions={"scheduler": "wrr", "flags": "sh-port"}),
     f'{WEB}.ipvsOptions.flags: "sh-port" needs scheduler sh'),
    (one_entry(ipvsOptions={"flags": "fast"}),
     f'{WEB}.ipvsOptions.flags: "fast" is not one of flag-1, flag-2, flag-3, sh-fallback, sh-port, '
     "mh-fallback, mh-port"),
    (one_entry(service="web; flush ruleset"),
     f'{WEB}.service: "web; flush ruleset" is not a valid Kubernetes service name'),
    (one_entry(namespace="Shop"), f'{WEB}.namespace: "Shop" is not a valid Kubernetes namespace name'),
    (one_entry(portName="http\n"), f'{WEB}.portName: "http\\n" is not a valid Kubernetes port name'),
    ({"config": {VIP: {"8080": {"service": "web", "portName": "http"}}}},
     f"{WEB}.namespace: a Kubernetes namespace name is required"),
    (one_entry(tcpEnabled="yes"), f'{WEB}.tcpEnabled: "yes" is not true or false'),
    (one_entry(ipvsOptions=[]), f"{WEB}.ipvsOptions: an array is not an object"),
    ({"config": {VIP: {"8080": "web"}}}, f'{WEB}: "web" is not an object'),
    ({"config": {VIP: {"080": entry()}}},
     f'config."{VIP}"."080": "080" is not a port number 1-65535 (decimal, no leading zeros)'),
    ({"config": {"2001:db8::1": {"80": entry()}}}, 'config."2001:db8::1": "2001:db8::1" is not an IPv4 address'),
    ({"config6": {VIP: {"80": entry()}}}, f'config6."{VIP}": "{VIP}" is not an IPv6 address'),
    ({"config": {"224.0.0.1": {"80": entry()}}},
     'config."224.0.0.1": "224.0.0.1" cannot be a VIP (unspecified, loopback, multicast or broadcast)'),
    ({"config": {VIP: []}}, f'config."{VIP}": an array is not an object mapping port to service'),
    ({"config": [VIP]}, "config: an array is not an object mapping VIP to ports"),
    ({"vipPool": ["192.0.2.300"]}, 'vipPool[0]: "192.0.2.300" is not an IP address'),
    ({"vipPool": VIP}, f'vipPool: "{VIP}" is not an array of addresses'),
    ({"mtuConfig": {VIP: "100"}}, f'mtuConfig."{VIP}": 100 is outside 576-9216'),
    ({"mtuConfig": {VIP: "abc"}}, f'mtuConfig."{VIP}": "abc" is not a whole number'),
    ({"mtuConfig": {VIP: None}}, f'mtuConfig."{VIP}": null is not an MTU'),
    ({"mtuConfig6": {VIP6: "1500", "2001:DB8::10": "9000"}},
     f'mtuConfig6."2001:DB8::10": same address as "{VIP6}"'),
    ({"config6": {VIP6: {"80": entry()}, "2001:DB8::10": {"81": entry()}}},
     f'config6."2001:DB8::10": same address as "{VIP6}"'),
    ({"labels": {"-bad": "x"}}, 'labels."-bad": "-bad" is not a valid Kubernetes label key'),
    ({"labels": {"zone": "a b"}}, 'labels."zone": "a b" is not a valid Kubernetes label value'),
    ({"labels": ["zone"]}, "labels: an array is not an object of label key to value"),
    ([], "the LB config must be a JSON object, not an array"),
], ids=lambda v: None if isinstance(v, dict | list) else v.replace(f"{WEB}.", "")[:50])
def test_each_error_is_reported_with_its_path_in_design_words(doc: object, expected: str) -> None:
    assert issues(doc) == [expected]


def test_every_error_in_a_config_is_reported_at_once() -> None:
    doc: dict[str, object] = {
        "vipPool": ["192.0.2.300"],
        "mtuConfig": {VIP: "10000"},
        "labels": {"zone": "green!"},
        "config": {
            VIP: {
                "8080": entry(ipvsOptions={"scheduler": "fastest"}),
                "70000": entry(),
            },
        },
        "config6": {VIP6: {"80": entry(service="$(reboot)")}},
    }
    with pytest.raises(ConfigError) as info:
        parse_lbconfig_value(doc)
    assert sorted(i.path for i in info.value.issues) == sorted([
        "vipPool[0]",
        f'mtuConfig."{VIP}"',
        'labels."zone"',
        f"{WEB}.ipvsOptions.scheduler",
        f'config."{VIP}"."70000"',
        f'config6."{VIP6}"."80".service',
    ])


def test_several_errors_in_one_entry_are_all_reported() -> None:
    doc = one_entry(namespace="", service="Web", portName=None, tcpEnabled=1,
                    ipvsOptions={"forwardingMethod": "m", "uThreshold": -5})
    assert [i.split(": ")[0] for i in issues(doc)] == [
        f"{WEB}.namespace", f"{WEB}.service", f"{WEB}.portName", f"{WEB}.tcpEnabled",
        f"{WEB}.ipvsOptions.forwardingMethod", f"{WEB}.ipvsOptions.uThreshold",
    ]


def test_an_error_message_joins_every_issue() -> None:
    with pytest.raises(ConfigError) as info:
        parse_lbconfig_value({"vipPool": ["x", "y"]})
    assert str(info.value) == 'vipPool[0]: "x" is not an IP address; vipPool[1]: "y" is not an IP address'


def test_a_very_long_error_list_is_cut_short_in_the_message_but_kept_whole_in_issues() -> None:
    bad = MAX_REPORTED_ERRORS + 50
    with pytest.raises(ConfigError) as info:
        parse_lbconfig_value({"vipPool": [f"not-an-address-{i}" for i in range(bad)]})
    assert len(info.value.issues) == bad
    assert str(info.value).endswith("; ... and 50 more")


def test_an_issue_without_a_path_is_just_its_message() -> None:
    assert str(ConfigIssue("", "not valid JSON")) == "not valid JSON"
    assert str(ConfigIssue("vipPool[0]", "bad")) == "vipPool[0]: bad"


def test_a_rejected_config_is_a_value_error_for_callers_that_catch_those() -> None:
    with pytest.raises(ValueError, match="not valid JSON"):
        parse_lbconfig("{")


# --------------------------------------------------------------------------------------------
# Whole documents: bare values and ConfigMaps in JSON or YAML


def configmap(**data: str) -> dict[str, object]:
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "kube2ipvs", "namespace": "platform-load-balancer"}, "data": data}


def test_a_bare_value_loads_with_no_key() -> None:
    assert load_config_document(DESIGN_EXAMPLE) == (parse_lbconfig(DESIGN_EXAMPLE), None)


def test_a_configmap_with_one_key_needs_no_key_chosen() -> None:
    text = json.dumps(configmap(green=DESIGN_EXAMPLE))
    assert load_config_document(text) == (parse_lbconfig(DESIGN_EXAMPLE), "green")


def test_a_yaml_configmap_loads_the_chosen_key() -> None:
    text = (
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: kube2ipvs\ndata:\n"
        f"  blue: '{{}}'\n  green: '{json.dumps(json.loads(DESIGN_EXAMPLE))}'\n"
    )
    assert load_config_document(text, "green") == (parse_lbconfig(DESIGN_EXAMPLE), "green")
    assert load_config_document(text, "blue") == (EMPTY_CONFIG, "blue")


def test_a_bare_yaml_mapping_is_read_like_json() -> None:
    text = f"vipPool: [{VIP}]\nconfig:\n  '{VIP}':\n    '8080': {{namespace: shop, service: web, portName: http}}\n"
    config, key = load_config_document(text)
    assert key is None
    assert config == parse_lbconfig_value(one_entry())


def test_a_bare_yaml_mapping_with_a_numeric_port_key_names_it() -> None:
    text = f"config:\n  '{VIP}':\n    8080: {{namespace: shop, service: web, portName: http}}\n"
    with pytest.raises(ConfigError) as info:
        load_config_document(text)
    assert [str(i) for i in info.value.issues] == [
        f'config."{VIP}": 8080 is not allowed as a key (keys are strings)',
    ]


# --------------------------------------------------------------------------------------------
# Removal check: holding back a config that would take away most of what is in force


def four_keys() -> LBConfig:
    return parse_lbconfig_value({"config": {VIP: {"80": entry(udpEnabled=True), "443": entry()},
                                            VIP2: {"80": entry()}}})


def test_applying_the_same_config_removes_nothing() -> None:
    config = four_keys()
    check = removal_check(config, config)
    assert (check.removed, check.in_force, check.share, check.exceeds) == ((), 4, 0.0, False)


def test_the_first_config_removes_nothing() -> None:
    check = removal_check(None, four_keys())
    assert (check.removed, check.in_force, check.share, check.exceeds) == ((), 0, 0.0, False)


def test_removed_vip_ports_are_listed_per_protocol_in_order() -> None:
    new = parse_lbconfig_value({"config": {VIP: {"443": entry()}, VIP2: {"80": entry()}}})
    check = removal_check(four_keys(), new)
    assert check.removed == ((VIP, 80, "tcp"), (VIP, 80, "udp"))
    assert check.share == 0.5


def test_exactly_the_limit_is_allowed_and_more_is_held_back() -> None:
    new = parse_lbconfig_value({"config": {VIP: {"443": entry()}, VIP2: {"80": entry()}}})
    assert not removal_check(four_keys(), new).exceeds
    assert removal_check(four_keys(), new, max_share=0.4).exceeds


def test_disabling_a_protocol_counts_as_removing_it() -> None:
    new = parse_lbconfig_value({"config": {VIP: {"80": entry(tcpEnabled=False, udpEnabled=False),
                                                 "443": entry()}, VIP2: {"80": entry()}}})
    assert removal_check(four_keys(), new).removed == ((VIP, 80, "tcp"), (VIP, 80, "udp"))


def test_removing_everything_exceeds_the_default_limit_and_says_so() -> None:
    check = removal_check(four_keys(), EMPTY_CONFIG)
    assert (check.share, check.exceeds) == (1.0, True)
    assert check.describe() == "would remove 4 of 4 VIP:port/protocols in force (100%, limit 50%)"


def test_adding_entries_removes_nothing() -> None:
    bigger = parse_lbconfig_value({"config": {VIP: {"80": entry(udpEnabled=True), "443": entry(), "8443": entry()},
                                              VIP2: {"80": entry()}}})
    assert removal_check(four_keys(), bigger, max_share=0.0).exceeds is False


@pytest.mark.parametrize("share", [-0.1, 1.01, float("nan")])
def test_a_limit_outside_zero_to_one_is_refused(share: float) -> None:
    with pytest.raises(ValueError, match=r"is outside 0\.\.1"):
        removal_check(EMPTY_CONFIG, EMPTY_CONFIG, max_share=share)


# --------------------------------------------------------------------------------------------
# The default ("unicorns") service


UNICORNS = DefaultService(namespace="rdei-system", service="unicorns", port_name="http", port=70)


def unicorn(vip: str) -> PortConfig:
    return PortConfig(vip=vip, family=6 if ":" in vip else 4, port=70, namespace="rdei-system",
                      service="unicorns", port_name="http", tcp=True, udp=False, ipvs=DEFAULT_IPVS_OPTIONS)


def test_the_default_service_is_added_only_where_a_pool_vip_lacks_an_enabled_entry_on_its_port() -> None:
    base = parse_lbconfig_value({
        "vipPool": ["192.0.2.1", "192.0.2.2", "192.0.2.3", "192.0.2.4", VIP6],
        "config": {
            "192.0.2.1": {"70": entry(service="gopher")},  # taken: kept as it is
            "192.0.2.2": {"70": entry(service="gopher", tcpEnabled=False, udpEnabled=False,
                                      ipvsOptions={"forwardingMethod": "i"})},  # Ravel's disabled unicorns
            "192.0.2.3": {"70": entry(service="gopher", tcpEnabled=False, udpEnabled=True)},  # UDP counts
            "192.0.2.4": {"80": entry()},
            "192.0.2.9": {"80": entry()},  # not in the pool: left alone
        },
    })
    result = with_default_service(base, UNICORNS)
    assert result.entries == (
        port("192.0.2.1", 70, service="gopher"),
        unicorn("192.0.2.2"),
        port("192.0.2.3", 70, service="gopher", tcp=False, udp=True),
        unicorn("192.0.2.4"),
        port("192.0.2.4", 80),
        port("192.0.2.9", 80),
        unicorn(VIP6),
    )
    assert (result.vip_pool, result.labels, result.mtu) == (base.vip_pool, base.labels, base.mtu)


def test_a_config_that_already_serves_the_default_port_everywhere_is_returned_unchanged() -> None:
    base = parse_lbconfig_value({"vipPool": [VIP], "config": {VIP: {"70": entry()}}})
    assert with_default_service(base, UNICORNS) is base


def test_a_config_without_a_pool_gets_no_default_service() -> None:
    base = parse_lbconfig_value({"config": {VIP: {"80": entry()}}})
    assert with_default_service(base, UNICORNS) == base


def test_the_default_service_port_is_configurable() -> None:
    base = parse_lbconfig_value({"vipPool": [VIP]})
    result = with_default_service(base, DefaultService.parse("rdei-system/unicorns:http", 7070))
    assert [(e.vip, e.port, e.service, e.protocols) for e in result.entries] == [
        (VIP, 7070, "unicorns", ("tcp",)),
    ]


def test_a_default_service_spec_parses_into_its_parts() -> None:
    assert DefaultService.parse("rdei-system/unicorns:http") == UNICORNS
    assert DefaultService.parse("ns/svc:8080", 8080) == DefaultService("ns", "svc", "8080", 8080)


@pytest.mark.parametrize(("spec", "port", "fragment"), [
    ("unicorns", 70, '"unicorns" is not NAMESPACE/SERVICE:PORTNAME'),
    ("rdei-system/unicorns", 70, "is not NAMESPACE/SERVICE:PORTNAME"),
    ("rdei-system:http", 70, "is not NAMESPACE/SERVICE:PORTNAME"),
    ("/unicorns:http", 70, "is not NAMESPACE/SERVICE:PORTNAME"),
    ("ns/svc:http\n", 70, '"ns/svc:http\\n" is not NAMESPACE/SERVICE:PORTNAME'),
    ("Rdei/unicorns:http", 70, 'namespace: "Rdei" is not a valid Kubernetes namespace name'),
    ("rdei/1unicorn:http", 70, 'service: "1unicorn" is not a valid Kubernetes service name'),
    ("rdei/unicorns:http; reboot", 70, 'portName: "http; reboot" is not a valid Kubernetes port name'),
    ("rdei/a/b:http", 70, 'service: "a/b" is not a valid Kubernetes service name'),
    ("rdei/unicorns:http", 0, "port: 0 is outside 1-65535"),
    ("rdei/unicorns:http", 65536, "port: 65536 is outside 1-65535"),
])
def test_a_bad_default_service_spec_is_refused_with_the_reason(spec: str, port: int, fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        DefaultService.parse(spec, port)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------------------------
# The canonical JSON rendering


def test_config_to_json_writes_the_canonical_document() -> None:
    config = parse_lbconfig_value({
        "VIPPOOL": [VIP, "2001:DB8::10"],
        "labels": {"zone": "green"},
        "mtuConfig": {VIP: 9000},
        "mtuConfig6": {VIP6: "1500"},
        "config": {VIP: {"8080": entry(udpEnabled=True, IPVSOptions={"scheduler": "mh", "flags": "mh-port",
                                                                      "forwardingMethod": "i"})}},
        "config6": {VIP6: {"80": entry(tcpEnabled=False)}},
    })
    assert config_to_json(config) == {
        "vipPool": [VIP, VIP6],
        "labels": {"zone": "green"},
        "mtuConfig": {VIP: "9000"},
        "mtuConfig6": {VIP6: "1500"},
        "config": {VIP: {"8080": {
            "namespace": "shop", "service": "web", "portName": "http", "tcpEnabled": True, "udpEnabled": True,
            "ipvsOptions": {"scheduler": "mh", "forwardingMethod": "i", "uThreshold": 0, "lThreshold": 0,
                            "flags": "flag-2"},
        }}},
        "config6": {VIP6: {"80": {
            "namespace": "shop", "service": "web", "portName": "http", "tcpEnabled": False, "udpEnabled": False,
            "ipvsOptions": {"scheduler": "", "forwardingMethod": "g", "uThreshold": 0, "lThreshold": 0,
                            "flags": ""},
        }}},
    }


def test_the_canonical_document_parses_back_to_the_same_config() -> None:
    config = parse_lbconfig(DESIGN_EXAMPLE)
    again = parse_lbconfig(json.dumps(config_to_json(config)))
    assert again == config
    assert again.warnings == ()


def test_parsing_does_not_change_the_document_it_was_given() -> None:
    doc = one_entry(IPVSOptions={"scheduler": "mh"})
    before = copy.deepcopy(doc)
    parse_lbconfig_value(doc)
    assert doc == before


@given(st.lists(st.integers(min_value=0, max_value=2), min_size=64, max_size=64), st.permutations(range(3)))
def test_a_config_split_over_shards_any_way_merges_back_to_itself(owner: list[int], order: list[int]) -> None:
    whole = realistic_config()
    shards = [replace(whole, entries=tuple(e for i, e in enumerate(whole.entries) if owner[i % 64] == n),
                      vip_pool=whole.vip_pool if n == 0 else (), mtu=whole.mtu if n == 1 else ())
              for n in range(3)]
    merged = merge_lbconfigs([(f"lb-{n}", shards[n]) for n in order])
    assert merged == whole


def test_label_selectors_parse_to_sorted_pairs() -> None:
    assert parse_label_selector("tier = lb, kube2ipvs.io/config==green") == \
        (("kube2ipvs.io/config", "green"), ("tier", "lb"))
    assert parse_label_selector("a=") == (("a", ""),)
