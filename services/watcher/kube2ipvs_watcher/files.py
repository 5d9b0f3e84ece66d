"""A directory of Kubernetes objects as a cluster source (labs, demos, tests).

Every `*.json`, `*.yaml` and `*.yml` file in the directory is read (a List, a single object, or
several YAML documents); Nodes, Services, EndpointSlices and ConfigMaps are kept, anything else
is ignored. The directory is polled every `interval` seconds and only files whose size or
modification time changed are re-read. The first scan produces a Resync of every kind; later
scans produce ADDED/MODIFIED/DELETED events for what changed.

A file that cannot be read or parsed keeps the objects it had at its last good read: a
half-written or broken file never looks like a deletion. Cancellation stops the polling loop.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kube2ipvs.kube import ObjectFileError, load_objects_text
from kube2ipvs_watcher.source import KINDS, Kind, ObjectEvent, Resync, Sink, object_key

log = logging.getLogger("kube2ipvs.watcher.files")
SUFFIXES = (".json", ".yaml", ".yml")
MAX_FILE_BYTES = 256 * 1024 * 1024


@dataclass(slots=True)
class _File:
    stamp: tuple[int, int]  # (mtime_ns, size)
    objects: dict[tuple[Kind, str], dict[str, Any]] = field(default_factory=dict)


class FileSource:
    def __init__(self, directory: Path, *, interval: float = 1.0) -> None:
        self.directory = directory
        self.interval = interval
        self._files: dict[Path, _File] = {}
        self.errors: dict[str, str] = {}  # file -> why its last read failed (for /config and logs)

    async def run(self, sink: Sink) -> None:
        current = self.scan()
        for kind in KINDS:
            sink.put_nowait(Resync(kind, tuple(o for (k, _), o in sorted(current.items()) if k == kind)))
        while True:
            await asyncio.sleep(self.interval)
            newer = self.scan()
            for item in diff(current, newer):
                sink.put_nowait(item)
            current = newer

    def scan(self) -> dict[tuple[Kind, str], dict[str, Any]]:
        """Read what changed; return every object the directory holds now, by (kind, key)."""
        seen: set[Path] = set()
        try:
            paths = sorted(p for p in self.directory.iterdir() if p.suffix in SUFFIXES and p.is_file())
        except OSError as exc:
            self.errors[str(self.directory)] = str(exc)
            log.warning("event=scan-failed dir=%s error=%s", self.directory, exc)
            paths = list(self._files)  # keep everything as it was
        else:
            self.errors.pop(str(self.directory), None)
        for path in paths:
            seen.add(path)
            try:
                st = path.stat()
            except OSError:
                continue  # vanished between listing and stat: next scan decides
            stamp = (st.st_mtime_ns, st.st_size)
            known = self._files.get(path)
            if known is not None and known.stamp == stamp:
                continue
            self._files[path] = _File(stamp, known.objects if known is not None else {})
            self._read(path)
        for gone in [p for p in self._files if p not in seen]:
            del self._files[gone]
            self.errors.pop(str(gone), None)
        merged: dict[tuple[Kind, str], dict[str, Any]] = {}
        for f in self._files.values():
            merged.update(f.objects)
        return merged

    def _read(self, path: Path) -> None:
        try:
            objects = _load(path)
        except (OSError, ObjectFileError) as exc:
            self.errors[str(path)] = str(exc)
            log.warning("event=file-unreadable file=%s error=%s (keeping its last good objects)", path, exc)
            return
        self.errors.pop(str(path), None)
        found: dict[tuple[Kind, str], dict[str, Any]] = {}
        for obj in objects:
            kind = _KINDS.get(obj.get("kind"))
            if kind is not None:
                found[(kind, object_key(obj))] = obj
        self._files[path].objects = found


_KINDS: dict[object, Kind] = {k: k for k in KINDS}


def _load(path: Path) -> list[dict[str, Any]]:
    if path.stat().st_size > MAX_FILE_BYTES:
        raise ObjectFileError(f"{path}: larger than {MAX_FILE_BYTES} bytes")
    return load_objects_text(path.read_bytes(), source=str(path))


def diff(old: dict[tuple[Kind, str], dict[str, Any]], new: dict[tuple[Kind, str], dict[str, Any]]) -> list[ObjectEvent]:
    events: list[ObjectEvent] = []
    for key in sorted(old.keys() | new.keys()):
        before, after = old.get(key), new.get(key)
        if before is None and after is not None:
            events.append(ObjectEvent(key[0], "ADDED", after))
        elif after is None and before is not None:
            events.append(ObjectEvent(key[0], "DELETED", before))
        elif before != after and after is not None:
            events.append(ObjectEvent(key[0], "MODIFIED", after))
    return events
