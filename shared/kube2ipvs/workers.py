"""One thread for a role's blocking kernel calls, always the same one.

Why not `asyncio.to_thread`: its pool hands each call to whichever worker is free, and pyroute2
0.9's sockets run an asyncio core of their own that must stay on the thread that created it (a
socket first used on one thread and then on another fails with "Connection reset by peer",
seen with IPVS dumps in the VM). One thread per set of sockets also keeps the kernel calls of a
role in order, which the reconcilers assume anyway.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, ParamSpec, TypeVar

log = logging.getLogger("kube2ipvs.workers")

P = ParamSpec("P")
R = TypeVar("R")


class KernelThread:
    def __init__(self, name: str) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    async def run(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """`fn(*args, **kwargs)` on the thread; cancelling the caller leaves a started call to
        finish there (it cannot be interrupted), as with `asyncio.to_thread`."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


T = TypeVar("T")


class OnDemandReading(Generic[T]):
    """A kernel reading too costly to take on a timer for nobody (per-service counters at 10,000
    services), taken when someone asks (a /metrics scrape): on a KernelThread of its own, at most
    once per `max_age` seconds (askers in between, and askers at the same time, share one
    reading). A failed reading is logged as `event=<event>` and the last good one stays."""

    def __init__(self, name: str, read: Callable[[], T], initial: T, *, max_age: float, event: str,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.value = initial
        self._read, self._max_age, self._event, self._clock = read, max_age, event, clock
        self._thread = KernelThread(name)
        self._lock = asyncio.Lock()
        self._at: float | None = None

    async def refresh(self) -> None:
        async with self._lock:
            if self._at is not None and self._clock() - self._at < self._max_age:
                return
            try:
                self.value = await self._thread.run(self._read)
            except Exception as exc:  # a table being replaced, a namespace gone: the next asker tries again
                log.warning("event=%s error=%s", self._event, exc)
            else:
                self._at = self._clock()

    def close(self) -> None:
        self._thread.close()
