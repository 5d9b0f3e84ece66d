"""`kube2ipvs publish-config` against the in-process Kubernetes API server (tests/fakes/kubeapi.py)
through the real kubernetes-asyncio client: creation, the diff, dry runs, optimistic concurrency,
the mass-removal rule, invalid files and unusable connections.

The command runs its own event loop (`asyncio.run` inside `main`), so each test runs it in a thread
while the fake serves from the test's loop."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from kube2ipvs.cli import main
from kube2ipvs.configmapapi import KubeConfigMaps, connect
from kube2ipvs.lbconfig import parse_lbconfig
from kube2ipvs.publish import ConfigMapAPI, Target, publish
from kube2ipvs.publishplan import (
    CONFIRM_ANNOTATION,
    MAX_REMOVAL_SHARE,
    confirm_token,
    diff_configs,
    read_source,
    render_diff,
)
from kube2ipvs_watcher import core as watcher_core
from tests.fakes.kubeapi import FakeKubeAPI

JSON = dict[str, Any]
NS, NAME, KEY = "platform-load-balancer", "kube2ipvs", "green"
Scenario = Callable[[FakeKubeAPI, Path], Awaitable[None]]


def entry(service: str, port_name: str = "http", *, tcp: bool = True, udp: bool = False,
          scheduler: str = "wrr", namespace: str = "shop") -> JSON:
    return {"namespace": namespace, "service": service, "portName": port_name, "tcpEnabled": tcp,
            "udpEnabled": udp, "ipvsOptions": {"scheduler": scheduler, "forwardingMethod": "g",
                                               "uThreshold": 0, "lThreshold": 0, "flags": ""}}


def lb_config(config: dict[str, dict[str, JSON]], *, pool: list[str] | None = None,
              config6: dict[str, dict[str, JSON]] | None = None) -> str:
    doc = {"vipPool": pool if pool is not None else sorted(config), "labels": {"example.com/lb-zone": "green"},
           "config": config, "config6": config6 or {}}
    return json.dumps(doc, indent=2) + "\n"


# Four enabled VIP:port/protocols: .10:80/tcp, .10:53/tcp, .10:53/udp, .11:443/tcp.
LIVE = lb_config({
    "192.0.2.10": {"80": entry("web"), "53": entry("dns", "dns", udp=True, namespace="infra")},
    "192.0.2.11": {"443": entry("api", "https")},
})


def configmap(data: dict[str, str], **metadata: Any) -> JSON:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"namespace": NS, "name": NAME, **metadata},
            "data": data}


def run(tmp_path: Path, scenario: Scenario) -> None:
    async def go() -> None:
        async with FakeKubeAPI() as api:
            await asyncio.wait_for(scenario(api, api.write_kubeconfig(tmp_path / "kubeconfig")), 30)

    asyncio.run(go())


async def cli(*argv: str | Path) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = await asyncio.to_thread(main, [str(a) for a in argv], out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def publish_args(path: Path, kubeconfig: Path, *extra: str) -> list[str | Path]:
    return ["publish-config", path, "--namespace", NS, "--name", NAME, "--key", KEY, "--kubeconfig", kubeconfig,
            *extra]


def writes(api: FakeKubeAPI) -> list[str]:
    return [r.verb for r in api.requests if r.verb in ("create", "update", "patch", "delete")]


def write_file(tmp_path: Path, text: str, name: str = "new.json") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ---- creation and update ---------------------------------------------------------------------------


def test_publishing_to_an_absent_configmap_creates_it_holding_exactly_the_file(tmp_path: Path) -> None:
    path = write_file(tmp_path, LIVE)

    async def scenario(api: FakeKubeAPI, kubeconfig: Path) -> None:
        code, out, err = await cli(*publish_args(path, kubeconfig))
        assert (code, err) == (0, "")
        created = api.get("ConfigMap", NAME, namespace=NS)
        assert created is not None
        assert created["data"] == {KEY: LIVE}
        assert "annotations" not in created["metadata"]
        assert writes(api) == ["create"]
        assert f"--- configmap {NS}/{NAME}: absent, it will be created" in out
        assert "+ 192.0.2.10:53/udp   infra/dns:dns  scheduler wrr" in out
        assert "4 added, 0 removed, 0 changed VIP:port/protocols (0 in force now)" in out
        assert out.endswith(f"created configmap {NS}/{NAME} key {KEY} "
                            f"(resourceVersion {created['metadata']['resourceVersion']})\n")

    run(tmp_path, scenario)


def test_an_update_shows_the_diff_by_vip_port_and_protocol_and_keeps_everything_else(tmp_path: Path) -> None:
    new = lb_config({
        "192.0.2.10": {"80": entry("web", scheduler="mh"), "53": entry("dns", "dns", udp=True, namespace="infra")},
        "192.0.2.11": {"443": entry("api", "https", udp=True)},
        "192.0.2.12": {"8080": entry("shop", "http-alt")},
    }, pool=["192.0.2.10", "192.0.2.11", "192.0.2.12"])
    path = write_file(tmp_path, new)

    async def scenario(api: FakeKubeAPI, kubeconfig: Path) -> None:
        live = api.create(configmap({KEY: LIVE, "blue": "{}"}, labels={"team": "lb"},
                                    annotations={"note": "kept"}))
        code, out, err = await cli(*publish_args(path, kubeconfig))
        assert (code, err) == (0, ""), err
        rv = live["metadata"]["resourceVersion"]
        assert out.splitlines() == [
            f"--- configmap {NS}/{NAME} key {KEY} (resourceVersion {rv})",
            f"+++ {path}",
            "~ 192.0.2.10:80/tcp    scheduler wrr -> mh",
            "+ 192.0.2.11:443/udp   shop/api:https  scheduler wrr",
            "+ 192.0.2.12:8080/tcp  shop/shop:http-alt  scheduler wrr",
            "+ vipPool 192.0.2.12",
            "2 added, 0 removed, 1 changed VIP:port/protocols (4 in force now)",
            f"updated configmap {NS}/{NAME} key {KEY} (resourceVersion {rv} -> {int(rv) + 1})",
        ]
        stored = api.get("ConfigMap", NAME, namespace=NS)
        assert stored is not None
        assert stored["data"] == {KEY: new, "blue": "{}"}
        assert stored["metadata"]["labels"] == {"team": "lb"}
        assert stored["metadata"]["annotations"] == {"note": "kept"}
        assert stored["metadata"]["uid"] == live["metadata"]["uid"]
        assert writes(api) == ["update"]

    run(tmp_path, scenario)


def test_a_configmap_file_publishes_its_value_under_the_key_verbatim(tmp_path: Path) -> None:
    yaml_file = write_file(tmp_path, "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: kube2ipvs\n"
                           f"data:\n  green: {json.dumps(LIVE)}\n  blue: '{{}}'\n", "cm.yaml")

    async def scenario(api: FakeKubeAPI, kubeconfig: Path) -> None:
        code, _, err = await cli(*publish_args(yaml_file, kubeconfig))
        assert code == 0
        assert err == f"note: only key {KEY} is published; the file's other keys (blue) are not\n"
        stored = api.get("ConfigMap", NAME, namespace=NS)
        assert stored is not None
        assert stored["data"] == {KEY: LIVE}

    run(tmp_path, scenario)


def test_a_configmap_file_naming_another_configmap_is_refused_before_any_request(tmp_path: Path) -> None:
    path = write_file(tmp_path, json.dumps({**configmap({KEY: LIVE}), "metadata": {"name": "other"}}))

    async def scenario(api: FakeKubeAPI, kubeconfig: Path) -> None:
        code, out, err = await cli(*publish_args(path, kubeconfig))
        assert (code, out) == (2, "")
        assert err == (f"error: {path} is the ConfigMap {NS}/other, but --namespace/--name say {NS}/{NAME}\n")
        assert api.requests == []

    run(tmp_path, scenario)


def test_an_unchanged_config_says_no_changes_and_writes_nothing(tmp_path: Path) -> None:
    path = write_file(tmp_path, LIVE)

    async def scenario(api: FakeKubeAPI, kubeconfig: Path) -> None:
        api.create(configmap({KEY: LIVE}))
        code, out, _ = await cli(*publish_args(path, kubeconfig))
        assert code == 0
        assert out.splitlines()[-1] == "no changes"
        assert writes(api) == []

    run(tmp_path, scenario)


def test_a_dry_run_prints_the_diff_and_writes_nothing(tmp_path: Path) -> None:
    path = write_file(tmp_path, lb_config({"192.0.2.10": {"80": entry("web"), "53": entry(
        "dns", "dns", udp=True, namespace="infra")}, "192.0.2.11": {"443": entry("api", "https", scheduler="sh")}}))

    async def scenario(api: FakeKubeAPI, kubeconfig: Path) -> None:
        before = api.create(configmap({KEY: LIVE}))
        code, out, err = await cli(*publish_args(path, kubeconfig, "--dry-run"))
        assert (code, err) == (0, "")
        assert "~ 192.0.2.11:443/tcp  scheduler wrr -> sh" in out
        assert out.splitlines()[-1] == f"dry run: would update configmap {NS}/{NAME} key {KEY}; nothing was written"
        assert [r.verb for r in api.requests] == ["get"]
        assert api.get("ConfigMap", NAME, namespace=NS) == before

        absent = await cli("publish-config", path, "--namespace", NS, "--name", "absent", "--key", KEY,
                           "--kubeconfig", kubeconfig, "--dry-run")
        assert absent[0] == 0
        assert absent[1].splitlines()[-1] == (f"dry run: would create configmap {NS}/absent key {KEY}; "
                                              "nothing was written")
        assert writes(api) == []
        assert api.get("ConfigMap", "absent", namespace=NS) is None

    run(tmp_path, scenario)


# ---- optimistic concurrency ------------------------------------------------------------------------


class RacingWriter:
    """The real adapter, with someone else's write landing between our GET and our write."""

    def __init__(self, real: KubeConfigMaps, api: FakeKubeAPI, theirs: JSON) -> None:
        self.real, self.api, self.theirs = real, api, theirs

    async def get(self, namespace: str, name: str) -> JSON | None:
        live = await self.real.get(namespace, name)
        self.api.apply(self.theirs)
        return live

    async def create(self, namespace: str, body: JSON) -> JSON:
        return await self.real.create(namespace, body)

    async def replace(self, namespace: str, name: str, body: JSON) -> JSON:
        return await self.real.replace(namespace, name, body)


