"""Helpers for building large immutable object trees quickly."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def gc_paused() -> Iterator[None]:
    """Suspend the cyclic garbage collector while building a large acyclic structure.

    Normalizing a 100,000-endpoint cluster allocates a few hundred thousand small objects; the
    collector's generation-0/1/2 passes over that growing heap cost more than the build itself
    (measured: about 1 s of 2 s), and can free nothing because the result holds no cycles.
    Reference counting still frees garbage as usual. The previous state is restored on exit.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
