"""A directory of Kubernetes objects as a cluster source (labs, demos, tests).

Every `*.json`, `*.yaml` and `*.yml` file in the directory is read (a List, a single object, or
several YAML documents); Nodes, Services, EndpointSlices and ConfigMaps are kept, anything else
is ignored. The directory is polled when inotify says a file in it changed, and every
`interval` seconds anyway; only files whose size or modification time changed are re-read.
The first scan produces a Resync of every kind; later polls produce ADDED/MODIFIED/DELETED
events for what changed, and nothing else: a poll of an unchanged directory is one stat per
file.

What it keeps between polls is a fingerprint of each object, not the object (at 100,000
endpoints the objects are ~100 MiB; the watcher's core holds its own parsed form). An object
held by several files is the one of the last file in name order. A DELETED event carries the
object's kind and name only, which is all a consumer of a deletion reads.

A file that cannot be read or parsed keeps the objects it had at its last good read: a
half-written or broken file never looks like a deletion. Cancellation stops the polling loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import hashlib
import json
import logging
import marshal
import os
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from kube2ipvs.kube import ObjectFileError, load_objects_text
from kube2ipvs_watcher.source import KINDS, Kind, ObjectEvent, Resync, Sink, object_key

log = logging.getLogger("kube2ipvs.watcher.files")
SUFFIXES = (".json", ".yaml", ".yml")
MAX_FILE_BYTES = 256 * 1024 * 1024

ObjKey = tuple[Kind, str]


@dataclass(slots=True)
class _File:
    stamp: tuple[int, int]  # (mtime_ns, size)
    prints: dict[ObjKey, bytes] = field(default_factory=dict)  # the objects of its last good read


def fingerprint(obj: dict[str, Any]) -> bytes:
    """Equal for equal objects read from the same text (key order comes from the text), and
    never equal for different ones. marshal is four times cheaper than JSON here; format 2,
    because later ones write back-references that depend on how strings are shared across the
    whole file (an unchanged object would look changed). YAML can hold what marshal cannot
    (dates): JSON then."""
    try:
        data = marshal.dumps(obj, 2)
    except ValueError:
        data = json.dumps(obj, separators=(",", ":"), default=str).encode()
    return hashlib.blake2b(data, digest_size=16).digest()


class FileSource:
    def __init__(self, directory: Path, *, interval: float = 1.0) -> None:
        self.directory = directory
        self.interval = interval
        self._files: dict[str, _File] = {}  # by file name: a Path per file costs more than its stat
        self._holders: dict[ObjKey, set[str]] = {}  # the files that hold each object
        self._view: dict[ObjKey, bytes] = {}  # the fingerprint of each object in force
        self._pending: set[ObjKey] = set()  # judged again next poll (its file changed under a read)
        self._recheck: set[str] = set()  # files the next poll reads, whatever inotify names
        self.errors: dict[str, str] = {}  # file -> why its last read failed (for /config and logs)
        self.notified = False  # inotify wakes the polls (else they run every `interval` only)

    async def run(self, sink: Sink) -> None:
        notify = DirectoryNotify.open(self.directory)  # before the scan: no change falls between
        wake = asyncio.Event()
        loop = asyncio.get_running_loop()
        if notify is not None:
            loop.add_reader(notify.fd, notify.wake, wake)
        self.notified = notify is not None
        try:
            current = self.scan()
            for kind in KINDS:
                sink.put_nowait(Resync(kind, tuple(o for (k, _), o in sorted(current.items()) if k == kind)))
            del current  # the core keeps its own parsed form; these dicts go with the Resyncs
            while True:
                names: set[str] | None = None  # the interval ran out: every file
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), self.interval)
                    names = notify.take() if notify is not None else None
                wake.clear()
                for item in self.poll(names):
                    sink.put_nowait(item)
        finally:
            if notify is not None:
                loop.remove_reader(notify.fd)
                notify.close()

    def scan(self) -> dict[ObjKey, dict[str, Any]]:
        """Read what changed; return every object in force, by (kind, key): what the first
        Resync carries. Files not read by this call are read again for their objects."""
        _, fresh = self._poll()
        objects: dict[ObjKey, dict[str, Any]] = {}
        for key in sorted(self._view):
            owner = max(self._holders[key])
            if owner not in fresh:
                fresh[owner] = self._objects_of(owner)
            obj = fresh[owner].get(key)
            if obj is not None:
                objects[key] = obj
        return objects

    def poll(self, names: set[str] | None = None) -> list[ObjectEvent]:
        """The events since the last poll (or scan): one per object added, changed or deleted.
        With `names` (what inotify reported), only those files are looked at."""
        return self._poll(names)[0]

    def _poll(self, names: set[str] | None = None
              ) -> tuple[list[ObjectEvent], dict[str, dict[ObjKey, dict[str, Any]]]]:
        if names is not None:
            names, self._recheck = names | self._recheck, set()
        listed = self._list() if names is None else self._stat(names)
        considered = self._files.keys() if names is None else names
        fresh: dict[str, dict[ObjKey, dict[str, Any]]] = {}
        affected, self._pending = self._pending, set()
        for path, stamp in listed.items():
            known = self._files.get(path)
            if known is not None and known.stamp == stamp:
                continue
            if known is None:
                known = self._files[path] = _File(stamp)
            known.stamp = stamp
            objects = self._read(path)
            if objects is None:
                continue  # unreadable: its last good objects stay
            fresh[path] = objects
            prints = {k: fingerprint(o) for k, o in objects.items()}
            for k in known.prints.keys() - prints.keys():
                self._holders[k].discard(path)
                affected.add(k)
            for k, p in prints.items():
                self._holders.setdefault(k, set()).add(path)
                if known.prints.get(k) != p:
                    affected.add(k)
            known.prints = prints
        for gone in [p for p in considered if p in self._files and p not in listed]:
            for k in self._files.pop(gone).prints:
                self._holders[k].discard(gone)
                affected.add(k)
            self.errors.pop(str(self.directory / gone), None)
        events: list[ObjectEvent] = []
        for key in sorted(affected):
            before = self._view.get(key)
            holders = self._holders.get(key)
            if not holders:
                self._holders.pop(key, None)
                if before is not None:
                    del self._view[key]
                    events.append(ObjectEvent(key[0], "DELETED", _stub(key)))
                continue
            owner = max(holders)
            now = self._files[owner].prints[key]
            if now == before:
                continue
            if owner not in fresh:
                fresh[owner] = self._objects_of(owner)
            obj = fresh[owner].get(key)
            if obj is None:  # rewritten since its last read: read it again next poll
                self._files[owner].stamp = (-1, -1)
                self._pending.add(key)
                self._recheck.add(owner)
                continue
            self._view[key] = now
            events.append(ObjectEvent(key[0], "ADDED" if before is None else "MODIFIED", obj))
        return events, fresh

    def _list(self) -> dict[str, tuple[int, int]]:
        """Every object file and its stamp; on a listing error, every known file as it was."""
        listed: dict[str, tuple[int, int]] = {}
        try:
            with os.scandir(self.directory) as entries:
                for entry in entries:
                    if not entry.name.endswith(SUFFIXES):
                        continue
                    try:
                        if not entry.is_file():
                            continue
                        st = entry.stat()
                    except OSError:
                        continue  # vanished between listing and stat: next poll decides
                    listed[entry.name] = (st.st_mtime_ns, st.st_size)
        except OSError as exc:
            self.errors[str(self.directory)] = str(exc)
            log.warning("event=scan-failed dir=%s error=%s", self.directory, exc)
            return {p: f.stamp for p, f in self._files.items()}  # keep everything as it was
        self.errors.pop(str(self.directory), None)
        return listed

    def _stat(self, names: set[str]) -> dict[str, tuple[int, int]]:
        """The stamps of `names` that are object files now (the others are gone, or never were)."""
        found: dict[str, tuple[int, int]] = {}
        for name in names:
            if not name.endswith(SUFFIXES) or "/" in name:
                continue
            try:
                st = os.stat(self.directory / name)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                found[name] = (st.st_mtime_ns, st.st_size)
        return found

    def _read(self, name: str) -> dict[ObjKey, dict[str, Any]] | None:
        path = self.directory / name
        try:
            objects = _load(path)
        except (OSError, ObjectFileError) as exc:
            self.errors[str(path)] = str(exc)
            log.warning("event=file-unreadable file=%s error=%s (keeping its last good objects)", path, exc)
            return None
        self.errors.pop(str(path), None)
        found: dict[ObjKey, dict[str, Any]] = {}
        for obj in objects:
            given = obj.get("kind")
            kind = _KINDS.get(given) if isinstance(given, str) else None  # a dict there is unhashable
            if kind is not None:
                found[(kind, object_key(obj))] = obj
        return found

    def _objects_of(self, path: str) -> dict[ObjKey, dict[str, Any]]:
        """A file read again for objects of it that are in force but not at hand: only those
        whose fingerprint still matches (a file rewritten since waits for its own poll)."""
        known = self._files[path]
        objects = self._read(path) or {}
        return {k: o for k, o in objects.items() if known.prints.get(k) == fingerprint(o)}


_EVENT: Final = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len (then the name)
_IN_Q_OVERFLOW: Final = 0x4000


class DirectoryNotify:
    """inotify(7) on the directory: a file closed after writing, renamed in or out, created,
    deleted or touched wakes the poll at once, so a change is read in about a millisecond and
    the poll interval only bounds what inotify cannot see (e.g. a file system shared over the
    network). Not IN_MODIFY: a file is read once its writer closed it, not half-written. The
    events name the files, so a wake stats those alone, not every file of the directory."""

    MASK: Final = 0x8 | 0x4 | 0x40 | 0x80 | 0x100 | 0x200 | 0x400 | 0x800  # CLOSE_WRITE ATTRIB MOVED_* CREATE DELETE*

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.names: set[str] = set()
        self.everything = False

    @classmethod
    def open(cls, directory: Path) -> DirectoryNotify | None:
        """None (and a log line) where inotify is not available: polls alone then."""
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
            watched = fd >= 0 and libc.inotify_add_watch(fd, os.fsencode(directory), cls.MASK) >= 0
            err = ctypes.get_errno()
        except (OSError, AttributeError) as exc:  # no libc symbol: not Linux, or not glibc
            reason = str(exc)
        else:
            if watched:
                return cls(fd)
            if fd >= 0:
                os.close(fd)
            reason = os.strerror(err)
        log.info("event=files-polled dir=%s reason=%r (no inotify: changes are seen at the next poll)",
                 directory, reason)
        return None

    def wake(self, event: asyncio.Event) -> None:
        self.drain()
        event.set()

    def drain(self) -> None:
        """Read the queued events: the names they carry go to `names`; a queue overflow (or an
        event about the directory itself) sets `everything`, for a full poll."""
        with contextlib.suppress(BlockingIOError):
            while data := os.read(self.fd, 65536):
                offset = 0
                while offset + _EVENT.size <= len(data):
                    _wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
                    raw = data[offset + _EVENT.size:offset + _EVENT.size + length].rstrip(b"\0")
                    offset += _EVENT.size + length
                    if mask & _IN_Q_OVERFLOW or not raw:
                        self.everything = True
                    else:
                        self.names.add(os.fsdecode(raw))

    def take(self) -> set[str] | None:
        """The names changed since the last take; None: poll everything."""
        names, everything = self.names, self.everything
        self.names, self.everything = set(), False
        return None if everything else names

    def close(self) -> None:
        os.close(self.fd)


def _stub(key: ObjKey) -> dict[str, Any]:
    """What a DELETED event carries: the object's kind and name."""
    namespace, _, name = key[1].rpartition("/")
    metadata = {"namespace": namespace, "name": name} if namespace else {"name": name}
    return {"kind": key[0], "metadata": metadata}


_KINDS: dict[str, Kind] = {k: k for k in KINDS}


def _load(path: Path) -> list[dict[str, Any]]:
    if path.stat().st_size > MAX_FILE_BYTES:
        raise ObjectFileError(f"{path}: larger than {MAX_FILE_BYTES} bytes")
    return load_objects_text(path.read_bytes(), source=str(path))

