"""The original design's path from a change of the cluster's objects to a node's rules, run on
the same feed as the lab, in the same run (issue 10's side-by-side, end to end).

The original's watcher debounced changes for 0.5 s; its realservers polled for a new config every
2 s and, 1 s after seeing one, rewrote their whole nat table with `iptables-restore`. Here:

- the feed directory the lab's watcher reads is watched by its files' stamps (every 5 ms); a
  change (re)arms a 0.5 s debounce, whose end publishes the objects as they are then;
- a poller ticks every 2 s, from a random phase; a tick that finds a newer publication waits
  1 s, then parses and normalizes the published objects, renders the node's nat table as the
  original did (`ravel_nat_table`, bench_realserver) and loads it with `iptables-restore` into a
  network namespace of its own (`k2i-blorig-<pid>`, deleted at the end).

`wait_applied(since, node)` returns when a load of a publication taken at or after `since` (a
`time.monotonic()`) finished for that node. Root only (the namespace, iptables-restore).
"""

from __future__ import annotations

import contextlib
import os
import random
import subprocess
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Final

from bench.bench_realserver import ravel_nat_table

from kube2ipvs.kube import load_objects_text, parse_endpointslices, parse_nodes, parse_services
from kube2ipvs.lbconfig import configmap_value, parse_lbconfig
from kube2ipvs.model import VirtualService
from kube2ipvs.normalize import normalize

DEBOUNCE: Final = 0.5
POLL: Final = 2.0
DELAY: Final = 1.0
STAMP_EVERY: Final = 0.005
NAMESPACE: Final = f"k2i-blorig-{os.getpid()}"


@dataclass(frozen=True, slots=True)
class Publication:
    taken_at: float  # monotonic: when the debounce ended and the objects were read
    version: int
    objects: tuple[dict[str, object], ...]


@dataclass(frozen=True, slots=True)
class Load:
    version: int
    node: str
    done_at: float
    seconds: float  # parse + normalize + render + iptables-restore
    rules: int


def node_share(objects: tuple[dict[str, object], ...], node: str) -> list[VirtualService]:
    """What the original's realserver on `node` rendered: every service with endpoints there."""
    nodes, _ = parse_nodes([o for o in objects if o.get("kind") == "Node"])
    services, _ = parse_services([o for o in objects if o.get("kind") == "Service"])
    slices, _ = parse_endpointslices([o for o in objects if o.get("kind") == "EndpointSlice"])
    configmaps = [o for o in objects if o.get("kind") == "ConfigMap"]
    text, _key = configmap_value(configmaps[-1], None)  # the last one read, as the lab's watcher takes it
    state = normalize(nodes, services, slices, parse_lbconfig(text))
    return [replace(vs, backends=(b,)) for vs in state.services for b in vs.backends if b.node == node]


class OriginalPipeline:
    def __init__(self, feed: Path, rng: random.Random) -> None:
        self._feed = feed
        self._rng = rng
        self._lock = threading.Condition()
        self._published: Publication | None = None
        self._loads: list[Load] = []
        self._node = ""
        self._taken_at: dict[int, float] = {}  # version -> when its objects were read
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._watch, daemon=True),
                         threading.Thread(target=self._poll, daemon=True)]

    def __enter__(self) -> OriginalPipeline:
        subprocess.run(["ip", "netns", "add", NAMESPACE], check=True)
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=30)
        subprocess.run(["ip", "netns", "del", NAMESPACE], check=False)

    @property
    def loads(self) -> list[Load]:
        with self._lock:
            return list(self._loads)

    def set_node(self, node: str) -> None:
        """The node whose realserver is emulated from now on (set it before the edit)."""
        with self._lock:
            self._node = node

    def wait_applied(self, since: float, node: str, timeout: float) -> Load | None:
        """The first load for `node` of a publication taken at or after `since`."""
        with self._lock:
            deadline = time.monotonic() + timeout
            while True:
                for load in self._loads:
                    if load.node == node and self._taken_at.get(load.version, 0.0) >= since:
                        return load
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._lock.wait(left)

    # -- the watcher: stamps, debounce, publish ---------------------------------------------------

    def _stamps(self) -> tuple[tuple[str, int, int], ...]:
        out = []
        for f in sorted(self._feed.glob("*.json")):
            with contextlib.suppress(OSError):
                st = f.stat()
                out.append((f.name, st.st_mtime_ns, st.st_size))
        return tuple(out)

    def _read(self) -> tuple[dict[str, object], ...]:
        objects: list[dict[str, object]] = []
        for f in sorted(self._feed.glob("*.json")):
            with contextlib.suppress(OSError, ValueError):
                objects += load_objects_text(f.read_bytes(), source=str(f))
        return tuple(objects)

    def _watch(self) -> None:
        seen = self._stamps()
        self._publish()
        armed: float | None = None
        while not self._stop.is_set():
            time.sleep(STAMP_EVERY)
            now = self._stamps()
            if now != seen:
                seen, armed = now, time.monotonic() + DEBOUNCE  # every change re-arms the debounce
            elif armed is not None and time.monotonic() >= armed:
                armed = None
                self._publish()

    def _publish(self) -> None:
        taken = time.monotonic()
        objects = self._read()
        with self._lock:
            version = (self._published.version + 1) if self._published is not None else 1
            self._published = Publication(taken, version, objects)
            self._taken_at[version] = taken

    # -- the realserver: poll, delay, rewrite the whole table ---------------------------------------

    def _poll(self) -> None:
        applied: dict[str, int] = {}  # node -> version last loaded (each node's realserver has its own)
        next_tick = time.monotonic() + self._rng.uniform(0, POLL)
        while not self._stop.is_set():
            time.sleep(max(0.0, next_tick - time.monotonic()))
            next_tick += POLL
            with self._lock:
                pub, node = self._published, self._node
            if pub is None or pub.version <= applied.get(node, 0) or not node:
                continue
            time.sleep(DELAY)
            started = time.monotonic()
            table = ravel_nat_table(node_share(pub.objects, node))
            done = subprocess.run(["ip", "netns", "exec", NAMESPACE, "iptables-restore"], input=table, text=True,
                                  capture_output=True, check=False, timeout=600)
            if done.returncode != 0:
                raise RuntimeError(f"iptables-restore: {done.stderr.strip()[:500]}")
            finished = time.monotonic()
            applied[node] = pub.version
            with self._lock:
                self._loads.append(Load(pub.version, node, finished, finished - started, table.count("\n-A ")))
                self._lock.notify_all()
            # The original's loop: the next tick comes POLL after the last, or at once if the load overran it.
            next_tick = max(next_tick, finished)
