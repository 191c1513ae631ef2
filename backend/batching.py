"""``chunks``: a list cut into consecutive slices. Foundation module: imports nothing of the backend."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TypeVar

T = TypeVar("T")


def chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    """``items[0:size]``, ``items[size:2*size]``, ... (the last one shorter); ``size`` >= 1."""
    if size < 1:
        raise ValueError(f"chunk size must be at least 1, not {size}")
    for start in range(0, len(items), size):
        yield items[start:start + size]
