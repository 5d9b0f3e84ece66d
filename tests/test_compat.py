"""Real configurations of the original system (Ravel) must keep working unchanged.

The files live outside this repository, in `../shared/compat/original-configs/` (or wherever
KUBE2IPVS_COMPAT_DIR points); the tests skip when they are absent. Facts are checked both as
numbers known from the files and against the raw JSON, entry by entry.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kube2ipvs.lbconfig import (
    ConfigError,
    DefaultService,
    LBConfig,
    PortConfig,
    config_to_json,
    parse_lbconfig,
    parse_lbconfig_value,
    with_default_service,
)

IPTABLES = "pkg_iptables_configmap_test_data.json"
CLUSTER = "pkg_system_clusterconfig.json"
GENERATE = "pkg_system_generateRules-testConfig.json"
ALL = [IPTABLES, CLUSTER, GENERATE]


def compat_dir() -> Path:
    configured = os.environ.get("KUBE2IPVS_COMPAT_DIR")
    if configured:
        return Path(configured)
    return Path(__file__).resolve().parents[2] / "shared" / "compat" / "original-configs"


def compat_file(name: str) -> Path:
    path = compat_dir() / name
    if not path.is_file():
        pytest.skip(f"original Ravel config {name} not found in {compat_dir()} "
                    "(set KUBE2IPVS_COMPAT_DIR to the folder holding the original configs)")
    return path


def raw(name: str) -> dict[str, Any]:
    doc = json.loads(compat_file(name).read_text())
    assert isinstance(doc, dict)
    return doc


def parsed(name: str) -> LBConfig:
    return parse_lbconfig(compat_file(name).read_bytes())


def raw_entries(doc: dict[str, Any]) -> Iterator[tuple[str, int, dict[str, Any]]]:
    """(canonical VIP, port, entry as written) for every entry of config and config6."""
    for section in ("config", "config6"):
        for vip, ports in (doc.get(section) or {}).items():
            for port, entry in ports.items():
                yield str(ipaddress.ip_address(vip)), int(port), entry


def options_of(entry: dict[str, Any]) -> dict[str, Any]:
    """The IPVS options as written, whichever spelling of the key the file uses."""
    (options,) = [value for key, value in entry.items() if key.lower() == "ipvsoptions"]
    assert isinstance(options, dict)
    return options


def by_key(config: LBConfig) -> dict[tuple[str, int], PortConfig]:
    return {(e.vip, e.port): e for e in config.entries}


# --------------------------------------------------------------------------------------------
# Each file is accepted as it is


@pytest.mark.parametrize(("name", "entries", "v6", "pool"), [
    (IPTABLES, 32, 0, 3),
    (CLUSTER, 31, 11, 6),
    (GENERATE, 23, 11, 6),
])
def test_each_original_config_parses_with_every_entry(name: str, entries: int, v6: int, pool: int) -> None:
    config = parsed(name)
    assert len(config.entries) == entries == len(list(raw_entries(raw(name))))
    assert sum(e.family == 6 for e in config.entries) == v6
    assert len(config.vip_pool) == pool


def test_only_ravels_ipv6_map_is_warned_about() -> None:
    assert [str(w) for w in parsed(IPTABLES).warnings] == ["ipv6: not supported by kube2ipvs, ignored"]
    assert parsed(CLUSTER).warnings == ()
    assert parsed(GENERATE).warnings == ()


@pytest.mark.parametrize("name", ALL)
def test_every_entry_keeps_its_names_and_switches(name: str) -> None:
    entries = by_key(parsed(name))
    for vip, port, written in raw_entries(raw(name)):
        entry = entries[vip, port]
        assert (entry.namespace, entry.service, entry.port_name) == (
            written["namespace"], written["service"], written["portName"])
        assert (entry.tcp, entry.udp) == (written["tcpEnabled"], written["udpEnabled"])


@pytest.mark.parametrize(("name", "count"), [(CLUSTER, 19), (GENERATE, 14)])
def test_mh_entries_with_ipip_forwarding_come_out_as_mh_and_i(name: str, count: int) -> None:
    entries = by_key(parsed(name))
    written_mh = [(vip, port) for vip, port, entry in raw_entries(raw(name))
                  if options_of(entry)["scheduler"] == "mh" and options_of(entry)["forwardingMethod"] == "i"]
    assert len(written_mh) == count
    assert {(entries[k].ipvs.scheduler, entries[k].ipvs.forwarding) for k in written_mh} == {("mh", "i")}


@pytest.mark.parametrize("name", ALL)
def test_an_empty_scheduler_or_forwarding_method_means_the_default(name: str) -> None:
    entries = by_key(parsed(name))
    written = list(raw_entries(raw(name)))
    empty_scheduler = [(v, p) for v, p, e in written if options_of(e)["scheduler"] == ""]
    empty_forwarding = [(v, p) for v, p, e in written if options_of(e)["forwardingMethod"] == ""]
    assert empty_scheduler
    assert all(entries[k].ipvs.scheduler is None for k in empty_scheduler)
    assert all(entries[k].ipvs.forwarding == "g" for k in empty_forwarding)


def test_an_empty_scheduler_with_ipip_keeps_ipip() -> None:
    unicorns = by_key(parsed(CLUSTER))["10.131.153.120", 70]
    assert (unicorns.ipvs.scheduler, unicorns.ipvs.forwarding) == (None, "i")


@pytest.mark.parametrize(("name", "enabled"), [(IPTABLES, 32), (CLUSTER, 25), (GENERATE, 17)])
def test_entries_with_tcp_and_udp_both_off_have_no_protocols(name: str, enabled: int) -> None:
    config = parsed(name)
    off = {(v, p) for v, p, e in raw_entries(raw(name)) if not e["tcpEnabled"] and not e["udpEnabled"]}
    assert {(e.vip, e.port) for e in config.entries if not e.protocols} == off
    assert len(config.enabled_keys()) == enabled


def test_the_disabled_entries_are_the_unicorns_port_on_every_pool_vip() -> None:
    config = parsed(CLUSTER)
    assert {(e.vip, e.port) for e in config.entries if not e.protocols} == {(v, 70) for v in config.vip_pool}


@pytest.mark.parametrize("name", [CLUSTER, GENERATE])
def test_mtus_of_both_families_are_read_from_their_strings(name: str) -> None:
    config = parsed(name)
    assert len(config.mtu) == 11
    assert config.mtu_of("10.131.153.122") == 9000
    assert config.mtu_of("10.131.153.121") == 1500
    assert config.mtu_of("10.131.153.120") is None
    assert config.mtu_of("2001:558:1044:19c:86c2:4b9c:2fd1:7adb") == 9000
    assert config.mtu_of("2001:558:1044:19c:10ad:ba1a:a83:997b") == 1500
    written = {**raw(name)["mtuConfig"], **raw(name)["mtuConfig6"]}
    assert dict(config.mtu) == {str(ipaddress.ip_address(v)): int(m) for v, m in written.items()}


def test_ipvs_options_spelled_in_capitals_are_honoured() -> None:
    doc = raw(IPTABLES)
    entry = doc["config"]["10.54.213.147"]["1234"]
    assert "IPVSOptions" in entry
    entry["IPVSOptions"].update(scheduler="mh", forwardingMethod="i", flags="mh-port")
    changed = by_key(parse_lbconfig_value(doc))["10.54.213.147", 1234]
    assert (changed.ipvs.scheduler, changed.ipvs.forwarding, changed.ipvs.flags) == ("mh", "i", (2,))


def test_errors_under_capitalised_ipvs_options_name_the_key_as_written() -> None:
    doc = raw(IPTABLES)
    doc["config"]["10.54.213.147"]["1234"]["IPVSOptions"]["scheduler"] = "fastest"
    with pytest.raises(ConfigError) as info:
        parse_lbconfig_value(doc)
    assert [i.path for i in info.value.issues] == ['config."10.54.213.147"."1234".IPVSOptions.scheduler']


@pytest.mark.parametrize("name", [CLUSTER, GENERATE])
def test_flags_flag_1_and_flag_2_become_bits_1_and_2(name: str) -> None:
    entries = by_key(parsed(name))
    flagged = [(v, p) for v, p, e in raw_entries(raw(name)) if options_of(e)["flags"] == "flag-1,flag-2"]
    assert flagged
    assert {entries[k].ipvs.flags for k in flagged} == {(1, 2)}


def test_an_mh_entry_without_flags_has_no_flag_bits() -> None:
    entry = by_key(parsed(GENERATE))["10.131.153.122", 5016]
    assert (entry.ipvs.scheduler, entry.ipvs.flags) == ("mh", ())


def test_config6_entries_keep_their_ipv6_vips() -> None:
    entries = by_key(parsed(CLUSTER))
    entry = entries["2001:558:1044:19c:86c2:4b9c:2fd1:7adb", 8085]
    assert (entry.family, entry.service, entry.protocols) == (6, "lbtestserver-mtu-9000", ("tcp",))


@pytest.mark.parametrize("name", [CLUSTER, GENERATE])
def test_the_default_service_serves_the_unicorns_port_ravel_left_disabled(name: str) -> None:
    config = with_default_service(parsed(name), DefaultService.parse("rdei-system/unicorns-green:http", 70))
    assert all((vip, 70, "tcp") in config.enabled_keys() for vip in config.vip_pool)


@pytest.mark.parametrize("name", ALL)
def test_each_original_config_survives_its_canonical_json(name: str) -> None:
    config = parsed(name)
    assert parse_lbconfig_value(config_to_json(config)) == config


# --------------------------------------------------------------------------------------------
# The operator's check


@pytest.mark.parametrize("name", ALL)
def test_validate_config_accepts_each_original_config(name: str) -> None:
    path = compat_file(name)
    proc = subprocess.run([sys.executable, "-m", "kube2ipvs.cli", "validate-config", str(path)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "valid" in proc.stdout
    assert "Traceback" not in proc.stderr
