"""What decoding an image's bytes gave, remembered by content hash, so a later load of the same
bytes can skip decoding when nothing needs the pixels (a click on a cached SAM embedding).

The key is the SHA-256 of the encoded bytes, computed from bytes the caller has just fetched under
its own URL policy and credentials: an entry only says "these bytes decode to a W x H image", so it
cannot serve anyone an image they could not fetch themselves, and a URL whose content changed is a
new key. Bounded by entries (each is two ints and a 64-character key, ~0.2 KB: 4096 entries is
under 1 MB).

May import: nothing of the backend.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

DEFAULT_FRAMES = 4096


class FrameCache:
    """Thread-safe LRU: sha256 hex digest → (width, height) of the RGB, EXIF-transposed image those
    bytes decode to (the frame LS displays and every model output refers to)."""

    def __init__(self, max_entries: int = DEFAULT_FRAMES):
        if max_entries < 0:
            raise ValueError(f"max_entries={max_entries}: use 0 (remember nothing) or a positive count")
        self.max_entries = max_entries
        self._entries: OrderedDict[str, tuple[int, int]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, sha256: str) -> tuple[int, int] | None:
        """The (width, height) recorded for these bytes (now most recently used), or None."""
        with self._lock:
            size = self._entries.get(sha256)
            if size is not None:
                self._entries.move_to_end(sha256)
            return size

    def put(self, sha256: str, size: tuple[int, int]) -> None:
        """Record a decode's (width, height), evicting the least recently used beyond the bound."""
        if self.max_entries == 0:
            return
        with self._lock:
            self._entries[sha256] = size
            self._entries.move_to_end(sha256)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
