"""Immutable sequences that successive states share chunk by chunk. Pure.

A cluster state holds every virtual service in order. Building that tuple afresh for each state
is a pass over all of them: at 30,000 services about half a millisecond per tuple, on every
one-endpoint change, in the watcher and again in every consumer. `Chunked` is the same sequence
made of tuples of at most a few hundred items: a new state shares every chunk the change did not
touch with the state before it, so making one costs the chunks that changed plus one pointer per
chunk. Producers keep their working lists and say which positions changed:

- `HoleyChunks`: a list with a fixed slot per item, where a slot can be empty (the Normalizer's
  service per config entry);
- `SortedChunks`: a sorted list of entries inserted and removed one at a time (the Assembler's
  services as values arrive).
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Final, Generic, TypeVar, overload

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)
E = TypeVar("E", bound=tuple[Any, ...])  # entries compare as tuples: the first items decide

CHUNK: Final = 256  # items per chunk: one change copies at most this many pointers (twice, when split)


class Chunked(Sequence[T_co]):
    """An immutable sequence stored as a tuple of tuples (never empty ones)."""

    __slots__ = ("_chunks", "_len", "_starts")

    def __init__(self, chunks: Iterable[tuple[T_co, ...]] = ()) -> None:
        self._chunks: tuple[tuple[T_co, ...], ...] = tuple(c for c in chunks if c)
        self._len = sum(map(len, self._chunks))
        self._starts: list[int] | None = None  # index of each chunk's first item, when first needed

    @classmethod
    def of(cls, items: Iterable[T_co]) -> Chunked[T_co]:
        flat = tuple(items)
        return cls(flat[i:i + CHUNK] for i in range(0, len(flat), CHUNK))

    @property
    def chunks(self) -> tuple[tuple[T_co, ...], ...]:
        return self._chunks

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[T_co]:
        return itertools.chain.from_iterable(self._chunks)

    def __reversed__(self) -> Iterator[T_co]:
        return itertools.chain.from_iterable(reversed(c) for c in reversed(self._chunks))

    @overload
    def __getitem__(self, index: int) -> T_co: ...

    @overload
    def __getitem__(self, index: slice) -> tuple[T_co, ...]: ...

    def __getitem__(self, index: int | slice) -> T_co | tuple[T_co, ...]:
        if isinstance(index, slice):
            return tuple(self)[index]
        if index < 0:
            index += self._len
        if not 0 <= index < self._len:
            raise IndexError("Chunked index out of range")
        if self._starts is None:
            self._starts = list(itertools.accumulate((len(c) for c in self._chunks[:-1]), initial=0))
        at = bisect.bisect_right(self._starts, index) - 1
        return self._chunks[at][index - self._starts[at]]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Chunked):
            if self._chunks == other._chunks:  # shared chunks compare by identity first: cheap
                return True
            return self._len == other._len and all(a == b for a, b in zip(self, other, strict=True))
        if isinstance(other, tuple | list):
            return self._len == len(other) and all(a == b for a, b in zip(self, other, strict=True))
        return NotImplemented

    def __hash__(self) -> int:
        return hash(tuple(self))

    def __repr__(self) -> str:
        return f"Chunked({list(self)!r})"


class HoleyChunks(Generic[T]):
    """Snapshots of a fixed-length list whose slots may be None, leaving the Nones out.

    Call `touch(i)` whenever slot i of the list changes; `snapshot(items)` then copies only the
    chunks that hold a touched slot and shares the others with the previous snapshot."""

    def __init__(self, length: int, chunk: int = CHUNK) -> None:
        self._frozen: list[tuple[T, ...] | None] = [None] * -(-length // chunk)
        self._length = length
        self._chunk = chunk

    def touch(self, i: int) -> None:
        self._frozen[i // self._chunk] = None

    def snapshot(self, items: Sequence[T | None]) -> Chunked[T]:
        assert len(items) == self._length
        frozen, size = self._frozen, self._chunk
        for c, chunk in enumerate(frozen):
            if chunk is None:
                frozen[c] = tuple([x for x in items[c * size:(c + 1) * size] if x is not None])
        return Chunked(frozen)  # type: ignore[arg-type]  # every chunk was filled just now


class SortedChunks(Generic[E]):
    """A sorted list of unique, totally ordered entries kept in chunks, with snapshots of one
    projection of them (`project`, e.g. an itemgetter) that share the chunks no change touched.
    Insertion and removal cost a bisect and a copy within one chunk, not a move of the list."""

    def __init__(self, *projections: Callable[[E], Any], chunk: int = CHUNK) -> None:
        self._size = chunk
        self._chunks: list[list[E]] = []
        self._last: list[E] = []  # each chunk's last entry, for the bisect
        self._projections = projections
        self._frozen: list[list[tuple[Any, ...] | None]] = [[] for _ in projections]
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[E]:
        return itertools.chain.from_iterable(self._chunks)

    def _dirty(self, c: int) -> None:
        for frozen in self._frozen:
            frozen[c] = None

    def add(self, entry: E) -> None:
        self._len += 1
        if not self._chunks:
            self._chunks.append([entry])
            self._last.append(entry)
            for frozen in self._frozen:
                frozen.append(None)
            return
        c = min(bisect.bisect_left(self._last, entry), len(self._chunks) - 1)
        chunk = self._chunks[c]
        bisect.insort(chunk, entry)
        self._last[c] = chunk[-1]
        self._dirty(c)
        if len(chunk) > 2 * self._size:  # split in halves
            tail = chunk[self._size:]
            del chunk[self._size:]
            self._chunks.insert(c + 1, tail)
            self._last[c] = chunk[-1]
            self._last.insert(c + 1, tail[-1])
            for frozen in self._frozen:
                frozen.insert(c + 1, None)

    def remove(self, entry: E) -> None:
        """Remove `entry`, which must be held (KeyError otherwise)."""
        c = bisect.bisect_left(self._last, entry)
        chunk = self._chunks[c] if c < len(self._chunks) else []
        at = bisect.bisect_left(chunk, entry)
        if at == len(chunk) or chunk[at] != entry:
            raise KeyError(entry)
        del chunk[at]
        self._len -= 1
        if chunk:
            self._last[c] = chunk[-1]
            self._dirty(c)
        else:
            del self._chunks[c], self._last[c]
            for frozen in self._frozen:
                del frozen[c]

    def snapshot(self, projection: int = 0) -> Chunked[Any]:
        """The held entries in order, through the projection with this index."""
        frozen, project = self._frozen[projection], self._projections[projection]
        for c, chunk in enumerate(frozen):
            if chunk is None:
                frozen[c] = tuple(map(project, self._chunks[c]))
        return Chunked(frozen)  # type: ignore[arg-type]  # every chunk was filled just now