async def publish_racing(api: FakeKubeAPI, kubeconfig: Path, path: Path, theirs: JSON) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    async with connect(str(kubeconfig), None, timeout=10) as real:
        racing: ConfigMapAPI = RacingWriter(real, api, theirs)
        code = await publish(racing, read_source(path.read_bytes(), KEY), Target(NS, NAME, KEY), file=str(path),
                             dry_run=False, force=False, out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def test_a_write_after_someone_elses_change_is_a_conflict_and_writes_nothing(tmp_path: Path) -> None:
    path = write_file(tmp_path, lb_config({"192.0.2.10": {"80": entry("web"), "53": entry(
        "dns", "dns", udp=True, namespace="infra")}, "192.0.2.11": {"443": entry("api", "https", scheduler="sh")}}))

    async def scenario(api: FakeKubeAPI, kubeconfig: Path) -> None:
        read = api.create(configmap({KEY: LIVE}))
        theirs = configmap({KEY: LIVE, "blue": "{}"})
        code, out, err = await publish_racing(api, kubeconfig, path, theirs)
        assert code == 1
        rv = read["metadata"]["resourceVersion"]
        assert err == (f"error: configmap {NS}/{NAME} was changed by someone else since it was read (resourceVersion "
                       f"{rv}); nothing was written; re-run publish-config to see the diff against the current "
                       "version\n")
        assert "~ 192.0.2.11:443/tcp  scheduler wrr -> sh" in out
        assert [(r.verb, r.status) for r in api.requests] == [("get", 200), ("update", 409)]
        stored = api.get("ConfigMap", NAME, namespace=NS)
        assert stored is not None
        assert stored["data"] == theirs["data"]

        # The re-run the message suggests diffs against their version and goes through.
        code, out, err = await cli(*publish_args(path, kubeconfig))
        assert (code, err) == (0, "")
        stored = api.get("ConfigMap", NAME, namespace=NS)
        assert stored is not None
        assert stored["data"] == {KEY: path.read_text(), "blue": "{}"}

    run(tmp_path, scenario)


def test_a_create_racing_someone_elses_create_is_a_conflict_and_writes_nothing(tmp_path: Path) -> None:
    path = write_file(tmp_path, LIVE)

    async def scenario(api: FakeKubeAPI, kubeconfig: Path) -> None:
        theirs = configmap({"blue": "{}"})
        code, _, err = await publish_racing(api, kubeconfig, path, theirs)
        assert code == 1
        assert err.startswith(f"error: configmap {NS}/{NAME} was created by someone else after it was read; "
                              "nothing was written")
        assert [(r.verb, r.status) for r in api.requests] == [("get", 404), ("create", 409)]
        stored = api.get("ConfigMap", NAME, namespace=NS)
        assert stored is not None
        assert stored["data"] == {"blue": "{}"}

    run(tmp_path, scenario)


# ---- mass removal ----------------------------------------------------------------------------------


def test_removing_more_than_half_is_refused_without_force_and_applied_and_confirmed_with_it(tmp_path: Path) -> None:
    # Keeps only 192.0.2.10:80/tcp: 3 of the 4 live VIP:port/protocols go.
    new = lb_config({"192.0.2.10": {"80": entry("web")}}, pool=["192.0.2.10", "192.0.2.11"])
    path = write_file(tmp_path, new)

    async def scenario(api: FakeKubeAPI, kubeconfig: Path) -> None:
        before = api.create(configmap({KEY: LIVE}))
        for extra in ((), ("--dry-run",)):
            code, out, err = await cli(*publish_args(path, kubeconfig, *extra))
            assert code == 1
            assert err == ("error: refusing to publish: it would remove 3 of 4 VIP:port/protocols in force (75%, "
                           "limit 50%). Check the diff above; to publish it anyway, re-run with --force\n")
            assert "- 192.0.2.10:53/udp   infra/dns:dns  scheduler wrr" in out
            assert "0 added, 3 removed, 0 changed" in out
        assert writes(api) == []
        assert api.get("ConfigMap", NAME, namespace=NS) == before

        code, out, err = await cli(*publish_args(path, kubeconfig, "--force"))
        assert (code, err) == (0, "")
        assert f"confirming for the watcher: annotation {CONFIRM_ANNOTATION}" in out
        stored = api.get("ConfigMap", NAME, namespace=NS)
        assert stored is not None
        assert stored["data"] == {KEY: new}
        # The watcher would otherwise hold the config back: the annotation confirms this exact text.
        assert stored["metadata"]["annotations"] == {
            watcher_core.CONFIRM_ANNOTATION: watcher_core.confirm_token(new)}

    run(tmp_path, scenario)


@pytest.mark.parametrize(("live", "new", "refused"), [
    pytest.param(LIVE, lb_config({"192.0.2.10": {"80": entry("web")}, "192.0.2.11": {"443": entry("api", "https")}}),
                 False, id="half-of-them-removed"),
    pytest.param(lb_config({"192.0.2.10": {"80": entry("web")}}), lb_config({}), True, id="the-only-one-removed"),
    pytest.param(LIVE, lb_config({}), True, id="all-removed"),
])
def test_the_removal_rule_is_more_than_half_of_the_live_ones(tmp_path: Path, live: str, new: str,
                                                              refused: bool) -> None:
    path = write_file(tmp_path, new)

    async def scenario(api: FakeKubeAPI, kubeconfig: Path) -> None:
        api.create(configmap({KEY: live}))
        code, _, err = await cli(*publish_args(path, kubeconfig))
        assert (code, "refusing to publish" in err) == ((1, True) if refused else (0, False))
        assert writes(api) == ([] if refused else ["update"])

    run(tmp_path, scenario)


def test_the_confirmation_and_the_share_are_the_watchers() -> None:
    assert CONFIRM_ANNOTATION == watcher_core.CONFIRM_ANNOTATION
    assert watcher_core.WatcherSettings().max_removal_share == MAX_REMOVAL_SHARE
    assert confirm_token(LIVE) == watcher_core.confirm_token(LIVE)


# ---- errors ----------------------------------------------------------------------------------------


def test_an_invalid_file_is_reported_as_validate_config_does_and_no_request_is_made(tmp_path: Path) -> None:
    path = write_file(tmp_path, json.dumps({"vipPool": ["192.0.2.300"], "config": {"192.0.2.10": {
        "80": {**entry("web"), "ipvsOptions": {"scheduler": "fastest"}}}}}))

    async def scenario(api: FakeKubeAPI, kubeconfig: Path) -> None:
        code, out, err = await cli(*publish_args(path, kubeconfig))
        assert (code, out) == (1, "")
        assert err.splitlines() == [
            f"{path}: invalid LB config (2 errors)",
            '  vipPool[0]: "192.0.2.300" is not an IP address',
            '  config."192.0.2.10"."80".ipvsOptions.scheduler: "fastest" is not one of rr, wrr, lc, wlc, lblc, '
            "lblcr, dh, sh, sed, nq, fo, ovf, mh",
        ]
        validate = await cli("validate-config", path)
        assert validate == (code, out, err)
        assert api.requests == []

    run(tmp_path, scenario)


def test_an_unreachable_api_server_is_one_line_and_exit_2(tmp_path: Path) -> None:
    path = write_file(tmp_path, LIVE)

    async def scenario(api: FakeKubeAPI, kubeconfig: Path) -> None:
        url = api.url
        await api.go_down("refused")
        code, out, err = await cli(*publish_args(path, kubeconfig))
        assert (code, out) == (2, "")
        assert err.startswith(f"error: cannot reach the Kubernetes API server at {url}: ")
        assert err.count("\n") == 1

    run(tmp_path, scenario)


@pytest.mark.parametrize(("status", "verb", "message"), [
    (403, "get", f"error: cannot read configmap {NS}/{NAME}: forbidden (403): injected failure (403) of get "
                 "configmaps\n"),
    (401, "get", f"error: cannot read configmap {NS}/{NAME}: unauthorized (401): the kubeconfig's credentials were "
                 "refused: injected failure (401) of get configmaps\n"),
    (404, "create", f"error: cannot create configmap {NS}/{NAME}: the namespace {NS} must exist (kubectl create "
                    f"namespace {NS}): injected failure (404) of create configmaps\n"),
])
def test_refusals_of_the_api_server_are_one_line_and_exit_2(tmp_path: Path, status: int, verb: str,
                                                            message: str) -> None:
    path = write_file(tmp_path, LIVE)

    async def scenario(api: FakeKubeAPI, kubeconfig: Path) -> None:
        api.fail_next(1, status=status, verb=verb)  # type: ignore[arg-type]
        code, _, err = await cli(*publish_args(path, kubeconfig))
        assert (code, err) == (2, message)
        assert api.objects("ConfigMap") == []

    run(tmp_path, scenario)


def test_a_bad_kubeconfig_is_one_line_and_exit_2(tmp_path: Path) -> None:
    path = write_file(tmp_path, LIVE)
    bad = write_file(tmp_path, "clusters: [\n", "kubeconfig")
    code, out, err = asyncio.run(cli(*publish_args(path, bad)))
    assert (code, out) == (2, "")
    assert err.startswith(f"error: cannot load the cluster configuration from {bad}: ")
    assert err.count("\n") == 1
    missing = asyncio.run(cli(*publish_args(path, tmp_path / "nope")))
    assert missing == (2, "", f"error: kubeconfig not found: {tmp_path / 'nope'}\n")


# ---- the diff (pure) -------------------------------------------------------------------------------


def test_the_diff_names_each_vip_port_protocol_and_the_fields_that_changed() -> None:
    old = parse_lbconfig(lb_config({"192.0.2.10": {"53": entry("dns", "dns", namespace="infra")}},
                                   config6={"2001:db8::10": {"80": entry("web")}}))
    new_doc = json.loads(lb_config({"192.0.2.10": {"53": entry("dns2", "dns", udp=True, namespace="infra")}},
                                   config6={"2001:db8::10": {"80": entry("web", tcp=False)}}))
    new_doc["labels"] = {"example.com/lb-zone": "blue", "rack": "r1"}
    new_doc["mtuConfig"] = {"192.0.2.10": "9000"}
    new_doc["vipPool"] = ["192.0.2.20"]
    new = parse_lbconfig(json.dumps(new_doc))
    assert render_diff(diff_configs(old, new)) == [
        "~ 192.0.2.10:53/tcp             service infra/dns:dns -> infra/dns2:dns",
        "+ 192.0.2.10:53/udp             infra/dns2:dns  scheduler wrr",
        "+ [2001:db8::10]:80 (disabled)  shop/web:http  scheduler wrr",
        "- [2001:db8::10]:80/tcp         shop/web:http  scheduler wrr",
        "+ vipPool 192.0.2.20",
        "- vipPool 192.0.2.10",
        "~ label example.com/lb-zone green -> blue",
        "+ label rack=r1",
        "+ mtu 192.0.2.10 9000",
    ]
    assert not diff_configs(new, new)


def test_forcing_an_unchanged_config_only_adds_the_watchers_confirmation(tmp_path: Path) -> None:
    path = write_file(tmp_path, LIVE)

    async def scenario(api: FakeKubeAPI, kubeconfig: Path) -> None:
        before = api.create(configmap({KEY: LIVE}))
        code, out, err = await cli(*publish_args(path, kubeconfig, "--force"))
        assert (code, err) == (0, "")
        rv = before["metadata"]["resourceVersion"]
        assert out.splitlines()[2:] == [
            f"confirming for the watcher: annotation {CONFIRM_ANNOTATION}",
            f"updated configmap {NS}/{NAME} key {KEY} (resourceVersion {rv} -> {int(rv) + 1})",
        ]
        stored = api.get("ConfigMap", NAME, namespace=NS)
        assert stored is not None
        assert stored["data"] == {KEY: LIVE}
        assert stored["metadata"]["annotations"] == {CONFIRM_ANNOTATION: confirm_token(LIVE)}
        assert (await cli(*publish_args(path, kubeconfig, "--force")))[1].splitlines()[-1] == "no changes"

    run(tmp_path, scenario)


def test_a_formatting_only_change_is_published_and_said_to_change_no_rule(tmp_path: Path) -> None:
    path = write_file(tmp_path, json.dumps(json.loads(LIVE)))

    async def scenario(api: FakeKubeAPI, kubeconfig: Path) -> None:
        api.create(configmap({KEY: LIVE}))
        code, out, _ = await cli(*publish_args(path, kubeconfig))
        assert code == 0
        assert "no change to the rules; the text differs (formatting or ignored keys)" in out
        assert writes(api) == ["update"]

    run(tmp_path, scenario)


def test_a_bare_yaml_value_is_published_as_the_json_the_watcher_reads(tmp_path: Path) -> None:
    path = write_file(tmp_path, "vipPool: [192.0.2.10]\nconfig:\n  192.0.2.10:\n    '80': {namespace: shop, "
                      "service: web, portName: http, tcpEnabled: true}\n", "bare.yaml")

    async def scenario(api: FakeKubeAPI, kubeconfig: Path) -> None:
        code, out, err = await cli(*publish_args(path, kubeconfig))
        assert (code, err) == (0, "")
        assert "+ 192.0.2.10:80/tcp  shop/web:http" in out.splitlines()
        stored = api.get("ConfigMap", NAME, namespace=NS)
        assert stored is not None
        assert parse_lbconfig(stored["data"][KEY]) == read_source(path.read_bytes(), KEY).config
        assert json.loads(stored["data"][KEY])["vipPool"] == ["192.0.2.10"]

    run(tmp_path, scenario)


def test_an_invalid_live_value_is_noted_and_the_diff_is_against_an_empty_config(tmp_path: Path) -> None:
    path = write_file(tmp_path, LIVE)

    async def scenario(api: FakeKubeAPI, kubeconfig: Path) -> None:
        api.create(configmap({KEY: "{not json"}))
        code, out, err = await cli(*publish_args(path, kubeconfig))
        assert code == 0
        assert err == (f"note: the live value under key {KEY} is not a valid LB config (1 error): the diff is "
                       "against an empty config\n")
        assert "4 added, 0 removed, 0 changed" in out
        assert writes(api) == ["update"]

    run(tmp_path, scenario)
