"""Byte streams cut every way a network can cut them, for protocol tests.

A machine fed a stream in pieces must behave exactly as when fed it whole:
TCP may deliver a command split anywhere, or many commands in one segment.

    from streams import splits, conversation_splits

    for chunks in splits(b"USER bob\\r\\n"):
        ...  # feed each chunk in turn

`splits` yields the whole stream, one byte at a time, every two-piece cut,
and a few seeded random chunkings. `conversation_splits` does the same for a
two-sided exchange of `(side, bytes)` steps, keeping the order of the steps.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

Side = TypeVar("Side")

RANDOM_RUNS = 8


def split_at(data: bytes, cuts: Sequence[int]) -> list[bytes]:
    """`data` cut at the given offsets (sorted, within 1..len-1)."""
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


def random_chunks(data: bytes, rng: random.Random) -> list[bytes]:
    """`data` cut into pieces of random sizes, small ones favoured."""
    chunks, i = [], 0
    while i < len(data):
        size = rng.choice((1, 2, 3, rng.randint(1, 16), rng.randint(1, 256)))
        chunks.append(data[i:i + size])
        i += size
    return chunks


def splits(data: bytes, *, seed: int = 0, random_runs: int = RANDOM_RUNS) -> Iterator[list[bytes]]:
    """Every way the tests cut `data`: each item is a list of chunks that join to `data`.

    Whole; one byte at a time; into two pieces at every inner boundary; and
    `random_runs` random chunkings (reproducible from `seed`). Empty data
    yields `[b""]` once.
    """
    yield [data]
    if len(data) < 2:
        return
    yield [data[i:i + 1] for i in range(len(data))]
    for cut in range(1, len(data)):
        yield split_at(data, [cut])
    rng = random.Random(seed)
    for _ in range(random_runs):
        yield random_chunks(data, rng)


def conversation_splits(
    steps: Sequence[tuple[Side, bytes]], *, seed: int = 0, random_runs: int = RANDOM_RUNS,
) -> Iterator[list[tuple[Side, bytes]]]:
    """`splits` for an exchange: the steps in order, each one cut the same way.

    Each item is a flat list of `(side, chunk)` to feed in order: whole
    steps; every step byte by byte; every step cut in two at offset k, for
    every k below the longest step; and random chunkings of each step.
    """
    def cut_each(cut: Callable[[bytes], list[bytes]]) -> list[tuple[Side, bytes]]:
        return [(side, chunk) for side, data in steps for chunk in cut(data) if chunk]

    yield cut_each(lambda data: [data])
    yield cut_each(lambda data: [data[i:i + 1] for i in range(len(data))])
    longest = max((len(data) for _, data in steps), default=0)
    for k in range(1, longest):
        yield cut_each(lambda data, k=k: split_at(data, [k]) if 0 < k < len(data) else [data])
    rng = random.Random(seed)
    for _ in range(random_runs):
        yield cut_each(lambda data: random_chunks(data, rng))
