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
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

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
