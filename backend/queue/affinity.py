"""Which worker owns an image: its interactive jobs go there, where its SAM embedding is cached.

Each worker keeps its own embedding cache, so with N workers a second click reaches the worker that
encoded the image only 1/N of the time if any worker may take it. The owner of a task is chosen by
rendezvous hashing (highest random weight) of the task id over the live workers of its engine: every
process that knows the live workers picks the same owner without coordination, and when a worker
joins or leaves only the tasks it owned (or now owns) move, about 1/N of them.

The web process sends a one-task interactive job to its owner's queue
(:func:`backend.queue.transport.worker_queue`), unless that queue already holds more than
``max_queue`` jobs (a busy owner: the job goes to the engine's shared queue, any worker takes it).
A worker pre-warms only the tasks it owns (:func:`owns`). When the owner dies, the reaper moves
its waiting jobs to the shared queue (:func:`backend.queue.liveness.requeue_abandoned`).

Imports the transport only; pure functions plus one Redis read.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import redis

from backend.queue.transport import INTERACTIVE, engine_queue, queue, worker_queue


def task_key(task_id: object) -> str | None:
    """The key a task is owned by: its LS task id (unique in an LS instance); None without a usable id."""
    if isinstance(task_id, bool) or not isinstance(task_id, int) or task_id < 1:
        return None
    return str(task_id)


def _weight(worker: str, key: str) -> bytes:
    return hashlib.blake2b(f"{worker}\x00{key}".encode(), digest_size=8).digest()


def owner(key: str, workers: Iterable[str]) -> str | None:
    """The worker of ``workers`` that owns ``key`` (rendezvous hashing); None when there is none."""
    return max(workers, key=lambda worker: _weight(worker, key), default=None)


def route(connection: redis.Redis, engine: str, key: str | None, workers: Iterable[str], max_queue: int) -> str:
    """The queue for an interactive job of task ``key``: its owner's queue among the engine's live
    ``workers``, or the engine's shared queue (no key, no worker, or the owner has more than
    ``max_queue`` jobs waiting)."""
    shared = engine_queue(INTERACTIVE, engine)
    chosen = owner(key, workers) if key is not None else None
    if chosen is None:
        return shared
    own = worker_queue(engine, chosen)
    if queue(own, connection).count > max_queue:
        return shared
    return own


def owns(worker: str, key: str | None, workers: Iterable[str]) -> bool:
    """True when ``worker`` owns ``key`` among ``workers`` (pre-warming: encode only what you own).
    A worker that is not in the list (not registered yet) owns nothing; a task without a key is
    everybody's."""
    if key is None:
        return True
    return owner(key, workers) == worker


__all__ = ["owner", "owns", "route", "task_key"]
