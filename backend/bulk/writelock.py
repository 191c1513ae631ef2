"""The per-(project, task, model_version) write lock that makes write-back idempotent.

A writer holds the lock while it looks at a task's predictions in LS and writes its own, so two
copies of a chunk (an RQ retry, a re-enqueue, two racing workers) never both write. Two
implementations behind one shape (a context manager yielding a :class:`WriteLock`):
:class:`MemoryWriteLocks` (embedded mode, one process) and :class:`RedisWriteLocks` (queue mode:
``SET`` with a TTL on :func:`backend.queue.keys.write_lock_key`, so a dead writer's lock frees itself).

Imports only :mod:`backend.queue.keys` (key names); redis-py is never imported here.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator

from backend.queue import keys
from backend.queue.connection import backoff

log = logging.getLogger(__name__)

#: A writer refreshes its lock before each LS call (timeout 30 s, usually ~20 ms); a dead writer's
#: lock frees itself after this long.
LOCK_TTL_S = 45


class WriteLockTimeout(RuntimeError):
    """Another writer held a task's write lock for longer than we waited, or took it over."""


class WriteLock:
    """What ``with store.write_lock(...) as lock`` gives: :meth:`refresh` before each slow step."""

    def __init__(self, task_id: int, refresh: Callable[[], bool] | None = None):
        self.task_id = task_id
        self._refresh = refresh

    def refresh(self) -> None:
        """Extend the lock's TTL. Raises :class:`WriteLockTimeout` when it expired meanwhile (another
        writer may have written the task since: better fail the task than write it twice)."""
        if self._refresh is not None and not self._refresh():
            raise WriteLockTimeout(f"task {self.task_id}: lost its write lock (held longer than its TTL)")


class MemoryWriteLocks:
    """Write locks of one process (no TTL: a writer that dies takes the process with it)."""

    def __init__(self) -> None:
        self._held: dict[tuple[int, int, str], str] = {}
        self._changed = threading.Condition(threading.Lock())

    @contextlib.contextmanager
    def hold(self, project: int, task_id: int, model_version: str, ttl: float = LOCK_TTL_S,
             wait: float | None = None, owner: str | None = None) -> Iterator[WriteLock]:
        key = (project, task_id, model_version)
        token = owner or uuid.uuid4().hex
        deadline = time.monotonic() + (ttl if wait is None else wait)
        with self._changed:
            while self._held.get(key, token) != token:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise WriteLockTimeout(f"task {task_id}: another writer holds its write lock")
                self._changed.wait(left)
            self._held[key] = token
        try:
            yield WriteLock(task_id)
        finally:
            with self._changed:
                if self._held.get(key) == token:
                    del self._held[key]
                self._changed.notify_all()


_ACQUIRE = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""

_REFRESH = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RedisWriteLocks:
    """Write locks shared by every process on one Redis; also the run lease's acquire/release
    (the same owner-token semantics: take it when free or already ours, release only ours)."""

    def __init__(self, connection) -> None:
        self.acquire = connection.register_script(_ACQUIRE)
        self._refresh = connection.register_script(_REFRESH)
        self.release = connection.register_script(_RELEASE)

    def take(self, key: str, owner: str, ttl_s: float) -> bool:
        """Set ``key`` to ``owner`` for ``ttl_s`` when it is free or already ``owner``'s."""
        return bool(self.acquire(keys=[key], args=[owner, max(1, int(ttl_s * 1000))]))

    def give_back(self, key: str, owner: str) -> None:
        """Delete ``key`` if ``owner`` holds it."""
        self.release(keys=[key], args=[owner])

    @contextlib.contextmanager
    def hold(self, project: int, task_id: int, model_version: str, ttl: float = LOCK_TTL_S,
             wait: float | None = None, owner: str | None = None) -> Iterator[WriteLock]:
        key = keys.write_lock_key(project, task_id, model_version)
        token = owner or uuid.uuid4().hex
        deadline = time.monotonic() + (ttl if wait is None else wait)
        ttl_ms = max(1, int(ttl * 1000))
        pauses = backoff(0.02, 0.1)
        while not self.take(key, token, ttl):
            if time.monotonic() >= deadline:
                raise WriteLockTimeout(f"task {task_id}: another writer holds its write lock")
            time.sleep(next(pauses))
        try:
            yield WriteLock(task_id, lambda: bool(self._refresh(keys=[key], args=[token, ttl_ms])))
        finally:
            try:
                self.give_back(key, token)
            except Exception as exc:  # noqa: BLE001 - any failure: the lock expires by itself
                log.warning("could not release the write lock of task %s (%s)", task_id, type(exc).__name__)


__all__ = ["LOCK_TTL_S", "MemoryWriteLocks", "RedisWriteLocks", "WriteLock", "WriteLockTimeout"]
