"""Where the status endpoints listen (issue 11, security): by default loopback and the pod's or
host's own address, never a wildcard socket that would also answer on every VIP a realserver
holds on lo; an explicit --listen is bound exactly as given."""

from __future__ import annotations

import asyncio
import socket

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from kube2ipvs.roleargs import RoleParser, RoleUsageError, add_common, listen_address, listen_hosts
from kube2ipvs.statusserver import Health, StatusServer, json_response


def no_route(_family: socket.AddressFamily) -> str | None:
    return None


def test_the_default_is_loopback_and_the_pod_address_from_the_downward_api() -> None:
    assert listen_hosts("", {"POD_IP": "10.244.1.7", "HOST_IP": "10.0.0.5"}, no_route) == ("127.0.0.1", "10.244.1.7")
    assert listen_hosts("", {"HOST_IP": "10.0.0.5"}, no_route) == ("127.0.0.1", "10.0.0.5")
    assert listen_hosts("", {"HOST_IP": "2001:DB8::5"}, no_route) == ("127.0.0.1", "2001:db8::5")


def test_without_the_variables_the_default_route_source_is_used_and_loopback_alone_without_a_route() -> None:
    routes = {socket.AF_INET6: "2001:db8::7"}
    assert listen_hosts("", {}, {socket.AF_INET: "10.0.0.9"}.get) == ("127.0.0.1", "10.0.0.9")
    assert listen_hosts("", {}, routes.get) == ("127.0.0.1", "2001:db8::7")
    assert listen_hosts("", {}, no_route) == ("127.0.0.1",)


def test_an_explicit_host_is_bound_as_given_wildcard_included() -> None:
    assert listen_hosts("0.0.0.0", {"POD_IP": "10.244.1.7"}, no_route) == ("0.0.0.0",)
    assert listen_hosts("10.0.0.5", {}, no_route) == ("10.0.0.5",)


def test_a_bad_downward_api_value_names_the_variable() -> None:
    with pytest.raises(RoleUsageError, match=r"POD_IP='10\.244\.1' is not an IP address"):
        listen_hosts("", {"POD_IP": "10.244.1"}, no_route)


@pytest.mark.parametrize(("text", "parsed"), [
    (":9874", ("", 9874)), ("10.0.0.5:9874", ("10.0.0.5", 9874)), ("[2001:db8::5]:9874", ("2001:db8::5", 9874)),
    ("0.0.0.0:1", ("0.0.0.0", 1)),
])
def test_listen_flag_forms(text: str, parsed: tuple[str, int]) -> None:
    assert listen_address(text) == parsed


def test_every_role_defaults_to_the_default_hosts_on_its_port() -> None:
    for role, port in (("watcher", 9871), ("director", 9872), ("bgp-speaker", 9873), ("realserver", 9874)):
        parser = RoleParser(prog=role)
        add_common(parser, role)
        assert parser.parse_args([]).listen == ("", port), role


def test_the_server_answers_on_its_addresses_and_refuses_on_another_of_the_same_host() -> None:
    """127.0.0.3 stands for a VIP on lo: a wildcard socket would answer there, these do not."""

    async def scenario() -> tuple[list[int], str, str]:
        server = StatusServer(host=("127.0.0.1", "127.0.0.2"), port=0, health=lambda: Health(True),
                              config=lambda _q: json_response({}), registry=CollectorRegistry())
        await server.start()
        try:
            answers = []
            async with aiohttp.ClientSession() as session:
                for host in ("127.0.0.1", "127.0.0.2"):
                    async with session.get(f"http://{host}:{server.port}/healthz") as response:
                        answers.append(response.status)
                try:
                    async with session.get(f"http://127.0.0.3:{server.port}/healthz"):
                        refused = "answered"
                except aiohttp.ClientConnectorError:
                    refused = "refused"
            return answers, refused, server.listening
        finally:
            await server.stop()

    answers, elsewhere, listening = asyncio.run(scenario())
    assert answers == [200, 200]
    assert elsewhere == "refused"
    assert listening.startswith("127.0.0.1,127.0.0.2:")


def test_the_route_lookup_sends_nothing_and_returns_an_address_of_this_host_or_none() -> None:
    from kube2ipvs.roleargs import route_source

    found = route_source(socket.AF_INET)
    if found is not None:  # this machine may have no default route; when it has one, it is ours
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((found, 0))  # binding fails with EADDRNOTAVAIL for an address not on this host
