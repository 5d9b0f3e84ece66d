"""`kube2ipvs bgp-speaker`'s flags: settings built from them, and user errors as one clear line."""

from __future__ import annotations

import pytest

from kube2ipvs.roleargs import RoleUsageError
from kube2ipvs_bgp_speaker.main import build_parser, run, speaker_settings
from kube2ipvs_bgp_speaker.plan import GlobalSpec, PeerSpec


def settings_of(*argv: str) -> object:
    return speaker_settings(build_parser().parse_args(list(argv)))


def test_flags_configure_bgp_the_peers_and_the_route_attributes() -> None:
    s = settings_of("--local-as", "64512", "--router-id", "198.51.100.2", "--peer", "198.51.100.1@64500",
                    "--peer", "2001:DB8:100::1@64500", "--hold-time", "9", "--keepalive", "3", "--connect-retry", "1",
                    "--multihop", "2", "--peer-password", "s3cret", "--community", "64512:200",
                    "--community", "64512:100", "--community", "no-export", "--med", "5", "--nexthop", "198.51.100.7")
    assert s.bgp == GlobalSpec(64512, "198.51.100.2", 179)  # type: ignore[attr-defined]
    assert s.peers == (  # type: ignore[attr-defined]
        PeerSpec("198.51.100.1", 64500, 9, 3, 1, "s3cret", 2),
        PeerSpec("2001:db8:100::1", 64500, 9, 3, 1, "s3cret", 2, ipv4=False, ipv6=True))
    routes = s.routes  # type: ignore[attr-defined]
    assert (routes.communities, routes.med, routes.nexthop) == (("64512:100", "64512:200", "no-export"), 5,
                                                                "198.51.100.7")


def test_the_router_id_defaults_to_this_hosts_address_toward_the_first_peer() -> None:
    s = settings_of("--local-as", "64512", "--peer", "127.0.0.1@64500")
    assert s.bgp.router_id == "127.0.0.1"  # type: ignore[attr-defined]


def test_without_local_as_gobgpd_conf_keeps_bgp_and_the_peers() -> None:
    s = settings_of()
    assert (s.bgp, s.peers) == (None, ())  # type: ignore[attr-defined]


def test_peers_come_from_the_environment_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBE2IPVS_PEER", "198.51.100.1@64500,198.51.100.3@64501")
    monkeypatch.setenv("KUBE2IPVS_LOCAL_AS", "64512")
    monkeypatch.setenv("KUBE2IPVS_ROUTER_ID", "198.51.100.2")
    s = settings_of()
    assert [(p.address, p.asn) for p in s.peers] == [("198.51.100.1", 64500), ("198.51.100.3", 64501)]  # type: ignore[attr-defined]


@pytest.mark.parametrize(("argv", "message"), [
    (["--peer", "198.51.100.1@64500"], "--peer needs --local-as"),
    (["--local-as", "64512", "--peer", "2001:db8::1@64500"], "--router-id is required"),
    (["--local-as", "64512", "--router-id", "198.51.100.2", "--hold-time", "9", "--keepalive", "5"],
     "at most a third of --hold-time"),
])
def test_inconsistent_settings_are_refused_with_the_reason(argv: list[str], message: str) -> None:
    with pytest.raises(RoleUsageError, match=message):
        settings_of(*argv)


@pytest.mark.parametrize(("argv", "message"), [
    (["--peer", "198.51.100.1"], "is not ADDRESS@ASN"),
    (["--peer", "router@64500"], "is not an IP address"),
    (["--local-as", "0"], "is not an AS number"),
    (["--community", "64512:99999"], "each part must be at most 65535"),
    (["--router-id", "2001:db8::1"], "a router id is an IPv4 address"),
])
def test_bad_flags_exit_2_with_one_line_and_no_traceback(argv: list[str], message: str,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert run(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
