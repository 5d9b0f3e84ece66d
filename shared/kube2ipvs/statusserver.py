"""`/healthz`, `/config` and `/metrics` for every role, served from the role's own event loop,
plus any read-only GET pages a role adds (`pages`: the watcher's `/ui`).

The only module of `shared` that imports aiohttp. Handlers call back into the role for their
content, so a request never blocks the loop for longer than those callbacks take. `stop()`
closes the listener and waits for in-flight requests (aiohttp's AppRunner cleanup).
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest


@dataclass(frozen=True, slots=True)
class Health:
    ok: bool
    reason: str = ""  # why not ok: "config rejected: ...", "nats disconnected since ..."
    detail: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ConfigResponse:
    status: int
    content_type: str
    body: str


class ConfigRequestError(ValueError):
    """A /config request the role cannot answer (bad ?format=): 400 with this message."""


ConfigHandler = Callable[[Mapping[str, str]], Awaitable[ConfigResponse] | ConfigResponse]


REJECTED_SHOWN: Final = 10


class SubscriberStatus(Protocol):
    """What a consumer's state source says about itself (kube2ipvs.natskv's subscribers)."""

    @property
    def status(self) -> str: ...

    @property
    def rejected(self) -> Mapping[str, str]: ...


def source_detail(source: SubscriberStatus | None) -> dict[str, Any]:
    """What a consumer's /healthz says about its NATS subscriber: its status line and the values
    it refused (`event=value_rejected`), the first REJECTED_SHOWN of them by key. A refused value
    does not make the consumer unhealthy: it keeps applying its last good state, and a director
    reported unhealthy would have its routes withdrawn over one bad value."""
    if source is None:
        return {}
    rejected = source.rejected
    return {"state_source": source.status, "rejected_values": len(rejected),
            **({"rejected": {k: rejected[k] for k in sorted(rejected)[:REJECTED_SHOWN]}} if rejected else {})}


def json_response(doc: object, status: int = 200) -> ConfigResponse:
    return ConfigResponse(status, "application/json", json.dumps(doc, indent=2) + "\n")


def text_response(text: str, status: int = 200) -> ConfigResponse:
    return ConfigResponse(status, "text/plain", text)


class StatusServer:
    def __init__(
        self,
        *,
        host: str | Sequence[str],
        port: int,
        health: Callable[[], Health],
        config: ConfigHandler,
        registry: CollectorRegistry,
        pages: Mapping[str, ConfigHandler] | None = None,
        config_token: str | None = None,
        before_metrics: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.hosts: tuple[str, ...] = (host,) if isinstance(host, str) else tuple(host)
        self._port = port
        # When set, /config and the extra pages (they show the same data) answer only requests with
        # `Authorization: Bearer <token>`; /healthz and /metrics stay open for probes and Prometheus.
        self._token = config_token.encode() if config_token else None
        self._health, self._config, self._registry = health, config, registry
        self._pages = dict(pages or {})  # extra read-only GET routes of a role (the watcher's /ui)
        # Readings too costly to take on a timer (the director's per-service counters at 10k
        # VIP:ports) are taken when someone asks: a scrape, not every few seconds for nobody.
        self._before_metrics = before_metrics
        self._runner: web.AppRunner | None = None
        self.port = port

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/healthz", self._on_healthz)
        app.router.add_get("/config", self._on_config)
        app.router.add_get("/metrics", self._on_metrics)
        for path, handler in self._pages.items():
            app.router.add_get(path, self._page(handler))
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        self._runner = runner
        try:
            for host in self.hosts:  # the first one picks the port when it is 0; the others take it
                site = web.TCPSite(runner, host, self.port)
                await site.start()
                server = site._server  # aiohttp keeps the bound socket here; needed for port 0
                sockets = getattr(server, "sockets", None) or []
                if sockets:
                    self.port = sockets[0].getsockname()[1]
        except OSError:
            await self.stop()
            raise

    @property
    def listening(self) -> str:
        """Where it answers, for the start log line: 127.0.0.1,10.0.0.5:9872."""
        return ",".join(f"[{h}]" if ":" in h else h for h in self.hosts) + f":{self.port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _on_healthz(self, _request: web.Request) -> web.Response:
        h = self._health()
        body = {"ok": h.ok, **({"reason": h.reason} if h.reason else {}), **h.detail}
        return web.json_response(body, status=200 if h.ok else 503, dumps=lambda d: json.dumps(d, indent=2))

    async def _on_config(self, request: web.Request) -> web.Response:
        return self._refused(request) or await self._answer(self._config, request)

    def _page(self, handler: ConfigHandler) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def on_page(request: web.Request) -> web.Response:
            return self._refused(request) or await self._answer(handler, request)
        return on_page

    def _refused(self, request: web.Request) -> web.Response | None:
        """401 unless the request carries the bearer token (when one is configured)."""
        if self._token is None:
            return None
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self._token):
            return None
        return web.Response(status=401, text="a bearer token is required (Authorization: Bearer ...)\n",
                            headers={"WWW-Authenticate": 'Bearer realm="kube2ipvs"'})

    @staticmethod
    async def _answer(handler: ConfigHandler, request: web.Request) -> web.Response:
        try:
            result = handler(dict(request.query))
            response = await result if isinstance(result, Awaitable) else result
        except ConfigRequestError as exc:
            response = text_response(f"{exc}\n", 400)
        return web.Response(status=response.status, text=response.body, content_type=response.content_type)

    async def _on_metrics(self, _request: web.Request) -> web.Response:
        if self._before_metrics is not None:
            await self._before_metrics()
        body = generate_latest(self._registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
