"""`--config-token`: /config (and the extra pages, which show the same data) answer only requests
with the bearer token; /healthz and /metrics stay open for probes and Prometheus. And the
operator tools that read /config send it."""

from __future__ import annotations

import argparse
import asyncio
import io
from collections.abc import Mapping

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from kube2ipvs import collectcmd
from kube2ipvs.collect import Target
from kube2ipvs.statusserver import ConfigResponse, Health, StatusServer, json_response, text_response

TOKEN = "s3cret-token"


def config(query: Mapping[str, str]) -> ConfigResponse:
    if query.get("format") == "ipvsadm":
        return text_response("-A -t 192.0.2.1:80 -s mh\n")
    return json_response({"role": "director", "settings": {}, "generation_applied": 1})


async def statuses(server: StatusServer, headers: Mapping[str, str]) -> dict[str, int]:
    out = {}
    async with aiohttp.ClientSession(headers=dict(headers)) as session:
        for path in ("/config", "/config?format=ipvsadm", "/ui", "/healthz", "/metrics"):
            async with session.get(f"http://127.0.0.1:{server.port}{path}") as response:
                out[path] = response.status
    return out


@pytest.mark.parametrize(("headers", "config_status"), [
    ({}, 401),
    ({"Authorization": "Bearer wrong"}, 401),
    ({"Authorization": f"Basic {TOKEN}"}, 401),
    ({"Authorization": f"Bearer {TOKEN}"}, 200),
    ({"Authorization": f"bearer {TOKEN}"}, 200),
])
def test_config_and_pages_need_the_token_health_and_metrics_do_not(headers: dict[str, str],
                                                                   config_status: int) -> None:
    async def scenario() -> dict[str, int]:
        server = StatusServer(host="127.0.0.1", port=0, health=lambda: Health(True), config=config,
                              registry=CollectorRegistry(), pages={"/ui": lambda _q: text_response("<html/>")},
                              config_token=TOKEN)
        await server.start()
        try:
            return await statuses(server, headers)
        finally:
            await server.stop()

    got = asyncio.run(scenario())
    assert got == {"/config": config_status, "/config?format=ipvsadm": config_status, "/ui": config_status,
                   "/healthz": 200, "/metrics": 200}


def test_without_a_token_configured_everything_is_open() -> None:
    async def scenario() -> dict[str, int]:
        server = StatusServer(host="127.0.0.1", port=0, health=lambda: Health(True), config=config,
                              registry=CollectorRegistry(), pages={"/ui": lambda _q: text_response("<html/>")})
        await server.start()
        try:
            return await statuses(server, {})
        finally:
            await server.stop()

    assert set(asyncio.run(scenario()).values()) == {200}


def test_collect_sends_the_token_and_says_when_it_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario(token: str | None) -> tuple[int, str]:
        server = StatusServer(host="127.0.0.1", port=0, health=lambda: Health(True), config=config,
                              registry=CollectorRegistry(), config_token=TOKEN)
        await server.start()
        try:
            args = argparse.Namespace(targets=[Target("127.0.0.1", server.port)], timeout=5.0,
                                      concurrency=4, format="json", token=token)
            out = io.StringIO()
            code = await collectcmd.collect(args, out, io.StringIO())
            return code, out.getvalue()
        finally:
            await server.stop()

    monkeypatch.delenv("KUBE2IPVS_CONFIG_TOKEN", raising=False)
    code, text = asyncio.run(scenario(None))
    assert code == 1
    assert "401" in text
    code, text = asyncio.run(scenario(TOKEN))
    assert "401" not in text
    assert '"role": "director"' in text
