"""`GET /ui`: gathers the status page's model and renders it (kube2ipvs_watcher.ui).

Each request reads the NATS status board once (bounded by `timeout`), so the page shows what
the board holds now; nothing is cached between requests and no task runs in the background.
A board that cannot be read is shown on the page; the rest of the page still renders.
Cancellation (the client went away, or shutdown) abandons the board read.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any, Protocol

from kube2ipvs.statusserver import ConfigResponse
from kube2ipvs_watcher.app import WatcherApp
from kube2ipvs_watcher.ui import Member, StatusPage, members_from_board, render


class Board(Protocol):
    async def documents(self) -> dict[str, dict[str, Any]]: ...


class StatusPageRoute:
    def __init__(self, app: WatcherApp, board: Board | None, *, identity: str, timeout: float = 2.0) -> None:
        self._app, self._board, self._identity, self._timeout = app, board, identity, timeout

    async def page(self) -> StatusPage:
        now = time.time()
        docs: dict[str, dict[str, Any]] = {}
        error: str | None = None
        if self._board is None:
            error = "not configured"
        else:
            try:
                docs = await asyncio.wait_for(self._board.documents(), self._timeout)
            except TimeoutError:
                error = f"no answer within {self._timeout:g} s"
            except Exception as exc:  # NATS away or not connected yet: say so on the page
                error = f"{type(exc).__name__}: {exc}"
        health = self._app.health()
        state = self._app.last_state
        detail = health.detail
        generation = detail.get("generation")
        watcher = Member(
            role="watcher", host=self._identity, healthy=health.ok, reason=health.reason,
            generation=generation if isinstance(generation, int) else None,
            content_hash=state.content_hash if state is not None else None, age=None,
            detail=", ".join(("leader" if detail.get("leader") else "standby",
                              "NATS connected" if detail.get("nats_connected") else "NATS disconnected")),
        )
        return StatusPage(now=now, watcher=watcher, state=state, members=members_from_board(docs, now),
                          board_error=error, rejections=tuple(self._app.rejections),
                          config_problem=self._app.core.config_status.problem)

    async def __call__(self, _query: Mapping[str, str]) -> ConfigResponse:
        return ConfigResponse(200, "text/html", render(await self.page()))
