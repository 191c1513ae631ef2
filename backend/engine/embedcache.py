"""A thread-safe LRU cache bounded by bytes, for SAM image embeddings.

Keyed by the image's content hash (not its URL: the same picture under two URLs is one entry, and
a URL whose content changed is a new one). A click on a cached image skips SAM's image encoder,
which is most of the cost of a click.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable, Generic, Protocol, TypeVar


class Sized(Protocol):
    nbytes: int


T = TypeVar("T", bound=Sized)


class EmbeddingCache(Generic[T]):
    """``get(key)`` / ``put(key, value)``.

    Evicts least-recently-used entries until the total ``nbytes`` fits ``max_bytes``; a value larger
    than the whole cache is returned but not stored. ``on_hit``/``on_miss``/``on_size`` feed metrics.
    """

    def __init__(self, max_bytes: int, on_hit: Callable[[], None] = lambda: None,
                 on_miss: Callable[[], None] = lambda: None, on_size: Callable[[int], None] = lambda n: None):
        if max_bytes < 0:
            raise ValueError(f"max_bytes={max_bytes}: use 0 (no cache) or a positive size")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, T] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._on_hit, self._on_miss, self._on_size = on_hit, on_miss, on_size

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def get(self, key: str) -> T | None:
        """The cached value (now most recently used), or None; counts a hit or a miss."""
        with self._lock:
            value = self._entries.get(key)
            if value is not None:
                self._entries.move_to_end(key)
        (self._on_hit if value is not None else self._on_miss)()
        return value

    def put(self, key: str, value: T) -> None:
        """Store ``value``, evicting least-recently-used entries until the cache fits again."""
        with self._lock:
            if value.nbytes <= self.max_bytes and key not in self._entries:
                self._entries[key] = value
                self._bytes += value.nbytes
                while self._bytes > self.max_bytes:
                    _, evicted = self._entries.popitem(last=False)
                    self._bytes -= evicted.nbytes
            size = self._bytes
        self._on_size(size)


def embedding_cache(settings, metrics=None) -> EmbeddingCache:
    """The deployment's cache (EMBEDDING_CACHE_MB), reporting hits, misses and size to ``metrics``
    (a :class:`backend.metrics.Metrics`) when given; one per engine."""
    hooks = {} if metrics is None else dict(on_hit=metrics.embedding_cache_hits.inc,
                                            on_miss=metrics.embedding_cache_misses.inc,
                                            on_size=metrics.embedding_cache_bytes.set)
    return EmbeddingCache(int(settings.embedding_cache_mb * 2**20), **hooks)
