"""kube2ipvs.workers.OnDemandReading: a costly reading taken when asked, at most once per max_age."""

from __future__ import annotations

import asyncio
import logging

import pytest

from kube2ipvs.workers import OnDemandReading


def test_a_failed_reading_keeps_the_last_good_one_and_the_next_asker_tries_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    results: list[int | Exception] = [1, OSError("table gone"), 3]

    def read() -> int:
        result = results.pop(0)
        if isinstance(result, Exception):
            raise result
        return result

    reading = OnDemandReading("test-reading", read, 0, max_age=5.0, event="test_unread", clock=lambda: now[0])

    async def asks() -> list[int]:
        seen = []
        for at in (0.0, 4.9, 5.0, 5.1):  # fresh; within max_age; due but fails; failed: due again
            now[0] = at
            await reading.refresh()
            seen.append(reading.value)
        return seen

    try:
        with caplog.at_level(logging.WARNING, logger="kube2ipvs.workers"):
            assert asyncio.run(asks()) == [1, 1, 1, 3]
    finally:
        reading.close()
    assert "event=test_unread error=table gone" in caplog.text
    assert results == []
