"""Every role's health on the NATS status board, refreshed while it runs.

The status board (`natskv.StatusBoard`, bucket kube2ipvs-status) holds one document per
`role.host` that expires 30 s after its last refresh. The director publishes its own, richer
readiness after each reconcile (the bgp-speaker acts on it). The realserver and the bgp-speaker
publish this one every `interval` seconds, so the watcher's status page and `kube2ipvs collect`
see every instance's health and applied state, and an instance that stops disappears from the
board when its document expires.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, Final, Protocol

from kube2ipvs.statusserver import Health

log = logging.getLogger("kube2ipvs.heartbeat")
INTERVAL: Final = 5.0


class Board(Protocol):
    async def put(self, role: str, host: str, document: Mapping[str, Any]) -> None: ...


def health_document(role: str, host: str, health: Health, *, now: float | None = None) -> dict[str, Any]:
    """The board document of `health`: ok, reason, and the applied generation and VIPs when the
    role's health detail has them."""
    detail = health.detail or {}
    generation = detail.get("generation_applied", detail.get("generation"))
    document: dict[str, Any] = {
        "version": 1, "role": role, "host": host, "healthy": health.ok, "reason": health.reason,
        "generation": generation if isinstance(generation, int) and not isinstance(generation, bool) else None,
        "at": time.time() if now is None else now,
    }
    vips = detail.get("vips")
    if isinstance(vips, list):
        document["vips"] = [v for v in vips if isinstance(v, str)]
    return document


async def heartbeat(board: Board, role: str, host: str, health: Callable[[], Health], *,
                    interval: float = INTERVAL) -> None:
    """Publish `health()` every `interval` seconds until cancelled; a failed put (NATS away) is
    logged once and retried at the next beat."""
    failing = False
    while True:
        try:
            await board.put(role, host, health_document(role, host, health()))
            failing = False
        except Exception as exc:  # NATS away or the bucket not there yet: the next beat retries
            if not failing:
                log.warning("event=heartbeat_not_published role=%s error=%s", role, exc)
            failing = True
        await asyncio.sleep(interval)
