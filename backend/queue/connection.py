"""Redis connections, and waiting out a Redis restart: one backoff for every loop that does.

Imports nothing of the backend. ``redis`` is imported lazily by :func:`transient_redis_errors`
so embedded installs without redis-py can still import the bulk modules that call
:func:`retry_redis`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

log = logging.getLogger(__name__)

#: How long a worker-side store call waits out a Redis restart.
REDIS_RETRY_S = 60.0


def connect(url: str, timeout_s: float = 5.0):
    """A ``redis.Redis`` for ``url`` with socket timeouts, so no call hangs on a dead server."""
    import redis

    return redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                health_check_interval=30)


def transient_redis_errors() -> tuple[type[BaseException], ...]:
    """The redis-py errors that a restart or a failover raises (empty without redis-py)."""
    try:
        import redis
    except ImportError:  # embedded installs without redis-py
        return ()
    return (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, redis.exceptions.BusyLoadingError)


def backoff(first_s: float, most_s: float, factor: float = 2.0) -> Iterator[float]:
    """Pauses that grow from ``first_s`` by ``factor`` up to ``most_s``: 0.5, 1, 2, 4, 5, 5, ..."""
    pause = first_s
    while True:
        yield pause
        pause = min(pause * factor, most_s)


def retry_redis(fn: Callable[[], Any], what: str, patience_s: float = REDIS_RETRY_S) -> Any:
    """``fn()``, waiting out a Redis restart for up to ``patience_s`` (then the error propagates)."""
    transient = transient_redis_errors()
    deadline = time.monotonic() + patience_s
    for pause in backoff(0.5, 5.0):
        try:
            return fn()
        except transient as exc:
            if time.monotonic() + pause > deadline:
                raise
            log.warning("%s: Redis unreachable (%s); retrying in %.1f s", what, type(exc).__name__, pause)
            time.sleep(pause)
    raise AssertionError("unreachable: backoff() never ends")
