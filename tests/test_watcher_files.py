"""The file source's polls: events for what changed and nothing else, without keeping the objects."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import pytest

from kube2ipvs_watcher import files as files_module
from kube2ipvs_watcher.files import FileSource
from kube2ipvs_watcher.source import KINDS


def node(name: str, address: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
            "status": {"addresses": [{"type": "InternalIP", "address": address}]}}


def write(path: Path, *objects: dict[str, Any]) -> None:
    path.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": list(objects)}))
    st = path.stat()  # a new stamp even within the file system's time granularity
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))


def summary(events: list[Any]) -> list[tuple[str, str, str]]:
    return [(e.type, e.kind, e.obj["metadata"]["name"]) for e in events]


def test_polls_report_each_added_changed_and_deleted_object_once(tmp_path: Path) -> None:
    write(tmp_path / "a.json", node("n1", "10.0.0.1"), node("n2", "10.0.0.2"))
    source = FileSource(tmp_path)
    assert sorted(source.scan()) == [("Node", "n1"), ("Node", "n2")]
    assert source.poll() == []
    write(tmp_path / "a.json", node("n1", "10.0.0.1"), node("n2", "10.0.0.9"), node("n3", "10.0.0.3"))
    events = source.poll()
    assert summary(events) == [("MODIFIED", "Node", "n2"), ("ADDED", "Node", "n3")]
    assert events[0].obj["status"]["addresses"][0]["address"] == "10.0.0.9"
    assert source.poll() == []
    write(tmp_path / "a.json", node("n3", "10.0.0.3"))
    assert summary(source.poll()) == [("DELETED", "Node", "n1"), ("DELETED", "Node", "n2")]
    (tmp_path / "a.json").unlink()
    assert summary(source.poll()) == [("DELETED", "Node", "n3")]


def test_an_object_in_two_files_is_the_last_files_and_falls_back_when_that_one_goes(tmp_path: Path) -> None:
    write(tmp_path / "a.json", node("n1", "10.0.0.1"))
    write(tmp_path / "b.json", node("n1", "10.0.0.2"))
    source = FileSource(tmp_path)
    scanned = source.scan()
    assert scanned[("Node", "n1")]["status"]["addresses"][0]["address"] == "10.0.0.2"
    (tmp_path / "b.json").unlink()
    events = source.poll()  # a.json is read again for the object it still holds
    assert summary(events) == [("MODIFIED", "Node", "n1")]
    assert events[0].obj["status"]["addresses"][0]["address"] == "10.0.0.1"


def test_an_unchanged_directory_reads_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for i in range(5):
        write(tmp_path / f"{i}.json", node(f"n{i}", f"10.0.0.{i + 1}"))
    source = FileSource(tmp_path)
    source.scan()
    reads: list[Path] = []
    real = files_module._load

    def counting(path: Path) -> list[dict[str, Any]]:
        reads.append(path)
        return real(path)

    monkeypatch.setattr(files_module, "_load", counting)
    assert source.poll() == []
    assert reads == []
    write(tmp_path / "3.json", node("n3", "10.0.0.99"))
    assert summary(source.poll()) == [("MODIFIED", "Node", "n3")]
    assert reads == [tmp_path / "3.json"]


def test_a_rewrite_with_the_same_objects_is_no_event(tmp_path: Path) -> None:
    write(tmp_path / "a.json", node("n1", "10.0.0.1"))
    source = FileSource(tmp_path)
    source.scan()
    write(tmp_path / "a.json", node("n1", "10.0.0.1"))
    assert source.poll() == []


def test_a_written_file_is_read_at_once_not_at_the_next_poll(tmp_path: Path) -> None:
    """inotify wakes the poll: with a 60 s interval, a rename into the directory and an
    in-place rewrite are both seen within seconds."""
    import asyncio
    import time

    write(tmp_path / "a.json", node("n1", "10.0.0.1"))
    source = FileSource(tmp_path, interval=60.0)

    async def scenario() -> list[tuple[str, float]]:
        queue: asyncio.Queue[Any] = asyncio.Queue()
        task = asyncio.create_task(source.run(queue))
        seen: list[tuple[str, float]] = []
        try:
            for _ in range(len(KINDS)):
                await asyncio.wait_for(queue.get(), 10)  # the first Resyncs
            assert source.notified
            started = time.monotonic()
            staged = tmp_path / ".b.json.tmp"
            write(staged, node("n2", "10.0.0.2"))
            staged.rename(tmp_path / "b.json")
            item = await asyncio.wait_for(queue.get(), 10)
            seen.append((f"{item.type} {item.obj['metadata']['name']}", time.monotonic() - started))
            started = time.monotonic()
            write(tmp_path / "a.json", node("n1", "10.0.0.9"))
            item = await asyncio.wait_for(queue.get(), 10)
            seen.append((f"{item.type} {item.obj['metadata']['name']}", time.monotonic() - started))
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        return seen

    seen = asyncio.run(scenario())
    assert [what for what, _ in seen] == ["ADDED n2", "MODIFIED n1"]
    assert all(took < 10 for _, took in seen)  # the 60 s poll never ran


def test_an_object_whose_kind_is_not_a_string_is_ignored_not_a_crash(tmp_path: Path) -> None:
    """Found by atheris (tests/fuzz): `"kind": {}` made the file source raise TypeError (an
    unhashable dict looked up in a dict), which ended the watcher's source task."""
    (tmp_path / "a.json").write_text(json.dumps({"kind": "List", "items": [
        {"kind": {}, "metadata": {"name": "x"}}, {"kind": ["Node"], "metadata": {"name": "y"}},
        node("n1", "10.0.0.1")]}))
    source = FileSource(tmp_path)
    assert list(source.scan()) == [("Node", "n1")]
    assert source.poll() == []


