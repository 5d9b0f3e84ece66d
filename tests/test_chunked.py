"""kube2ipvs.chunked: sequences that successive states share chunk by chunk. Each structure is
checked against a plain list doing the same operations, with chunks small enough that splits,
merges and emptied chunks happen in every example; and every snapshot must keep its contents
whatever happens to the structure afterwards."""

from __future__ import annotations

import operator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kube2ipvs.chunked import Chunked, HoleyChunks, SortedChunks


@given(st.lists(st.integers(), max_size=40), st.integers(min_value=1, max_value=7))
def test_chunked_is_the_sequence_of_its_chunks(items: list[int], size: int) -> None:
    seq = Chunked(tuple(items[i:i + size]) for i in range(0, len(items), size))
    assert list(seq) == items
    assert len(seq) == len(items)
    assert list(reversed(seq)) == items[::-1]
    assert [seq[i] for i in range(-len(items), len(items))] == items + items
    assert seq[1:-1] == tuple(items[1:-1])
    assert seq == tuple(items)
    assert seq == items
    assert seq == Chunked.of(items)
    assert hash(seq) == hash(tuple(items))
    assert all(chunk for chunk in seq.chunks)  # empty chunks are dropped
    with pytest.raises(IndexError):
        seq[len(items)]


def test_chunked_differs_from_a_different_sequence() -> None:
    assert Chunked.of([1, 2, 3]) != (1, 2)
    assert Chunked.of([1, 2, 3]) != Chunked.of([1, 2, 4])
    assert Chunked.of([1, 2]) != "12"


slot_ops = st.lists(st.tuples(st.integers(min_value=0, max_value=29), st.none() | st.integers()), max_size=60)


@given(slot_ops, st.lists(st.booleans(), max_size=60), st.integers(min_value=1, max_value=8))
def test_holey_snapshots_are_the_list_without_holes_and_never_change_afterwards(
        ops: list[tuple[int, int | None]], reads: list[bool], size: int) -> None:
    items: list[int | None] = [None] * 30
    holey: HoleyChunks[int] = HoleyChunks(30, chunk=size)
    taken: list[tuple[Chunked[int], list[int]]] = []
    for n, (i, value) in enumerate(ops):
        items[i] = value
        holey.touch(i)
        if n < len(reads) and reads[n]:
            snap = holey.snapshot(items)
            taken.append((snap, [x for x in items if x is not None]))
    final = holey.snapshot(items)
    assert list(final) == [x for x in items if x is not None]
    for snap, then in taken:
        assert list(snap) == then


def test_a_holey_snapshot_shares_every_chunk_a_change_did_not_touch() -> None:
    items: list[int | None] = list(range(100))
    holey: HoleyChunks[int] = HoleyChunks(100, chunk=10)
    before = holey.snapshot(items)
    items[42] = None
    holey.touch(42)
    after = holey.snapshot(items)
    assert [a is b for a, b in zip(before.chunks, after.chunks, strict=True)] == [c != 4 for c in range(10)]
    assert 42 not in after
    assert 42 in before


entry_ops = st.lists(st.tuples(st.booleans(), st.integers(min_value=0, max_value=60)), max_size=200)


@settings(max_examples=200)
@given(entry_ops, st.lists(st.booleans(), max_size=200), st.integers(min_value=1, max_value=4))
def test_sorted_chunks_keep_order_through_adds_and_removes(
        ops: list[tuple[bool, int]], reads: list[bool], size: int) -> None:
    held: set[int] = set()
    chunks: SortedChunks[tuple[int, str]] = SortedChunks(operator.itemgetter(1), operator.itemgetter(0), chunk=size)
    taken: list[tuple[Chunked[str], Chunked[int], list[int]]] = []
    for n, (add, k) in enumerate(ops):
        entry = (k, f"v{k}")
        if add and k not in held:
            chunks.add(entry)
            held.add(k)
        elif not add and k in held:
            chunks.remove(entry)
            held.discard(k)
        elif not add:
            with pytest.raises(KeyError):
                chunks.remove(entry)
        assert len(chunks) == len(held)
        if n < len(reads) and reads[n]:
            taken.append((chunks.snapshot(0), chunks.snapshot(1), sorted(held)))
    assert list(chunks) == [(k, f"v{k}") for k in sorted(held)]
    assert list(chunks.snapshot(1)) == sorted(held)
    assert list(chunks.snapshot(0)) == [f"v{k}" for k in sorted(held)]
    for names, keys, then in taken:  # earlier snapshots are what they were
        assert list(keys) == then
        assert list(names) == [f"v{k}" for k in then]


def test_a_sorted_snapshot_copies_only_the_chunk_that_changed() -> None:
    chunks: SortedChunks[tuple[int]] = SortedChunks(operator.itemgetter(0), chunk=4)
    for k in range(0, 200, 2):
        chunks.add((k,))
    before = chunks.snapshot()
    chunks.add((101,))
    after = chunks.snapshot()
    assert list(after) == sorted([*range(0, 200, 2), 101])
    fresh = [a for a in after.chunks if not any(a is b for b in before.chunks)]
    assert len(fresh) == 1
    assert 101 in fresh[0]
