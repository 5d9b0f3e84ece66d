"""Capped exponential backoff with jitter, for every retry loop of every role."""

from __future__ import annotations

import random


class Backoff:
    """Delays that double from `initial` up to `maximum`, with "equal jitter".

    Each delay lies between half and all of its step, so replicas that failed together spread
    out, yet none retries sooner than half the step. `reset()` after a success.
    """

    def __init__(self, *, initial: float = 0.1, maximum: float = 5.0, rng: random.Random | None = None) -> None:
        if not 0 < initial <= maximum:
            raise ValueError(f"backoff needs 0 < initial ({initial}) <= maximum ({maximum})")
        self._initial, self._max = initial, maximum
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        self._attempt = 0

    def next(self) -> float:
        step = min(self._max, self._initial * 2.0 ** min(self._attempt, 32))
        self._attempt += 1
        return step / 2 + self._rng.uniform(0, step / 2)

    def reset(self) -> None:
        self._attempt = 0