def test_a_poll_of_the_names_inotify_gave_looks_at_those_files_alone(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    for i in range(5):
        write(tmp_path / f"{i}.json", node(f"n{i}", f"10.0.0.{i + 1}"))
    source = FileSource(tmp_path)
    source.scan()

    def no_listing() -> dict[str, tuple[int, int]]:
        raise AssertionError("the directory was listed")

    monkeypatch.setattr(source, "_list", no_listing)
    write(tmp_path / "3.json", node("n3", "10.0.0.99"))
    (tmp_path / "1.json").unlink()
    write(tmp_path / "9.json", node("n9", "10.0.0.9"))
    events = source.poll({"3.json", "1.json", "9.json", ".9.json.tmp", "notes.txt"})
    assert summary(events) == [("DELETED", "Node", "n1"), ("MODIFIED", "Node", "n3"), ("ADDED", "Node", "n9")]
    assert source.poll({"2.json"}) == []  # named but unchanged


def test_inotify_events_name_the_files_and_an_overflow_asks_for_everything(tmp_path: Path) -> None:
    from kube2ipvs_watcher.files import DirectoryNotify

    notify = DirectoryNotify.open(tmp_path)
    assert notify is not None
    try:
        write(tmp_path / "a.json", node("n1", "10.0.0.1"))
        (tmp_path / ".b.tmp").write_text("{}")
        (tmp_path / ".b.tmp").rename(tmp_path / "b.json")
        (tmp_path / "a.json").unlink()
        notify.drain()
        assert notify.take() == {"a.json", ".b.tmp", "b.json"}
        assert notify.take() == set()
        # More events than the kernel queues (each file: IN_CREATE and IN_CLOSE_WRITE): an overflow.
        queued = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
        for i in range(queued // 2 + 100):
            os.close(os.open(tmp_path / f".x{i}", os.O_CREAT | os.O_WRONLY))
        notify.drain()
        assert notify.take() is None  # a full poll: the names that fit say nothing of the others
    finally:
        notify.close()
