"""One model load at a time per process.

transformers' ``from_pretrained`` is not thread-safe: while one thread loads, it switches
process-wide state (the default device to ``meta`` for empty-weight init), and a second load in
another thread then fails with "Cannot copy out of meta tensor" (seen with ``ENGINES`` loading two
engines: the preload thread and a request's first load). Every load in this process takes
:data:`MODEL_LOADS`; once loaded, models run concurrently as before.
"""

from __future__ import annotations

import threading

MODEL_LOADS = threading.RLock()  # re-entrant: a video model's load may load the image engine first

__all__ = ["MODEL_LOADS"]
